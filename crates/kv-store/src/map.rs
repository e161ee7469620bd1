//! The one place kv-store maps files into memory.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapOptions};

/// Maps a whole segment file read-only, prefaulting its pages (one `MAP_POPULATE` pass is
/// cheaper than a page fault per 4 KiB when every byte is about to be checksummed).
pub(crate) fn map_segment(file: &File) -> io::Result<Mmap> {
    // SAFETY: a mapping is only sound while nobody modifies or truncates the file. kv-store
    // never does: segment files are written under a temporary name, fsynced and renamed into
    // place, and are immutable from then on (a new version of a cache is a new segment with a
    // new name; garbage collection unlinks files, which leaves existing mappings valid on
    // Unix). Another program writing into the store directory could break this; the store
    // directory is ours, as documented in docs/format.md.
    unsafe { MmapOptions::new().populate().map(file) }
}
