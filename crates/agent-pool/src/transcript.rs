//! The transcript: an append-only file of JSON lines, one per turn (the messages a turn added
//! and the reply, committed together) or per deleted turn, each carrying the checksum of its own
//! content.
//!
//! A conversation is a tree: each turn names the turn it continues ([`Parent`]), so a client
//! that goes back to an earlier point forks the conversation without rewriting anything.
//!
//! Recovery: bytes after the last newline are a torn append (a crash before the turn was
//! acknowledged, since a turn is acknowledged only after its whole line, newline included, is
//! fsynced); they are cut off and reported. A complete line that fails its checksum, does not
//! parse or is out of sequence is damage, reported with its line number and never skipped.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use engine::{Message, Role};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{PoolError, Result};
use crate::files::checksum;

/// Version of transcript lines written by this build, and the newest it reads. Version 4
/// checks the bytes of a line's `turn` (or `deleted`) as stored; versions 1 to 3 (a checksum
/// over serde_json's re-encoding) still load.
pub const TRANSCRIPT_VERSION: u64 = 4;
pub(crate) const TRANSCRIPT_FILE: &str = "transcript.jsonl";

/// Where a turn continues a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parent {
    /// Right after the agent's system prompt: the first turn of a conversation.
    System,
    /// From nothing, without the agent's system prompt: the turn's input carries the
    /// conversation from its first message (a client that sent another system prompt, or none).
    Bare,
    /// After the reply of this turn.
    Turn(u64),
}

/// One exchange of a conversation: the messages it added (usually one user message) and the
/// agent's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// Position in the transcript, from 0.
    pub index: u64,
    /// When the reply was committed, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The point of the conversation this turn continues.
    pub parent: Parent,
    /// The messages this turn added before the reply, oldest first.
    pub input: Vec<Message>,
    /// The agent's reply.
    pub reply: String,
    /// The reply's token ids exactly as the model generated them, when they spell `reply`
    /// (empty when the reply was cut at a stop sequence, or for turns written before tokens
    /// were kept): re-rendering the history then reuses these instead of re-tokenizing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reply_tokens: Vec<u32>,
    /// The system prompt this turn was answered with instead of the conversation's own (an
    /// OpenAI Responses request's `instructions` given with `previous_response_id`). It
    /// applies to this turn only: later turns open with the conversation's own system prompt
    /// unless they bring their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// The turn's token counts (absent for turns written before they were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A turn's token counts, as its [`Reply`](crate::Reply) reported them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V was reused rather than computed for this turn.
    pub reused_tokens: usize,
    /// Tokens generated.
    pub output_tokens: usize,
}

impl Turn {
    /// The text of the last user message of the turn's input ("" if it has none).
    pub fn user(&self) -> &str {
        self.input
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or("", |m| m.content.as_str())
    }

    /// The reply as an assistant message, carrying its generated tokens when kept.
    pub fn reply_message(&self) -> Message {
        let m = Message::assistant(self.reply.clone());
        if self.reply_tokens.is_empty() {
            m
        } else {
            m.with_tokens(self.reply_tokens.clone())
        }
    }
}

/// A turn as version 1 wrote it: one user message, after the previous turn.
#[derive(Serialize, Deserialize)]
struct TurnV1 {
    index: u64,
    unix_ms: u64,
    user: String,
    assistant: String,
}

/// What a line records: `{"v":4,"xxh3":"<16 hex>","turn":{...}}` or
/// `{"v":4,"xxh3":"<16 hex>","deleted":N}`, where `xxh3` is the xxh3-64 of the bytes of the
/// `turn` object or of the number `N` exactly as they appear in the line. Fields this build
/// does not know, in the line or in the turn, are ignored.
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    v: u64,
    xxh3: String,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    turn: Option<&'a RawValue>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    deleted: Option<&'a RawValue>,
}

/// A torn last line that was cut off while reading a transcript.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranscriptRepair {
    /// The transcript file.
    pub path: PathBuf,
    /// Bytes removed from its end (a partial line: a turn that was never acknowledged).
    pub dropped_bytes: u64,
    /// Turns kept.
    pub kept_turns: usize,
}

