//! The one place kv-store maps files into memory.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Range;

use memmap2::{Advice, Mmap, UncheckedAdvice};

/// Maps a whole segment file read-only and asks the kernel to start reading it ahead (into
/// the page cache, not into the process: pages are mapped in as they are touched, so a
/// segment does not have to be resident all at once; see [`release`]).
pub(crate) fn map_segment(file: &File) -> io::Result<Mmap> {
    // SAFETY: a mapping is only sound while nobody modifies or truncates the file. kv-store
    // never does: segment files are written under a temporary name, fsynced and renamed into
    // place, and are immutable from then on (a new version of a cache is a new segment with a
    // new name; garbage collection unlinks files, which leaves existing mappings valid on
    // Unix). Another program writing into the store directory could break this; the store
    // directory is ours, as documented in docs/format.md.
    let map = unsafe { Mmap::map(file) }?;
    if !map.is_empty() {
        // Best effort: without read-ahead, the first pass only runs slower.
        let _ = map.advise(Advice::WillNeed);
    }
    Ok(map)
}

/// Drops the pages of `range` from the process (they stay in the page cache), so that a
/// segment read tensor by tensor never holds more than a few tensors in memory. Reading the
/// range afterwards maps the same bytes in again. Best effort: on error the pages stay.
pub(crate) fn release(map: &Mmap, range: Range<usize>) {
    if range.is_empty() || range.end > map.len() {
        return;
    }
    // SAFETY: `MADV_DONTNEED` on a read-only shared file mapping only unmaps the pages; the
    // next read faults them in from the file again. The file is immutable (see
    // `map_segment`), so every read, before or after, sees the same bytes: slices borrowed
    // from the mapping stay valid and unchanged.
    let _ =
        unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len()) };
}
