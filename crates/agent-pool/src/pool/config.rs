//! What a caller chooses: the pool's limits, and where a turn continues a conversation.

use std::sync::Arc;

use kv_remote::Remote;
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
    /// A store shared with other hosts (default none: agents live in the pool's directory
    /// alone). With one, every agent created here is shared: each change to it (creation, a
    /// turn, a deleted turn, deletion) is committed to the shared store before it is
    /// acknowledged, with the cache segments that hold its K/V, and a host opening an agent
    /// first applies the changes other hosts committed, adopting their cache instead of
    /// computing it again. The pool's directory becomes a cache in front of the store.
    pub shared: Option<SharedStore>,
}

/// A remote store shared by several hosts' pools, and this host's name among them.
#[derive(Clone, Debug)]
pub struct SharedStore {
    /// The store.
    pub remote: Arc<Remote>,
    /// This host's name in the agents' heads: 1 to 64 characters of `[a-z0-9_-]`, different
    /// for every pool sharing the store at once ([`SharedStore::default_host`] makes one).
    pub host: String,
}

impl SharedStore {
    /// A host name unique to this process: the machine's host name (reduced to
    /// `[a-z0-9_-]`) and the process id.
    pub fn default_host() -> String {
        let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let mut name: String = machine
            .trim()
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(48)
            .collect();
        if name.is_empty() {
            name.push_str("host");
        }
        format!("{name}-{}", std::process::id())
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_hot: 3,
            kv_budget_bytes: 1 << 30,
            kv_dtype: KvDtype::F16,
            save_every_turn: false,
            shared: None,
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
