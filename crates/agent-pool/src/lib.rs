#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod backend;
mod error;
mod files;
mod pool;
#[doc(hidden)]
pub mod testing;
mod transcript;
mod view;

pub use backend::Backend;
pub use error::{PoolError, Result};
pub use files::{AGENT_FILE_VERSION, AgentInfo};
pub use pool::{
    AgentPool, AgentSummary, Continue, Counters, CreateReport, HotAgent, LoadReport, PoolConfig,
    PoolStats, Rebuild, RebuildEvent, RebuildReason, Reply, Reused, SharedCheck, SharedStore,
    Timings,
};
pub use transcript::{Parent, TRANSCRIPT_VERSION, TranscriptRepair, Turn, Usage};
pub use view::PoolView;