/// A transcript in memory, with the length of its verified content on disk.
#[derive(Clone, Debug, Default)]
pub(crate) struct Transcript {
    pub turns: Vec<Turn>,
    /// Turns deleted since they were written (their lines stay: the file is append-only).
    pub deleted: BTreeSet<u64>,
    /// Bytes of the file that hold verified lines; appends go exactly here.
    good_len: u64,
}

/// One parsed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A turn.
    Turn(Turn),
    /// A turn was deleted.
    Deleted(u64),
}

fn encode_err(e: serde_json::Error) -> PoolError {
    PoolError::Io {
        op: "encode a transcript line for",
        path: PathBuf::from(TRANSCRIPT_FILE),
        source: std::io::Error::other(e),
    }
}

pub(crate) fn encode_line(entry: &Entry) -> Result<Vec<u8>> {
    let body = match entry {
        Entry::Turn(turn) => serde_json::value::to_raw_value(turn),
        Entry::Deleted(index) => serde_json::value::to_raw_value(index),
    }
    .map_err(encode_err)?;
    let is_turn = matches!(entry, Entry::Turn(_));
    let line = Line {
        v: TRANSCRIPT_VERSION,
        xxh3: checksum(body.get().as_bytes()),
        turn: is_turn.then_some(&*body),
        deleted: (!is_turn).then_some(&*body),
    };
    // serde_json escapes control characters inside strings: the only newline is this one.
    let mut out = serde_json::to_vec(&line).map_err(encode_err)?;
    out.push(b'\n');
    Ok(out)
}

pub(crate) fn decode_line(
    path: &Path,
    number: usize,
    bytes: &[u8],
    next_index: u64,
) -> Result<Entry> {
    let bad = |detail: String| PoolError::CorruptTranscript {
        path: path.to_owned(),
        line: number,
        detail,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON ({e})")))?;
    let version = value
        .get("v")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("no version".into()))?;
    if version > TRANSCRIPT_VERSION {
        return Err(PoolError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: TRANSCRIPT_VERSION,
        });
    }
    let xxh3 = value
        .get("xxh3")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("no checksum".into()))?;
    let verify = |body: &[u8]| {
        if checksum(body) == xxh3 {
            Ok(())
        } else {
            Err(bad("checksum mismatch".into()))
        }
    };
    let field = |name: &str| value.get(name).cloned().unwrap_or(serde_json::Value::Null);
    let entry = if version >= 4 {
        let line: Line = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        match (line.turn, line.deleted) {
            (Some(turn), None) => {
                verify(turn.get().as_bytes())?;
                Entry::Turn(serde_json::from_str(turn.get()).map_err(|e| bad(e.to_string()))?)
            }
            (None, Some(deleted)) => {
                verify(deleted.get().as_bytes())?;
                let index: u64 = serde_json::from_str(deleted.get())
                    .map_err(|_| bad("deleted is not a turn index".into()))?;
                if index >= next_index {
                    return Err(bad(format!("deletes turn {index}, which does not exist")));
                }
                return Ok(Entry::Deleted(index));
            }
            _ => return Err(bad("a line holds exactly one of turn and deleted".into())),
        }
    } else if version == 1 {
        let old: TurnV1 = serde_json::from_value(field("turn")).map_err(|e| bad(e.to_string()))?;
        verify(&serde_json::to_vec(&old).map_err(|e| bad(e.to_string()))?)?;
        Entry::Turn(Turn {
            index: old.index,
            unix_ms: old.unix_ms,
            parent: match old.index.checked_sub(1) {
                None => Parent::System,
                Some(p) => Parent::Turn(p),
            },
            input: vec![Message::user(old.user)],
            reply: old.assistant,
            reply_tokens: Vec::new(),
            instructions: None,
            usage: None,
        })
    } else if let Some(deleted) = value.get("deleted") {
        let index = deleted
            .as_u64()
            .ok_or_else(|| bad("deleted is not a turn index".into()))?;
        verify(&serde_json::to_vec(&index).map_err(|e| bad(e.to_string()))?)?;
        if index >= next_index {
            return Err(bad(format!("deletes turn {index}, which does not exist")));
        }
        return Ok(Entry::Deleted(index));
    } else {
        let turn: Turn = serde_json::from_value(field("turn")).map_err(|e| bad(e.to_string()))?;
        verify(&serde_json::to_vec(&turn).map_err(|e| bad(e.to_string()))?)?;
        Entry::Turn(turn)
    };
    let Entry::Turn(turn) = &entry else {
        return Ok(entry);
    };
    if turn.index != next_index {
        return Err(bad(format!(
            "turn {} where turn {next_index} was expected",
            turn.index
        )));
    }
    if let Parent::Turn(p) = turn.parent
        && p >= turn.index
    {
        return Err(bad(format!(
            "turn {} continues turn {p}, which is not before it",
            turn.index
        )));
    }
    Ok(entry)
}

