//! Greedy completion of a chat-templated user message, or of raw text (`--raw`, for base
//! models such as Gemma 3 270M, which have no chat template).
//!
//! `cargo run --release -p engine --example generate -- [--model PATH] [--raw] [--system TEXT] [--max-tokens N] [--json] MESSAGE`

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use engine::{GenerateOptions, Message};

#[derive(Parser)]
struct Args {
    /// A GGUF of a supported architecture (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Feed MESSAGE as it is: BOS if the model's metadata asks for it, then the text as data
    /// (no chat template, control-token text not recognized).
    #[arg(long, conflicts_with = "system")]
    raw: bool,
    /// A system message before the user's (default: none, so the template's own applies).
    #[arg(long)]
    system: Option<String>,
    /// Stop after this many tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Print one JSON object with prompt_ids, completion_ids and text instead of streaming.
    #[arg(long)]
    json: bool,
    /// The user's message (with --raw: the text to continue).
    message: String,
}

fn run() -> Result<()> {
    let args = Args::parse();
    let engine = engine::Engine::load(&common::model_path(args.model)?)?;
    let prompt = if args.raw {
        let tok = engine.tokenizer();
        let bos = tok.bos_id().filter(|_| tok.add_bos_token());
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(tok.encode_plain(&args.message)?);
        ids
    } else {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(Message::system(system));
        }
        messages.push(Message::user(args.message));
        engine.chat_tokens(&messages, true)?
    };
    let mut cache = engine.new_cache(kv_store::KvDtype::F32)?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        ..GenerateOptions::default()
    };
    let json = args.json;
    let mut stdout = std::io::stdout();
    let out = engine.generate(&mut cache, &prompt, &options, &mut |piece| {
        if !json {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    if json {
        let obj = serde_json::json!({ "prompt_ids": prompt, "completion_ids": out.tokens, "text": out.text });
        println!("{obj}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens in {:.0} ms, {} tokens in {:.0} ms]",
            out.prompt_tokens,
            out.prefill.as_secs_f64() * 1e3,
            out.tokens.len(),
            out.decode.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    common::main(run)
}
