//! A conversation to token ids where only the template's own text can make control tokens:
//! the conversation is rendered again with each message's content between noncharacter
//! markers, and the rendering is cut into template text and content there.

use super::{ChatTemplate, Message, Result, TemplateError};
use crate::tokenizer::Tokenizer;

impl ChatTemplate {
    /// Token ids of `messages` rendered with `add_generation_prompt`, where only the
    /// template's own text can make control tokens (the rule is spelled out on
    /// [`crate::Engine::chat_tokens`]).
    pub(crate) fn encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let plain = self.render(messages, add_generation_prompt)?;
        let Some(pieces) = self.render_pieces(messages, add_generation_prompt, &plain)? else {
            // The template does not insert content verbatim, so content cannot be cut out of
            // the rendering. Tokenizing it whole is safe only if no content could make a
            // control token.
            for (index, m) in messages.iter().enumerate() {
                if let Some(token) = tokenizer.control_text_in(&m.content) {
                    return Err(TemplateError::ControlTextInContent {
                        index,
                        role: m.role.as_str(),
                        token: token.to_owned(),
                    });
                }
            }
            return Ok(tokenizer.encode(&plain)?);
        };
        let mut ids = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Template(text) => ids.extend(tokenizer.encode(&text)?),
                Piece::Content { index, text } => {
                    let generated = messages
                        .get(index)
                        .filter(|m| m.content == text)
                        .and_then(|m| m.tokens.as_deref())
                        .filter(|t| tokenizer.decode(t).is_ok_and(|d| d == text));
                    match generated {
                        Some(t) => ids.extend_from_slice(t),
                        None => ids.extend(tokenizer.encode_plain(&text)?),
                    }
                }
            }
        }
        Ok(ids)
    }

    /// `messages` rendered and cut into template text and content, by rendering them again
    /// with each content between markers. `None` when the template does not insert content
    /// verbatim (see [`split_marked`]), or when every marker character already occurs in the
    /// conversation.
    fn render_pieces(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        plain: &str,
    ) -> Result<Option<Vec<Piece>>> {
        // A marker character the rendering cannot hold except in our markers: it is in no
        // content, not in the plain rendering (so no template text), not in the template.
        let free = |c: char| {
            !plain.contains(c)
                && !self.source.contains(c)
                && messages.iter().all(|m| !m.content.contains(c))
        };
        let Some(mark) = noncharacters().find(|&c| free(c)) else {
            return Ok(None);
        };
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Message::new(
                    m.role,
                    format!("{mark}{OPEN}{i}{mark}{}{mark}{CLOSE}{i}{mark}", m.content),
                )
            })
            .collect();
        let rendered = self.render(&marked, add_generation_prompt)?;
        Ok(split_marked(&rendered, mark, messages.len(), plain))
    }
}

/// First letter of the tag in a marker that opens message content.
const OPEN: char = 'o';
/// First letter of the tag in a marker that closes message content.
const CLOSE: char = 'c';

/// Unicode noncharacters (U+FDD0..U+FDEF and the last two code points of every plane): kept
/// for a program's internal use and not meant to appear in text that is exchanged.
pub(super) fn noncharacters() -> impl Iterator<Item = char> {
    let plane_ends = (0..=0x10u32).flat_map(|plane| [plane << 16 | 0xFFFE, plane << 16 | 0xFFFF]);
    (0xFDD0..=0xFDEFu32)
        .chain(plane_ends)
        .filter_map(char::from_u32)
}

/// One stretch of a rendered conversation.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece {
    /// The template's own text.
    Template(String),
    /// Message `index`'s content, as the template rendered it.
    Content {
        /// Position of the message in the conversation.
        index: usize,
        /// The content.
        text: String,
    },
}

/// Cuts a rendering whose message contents sit between `{mark}o{i}{mark}` and
/// `{mark}c{i}{mark}` (`mark` occurring nowhere else) into pieces.
///
/// `None` when the template did not insert content verbatim: the markers did not come
/// through intact, removing them does not give `plain` (content was changed, e.g. stripped),
/// or they are not around whole contents in turn (one left open or inside another: content
/// was cut, e.g. to its first line). A content the template rendered twice gives two pieces;
/// one it left out, none.
pub(super) fn split_marked(
    rendered: &str,
    mark: char,
    n_messages: usize,
    plain: &str,
) -> Option<Vec<Piece>> {
    let parts: Vec<&str> = rendered.split(mark).collect();
    // Text and tags alternate, text first and last.
    if parts.len().is_multiple_of(2) {
        return None;
    }
    let tag = |part: &str| -> Option<(char, usize)> {
        let mut chars = part.chars();
        let kind = chars.next().filter(|&k| k == OPEN || k == CLOSE)?;
        let digits = chars.as_str();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let index = digits.parse::<usize>().ok().filter(|&i| i < n_messages)?;
        Some((kind, index))
    };
    let tags = parts
        .iter()
        .skip(1)
        .step_by(2)
        .map(|p| tag(p))
        .collect::<Option<Vec<_>>>()?;
    let texts: Vec<&str> = parts.iter().step_by(2).copied().collect();
    if texts.concat() != plain {
        return None;
    }

    let mut pieces = Vec::with_capacity(texts.len());
    let mut open: Option<usize> = None;
    for (k, text) in texts.iter().enumerate() {
        if !text.is_empty() {
            pieces.push(match open {
                Some(index) => Piece::Content {
                    index,
                    text: (*text).to_owned(),
                },
                None => Piece::Template((*text).to_owned()),
            });
        }
        // There is one tag fewer than texts: after the last text, none.
        let Some(&(kind, index)) = tags.get(k) else {
            break;
        };
        open = match (kind, open) {
            (OPEN, None) => Some(index),
            (CLOSE, Some(o)) if o == index => None,
            _ => return None,
        };
    }
    open.is_none().then_some(pieces)
}
