//! End-to-end resume benchmark on the real model, through the product's path (agent-pool).
//!
//! For each history length N, an agent is built whose saved cache holds exactly N tokens (a
//! system prompt and one long user message of seeded random words, answered with one token),
//! and then a new turn that adds exactly `--turn` tokens to compute (the chat template's
//! framing and the previous reply's token included) is timed three ways, side by side:
//!
//! - (a) re-prefill: render the conversation and prefill all of it on an empty cache (what a
//!   tool without a saved cache does; the demo's baseline);
//! - (b) warm resume: `AgentPool::generate` on the agent cold in a freshly opened pool whose
//!   files were just read (page cache warm): transcript, `KvCache::load` through kv-store
//!   (mmap, checksums, f16 → f32), render, prefill of the new tokens;
//! - (c) cold resume: the same after `posix_fadvise(POSIX_FADV_DONTNEED)` on every file of the
//!   pool (segments, manifest, transcript), so the cache comes from the disk (Linux only).
//!
//! TTFT runs to the first token's logits, greedily sampled. Each resume runs on a fresh copy of
//! the pool directory, since a turn changes the agent. Also: save ms (the N-token cache saved
//! as a new cache in an empty store, f16, with the call the pool makes: `KvCache::save`) and
//! the agent's bytes on disk per token.
//!
//! `cargo run --release -p agentkv-benches --bin resume -- [--model PATH]
//! [--histories 256,1024,2048,4096] [--turn 16] [--repeats 3]`
//!
//! Medians of `--repeats` runs; re-prefill stops repeating once a run took longer than
//! `--slow-ms` (default 30 s: on two cores the 4K history is then measured once). Human-readable lines go
//! to stderr, one `RESUME {flat json of numbers}` line per history to stdout, which
//! `cargo xtask bench` parses.

#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_pool::{AgentPool, PoolConfig, Reply};
use anyhow::{Context, Result, bail};
use clap::Parser;
use engine::{Engine, GenerateOptions, Message, Sampler, SamplingConfig};
use kv_extract::KvCache;
use kv_store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const AGENT: &str = "history";
const SYSTEM: &str = "You are a careful reviewer. You read the conversation so far and answer \
the last question in two sentences.";
/// Words the history and the new turn are drawn from; those the model's tokenizer does not
/// encode as one token (with their leading space) are dropped, so that a message of k words is
/// k tokens and every length can be hit exactly.
const WORDS: &str = "the of and to in is it that for on with as was at by be this are from \
or have an they which one you had not but what all were when we there can more if no out so \
said up its about into than them only other new some could time these two may then first \
any like now such make over our even most after also made many before must through back \
years where much your way well down should because each just those people how too little \
state good very world still own see men work long here get both between life being under \
never day same another know while last might great old year off come since against go came \
right used take three states himself few house use during without again place around \
however home small found thought went say part once general high upon school every does \
group number water cache memory agent disk token model layer page file write read turn \
save load fast slow answer question review bug test code change system prompt user reply";
const SEED: u64 = 0x5eed_cafe;

#[derive(Parser)]
struct Args {
    /// The GGUF model (default: the one `cargo xtask fetch-model` installs).
    #[arg(long)]
    model: Option<PathBuf>,
    /// History lengths in tokens, comma-separated.
    #[arg(long, default_value = "256,1024,2048,4096", value_delimiter = ',')]
    histories: Vec<usize>,
    /// Tokens the new turn adds to compute (the template's framing included).
    #[arg(long, default_value_t = 16)]
    turn: usize,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Re-prefill is not repeated once a run took longer than this many milliseconds.
    #[arg(long, default_value_t = 30_000)]
    slow_ms: u64,
    /// Scratch directory for the pools (default: target/bench/resume-work in the workspace).
    /// Must be on a disk-backed file system: on tmpfs the cold figure cannot be cold.
    #[arg(long)]
    workdir: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    if args.turn == 0 || args.repeats == 0 || args.histories.is_empty() {
        bail!("--turn, --repeats and --histories must be positive");
    }
    let model_path = match args.model {
        Some(p) => p,
        None => engine::default_model_path()
            .context("cannot tell where the model lives: set AGENTKV_HOME or pass --model")?,
    };
    if !model_path.exists() {
        // The engine's own error for it, which says how to get a model.
        return Err(engine::EngineError::ModelNotFound { path: model_path }.into());
    }
    let workdir = args.workdir.unwrap_or_else(|| {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        manifest_dir
            .parent()
            .unwrap_or(manifest_dir)
            .join("target/bench/resume-work")
    });
    fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;

