//! Byte-level BPE tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata, splitting
//! text the way llama.cpp does for the file's `tokenizer.ggml.pre` type.
//!
//! The vocabulary, merges and token types come straight from the GGUF; the pre-tokenizer is
//! chosen by name to match llama.cpp's `llm_tokenizer_bpe` regex lists (`src/llama-vocab.cpp`).
//! Control tokens (`token_type == 3`, e.g. `<|im_start|>`) are recognized when they appear in
//! the text given to [`Tokenizer::encode`], because chat templates emit them as text;
//! [`Tokenizer::encode_plain`] is for text that must stay data (message content), where
//! `<|im_start|>` is just eleven characters.

mod bpe;
mod pre;
mod stream;
#[cfg(test)]
mod tests;

pub use bpe::Tokenizer;
pub use stream::TokenStream;

use crate::gguf::meta::MetadataError;
use pre::{DIGITS_GPT2_FAMILY, GPT2_FAMILY};

/// Result of tokenizer and chat-template operations.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Errors from building or using the tokenizer and the chat template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A tokenizer metadata key is missing or has the wrong type.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// `tokenizer.ggml.model` names a tokenizer family other than byte-level BPE.
    #[error(
        "unsupported tokenizer model `{model}` in tokenizer.ggml.model: \
         only byte-level bpe (`gpt2`) is supported"
    )]
    UnsupportedModel {
        /// The model name found in the file.
        model: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    #[error(
        "unsupported pre-tokenizer `{name}` in tokenizer.ggml.pre: supported are \
         `default`, the gpt-2 family ({gpt2}) and the digits-then-gpt-2 family ({digits})",
        gpt2 = GPT2_FAMILY.join(", "),
        digits = DIGITS_GPT2_FAMILY.join(", ")
    )]
    UnsupportedPreTokenizer {
        /// The pre-tokenizer name found in the file.
        name: String,
    },
    /// `tokenizer.ggml.token_type` and `tokenizer.ggml.tokens` disagree in length.
    #[error("tokenizer.ggml.token_type has {types} entries but tokenizer.ggml.tokens has {tokens}")]
    TokenTypeCount {
        /// Number of tokens.
        tokens: usize,
        /// Number of token types.
        types: usize,
    },
    /// The vocabulary has more entries than `u32` ids can address.
    #[error("vocabulary has {len} tokens, more than u32 token ids can address")]
    VocabTooLarge {
        /// Number of tokens in the file.
        len: usize,
    },
    /// The same token string appears at two ids, so one of them could never be produced.
    #[error(
        "token {token:?} appears twice in tokenizer.ggml.tokens (ids {first} and {second}); \
         the gguf is malformed"
    )]
    DuplicateToken {
        /// The repeated token string.
        token: String,
        /// Its first id.
        first: u32,
        /// Its second id.
        second: u32,
    },
    /// A merge rule is not two tokens separated by a space.
    #[error("tokenizer.ggml.merges[{index}] = {merge:?} is not two tokens separated by a space")]
    MalformedMerge {
        /// Position of the rule.
        index: usize,
        /// The rule as stored.
        merge: String,
    },
    /// A special-token id in the metadata lies outside the vocabulary.
    #[error("{key} = {id} is outside the vocabulary of {vocab_size} tokens")]
    SpecialIdOutOfRange {
        /// The metadata key holding the id.
        key: &'static str,
        /// The id found.
        id: u32,
        /// Size of the vocabulary.
        vocab_size: usize,
    },
    /// The `tokenizers` library rejected the vocabulary, merges or pre-tokenizer.
    #[error("building the bpe tokenizer from the gguf vocabulary failed")]
    Build {
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },
    /// Encoding text failed inside the `tokenizers` library.
    #[error("encoding {len} bytes of text failed")]
    Encode {
        /// Length of the text in bytes.
        len: usize,
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },
    /// Decoding ids failed inside the `tokenizers` library.
    #[error("decoding {count} token ids failed")]
    Decode {
        /// Number of ids given.
        count: usize,
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },
    /// A token id given to decode is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownId {
        /// The offending id.
        id: u32,
        /// Size of the vocabulary.
        vocab_size: usize,
    },
}
