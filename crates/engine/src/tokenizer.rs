//! Byte-level BPE tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata, splitting
//! text the way llama.cpp does for the file's `tokenizer.ggml.pre` type.
//!
//! The vocabulary, merges and token types come straight from the GGUF; the pre-tokenizer is
//! chosen by name to match llama.cpp's `llm_tokenizer_bpe` regex lists (`src/llama-vocab.cpp`).
//! Control tokens (`token_type == 3`, e.g. `<|im_start|>`) are recognized when they appear in
//! the text given to [`Tokenizer::encode`], because chat templates emit them as text;
//! [`Tokenizer::encode_plain`] is for text that must stay data (message content), where
//! `<|im_start|>` is just eleven characters.

use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};
use xxhash_rust::xxh3::Xxh3;

use crate::gguf_meta::{self, Metadata, MetadataError};

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
    /// Message content holds control-token text, and the chat template changes content as it
    /// renders it, so that text cannot be kept apart from the template's own control tokens.
    #[error(
        "message {index} ({role}) contains the control-token text {token:?}, and the chat \
         template does not insert message content verbatim, so it cannot be kept from acting \
         as a control token; remove that text from the message"
    )]
    ControlTextInContent {
        /// Position of the message in the conversation.
        index: usize,
        /// Its role (`"user"`, ...).
        role: &'static str,
        /// The control token whose text it contains.
        token: String,
    },
    /// A token id given to decode is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownId {
        /// The offending id.
        id: u32,
        /// Size of the vocabulary.
        vocab_size: usize,
    },
    /// The GGUF carries no `tokenizer.chat_template`.
    #[error(
        "gguf has no tokenizer.chat_template; use a model converted with its chat template, \
         or build one with ChatTemplate::new"
    )]
    MissingChatTemplate,
    /// The chat template does not parse.
    #[error("the chat template does not compile")]
    TemplateSyntax {
        /// The template engine's error, with line information.
        #[source]
        source: minijinja::Error,
    },
    /// Rendering the chat template failed, e.g. the template called `raise_exception`.
    #[error("rendering the chat template failed")]
    TemplateRender {
        /// The template engine's error.
        #[source]
        source: minijinja::Error,
    },
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";

/// llama.cpp `LLAMA_TOKEN_TYPE_CONTROL`.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp `LLAMA_TOKEN_TYPE_USER_DEFINED`.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The GPT-2 split regex, as llama.cpp and `tokenizers`' ByteLevel write it (llama.cpp leaves
/// out the final `|\s+`, but its hand-written GPT-2 splitter behaves as if it were there).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` names that llama.cpp splits with the GPT-2 regex alone
/// (`LLAMA_VOCAB_PRE_TYPE_GPT2`, `_MPT`, `_OLMO`, `_JAIS`). Note that `gpt2` (no dash) is not
/// one of them: llama.cpp falls back to `default` for it, and we refuse it instead.
const GPT2_FAMILY: &[&str] = &[
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v1-en",
    "jina-v2-es",
    "jina-v2-de",
    "jina-v2-code",
    "roberta-bpe",
    "mpt",
    "olmo",
    "jais",
];

/// `tokenizer.ggml.pre` names that llama.cpp splits with `\p{N}` (each digit alone) and then
/// the GPT-2 regex (`LLAMA_VOCAB_PRE_TYPE_SMOLLM`, `_STARCODER`, `_REFACT`, `_COMMAND_R`,
/// `_CODESHELL`, `_EXAONE`, `_MINERVA`).
const DIGITS_GPT2_FAMILY: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];

/// How text is split into words before BPE, one variant per llama.cpp regex list we support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreSplit {
    /// The GPT-2 regex only.
    Gpt2,
    /// Every digit alone, then the GPT-2 regex (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// llama.cpp's fallback list for `default` or an absent `tokenizer.ggml.pre`.
    LlamaDefault,
}

impl PreSplit {
    fn from_name(name: &str) -> Option<Self> {
        if name == "default" {
            Some(Self::LlamaDefault)
        } else if GPT2_FAMILY.contains(&name) {
            Some(Self::Gpt2)
        } else if DIGITS_GPT2_FAMILY.contains(&name) {
            Some(Self::DigitsThenGpt2)
        } else {
            None
        }
    }

