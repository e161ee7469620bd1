//! The KV cache as buffers we own: growth, surgery, and its round trip to kv-store.

pub mod cache;

pub use cache::{KvCache, KvShape};
