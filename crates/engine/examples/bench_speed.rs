//! Times the engine on the real SmolLM2 model, for each history length: prefill of the history
//! (seeded random tokens), greedy decode steps after it, resume TTFT (load the history's saved
//! cache through kv-store from the page cache, then a 16-token turn; into the buffers the
//! history was computed in, with the load's share, and into new ones) and re-prefill TTFT
//! (history + turn from an empty cache), after a 64-token warm-up, as the llama.cpp peer
//! does. The resume is timed `--resumes` times and their median reported (a resume takes tens
//! of milliseconds, so one descheduled moment of a shared host would otherwise decide a run's
//! figure), the rest once a run: `cargo xtask bench` runs both several times, alternately,
//! and takes medians.
//!
//! `cargo run --release -p engine --example bench_speed -- [--model PATH]
//! [--histories 512,2048,4096] [--decode 32] [--turn 16] [--resumes 5] [--repeats 1]
//! [--kv-dtype f16]`
//!
//! The cache is held in memory and saved in `--kv-dtype` (f32, f16 or q8_0).
//!
//! Prints a human-readable line per figure on stderr, and on stdout one `ENGINE {json}` line
//! per history (with the KV bytes per token and the turn's flops, from which `cargo xtask
//! bench` computes the resume floor) and an `INFO isa: LEVEL` line (the instruction set the
//! kernels ran), which `cargo xtask bench` parses.

mod common;

use common::argmax;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use engine::{Engine, Logits};
use kv_extract::KvCache;
use kv_store::{KvDtype, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// The GGUF model (default: the one `cargo xtask fetch-model` installs).
    #[arg(long)]
    model: Option<PathBuf>,
    /// History lengths, comma-separated.
    #[arg(long, default_value = "512,2048,4096", value_delimiter = ',')]
    histories: Vec<usize>,
    /// Decode steps timed after each history.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Tokens of the new turn for the TTFT figures.
    #[arg(long, default_value_t = 16)]
    turn: usize,
    /// Resumes timed per history, into the history's buffers and into new ones alternately
    /// (the median of each is reported).
    #[arg(long, default_value_t = 5)]
    resumes: usize,
    /// Re-prefills timed per history (the median is reported).
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Where the kv-store used for the resume figure lives (default: a temp dir).
    #[arg(long)]
    store: Option<PathBuf>,
    /// The dtype the cache holds K and V in, in memory and on disk.
    #[arg(long, default_value = "f16", value_parser = common::parse_kv_dtype)]
    kv_dtype: KvDtype,
}

