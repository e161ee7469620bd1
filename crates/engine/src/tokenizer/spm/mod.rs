//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`, e.g. Gemma 3), tokenized the
//! way llama.cpp's `llm_tokenizer_spm` does (`src/llama-vocab.cpp`).
//!
//! Encoding has two stages, as in llama.cpp's `tokenize`:
//! 1. special tokens are cut out of the text (`tokenizer_st_partition`): every control,
//!    user-defined and unknown token when control text is recognized, only the user-defined
//!    ones when it is not; longest token text first, each one's occurrences left to right;
//! 2. each remaining piece of text gets a leading space if `tokenizer.ggml.add_space_prefix`
//!    asks for one and the piece starts the text or follows a special token, has its spaces
//!    replaced by U+2581 ("▁"), and is split into characters that are merged pairwise, the
//!    pair whose merged text is the vocabulary entry with the highest score first (ties go to
//!    the leftmost pair). A character that ends up in no token is written as its bytes,
//!    `<0xXX>` tokens.
//!
//! Decoding is llama.cpp's `token_to_piece`: "▁" back to a space, byte tokens back to their
//! byte, control, unknown and user-defined tokens as their text.

mod attrs;
mod vocab;

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use aho_corasick::{AhoCorasick, MatchKind};
use xxhash_rust::xxh3::Xxh3;

use super::{Result, TokenizerError};
use crate::gguf::meta::Metadata;
use attrs::attr;
use vocab::Vocab;

/// The character SentencePiece writes for a space.
const SPACE_SYMBOL: &str = "\u{2581}";

/// A SentencePiece vocabulary with what encoding and decoding need.
#[derive(Clone)]
pub(super) struct Spm {
    /// Token texts as stored ("▁the"), by id and back.
    vocab: Vocab,
    /// Merge priority by id (`tokenizer.ggml.scores`), -0.0 stored as 0.0 so that the heap's
    /// total order agrees with llama.cpp's `<` on ties.
    scores: Vec<f32>,
    /// llama.cpp attribute bits by id (see [`attr`]).
    attrs: Vec<u8>,
    /// The token standing for each byte when a character has no token: `<0xXX>`, else the
    /// byte itself as a one-byte token (llama.cpp's `byte_to_token`).
    byte_tokens: [Option<u32>; 256],
    /// `tokenizer.ggml.add_space_prefix`.
    add_space_prefix: bool,
    /// Control, user-defined and unknown tokens, in the order they are cut out of text.
    specials: Vec<u32>,
    /// Finds which of `specials` occur in a text (pattern `i` is `specials[i]`).
    special_finder: AhoCorasick,
}

impl Spm {
    /// Builds the vocabulary from the GGUF arrays; `md` is read only for the keys that decide
    /// which fill-in-the-middle texts count as control tokens.
    pub(super) fn new(
        md: &Metadata,
        tokens: &[&str],
        token_types: &[i32],
        scores: &[f32],
        add_space_prefix: bool,
    ) -> Result<Self> {
        if scores.len() != tokens.len() {
            return Err(TokenizerError::ScoreCount {
                tokens: tokens.len(),
                scores: scores.len(),
            });
        }
        let vocab = Vocab::new(tokens)?;
        let scores = (0u32..)
            .zip(scores)
            .map(|(id, &score)| {
                if score.is_nan() {
                    Err(TokenizerError::ScoreNotANumber { id })
                } else {
                    // -0.0 + 0.0 is 0.0: llama.cpp's `<` sees the two as equal, total_cmp not.
                    Ok(score + 0.0)
                }
            })
            .collect::<Result<Vec<f32>>>()?;

        let attrs = attrs::of_tokens(md, &vocab, token_types);
        for (id, &a) in (0u32..).zip(&attrs) {
            let text = vocab.text(id);
            if a & attr::BYTE != 0 && parse_byte_token(text).is_none() {
                return Err(TokenizerError::MalformedByteToken {
                    id,
                    token: text.to_owned(),
                });
            }
        }

        let mut byte_tokens = [None; 256];
        for (byte, slot) in (0u8..=255).zip(byte_tokens.iter_mut()) {
            let single = char::from(byte);
            *slot = vocab.id(&format!("<0x{byte:02X}>")).or_else(|| {
                // A byte above 0x7F is not a string by itself, so it cannot be a vocabulary entry.
                byte.is_ascii()
                    .then(|| vocab.id(single.encode_utf8(&mut [0; 4])))
                    .flatten()
            });
        }

        // llama.cpp sorts by length alone with an unstable sort; equal lengths here go by id,
        // which can only matter for two equally long special tokens that overlap in a text.
        let mut specials: Vec<u32> = (0u32..)
            .zip(&attrs)
            .filter(|&(_, &a)| a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
            .map(|(id, _)| id)
            .collect();
        specials.sort_by_key(|&id| std::cmp::Reverse(vocab.text(id).len()));
        let special_finder = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(specials.iter().map(|&id| vocab.text(id).as_bytes()))
            .map_err(|source| TokenizerError::SpecialTokenSearch {
                count: specials.len(),
                source,
            })?;

        Ok(Self {
            vocab,
            scores,
            attrs,
            byte_tokens,
            add_space_prefix,
            specials,
            special_finder,
        })
    }

    /// Token ids of `text`; with `parse_special` false, text stays data: only user-defined
    /// tokens are cut out, and no control token is produced (see [`Spm::tokenize_piece`]).
    pub(super) fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Text(piece) => {
                    let mut spaced = String::with_capacity(piece.len() + 1);
                    if self.add_space_prefix && prev_special {
                        spaced.push(' ');
                    }
                    spaced.push_str(piece);
                    let escaped = spaced.replace(' ', SPACE_SYMBOL);
                    self.tokenize_piece(&escaped, !parse_special, &mut out)?;
                    prev_special = false;
                }
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        Ok(out)
    }

