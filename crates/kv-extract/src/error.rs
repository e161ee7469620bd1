//! kv-extract's error type.

use crate::KvShape;

/// What can go wrong moving a cache to or from disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store refused or failed (I/O, damage, another model's cache...).
    #[error(transparent)]
    Store(#[from] kv_store::Error),
    /// The saved cache's dimensions differ from the model's.
    #[error(
        "cache shape {found:?} does not match the model's {expected:?}: the cache was made by another model; rebuild it"
    )]
    ShapeMismatch {
        /// The shape the caller's model needs.
        expected: Box<KvShape>,
        /// The shape recorded in the cache.
        found: Box<KvShape>,
    },
    /// The saved cache uses a dtype this build cannot hold.
    #[error(
        "cache dtype {dtype} is not supported by this build: upgrade agentkv or rebuild the cache"
    )]
    UnsupportedDtype {
        /// The dtype's name.
        dtype: String,
    },
    /// A save asked for another dtype than the one the cache holds its values in.
    #[error(
        "the cache holds {cache} values, not {requested}: convert it first (KvCache::convert) or save it as {cache}"
    )]
    DtypeMismatch {
        /// The cache's dtype.
        cache: String,
        /// The dtype the save asked for.
        requested: String,
    },
    /// A sliding-window layer no longer holds positions a rollback or copy would need.
    #[error(
        "layer {layer} of the cache holds positions from {held_from} on, but continuing from here needs position {needed}: its sliding window has dropped it; rebuild the cache from its tokens"
    )]
    WindowDropped {
        /// The layer.
        layer: usize,
        /// The first position the operation needs.
        needed: usize,
        /// The first position the layer holds.
        held_from: usize,
    },
}

/// kv-extract's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
