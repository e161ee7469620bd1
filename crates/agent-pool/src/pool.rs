//! The pool: named agents on disk, a few of them hot (their KV cache in memory) under a count
//! limit and a byte budget, evicted least-recently-used first.
//!
//! Locks: the registry (id → agent) and the pool state (LRU, byte accounting, counters) are
//! each held only for a few instructions. Each agent has its own mutex, held for a whole
//! operation on it (a generation included), which is what pins a generating agent: eviction
//! only ever `try_lock`s a victim and skips it when busy. An agent's mutex may be held while
//! taking the registry or state lock, never the other way round, so nothing can deadlock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use engine::chat::{Message, Role};
use engine::{GenerateOptions, StopReason};
use kv_extract::{KvCache, KvShape};
use kv_store::durable_fs::{self, TMP_PREFIX};
use kv_store::{CacheMeta, KvDtype, SaveReport, SegmentId, Store};
use lru::LruCache;

use crate::backend::Backend;
use crate::error::{PoolError, Result, validate_id};
use crate::files::{self, AgentInfo};
use crate::transcript::{
    self, Entry, Parent, TRANSCRIPT_FILE, Transcript, TranscriptRepair, Turn, Usage,
};

/// How many rebuilds [`PoolStats::recent_rebuilds`] remembers.
const REBUILD_LOG_LEN: usize = 32;

/// Limits and choices of a pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Most agents whose cache is in memory at once (default 3).
    pub max_hot: usize,
    /// Most bytes of KV caches in memory at once, counted exactly as
    /// [`KvCache::bytes_allocated`] (default 1 GiB).
    pub kv_budget_bytes: usize,
    /// Element type of caches on disk (default f16; f32 makes every reload bit-exact).
    pub kv_dtype: KvDtype,
    /// Save the cache after every turn instead of at eviction, `save_agent`, `flush` and drop
    /// (default false: the transcript makes turns durable either way).
    pub save_every_turn: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_hot: 3,
            kv_budget_bytes: 1 << 30,
            kv_dtype: KvDtype::F16,
            save_every_turn: false,
        }
    }
}

/// Why a cache had to be computed again from the transcript.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RebuildReason {
    /// No cache was saved (never saved, or the process died before the first save).
    Missing,
    /// The saved cache is damaged (checksum, structure, missing segment); its damaged
    /// segments were removed so that the rebuilt cache is written anew.
    Damaged,
    /// The saved cache was made by another model, tokenizer, template or KV dtype.
    OtherModel,
    /// The saved cache could not be read (permissions, a newer format version).
    Unreadable,
}

/// A cache computed again from the transcript, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rebuild {
    /// The class of problem.
    pub reason: RebuildReason,
    /// What kv-store said about the saved cache.
    pub detail: String,
    /// Tokens of the conversation the cache now holds.
    pub tokens: usize,
}

/// What making an agent hot did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// The cache was already in memory.
    pub already_hot: bool,
    /// The cache was read from disk.
    pub resumed_from_disk: bool,
    /// The cache was computed from the transcript instead, and why.
    pub rebuilt: Option<Rebuild>,
    /// A torn last transcript line was cut off while reading the transcript.
    pub transcript_repair: Option<TranscriptRepair>,
    /// Tokens in the cache.
    pub tokens: usize,
    /// Bytes the cache holds in memory.
    pub bytes: usize,
    /// The cache was read into the memory of an agent evicted to make room for it (already
    /// touched memory: no page faults), not into new buffers.
    pub reused_memory: bool,
    /// Time taken.
    pub elapsed: Duration,
}

/// What [`AgentPool::create_agent`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateReport {
    /// Tokens of the rendered system message, the cache's first segment.
    pub system_tokens: usize,
    /// The system prompt's K/V came from a segment already on disk (another agent's).
    pub adopted: bool,
    /// The cache was saved (false: the save failed and will be retried at eviction).
    pub cache_saved: bool,
}

/// Where the time of a [`Reply`] went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    /// Making the agent hot (reading the transcript, loading or rebuilding the cache).
    pub load: Duration,
    /// Bringing the cache up to the prompt.
    pub prefill: Duration,
    /// Generating.
    pub decode: Duration,
    /// Appending and fsyncing the turn to the transcript.
    pub commit: Duration,
}

/// Where a new turn continues an agent's conversation, and what the messages given with it
/// are. With `Head` and `At`, a leading system message is the turn's instructions: the system
/// prompt of that turn alone (recorded as [`Turn::instructions`]), opening its conversation in
/// place of the agent's; later turns do not see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Continue {
    /// After the newest turn; the messages are the new input (the CLI's conversation).
    Head,
    /// After this point; the messages are the new input (a Responses
    /// `previous_response_id`, or [`Parent::System`] for a new conversation).
    At(Parent),
    /// The messages are the whole conversation, as a Chat Completions client resends it:
    /// the longest path of the transcript's tree whose messages and replies they start with
    /// is continued with the rest. When they leave the newest path, the conversation forks
    /// there; the cache keeps the common token prefix and computes only the rest.
    Match,
}

/// The prompt tokens a detached reply reuses instead of computing
/// ([`AgentPool::respond_detached`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reused {
    /// How many.
    pub tokens: usize,
    /// Read from a segment on disk (a saved system prompt), not copied from memory.
    pub from_disk: bool,
}

/// The result of one turn.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The reply text (durable in the transcript).
    pub text: String,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Logits of the first generated position: what exactness tests compare.
    pub first_logits: Vec<f32>,
    /// Index of this turn in the agent's transcript (`None` for a detached reply, which is
    /// written nowhere).
    pub turn: Option<u64>,
    /// The point of the conversation the turn continued.
    pub parent: Parent,
    /// How many of the messages given were already in the transcript (with
    /// [`Continue::Match`]; 0 otherwise).
    pub matched_messages: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V the cache already held, less the system prompt
    /// [`AgentPool::create_agent`] computed when this is the agent's first turn since: that was
    /// computed for this conversation, not reused from earlier work (its time is the
    /// `create_agent` call's, not in [`Timings::prefill`]).
    pub reused_tokens: usize,
    /// Why generation stopped.
    pub stop: StopReason,
    /// Where the time went.
    pub timings: Timings,
    /// The agent was cold and its cache was read from disk for this turn.
    pub resumed_from_disk: bool,
    /// The agent was cold and its cache was computed from the transcript, and why.
    pub rebuilt: Option<Rebuild>,
    /// A torn last transcript line was cut off when the transcript was first read.
    pub transcript_repair: Option<TranscriptRepair>,
}

