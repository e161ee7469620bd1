//! The one error type of agent-pool: everything creating, running, saving or loading an agent
//! can report.

use std::io;
use std::path::PathBuf;

/// What can go wrong in the pool.
///
/// Each message says what happened, to which agent or file, and what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// An agent id that cannot be used (it names a directory and a cache).
    #[error("invalid agent id {id:?}: {reason}; use 1 to 64 characters of [a-z0-9_-]")]
    InvalidId {
        /// The id as given.
        id: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// `create_agent` with an id that is already taken.
    #[error("agent {id:?} already exists in {root}: pick another id, or delete it first")]
    AlreadyExists {
        /// The id.
        id: String,
        /// The pool's root directory.
        root: PathBuf,
    },
    /// No agent has that id.
    #[error("no agent {id:?} in {root}: create it first (list() shows the agents there are)")]
    UnknownAgent {
        /// The id asked for.
        id: String,
        /// The pool's root directory.
        root: PathBuf,
    },
    /// A configuration the pool cannot run with.
    #[error("invalid pool configuration: {detail}")]
    InvalidConfig {
        /// What is wrong.
        detail: String,
    },
    /// Another pool (in this process or another) has the directory open.
    #[error("the agent pool in {root} is in use by another process or pool: close that one first")]
    Locked {
        /// The pool's root directory.
        root: PathBuf,
    },
    /// An I/O call on the pool's own files failed.
    #[error("could not {op} {path}")]
    Io {
        /// What was being done ("create", "append to", "fsync", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The disk (or quota) is full; nothing already committed was touched.
    #[error(
        "no space left while writing {path}: free some disk space and retry; \
         every turn returned before is intact"
    )]
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A complete line of a transcript fails its checksum or does not parse.
    ///
    /// Only a torn last line (no newline: a crash during its append) is repaired
    /// automatically; damage anywhere else is never guessed around.
    #[error(
        "transcript {path} is damaged at line {line}: {detail}; restore the file from a backup, \
         or delete that line and every line after it to keep the turns before it"
    )]
    CorruptTranscript {
        /// The transcript file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        detail: String,
    },
    /// An agent's `agent.json` is missing, unparsable or names another agent.
    #[error("agent file {path} is damaged: {detail}; restore it from a backup or delete the agent")]
    CorruptAgentFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A pool file written by a newer version of agentkv.
    #[error(
        "{path} uses pool format version {found}, this build reads up to {supported}: upgrade agentkv"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u64,
        /// The newest version this build reads.
        supported: u64,
    },
    /// The engine failed to tokenize, prefill or generate for an agent.
    #[error("engine failed for agent {id:?}")]
    Engine {
        /// The agent.
        id: String,
        /// What the engine said (boxed: it is large, and errors travel in every `Result`).
        #[source]
        source: Box<engine::EngineError>,
    },
    /// Saving or loading an agent's KV cache failed where the caller asked for it explicitly
    /// (`save_agent`, `evict`). The transcript is unaffected; the cache can always be rebuilt.
    #[error("kv cache of agent {id:?}")]
    Cache {
        /// The agent.
        id: String,
        /// What kv-extract / kv-store said.
        #[source]
        source: Box<kv_extract::Error>,
    },
    /// The cache store under the pool's root could not be opened.
    #[error("could not open the kv cache store in {path}")]
    Store {
        /// The store's directory.
        path: PathBuf,
        /// What kv-store said.
        #[source]
        source: Box<kv_store::Error>,
    },
    /// An agent's cache alone is larger than the whole memory budget.
    #[error(
        "the kv cache of agent {id:?} needs {bytes} bytes, more than the whole budget of {budget}: \
         raise kv_budget_bytes"
    )]
    OverBudget {
        /// The agent.
        id: String,
        /// Bytes its cache holds.
        bytes: usize,
        /// The configured budget.
        budget: usize,
    },
    /// A turn that does not exist in the agent's transcript, or was deleted.
    #[error(
        "agent {id:?} has no turn {index}: it was deleted or never written; continue from \
         another turn or start a new conversation"
    )]
    UnknownTurn {
        /// The agent.
        id: String,
        /// The turn asked for.
        index: u64,
    },
    /// A turn with nothing new to answer: every message given is already in the transcript
    /// with its reply.
    #[error(
        "nothing to answer for agent {id:?}: the conversation ends with a reply it already has; \
         add a user message"
    )]
    NoInput {
        /// The agent.
        id: String,
    },
    /// The shared store could not be used, so a change to a shared agent was not committed
    /// (a turn's reply, streamed or not, belongs to no turn). Nothing acknowledged is lost:
    /// the local copy holds every change committed before.
    #[error("agent {id:?}: the shared store failed while {what}")]
    Shared {
        /// The agent ("" for the whole store).
        id: String,
        /// What was being done ("committing the turn", "reading the agent"...).
        what: &'static str,
        /// What kv-remote said.
        #[source]
        source: Box<kv_remote::Error>,
    },
    /// Another host committed a change to a shared agent first: this host's change was not
    /// committed, and the agent here now holds the other host's.
    #[error(
        "agent {id:?} was changed by host {host:?} first (its change number {generation}), so \
         {what} failed and nothing of it was committed; this host now has that change: read \
         the agent again and retry on top of it"
    )]
    Conflict {
        /// The agent.
        id: String,
        /// What failed ("committing the turn"...).
        what: &'static str,
        /// The change number both hosts proposed.
        generation: u64,
        /// The host whose change won.
        host: String,
    },
    /// A change recorded on the shared store does not parse or does not follow the agent's
    /// history: the agent cannot be brought up to date from it.
    #[error(
        "agent {id:?}: change {generation} on the shared store is damaged ({detail}); the \
         local copy is left as it was; a host that holds the change can publish it again"
    )]
    SharedRecord {
        /// The agent.
        id: String,
        /// The change number.
        generation: u64,
        /// What is wrong.
        detail: String,
    },
}

