//! `agent.json`, the one file that says an agent exists: its format, its checksum and its
//! parser. The durable writes of the pool's files (temporary name, fsync, rename, directory
//! fsync) are kv-store's [`kv_store::durable_fs`], shared with the store's own commits.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{PoolError, Result};

/// Version of `agent.json` written by this build, and the newest it reads.
pub const AGENT_FILE_VERSION: u64 = 1;
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
}

#[derive(Serialize, Deserialize)]
struct AgentEnvelope {
    format: String,
    version: u64,
    /// xxh3-64 of the compact JSON of `agent`, 16 hex digits.
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
    let body = serde_json::to_vec(info).map_err(encode_err)?;
    let env = AgentEnvelope {
        format: AGENT_FORMAT.to_owned(),
        version: AGENT_FILE_VERSION,
        checksum: checksum(&body),
        agent: info.clone(),
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
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(AGENT_FORMAT) {
        return Err(bad("not an agentkv agent file".into()));
    }
    let version = value
        .get("version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("no version".into()))?;
    if version != AGENT_FILE_VERSION {
        return Err(PoolError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: AGENT_FILE_VERSION,
        });
    }
    let env: AgentEnvelope = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let body = serde_json::to_vec(&env.agent).map_err(|e| bad(e.to_string()))?;
    if checksum(&body) != env.checksum {
        return Err(bad("checksum mismatch".into()));
    }
    if env.agent.id != id {
        return Err(bad(format!(
            "it describes agent {:?}, not {id:?}",
            env.agent.id
        )));
    }
    Ok(env.agent)
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
            (text.replace("\"version\":1", "\"version\":9"), true),
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
}
