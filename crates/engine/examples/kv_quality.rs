//! What holding the KV cache in f16 or `q8_0` costs against f32, on the real model: the
//! engine's side of `cargo xtask bench --only kv-quality` (the llama.cpp peer measures its own
//! `q8_0` cache against its f16 one the same way).
//!
//! The first `--tokens` tokens of TEXT (the model's tokenizer, BOS as its metadata asks) run
//! through three caches, f32, f16 and `q8_0`, side by side in passes of 512 tokens with the
//! logits of every position. For each of f16 and `q8_0` against f32:
//!
//! - `mean_kl`, `max_kl`: over positions, KL(p_f32 || p_dtype) of the next-token
//!   distributions (softmax of the logits in f64);
//! - `top1_agree`: the share of positions whose argmax agrees;
//! - `greedy_agree`, `greedy_first_diff`: at each of `--cuts` cut points c (cut k of N at
//!   floor(tokens * k / N)), the f32 cache greedy-decodes `--continuation` tokens after the
//!   first c tokens, uninterrupted; the dtype's cache is saved through kv-store, loaded into a
//!   new cache and greedy-decodes as many. The first continuation token comes from the logits
//!   at c - 1; every later one is decoded on the loaded cache. `greedy_agree` is the share of
//!   continuation tokens equal position by position over all cuts, `greedy_first_diff` the
//!   index of the first difference per cut (`--continuation` when none).
//!
//! `cargo run --release -p engine --example kv_quality -- --text TEXT [--model PATH]
//! [--tokens 4096] [--continuation 64] [--cuts 4]`
//!
//! Prints one `KVQ {json}` line per dtype and `INFO` lines (instruction set, text, bytes per
//! token) on stdout; progress on stderr.

mod common;

use common::argmax;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use engine::{Engine, Logits, PREFILL_CHUNK};
use kv_extract::KvCache;
use kv_store::{KvDtype, Store};

#[derive(Parser)]
struct Args {
    /// The GGUF model (default: the one `cargo xtask fetch-model` installs).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The held-out text.
    #[arg(long)]
    text: PathBuf,
    /// Tokens of the text to run.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Greedy tokens decoded after each cut.
    #[arg(long, default_value_t = 64)]
    continuation: usize,
    /// Cut points, evenly spread (the last at the end of the text).
    #[arg(long, default_value_t = 4)]
    cuts: usize,
}

/// The dtypes measured against f32.
const DTYPES: [KvDtype; 2] = [KvDtype::F16, KvDtype::Q8_0];

fn main() -> std::process::ExitCode {
    common::main(run)
}

/// What one dtype's run adds up.
#[derive(Default)]
struct Tally {
    kl_sum: f64,
    kl_max: f64,
    top1_same: usize,
    positions: usize,
    greedy_same: usize,
    greedy_total: usize,
    first_diff: Vec<usize>,
}

