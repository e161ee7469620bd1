#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod durable;
pub mod durable_fs;
mod error;
mod loaded;
mod manifest;
mod map;
mod meta;
mod reader;
mod segment;
mod store;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

pub use durable::Step;
#[cfg(feature = "fault-injection")]
pub use durable::{crash_after, fail_writes};
pub use error::{Error, Result};
pub use loaded::LoadedCache;
pub use manifest::{MANIFEST_VERSION, Manifest, SegmentRef};
pub use meta::{
    CacheMeta, EXTRA_SLIDING_LAYERS, EXTRA_SLIDING_WINDOW, KvDtype, ModelFingerprint, Q8_0_BLOCK,
    Q8_0_BLOCK_BYTES, SegmentId, kept_from, validate_name,
};
pub use reader::{CacheReader, Part, SegmentReader};
pub use segment::{KvKind, KvSource, ReadMode, SEGMENT_VERSION, Segment};
pub use store::{GcReport, SaveReport, Store};
