//! The pool: named agents on disk, a few of them hot (their KV cache in memory) under a count
//! limit and a byte budget, evicted least-recently-used first.
//!
//! Locks: the registry (id → agent) and the pool state (LRU, byte accounting, counters) are
//! each held only for a few instructions. Each agent has its own mutex, held for a whole
//! operation on it (a generation included), which is what pins a generating agent: eviction
//! only ever `try_lock`s a victim and skips it when busy. An agent's mutex may be held while
//! taking the registry or state lock, never the other way round, so nothing can deadlock.
//!
//! This file holds the state every operation shares, `open`, and the lookups and conversation
//! rendering they all use. The operations live in submodules, each using only those listed
//! before it: `config` and `report` (the public types), `cache` (an agent's cache against the
//! store), `memory` (the hot set and its budget), `shared` (agents on a store
//! shared with other hosts), `agents` (create, delete, list), `turns`
//! (answering and reading turns), `detached` (answering without an agent).

// Leaves first; each module uses only the ones above it (kept in separate groups so that
// rustfmt does not sort them).
mod config;
mod report;

mod cache;

mod memory;

mod shared;

mod agents;

mod turns;

mod detached;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};

use engine::Message;
use kv_extract::{KvCache, KvShape};
use kv_store::durable_fs::{self, TMP_PREFIX};
use kv_store::{CacheMeta, SegmentId, Store};
use lru::LruCache;

use crate::backend::Backend;
use crate::error::{PoolError, Result, validate_id};
use crate::files::{self, AgentInfo};
use crate::transcript::{Parent, TRANSCRIPT_FILE, Transcript, TranscriptRepair};

pub use config::{Continue, PoolConfig, SharedStore};
pub use report::{
    AgentSummary, Counters, CreateReport, HotAgent, LoadReport, PoolStats, Rebuild, RebuildEvent,
    RebuildReason, Reply, Reused, Timings,
};
pub use shared::SharedCheck;

/// One agent: immutable facts plus its mutable state behind its own mutex.
struct Slot {
    id: String,
    info: std::result::Result<AgentInfo, String>,
    state: Mutex<Agent>,
}

#[derive(Default)]
struct Agent {
    /// Read on first use.
    transcript: Option<Transcript>,
    /// `Some` while hot.
    cache: Option<KvCache>,
    /// The cache holds something its saved version does not.
    dirty: bool,
    /// Deleted while someone waited for this mutex.
    deleted: bool,
    /// A shared agent's cache chain as its newest change known here records it (`None`: not
    /// known since the pool opened). The store keeps every segment a live agent's changes
    /// name, so a commit pushes only the segments not in it.
    shared_chain: Option<Vec<SegmentId>>,
    /// Tokens of the system prompt [`AgentPool::create_agent`] computed, while the agent has
    /// stayed hot since without a turn: its first turn counts them as computed for it, not as
    /// reused.
    fresh_system: Option<usize>,
}

struct HotEntry {
    slot: Arc<Slot>,
    bytes: usize,
    tokens: usize,
    dirty: bool,
}

struct PoolState {
    /// Unbounded: the limits are enforced by [`AgentPool::enforce`], which can skip pinned
    /// agents; the `lru` crate's own capacity would evict blindly.
    hot: LruCache<String, HotEntry>,
    kv_bytes: usize,
    counters: Counters,
    rebuilds: VecDeque<RebuildEvent>,
}

#[derive(Default)]
struct Registry {
    agents: BTreeMap<String, Arc<Slot>>,
    /// Ids being created: taken, not yet usable.
    creating: BTreeSet<String>,
}

