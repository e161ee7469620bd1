#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod buf;
pub mod cache;
mod error;
mod persist;

pub use buf::AlignedBuf;
pub use cache::{KvCache, KvShape};
pub use error::{Error, Result};
