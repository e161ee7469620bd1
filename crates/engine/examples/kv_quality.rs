//! What holding the KV cache in f16 or `q8_0` costs against f32, on the real model: the
//! engine's side of `cargo xtask bench --only kv-quality` (the llama.cpp peer measures its own
//! `q8_0` cache against its f16 one the same way).
//!
//! Two kinds of input, one per run:
//!
//! - `--text TEXT`: the first `--tokens` tokens of a held-out text (the model's tokenizer, BOS
//!   as its metadata asks), cut k of `--cuts` N at floor(tokens * k / N);
//! - `--chat FILE`: conversations (the demo's are `crates/cli/src/demo_conversations.json`):
//!   `{"shared_context": "...", "conversations": [{"name": "...", "system": "...", "turns":
//!   ["...", ...]}]}`, each user turn a message (the first one after `shared_context` and a
//!   blank line, when there is one). Each is rendered through the chat template with the
//!   model's own replies: at each user turn the f32 cache greedily answers, up to
//!   `--continuation` tokens or the end of its turn, and the reply joins the conversation.
//!   Each conversation is measured from an empty cache, with a cut where each reply starts.
//!
//! Every input runs through three caches, f32, f16 and `q8_0`, side by side in passes of 512
//! tokens (and ending at each cut), with the logits of every position. For each of f16 and
//! `q8_0` against f32:
//!
//! - `mean_kl`, `max_kl`: over positions, KL(p_f32 || p_dtype) of the next-token
//!   distributions (softmax of the logits in f64);
//! - `top1_agree`: the share of positions whose argmax agrees;
//! - `greedy_agree`, `greedy_first_diff`: at each cut c the f32 cache greedy-decodes
//!   `--continuation` tokens after the first c tokens, uninterrupted; the dtype's cache is
//!   saved through kv-store, loaded into a new cache and greedy-decodes as many. The first
//!   continuation token comes from the logits at c - 1; every later one is decoded on the
//!   loaded cache. `greedy_agree` is the share of continuation tokens equal position by
//!   position over all cuts, `greedy_first_diff` the index of the first difference per cut
//!   (`--continuation` when none).
//!
//! `--ids-out FILE` writes what was measured as JSON, `{"inputs": [{"name": "...", "ids":
//! [...], "cuts": [...]}]}`, so that the llama.cpp peer can run the same token ids.
//!
//! `cargo run --release -p engine --example kv_quality -- (--text TEXT | --chat FILE)
//! [--model PATH] [--tokens 4096] [--continuation 64] [--cuts 4] [--ids-out FILE]`
//!
//! Prints one `KVQ {json}` line per dtype and `INFO` lines (instruction set, input, bytes per
//! token) on stdout; progress on stderr.

mod common;

use common::argmax;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use engine::{Engine, GenerateOptions, Logits, Message, PREFILL_CHUNK};
use kv_extract::KvCache;
use kv_store::{KvDtype, Store};
use serde::Deserialize;

#[derive(Parser)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["text", "chat"]))]
struct Args {
    /// The GGUF model (default: the one `cargo xtask fetch-model` installs).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A held-out text.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Conversations (JSON; the module's documentation gives the form).
    #[arg(long)]
    chat: Option<PathBuf>,
    /// Tokens of the text to run.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Greedy tokens decoded after each cut (and, with --chat, most tokens per reply).
    #[arg(long, default_value_t = 64)]
    continuation: usize,
    /// The text's cut points, evenly spread (the last at the end of the text).
    #[arg(long, default_value_t = 4)]
    cuts: usize,
    /// Writes the measured token ids and cuts here, as JSON.
    #[arg(long)]
    ids_out: Option<PathBuf>,
}

/// The dtypes measured against f32.
const DTYPES: [KvDtype; 2] = [KvDtype::F16, KvDtype::Q8_0];

fn main() -> std::process::ExitCode {
    common::main(run)
}

/// What one dtype's run adds up, over every input.
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

/// Token ids run from an empty cache, with the positions after which continuations are
/// compared.
#[derive(serde::Serialize)]
struct Input {
    name: String,
    ids: Vec<u32>,
    cuts: Vec<usize>,
}