/// Parses a transcript's bytes (`path` only names the file in errors): the verified turns, the
/// deleted ones, and the length of the bytes holding them; whatever follows the last newline
/// is a torn append for the caller to cut off. This is the entry point of the parser tests.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<Turn>, BTreeSet<u64>, usize)> {
    let good_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut turns = Vec::new();
    let mut deleted = BTreeSet::new();
    // The verified part ends with a newline; without it, every piece is one line.
    if let Some((_, content)) = bytes[..good_len].split_last() {
        for (i, line) in content.split(|&b| b == b'\n').enumerate() {
            match decode_line(path, i + 1, line, turns.len() as u64)? {
                Entry::Turn(t) => turns.push(t),
                Entry::Deleted(index) => {
                    deleted.insert(index);
                }
            }
        }
    }
    Ok((turns, deleted, good_len))
}

impl Transcript {
    /// Reads and verifies a transcript file, cutting off a torn last line (reported).
    pub(crate) fn read(path: &Path) -> Result<(Transcript, Option<TranscriptRepair>)> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PoolError::CorruptAgentFile {
                    path: path.to_owned(),
                    detail: "the transcript is missing".into(),
                });
            }
            Err(e) => return Err(PoolError::io("read", path, e)),
        };
        let (turns, deleted, good_len) = parse(path, &bytes)?;
        let mut transcript = Transcript {
            turns,
            deleted,
            good_len: good_len as u64,
        };
        let torn = (bytes.len() - good_len) as u64;
        let repair = if torn > 0 {
            transcript.truncate_file(path)?;
            Some(TranscriptRepair {
                path: path.to_owned(),
                dropped_bytes: torn,
                kept_turns: transcript.turns.len(),
            })
        } else {
            None
        };
        Ok((transcript, repair))
    }

    /// Cuts the file back to its verified content and makes that durable.
    fn truncate_file(&mut self, path: &Path) -> Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| PoolError::io("open", path, e))?;
        f.set_len(self.good_len)
            .map_err(|e| PoolError::io("truncate", path, e))?;
        f.sync_all().map_err(|e| PoolError::io("fsync", path, e))
    }

    /// Appends a turn (or a deletion) as one line in one write, fsynced before returning: when this returns
    /// `Ok`, the turn survives a crash. On failure the file is cut back to what it held (so a
    /// partial line never sits before a later turn) and the turn is not recorded.
    pub(crate) fn append(&mut self, path: &Path, entry: Entry) -> Result<()> {
        let line = encode_line(&entry)?;
        let mut f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| PoolError::io("open", path, e))?;
        let result = (|| {
            let len = f
                .metadata()
                .map_err(|e| PoolError::io("stat", path, e))?
                .len();
            if len != self.good_len {
                // Left over from an append that failed half way.
                f.set_len(self.good_len)
                    .map_err(|e| PoolError::io("truncate", path, e))?;
            }
            f.seek(SeekFrom::Start(self.good_len))
                .map_err(|e| PoolError::io("seek", path, e))?;
            f.write_all(&line)
                .map_err(|e| PoolError::io("append to", path, e))?;
            f.sync_data().map_err(|e| PoolError::io("fsync", path, e))
        })();
        match result {
            Ok(()) => {
                self.good_len += line.len() as u64;
                match entry {
                    Entry::Turn(turn) => self.turns.push(turn),
                    Entry::Deleted(index) => {
                        self.deleted.insert(index);
                    }
                }
                Ok(())
            }
            Err(e) => {
                let _ = f.set_len(self.good_len);
                Err(e)
            }
        }
    }
}

