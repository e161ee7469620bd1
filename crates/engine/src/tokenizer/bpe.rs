//! Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`): the GGUF's vocabulary,
//! merges and token types in a `tokenizers` BPE model, with control tokens matched in text
//! (or not, for data).

use tokenizers::AddedToken;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use xxhash_rust::xxh3::Xxh3;

use super::pre::PreSplit;
use super::{Result, TokenizerError};

/// llama.cpp `LLAMA_TOKEN_TYPE_CONTROL`.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp `LLAMA_TOKEN_TYPE_USER_DEFINED`.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A byte-level BPE vocabulary in the `tokenizers` crate, with and without control tokens.
#[derive(Clone)]
pub(super) struct Bpe {
    inner: tokenizers::Tokenizer,
    /// `inner` without the control tokens: what [`Bpe::encode_plain`] uses.
    plain: tokenizers::Tokenizer,
    /// The text of every control token, longest first.
    pub(super) control: Vec<String>,
}

impl Bpe {
    /// Builds the tokenizer from the GGUF arrays, splitting words with `pre`.
    pub(super) fn new(
        pre: PreSplit,
        tokens: &[&str],
        token_types: &[i32],
        merge_strings: &[&str],
    ) -> Result<Self> {
        let mut vocab = Vocab::with_capacity(tokens.len());
        for (id, token) in (0u32..).zip(tokens) {
            if let Some(first) = vocab.insert((*token).to_owned(), id) {
                return Err(TokenizerError::DuplicateToken {
                    token: (*token).to_owned(),
                    first,
                    second: id,
                });
            }
        }
        let merges = parse_merges(merge_strings)?;

        // No unk token: every byte has a byte-level symbol, and a symbol missing from the
        // vocabulary is dropped, which is what llama.cpp does too.
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(pre.ignores_merges())
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
                .zip(token_types)
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
        })
    }

    /// Token ids for `text`, control-token text matched.
    pub(super) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode_with(&self.inner, text)
    }

    /// Token ids for `text`, control-token text split like any other text.
    pub(super) fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        encode_with(&self.plain, text)
    }

    /// The text of the longest control token in `text`.
    pub(super) fn control_text_in(&self, text: &str) -> Option<&str> {
        self.control
            .iter()
            .find(|t| text.contains(t.as_str()))
            .map(String::as_str)
    }

    /// The text of `ids` (all in the vocabulary), special tokens included.
    pub(super) fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|source| TokenizerError::Decode {
                count: ids.len(),
                source,
            })
    }

    /// The raw bytes token `id` stands for; `None` outside the vocabulary.
    pub(super) fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.inner.id_to_token(id)?;
        // Same rule as the ByteLevel decoder: map every char back to its byte, or, if any char
        // is not a byte-level symbol (added-token text), take the text as it is.
        Some(
            token
                .chars()
                .map(byte_level_char_to_byte)
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| token.into_bytes()),
        )
    }

    /// The id of a vocabulary entry in its byte-level form (`"Ġworld"`), or a special
    /// token's text.
    pub(super) fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
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

pub(super) fn fingerprint_of(
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
