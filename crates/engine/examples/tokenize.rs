//! Prints the token ids of a text as a JSON array, for comparing with other tokenizers.
//!
//! `cargo run -p engine --example tokenize -- [--model PATH] [--chat] TEXT`
//!
//! Without `--chat` only the GGUF's tokenizer is read, so any model file works (Gemma 3's
//! too, which the engine does not run); control-token text in TEXT becomes control tokens,
//! and no BOS is added.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use engine::Message;

#[derive(Parser)]
struct Args {
    /// A GGUF file (default: the fetched SmolLM2-135M-Instruct); with `--chat`, one the
    /// engine can load, with a chat template.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Render TEXT as one user message through the chat template first.
    #[arg(long)]
    chat: bool,
    /// The text to tokenize.
    text: String,
}

fn run() -> Result<()> {
    let args = Args::parse();
    let path = common::model_path(args.model)?;
    let ids = if args.chat {
        let engine = engine::Engine::load(&path)?;
        engine.chat_tokens(&[Message::user(args.text)], true)?
    } else {
        engine::Tokenizer::from_file(&path)?.encode(&args.text)?
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn main() -> ExitCode {
    common::main(run)
}