impl Transcript {
    /// Turn `index`, unless it does not exist or was deleted.
    pub(crate) fn live(&self, index: u64) -> Option<&Turn> {
        let turn = self.turns.get(usize::try_from(index).ok()?)?;
        (!self.deleted.contains(&index)).then_some(turn)
    }

    /// The newest point of the conversation: after the last turn written (deleted or not),
    /// or the system prompt when there is none.
    pub(crate) fn head(&self) -> Parent {
        match self.turns.len() {
            0 => Parent::System,
            n => Parent::Turn(n as u64 - 1),
        }
    }

    /// The turns from the conversation's start up to and including `end`, oldest first, and
    /// where that start is ([`Parent::System`] or [`Parent::Bare`]). Parents always come
    /// before their turns (checked when read), so this ends.
    pub(crate) fn path(&self, end: Parent) -> (Parent, Vec<&Turn>) {
        let mut turns = Vec::new();
        let mut at = end;
        while let Parent::Turn(i) = at {
            let Some(turn) = usize::try_from(i).ok().and_then(|i| self.turns.get(i)) else {
                break;
            };
            turns.push(turn);
            at = turn.parent;
        }
        turns.reverse();
        (at, turns)
    }

    /// The live turns that continue `parent`, newest first.
    pub(crate) fn children(&self, parent: Parent) -> impl Iterator<Item = &Turn> {
        self.turns
            .iter()
            .rev()
            .filter(move |t| t.parent == parent && !self.deleted.contains(&t.index))
    }
}

