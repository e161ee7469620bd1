//! `agent.json`, the one file that says an agent exists: its format, its checksum and its
//! parser. The durable writes of the pool's files (temporary name, fsync, rename, directory
//! fsync) are kv-store's [`kv_store::durable_fs`], shared with the store's own commits.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{PoolError, Result};

/// Version of `agent.json` written by this build, and the newest it reads. Version 2 checks
/// `agent`'s bytes as stored; version 1 (a checksum over serde_json's re-encoding) still
/// loads.
pub const AGENT_FILE_VERSION: u64 = 2;
const AGENT_FORMAT: &str = "agentkv.agent";
pub(crate) const AGENT_FILE: &str = "agent.json";

/// What an agent is, apart from its conversation: stored in `agents/<id>/agent.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's id (also its directory and cache name).
    pub id: String,
    /// A free-form label of what kind of agent it is ("researcher", "coder", ...).
    pub agent_type: String,
    /// The system prompt every conversation of this agent starts with.
    pub system_prompt: String,
    /// When it was created, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// For an agent created on a shared store, the change number of its creation there
    /// (its head's generation): each transcript line after it is the next one. Absent for an
    /// agent that lives in one pool's directory alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_generation: Option<u64>,
}

/// `agent.json`: `agent` is checksummed over its bytes exactly as they are stored, so a field
/// this build does not know is not damage (it is ignored; the file is never rewritten).
#[derive(Serialize, Deserialize)]
struct AgentEnvelope<'a> {
    format: String,
    version: u64,
    /// xxh3-64 of the bytes of `agent` as they appear in the file, 16 hex digits.
    checksum: String,
    #[serde(borrow)]
    agent: &'a RawValue,
}

/// The envelope as version 1 wrote it: `checksum` is the xxh3-64 of serde_json's compact
/// encoding of `agent`.
#[derive(Deserialize)]
struct AgentEnvelopeV1 {
    checksum: String,
    agent: AgentInfo,
}

pub(crate) fn checksum(bytes: &[u8]) -> String {
    format!("{:016x}", xxh3_64(bytes))
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn encode_agent(info: &AgentInfo) -> Result<Vec<u8>> {
    let encode_err = |e: serde_json::Error| PoolError::CorruptAgentFile {
        path: PathBuf::from(AGENT_FILE),
        detail: format!("cannot encode: {e}"),
    };
    let body = serde_json::value::to_raw_value(info).map_err(encode_err)?;
    let env = AgentEnvelope {
        format: AGENT_FORMAT.to_owned(),
        version: AGENT_FILE_VERSION,
        checksum: checksum(body.get().as_bytes()),
        agent: &body,
    };
    serde_json::to_vec(&env).map_err(encode_err)
}

/// Reads and checks `dir/agent.json`, which must describe agent `id`.
pub(crate) fn read_agent(dir: &Path, id: &str) -> Result<AgentInfo> {
    let path = dir.join(AGENT_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PoolError::CorruptAgentFile {
                path,
                detail: "the file is missing".into(),
            });
        }
        Err(e) => return Err(PoolError::io("read", path, e)),
    };
    parse_agent(&path, &bytes, id)
}

