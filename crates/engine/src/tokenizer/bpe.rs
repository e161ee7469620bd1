//! The byte-level BPE tokenizer: the GGUF's vocabulary, merges and token types in a
//! `tokenizers` BPE model, with control tokens matched in text (or not, for data).

use tokenizers::AddedToken;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use xxhash_rust::xxh3::Xxh3;

use super::pre::PreSplit;
use super::{Result, TokenizerError};
use crate::gguf::GgufFile;
use crate::gguf::meta::{self as gguf_meta, Metadata};

pub(super) const KEY_MODEL: &str = "tokenizer.ggml.model";
pub(super) const KEY_PRE: &str = "tokenizer.ggml.pre";
pub(super) const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
pub(super) const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub(super) const KEY_MERGES: &str = "tokenizer.ggml.merges";
pub(super) const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
pub(super) const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";

/// llama.cpp `LLAMA_TOKEN_TYPE_CONTROL`.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp `LLAMA_TOKEN_TYPE_USER_DEFINED`.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A byte-level BPE tokenizer loaded from GGUF metadata.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` without the control tokens: what [`Tokenizer::encode_plain`] uses.
    plain: tokenizers::Tokenizer,
    /// The text of every control token, longest first.
    pub(super) control: Vec<String>,
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
    pub(crate) fn from_gguf(file: &GgufFile) -> Result<Self> {
        Self::from_metadata(file.metadata())
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

/// Splits each `"left right"` rule at the first space after the first byte, as llama.cpp does
/// (`word.find(' ', 1)`), so a left token that is itself a space still parses.
pub(super) fn parse_merges(merges: &[&str]) -> Result<Merges> {
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
pub(super) fn byte_level_char_to_byte(c: char) -> Option<u8> {
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
