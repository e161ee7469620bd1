//! SmolLM2 / llama-architecture inference from a GGUF file: weights, tokenizer, chat template,
//! sampling, and a forward pass over our own [`kv_extract::KvCache`] that is bitwise
//! deterministic and batch-invariant, so a cache saved to disk and resumed gives exactly the
//! logits of an uninterrupted run.
#![deny(unsafe_code)]

pub mod chat;
pub mod error;
pub mod gguf_meta;
pub mod kernels;
pub mod model;
pub mod runtime;
pub mod sample;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;

pub use error::{EngineError, Result};
pub use model::{LlamaConfig, Logits, Model};
pub use runtime::{Engine, GenerateOptions, Generation, StopReason, default_model_path};
pub use sample::{Sampler, SamplingConfig};