    let started = Instant::now();
    let engine = Arc::new(
        Engine::load(&model_path).with_context(|| format!("loading {}", model_path.display()))?,
    );
    let threads = rayon::current_num_threads();
    eprintln!(
        "loaded {} in {:.2}s; {threads} threads; pools in {}",
        model_path.display(),
        started.elapsed().as_secs_f64(),
        workdir.display()
    );
    if !page_cache::SUPPORTED {
        eprintln!(
            "note: cold resume needs posix_fadvise(POSIX_FADV_DONTNEED) (Linux); it is skipped here"
        );
    }
    let words = single_token_words(&engine)?;
    let mut rng = StdRng::seed_from_u64(SEED);
    let longest = args.histories.iter().copied().max().unwrap_or(0);
    let history_words: Vec<&str> = (0..longest)
        .map(|_| words[rng.random_range(..words.len())])
        .collect();
    let turn_words: Vec<&str> = (0..args.turn)
        .map(|_| words[rng.random_range(..words.len())])
        .collect();

    let bench = Bench {
        engine,
        config: PoolConfig::default(),
        repeats: args.repeats,
        turn: args.turn,
        slow: Duration::from_millis(args.slow_ms),
    };
    for &n in &args.histories {
        let dir = workdir.join(format!("history-{n}"));
        let result = bench.history(n, &history_words, &turn_words, &dir);
        // The scratch copies are large (about 23 KB per token each); never leave them behind.
        let _ = fs::remove_dir_all(&dir);
        let row = result.with_context(|| format!("history of {n} tokens"))?;
        row.print(threads);
    }
    let _ = fs::remove_dir(&workdir);
    Ok(())
}

/// The words of [`WORDS`] that are one token after a space.
fn single_token_words(engine: &Engine) -> Result<Vec<&'static str>> {
    let mut words = Vec::new();
    for w in WORDS.split_whitespace() {
        if engine.tokenizer().encode(&format!(" {w}"))?.len() == 1 {
            words.push(w);
        }
    }
    if words.len() < 32 {
        bail!(
            "only {} of the benchmark's words are single tokens for this model's tokenizer: \
             the history cannot be sized exactly",
            words.len()
        );
    }
    Ok(words)
}

/// The largest `k` for which `len(k)` (token count of a prompt with `k` words, non-decreasing)
/// is `target`, found in a few steps since each word adds about one token.
fn fit_words(mut len: impl FnMut(usize) -> Result<usize>, target: usize) -> Result<usize> {
    let base = len(0)?;
    if base >= target {
        bail!("the chat template alone makes {base} tokens: {target} is too few");
    }
    let mut k = target - base;
    for _ in 0..32 {
        let got = len(k)?;
        if got == target {
            return Ok(k);
        }
        k = if got < target {
            k + (target - got)
        } else {
            k.checked_sub(got - target).filter(|&k| k > 0).unwrap_or(1)
        };
    }
    bail!("could not size a message to exactly {target} tokens")
}

struct Bench {
    engine: Arc<Engine>,
    config: PoolConfig,
    repeats: usize,
    turn: usize,
    slow: Duration,
}

/// One history length's figures, in milliseconds unless named otherwise.
struct HistoryRow {
    history: usize,
    turn: usize,
    reprefill: Vec<Duration>,
    warm: Vec<Sample>,
    cold: Vec<Sample>,
    save: Vec<Duration>,
    disk_bytes: u64,
    same_first_token: bool,
    /// Re-prefill stopped repeating after a run longer than this.
    slow: Duration,
}

/// One timed resume.
struct Sample {
    ttft: Duration,
    load: Duration,
    first_token: u32,
}