fn run() -> Result<()> {
    let args = Args::parse();
    if args.tokens == 0 || args.cuts == 0 || args.continuation == 0 {
        bail!("--tokens, --cuts and --continuation must be positive");
    }
    let text = std::fs::read_to_string(&args.text).with_context(|| {
        format!(
            "reading the held-out text {} (pass --text PATH to a UTF-8 text file)",
            args.text.display()
        )
    })?;
    let engine = Engine::load(&common::model_path(args.model)?)?;
    let tokenizer = engine.tokenizer();
    let mut ids = Vec::new();
    if tokenizer.add_bos_token()
        && let Some(bos) = tokenizer.bos_id()
    {
        ids.push(bos);
    }
    ids.extend(tokenizer.encode_plain(&text)?);
    if ids.len() < args.tokens {
        bail!(
            "{} holds {} tokens, fewer than --tokens {}: pass a longer text or fewer tokens",
            args.text.display(),
            ids.len(),
            args.tokens
        );
    }
    ids.truncate(args.tokens);
    if args.tokens + args.continuation > engine.context_len() {
        bail!(
            "--tokens plus --continuation exceed the model's context of {}",
            engine.context_len()
        );
    }
    let model = engine.model();
    let vocab = model.config().vocab_size;
    let cuts: Vec<usize> = (1..=args.cuts)
        .map(|k| args.tokens * k / args.cuts)
        .collect();
    println!("INFO isa: {}", model.isa().name());
    println!(
        "INFO text: {} ({} tokens)",
        args.text.display(),
        args.tokens
    );
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
        let meta = engine.cache_meta(dtype);
        println!(
            "INFO kv bytes per token {dtype}: {}",
            meta.kv_bytes(1) * 2 * model.config().n_layers
        );
    }

    let dir = tempfile::tempdir().context("creating a temp dir for the store")?;
    let store = Store::open(dir.path())?;
    let mut exact = engine.new_cache(KvDtype::F32)?;
    let mut caches = DTYPES
        .iter()
        .map(|&d| engine.new_cache(d))
        .collect::<engine::Result<Vec<_>>>()?;
    let mut tallies: Vec<Tally> = DTYPES.iter().map(|_| Tally::default()).collect();

    // Passes end at every multiple of the chunk and at every cut.
    let mut ends: Vec<usize> = (PREFILL_CHUNK..args.tokens)
        .step_by(PREFILL_CHUNK)
        .chain(cuts.iter().copied())
        .collect();
    ends.sort_unstable();
    ends.dedup();
    let started = Instant::now();
    let mut start = 0;
    for end in ends {
        let part = &ids[start..end];
        let want = model.forward(part, &mut exact, Logits::All)?;
        let got: Vec<Vec<f32>> = caches
            .iter_mut()
            .map(|c| model.forward(part, c, Logits::All))
            .collect::<engine::Result<_>>()?;
        for (tally, got) in tallies.iter_mut().zip(&got) {
            for (p, q) in want.chunks_exact(vocab).zip(got.chunks_exact(vocab)) {
                let kl = kl_divergence(p, q);
                tally.kl_sum += kl;
                tally.kl_max = tally.kl_max.max(kl);
                tally.top1_same += usize::from(argmax(p) == argmax(q));
                tally.positions += 1;
            }
        }
        if cuts.contains(&end) {
            let last = |logits: &[f32]| argmax(&logits[logits.len() - vocab..]);
            let reference = greedy(&engine, &mut exact.fork(), last(&want), args.continuation)?;
            for ((dtype, cache), (tally, got)) in
                DTYPES.iter().zip(&caches).zip(tallies.iter_mut().zip(&got))
            {
                // Through disk: saved, a new cache loaded from the file.
                let meta = engine.cache_meta(*dtype);
                let name = format!("cut-{dtype}");
                cache.save(&store, &name, &meta)?;
                let mut loaded = KvCache::load(&store, &name, &meta, model.kv_shape())?;
                let tokens = greedy(&engine, &mut loaded, last(got), args.continuation)?;
                let same = tokens
                    .iter()
                    .zip(&reference)
                    .filter(|(a, b)| a == b)
                    .count();
                let first = tokens
                    .iter()
                    .zip(&reference)
                    .position(|(a, b)| a != b)
                    .unwrap_or(args.continuation);
                tally.greedy_same += same;
                tally.greedy_total += args.continuation;
                tally.first_diff.push(first);
                eprintln!(
                    "cut {end}, {dtype}: {same} of {} greedy tokens as f32's, first difference at {first}",
                    args.continuation
                );
            }
        }
        eprintln!(
            "{end} of {} tokens, {:.0} s",
            args.tokens,
            started.elapsed().as_secs_f64()
        );
        start = end;
    }
    for (dtype, t) in DTYPES.iter().zip(&tallies) {
        println!(
            "KVQ {}",
            serde_json::json!({
                "kv": dtype.name(),
                "baseline": "f32",
                "tokens": args.tokens,
                "mean_kl": t.kl_sum / t.positions as f64,
                "max_kl": t.kl_max,
                "top1_agree": t.top1_same as f64 / t.positions as f64,
                "greedy_agree": t.greedy_same as f64 / t.greedy_total as f64,
                "greedy_first_diff": t.first_diff,
                "cuts": cuts,
            })
        );
    }
    Ok(())
}

/// `n` greedy tokens: `first`, then each decoded on `cache` from the one before.
fn greedy(engine: &Engine, cache: &mut KvCache, first: u32, n: usize) -> Result<Vec<u32>> {
    let mut out = vec![first];
    while out.len() < n {
        let logits = engine
            .model()
            .forward(&out[out.len() - 1..], cache, Logits::Last)?;
        out.push(argmax(&logits));
    }
    Ok(out)
}

/// KL(p || q) of the softmax distributions of two logit rows, in f64.
fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    let lp = log_softmax(p);
    let lq = log_softmax(q);
    lp.iter()
        .zip(&lq)
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&x| f64::from(x) - log_z).collect()
}