    /// The `tokenizers` pre-tokenizer equivalent to llama.cpp's regex list.
    ///
    /// llama.cpp applies its regexes one after another, each splitting the pieces left by the
    /// previous one into matches and the text between them; that is `Split` with `Isolated`.
    fn build(self) -> Result<PreTokenizerWrapper> {
        // add_prefix_space = false: GGUF `tokenizer.ggml.add_space_prefix` is false for every
        // byte-level family here, and llama.cpp never adds one for BPE.
        let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
        Ok(match self {
            Self::Gpt2 => byte_level(true).into(),
            // This is also the pipeline in SmolLM2's tokenizer.json. `Digits` tests
            // `char::is_numeric`, i.e. \p{N}, so each number character becomes its own piece.
            Self::DigitsThenGpt2 => {
                Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
            }
            Self::LlamaDefault => {
                let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
                    Split::new(
                        SplitPattern::Regex(pattern.to_owned()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map(Into::into)
                    .map_err(|source| TokenizerError::Build { source })
                };
                Sequence::new(vec![
                    split(r"[\p{P}\$\+<=>\^~\|]+")?,
                    split(GPT2_REGEX)?,
                    split(r"\p{N}+")?,
                    split("[0-9][0-9][0-9]")?,
                    byte_level(false).into(),
                ])
                .into()
            }
        })
    }
}

/// A byte-level BPE tokenizer loaded from GGUF metadata.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` without the control tokens: what [`Tokenizer::encode_plain`] uses.
    plain: tokenizers::Tokenizer,
    /// The text of every control token, longest first.
    control: Vec<String>,
    vocab_size: usize,
    bos: Option<u32>,
    eos: u32,
    add_bos: bool,
    pre_name: String,
    fingerprint: String,
}