impl Bench {
    fn history(
        &self,
        n: usize,
        history_words: &[&str],
        turn_words: &[&str],
        dir: &Path,
    ) -> Result<HistoryRow> {
        let engine = &self.engine;
        let _ = fs::remove_dir_all(dir);
        let base = dir.join("base");

        // The agent: system prompt + one user message, sized so that the prompt is n tokens,
        // answered with one token (which the cache does not hold yet: the next turn computes it).
        let user = |k: usize| history_words.get(..k).unwrap_or(history_words).join(" ");
        let history_len = |k: usize| {
            let m = [Message::system(SYSTEM), Message::user(user(k))];
            Ok(engine.chat_tokens(&m, true)?.len())
        };
        let k1 = fit_words(history_len, n)?;
        if k1 > history_words.len() {
            bail!("internal: {k1} words needed, {} drawn", history_words.len());
        }
        let user1 = user(k1);
        let started = Instant::now();
        let (reply1, store) = {
            let pool = AgentPool::open(&base, Arc::clone(engine), self.config.clone())?;
            pool.create_agent(AGENT, "bench", SYSTEM)?;
            let reply = pool.generate(AGENT, &user1, &one_token(), &mut |_| {})?;
            pool.flush()?;
            (reply, pool.store().clone())
        };
        if reply1.prompt_tokens != n {
            bail!(
                "internal: the history prompt has {} tokens, not {n}",
                reply1.prompt_tokens
            );
        }
        let cached = store.manifest(AGENT)?.map_or(0, |m| m.n_tokens);
        if cached != n as u64 {
            bail!("internal: the saved cache holds {cached} tokens, not {n}");
        }
        let disk_bytes = store.disk_bytes(AGENT)?;
        eprintln!(
            "history {n}: agent built and saved in {:.1}s ({disk_bytes} bytes on disk)",
            started.elapsed().as_secs_f64()
        );

        // The new turn: exactly `turn` tokens past the cached history.
        let conversation = |k: usize| {
            vec![
                Message::system(SYSTEM),
                Message::user(user1.clone()),
                Message::assistant(reply1.text.clone()),
                Message::user(turn_words.get(..k).unwrap_or(turn_words).join(" ")),
            ]
        };
        let k2 = fit_words(
            |k| Ok(engine.chat_tokens(&conversation(k), true)?.len()),
            n + self.turn,
        )
        .with_context(|| {
            format!(
                "--turn {} is below what the chat template adds to a turn by itself",
                self.turn
            )
        })?;
        if k2 > turn_words.len() {
            bail!(
                "internal: {k2} turn words needed, {} drawn",
                turn_words.len()
            );
        }
        let messages = conversation(k2);
        let turn_text = turn_words[..k2].join(" ");

        let meta = engine.cache_meta(self.config.kv_dtype);
        let cache = KvCache::load(&store, AGENT, &meta, engine.model().kv_shape())?;
        let mut row = HistoryRow {
            history: n,
            turn: self.turn,
            reprefill: Vec::new(),
            warm: Vec::new(),
            cold: Vec::new(),
            save: Vec::new(),
            disk_bytes,
            same_first_token: true,
            slow: self.slow,
        };
        // Interleaved, so that a change in the machine's load hits all figures alike.
        for r in 0..self.repeats {
            let save_dir = dir.join(format!("save-{r}"));
            let save_store = Store::open(&save_dir)?;
            let t = Instant::now();
            cache.save(&save_store, AGENT, &meta)?;
            row.save.push(t.elapsed());
            fs::remove_dir_all(&save_dir)?;

            let run = dir.join(format!("run-{r}"));
            row.warm
                .push(self.resume(&base, &run, false, &turn_text, n)?);
            if page_cache::SUPPORTED {
                row.cold
                    .push(self.resume(&base, &run, true, &turn_text, n)?);
            }
            if r == 0 || row.reprefill.iter().all(|d| *d <= self.slow) {
                let (ttft, token) = self.reprefill(&messages, n)?;
                row.reprefill.push(ttft);
                row.same_first_token &= row
                    .warm
                    .iter()
                    .chain(&row.cold)
                    .all(|s| s.first_token == token);
            }
        }
        Ok(row)
    }

