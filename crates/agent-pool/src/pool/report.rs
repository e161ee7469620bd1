//! What the pool's calls report: a turn's reply and where its time went, loads and rebuilds,
//! creations, memory and activity statistics, the list of agents.

use std::time::Duration;

use engine::StopReason;

use crate::files::AgentInfo;
use crate::transcript::{Parent, TranscriptRepair, Usage};

/// Why a cache had to be computed again from the transcript.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RebuildReason {
    /// No cache was saved (never saved, or the process died before the first save).
    Missing,
    /// The saved cache is damaged (checksum, structure, missing segment); its damaged
    /// segments were removed so that the rebuilt cache is written anew.
    Damaged,
    /// The saved cache was made by another model, tokenizer or template.
    OtherModel,
    /// The saved cache holds another KV dtype than the pool's: computed again in the pool's
    /// dtype (a conversion would not be the cache a session in that dtype builds). The saved
    /// cache is replaced at the next save.
    OtherDtype,
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

/// What [`AgentPool::create_agent`](super::AgentPool::create_agent) did.
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

/// The prompt tokens a detached reply reuses instead of computing
/// ([`AgentPool::respond_detached`](super::AgentPool::respond_detached)).
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
    /// [`Continue::Match`](super::Continue::Match); 0 otherwise).
    pub matched_messages: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V the cache already held, less the system prompt
    /// [`AgentPool::create_agent`](super::AgentPool::create_agent) computed when this is the
    /// agent's first turn since: that was computed for this conversation, not reused from
    /// earlier work (its time is the `create_agent` call's, not in [`Timings::prefill`]).
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

impl Reply {
    /// The token counts a transcript records for this turn ([`Turn::usage`](crate::Turn)).
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            reused_tokens: self.reused_tokens,
            output_tokens: self.tokens.len(),
        }
    }
}

/// One hot agent in [`PoolStats`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotAgent {
    /// The agent.
    pub id: String,
    /// Bytes its cache holds ([`KvCache::bytes_allocated`](kv_extract::KvCache::bytes_allocated)).
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
    /// Changes other hosts committed to shared agents, applied here.
    pub shared_changes: u64,
    /// Caches adopted from segments on the shared store (another host's K/V, not computed).
    pub shared_adoptions: u64,
    /// Times the shared store could not be read and the local copy was used as it was.
    pub shared_unreachable: u64,
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

/// An agent in [`AgentPool::list`](super::AgentPool::list).
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
