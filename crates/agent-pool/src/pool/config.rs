//! What a caller chooses: the pool's limits, and where a turn continues a conversation.

use kv_store::KvDtype;

use crate::transcript::Parent;

/// Limits and choices of a pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Most agents whose cache is in memory at once (default 3).
    pub max_hot: usize,
    /// Most bytes of KV caches in memory at once, counted exactly as
    /// [`KvCache::bytes_allocated`](kv_extract::KvCache::bytes_allocated) (default 1 GiB).
    pub kv_budget_bytes: usize,
    /// Element type K and V are held in, in memory and on disk alike (default f16: half of
    /// f32's bytes; `q8_0`: about a quarter, llama.cpp's 8-bit blocks; f32: the model's own
    /// precision). A cache reloaded from disk holds the same bits in every dtype; caches saved
    /// in another dtype are rebuilt from their transcripts ([`RebuildReason::OtherDtype`]).
    ///
    /// [`RebuildReason::OtherDtype`]: crate::RebuildReason::OtherDtype
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

/// Where a new turn continues an agent's conversation, and what the messages given with it
/// are. With `Head` and `At`, a leading system message is the turn's instructions: the system
/// prompt of that turn alone (recorded as [`Turn::instructions`](crate::Turn::instructions)),
/// opening its conversation in place of the agent's; later turns do not see it.
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
