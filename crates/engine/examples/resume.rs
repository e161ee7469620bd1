//! Two sessions of one conversation, in two processes: session 1 answers and saves the KV
//! cache; session 2 loads it, continues, and measures resuming against re-prefilling the same
//! history from scratch in the same run.
//!
//! `cargo run --release -p engine --example resume -- --session 1` then `--session 2`

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use engine::{Engine, GenerateOptions, Message};
use kv_extract::KvCache;
use kv_store::{KvDtype, Store};

const NAME: &str = "resume-demo";
const SYSTEM: &str = "You are a concise technical assistant. You answer questions about software \
engineering precisely, in two or three sentences, and you say so when you are unsure.";
const TURN1: &str = "What is a KV cache in a transformer language model?";
const TURN2: &str = "Why does saving it to disk make a chat session start faster?";

#[derive(Parser)]
struct Args {
    /// 1: answer the first question and save; 2: load, continue and compare with re-prefill.
    #[arg(long)]
    session: u8,
    /// A GGUF of a llama, Gemma 3 or Qwen2 model (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
}

fn store() -> Result<Store> {
    let home = engine::agentkv_home().context("set AGENTKV_HOME to a data directory")?;
    Ok(Store::open(&home.join("examples-store"))?)
}

fn say(engine: &Engine, cache: &mut KvCache, messages: &[Message]) -> Result<engine::Generation> {
    let prompt = engine.chat_tokens(messages, true)?;
    let options = GenerateOptions {
        max_tokens: 64,
        ..GenerateOptions::default()
    };
    let mut stdout = std::io::stdout();
    let out = engine.generate(cache, &prompt, &options, &mut |piece| {
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    })?;
    println!();
    Ok(out)
}

fn run() -> Result<()> {
    let args = Args::parse();
    let engine = Engine::load(&common::model_path(args.model)?)?;
    let store = store()?;
    let meta = engine.cache_meta(KvDtype::F16);
    match args.session {
        1 => {
            let mut cache = engine.new_cache(KvDtype::F16)?;
            println!("user: {TURN1}\nassistant: ");
            let out = say(
                &engine,
                &mut cache,
                &[Message::system(SYSTEM), Message::user(TURN1)],
            )?;
            let started = Instant::now();
            let report = cache.save(&store, NAME, &meta)?;
            println!(
                "\nsession 1: {} prompt tokens prefilled in {:.0} ms; {} tokens generated at {:.1} tok/s; \
                 cache of {} tokens saved in {:.1} ms ({} bytes written)",
                out.prompt_tokens,
                out.prefill.as_secs_f64() * 1e3,
                out.tokens.len(),
                out.tokens.len() as f64 / out.decode.as_secs_f64(),
                cache.len(),
                started.elapsed().as_secs_f64() * 1e3,
                report.bytes_written
            );
            // The reply goes where session 2 will find it (the transcript is the agent pool's
            // job in the real tool; here a file beside the cache).
            std::fs::write(store.root().join(format!("{NAME}.reply.txt")), &out.text)?;
        }
        2 => {
            let reply_path = store.root().join(format!("{NAME}.reply.txt"));
            let Ok(reply) = std::fs::read_to_string(&reply_path) else {
                bail!("no saved session: run `--session 1` first");
            };
            let conversation = [
                Message::system(SYSTEM),
                Message::user(TURN1),
                Message::assistant(reply),
                Message::user(TURN2),
            ];
            let prompt = engine.chat_tokens(&conversation, true)?;

            let started = Instant::now();
            let mut cache = KvCache::load(&store, NAME, &meta, engine.model().kv_shape()).context(
                "loading session 1's cache (run `--session 1` again if the model changed)",
            )?;
            let load = started.elapsed();
            let (_, reused) = engine.sync(&mut cache, &prompt)?;
            let resume_ttft = started.elapsed();

            let started = Instant::now();
            let mut scratch = engine.new_cache(KvDtype::F16)?;
            engine.sync(&mut scratch, &prompt)?;
            let scratch_ttft = started.elapsed();

            println!("user: {TURN2}\nassistant: ");
            let out = say(&engine, &mut cache, &conversation)?;
            println!(
                "\nsession 2: history of {} tokens; loaded {} cached tokens in {:.1} ms; time to first token \
                 resumed {:.0} ms vs re-prefill {:.0} ms ({:.1}x); {} tokens generated",
                prompt.len(),
                reused,
                load.as_secs_f64() * 1e3,
                resume_ttft.as_secs_f64() * 1e3,
                scratch_ttft.as_secs_f64() * 1e3,
                scratch_ttft.as_secs_f64() / resume_ttft.as_secs_f64(),
                out.tokens.len()
            );
            cache.save(&store, NAME, &meta)?;
        }
        n => bail!("--session takes 1 or 2, not {n}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    common::main(run)
}
