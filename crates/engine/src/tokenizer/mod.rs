//! Tokenizers built from a GGUF file's `tokenizer.ggml.*` metadata, giving the ids llama.cpp
//! gives: byte-level BPE (`tokenizer.ggml.model = "gpt2"`, e.g. SmolLM2) and SentencePiece
//! (`"llama"`, e.g. Gemma 3).
//!
//! The vocabulary and token types come straight from the GGUF. For BPE the merges come from
//! it too and the pre-tokenizer is chosen by name to match llama.cpp's `llm_tokenizer_bpe`
//! regex lists; the `tokenizers` crate runs it (`bpe`, `pre`). SentencePiece is our own code
//! (`spm`), following llama.cpp's `llm_tokenizer_spm` merge by token score.
//! Control tokens (`<|im_start|>`, `<start_of_turn>`) are recognized when they appear in the
//! text given to [`Tokenizer::encode`], because chat templates emit them as text;
//! [`Tokenizer::encode_plain`] is for text that must stay data (message content), where
//! `<|im_start|>` is just eleven characters.

mod bpe;
mod pre;
mod spm;
mod stream;
#[cfg(test)]
mod tests;

use std::path::Path;

pub use stream::TokenStream;

use crate::gguf::GgufFile;
use crate::gguf::meta::{self as gguf_meta, Metadata, MetadataError};
use bpe::Bpe;
use pre::{DIGITS_GPT2_FAMILY, GPT2_FAMILY, LLAMA3_FAMILY, PreSplit, QWEN2_FAMILY};
use spm::Spm;

pub(super) const KEY_MODEL: &str = "tokenizer.ggml.model";
pub(super) const KEY_PRE: &str = "tokenizer.ggml.pre";
pub(super) const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
pub(super) const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub(super) const KEY_MERGES: &str = "tokenizer.ggml.merges";
pub(super) const KEY_SCORES: &str = "tokenizer.ggml.scores";
pub(super) const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
pub(super) const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
pub(super) const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub(super) const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
pub(super) const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// Texts of tokens that end a turn, beside EOS, in the chat formats we know: ChatML's, Gemma's,
/// and Llama 3's end of a turn and of a message that called a tool (llama.cpp ends generation
/// on each of them too, whatever the file's EOS).
const END_OF_TURN_TEXTS: &[&str] = &["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>"];

/// A tokenizer loaded from GGUF metadata.
#[derive(Clone)]
pub struct Tokenizer {
    model: Model,
    vocab_size: usize,
    bos: Option<u32>,
    eos: u32,
    add_bos: bool,
    add_eos: bool,
    pre_name: String,
    fingerprint: String,
}

/// The tokenizer family, with what it needs to encode and decode (boxed: both are a few
/// kilobytes before their heap data).
#[derive(Clone)]
enum Model {
    /// Byte-level BPE (`gpt2`).
    Bpe(Box<Bpe>),
    /// SentencePiece (`llama`).
    Spm(Box<Spm>),
}

impl Tokenizer {
    /// Builds the tokenizer from the `tokenizer.ggml.*` keys of a GGUF file.
    ///
    /// `tokenizer.ggml.model` must be `gpt2` (byte-level BPE, which also needs `merges` and
    /// `eos_token_id`) or `llama` (SentencePiece, which reads `scores` and
    /// `add_space_prefix`). Absent keys take llama.cpp's defaults: `token_type` all normal,
    /// `pre` `default`; for SentencePiece, scores 0, BOS id 1, EOS id 2, BOS added, a space
    /// prefix.
    pub(crate) fn from_gguf(file: &GgufFile) -> Result<Self> {
        Self::from_metadata(file.metadata())
    }

