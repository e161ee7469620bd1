//! A read-only look at a pool directory, for tools that run while another process (a server)
//! holds the pool open: no lock is taken and nothing is written, repaired or collected.

use std::fs;
use std::path::{Path, PathBuf};

use kv_store::Store;
use kv_store::durable_fs::TMP_PREFIX;

use crate::error::{PoolError, Result, validate_id};
use crate::files::{self, AgentInfo};
use crate::pool::AgentSummary;
use crate::transcript::{self, TRANSCRIPT_FILE, Turn};

/// A pool directory read without opening the pool.
///
/// What it shows is what the files held when each was read: the pool that owns the directory
/// may be writing meanwhile (its writes are atomic renames and whole-line appends, so every
/// read sees a consistent file, at worst one turn behind).
#[derive(Debug)]
pub struct PoolView {
    root: PathBuf,
    store: Store,
}

impl PoolView {
    /// Reads the pool at `root`; [`PoolError::UnknownAgent`]-style errors name it.
    pub fn open(root: &Path) -> Result<PoolView> {
        let kv = root.join("kv");
        let store = Store::open(&kv).map_err(|source| PoolError::Store {
            path: kv,
            source: Box::new(source),
        })?;
        Ok(PoolView {
            root: root.to_owned(),
            store,
        })
    }

    /// The kv-store holding the agents' caches.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every agent, sorted by id (`hot` is always false: memory is the other process's).
    pub fn list(&self) -> Result<Vec<AgentSummary>> {
        let dir = self.root.join("agents");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(PoolError::io("list", &dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| PoolError::io("list", &dir, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with(TMP_PREFIX) || validate_id(&name).is_err() || !entry.path().is_dir()
            {
                continue;
            }
            let info = files::read_agent(&entry.path(), &name).map_err(|e| e.with_causes());
            out.push(AgentSummary {
                id: name,
                damage: info.as_ref().err().cloned(),
                info: info.ok(),
                hot: false,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Agent `id`'s `agent.json`.
    pub fn info(&self, id: &str) -> Result<AgentInfo> {
        validate_id(id)?;
        let dir = self.root.join("agents").join(id);
        if !dir.is_dir() {
            return Err(PoolError::UnknownAgent {
                id: id.to_owned(),
                root: self.root.clone(),
            });
        }
        files::read_agent(&dir, id)
    }

    /// Agent `id`'s turns, oldest first; a torn last line (a turn being written) is left out,
    /// not cut off.
    pub fn transcript(&self, id: &str) -> Result<Vec<Turn>> {
        self.info(id)?;
        let path = self.root.join("agents").join(id).join(TRANSCRIPT_FILE);
        let bytes = fs::read(&path).map_err(|e| PoolError::io("read", &path, e))?;
        Ok(transcript::parse(&path, &bytes)?.0)
    }
}