/// Parses and checks the bytes of an `agent.json` (`path` only names the file in errors),
/// which must describe agent `id`. This is the entry point of the parser tests.
pub(crate) fn parse_agent(path: &Path, bytes: &[u8], id: &str) -> Result<AgentInfo> {
    let bad = |detail: String| PoolError::CorruptAgentFile {
        path: path.to_owned(),
        detail,
    };
    // The format and version first, so a newer file says so instead of failing to parse.
    #[derive(Deserialize)]
    struct Head {
        format: Option<String>,
        version: Option<serde_json::Value>,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if head.format.as_deref() != Some(AGENT_FORMAT) {
        return Err(bad("not an agentkv agent file".into()));
    }
    let version = head
        .version
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("no version".into()))?;
    let agent: AgentInfo = match version {
        1 => {
            let env: AgentEnvelopeV1 =
                serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
            let body = serde_json::to_vec(&env.agent).map_err(|e| bad(e.to_string()))?;
            if checksum(&body) != env.checksum {
                return Err(bad("checksum mismatch".into()));
            }
            env.agent
        }
        AGENT_FILE_VERSION => {
            let env: AgentEnvelope =
                serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
            if checksum(env.agent.get().as_bytes()) != env.checksum {
                return Err(bad("checksum mismatch".into()));
            }
            serde_json::from_str(env.agent.get()).map_err(|e| bad(e.to_string()))?
        }
        _ => {
            return Err(PoolError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
                supported: AGENT_FILE_VERSION,
            });
        }
    };
    if agent.id != id {
        return Err(bad(format!(
            "it describes agent {:?}, not {id:?}",
            agent.id
        )));
    }
    Ok(agent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_store::durable_fs::write_new;

    fn info() -> AgentInfo {
        AgentInfo {
            id: "a".into(),
            agent_type: "t".into(),
            system_prompt: "be brief\n\"quoted\" ünïcode".into(),
            created_unix_ms: 17,
            shared_generation: None,
        }
    }

    #[test]
    fn agent_file_round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AGENT_FILE);
        let bytes = encode_agent(&info()).unwrap();
        write_new(&path, &bytes).unwrap();
        assert_eq!(read_agent(dir.path(), "a").unwrap(), info());
        assert!(matches!(
            read_agent(dir.path(), "b"),
            Err(PoolError::CorruptAgentFile { .. })
        ));

        let text = String::from_utf8(bytes).unwrap();
        for (damaged, want_version) in [
            (text.replace("be brief", "be BRIEF"), false),
            (text.replace("\"version\":2", "\"version\":9"), true),
            (text[..text.len() / 2].to_owned(), false),
            (String::new(), false),
        ] {
            fs::write(&path, damaged).unwrap();
            let err = read_agent(dir.path(), "a").unwrap_err();
            if want_version {
                assert!(
                    matches!(err, PoolError::UnsupportedVersion { found: 9, .. }),
                    "{err}"
                );
            } else {
                assert!(matches!(err, PoolError::CorruptAgentFile { .. }), "{err}");
            }
        }
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            read_agent(dir.path(), "a"),
            Err(PoolError::CorruptAgentFile { .. })
        ));
    }

    #[test]
    fn unknown_fields_and_other_spacing_are_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AGENT_FILE);
        let mut agent = serde_json::to_value(info()).unwrap();
        agent["tools"] = serde_json::json!([{"name": "search"}]);
        let body = serde_json::to_string_pretty(&agent).unwrap();
        let text = format!(
            r#"{{"format":"agentkv.agent","version":2,"owner":"x","checksum":"{}","agent":{body}}}"#,
            checksum(body.as_bytes())
        );
        write_new(&path, text.as_bytes()).unwrap();
        assert_eq!(read_agent(dir.path(), "a").unwrap(), info());
        fs::write(&path, text.replace("search", "fetch")).unwrap();
        assert!(matches!(
            read_agent(dir.path(), "a"),
            Err(PoolError::CorruptAgentFile { .. })
        ));
    }

    #[test]
    fn version_1_files_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AGENT_FILE);
        let compact = serde_json::to_vec(&info()).unwrap();
        let v1 = serde_json::json!({
            "format": "agentkv.agent",
            "version": 1,
            "checksum": checksum(&compact),
            "agent": info(),
        });
        write_new(&path, serde_json::to_string_pretty(&v1).unwrap().as_bytes()).unwrap();
        assert_eq!(read_agent(dir.path(), "a").unwrap(), info());
        let text = v1.to_string().replace("be brief", "be BRIEF");
        fs::write(&path, text).unwrap();
        assert!(matches!(
            read_agent(dir.path(), "a"),
            Err(PoolError::CorruptAgentFile { .. })
        ));
    }
}
