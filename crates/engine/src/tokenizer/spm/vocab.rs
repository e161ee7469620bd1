//! The token texts of a SentencePiece vocabulary, looked up both ways: one string holding
//! every text and an open-addressing table of ids hashed by text, so that building the
//! index of Gemma 3's 262,144 tokens costs two allocations instead of half a million.

use xxhash_rust::xxh3::xxh3_64;

use crate::tokenizer::{Result, TokenizerError};

/// Marks a free slot of the table.
const FREE: Slot = Slot {
    id: u32::MAX,
    tag: 0,
};

/// Token text by id and id by token text.
#[derive(Clone)]
pub(super) struct Vocab {
    /// Every token text, one after another.
    arena: String,
    /// Where token `id`'s text starts in `arena`; one more entry than tokens, for the end.
    starts: Vec<usize>,
    /// Ids, placed by the hash of their text, linear probing; at most half full.
    slots: Vec<Slot>,
}

/// A slot of the table: a token id and the high half of its text's hash, which settles most
/// mismatches without reading the text (a cache miss in a table this size).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Slot {
    id: u32,
    tag: u32,
}

impl Vocab {
    /// Indexes `tokens` (ids in order). An empty text becomes `[EMPTY_<id>]`, as llama.cpp
    /// renames it; a text given twice is [`TokenizerError::DuplicateToken`].
    pub(super) fn new(tokens: &[&str]) -> Result<Self> {
        let mut arena = String::with_capacity(tokens.iter().map(|t| t.len()).sum());
        let mut starts = Vec::with_capacity(tokens.len() + 1);
        for (id, token) in tokens.iter().enumerate() {
            starts.push(arena.len());
            if token.is_empty() {
                arena.push_str(&format!("[EMPTY_{id}]"));
            } else {
                arena.push_str(token);
            }
        }
        starts.push(arena.len());
        let table_len = (tokens.len() * 2).next_power_of_two().max(2);
        let mut vocab = Self {
            arena,
            starts,
            slots: vec![FREE; table_len],
        };
        for id in (0u32..).take(tokens.len()) {
            let text = vocab.text(id);
            match vocab.probe(text) {
                Probe::Free(slot, tag) => vocab.slots[slot] = Slot { id, tag },
                Probe::Found(first) => {
                    return Err(TokenizerError::DuplicateToken {
                        token: text.to_owned(),
                        first,
                        second: id,
                    });
                }
            }
        }
        Ok(vocab)
    }

    /// Number of tokens.
    pub(super) fn len(&self) -> usize {
        self.starts.len() - 1
    }

    /// The text of token `id`, which must be below [`Vocab::len`].
    pub(super) fn text(&self, id: u32) -> &str {
        let id = id as usize;
        &self.arena[self.starts[id]..self.starts[id + 1]]
    }

    /// The text of token `id`, or `None` outside the vocabulary.
    pub(super) fn get(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.len()).then(|| self.text(id))
    }

    /// The id of the token written `text`.
    pub(super) fn id(&self, text: &str) -> Option<u32> {
        match self.probe(text) {
            Probe::Found(id) => Some(id),
            Probe::Free(..) => None,
        }
    }

    /// The slot holding `text`'s id, or the free slot where it would go. The table is never
    /// more than half full, so a free slot is always found.
    fn probe(&self, text: &str) -> Probe {
        let mask = self.slots.len() - 1;
        let hash = xxh3_64(text.as_bytes());
        let tag = (hash >> 32) as u32;
        let mut slot = hash as usize & mask;
        loop {
            match self.slots[slot] {
                FREE => return Probe::Free(slot, tag),
                s if s.tag == tag && self.text(s.id) == text => return Probe::Found(s.id),
                _ => slot = (slot + 1) & mask,
            }
        }
    }
}

/// Where a lookup ended.
enum Probe {
    /// The text's id.
    Found(u32),
    /// The free slot the text would take, and its tag.
    Free(usize, u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_both_ways() {
        let vocab = Vocab::new(&["a", "", "\u{2581}b", "ab"]).expect("vocab");
        assert_eq!(vocab.len(), 4);
        assert_eq!(vocab.text(1), "[EMPTY_1]");
        assert_eq!(vocab.get(4), None);
        for id in 0..4 {
            assert_eq!(vocab.id(vocab.text(id)), Some(id));
        }
        assert_eq!(vocab.id("b"), None);
        assert_eq!(vocab.id(""), None);
        assert!(matches!(
            Vocab::new(&["x", "y", "x"]),
            Err(TokenizerError::DuplicateToken {
                first: 0,
                second: 2,
                ..
            })
        ));
        assert_eq!(Vocab::new(&[]).expect("empty").id("a"), None);
    }
}