    /// The tokenizer of the GGUF file at `path`, read without its weights (whose
    /// architecture need not be one the engine runs).
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        Ok(Self::from_gguf(&GgufFile::open(path)?)?)
    }

    fn from_metadata(md: &Metadata) -> Result<Self> {
        let model_name = gguf_meta::string(md, KEY_MODEL)?;
        let family = match model_name {
            "gpt2" => Family::Bpe,
            "llama" => Family::Spm,
            _ => {
                return Err(TokenizerError::UnsupportedModel {
                    model: model_name.to_owned(),
                });
            }
        };
        // llama.cpp treats a missing `pre` as `default` (with a warning); so do we. It only
        // matters for BPE.
        let pre_name = gguf_meta::opt_string(md, KEY_PRE)?.unwrap_or("default");

        let tokens = gguf_meta::string_array(md, KEY_TOKENS)?;
        let vocab_size = tokens.len();
        if u32::try_from(vocab_size).is_err() {
            return Err(TokenizerError::VocabTooLarge { len: vocab_size });
        }
        let token_types = if md.contains_key(KEY_TOKEN_TYPE) {
            gguf_meta::i32_array(md, KEY_TOKEN_TYPE)?
        } else {
            vec![1; vocab_size]
        };
        if token_types.len() != vocab_size {
            return Err(TokenizerError::TokenTypeCount {
                tokens: vocab_size,
                types: token_types.len(),
            });
        }

        // Whether BOS is added when the file does not say: llama.cpp's default, true for
        // SentencePiece and the Llama 3 family of BPE.
        let (model, fingerprint, default_add_bos) = match family {
            Family::Bpe => {
                let pre = PreSplit::from_name(pre_name).ok_or_else(|| {
                    TokenizerError::UnsupportedPreTokenizer {
                        name: pre_name.to_owned(),
                    }
                })?;
                let merges = gguf_meta::string_array(md, KEY_MERGES)?;
                let bpe = Bpe::new(pre, &tokens, &token_types, &merges)?;
                let fingerprint =
                    bpe::fingerprint_of(model_name, pre_name, &tokens, &token_types, &merges);
                (Model::Bpe(Box::new(bpe)), fingerprint, pre.adds_bos())
            }
            Family::Spm => {
                let scores = if md.contains_key(KEY_SCORES) {
                    gguf_meta::f32_array(md, KEY_SCORES)?
                } else {
                    vec![0.0; vocab_size]
                };
                let add_space_prefix =
                    gguf_meta::opt_bool(md, KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
                let spm = Spm::new(md, &tokens, &token_types, &scores, add_space_prefix)?;
                let fingerprint = spm.fingerprint(model_name);
                (Model::Spm(Box::new(spm)), fingerprint, true)
            }
        };

        let in_vocab = |id: u32| (id as usize) < vocab_size;
        let check = |key: &'static str, id: u32| {
            if in_vocab(id) {
                Ok(id)
            } else {
                Err(TokenizerError::SpecialIdOutOfRange {
                    key,
                    id,
                    vocab_size,
                })
            }
        };
        // llama.cpp's defaults for a file that names no BOS / EOS: none for BPE (we insist on
        // an EOS there), 1 and 2 for SentencePiece when the vocabulary reaches them.
        let (default_bos, default_eos) = match family {
            Family::Bpe => (None, None),
            Family::Spm => (Some(1).filter(|&id| in_vocab(id)), Some(2)),
        };
        let bos = match gguf_meta::opt_u32(md, KEY_BOS)? {
            Some(id) => Some(check(KEY_BOS, id)?),
            None => default_bos,
        };
        let eos = match (gguf_meta::opt_u32(md, KEY_EOS)?, default_eos) {
            (Some(id), _) | (None, Some(id)) => check(KEY_EOS, id)?,
            (None, None) => gguf_meta::u32(md, KEY_EOS)?,
        };
        let add_bos = gguf_meta::opt_bool(md, KEY_ADD_BOS)?.unwrap_or(default_add_bos);
        let add_eos = gguf_meta::opt_bool(md, KEY_ADD_EOS)?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::AddWithoutId {
                flag: KEY_ADD_BOS,
                key: KEY_BOS,
            });
        }

        Ok(Self {
            model,
            vocab_size,
            bos,
            eos,
            add_bos,
            add_eos,
            pre_name: pre_name.to_owned(),
            fingerprint,
        })
    }

    /// Token ids for `text`. Control-token text such as `<|im_start|>` or `<start_of_turn>`
    /// becomes its id; no BOS or EOS is added (see [`Tokenizer::add_special`]).
    ///
    /// BPE drops characters whose bytes have no symbol in the vocabulary, as llama.cpp does
    /// (SmolLM2 has no symbol for a few C0 control bytes, e.g. U+0004); SentencePiece writes
    /// them as `<0xXX>` byte tokens, and fails with [`TokenizerError::MissingByteToken`] when
    /// the vocabulary lacks one (where llama.cpp throws).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.model {
            Model::Bpe(bpe) => bpe.encode(text),
            Model::Spm(spm) => spm.encode(text, true),
        }
    }

    /// Token ids for `text` taken as data: control-token text such as `<|im_end|>` is split
    /// into ordinary tokens like any other text, so it can never end a turn or open a new
    /// one, and no id of a control token is produced. Message content is encoded this way
    /// (see [`crate::Engine::chat_tokens`]).
    ///
    /// User-defined tokens are still matched, as in [`Tokenizer::encode`]: llama.cpp cuts them
    /// out of text even with `parse_special` off, and Gemma 3's are mostly runs of spaces, tabs
    /// and newlines and HTML tags that ordinary text is tokenized with (its `<start_of_image>`
    /// is one too). For SentencePiece this is llama.cpp's `parse_special = false`, with one
    /// guard it lacks: a merge that would make a control token is not made (no Gemma 3 text
    /// reaches one).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        match &self.model {
            Model::Bpe(bpe) => bpe.encode_plain(text),
            Model::Spm(spm) => spm.encode(text, false),
        }
    }

    /// `ids` as llama.cpp's tokenize with `add_special` makes them: BOS in front when the
    /// file asks for it ([`Tokenizer::add_bos_token`]), EOS after when it asks for that
    /// ([`Tokenizer::add_eos_token`]).
    pub fn add_special(&self, ids: Vec<u32>) -> Vec<u32> {
        let bos = self.bos.filter(|_| self.add_bos);
        let eos = Some(self.eos).filter(|_| self.add_eos);
        bos.into_iter().chain(ids).chain(eos).collect()
    }

    /// The text of a control token that occurs in `text` (the longest such), or `None` when
    /// [`Tokenizer::encode`] would make no control token of it.
    pub(crate) fn control_text_in(&self, text: &str) -> Option<&str> {
        match &self.model {
            Model::Bpe(bpe) => bpe.control_text_in(text),
            Model::Spm(spm) => spm.control_text_in(text),
        }
    }

    /// The text of `ids`, special tokens included, so `decode(encode(s)) == s` (for
    /// SentencePiece: unless `s` holds "▁", which is a space to it, or the file asks for a
    /// space prefix and `s` holds special tokens, after which encoding adds spaces that
    /// llama.cpp's detokenizer keeps too).
    ///
    /// Byte sequences that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        match &self.model {
            Model::Bpe(bpe) => bpe.decode(ids),
            Model::Spm(spm) => Ok(spm.decode(ids)),
        }
    }

    /// The raw bytes token `id` stands for (a token may hold part of a UTF-8 character).
    /// Unlike [`Tokenizer::decode`], no space prefix is removed: a generated token continues
    /// a text.
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        let bytes = match &self.model {
            Model::Bpe(bpe) => bpe.token_bytes(id),
            Model::Spm(spm) => spm.token_bytes(id).map(|b| b.into_owned()),
        };
        bytes.ok_or(TokenizerError::UnknownId {
            id,
            vocab_size: self.vocab_size,
        })
    }

    /// The id of a vocabulary entry, written in its stored form (`"Ġworld"` for " world" in
    /// byte-level BPE, `"▁world"` in SentencePiece), or a special token's text
    /// (`"<|im_end|>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.model {
            Model::Bpe(bpe) => bpe.token_id(token),
            Model::Spm(spm) => spm.token_id(token),
        }
    }

    /// The id of the beginning-of-sequence token, if the file names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The id of the end-of-sequence token.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Whether the model expects a BOS token in front of a prompt
    /// (`tokenizer.ggml.add_bos_token`; when absent, true for SentencePiece and the Llama 3
    /// family of BPE, false for other BPE, as in llama.cpp).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// Whether the model expects an EOS token after a prompt
    /// (`tokenizer.ggml.add_eos_token`, false when absent).
    pub fn add_eos_token(&self) -> bool {
        self.add_eos
    }

    /// Ids that end a generated turn: EOS, and `<|im_end|>` (ChatML), `<end_of_turn>` (Gemma),
    /// `<|eot_id|>` and `<|eom_id|>` (Llama 3) when the vocabulary has them.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.eos];
        for text in END_OF_TURN_TEXTS {
            if let Some(id) = self.token_id(text)
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids
    }

    /// Number of tokens in the vocabulary (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The `tokenizer.ggml.pre` name in use (`default` when the file has none; SentencePiece
    /// ignores it).
    pub fn pre_tokenizer_name(&self) -> &str {
        &self.pre_name
    }

    /// Stable hex hash of everything that decides which ids a text gets: model type,
    /// pre-tokenizer name, tokens, token types and merges (for SentencePiece: tokens, their
    /// attributes, scores and the space prefix). Caches made with a tokenizer of another
    /// fingerprint hold different ids for the same text.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The family name, as `tokenizer.ggml.model` spells it.
    fn model_name(&self) -> &'static str {
        match self.model {
            Model::Bpe(_) => "gpt2",
            Model::Spm(_) => "llama",
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }
}

