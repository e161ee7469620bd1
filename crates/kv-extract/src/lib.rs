//! The attention KV cache as buffers we own: per layer K and V `[n_kv_heads, capacity,
//! head_dim]` in f32 with the token ids they came from; growth, surgery (truncate, fork,
//! prefix match, append) and the round trip to kv-store.
#![forbid(unsafe_code)]

mod buf;
pub mod cache;
mod error;
mod persist;

pub use buf::AlignedBuf;
pub use cache::{KvCache, KvShape};
pub use error::{Error, Result};
