//! What the example binaries share: finding the model.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

/// `--model PATH` if given, else the model `cargo xtask fetch-model` installs.
#[allow(dead_code)] // not every example takes a model
pub fn model_path(arg: Option<PathBuf>) -> Result<PathBuf> {
    let path = match arg {
        Some(p) => p,
        None => engine::default_model_path()
            .context("cannot tell where the model lives: set AGENTKV_HOME")?,
    };
    if !path.exists() {
        // The engine's own error for it, which says how to get a model.
        return Err(engine::EngineError::ModelNotFound { path }.into());
    }
    Ok(path)
}

/// Runs an example's `run`, printing its error chain and exiting non-zero on failure.
pub fn main(run: fn() -> Result<()>) -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--kv-dtype NAME`: the dtype a cache holds K and V in.
#[allow(dead_code)] // not every example takes it
pub fn parse_kv_dtype(name: &str) -> Result<kv_store::KvDtype, String> {
    match kv_store::KvDtype::from_name(name) {
        Some(d @ (kv_store::KvDtype::F32 | kv_store::KvDtype::F16 | kv_store::KvDtype::Q8_0)) => {
            Ok(d)
        }
        _ => Err(format!("{name:?} is not a KV dtype: use f32, f16 or q8_0")),
    }
}

/// The index of the largest logit (the first of equals): the greedy token.
#[allow(dead_code)] // not every example samples
pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
            if l > best.1 { (i, l) } else { best }
        })
        .0 as u32
}