    /// (b) or (c): resumes the agent in a fresh copy of the pool and runs the new turn to its
    /// first token.
    fn resume(&self, base: &Path, run: &Path, cold: bool, turn: &str, n: usize) -> Result<Sample> {
        copy_tree(base, run)?;
        let pool = AgentPool::open(run, Arc::clone(&self.engine), self.config.clone())?;
        if cold {
            page_cache::evict_tree(run)?;
        } else {
            read_tree(run)?;
        }
        let started = Instant::now();
        let reply = pool.generate(AGENT, turn, &one_token(), &mut |_| {})?;
        // generate returns after the first token (max_tokens 1) and the transcript append,
        // which a user waits for only after seeing that token.
        let ttft = started.elapsed().saturating_sub(reply.timings.commit);
        check_resumed(&reply, n, self.turn)?;
        pool.abandon();
        fs::remove_dir_all(run).with_context(|| format!("removing {}", run.display()))?;
        Ok(Sample {
            ttft,
            load: reply.timings.load,
            first_token: greedy(&reply.first_logits)?,
        })
    }

    /// (a): the whole conversation rendered and prefilled on an empty cache, to the first
    /// token.
    fn reprefill(&self, messages: &[Message], n: usize) -> Result<(Duration, u32)> {
        let started = Instant::now();
        let prompt = self.engine.chat_tokens(messages, true)?;
        let mut cache = self.engine.new_cache(self.config.kv_dtype)?;
        let (logits, _) = self.engine.sync(&mut cache, &prompt)?;
        let token = greedy(&logits)?;
        let ttft = started.elapsed();
        if prompt.len() != n + self.turn {
            bail!(
                "internal: the re-prefilled prompt has {} tokens, not {}",
                prompt.len(),
                n + self.turn
            );
        }
        Ok((ttft, token))
    }
}

fn one_token() -> GenerateOptions {
    GenerateOptions {
        max_tokens: 1,
        sampling: SamplingConfig::greedy(),
        ..Default::default()
    }
}

fn greedy(logits: &[f32]) -> Result<u32> {
    Ok(Sampler::new(SamplingConfig::greedy())?.sample(logits)?)
}

/// A resume that silently rebuilt or recomputed the history would time the wrong thing.
fn check_resumed(reply: &Reply, n: usize, turn: usize) -> Result<()> {
    if let Some(r) = &reply.rebuilt {
        bail!(
            "the saved cache was not resumed but rebuilt ({:?}: {})",
            r.reason,
            r.detail
        );
    }
    if !reply.resumed_from_disk || reply.reused_tokens != n || reply.prompt_tokens != n + turn {
        bail!(
            "internal: resumed {} with {} of {} prompt tokens reused; expected {n} of {}",
            reply.resumed_from_disk,
            reply.reused_tokens,
            reply.prompt_tokens,
            n + turn
        );
    }
    Ok(())
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// Copies a pool directory, fsyncing every file so that its pages are clean (droppable).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for src in files_under(from)? {
        let rel = src.strip_prefix(from)?;
        let dst = to.join(rel);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        fs::File::open(&dst)?.sync_all()?;
    }
    Ok(())
}

