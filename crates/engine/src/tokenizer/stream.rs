//! Generated ids to text as it comes, whole characters at a time.

use super::{Result, Tokenizer};

/// Turns generated ids into text increments, holding back bytes until they form whole
/// UTF-8 characters, so a character split over two tokens is never shown as U+FFFD.
///
/// The tokenizer is passed to each call rather than borrowed for the stream's lifetime, so a
/// generation loop can keep the stream next to the model it mutates.
///
/// The text is the concatenation of [`Tokenizer::token_bytes`]: for a SentencePiece
/// vocabulary with a space prefix, [`Tokenizer::decode`] also drops the first token's
/// leading space, the stream does not (generated text continues a prompt, as in llama.cpp).
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
