#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![deny(missing_docs)]

mod chat;
mod error;
mod gguf;
mod kernels;
mod model;
mod runtime;
mod sample;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
mod tokenizer;

pub use chat::{ChatTemplate, Message, Role, TemplateError};
pub use error::{BoxError, EngineError, Result};
pub use gguf::meta::MetadataError;
pub use kernels::Isa;
/// The element type a [`kv_extract::KvCache`] holds K and V in (from kv-store).
pub use kv_store::KvDtype;
pub use model::{Architecture, Logits, Model, ModelConfig, PREFILL_CHUNK};
pub use runtime::{
    DEFAULT_MODEL_FILE, Engine, GEMMA3_270M_FILE, GenerateOptions, Generation, StopReason,
    agentkv_home, default_model_path, model_path,
};
pub use sample::{Sampler, SamplingConfig};
pub use tokenizer::{Tokenizer, TokenizerError};