/// Many named agents over one backend; see the crate documentation.
pub struct AgentPool<B: Backend + ?Sized> {
    /// The cache of detached replies ([`AgentPool::respond_detached`]): one at a time, kept
    /// between them so that requests sharing a prefix share its K/V.
    scratch: Mutex<Option<KvCache>>,
    root: PathBuf,
    backend: Arc<B>,
    config: PoolConfig,
    meta: CacheMeta,
    shape: KvShape,
    store: Store,
    registry: Mutex<Registry>,
    /// Signalled whenever an id leaves [`Registry::creating`], for calls waiting to use it.
    created: Condvar,
    state: Mutex<PoolState>,
    /// Held (flock) for the pool's lifetime: one pool per directory.
    _lock: File,
    /// Cleared by [`AgentPool::abandon`].
    flush_on_drop: bool,
}

impl<B: Backend + ?Sized> std::fmt::Debug for AgentPool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPool")
            .field("root", &self.root)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Locks ignoring poison: every mutation of the pool leaves the state consistent at each step (a
/// cache's tokens always match its K/V, a turn is recorded only after its append), so a
/// panic elsewhere does not make it unusable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

impl<B: Backend + ?Sized> AgentPool<B> {
    /// The default pool directory: `$AGENTKV_HOME/pool` (see [`engine::agentkv_home`]).
    pub fn default_root() -> Option<PathBuf> {
        engine::agentkv_home().map(|h| h.join("pool"))
    }

    /// Opens (creating if needed) the pool at `root`, running agents on `backend`.
    ///
    /// Takes an exclusive lock on `root/pool.lock` for the pool's lifetime
    /// ([`PoolError::Locked`] if another pool holds it), removes litter of creations and
    /// deletions a crash interrupted, and registers every agent directory. Transcripts and
    /// caches are read when an agent is first used.
    pub fn open(root: &Path, backend: Arc<B>, config: PoolConfig) -> Result<AgentPool<B>> {
        if config.max_hot == 0 {
            return Err(PoolError::InvalidConfig {
                detail: "max_hot is 0: at least one agent must fit in memory".into(),
            });
        }
        if config.kv_budget_bytes == 0 {
            return Err(PoolError::InvalidConfig {
                detail: "kv_budget_bytes is 0".into(),
            });
        }
        let shape = backend.kv_shape();
        if !shape.supports(config.kv_dtype) {
            return Err(PoolError::InvalidConfig {
                detail: format!(
                    "kv dtype {} cannot hold this model's heads of width {}: use f16 or f32",
                    config.kv_dtype, shape.head_dim
                ),
            });
        }
        let agents_dir = root.join("agents");
        fs::create_dir_all(&agents_dir)
            .map_err(|e| PoolError::io("create directory", &agents_dir, e))?;
        let lock_path = root.join("pool.lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| PoolError::io("open", &lock_path, e))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(PoolError::Locked {
                    root: root.to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(PoolError::io("lock", &lock_path, e));
            }
        }
        let kv_root = root.join("kv");
        let store = Store::open(&kv_root).map_err(|source| PoolError::Store {
            path: kv_root.clone(),
            source: Box::new(source),
        })?;
        let mut registry = Registry::default();
        let entries =
            fs::read_dir(&agents_dir).map_err(|e| PoolError::io("list", &agents_dir, e))?;
        let mut litter = false;
        for entry in entries {
            let entry = entry.map_err(|e| PoolError::io("list", &agents_dir, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = entry.path();
            if name.starts_with(TMP_PREFIX) {
                // An interrupted create (never committed) or delete (already committed). Ids
                // cannot contain '.', so no agent is ever named like a temporary.
                fs::remove_dir_all(&path).map_err(|e| PoolError::io("remove", &path, e))?;
                litter = true;
                continue;
            }
            if validate_id(&name).is_err() || !path.is_dir() {
                continue;
            }
            let info = files::read_agent(&path, &name).map_err(|e| e.with_causes());
            registry.agents.insert(
                name.clone(),
                Arc::new(Slot {
                    id: name,
                    info,
                    state: Mutex::new(Agent::default()),
                }),
            );
        }
        if litter {
            durable_fs::sync_dir(&agents_dir).map_err(PoolError::fs)?;
        }
        // Temporary files of saves a crash interrupted, and segments no cache references any
        // more. Best effort: gc refuses while a manifest is unreadable, which a rebuild fixes.
        let _ = store.gc();
        Ok(AgentPool {
            scratch: Mutex::new(None),
            root: root.to_owned(),
            meta: backend.cache_meta(config.kv_dtype),
            shape,
            backend,
            config,
            store,
            registry: Mutex::new(registry),
            created: Condvar::new(),
            state: Mutex::new(PoolState {
                hot: LruCache::unbounded(),
                kv_bytes: 0,
                counters: Counters::default(),
                rebuilds: VecDeque::new(),
            }),
            _lock: lock_file,
            flush_on_drop: true,
        })
    }

    /// The pool's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The kv-store holding the agents' caches (`root/kv`), one cache per agent id.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The compatibility key of the caches this pool saves.
    pub fn cache_meta(&self) -> &CacheMeta {
        &self.meta
    }

    fn agent_dir(&self, id: &str) -> PathBuf {
        self.root.join("agents").join(id)
    }

    fn unknown(&self, id: &str) -> PoolError {
        PoolError::UnknownAgent {
            id: id.to_owned(),
            root: self.root.clone(),
        }
    }

    /// Agent `id`: one this pool knows, or one another host created on the shared store.
    fn slot(&self, id: &str) -> Result<Arc<Slot>> {
        validate_id(id)?;
        let known = lock(&self.registry).agents.get(id).cloned();
        match known {
            Some(slot) => Ok(slot),
            None => self.fetch_agent(id),
        }
    }

    /// Locks an agent, refusing one deleted while we waited and one whose `agent.json` is
    /// damaged. A shared agent is first brought up to date with the changes other hosts
    /// committed (refused as unknown if one of them deleted it).
    fn lock_agent<'s>(&self, slot: &'s Slot) -> Result<(MutexGuard<'s, Agent>, &'s AgentInfo)> {
        let mut guard = lock(&slot.state);
        if guard.deleted {
            return Err(self.unknown(&slot.id));
        }
        let info = slot
            .info
            .as_ref()
            .map_err(|detail| PoolError::CorruptAgentFile {
                path: self.agent_dir(&slot.id).join(files::AGENT_FILE),
                detail: detail.clone(),
            })?;
        if info.shared_generation.is_some() && !self.pull_locked(&slot.id, info, &mut guard)? {
            self.remove_local(&slot.id, &mut guard)?;
            return Err(self.unknown(&slot.id));
        }
        Ok((guard, info))
    }

    /// Reads the transcript if not yet read; returns the repair if one was made now.
    fn ensure_transcript(&self, id: &str, agent: &mut Agent) -> Result<Option<TranscriptRepair>> {
        if agent.transcript.is_some() {
            return Ok(None);
        }
        let (t, repair) = Transcript::read(&self.agent_dir(id).join(TRANSCRIPT_FILE))?;
        agent.transcript = Some(t);
        if repair.is_some() {
            lock(&self.state).counters.transcript_repairs += 1;
        }
        Ok(repair)
    }

    /// The messages of the conversation up to and including `end`, each reply carrying the
    /// tokens it was generated as, as a turn continuing it sees them: opening with
    /// `instructions` when given (the system prompt of that turn alone), else with the agent's
    /// system prompt when the conversation starts from it. Earlier turns' own instructions
    /// are theirs alone and do not appear.
    fn conversation(
        info: &AgentInfo,
        transcript: &Transcript,
        end: Parent,
        instructions: Option<&str>,
    ) -> Vec<Message> {
        let (root, turns) = transcript.path(end);
        let mut out = Vec::new();
        match instructions {
            Some(text) => out.push(Message::system(text.to_owned())),
            None if root == Parent::System => {
                out.push(Message::system(info.system_prompt.clone()));
            }
            None => {}
        }
        for t in turns {
            out.extend(t.input.iter().cloned());
            out.push(t.reply_message());
        }
        out
    }
}
