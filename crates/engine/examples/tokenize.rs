//! Prints the token ids of a text as a JSON array, for comparing with other tokenizers.
//!
//! `cargo run -p engine --example tokenize -- [--model PATH] [--chat] TEXT`

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use engine::Message;

#[derive(Parser)]
struct Args {
    /// A GGUF of a supported architecture (default: the fetched SmolLM2-135M-Instruct).
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
    let engine = engine::Engine::load(&common::model_path(args.model)?)?;
    let ids = if args.chat {
        engine.chat_tokens(&[Message::user(args.text)], true)?
    } else {
        engine.tokenizer().encode(&args.text)?
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn main() -> ExitCode {
    common::main(run)
}