/// One hot agent in [`PoolStats`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotAgent {
    /// The agent.
    pub id: String,
    /// Bytes its cache holds ([`KvCache::bytes_allocated`]).
    pub bytes: usize,
    /// Tokens in its cache.
    pub tokens: usize,
    /// Changed since last saved.
    pub dirty: bool,
}

/// Totals since the pool was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Caches read from disk.
    pub loads: u64,
    /// Caches computed again from a transcript.
    pub rebuilds: u64,
    /// New agents that started from a system-prompt segment already on disk.
    pub adoptions: u64,
    /// Caches dropped from memory to make room (or on request).
    pub evictions: u64,
    /// Caches saved.
    pub saves: u64,
    /// Saves that failed (the cache is still rebuildable from the transcript).
    pub save_errors: u64,
    /// Torn transcript tails cut off.
    pub transcript_repairs: u64,
    /// Turns committed.
    pub turns: u64,
}

/// A rebuild, for [`PoolStats::recent_rebuilds`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildEvent {
    /// The agent.
    pub id: String,
    /// What happened.
    pub rebuild: Rebuild,
}

/// Memory and activity of a pool.
#[derive(Clone, Debug)]
pub struct PoolStats {
    /// Hot agents, most recently used first.
    pub hot: Vec<HotAgent>,
    /// Bytes of all hot caches: the sum of `hot[..].bytes`.
    pub kv_bytes: usize,
    /// The configured budget for `kv_bytes`.
    pub kv_budget_bytes: usize,
    /// The configured most hot agents.
    pub max_hot: usize,
    /// Bytes of the model's weights.
    pub weight_bytes: usize,
    /// Resident memory of the whole process (Linux; `None` elsewhere).
    pub rss_bytes: Option<u64>,
    /// Agents in the pool.
    pub agents: usize,
    /// Totals since open.
    pub counters: Counters,
    /// The latest rebuilds, oldest first (at most 32).
    pub recent_rebuilds: Vec<RebuildEvent>,
}

/// An agent in [`AgentPool::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSummary {
    /// The agent's id.
    pub id: String,
    /// Its `agent.json`, or `None` when that file is damaged.
    pub info: Option<AgentInfo>,
    /// What is wrong with `agent.json`, when it is damaged.
    pub damage: Option<String>,
    /// Its cache is in memory.
    pub hot: bool,
}

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

/// Locks ignoring poison: every mutation below leaves the state consistent at each step (a
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

fn classify(e: &kv_extract::Error) -> RebuildReason {
    use kv_store::Error as S;
    match e {
        kv_extract::Error::Store(S::NotFound { .. }) => RebuildReason::Missing,
        kv_extract::Error::Store(S::FingerprintMismatch { .. })
        | kv_extract::Error::ShapeMismatch { .. }
        | kv_extract::Error::UnsupportedDtype { .. } => RebuildReason::OtherModel,
        kv_extract::Error::Store(
            S::ChecksumMismatch { .. }
            | S::BadMetadata { .. }
            | S::BadSafetensors { .. }
            | S::SegmentMissing { .. }
            | S::BrokenChain { .. },
        ) => RebuildReason::Damaged,
        _ => RebuildReason::Unreadable,
    }
}

