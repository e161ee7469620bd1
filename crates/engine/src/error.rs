//! The engine's error type: everything loading a model, running it or sampling from it can
//! report.

use std::path::PathBuf;

use kv_extract::KvShape;

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The model file does not exist.
    #[error(
        "model file not found: {path}: run `cargo xtask fetch-model`, or pass --model PATH to a \
         GGUF of a llama (Llama 2 or 3), Gemma 3 or Qwen2 model"
    )]
    ModelNotFound {
        /// The path that was tried.
        path: PathBuf,
    },

    /// The model file exists but could not be opened or read.
    #[error("could not read model file {path}")]
    Io {
        /// The model file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The file is not a readable GGUF file (bad magic, truncated or corrupt header).
    #[error("{path} is not a valid gguf file (truncated or corrupt?)")]
    Gguf {
        /// The model file.
        path: PathBuf,
        /// What the GGUF parser said.
        #[source]
        source: BoxError,
    },

    /// The model's `general.architecture` is not one this engine can run.
    #[error(
        "unsupported model architecture {name:?}: supported are {}; \
         pick a gguf of one of those with --model",
        crate::model::SUPPORTED_ARCHITECTURES
    )]
    UnsupportedArchitecture {
        /// The architecture named in the file.
        name: String,
    },

    /// A metadata key is absent, of the wrong type, or holds a value the model cannot use.
    #[error(transparent)]
    Metadata(#[from] crate::gguf::meta::MetadataError),

    /// `AGENTKV_SIMD` names an instruction-set level this CPU does not have (or none at all).
    #[error(
        "AGENTKV_SIMD={requested:?} is not a level this CPU has; it has: {available} \
         (unset AGENTKV_SIMD to use the best)"
    )]
    UnsupportedIsa {
        /// The level asked for.
        requested: String,
        /// The levels this CPU has, lowest first.
        available: String,
    },

    /// A tensor the architecture needs is absent from the file.
    #[error("tensor {name:?} is missing from the model file")]
    MissingTensor {
        /// The tensor's GGUF name.
        name: String,
    },

    /// A tensor has a shape other than the metadata implies.
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's GGUF name.
        name: String,
        /// The shape the configuration implies (rows, columns).
        expected: Vec<usize>,
        /// The shape found in the file.
        found: Vec<usize>,
    },

    /// The file holds a tensor that would change the model's output in llama.cpp but that the
    /// engine does not apply for this architecture (a bias of a projection it has none for,
    /// RoPE frequency factors it does not take): running without it would give other logits.
    #[error(
        "tensor {name:?} is not supported for the {arch} architecture: llama.cpp applies it, \
         and running without it would give other results; this model cannot run here"
    )]
    UnsupportedTensor {
        /// The tensor's GGUF name.
        name: String,
        /// The file's architecture.
        arch: &'static str,
    },

    /// A tensor holds values the model cannot use.
    #[error("tensor {name:?} holds values the model cannot use: {reason}")]
    InvalidTensor {
        /// The tensor's GGUF name.
        name: String,
        /// What is wrong with them.
        reason: String,
    },

    /// A tensor is stored in a GGML type this engine does not read (IQ*, TQ*, Q8_K, ...).
    #[error(
        "tensor {name:?} is stored as {dtype}, a type this engine does not support; \
         supported: {supported} (requantize the model to one of them, e.g. with llama.cpp's \
         llama-quantize)"
    )]
    UnsupportedTensorType {
        /// The tensor's GGUF name.
        name: String,
        /// GGML's name for its type (or its number, when GGML has none we know).
        dtype: String,
        /// The types the engine reads.
        supported: String,
    },

    /// A quantized tensor's rows are not a whole number of its type's blocks (GGUF requires
    /// them to be).
    #[error(
        "tensor {name:?} ({dtype}) has rows of {cols} values, not a whole number of the type's \
         {block}-value blocks (corrupt or mislabeled file?)"
    )]
    PartialBlocks {
        /// The tensor's GGUF name.
        name: String,
        /// GGML's name for its type.
        dtype: String,
        /// Values per row.
        cols: usize,
        /// Values per block of the type.
        block: usize,
    },

    /// A tensor's data could not be read or dequantized (typically a truncated file).
    #[error("could not load tensor {name:?} (truncated or corrupt file?)")]
    TensorData {
        /// The tensor's GGUF name.
        name: String,
        /// What the GGUF reader said.
        #[source]
        source: BoxError,
    },

    /// A token id is not below the vocabulary size.
    #[error("token id {token} is out of range for a vocabulary of {vocab}")]
    TokenOutOfVocab {
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },

    /// The KV cache was built for a different model shape.
    #[error("kv cache shape {found:?} does not match the model's {expected:?}")]
    CacheShapeMismatch {
        /// The shape this model needs.
        expected: Box<KvShape>,
        /// The shape of the cache passed in.
        found: Box<KvShape>,
    },

    /// The KV dtype cannot hold this model's heads (`q8_0` needs a head width that is a
    /// multiple of 32).
    #[error("kv dtype {dtype} cannot hold this model's heads of width {head_dim}: use f16 or f32")]
    UnsupportedKvDtype {
        /// The dtype asked for.
        dtype: kv_store::KvDtype,
        /// The model's head width.
        head_dim: usize,
    },

    /// Running the tokens would go past the model's context length.
    #[error("context overflow: {needed} positions needed, the model supports {max}")]
    ContextOverflow {
        /// Cached plus new tokens.
        needed: usize,
        /// The model's context length.
        max: usize,
    },

    /// `forward` was called with no tokens.
    #[error("no tokens to run")]
    EmptyInput,

    /// A sampling configuration that cannot be used.
    #[error("invalid sampling configuration: {reason}")]
    InvalidSampling {
        /// What is wrong with it.
        reason: String,
    },

    /// Generation was cancelled through [`crate::GenerateOptions::cancel`].
    #[error("generation was cancelled")]
    Cancelled,

    /// Building or using the tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),

    /// Reading, compiling or rendering the chat template failed.
    #[error(transparent)]
    Template(#[from] crate::chat::TemplateError),

    /// Logits that cannot be sampled from (empty or containing NaN).
    #[error("cannot sample from logits: {reason}")]
    InvalidLogits {
        /// What is wrong with them.
        reason: String,
    },
}

/// An error from a library the engine uses inside (the GGUF reader), kept as the cause
/// without making that library part of the engine's API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