impl Tokenizer {
    /// Builds the tokenizer from the `tokenizer.ggml.*` keys of a GGUF file.
    ///
    /// Requires `tokenizer.ggml.model = "gpt2"`, `tokens`, `merges` and `eos_token_id`;
    /// `token_type` defaults to all-normal and `pre` to `default`, as in llama.cpp.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        Self::from_metadata(&content.metadata)
    }

    fn from_metadata(md: &Metadata) -> Result<Self> {
        let model = gguf_meta::string(md, KEY_MODEL)?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel {
                model: model.to_owned(),
            });
        }
        // llama.cpp treats a missing `pre` as `default` (with a warning); so do we.
        let pre_name = gguf_meta::opt_string(md, KEY_PRE)?.unwrap_or("default");
        let pre = PreSplit::from_name(pre_name).ok_or_else(|| {
            TokenizerError::UnsupportedPreTokenizer {
                name: pre_name.to_owned(),
            }
        })?;

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
        let merge_strings = gguf_meta::string_array(md, KEY_MERGES)?;

        let mut vocab = Vocab::with_capacity(vocab_size);
        for (id, token) in (0u32..).zip(&tokens) {
            if let Some(first) = vocab.insert((*token).to_owned(), id) {
                return Err(TokenizerError::DuplicateToken {
                    token: (*token).to_owned(),
                    first,
                    second: id,
                });
            }
        }
        let merges = parse_merges(&merge_strings)?;

        let bos = gguf_meta::opt_u32(md, KEY_BOS)?;
        let eos = gguf_meta::u32(md, KEY_EOS)?;
        for (key, id) in [(KEY_BOS, bos), (KEY_EOS, Some(eos))] {
            if let Some(id) = id.filter(|&id| id as usize >= vocab_size) {
                return Err(TokenizerError::SpecialIdOutOfRange {
                    key,
                    id,
                    vocab_size,
                });
            }
        }
        let add_bos = gguf_meta::opt_bool(md, KEY_ADD_BOS)?.unwrap_or(false);

        let fingerprint = fingerprint_of(model, pre_name, &tokens, &token_types, &merge_strings);

        // No unk token: every byte has a byte-level symbol, and a symbol missing from the
        // vocabulary is dropped, which is what llama.cpp does too.
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|source| TokenizerError::Build { source })?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre.build()?));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
            false, false, true,
        ))));
        inner.with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
            false, false, true,
        ))));

        // Control tokens are special (matched in text, kept on decode); user-defined ones are
        // matched in text too, as llama.cpp does. Both already have their ids in the vocabulary,
        // so the added vocabulary reuses those ids instead of appending new ones. The plain
        // tokenizer is the same without the control tokens: there their text is only text.
        let of_type = |wanted: i32| -> Vec<&str> {
            tokens
                .iter()
                .zip(&token_types)
                .filter(|&(t, &ty)| ty == wanted && !t.is_empty())
                .map(|(t, _)| *t)
                .collect()
        };
        let added = |texts: &[&str], special: bool| -> Vec<AddedToken> {
            texts
                .iter()
                .map(|t| AddedToken::from(*t, special))
                .collect()
        };
        let control_texts = of_type(TOKEN_TYPE_CONTROL);
        let user_defined = of_type(TOKEN_TYPE_USER_DEFINED);
        let mut plain = inner.clone();
        inner
            .add_special_tokens(added(&control_texts, true))
            .map_err(|source| TokenizerError::Build { source })?;
        for t in [&mut inner, &mut plain] {
            t.add_tokens(added(&user_defined, false))
                .map_err(|source| TokenizerError::Build { source })?;
        }
        let mut control: Vec<String> = control_texts.iter().map(|t| (*t).to_owned()).collect();
        control.sort_by_key(|t| std::cmp::Reverse(t.len()));

        Ok(Self {
            inner,
            plain,
            control,
            vocab_size,
            bos,
            eos,
            add_bos,
            pre_name: pre_name.to_owned(),
            fingerprint,
        })
    }

    /// Token ids for `text`. Control-token text such as `<|im_start|>` becomes its id; no BOS
    /// is added (see [`Tokenizer::add_bos_token`]).
    ///
    /// Characters whose bytes have no symbol in the vocabulary are dropped, as in llama.cpp
    /// (SmolLM2 has no symbol for a few C0 control bytes, e.g. U+0004).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode_with(&self.inner, text)
    }

    /// Token ids for `text` taken as data: control-token text such as `<|im_end|>` is split
    /// into ordinary byte-level tokens like any other text, so it can never end a turn or
    /// open a new one. User-defined tokens are still matched, as in [`Tokenizer::encode`].
    /// Message content is encoded this way (see [`crate::Engine::chat_tokens`]).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        encode_with(&self.plain, text)
    }

    /// The text of a control token that occurs in `text` (the longest such), or `None` when
    /// [`Tokenizer::encode`] would make no control token of it.
    pub(crate) fn control_text_in(&self, text: &str) -> Option<&str> {
        self.control
            .iter()
            .find(|t| text.contains(t.as_str()))
            .map(String::as_str)
    }

    /// The text of `ids`, special tokens included, so `decode(encode(s)) == s`.
    ///
    /// Byte sequences that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, false)
            .map_err(|source| TokenizerError::Decode {
                count: ids.len(),
                source,
            })
    }

    /// The raw bytes token `id` stands for (a token may hold part of a UTF-8 character).
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        let token = self
            .inner
            .id_to_token(id)
            .ok_or(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size,
            })?;
        // Same rule as the ByteLevel decoder: map every char back to its byte, or, if any char
        // is not a byte-level symbol (added-token text), take the text as it is.
        Ok(token
            .chars()
            .map(byte_level_char_to_byte)
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| token.into_bytes()))
    }

    /// The id of a vocabulary entry, written in its stored byte-level form (`"Ġworld"` for
    /// " world"), or a special token's text (`"<|im_end|>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
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
    /// (`tokenizer.ggml.add_bos_token`, false when absent).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// Ids that end a generated turn: EOS, and `<|im_end|>` when the vocabulary has it.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.eos];
        if let Some(im_end) = self.token_id("<|im_end|>")
            && im_end != self.eos
        {
            ids.push(im_end);
        }
        ids
    }

    /// Number of tokens in the vocabulary (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The `tokenizer.ggml.pre` name in use (`default` when the file has none).
    pub fn pre_tokenizer_name(&self) -> &str {
        &self.pre_name
    }

    /// Stable hex hash of everything that decides which ids a text gets: model type,
    /// pre-tokenizer name, tokens, token types and merges. Caches made with a tokenizer of
    /// another fingerprint hold different ids for the same text.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
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

/// Token ids of `text` through one of the tokenizer's two `tokenizers` instances.
fn encode_with(tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    let encoding = tokenizer
        .encode_fast(text, false)
        .map_err(|source| TokenizerError::Encode {
            len: text.len(),
            source,
        })?;
    Ok(encoding.get_ids().to_vec())
}

// By hand: the derived form would print all 49k vocabulary entries and merges.
impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("pre", &self.pre_name)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Turns generated ids into text increments, holding back bytes until they form whole
/// UTF-8 characters, so a character split over two tokens is never shown as U+FFFD.
///
/// The tokenizer is passed to each call rather than borrowed for the stream's lifetime, so a
/// generation loop can keep the stream next to the model it mutates.
#[derive(Clone, Debug, Default)]
pub struct TokenStream {
    pending: Vec<u8>,
}