/// Resident set size of this process, from `/proc/self/status` (Linux only).
fn rss_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl<B: Backend + ?Sized> AgentPool<B> {
    /// The default pool directory: `$AGENTKV_HOME/pool` (see [`engine::runtime::agentkv_home`]).
    pub fn default_root() -> Option<PathBuf> {
        engine::runtime::agentkv_home().map(|h| h.join("pool"))
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
            let info = files::read_agent(&path, &name).map_err(|e| e.to_string());
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
            shape: backend.kv_shape(),
            backend,
            config,
            store,
            registry: Mutex::new(registry),
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

    fn slot(&self, id: &str) -> Result<Arc<Slot>> {
        validate_id(id)?;
        lock(&self.registry)
            .agents
            .get(id)
            .cloned()
            .ok_or_else(|| self.unknown(id))
    }

    /// Locks an agent, refusing one deleted while we waited and one whose `agent.json` is
    /// damaged.
    fn lock_agent<'s>(&self, slot: &'s Slot) -> Result<(MutexGuard<'s, Agent>, &'s AgentInfo)> {
        let guard = lock(&slot.state);
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

    /// Removes a leading system message from a turn's `input`: that turn's instructions, unless
    /// they are the agent's system prompt the conversation opens with anyway.
    fn take_instructions(
        info: &AgentInfo,
        transcript: &Transcript,
        parent: Parent,
        input: &mut Vec<Message>,
    ) -> Option<String> {
        if input.first().is_none_or(|m| m.role != Role::System) {
            return None;
        }
        let text = input.remove(0).content;
        let opens_with_it =
            transcript.path(parent).0 == Parent::System && text == info.system_prompt;
        (!opens_with_it).then_some(text)
    }

    /// The deepest point of the transcript's tree whose conversation `messages` start with,
    /// and how many messages that covers. Among several matching turns the newest wins.
    fn match_messages(
        info: &AgentInfo,
        transcript: &Transcript,
        messages: &[Message],
    ) -> (Parent, usize) {
        let same = |a: &Message, b: &Message| a.role == b.role && a.content == b.content;
        let (mut at, mut used) = match messages.first() {
            Some(m) if m.role == Role::System && m.content == info.system_prompt => {
                (Parent::System, 1)
            }
            _ => (Parent::Bare, 0),
        };
        'walk: loop {
            let rest = &messages[used..];
            for child in transcript.children(at) {
                let n = child.input.len();
                let matches = rest.len() > n
                    && rest.iter().zip(&child.input).all(|(a, b)| same(a, b))
                    && rest[n].role == Role::Assistant
                    && rest[n].content == child.reply;
                if matches {
                    at = Parent::Turn(child.index);
                    used += n + 1;
                    continue 'walk;
                }
            }
            return (at, used);
        }
    }

    /// Records (or updates) a hot agent's bytes, marking it most recently used.
    fn record(&self, slot: &Arc<Slot>, agent: &Agent) {
        let Some(cache) = &agent.cache else { return };
        let (bytes, tokens, dirty) = (cache.bytes_allocated(), cache.len(), agent.dirty);
        let mut st = lock(&self.state);
        let old = st.hot.put(
            slot.id.clone(),
            HotEntry {
                slot: Arc::clone(slot),
                bytes,
                tokens,
                dirty,
            },
        );
        st.kv_bytes = st.kv_bytes - old.map_or(0, |o| o.bytes) + bytes;
    }

    fn unrecord(&self, id: &str) {
        let mut st = lock(&self.state);
        if let Some(old) = st.hot.pop(id) {
            st.kv_bytes -= old.bytes;
        }
    }

    /// Saves a hot agent's cache if it changed, counting the outcome.
    fn save_locked(&self, id: &str, agent: &mut Agent) -> Result<Option<SaveReport>> {
        let Some(cache) = agent.cache.as_ref().filter(|_| agent.dirty) else {
            return Ok(None);
        };
        let result = cache.save(&self.store, id, &self.meta);
        let mut st = lock(&self.state);
        match result {
            Ok(report) => {
                st.counters.saves += 1;
                drop(st);
                agent.dirty = false;
                Ok(Some(report))
            }
            Err(source) => {
                st.counters.save_errors += 1;
                Err(PoolError::Cache {
                    id: id.to_owned(),
                    source: Box::new(source),
                })
            }
        }
    }

    /// Drops a hot agent's cache from memory, saving it first if it changed. With `force`, a
    /// failed save is counted and the cache dropped anyway (the transcript can rebuild it);
    /// without, the error is returned and the cache stays.
    fn evict_locked(&self, slot: &Arc<Slot>, agent: &mut Agent, force: bool) -> Result<bool> {
        Ok(self.evict_take(slot, agent, force)?.is_some())
    }

    /// [`AgentPool::evict_locked`], handing back the evicted cache (its memory can be reused).
    fn evict_take(
        &self,
        slot: &Arc<Slot>,
        agent: &mut Agent,
        force: bool,
    ) -> Result<Option<KvCache>> {
        if agent.cache.is_none() {
            return Ok(None);
        }
        match self.save_locked(&slot.id, agent) {
            Ok(_) => {}
            Err(_) if force => {}
            Err(e) => return Err(e),
        }
        let cache = agent.cache.take();
        agent.fresh_system = None;
        agent.dirty = false;
        self.unrecord(&slot.id);
        lock(&self.state).counters.evictions += 1;
        Ok(cache)
    }

    /// When the pool is at `max_hot`, so that making `id` hot will evict the least recently
    /// used agent anyway, evicts it now and returns its cache, whose memory the load can reuse:
    /// new memory costs a page fault per 4 KiB on first touch, more than reading the cache.
    /// Pinned agents are skipped, as [`AgentPool::enforce`] skips them.
    fn evict_for(&self, id: &str) -> Option<KvCache> {
        let candidates: Vec<Arc<Slot>> = {
            let st = lock(&self.state);
            if st.hot.len() < self.config.max_hot {
                return None;
            }
            st.hot
                .iter()
                .rev()
                .filter(|(k, _)| k.as_str() != id)
                .map(|(_, e)| Arc::clone(&e.slot))
                .collect()
        };
        candidates.iter().find_map(|slot| {
            let mut agent = try_lock(&slot.state)?;
            self.evict_take(slot, &mut agent, true).ok().flatten()
        })
    }

    /// Evicts least-recently-used agents until the hot count and bytes are within limits,
    /// skipping any agent whose mutex is held (it is generating, or being worked on: pinned).
    /// When only pinned agents remain the pool stays over its limits until they finish; the
    /// call that finishes enforces them again.
    fn enforce(&self) {
        loop {
            let candidates: Vec<Arc<Slot>> = {
                let st = lock(&self.state);
                if st.hot.len() <= self.config.max_hot && st.kv_bytes <= self.config.kv_budget_bytes
                {
                    return;
                }
                st.hot
                    .iter()
                    .rev()
                    .map(|(_, e)| Arc::clone(&e.slot))
                    .collect()
            };
            let evicted = candidates.iter().any(|slot| {
                try_lock(&slot.state).is_some_and(|mut agent| {
                    matches!(self.evict_locked(slot, &mut agent, true), Ok(true))
                })
            });
            if !evicted {
                return;
            }
        }
    }

    /// The rendered system message, if it is a token prefix of every conversation the agent
    /// can have (the chat template starts with it), so it can be the cache's first segment.
    fn system_prefix(&self, id: &str, info: &AgentInfo) -> Result<Option<Vec<u32>>> {
        let system = [Message::system(info.system_prompt.clone())];
        let sys = self
            .backend
            .chat_tokens(&system, false)
            .map_err(|e| PoolError::engine(id, e))?;
        let probe = [system[0].clone(), Message::user("x")];
        let full = self
            .backend
            .chat_tokens(&probe, true)
            .map_err(|e| PoolError::engine(id, e))?;
        Ok((!sys.is_empty() && full.starts_with(&sys)).then_some(sys))
    }

    /// A cache holding the system prefix: adopted from the segment another agent saved for
    /// the same system prompt if there is one (then `id`'s manifest already points at it),
    /// else computed. Returns the cache, the prefix length and whether it was adopted.
    fn start_cache(&self, id: &str, info: &AgentInfo) -> Result<(KvCache, usize, bool)> {
        let mut cache = KvCache::new(self.shape);
        let Some(sys) = self.system_prefix(id, info)? else {
            return Ok((cache, 0, false));
        };
        let seg = SegmentId::compute(&self.meta, None, &sys);
        if self.store.segment_path(&seg).exists() {
            let adopted = self
                .store
                .adopt(id, &self.meta, std::slice::from_ref(&seg))
                .map_err(kv_extract::Error::from)
                .and_then(|loaded| KvCache::import(&loaded, &self.meta, self.shape));
            match adopted {
                Ok(c) if c.tokens() == sys.as_slice() => return Ok((c, sys.len(), true)),
                Ok(_) => {}
                Err(e) => {
                    if classify(&e) == RebuildReason::Damaged {
                        // Best effort: a damaged file left in place would be deduplicated onto.
                        let _ = self
                            .store
                            .remove_damaged_segments(std::slice::from_ref(&seg));
                    }
                }
            }
        }
        self.backend
            .sync(&mut cache, &sys)
            .map_err(|e| PoolError::engine(id, e))?;
        Ok((cache, sys.len(), false))
    }

    /// Loads the agent's cache from disk (into `spare`'s memory if given) or, failing that,
    /// rebuilds it from the transcript.
    fn load_or_rebuild(
        &self,
        id: &str,
        info: &AgentInfo,
        transcript: &Transcript,
        spare: Option<KvCache>,
    ) -> Result<(KvCache, Option<Rebuild>)> {
        let loaded = match spare {
            Some(mut cache) => cache.load_into(&self.store, id, &self.meta).map(|()| cache),
            None => KvCache::load(&self.store, id, &self.meta, self.shape),
        };
        let err = match loaded {
            Ok(cache) => return Ok((cache, None)),
            Err(e) => e,
        };
        let reason = classify(&err);
        if reason == RebuildReason::Damaged
            && let Ok(Some(m)) = self.store.manifest(id)
        {
            let ids: Vec<SegmentId> = m.segments.into_iter().map(|s| s.id).collect();
            // Best effort: if this fails the save after the rebuild may keep a damaged file,
            // and the next load rebuilds again; nothing is lost.
            let _ = self.store.remove_damaged_segments(&ids);
        }
        let tokens = self
            .backend
            .chat_tokens(
                &Self::conversation(info, transcript, transcript.head(), None),
                false,
            )
            .map_err(|e| PoolError::engine(id, e))?;
        let (mut cache, _, _) = self.start_cache(id, info)?;
        self.backend
            .sync(&mut cache, &tokens)
            .map_err(|e| PoolError::engine(id, e))?;
        Ok((
            cache,
            Some(Rebuild {
                reason,
                detail: err.to_string(),
                tokens: tokens.len(),
            }),
        ))
    }

    /// Makes the locked agent hot (does not enforce the limits).
    fn activate(
        &self,
        slot: &Arc<Slot>,
        info: &AgentInfo,
        agent: &mut Agent,
    ) -> Result<LoadReport> {
        let started = Instant::now();
        let transcript_repair = self.ensure_transcript(&slot.id, agent)?;
        let mut report = LoadReport {
            already_hot: agent.cache.is_some(),
            resumed_from_disk: false,
            rebuilt: None,
            transcript_repair,
            tokens: 0,
            bytes: 0,
            reused_memory: false,
            elapsed: Duration::ZERO,
        };
        if agent.cache.is_none() {
            let empty = Transcript::default();
            let transcript = agent.transcript.as_ref().unwrap_or(&empty);
            let spare = self.evict_for(&slot.id);
            let had_spare = spare.is_some();
            let (cache, rebuilt) = self.load_or_rebuild(&slot.id, info, transcript, spare)?;
            report.reused_memory = had_spare && rebuilt.is_none();
            agent.dirty = rebuilt.is_some();
            agent.cache = Some(cache);
            let mut st = lock(&self.state);
            match &rebuilt {
                None => st.counters.loads += 1,
                Some(r) => {
                    st.counters.rebuilds += 1;
                    if st.rebuilds.len() == REBUILD_LOG_LEN {
                        st.rebuilds.pop_front();
                    }
                    st.rebuilds.push_back(RebuildEvent {
                        id: slot.id.clone(),
                        rebuild: r.clone(),
                    });
                }
            }
            report.resumed_from_disk = rebuilt.is_none();
            report.rebuilt = rebuilt;
        }
        self.record(slot, agent);
        if let Some(c) = &agent.cache {
            report.tokens = c.len();
            report.bytes = c.bytes_allocated();
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Creates agent `id` with a type label and a system prompt, durably, and makes it hot.
    ///
    /// The rendered system message becomes the first segment of the agent's cache, saved at
    /// once: agents created later with the same system prompt (under the same model and
    /// dtype) find it on disk and start from it instead of computing it
    /// ([`CreateReport::adopted`]). The agent exists once its directory is renamed into
    /// place; a crash before that leaves nothing (litter removed at the next open).
    pub fn create_agent(
        &self,
        id: &str,
        agent_type: &str,
        system_prompt: &str,
    ) -> Result<CreateReport> {
        validate_id(id)?;
        {
            let mut reg = lock(&self.registry);
            if reg.agents.contains_key(id)
                || reg.creating.contains(id)
                || self.agent_dir(id).exists()
            {
                return Err(PoolError::AlreadyExists {
                    id: id.to_owned(),
                    root: self.root.clone(),
                });
            }
            reg.creating.insert(id.to_owned());
        }
        let result = self.create_reserved(id, agent_type, system_prompt);
        let mut reg = lock(&self.registry);
        reg.creating.remove(id);
        let (slot, report) = result?;
        reg.agents.insert(id.to_owned(), Arc::clone(&slot));
        drop(reg);
        {
            let agent = lock(&slot.state);
            self.record(&slot, &agent);
        }
        self.enforce();
        Ok(report)
    }

    fn create_reserved(
        &self,
        id: &str,
        agent_type: &str,
        system_prompt: &str,
    ) -> Result<(Arc<Slot>, CreateReport)> {
        let info = AgentInfo {
            id: id.to_owned(),
            agent_type: agent_type.to_owned(),
            system_prompt: system_prompt.to_owned(),
            created_unix_ms: files::now_unix_ms(),
        };
        // Compute first: an engine failure must not leave a half-made agent behind.
        let (mut cache, system_tokens, adopted) = self.start_cache(id, &info)?;
        if let Err(e) = self.write_agent_dir(&info) {
            if adopted {
                // The adoption wrote a manifest for an agent that does not exist.
                let _ = self.store.delete(id);
            }
            return Err(e);
        }
        let mut cache_saved = adopted;
        if !adopted && !cache.is_empty() {
            match cache.save(&self.store, id, &self.meta) {
                Ok(_) => {
                    cache_saved = true;
                    if self.meta.dtype != KvDtype::F32 {
                        // Hold exactly the bits other agents will adopt, so that every agent
                        // with this system prompt starts from the same values.
                        if let Ok(c) = KvCache::load(&self.store, id, &self.meta, self.shape) {
                            cache = c;
                        }
                    }
                }
                Err(_) => lock(&self.state).counters.save_errors += 1,
            }
        }
        {
            let mut st = lock(&self.state);
            if cache_saved && !adopted {
                st.counters.saves += 1;
            }
            if adopted {
                st.counters.adoptions += 1;
            }
        }
        let agent = Agent {
            transcript: Some(Transcript::default()),
            dirty: !cache_saved,
            cache: Some(cache),
            deleted: false,
            fresh_system: (!adopted).then_some(system_tokens),
        };
        let slot = Arc::new(Slot {
            id: id.to_owned(),
            info: Ok(info),
            state: Mutex::new(agent),
        });
        Ok((
            slot,
            CreateReport {
                system_tokens,
                adopted,
                cache_saved,
            },
        ))
    }

    /// Writes `agents/<id>/` under a temporary name and renames it into place.
    fn write_agent_dir(&self, info: &AgentInfo) -> Result<()> {
        let agents = self.root.join("agents");
        let tmp = durable_fs::temp_path(&agents, &format!("create-{}", info.id));
        let result = (|| {
            fs::create_dir(&tmp).map_err(|e| PoolError::io("create directory", &tmp, e))?;
            let agent_file = tmp.join(files::AGENT_FILE);
            durable_fs::write_new(&agent_file, &files::encode_agent(info)?)
                .map_err(PoolError::fs)?;
            transcript::create(&tmp.join(TRANSCRIPT_FILE))?;
            durable_fs::sync_dir(&tmp).map_err(PoolError::fs)?;
            let dest = self.agent_dir(&info.id);
            fs::rename(&tmp, &dest).map_err(|e| PoolError::io("rename into place", &dest, e))?;
            durable_fs::sync_dir(&agents)
                .map_err(PoolError::fs)
                .inspect_err(|_| {
                    // Not durable, so not created: undo, so memory and disk agree.
                    let _ = fs::rename(&dest, &tmp);
                })
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Runs one turn of agent `id`: `user_input` is answered in the context of the agent's
    /// system prompt and its newest conversation, streaming text to `on_text`.
    ///
    /// A cold agent is made hot first (its cache loaded, or rebuilt from the transcript:
    /// see [`Reply::rebuilt`]). When this returns `Ok`, the user's message and the reply are
    /// fsynced to the transcript as one line; the cache save may be deferred. Text streamed
    /// to `on_text` before an `Err` belongs to no turn. The agent is pinned (never evicted)
    /// while this runs; calls on one agent are serialized, calls on different agents are not.
    pub fn generate(
        &self,
        id: &str,
        user_input: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        self.respond(
            id,
            Continue::Head,
            vec![Message::user(user_input)],
            options,
            on_text,
        )
    }

    /// Runs one turn of agent `id` continuing its conversation where `at` says, with
    /// `messages` (see [`Continue`] for what they are), streaming text to `on_text`. The new
    /// turn is durable when this returns `Ok`, as with [`AgentPool::generate`]; an `Err`
    /// (a cancelled generation included) commits nothing.
    pub fn respond(
        &self,
        id: &str,
        at: Continue,
        messages: Vec<Message>,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        let slot = self.slot(id)?;
        let reply = {
            let (mut agent, info) = self.lock_agent(&slot)?;
            let load = self.activate(&slot, info, &mut agent)?;
            // Make room before the cache grows; this agent is locked, so it stays.
            self.enforce();
            self.turn_locked(
                &slot, info, &mut agent, load, at, messages, options, on_text,
            )?
        };
        self.enforce();
        Ok(reply)
    }

    #[allow(clippy::too_many_arguments)]
    fn turn_locked(
        &self,
        slot: &Arc<Slot>,
        info: &AgentInfo,
        agent: &mut Agent,
        load: LoadReport,
        at: Continue,
        messages: Vec<Message>,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        let id = slot.id.as_str();
        let fresh_system = agent.fresh_system.take();
        let transcript = agent.transcript.get_or_insert_with(Transcript::default);
        let (parent, matched_messages, mut input) = match at {
            Continue::Head => (transcript.head(), 0, messages),
            Continue::At(parent) => {
                if let Parent::Turn(index) = parent
                    && transcript.live(index).is_none()
                {
                    return Err(PoolError::UnknownTurn {
                        id: id.to_owned(),
                        index,
                    });
                }
                (parent, 0, messages)
            }
            Continue::Match => {
                let (parent, used) = Self::match_messages(info, transcript, &messages);
                let mut messages = messages;
                (parent, used, messages.split_off(used))
            }
        };
        let instructions = match at {
            Continue::Match => None,
            Continue::Head | Continue::At(_) => {
                Self::take_instructions(info, transcript, parent, &mut input)
            }
        };
        if input.is_empty() {
            return Err(PoolError::NoInput { id: id.to_owned() });
        }
        let mut conversation =
            Self::conversation(info, transcript, parent, instructions.as_deref());
        conversation.extend(input.iter().cloned());
        let prompt = self
            .backend
            .chat_tokens(&conversation, true)
            .map_err(|e| PoolError::engine(id, e))?;
        let options = self.fit(id, &prompt, options)?;
        let Some(cache) = agent.cache.as_mut() else {
            // activate() just made it hot and only this thread can evict it.
            return Err(self.unknown(id));
        };
        let generation = self.backend.generate(cache, &prompt, &options, on_text);
        agent.dirty = true;
        self.record(slot, agent);
        let generation = generation.map_err(|e| PoolError::engine(id, e))?;
        let mut reused_tokens = generation.reused_tokens;
        if let Some(tokens) = fresh_system
            && reused_tokens >= tokens
        {
            // Computed for this conversation a moment ago, not reused from earlier work.
            reused_tokens -= tokens;
        }

        let commit_started = Instant::now();
        let path = self.agent_dir(id).join(TRANSCRIPT_FILE);
        let transcript = agent.transcript.get_or_insert_with(Transcript::default);
        let index = transcript.turns.len() as u64;
        let turn = Turn {
            index,
            unix_ms: files::now_unix_ms(),
            parent,
            input,
            reply: generation.text.clone(),
            // Cut at a stop sequence, the tokens spell more than the reply.
            reply_tokens: if generation.stop == StopReason::StopSequence {
                Vec::new()
            } else {
                generation.tokens.clone()
            },
            instructions,
            usage: Some(Usage {
                prompt_tokens: generation.prompt_tokens,
                reused_tokens,
                output_tokens: generation.tokens.len(),
            }),
        };
        transcript.append(&path, Entry::Turn(turn))?;
        let commit = commit_started.elapsed();
        lock(&self.state).counters.turns += 1;
        if self.config.save_every_turn {
            // The turn is durable already; a failed save is counted and retried later.
            let _ = self.save_locked(id, agent);
            self.record(slot, agent);
        }
        Ok(Reply {
            text: generation.text,
            tokens: generation.tokens,
            first_logits: generation.first_logits,
            turn: Some(index),
            parent,
            matched_messages,
            prompt_tokens: generation.prompt_tokens,
            reused_tokens,
            stop: generation.stop,
            timings: Timings {
                load: load.elapsed,
                prefill: generation.prefill,
                decode: generation.decode,
                commit,
            },
            resumed_from_disk: load.resumed_from_disk,
            rebuilt: load.rebuilt,
            transcript_repair: load.transcript_repair,
        })
    }

    /// Answers `messages` (a whole conversation) without any agent: nothing is written.
    ///
    /// The K/V of the longest token prefix the prompt shares with the previous detached reply
    /// or with a hot agent's cache (a shared system prompt, typically) is copied rather than
    /// computed; when the conversation's system message is one an agent saved as its first
    /// segment and that is longer, it is read from disk instead (read, never adopted). No
    /// agent's cache or transcript changes and no file is written. One detached reply runs at a
    /// time. `on_reuse` hears, before generation starts, how many prompt tokens are reused and
    /// from where.
    pub fn respond_detached(
        &self,
        messages: &[Message],
        options: &GenerateOptions,
        on_reuse: &mut dyn FnMut(Reused),
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        const WHO: &str = "(detached)";
        let prompt = self
            .backend
            .chat_tokens(messages, true)
            .map_err(|e| PoolError::engine(WHO, e))?;
        let options = self.fit(WHO, &prompt, options)?;
        let mut scratch = lock(&self.scratch);
        let cache = scratch.get_or_insert_with(|| KvCache::new(self.shape));
        let own = cache.common_prefix_len(&prompt);
        let slots: Vec<Arc<Slot>> = lock(&self.state)
            .hot
            .iter()
            .map(|(_, e)| Arc::clone(&e.slot))
            .collect();
        let mut best: Option<(usize, Arc<Slot>)> = None;
        for slot in slots {
            // A busy agent is skipped, never waited for.
            let Some(agent) = try_lock(&slot.state) else {
                continue;
            };
            let n = agent
                .cache
                .as_ref()
                .map_or(0, |c| c.common_prefix_len(&prompt));
            if n > best.as_ref().map_or(own, |b| b.0) {
                drop(agent);
                best = Some((n, slot));
            }
        }
        let best_len = best.as_ref().map_or(0, |b| b.0);
        let saved = self.saved_system_prefix(messages, &prompt, best_len.max(own));
        let mut reused = Reused {
            tokens: best_len.max(own),
            from_disk: false,
        };
        if let Some(loaded) = saved {
            // On error the cache is left empty: the prompt is computed in full.
            if cache.import_into(&loaded, &self.meta).is_ok() {
                reused = Reused {
                    tokens: loaded.len(),
                    from_disk: true,
                };
            } else {
                reused.tokens = 0;
            }
        } else if let Some((_, slot)) = best
            && let Some(agent) = try_lock(&slot.state)
            && let Some(other) = &agent.cache
        {
            let n = other.common_prefix_len(&prompt);
            if n > own {
                cache.clear();
                cache.extend_from(other, 0..n);
            }
        }
        reused.tokens = reused.tokens.min(prompt.len().saturating_sub(1));
        on_reuse(reused);
        let generation = self
            .backend
            .generate(cache, &prompt, &options, on_text)
            .map_err(|e| PoolError::engine(WHO, e))?;
        // Keep the scratch cache only while it is small next to the budget of one hot agent.
        if cache.bytes_allocated() > self.config.kv_budget_bytes / self.config.max_hot {
            *scratch = None;
        }
        Ok(Reply {
            text: generation.text,
            tokens: generation.tokens,
            first_logits: generation.first_logits,
            turn: None,
            parent: Parent::Bare,
            matched_messages: 0,
            prompt_tokens: generation.prompt_tokens,
            reused_tokens: generation.reused_tokens,
            stop: generation.stop,
            timings: Timings {
                load: Duration::ZERO,
                prefill: generation.prefill,
                decode: generation.decode,
                commit: Duration::ZERO,
            },
            resumed_from_disk: false,
            rebuilt: None,
            transcript_repair: None,
        })
    }

    /// The saved K/V of the conversation's system message, when an agent saved it as its first
    /// segment (see [`AgentPool::create_agent`]), its tokens start `prompt` and it is longer
    /// than `more_than`. Best effort: a missing or unreadable segment is `None` (the prompt is
    /// then computed), and nothing is written.
    fn saved_system_prefix(
        &self,
        messages: &[Message],
        prompt: &[u32],
        more_than: usize,
    ) -> Option<kv_store::LoadedCache> {
        let first = messages.first().filter(|m| m.role == Role::System)?;
        let sys = self
            .backend
            .chat_tokens(&[Message::system(first.content.clone())], false)
            .ok()?;
        if sys.len() <= more_than || !prompt.starts_with(&sys) {
            return None;
        }
        let seg = SegmentId::compute(&self.meta, None, &sys);
        if !self.store.segment_path(&seg).exists() {
            return None;
        }
        let loaded = self.store.read_chain(&self.meta, &[seg]).ok()?;
        (loaded.tokens() == sys.as_slice()).then_some(loaded)
    }

    /// `options` with `max_tokens` cut to the room the context leaves after `prompt`; a prompt
    /// that fills the context is an error.
    fn fit(&self, id: &str, prompt: &[u32], options: &GenerateOptions) -> Result<GenerateOptions> {
        let max = self.backend.context_len();
        if prompt.len() >= max {
            return Err(PoolError::engine(
                id,
                engine::EngineError::ContextOverflow {
                    needed: prompt.len() + 1,
                    max,
                },
            ));
        }
        let mut options = options.clone();
        options.max_tokens = options.max_tokens.min(max - prompt.len());
        Ok(options)
    }

    /// Turn `index` of agent `id`, unless it was deleted.
    pub fn turn(&self, id: &str, index: u64) -> Result<Turn> {
        let slot = self.slot(id)?;
        let (mut agent, _) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        agent
            .transcript
            .as_ref()
            .and_then(|t| t.live(index))
            .cloned()
            .ok_or_else(|| PoolError::UnknownTurn {
                id: id.to_owned(),
                index,
            })
    }

    /// The system prompt turn `index` of agent `id` was answered with, if its conversation had
    /// one: the turn's own instructions, else the system message its conversation opens with
    /// (the agent's, or the first message of a bare conversation). Deleted turns before it
    /// still count as its history; a deleted or unknown `index` is [`PoolError::UnknownTurn`].
    pub fn turn_system_prompt(&self, id: &str, index: u64) -> Result<Option<String>> {
        let slot = self.slot(id)?;
        let (mut agent, info) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        let empty = Transcript::default();
        let transcript = agent.transcript.as_ref().unwrap_or(&empty);
        let turn = transcript
            .live(index)
            .ok_or_else(|| PoolError::UnknownTurn {
                id: id.to_owned(),
                index,
            })?;
        let history =
            Self::conversation(info, transcript, turn.parent, turn.instructions.as_deref());
        let first = history.iter().chain(&turn.input).next();
        Ok(first
            .filter(|m| m.role == Role::System && !m.content.is_empty())
            .map(|m| m.content.clone()))
    }

    /// Agent `id`'s conversation up to and including `at` as a turn continuing there sees it:
    /// opening with `instructions` when given, else with the agent's system prompt when the
    /// path starts there, as [`AgentPool::respond`] renders it. These are the messages a client
    /// continuing from `at` without writing to the agent sends before its new ones (to
    /// [`AgentPool::respond_detached`]). A deleted or unknown turn is
    /// [`PoolError::UnknownTurn`].
    pub fn conversation_at(
        &self,
        id: &str,
        at: Parent,
        instructions: Option<&str>,
    ) -> Result<Vec<Message>> {
        let slot = self.slot(id)?;
        let (mut agent, info) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        let empty = Transcript::default();
        let transcript = agent.transcript.as_ref().unwrap_or(&empty);
        if let Parent::Turn(index) = at
            && transcript.live(index).is_none()
        {
            return Err(PoolError::UnknownTurn {
                id: id.to_owned(),
                index,
            });
        }
        Ok(Self::conversation(info, transcript, at, instructions))
    }

    /// Deletes turn `index` of agent `id`, durably: it can no longer be continued from or
    /// read. The turns after it keep their own history (a transcript is append-only: the
    /// deletion is a line of its own).
    pub fn delete_turn(&self, id: &str, index: u64) -> Result<()> {
        let slot = self.slot(id)?;
        let (mut agent, _) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        let path = self.agent_dir(id).join(TRANSCRIPT_FILE);
        let transcript = agent.transcript.get_or_insert_with(Transcript::default);
        if transcript.live(index).is_none() {
            return Err(PoolError::UnknownTurn {
                id: id.to_owned(),
                index,
            });
        }
        transcript.append(&path, Entry::Deleted(index))
    }

    /// Saves agent `id`'s cache if it is hot and changed since its last save; returns what
    /// the save did, or `None` when there was nothing to save.
    pub fn save_agent(&self, id: &str) -> Result<Option<SaveReport>> {
        let slot = self.slot(id)?;
        let (mut agent, _) = self.lock_agent(&slot)?;
        let report = self.save_locked(id, &mut agent)?;
        self.record(&slot, &agent);
        Ok(report)
    }

    /// Makes agent `id` hot: loads its cache from disk, or rebuilds it from the transcript
    /// (the report says which, and why). Other agents may be evicted to make room; a cache
    /// larger than the whole budget is [`PoolError::OverBudget`] (and is not kept).
    pub fn load_agent(&self, id: &str) -> Result<LoadReport> {
        let slot = self.slot(id)?;
        let report = {
            let (mut agent, info) = self.lock_agent(&slot)?;
            let report = self.activate(&slot, info, &mut agent)?;
            if report.bytes > self.config.kv_budget_bytes {
                self.evict_locked(&slot, &mut agent, true)?;
                return Err(PoolError::OverBudget {
                    id: id.to_owned(),
                    bytes: report.bytes,
                    budget: self.config.kv_budget_bytes,
                });
            }
            report
        };
        self.enforce();
        Ok(report)
    }

    /// Saves agent `id`'s cache if it changed and drops it from memory. Returns whether it
    /// was hot. If the save fails the cache stays in memory and the error is returned.
    pub fn evict(&self, id: &str) -> Result<bool> {
        let slot = self.slot(id)?;
        let (mut agent, _) = self.lock_agent(&slot)?;
        self.evict_locked(&slot, &mut agent, false)
    }

    /// Deletes agent `id`: its directory (transcript included), its cache's manifest, and the
    /// segments no other agent shares. Waits for a generation in progress on it to finish.
    pub fn delete(&self, id: &str) -> Result<()> {
        let slot = self.slot(id)?;
        let mut agent = lock(&slot.state);
        if agent.deleted {
            return Err(self.unknown(id));
        }
        // The rename is the commit point: a crash after it leaves litter that open removes.
        let agents = self.root.join("agents");
        let dir = self.agent_dir(id);
        let doomed = durable_fs::temp_path(&agents, &format!("delete-{id}"));
        fs::rename(&dir, &doomed).map_err(|e| PoolError::io("rename", &dir, e))?;
        let synced = durable_fs::sync_dir(&agents).map_err(PoolError::fs);
        agent.deleted = true;
        agent.cache = None;
        agent.transcript = None;
        self.unrecord(id);
        lock(&self.registry).agents.remove(id);
        drop(agent);
        let _ = fs::remove_dir_all(&doomed);
        // Best effort: a leftover manifest or segment is only disk space (gc reclaims it), and
        // an agent created later under this id overwrites the manifest.
        let _ = self.store.delete(id);
        let _ = self.store.gc();
        synced
    }

    /// Every agent, sorted by id.
    pub fn list(&self) -> Vec<AgentSummary> {
        let slots: Vec<Arc<Slot>> = lock(&self.registry).agents.values().cloned().collect();
        let st = lock(&self.state);
        slots
            .iter()
            .map(|s| AgentSummary {
                id: s.id.clone(),
                info: s.info.as_ref().ok().cloned(),
                damage: s.info.as_ref().err().cloned(),
                hot: st.hot.contains(&s.id),
            })
            .collect()
    }

    /// Agent `id`'s system prompt, type and creation time.
    pub fn info(&self, id: &str) -> Result<AgentInfo> {
        let slot = self.slot(id)?;
        let (_guard, info) = self.lock_agent(&slot)?;
        Ok(info.clone())
    }

    /// Agent `id`'s turns, oldest first (reading the transcript if it was not read yet).
    pub fn transcript(&self, id: &str) -> Result<Vec<Turn>> {
        let slot = self.slot(id)?;
        let (mut agent, _) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        Ok(agent
            .transcript
            .as_ref()
            .map(|t| t.turns.clone())
            .unwrap_or_default())
    }

    /// Memory and activity: the figures are the pool's own accounting, which equals the sum of
    /// [`KvCache::bytes_allocated`] over the hot caches whenever no call is in progress.
    pub fn stats(&self) -> PoolStats {
        let agents = lock(&self.registry).agents.len();
        let st = lock(&self.state);
        PoolStats {
            hot: st
                .hot
                .iter()
                .map(|(id, e)| HotAgent {
                    id: id.clone(),
                    bytes: e.bytes,
                    tokens: e.tokens,
                    dirty: e.dirty,
                })
                .collect(),
            kv_bytes: st.kv_bytes,
            kv_budget_bytes: self.config.kv_budget_bytes,
            max_hot: self.config.max_hot,
            weight_bytes: self.backend.weight_bytes(),
            rss_bytes: rss_bytes(),
            agents,
            counters: st.counters,
            recent_rebuilds: st.rebuilds.iter().cloned().collect(),
        }
    }

    /// Measures the hot caches directly (locking each agent) and returns (number of agents
    /// holding a cache, the sum of their [`KvCache::bytes_allocated`]): what tests compare
    /// with [`AgentPool::stats`].
    #[doc(hidden)]
    pub fn audit(&self) -> (usize, usize) {
        let slots: Vec<Arc<Slot>> = lock(&self.registry).agents.values().cloned().collect();
        let mut count = 0;
        let mut bytes = 0;
        for s in slots {
            if let Some(c) = &lock(&s.state).cache {
                count += 1;
                bytes += c.bytes_allocated();
            }
        }
        (count, bytes)
    }

    /// Saves every hot cache that changed. Returns how many were saved; on failures, tries
    /// them all and returns the first error.
    pub fn flush(&self) -> Result<usize> {
        let slots: Vec<Arc<Slot>> = lock(&self.state)
            .hot
            .iter()
            .map(|(_, e)| Arc::clone(&e.slot))
            .collect();
        let mut saved = 0;
        let mut first_err = None;
        for slot in slots {
            let mut agent = lock(&slot.state);
            match self.save_locked(&slot.id, &mut agent) {
                Ok(Some(_)) => saved += 1,
                Ok(None) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
            self.record(&slot, &agent);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(saved),
        }
    }
}

impl<B: Backend + ?Sized> AgentPool<B> {
    /// Closes the pool without saving any cache, as a crash would leave it (for tests: the
    /// next open must rebuild or extend stale caches from the transcripts).
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.flush_on_drop = false;
    }
}

impl<B: Backend + ?Sized> Drop for AgentPool<B> {
    /// Saves the hot caches that changed (best effort: a failure only costs a rebuild later).
    fn drop(&mut self) {
        if self.flush_on_drop {
            let _ = self.flush();
        }
    }
}