/// agent-pool's result type.
pub type Result<T, E = PoolError> = std::result::Result<T, E>;

impl PoolError {
    /// This error's message followed by each of its causes, once each, joined by `": "` (as
    /// `anyhow` prints a chain with `{:#}`): one line for where the chain itself cannot travel,
    /// such as an HTTP error body or a listing.
    pub fn with_causes(&self) -> String {
        with_causes(self)
    }

    /// Wraps an I/O error, recognising a full disk.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> PoolError {
        let path = path.into();
        match source.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                PoolError::DiskFull { path, source }
            }
            _ => PoolError::Io { op, path, source },
        }
    }

    /// Wraps a failed [`kv_store::durable_fs`] call the same way as [`PoolError::io`]: its
    /// operation and path stay in the message, and a full disk is recognised. (Not a `From`
    /// impl, which would be public API.)
    pub(crate) fn fs(e: kv_store::durable_fs::IoError) -> PoolError {
        PoolError::io(e.op, e.path, e.source)
    }

    pub(crate) fn engine(id: &str, source: engine::EngineError) -> PoolError {
        PoolError::Engine {
            id: id.to_owned(),
            source: Box::new(source),
        }
    }
}

/// Checks an agent id: the rules of a kv-store cache name, which it also is.
pub(crate) fn validate_id(id: &str) -> Result<()> {
    match kv_store::validate_name(id) {
        Ok(()) => Ok(()),
        Err(kv_store::Error::InvalidName { reason, .. }) => Err(PoolError::InvalidId {
            id: id.to_owned(),
            reason,
        }),
        // validate_name reports nothing else; stay strict if that ever changes.
        Err(_) => Err(PoolError::InvalidId {
            id: id.to_owned(),
            reason: "it is not a valid name",
        }),
    }
}

/// `err` and every error in its source chain, joined by `: ` (for a one-line string: a report
/// field, an HTTP error body).
pub(crate) fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        let os = io::Error::from(io::ErrorKind::NotFound);
        let os_text = os.to_string();
        let err = PoolError::io("read", "/pool/agents/a/agent.json", os);
        assert_eq!(err.to_string(), "could not read /pool/agents/a/agent.json");
        assert_eq!(
            err.with_causes(),
            format!("could not read /pool/agents/a/agent.json: {os_text}")
        );
        let store = PoolError::Store {
            path: "/pool/kv".into(),
            source: Box::new(kv_store::Error::InvalidInput {
                detail: "the cause".into(),
            }),
        };
        assert_eq!(store.with_causes().matches("the cause").count(), 1);
    }
}
