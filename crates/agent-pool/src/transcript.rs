//! The transcript: an append-only file of JSON lines, one per turn (the user's message and the
//! reply, committed together), each carrying the checksum of its own content.
//!
//! Recovery: bytes after the last newline are a torn append (a crash before the turn was
//! acknowledged, since a turn is acknowledged only after its whole line, newline included, is
//! fsynced); they are cut off and reported. A complete line that fails its checksum, does not
//! parse or is out of sequence is damage, reported with its line number and never skipped.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{PoolError, Result};
use crate::files::checksum;

/// Version of transcript lines written by this build, and the newest it reads.
pub const TRANSCRIPT_VERSION: u64 = 1;
pub(crate) const TRANSCRIPT_FILE: &str = "transcript.jsonl";

/// One exchange of a conversation: what the user said and what the agent replied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// Position in the conversation, from 0.
    pub index: u64,
    /// When the reply was committed, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The user's message.
    pub user: String,
    /// The agent's reply.
    pub assistant: String,
}

/// One line of the file: `{"v":1,"xxh3":"<16 hex>","turn":{...}}`, where `xxh3` is the xxh3-64
/// of the compact JSON of `turn` as serde_json writes it.
#[derive(Serialize, Deserialize)]
struct Line {
    v: u64,
    xxh3: String,
    turn: Turn,
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
    /// Bytes of the file that hold verified lines; appends go exactly here.
    good_len: u64,
}

pub(crate) fn encode_line(turn: &Turn) -> Result<Vec<u8>> {
    let encode_err = |e: serde_json::Error| PoolError::Io {
        op: "encode a transcript line for",
        path: PathBuf::from(TRANSCRIPT_FILE),
        source: std::io::Error::other(e),
    };
    let body = serde_json::to_vec(turn).map_err(encode_err)?;
    let line = Line {
        v: TRANSCRIPT_VERSION,
        xxh3: checksum(&body),
        turn: turn.clone(),
    };
    // serde_json escapes control characters inside strings: the only newline is this one.
    let mut out = serde_json::to_vec(&line).map_err(encode_err)?;
    out.push(b'\n');
    Ok(out)
}

fn decode_line(path: &Path, number: usize, bytes: &[u8], expected_index: u64) -> Result<Turn> {
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
    let line: Line = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let body = serde_json::to_vec(&line.turn).map_err(|e| bad(e.to_string()))?;
    if checksum(&body) != line.xxh3 {
        return Err(bad("checksum mismatch".into()));
    }
    if line.turn.index != expected_index {
        return Err(bad(format!(
            "turn {} where turn {expected_index} was expected",
            line.turn.index
        )));
    }
    Ok(line.turn)
}

/// Parses a transcript's bytes (`path` only names the file in errors): the verified turns and
/// the length of the bytes holding them; whatever follows the last newline is a torn append
/// for the caller to cut off. This is the entry point of the parser tests.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<Turn>, usize)> {
    let good_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut turns = Vec::new();
    // The verified part ends with a newline; without it, every piece is one line.
    if let Some((_, content)) = bytes[..good_len].split_last() {
        for (i, line) in content.split(|&b| b == b'\n').enumerate() {
            turns.push(decode_line(path, i + 1, line, i as u64)?);
        }
    }
    Ok((turns, good_len))
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
        let (turns, good_len) = parse(path, &bytes)?;
        let mut transcript = Transcript {
            turns,
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

    /// Appends `turn` as one line in one write, fsynced before returning: when this returns
    /// `Ok`, the turn survives a crash. On failure the file is cut back to what it held (so a
    /// partial line never sits before a later turn) and the turn is not recorded.
    pub(crate) fn append(&mut self, path: &Path, turn: Turn) -> Result<()> {
        let line = encode_line(&turn)?;
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
                self.turns.push(turn);
                Ok(())
            }
            Err(e) => {
                let _ = f.set_len(self.good_len);
                Err(e)
            }
        }
    }
}

/// Creates an empty transcript file (fsynced; the caller fsyncs the directory).
pub(crate) fn create(path: &Path) -> Result<()> {
    let f = File::create_new(path).map_err(|e| PoolError::io("create", path, e))?;
    f.sync_all().map_err(|e| PoolError::io("fsync", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(i: u64) -> Turn {
        Turn {
            index: i,
            unix_ms: 1000 + i,
            user: format!("question {i}\nwith a newline, \"quotes\" and ünïcode"),
            assistant: format!("answer {i}\u{0}\t"),
        }
    }

    fn with_turns(n: u64) -> (tempfile::TempDir, PathBuf, Transcript) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TRANSCRIPT_FILE);
        create(&path).unwrap();
        let mut t = Transcript::default();
        for i in 0..n {
            t.append(&path, turn(i)).unwrap();
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
        let line = encode_line(&turn(3)).unwrap();
        for cut in [1, line.len() / 2, line.len() - 1] {
            let mut bytes = full.clone();
            bytes.extend_from_slice(&line[..cut]);
            fs::write(&path, &bytes).unwrap();
            let (mut t, repair) = Transcript::read(&path).unwrap();
            assert_eq!(t.turns.len(), 3);
            let repair = repair.expect("a repair is reported");
            assert_eq!((repair.dropped_bytes, repair.kept_turns), (cut as u64, 3));
            assert_eq!(fs::read(&path).unwrap(), full, "the file is cut back");
            t.append(&path, turn(3)).unwrap();
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
        let newer = String::from_utf8(full.clone())
            .unwrap()
            .replacen("{\"v\":1", "{\"v\":2", 1);
        fs::write(&path, newer).unwrap();
        assert!(matches!(
            Transcript::read(&path),
            Err(PoolError::UnsupportedVersion { found: 2, .. })
        ));
    }

    #[test]
    fn an_append_overwrites_what_a_failed_append_left() {
        let (_dir, path, mut t) = with_turns(2);
        // What a write that failed half way (disk full) leaves behind.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":1,\"xxh3\":\"00").unwrap();
        drop(f);
        t.append(&path, turn(2)).unwrap();
        let (back, repair) = Transcript::read(&path).unwrap();
        assert_eq!((back.turns, repair), (t.turns, None));
    }

    #[test]
    fn missing_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = Transcript::read(&dir.path().join(TRANSCRIPT_FILE)).unwrap_err();
        assert!(matches!(err, PoolError::CorruptAgentFile { .. }), "{err}");
    }
}