/// A `--chat` file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatFile {
    /// What the file is (ignored).
    #[serde(default)]
    #[allow(dead_code)]
    about: String,
    /// Given before every conversation's first user turn, with a blank line.
    #[serde(default)]
    shared_context: String,
    conversations: Vec<Conversation>,
}

#[derive(Deserialize)]
struct Conversation {
    name: String,
    system: String,
    turns: Vec<String>,
}

fn run() -> Result<()> {
    let args = Args::parse();
    if args.tokens == 0 || args.cuts == 0 || args.continuation == 0 {
        bail!("--tokens, --cuts and --continuation must be positive");
    }
    let model_path = common::model_path(args.model.clone())?;
    let engine = Engine::load(&model_path)?;
    let model = engine.model();
    let (inputs, described) = match (&args.text, &args.chat) {
        (Some(text), _) => (
            vec![text_input(&engine, text, &args)?],
            format!("{} ({} tokens)", text.display(), args.tokens),
        ),
        (None, Some(chat)) => {
            let inputs = chat_inputs(&engine, chat, args.continuation)?;
            let described = format!(
                "{} ({} conversations, {} tokens, {} cuts)",
                chat.display(),
                inputs.len(),
                inputs.iter().map(|i| i.ids.len()).sum::<usize>(),
                inputs.iter().map(|i| i.cuts.len()).sum::<usize>(),
            );
            (inputs, described)
        }
        (None, None) => bail!("pass --text TEXT or --chat FILE"),
    };
    for input in &inputs {
        if input.ids.len() + args.continuation > engine.context_len() {
            bail!(
                "{}: {} tokens plus --continuation {} exceed the model's context of {}",
                input.name,
                input.ids.len(),
                args.continuation,
                engine.context_len()
            );
        }
    }
    if let Some(path) = &args.ids_out {
        let json = serde_json::json!({ "inputs": inputs });
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing the token ids to {}", path.display()))?;
    }
    println!("INFO isa: {}", model.isa().name());
    println!("INFO input: {described}");
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
        let meta = engine.cache_meta(dtype);
        println!(
            "INFO kv bytes per token {dtype}: {}",
            meta.kv_bytes(1) * 2 * model.config().n_layers
        );
    }

    let dir = tempfile::tempdir().context("creating a temp dir for the store")?;
    let store = Store::open(dir.path())?;
    let mut tallies: Vec<Tally> = DTYPES.iter().map(|_| Tally::default()).collect();
    let started = Instant::now();
    for input in &inputs {
        measure(&engine, &store, input, args.continuation, &mut tallies)?;
        eprintln!(
            "{}: done at {:.0} s",
            input.name,
            started.elapsed().as_secs_f64()
        );
    }
    let positions: usize = inputs.iter().map(|i| i.ids.len()).sum();
    let cuts: Vec<usize> = inputs.iter().flat_map(|i| i.cuts.iter().copied()).collect();
    for (dtype, t) in DTYPES.iter().zip(&tallies) {
        println!(
            "KVQ {}",
            serde_json::json!({
                "kv": dtype.name(),
                "baseline": "f32",
                "tokens": positions,
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

/// The first `--tokens` tokens of a text, with `--cuts` evenly spread cuts.
fn text_input(engine: &Engine, path: &Path, args: &Args) -> Result<Input> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the held-out text {} (pass --text PATH to a UTF-8 text file)",
            path.display()
        )
    })?;
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
            path.display(),
            ids.len(),
            args.tokens
        );
    }
    ids.truncate(args.tokens);
    Ok(Input {
        name: path.display().to_string(),
        ids,
        cuts: (1..=args.cuts)
            .map(|k| args.tokens * k / args.cuts)
            .collect(),
    })
}

