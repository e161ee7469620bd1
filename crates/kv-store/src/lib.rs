#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod durable;
mod error;
mod manifest;
mod map;
mod meta;
mod segment;
mod store;

#[cfg(feature = "fault-injection")]
pub use durable::crash_after;
pub use durable::Step;
pub use error::{Error, Result};
pub use manifest::{Manifest, SegmentRef, MANIFEST_VERSION};
pub use meta::{validate_name, CacheMeta, KvDtype, ModelFingerprint, SegmentId};
pub use segment::{KvKind, KvSource, ReadMode, Segment, SEGMENT_VERSION};
pub use store::{GcReport, LoadedCache, SaveReport, Store};