/// The tokenizer families `tokenizer.ggml.model` can name.
#[derive(Clone, Copy)]
enum Family {
    Bpe,
    Spm,
}

// By hand: the derived form would print every vocabulary entry.
impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model_name())
            .field("vocab_size", &self.vocab_size)
            .field("pre", &self.pre_name)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Result of tokenizer and chat-template operations.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Errors from building or using the tokenizer and the chat template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A tokenizer metadata key is missing or has the wrong type.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// `tokenizer.ggml.model` names a tokenizer family other than byte-level BPE and
    /// SentencePiece.
    #[error(
        "unsupported tokenizer model `{model}` in tokenizer.ggml.model: supported are \
         byte-level bpe (`gpt2`) and sentencepiece (`llama`)"
    )]
    UnsupportedModel {
        /// The model name found in the file.
        model: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    #[error(
        "unsupported pre-tokenizer `{name}` in tokenizer.ggml.pre: supported are \
         `default`, the gpt-2 family ({gpt2}), the digits-then-gpt-2 family ({digits}), the \
         llama3 family ({llama3}) and the qwen2 family ({qwen2})",
        gpt2 = GPT2_FAMILY.join(", "),
        digits = DIGITS_GPT2_FAMILY.join(", "),
        llama3 = LLAMA3_FAMILY.join(", "),
        qwen2 = QWEN2_FAMILY.join(", ")
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
    /// `tokenizer.ggml.scores` and `tokenizer.ggml.tokens` disagree in length.
    #[error("tokenizer.ggml.scores has {scores} entries but tokenizer.ggml.tokens has {tokens}")]
    ScoreCount {
        /// Number of tokens.
        tokens: usize,
        /// Number of scores.
        scores: usize,
    },
    /// A token's score is NaN, which gives merges no order.
    #[error("tokenizer.ggml.scores[{id}] is not a number; the gguf is malformed")]
    ScoreNotANumber {
        /// The token whose score it is.
        id: u32,
    },
    /// A token of the byte type is not written `<0xXX>`, so its byte is unknown.
    #[error(
        "token {id} ({token:?}) has the byte type but is not written <0xXX>; the gguf is malformed"
    )]
    MalformedByteToken {
        /// The token's id.
        id: u32,
        /// Its text.
        token: String,
    },
    /// Text needs a byte the vocabulary has no token for (neither `<0xXX>` nor the byte).
    #[error(
        "the vocabulary has no token for byte 0x{byte:02X} (neither <0x{byte:02X}> nor the byte \
         itself), which this text needs; the gguf's vocabulary is incomplete"
    )]
    MissingByteToken {
        /// The byte.
        byte: u8,
    },
    /// `add_bos_token` (or `add_eos_token`) is true but the file names no such token.
    #[error("{flag} is true but the gguf has no {key}")]
    AddWithoutId {
        /// The flag that asks for the token.
        flag: &'static str,
        /// The key that should name it.
        key: &'static str,
    },
    /// The search for special tokens in text could not be built (too many or too long).
    #[error("building the search for {count} special tokens failed")]
    SpecialTokenSearch {
        /// Number of special tokens.
        count: usize,
        /// The library's error.
        #[source]
        source: aho_corasick::BuildError,
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