/// Each conversation of a `--chat` file, rendered with the f32 cache's greedy replies of at
/// most `max_reply` tokens; a cut where each reply starts.
fn chat_inputs(engine: &Engine, path: &Path, max_reply: usize) -> Result<Vec<Input>> {
    let json = std::fs::read_to_string(path)
        .with_context(|| format!("reading the conversations {}", path.display()))?;
    let file: ChatFile = serde_json::from_str(&json).with_context(|| {
        format!(
            "{} is not a conversations file: it takes {{\"shared_context\": \"...\", \
             \"conversations\": [{{\"name\": \"...\", \"system\": \"...\", \"turns\": \
             [\"...\"]}}]}}",
            path.display()
        )
    })?;
    if file.conversations.is_empty() || file.conversations.iter().any(|c| c.turns.is_empty()) {
        bail!(
            "{}: every conversation needs at least one turn, and there must be one",
            path.display()
        );
    }
    let options = GenerateOptions {
        max_tokens: max_reply,
        ..GenerateOptions::default()
    };
    let mut inputs = Vec::new();
    for c in &file.conversations {
        let mut cache = engine.new_cache(KvDtype::F32)?;
        let mut messages = vec![Message::system(c.system.as_str())];
        let mut prompts = Vec::new();
        for (k, turn) in c.turns.iter().enumerate() {
            let content = if k == 0 && !file.shared_context.is_empty() {
                format!("{}\n\n{turn}", file.shared_context)
            } else {
                turn.clone()
            };
            messages.push(Message::user(content));
            let prompt = engine.chat_tokens(&messages, true)?;
            let reply = engine.generate(&mut cache, &prompt, &options, &mut |_| {})?;
            messages.push(Message::assistant(reply.text).with_tokens(reply.tokens));
            prompts.push(prompt);
        }
        let ids = engine.chat_tokens(&messages, false)?;
        for prompt in &prompts {
            if !ids.starts_with(prompt) {
                bail!(
                    "{}: the chat template renders the earlier turns of {:?} differently once \
                     later ones follow, so a cut cannot stand for a resumed turn",
                    path.display(),
                    c.name
                );
            }
        }
        inputs.push(Input {
            name: c.name.clone(),
            ids,
            cuts: prompts.iter().map(Vec::len).collect(),
        });
    }
    Ok(inputs)
}

/// Runs one input through f32 and the lower precisions from empty caches, adding to
/// `tallies`.
fn measure(
    engine: &Engine,
    store: &Store,
    input: &Input,
    continuation: usize,
    tallies: &mut [Tally],
) -> Result<()> {
    let model = engine.model();
    let vocab = model.config().vocab_size;
    let ids = &input.ids;
    let mut exact = engine.new_cache(KvDtype::F32)?;
    let mut caches = DTYPES
        .iter()
        .map(|&d| engine.new_cache(d))
        .collect::<engine::Result<Vec<_>>>()?;
    // Passes end at every multiple of the chunk and at every cut.
    let mut ends: Vec<usize> = (PREFILL_CHUNK..ids.len())
        .step_by(PREFILL_CHUNK)
        .chain(input.cuts.iter().copied())
        .chain([ids.len()])
        .collect();
    ends.sort_unstable();
    ends.dedup();
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
        if input.cuts.contains(&end) {
            let last = |logits: &[f32]| argmax(&logits[logits.len() - vocab..]);
            let reference = greedy(engine, &mut exact.fork(), last(&want), continuation)?;
            for ((dtype, cache), (tally, got)) in
                DTYPES.iter().zip(&caches).zip(tallies.iter_mut().zip(&got))
            {
                // Through disk: saved, a new cache loaded from the file.
                let meta = engine.cache_meta(*dtype);
                let name = format!("cut-{dtype}");
                cache.save(store, &name, &meta)?;
                let mut loaded = KvCache::load(store, &name, &meta, model.kv_shape())?;
                let tokens = greedy(engine, &mut loaded, last(got), continuation)?;
                let same = tokens
                    .iter()
                    .zip(&reference)
                    .filter(|(a, b)| a == b)
                    .count();
                let first = tokens
                    .iter()
                    .zip(&reference)
                    .position(|(a, b)| a != b)
                    .unwrap_or(continuation);
                tally.greedy_same += same;
                tally.greedy_total += continuation;
                tally.first_diff.push(first);
                eprintln!(
                    "{}, cut {end}, {dtype}: {same} of {continuation} greedy tokens as f32's, \
                     first difference at {first}",
                    input.name
                );
            }
        }
        eprintln!("{}: {end} of {} tokens", input.name, ids.len());
        start = end;
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