/// Reads every file under `dir` once, so that it is in the page cache.
fn read_tree(dir: &Path) -> Result<()> {
    for path in files_under(dir)? {
        std::io::copy(&mut fs::File::open(&path)?, &mut std::io::sink())
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(())
}

/// Dropping files from the page cache.
mod page_cache {
    use std::path::Path;

    use anyhow::Result;

    /// Whether [`evict_tree`] works on this platform.
    pub const SUPPORTED: bool = cfg!(target_os = "linux");

    /// `posix_fadvise(POSIX_FADV_DONTNEED)` on every file under `dir`, after an fsync: the
    /// kernel drops clean pages only.
    #[cfg(target_os = "linux")]
    pub fn evict_tree(dir: &Path) -> Result<()> {
        use anyhow::Context;
        for path in super::files_under(dir)? {
            let file = std::fs::File::open(&path)?;
            file.sync_all()?;
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
                .with_context(|| format!("posix_fadvise on {}", path.display()))?;
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    pub fn evict_tree(_dir: &Path) -> Result<()> {
        anyhow::bail!("dropping files from the page cache is only implemented on Linux")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `{"a": 1, "b": 2.5}`: what `cargo xtask bench` parses (numbers only).
fn flat_json(fields: &[(&str, f64)]) -> String {
    // Microsecond resolution is plenty, and keeps the line readable.
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\": {}", (v * 1e3).round() / 1e3))
        .collect();
    format!("{{{}}}", body.join(", "))
}

impl HistoryRow {
    fn fields(&self, threads: usize) -> Vec<(&'static str, f64)> {
        let med = |v: &[Duration]| median(v.iter().copied().map(ms).collect());
        let ttft = |v: &[Sample]| med(&v.iter().map(|s| s.ttft).collect::<Vec<_>>());
        let load = |v: &[Sample]| med(&v.iter().map(|s| s.load).collect::<Vec<_>>());
        let mut f = vec![
            ("history", self.history as f64),
            ("turn_tokens", self.turn as f64),
            ("reprefill_ttft_ms", med(&self.reprefill)),
            ("reprefill_runs", self.reprefill.len() as f64),
            ("warm_ttft_ms", ttft(&self.warm)),
            ("warm_load_ms", load(&self.warm)),
        ];
        if !self.cold.is_empty() {
            f.push(("cold_ttft_ms", ttft(&self.cold)));
            f.push(("cold_load_ms", load(&self.cold)));
        }
        f.extend([
            ("resume_runs", self.warm.len() as f64),
            ("save_ms", med(&self.save)),
            ("disk_bytes", self.disk_bytes as f64),
            (
                "bytes_per_token",
                self.disk_bytes as f64 / self.history as f64,
            ),
            (
                "same_first_token",
                f64::from(u8::from(self.same_first_token)),
            ),
            ("reprefill_slow_ms", ms(self.slow)),
            ("threads", threads as f64),
        ]);
        f
    }

    fn print(&self, threads: usize) {
        let f = self.fields(threads);
        let get = |k: &str| f.iter().find(|(n, _)| *n == k).map_or(f64::NAN, |x| x.1);
        let (re, warm, cold) = (
            get("reprefill_ttft_ms"),
            get("warm_ttft_ms"),
            get("cold_ttft_ms"),
        );
        eprintln!(
            "history {}: TTFT re-prefill {re:.1} ms ({} runs), warm resume {warm:.1} ms ({:.1}x; \
             load {:.1} ms), cold resume {cold:.1} ms ({:.1}x; load {:.1} ms); save {:.1} ms; \
             {:.0} bytes/token{}",
            self.history,
            self.reprefill.len(),
            re / warm,
            get("warm_load_ms"),
            re / cold,
            get("cold_load_ms"),
            get("save_ms"),
            get("bytes_per_token"),
            if self.same_first_token {
                ""
            } else {
                "; note: the resumed first token differs from re-prefill's (f16 rounding)"
            }
        );
        // TTFT is mostly the turn's prefill, which is noisy on a shared machine; reading the
        // cache is where eviction shows.
        if get("cold_load_ms") <= get("warm_load_ms") {
            eprintln!(
                "note: loading the cache cold ({:.1} ms) was not slower than warm ({:.1} ms): \
                 the eviction did not take effect (tmpfs?), or the disk reads about as fast as \
                 the page cache (a VM's disk cached by its host) and the difference is in the noise",
                get("cold_load_ms"),
                get("warm_load_ms")
            );
        }
        println!("RESUME {}", flat_json(&f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn fit_words_hits_the_target_when_a_word_is_one_token() {
        // A template of 10 tokens, whose first word costs 2 tokens and the rest 1.
        let len = |k: usize| Ok(if k == 0 { 10 } else { 11 + k });
        let k = fit_words(len, 100).expect("reachable");
        assert_eq!(len(k).expect("len"), 100);
        assert!(
            fit_words(len, 10).is_err(),
            "the template alone is 10 tokens"
        );
        // A target no k reaches (every k from 1 on skips over it): an error, not a loop.
        assert!(fit_words(|k| Ok(if k == 0 { 10 } else { 20 + 2 * k }), 23).is_err());
    }

    #[test]
    fn json_line_is_flat_numbers() {
        let s = flat_json(&[("history", 256.0), ("warm_ttft_ms", 12.500_000_4)]);
        assert_eq!(s, r#"{"history": 256, "warm_ttft_ms": 12.5}"#);
    }
}