/// Creates an empty transcript file (fsynced; the caller fsyncs the directory).
pub(crate) fn create(path: &Path, lines: &[&str]) -> Result<()> {
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    kv_store::durable_fs::write_new(path, &bytes).map_err(PoolError::fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(i: u64) -> Turn {
        Turn {
            index: i,
            unix_ms: 1000 + i,
            parent: i.checked_sub(1).map_or(Parent::System, Parent::Turn),
            input: vec![Message::user(format!(
                "question {i}\nwith a newline, \"quotes\" and ünïcode"
            ))],
            reply: format!("answer {i}\u{0}\t"),
            reply_tokens: vec![1, 2, i as u32],
            instructions: (i % 2 == 1).then(|| format!("be brief {i}")),
            usage: (i > 0).then_some(Usage {
                prompt_tokens: 10 * i as usize,
                reused_tokens: 3,
                output_tokens: 3,
            }),
        }
    }

    fn with_turns(n: u64) -> (tempfile::TempDir, PathBuf, Transcript) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TRANSCRIPT_FILE);
        create(&path, &[]).unwrap();
        let mut t = Transcript::default();
        for i in 0..n {
            t.append(&path, Entry::Turn(turn(i))).unwrap();
        }
        (dir, path, t)
    }

    #[test]
    fn appends_read_back_one_line_per_turn() {
        let (_dir, path, t) = with_turns(3);
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 3);
        let (back, repair) = Transcript::read(&path).unwrap();
        assert_eq!(back.turns, t.turns);
        assert_eq!(repair, None);
    }

    #[test]
    fn torn_tail_is_cut_and_reported_then_appends_continue() {
        let (_dir, path, _) = with_turns(3);
        let full = fs::read(&path).unwrap();
        let line = encode_line(&Entry::Turn(turn(3))).unwrap();
        for cut in [1, line.len() / 2, line.len() - 1] {
            let mut bytes = full.clone();
            bytes.extend_from_slice(&line[..cut]);
            fs::write(&path, &bytes).unwrap();
            let (mut t, repair) = Transcript::read(&path).unwrap();
            assert_eq!(t.turns.len(), 3);
            let repair = repair.expect("a repair is reported");
            assert_eq!((repair.dropped_bytes, repair.kept_turns), (cut as u64, 3));
            assert_eq!(fs::read(&path).unwrap(), full, "the file is cut back");
            t.append(&path, Entry::Turn(turn(3))).unwrap();
            let (again, repair) = Transcript::read(&path).unwrap();
            assert_eq!((again.turns.len(), repair), (4, None));
            fs::write(&path, &full).unwrap();
        }
        // A crash that extended the file with zeros instead of the line's bytes.
        let mut bytes = full.clone();
        bytes.extend(std::iter::repeat_n(0u8, 40));
        fs::write(&path, &bytes).unwrap();
        let (t, repair) = Transcript::read(&path).unwrap();
        assert_eq!(
            (t.turns.len(), repair.map(|r| r.dropped_bytes)),
            (3, Some(40))
        );
    }

    #[test]
    fn damage_before_the_last_newline_is_an_error_naming_the_line() {
        let (_dir, path, _) = with_turns(3);
        let full = fs::read(&path).unwrap();
        let starts: Vec<usize> = std::iter::once(0)
            .chain(
                full.iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        // Flip a byte inside the content of each line in turn (the last one included: it is
        // complete, so it is damage, not a torn append).
        for (line, start) in starts.iter().take(3).enumerate() {
            let mut bytes = full.clone();
            let at = start + 40;
            bytes[at] ^= 0x01;
            fs::write(&path, &bytes).unwrap();
            match Transcript::read(&path) {
                Err(PoolError::CorruptTranscript {
                    line: l, path: p, ..
                }) => {
                    assert_eq!((l, p), (line + 1, path.clone()));
                }
                other => panic!("line {line}: {other:?}"),
            }
            assert_eq!(fs::read(&path).unwrap(), bytes, "nothing is dropped");
        }
        // A duplicated line, an empty line, a newer version.
        let mut dup = full[..starts[2]].to_vec();
        dup.extend_from_slice(&full[starts[1]..starts[2]]);
        let empty = [&full[..starts[1]], b"\n", &full[starts[1]..]].concat();
        for (bytes, want_line) in [(dup, 3), (empty, 2)] {
            fs::write(&path, &bytes).unwrap();
            assert!(
                matches!(Transcript::read(&path), Err(PoolError::CorruptTranscript { line, .. }) if line == want_line)
            );
        }
        let newer = String::from_utf8(full.clone()).unwrap().replacen(
            &format!("{{\"v\":{TRANSCRIPT_VERSION}"),
            &format!("{{\"v\":{}", TRANSCRIPT_VERSION + 1),
            1,
        );
        fs::write(&path, newer).unwrap();
        assert!(matches!(
            Transcript::read(&path),
            Err(PoolError::UnsupportedVersion { found, .. }) if found == TRANSCRIPT_VERSION + 1
        ));
    }

    #[test]
    fn an_append_overwrites_what_a_failed_append_left() {
        let (_dir, path, mut t) = with_turns(2);
        // What a write that failed half way (disk full) leaves behind.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":2,\"xxh3\":\"00").unwrap();
        drop(f);
        t.append(&path, Entry::Turn(turn(2))).unwrap();
        let (back, repair) = Transcript::read(&path).unwrap();
        assert_eq!((back.turns, repair), (t.turns, None));
    }

    #[test]
    fn missing_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = Transcript::read(&dir.path().join(TRANSCRIPT_FILE)).unwrap_err();
        assert!(matches!(err, PoolError::CorruptAgentFile { .. }), "{err}");
    }

    #[test]
    fn version_2_lines_read_without_instructions_or_usage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TRANSCRIPT_FILE);
        let mut old = turn(0);
        (old.instructions, old.usage) = (None, None);
        let line = String::from_utf8(encode_line(&Entry::Turn(old.clone())).unwrap()).unwrap();
        assert!(line.starts_with(&format!("{{\"v\":{TRANSCRIPT_VERSION},")));
        let v2 = line.replacen(&format!("{{\"v\":{TRANSCRIPT_VERSION},"), "{\"v\":2,", 1);
        fs::write(&path, v2).unwrap();
        let (t, repair) = Transcript::read(&path).unwrap();
        assert_eq!((t.turns, repair), (vec![old], None));
    }

    #[test]
    fn unknown_fields_and_other_spacing_are_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TRANSCRIPT_FILE);
        let mut body = serde_json::to_value(turn(0)).unwrap();
        body["tool_state"] = serde_json::json!({"open_files": ["a.rs"], "score": 0.5});
        body["input"][0]["name"] = "ignored too".into();
        let body = serde_json::to_string_pretty(&body)
            .unwrap()
            .replace('\n', " ");
        let line = |body: &str| {
            format!(
                r#"{{"v":4,"host":"b","xxh3":"{}","turn":{body}}}"#,
                checksum(body.as_bytes())
            )
        };
        fs::write(&path, line(&body) + "\n").unwrap();
        let (t, repair) = Transcript::read(&path).unwrap();
        assert_eq!((t.turns, repair), (vec![turn(0)], None));
        // The checksum covers those bytes: a changed one is damage.
        let damaged = line(&body).replace("a.rs", "b.rs");
        fs::write(&path, damaged + "\n").unwrap();
        assert!(matches!(
            Transcript::read(&path),
            Err(PoolError::CorruptTranscript { line: 1, .. })
        ));
    }

    #[test]
    fn version_1_lines_read_as_a_chain_of_user_turns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TRANSCRIPT_FILE);
        let mut bytes = Vec::new();
        for i in 0..2u64 {
            let old = TurnV1 {
                index: i,
                unix_ms: 7,
                user: format!("q{i}"),
                assistant: format!("a{i}"),
            };
            let body = serde_json::to_vec(&old).unwrap();
            let line = serde_json::json!({"v": 1, "xxh3": checksum(&body), "turn": old});
            bytes.extend(serde_json::to_vec(&line).unwrap());
            bytes.push(b'\n');
        }
        fs::write(&path, &bytes).unwrap();
        let (mut t, _) = Transcript::read(&path).unwrap();
        assert_eq!(t.turns[0].parent, Parent::System);
        assert_eq!(t.turns[1].parent, Parent::Turn(0));
        assert_eq!((t.turns[1].user(), t.turns[1].reply.as_str()), ("q1", "a1"));
        assert!(t.turns[1].reply_tokens.is_empty());
        // A version-2 turn appends after them, forking from the first.
        let mut fork = turn(2);
        fork.parent = Parent::Turn(0);
        t.append(&path, Entry::Turn(fork)).unwrap();
        let (back, _) = Transcript::read(&path).unwrap();
        assert_eq!(back.turns, t.turns);
        let (root, turns) = back.path(Parent::Turn(2));
        assert_eq!(root, Parent::System);
        assert_eq!(turns.iter().map(|t| t.index).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(back.children(Parent::Turn(0)).count(), 2);
    }

    #[test]
    fn deletions_are_lines_and_refer_to_earlier_turns() {
        let (_dir, path, mut t) = with_turns(3);
        t.append(&path, Entry::Deleted(1)).unwrap();
        let (back, _) = Transcript::read(&path).unwrap();
        assert_eq!(back.turns.len(), 3);
        assert!(back.live(1).is_none() && back.live(2).is_some() && back.live(3).is_none());
        assert_eq!(back.children(Parent::Turn(0)).count(), 0);
        // A deletion of a turn that was never written is damage.
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend(encode_line(&Entry::Deleted(9)).unwrap());
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Transcript::read(&path),
            Err(PoolError::CorruptTranscript { line: 5, .. })
        ));
    }

    #[test]
    fn a_turn_continuing_itself_or_a_later_turn_is_damage() {
        let (_dir, path, _) = with_turns(2);
        let mut bad = turn(2);
        bad.parent = Parent::Turn(2);
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend(encode_line(&Entry::Turn(bad)).unwrap());
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Transcript::read(&path),
            Err(PoolError::CorruptTranscript { line: 3, .. })
        ));
    }
}