fn main() -> std::process::ExitCode {
    common::main(run)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run() -> Result<()> {
    let args = Args::parse();
    if args.turn == 0 || args.resumes == 0 || args.repeats == 0 || args.histories.is_empty() {
        bail!("--turn, --resumes, --repeats and --histories must be positive");
    }
    let path = common::model_path(args.model)?;
    let t = Instant::now();
    let engine = Engine::load(&path)?;
    let model = engine.model();
    eprintln!(
        "loaded {} in {:.2}s: {:.1} MiB of weights, {} threads",
        path.display(),
        t.elapsed().as_secs_f64(),
        model.weight_bytes() as f64 / (1 << 20) as f64,
        rayon::current_num_threads(),
    );
    let tmp;
    let store_dir = match args.store {
        Some(dir) => dir,
        None => {
            tmp = tempfile::tempdir().context("creating a temp dir for the store")?;
            tmp.path().to_owned()
        }
    };
    let store = Store::open(&store_dir)
        .with_context(|| format!("opening a store in {}", store_dir.display()))?;
    let meta = engine.cache_meta(args.kv_dtype);
    let new_cache = || model.new_cache(args.kv_dtype);

    let vocab = model.config().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(1234);
    println!(
        "INFO model: {}",
        path.file_name().map_or(path.display().to_string(), |n| n
            .to_string_lossy()
            .into_owned())
    );
    println!("INFO isa: {}", model.isa().name());
    println!("INFO kv dtype: {}", args.kv_dtype);
    println!("INFO resumes: {}", args.resumes);
    // Warm up the thread pool and page in the weights, with the llama.cpp peer's warm-up.
    let warmup: Vec<u32> = (0..64).map(|_| rng.random_range(0..vocab)).collect();
    model.forward(&warmup, &mut new_cache()?, Logits::Last)?;
    for &n in &args.histories {
        let history: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab)).collect();
        let turn: Vec<u32> = (0..args.turn).map(|_| rng.random_range(0..vocab)).collect();

        let mut cache = new_cache()?;
        let t = Instant::now();
        let mut logits = model.forward(&history, &mut cache, Logits::Last)?;
        let prefill = t.elapsed();
        let name = format!("bench-{n}");
        cache
            .save(&store, &name, &meta)
            .context("saving the history")?;
        // What the history takes: in memory (a sliding-window layer holds only its window),
        // and in its file, header and token ids included.
        let kv_bytes_per_token = cache.bytes_used() as f64 / n as f64;
        let disk_bytes_per_token = store
            .disk_bytes(&name)
            .context("sizing the saved history")? as f64
            / n as f64;

        let t = Instant::now();
        for _ in 0..args.decode {
            let next = argmax(&logits);
            logits = model.forward(&[next], &mut cache, Logits::Last)?;
        }
        let decode = t.elapsed();

        // Resume into the buffers the history was computed in, as llama.cpp loads its state
        // into the context it already has (and as a long-running process can reuse an
        // evicted cache's buffers); and into new buffers, whose first touch is page faults.
        let (mut resume, mut resume_fresh, mut load) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.resumes {
            let t = Instant::now();
            cache
                .load_into(&store, &name, &meta)
                .context("loading the history")?;
            load.push(t.elapsed());
            model.forward(&turn, &mut cache, Logits::Last)?;
            resume.push(t.elapsed());

            let t = Instant::now();
            let mut fresh = KvCache::load(&store, &name, &meta, model.kv_shape())
                .context("loading the history")?;
            model.forward(&turn, &mut fresh, Logits::Last)?;
            resume_fresh.push(t.elapsed());
        }
        drop(cache);
        let full: Vec<u32> = [&history[..], &turn[..]].concat();
        let mut reprefill = Vec::new();
        for _ in 0..args.repeats {
            let t = Instant::now();
            model.forward(&full, &mut new_cache()?, Logits::Last)?;
            reprefill.push(t.elapsed());
        }
        let reprefill = median(reprefill);

        let turn_flops = turn_flops(model.config(), n, args.turn);
        let prefill_tps = n as f64 / prefill.as_secs_f64();
        let decode_tps = args.decode as f64 / decode.as_secs_f64();
        let (resume, resume_fresh) = (median(resume), median(resume_fresh));
        let load = median(load);
        eprintln!(
            "history {n}: prefill {prefill_tps:.1} tok/s, decode {decode_tps:.1} tok/s, \
             resume TTFT {:.1} ms (of which loading {:.1} ms; {:.1} ms into new buffers), \
             re-prefill TTFT {:.1} ms",
            ms(resume),
            ms(load),
            ms(resume_fresh),
            ms(reprefill)
        );
        println!(
            "ENGINE {}",
            serde_json::json!({
                "history": n,
                "prefill_tok_s": prefill_tps,
                "decode_tok_s": decode_tps,
                "resume_ttft_ms": ms(resume),
                "resume_load_ms": ms(load),
                "resume_fresh_ttft_ms": ms(resume_fresh),
                "reprefill_ttft_ms": ms(reprefill),
                "weight_bytes": model.weight_bytes(),
                "kv_bytes_per_token": kv_bytes_per_token,
                "disk_bytes_per_token": disk_bytes_per_token,
                "turn_flops": turn_flops,
                "threads": rayon::current_num_threads(),
            })
        );
    }
    Ok(())
}

/// The arithmetic of a `turn`-token turn after `history` tokens, in flops (two per
/// multiply-add): every layer's projections and MLP for each token, its attention (scores and
/// V sums over every position it sees, each query head), and the output head for the last
/// token. What the resume floor charges at the FMA peak.
fn turn_flops(c: &engine::ModelConfig, history: usize, turn: usize) -> f64 {
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let projections = c.dim * (q + 2 * kv) + q * c.dim + 3 * c.dim * c.ffn_dim;
    // A sliding-window layer's query reads at most its window.
    let attention = |window: Option<usize>| -> usize {
        (0..turn)
            .map(|t| {
                let seen = (history + t + 1).min(window.unwrap_or(usize::MAX));
                c.n_heads * seen * c.head_dim * 2
            })
            .sum()
    };
    let layers: usize = (0..c.n_layers)
        .map(|l| turn * projections + attention(c.layer_window(l)))
        .sum();
    let macs = layers + c.vocab_size * c.dim;
    2.0 * macs as f64
}