    /// `text` cut into special tokens and the text between them, as llama.cpp's
    /// `tokenizer_st_partition` does.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        if text.is_empty() {
            return Vec::new();
        }
        // A token that is nowhere in the text is nowhere in its pieces either, so only the
        // ones found here need the pass over the pieces that llama.cpp makes for every one.
        // A set rather than a list of matches: a run of newlines matches dozens of newline
        // tokens at every position.
        let mut found: Vec<bool> = Vec::new();
        for m in self.special_finder.find_overlapping_iter(text) {
            if found.is_empty() {
                found.resize(self.specials.len(), false);
            }
            if let Some(slot) = found.get_mut(m.pattern().as_usize()) {
                *slot = true;
            }
        }
        let mut fragments = vec![Fragment::Text(text)];
        let present = self.specials.iter().zip(&found).filter(|&(_, &f)| f);
        for id in present.map(|(&id, _)| id) {
            let a = self.attrs[id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let needle = self.vocab.text(id);
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(piece) = fragment else {
                    next.push(fragment);
                    continue;
                };
                // Non-overlapping, left to right, as llama.cpp's repeated `find`.
                for (i, between) in piece.split(needle).enumerate() {
                    if i > 0 {
                        next.push(Fragment::Token(id));
                    }
                    if !between.is_empty() {
                        next.push(Fragment::Text(between));
                    }
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Appends the ids of one piece of text, spaces already written as "▁"
    /// (`llm_tokenizer_spm_session::tokenize`).
    ///
    /// llama.cpp then resegments a symbol that is not a token through its `rev_merge` map;
    /// that never happens: a merge is only made when the merged text is a token, and a symbol
    /// never merged is one character, while `rev_merge` only holds texts of two or more. So
    /// such a symbol goes straight to bytes here.
    ///
    /// With `data` set, a merge into a control token is not made and a character that is a
    /// control token is written as bytes, so that text kept as data cannot become one.
    /// llama.cpp makes no such exception, but no control token of Gemma 3 can be reached by
    /// merges (each would need a shorter token such as `<start_of` on the way).
    fn tokenize_piece(&self, text: &str, data: bool, out: &mut Vec<u32>) -> Result<()> {
        let bytes = text.as_bytes();
        let mut symbols = Vec::with_capacity(text.len());
        let mut offset = 0;
        while let Some(&first) = bytes.get(offset) {
            let len = utf8_len(first).min(bytes.len() - offset);
            let index = symbols.len();
            symbols.push(Symbol {
                prev: index.checked_sub(1),
                next: (offset + len < bytes.len()).then_some(index + 1),
                start: offset,
                len,
            });
            offset += len;
        }
        if symbols.is_empty() {
            return Ok(());
        }

        let mut queue = BinaryHeap::new();
        for right in 1..symbols.len() {
            self.push_bigram(text, &symbols, right - 1, right, data, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (&symbols[bigram.left], &symbols[bigram.right]);
            // One side was merged since the pair was queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            let right_next = right.next;
            symbols[bigram.left].len += symbols[bigram.right].len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = right_next;
            if let Some(next) = right_next {
                symbols[next].prev = Some(bigram.left);
            }
            if let Some(prev) = symbols[bigram.left].prev {
                self.push_bigram(text, &symbols, prev, bigram.left, data, &mut queue);
            }
            if let Some(next) = right_next {
                self.push_bigram(text, &symbols, bigram.left, next, data, &mut queue);
            }
        }

        let mut at = Some(0);
        while let Some(index) = at {
            let symbol = &symbols[index];
            let piece = &bytes[symbol.start..symbol.start + symbol.len];
            let token = std::str::from_utf8(piece)
                .ok()
                .and_then(|p| self.vocab.id(p))
                .filter(|&id| !(data && self.is_control(id)));
            match token {
                Some(id) => out.push(id),
                None => {
                    for &byte in piece {
                        let id = self.byte_tokens[usize::from(byte)]
                            .ok_or(TokenizerError::MissingByteToken { byte })?;
                        out.push(id);
                    }
                }
            }
            at = symbol.next;
        }
        Ok(())
    }

    /// Queues the merge of two neighbouring symbols if their text is a token
    /// (`try_add_bigram`).
    fn push_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        data: bool,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (l, r) = (&symbols[left], &symbols[right]);
        let size = l.len + r.len;
        let Some(id) = text
            .get(l.start..l.start + size)
            .and_then(|merged| self.vocab.id(merged))
        else {
            return;
        };
        if data && self.is_control(id) {
            return;
        }
        queue.push(Bigram {
            score: self.scores[id as usize],
            left,
            right,
            size,
        });
    }

    fn is_control(&self, id: u32) -> bool {
        self.attrs[id as usize] & attr::CONTROL != 0
    }

    /// The bytes token `id` stands for, control and user-defined tokens as their text
    /// (llama.cpp's `token_to_piece` with `special` on); `None` outside the vocabulary.
    pub(super) fn token_bytes(&self, id: u32) -> Option<Cow<'_, [u8]>> {
        let text = self.vocab.get(id)?;
        let a = self.attrs[id as usize];
        Some(
            if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
                Cow::Borrowed(text.as_bytes())
            } else if a & attr::NORMAL != 0 {
                if text.contains(SPACE_SYMBOL) {
                    Cow::Owned(text.replace(SPACE_SYMBOL, " ").into_bytes())
                } else {
                    Cow::Borrowed(text.as_bytes())
                }
            } else if a & attr::BYTE != 0 {
                // Checked when the vocabulary was built.
                Cow::Owned(parse_byte_token(text).into_iter().collect())
            } else {
                // Unused and undefined tokens, which llama.cpp renders as nothing.
                Cow::Borrowed(&[])
            },
        )
    }

    /// The text of `ids` (all in the vocabulary), as llama.cpp's `llama_detokenize` with
    /// special tokens rendered and none removed: with `add_space_prefix`, the first token
    /// loses one leading space, the one encoding put there.
    pub(super) fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_bytes(id).unwrap_or_default();
            match piece.split_first() {
                Some((b' ', rest)) if i == 0 && self.add_space_prefix => {
                    bytes.extend_from_slice(rest);
                }
                _ => bytes.extend_from_slice(&piece),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The longest control or unknown token text in `text` (the lowest id among equally long
    /// ones): what [`Spm::encode`] with `parse_special` cuts out and without it does not.
    pub(super) fn control_text_in(&self, text: &str) -> Option<&str> {
        self.special_finder
            .find_overlapping_iter(text)
            .filter_map(|m| self.specials.get(m.pattern().as_usize()).copied())
            .filter(|&id| self.attrs[id as usize] & (attr::CONTROL | attr::UNKNOWN) != 0)
            .max_by_key(|&id| (self.vocab.text(id).len(), std::cmp::Reverse(id)))
            .map(|id| self.vocab.text(id))
    }

    /// The id of a vocabulary entry in its stored form ("▁world").
    pub(super) fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    /// Stable hex hash of everything that decides which ids a text gets: the model type, the
    /// token texts, their attributes (types as adjusted by text and keys), the scores and the
    /// space prefix. Caches made with a tokenizer of another fingerprint hold other ids.
    pub(super) fn fingerprint(&self, model: &str) -> String {
        // Every field is length-prefixed so no two different inputs hash the same byte stream.
        fn put_str(h: &mut Xxh3, s: &str) {
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        let mut h = Xxh3::new();
        put_str(&mut h, "agentkv-tokenizer-spm-v1");
        put_str(&mut h, model);
        h.update(&(self.vocab.len() as u64).to_le_bytes());
        for id in (0u32..).take(self.vocab.len()) {
            put_str(&mut h, self.vocab.text(id));
        }
        h.update(&self.attrs);
        for s in &self.scores {
            h.update(&s.to_bits().to_le_bytes());
        }
        h.update(&[u8::from(self.add_space_prefix)]);
        format!("{:032x}", h.digest128())
    }
}

/// A piece of text after special tokens are cut out.
#[derive(Clone, Copy, Debug)]
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// One symbol of the merge: a span of the text, linked to its neighbours. A symbol merged
/// into its left neighbour keeps its place with `len` 0.
struct Symbol {
    prev: Option<usize>,
    next: Option<usize>,
    start: usize,
    len: usize,
}

/// A queued merge of `left` and `right`, whose texts were `size` bytes together.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

/// llama.cpp's `llm_bigram_spm::comparator`: the highest score first, then the leftmost.
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// Length of the UTF-8 sequence a byte starts (llama.cpp's `unicode_len_utf8`).
fn utf8_len(first: u8) -> usize {
    match first >> 4 {
        0xC | 0xD => 2,
        0xE => 3,
        0xF => 4,
        _ => 1,
    }
}

/// The byte of a `<0xXX>` token.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    // `from_str_radix` alone would also take "+F".
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests;