impl TokenStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.pending.extend(tokenizer.token_bytes(id)?);
        Ok(self.take_complete())
    }

    /// Returns what is left at the end of generation; an unfinished character becomes U+FFFD,
    /// as in [`Tokenizer::decode`].
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// Emits every complete character; invalid byte runs become one U+FFFD each, exactly as
    /// `String::from_utf8_lossy` does, so the concatenated output equals `decode`.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            let rest = self.pending.get(start..).unwrap_or_default();
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    start = self.pending.len();
                    break;
                }
                Err(err) => {
                    let valid = err.valid_up_to();
                    // `valid_up_to` is a char boundary, so this slice is valid UTF-8.
                    out.push_str(&String::from_utf8_lossy(
                        rest.get(..valid).unwrap_or_default(),
                    ));
                    match err.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += valid + bad;
                        }
                        // An unfinished character at the end: wait for more bytes.
                        None => {
                            start += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

/// Splits each `"left right"` rule at the first space after the first byte, as llama.cpp does
/// (`word.find(' ', 1)`), so a left token that is itself a space still parses.
fn parse_merges(merges: &[&str]) -> Result<Merges> {
    merges
        .iter()
        .enumerate()
        .map(|(index, merge)| {
            merge
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .and_then(|(at, _)| Some((merge.get(..at)?, merge.get(at + 1..)?)))
                .filter(|(_, right)| !right.is_empty())
                .map(|(left, right)| (left.to_owned(), right.to_owned()))
                .ok_or_else(|| TokenizerError::MalformedMerge {
                    index,
                    merge: (*merge).to_owned(),
                })
        })
        .collect()
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes (0..=32, 127..=160, 173) map in order to U+0100..U+0143.
fn byte_level_char_to_byte(c: char) -> Option<u8> {
    let code = u32::from(c);
    match code {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => u8::try_from(code).ok(),
        0x100..=0x120 => u8::try_from(code - 0x100).ok(),
        0x121..=0x142 => u8::try_from(code - 0x121 + 0x7F).ok(),
        0x143 => Some(0xAD),
        _ => None,
    }
}

fn fingerprint_of(
    model: &str,
    pre: &str,
    tokens: &[&str],
    token_types: &[i32],
    merges: &[&str],
) -> String {
    // Every field is length-prefixed so no two different inputs hash the same byte stream.
    fn put_str(h: &mut Xxh3, s: &str) {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    let mut h = Xxh3::new();
    put_str(&mut h, "agentkv-tokenizer-v1");
    put_str(&mut h, model);
    put_str(&mut h, pre);
    h.update(&(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        put_str(&mut h, t);
    }
    h.update(&(token_types.len() as u64).to_le_bytes());
    for ty in token_types {
        h.update(&ty.to_le_bytes());
    }
    h.update(&(merges.len() as u64).to_le_bytes());
    for m in merges {
        put_str(&mut h, m);
    }
    format!("{:032x}", h.digest128())
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use candle_core::quantized::gguf_file::Value;

    use super::*;
    use crate::testing::{gguf_content, real_model_content};

    fn real() -> Option<&'static Tokenizer> {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        let content = real_model_content()?;
        Some(TOK.get_or_init(|| Tokenizer::from_gguf(content).expect("build tokenizer")))
    }

    /// The byte-level symbol for a byte (GPT-2 `bytes_to_unicode`).
    fn byte_to_byte_level_char(byte: u8) -> char {
        (0..=0x143u32)
            .filter_map(char::from_u32)
            .find(|&c| byte_level_char_to_byte(c) == Some(byte))
            .unwrap_or(char::REPLACEMENT_CHARACTER)
    }

    fn id(tok: &Tokenizer, token: &str) -> u32 {
        tok.token_id(token)
            .unwrap_or_else(|| panic!("{token:?} is not in the vocabulary"))
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String((*s).into())).collect())
    }

    /// A tiny byte-level vocabulary: all 256 byte symbols, a few merges, two control tokens.
    fn tiny_metadata(pre: &str) -> Metadata {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        tokens.extend((0..=255u8).map(|b| byte_to_byte_level_char(b).to_string()));
        let merged = ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "ĠĠ"];
        tokens.extend(merged.iter().map(|s| (*s).to_string()));
        let mut types = vec![Value::I32(3), Value::I32(3)];
        types.resize(tokens.len(), Value::I32(1));
        let mut md = Metadata::new();
        md.insert(KEY_MODEL.into(), Value::String("gpt2".into()));
        md.insert(KEY_PRE.into(), Value::String(pre.into()));
        md.insert(
            KEY_TOKENS.into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        );
        md.insert(KEY_TOKEN_TYPE.into(), Value::Array(types));
        md.insert(
            KEY_MERGES.into(),
            strings(&["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "Ġ Ġ"]),
        );
        md.insert(KEY_BOS.into(), Value::U32(1));
        md.insert(KEY_EOS.into(), Value::U32(0));
        md
    }

    #[test]
    fn types_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Tokenizer>();
        send_sync::<TokenStream>();
        send_sync::<crate::chat::ChatTemplate>();
    }

    #[test]
    fn debug_output_is_short() {
        let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
        let shown = format!("{tok:?}");
        assert!(
            shown.contains("vocab_size: 265") && shown.len() < 300,
            "{shown}"
        );
    }

    #[test]
    fn byte_level_table_is_a_bijection() {
        let mut seen = [false; 256];
        for c in (0..=0x143u32).filter_map(char::from_u32) {
            if let Some(b) = byte_level_char_to_byte(c) {
                assert!(!seen[usize::from(b)], "byte {b} mapped twice");
                seen[usize::from(b)] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(byte_level_char_to_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_char_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_char_to_byte('ĉ'), Some(b'\t'));
        assert_eq!(byte_level_char_to_byte('A'), Some(b'A'));
        assert_eq!(byte_level_char_to_byte('Ń'), Some(0xAD));
        assert_eq!(byte_level_char_to_byte('ń'), None);
    }

    #[test]
    fn tiny_vocab_encodes_decodes_and_streams() {
        let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
        assert_eq!(tok.vocab_size(), 2 + 256 + 7);
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_id(), 0);
        assert_eq!(tok.stop_ids(), vec![0]);
        assert!(!tok.add_bos_token());

        let ids = tok.encode("<|im_start|>hello wo").expect("encode");
        assert_eq!(
            ids,
            vec![1, id(&tok, "hello"), id(&tok, "Ġwo")],
            "control token text must map to its id"
        );
        // Digits are split one by one before BPE in the smollm pre-tokenizer.
        assert_eq!(
            tok.encode("12").expect("encode"),
            vec![id(&tok, "1"), id(&tok, "2")]
        );
        for text in [
            "hello  world\n\t",
            "ü ñ 日本 🦀",
            "<|endoftext|>x<|im_start|>",
        ] {
            let ids = tok.encode(text).expect("encode");
            assert_eq!(tok.decode(&ids).expect("decode"), text);
            let mut stream = TokenStream::new();
            let mut streamed = String::new();
            for &i in &ids {
                streamed.push_str(&stream.push(&tok, i).expect("push"));
            }
            streamed.push_str(&stream.finish());
            assert_eq!(streamed, text);
        }
    }

    #[test]
    fn plain_encoding_keeps_control_text_as_text() {
        let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
        let text = "<|im_start|>hello<|endoftext|>";
        let ids = tok.encode_plain(text).expect("encode");
        assert!(!ids.contains(&0) && !ids.contains(&1), "{ids:?}");
        assert_eq!(tok.decode(&ids).expect("decode"), text);
        assert_eq!(
            tok.encode(text).expect("encode"),
            vec![1, id(&tok, "hello"), 0]
        );
        // Without control text the two agree.
        assert_eq!(
            tok.encode_plain("hello wo").expect("encode"),
            tok.encode("hello wo").expect("encode")
        );
        assert_eq!(tok.control_text_in(text), Some("<|endoftext|>"));
        assert_eq!(tok.control_text_in("<|im_start"), None);
    }

    #[test]
    fn pre_tokenizer_families_split_differently() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let pieces = |pre: PreSplit, text: &str| -> Vec<String> {
            let mut s = PreTokenizedString::from(text);
            pre.build()
                .expect("build")
                .pre_tokenize(&mut s)
                .expect("pre-tokenize");
            s.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(piece, _, _)| piece.to_owned())
                .collect()
        };
        assert_eq!(pieces(PreSplit::Gpt2, "x 2024"), ["x", "Ġ2024"]);
        assert_eq!(
            pieces(PreSplit::DigitsThenGpt2, "x 2024"),
            ["x", "Ġ", "2", "0", "2", "4"]
        );
        // llama.cpp's `default` list cuts digit runs into threes after the GPT-2 split.
        assert_eq!(
            pieces(PreSplit::LlamaDefault, "x 12345"),
            ["x", "Ġ", "123", "45"]
        );
        // `\s+(?!\S)` leaves the last space of a run for the next word.
        assert_eq!(pieces(PreSplit::Gpt2, "a   b"), ["a", "ĠĠ", "Ġb"]);
    }

    #[test]
    fn pre_names_follow_llama_cpp() {
        assert_eq!(
            PreSplit::from_name("smollm"),
            Some(PreSplit::DigitsThenGpt2)
        );
        assert_eq!(
            PreSplit::from_name("starcoder"),
            Some(PreSplit::DigitsThenGpt2)
        );
        assert_eq!(PreSplit::from_name("gpt-2"), Some(PreSplit::Gpt2));
        assert_eq!(PreSplit::from_name("default"), Some(PreSplit::LlamaDefault));
        assert_eq!(PreSplit::from_name("gpt2"), None);
        assert_eq!(PreSplit::from_name("llama-bpe"), None);
    }

    #[test]
    fn bad_metadata_gives_typed_errors() {
        let build = |md: Metadata| Tokenizer::from_gguf(&gguf_content(md)).err();

        let mut md = tiny_metadata("smollm");
        md.remove(KEY_MODEL);
        let err = build(md);
        assert!(
            matches!(&err, Some(TokenizerError::Metadata(MetadataError::Missing { key })) if key == KEY_MODEL),
            "{err:?}"
        );
        assert!(
            err.map(|e| e.to_string())
                .is_some_and(|m| m.contains(KEY_MODEL))
        );

        let mut md = tiny_metadata("smollm");
        md.remove(KEY_TOKENS);
        assert!(matches!(
            build(md),
            Some(TokenizerError::Metadata(MetadataError::Missing { key })) if key == KEY_TOKENS
        ));

        let mut md = tiny_metadata("smollm");
        md.insert(KEY_MODEL.into(), Value::String("llama".into()));
        assert!(matches!(
            build(md),
            Some(TokenizerError::UnsupportedModel { model }) if model == "llama"
        ));

        let err = build(tiny_metadata("qwen2"));
        assert!(
            matches!(&err, Some(TokenizerError::UnsupportedPreTokenizer { name }) if name == "qwen2")
        );
        assert!(
            err.map(|e| e.to_string())
                .is_some_and(|m| m.contains("`qwen2`") && m.contains("smollm"))
        );

        let mut md = tiny_metadata("smollm");
        md.insert(KEY_MERGES.into(), strings(&["h e", "noSpace"]));
        assert!(matches!(
            build(md),
            Some(TokenizerError::MalformedMerge { index: 1, .. })
        ));

        let mut md = tiny_metadata("smollm");
        md.insert(KEY_MERGES.into(), strings(&["q zz"]));
        assert!(matches!(build(md), Some(TokenizerError::Build { .. })));

        let mut md = tiny_metadata("smollm");
        md.insert(KEY_TOKEN_TYPE.into(), Value::Array(vec![Value::I32(1)]));
        assert!(matches!(
            build(md),
            Some(TokenizerError::TokenTypeCount { types: 1, .. })
        ));

        let mut md = tiny_metadata("smollm");
        md.insert(KEY_EOS.into(), Value::U32(100_000));
        assert!(matches!(
            build(md),
            Some(TokenizerError::SpecialIdOutOfRange { id: 100_000, .. })
        ));

        let mut md = tiny_metadata("smollm");
        if let Some(Value::Array(tokens)) = md.get_mut(KEY_TOKENS) {
            tokens.push(Value::String("hello".into()));
        }
        if let Some(Value::Array(types)) = md.get_mut(KEY_TOKEN_TYPE) {
            types.push(Value::I32(1));
        }
        assert!(matches!(
            build(md),
            Some(TokenizerError::DuplicateToken { token, .. }) if token == "hello"
        ));

        let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
        assert!(matches!(
            tok.decode(&[0, 9999]),
            Err(TokenizerError::UnknownId { id: 9999, .. })
        ));
    }

    #[test]
    fn merges_split_like_llama_cpp() {
        let merges = parse_merges(&["Ġ t", "a b c", "  x"]).expect("parse");
        assert_eq!(merges[0], ("Ġ".to_owned(), "t".to_owned()));
        // Only the first space (after byte 0) separates: the right side may hold spaces.
        assert_eq!(merges[1], ("a".to_owned(), "b c".to_owned()));
        // A leading space is part of the left token (`find(' ', 1)`).
        assert_eq!(merges[2], (" ".to_owned(), "x".to_owned()));
        assert!(parse_merges(&["ab "]).is_err());
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("a");
        let b = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("b");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 32);
        assert!(a.fingerprint().chars().all(|c| c.is_ascii_hexdigit()));

        let other_pre = Tokenizer::from_gguf(&gguf_content(tiny_metadata("gpt-2"))).expect("c");
        assert_ne!(a.fingerprint(), other_pre.fingerprint());

        let mut md = tiny_metadata("smollm");
        md.insert(
            KEY_MERGES.into(),
            strings(&["h e", "l l", "he ll", "hell o", "Ġ w", "Ġ Ġ", "Ġw o"]),
        );
        let reordered = Tokenizer::from_gguf(&gguf_content(md)).expect("d");
        assert_ne!(a.fingerprint(), reordered.fingerprint());

        let mut md = tiny_metadata("smollm");
        if let Some(Value::Array(types)) = md.get_mut(KEY_TOKEN_TYPE) {
            types[1] = Value::I32(1);
        }
        let retyped = Tokenizer::from_gguf(&gguf_content(md)).expect("e");
        assert_ne!(a.fingerprint(), retyped.fingerprint());
    }

    #[test]
    fn stream_holds_back_split_characters() {
        let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
        // 🦀 is F0 9F A6 80: feed it one byte token at a time.
        let crab: Vec<u32> = "🦀"
            .bytes()
            .map(|b| id(&tok, &byte_to_byte_level_char(b).to_string()))
            .collect();
        let mut stream = TokenStream::new();
        for &i in &crab[..3] {
            assert_eq!(stream.push(&tok, i).expect("push"), "");
        }
        assert_eq!(stream.push(&tok, crab[3]).expect("push"), "🦀");
        assert_eq!(stream.finish(), "");

        // An invalid byte is replaced right away; an unfinished tail only at the end.
        let ff = id(&tok, &byte_to_byte_level_char(0xFF).to_string());
        let mut stream = TokenStream::new();
        let mut out = stream.push(&tok, ff).expect("push");
        out.push_str(&stream.push(&tok, crab[0]).expect("push"));
        assert_eq!(out, "\u{FFFD}");
        out.push_str(&stream.finish());
        assert_eq!(out, "\u{FFFD}\u{FFFD}");
        assert_eq!(tok.decode(&[ff, crab[0]]).expect("decode"), out);
    }

    // ---- tests against the real SmolLM2 vocabulary ----

    #[test]
    fn real_metadata_is_read() {
        let Some(tok) = real() else { return };
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.pre_tokenizer_name(), "smollm");
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_id(), 2);
        assert!(!tok.add_bos_token());
        assert_eq!(tok.token_id("<|im_start|>"), Some(1));
        assert_eq!(tok.token_id("<|im_end|>"), Some(2));
        // eos is <|im_end|> in this file, so it is listed once.
        assert_eq!(tok.stop_ids(), vec![2]);
    }

    #[test]
    fn real_digits_are_split_one_by_one() {
        let Some(tok) = real() else { return };
        let expected: Vec<u32> = ["2", "0", "2", "4"].iter().map(|t| id(tok, t)).collect();
        assert_eq!(tok.encode("2024").expect("encode"), expected);
        // Checked with the python gguf reader: tokens[34] == "2", [32] == "0", [36] == "4".
        assert_eq!(expected, vec![34, 32, 34, 36]);
    }

    #[test]
    fn real_words_take_their_leading_space() {
        let Some(tok) = real() else { return };
        assert_eq!(
            tok.encode("Hello world").expect("encode"),
            vec![id(tok, "Hello"), id(tok, "Ġworld")]
        );
        // Checked with the python gguf reader: tokens[19556] == "Hello", [905] == "Ġworld".
        assert_eq!(id(tok, "Hello"), 19556);
        assert_eq!(id(tok, "Ġworld"), 905);
    }

    #[test]
    fn real_whitespace_run_leaves_last_space_to_next_word() {
        let Some(tok) = real() else { return };
        // The regex gives "a", "  ", " b": `\s+(?!\S)` backs off one space so the last one
        // joins the word. "ĠĠ" is a single token (merge "Ġ Ġ" is rank 4) and so is "Ġb".
        assert_eq!(
            tok.encode("a   b").expect("encode"),
            vec![id(tok, "a"), id(tok, "ĠĠ"), id(tok, "Ġb")]
        );
    }

    #[test]
    fn real_control_tokens_are_recognized_in_text() {
        let Some(tok) = real() else { return };
        let ids = tok
            .encode("<|im_start|>user\nHi<|im_end|>")
            .expect("encode");
        assert_eq!(ids.first(), Some(&1));
        assert!(ids.contains(&2));
        assert_eq!(
            ids,
            vec![1, id(tok, "user"), id(tok, "Ċ"), id(tok, "Hi"), 2]
        );
    }

    /// Ids from an independent Python re-implementation of llama.cpp's BPE (regex split with
    /// `\p{N}` then the GPT-2 regex, rank-ordered merges) run over this GGUF's arrays.
    #[test]
    fn real_matches_reference_implementation() {
        let Some(tok) = real() else { return };
        let cases: &[(&str, &[u32])] = &[
            (
                "naïve café 日本語 🦀",
                &[
                    3546, 46494, 37366, 17097, 241, 115, 40993, 179, 120, 248, 15107, 116, 218,
                ],
            ),
            (
                "fn main() {\n\tprintln!(\"hi\");\n}",
                &[
                    7853, 1085, 1000, 1662, 198, 197, 3272, 34115, 17, 1470, 6004, 21646, 198, 109,
                ],
            ),
            (
                "I dont think they'll say 3.14159",
                &[
                    57, 35047, 1510, 502, 3060, 1643, 216, 35, 30, 33, 36, 33, 37, 41,
                ],
            ),
        ];
        for (text, want) in cases {
            assert_eq!(tok.encode(text).expect("encode"), *want, "{text:?}");
        }
    }

    const ROUND_TRIP: &[&str] = &[
        "",
        " ",
        "Hello, world!",
        "  leading and trailing  ",
        "a   b\t\tc\n\n\nd \n e\r\n",
        "Café naïve résumé Ångström façade",
        "日本語のテキスト 你好，世界！ 한국어",
        "emoji: 🦀🎉👍🏽🇺🇸 ❤️ and zwj 👩‍👩‍👧",
        "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
        "numbers 1234567890 and 3.14159 and 1,000,000 ١٢٣",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
        "text<|endoftext|>more<repo_name>x",
        "I'm sure they'll say it's fine, don't you think? We've seen it.",
        "tabs\tand\u{a0}nbsp and zero\u{200b}width",
    ];

    #[test]
    fn real_round_trip_is_exact() {
        let Some(tok) = real() else { return };
        for text in ROUND_TRIP {
            let ids = tok.encode(text).expect("encode");
            assert_eq!(tok.decode(&ids).expect("decode"), *text, "ids {ids:?}");
        }
    }

    #[test]
    fn real_plain_encoding_round_trips_without_control_tokens() {
        let Some(tok) = real() else { return };
        for text in ROUND_TRIP {
            let ids = tok.encode_plain(text).expect("encode");
            assert_eq!(tok.decode(&ids).expect("decode"), *text, "ids {ids:?}");
            // SmolLM2's control tokens are ids 0..=16.
            assert!(ids.iter().all(|&i| i > 16), "{text:?} gave {ids:?}");
            if tok.control_text_in(text).is_none() {
                assert_eq!(ids, tok.encode(text).expect("encode"));
            }
        }
        let control: Vec<u32> = tok.control.iter().filter_map(|t| tok.token_id(t)).collect();
        assert_eq!(control.len(), 17);
        assert!(control.iter().all(|&i| i <= 16), "{control:?}");
        assert_eq!(
            tok.control_text_in("x<|im_end|>y<repo_name>"),
            Some("<repo_name>")
        );
    }

    #[test]
    fn real_stream_matches_decode() {
        let Some(tok) = real() else { return };
        for text in ROUND_TRIP {
            let ids = tok.encode(text).expect("encode");
            let mut stream = TokenStream::new();
            let mut streamed = String::new();
            for &i in &ids {
                let piece = stream.push(tok, i).expect("push");
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{text:?} gave U+FFFD mid-stream"
                );
                streamed.push_str(&piece);
            }
            streamed.push_str(&stream.finish());
            assert_eq!(streamed, tok.decode(&ids).expect("decode"));
        }
    }

    #[test]
    fn real_emoji_spans_tokens_without_replacement_chars() {
        let Some(tok) = real() else { return };
        let ids = tok.encode("🦀").expect("encode");
        // The crab is 4 bytes and not one token here, so the stream must hold bytes back.
        assert!(ids.len() > 1, "{ids:?}");
        let mut stream = TokenStream::new();
        let pieces: Vec<String> = ids
            .iter()
            .map(|&i| stream.push(tok, i).expect("push"))
            .collect();
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
        assert_eq!(pieces.concat(), "🦀");
        assert_eq!(stream.finish(), "");
    }

    #[test]
    fn real_unrepresentable_control_byte_is_dropped() {
        let Some(tok) = real() else { return };
        // SmolLM2 has no symbol for byte 0x04 ("Ą"); llama.cpp drops it as well.
        assert_eq!(tok.token_id("Ą"), None);
        assert_eq!(
            tok.encode("a\u{4}b").expect("encode"),
            vec![id(tok, "a"), id(tok, "b")]
        );
    }

    #[test]
    fn real_fingerprint_is_stable() {
        let Some(content) = real_model_content() else {
            return;
        };
        let tok = real().expect("the model is there");
        let again = Tokenizer::from_gguf(content).expect("rebuild");
        assert_eq!(tok.fingerprint(), again.fingerprint());
        let tiny = Tokenizer::from_gguf(&content_tiny()).expect("tiny");
        assert_ne!(tok.fingerprint(), tiny.fingerprint());
    }

    fn content_tiny() -> Content {
        gguf_content(tiny_metadata("smollm"))
    }
}
