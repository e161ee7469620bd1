#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod buf;
pub mod cache;
mod dtype;
mod error;
mod persist;

pub use buf::AlignedBuf;
pub use cache::{KvCache, KvShape, SlidingWindow};
pub use dtype::{KvRows, dequantize_q8_0, f16_to_f32};
pub use error::{Error, Result};
pub use kv_store::KvDtype;
