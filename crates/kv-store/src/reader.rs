//! A cache opened to be read into a caller's buffers: every check of [`Store::load`] but the
//! tensors' checksums, which are verified as each tensor is read, so its bytes are read from
//! the page cache once (hashed in L2 where they arrive) instead of once to hash and once to
//! copy.
//!
//! [`Store::load`]: crate::Store::load

use std::cell::RefCell;
use std::hash::Hasher as _;

use crate::loaded::LoadedCache;
use crate::meta::{CacheMeta, PIECE, checksum_text, kept_from};
use crate::segment::{KvKind, Segment, tensor_name};
use crate::{Error, Result};

/// A cache whose segments are validated (structure, ids, chain, fingerprint, held positions)
/// but whose tensors are verified only as [`SegmentReader::read_kv`] reads them. Nothing here
/// hands out a tensor's bytes before they are verified. [`Store::open_reader`] opens one.
///
/// [`Store::open_reader`]: crate::Store::open_reader
#[derive(Debug)]
pub struct CacheReader {
    meta: CacheMeta,
    tokens: Vec<u32>,
    windows: Vec<Option<usize>>,
    segments: Vec<SegmentReader>,
}

impl CacheReader {
    pub(crate) fn new(loaded: LoadedCache) -> CacheReader {
        CacheReader {
            meta: loaded.manifest.meta,
            tokens: loaded.tokens,
            windows: loaded.windows,
            segments: loaded.segments.into_iter().map(SegmentReader).collect(),
        }
    }

    /// The compatibility key the cache was saved under.
    pub fn meta(&self) -> &CacheMeta {
        &self.meta
    }

    /// All token ids, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True for a cache of no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// As [`LoadedCache::kv_from`]: the first position of `layer` a continuation attends to.
    pub fn kv_from(&self, layer: usize) -> usize {
        kept_from(self.windows[layer], self.len())
    }

    /// The segments in token order.
    pub fn segments(&self) -> &[SegmentReader] {
        &self.segments
    }
}

/// Where [`SegmentReader::read_kv`] puts the next bytes of a tensor.
#[derive(Debug)]
pub enum Part<'a> {
    /// Into this buffer, as many bytes as it holds.
    Into(&'a mut [u8]),
    /// Nowhere: this many bytes are read only to be verified.
    Skip(usize),
}

impl Part<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Part::Into(b) => b.len(),
            Part::Skip(n) => *n,
        }
    }
}

/// One segment of a [`CacheReader`].
#[derive(Debug)]
pub struct SegmentReader(Segment);

impl SegmentReader {
    /// The first position the segment holds.
    pub fn start(&self) -> usize {
        self.0.start()
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for a segment of no tokens.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As [`Segment::kv_from`].
    pub fn kv_from(&self, layer: usize) -> usize {
        self.0.kv_from(layer)
    }

    /// Reads every byte of K or V of `layer` (laid out as [`Segment::kv`] describes) into
    /// `parts`, in order, and verifies the tensor's checksum over them: on
    /// [`Error::ChecksumMismatch`] (or an I/O error) the buffers hold bytes that must not be
    /// used.
    ///
    /// # Panics
    /// If `layer` is not below the model's layer count or the parts do not add up to the
    /// tensor's length.
    pub fn read_kv(&self, layer: usize, kind: KvKind, parts: &mut [Part<'_>]) -> Result<()> {
        let seg = &self.0;
        let total: usize = parts.iter().map(Part::len).sum();
        let len = seg.kv_len(layer, kind);
        assert_eq!(total, len, "parts of {total} bytes for a tensor of {len}");
        if seg.is_hashed() {
            // Verified when opened (a buffered segment): only copy.
            return seg.read_parts(layer, kind, parts);
        }
        thread_local! {
            static SKIPPED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let mut hasher = twox_hash::XxHash3_64::new();
        let mut at = 0;
        for part in parts.iter_mut() {
            let n = part.len();
            for piece in (0..n).step_by(PIECE) {
                let range = piece..(piece + PIECE).min(n);
                let from = at + range.start..at + range.end;
                match part {
                    Part::Into(buf) => {
                        let buf = &mut buf[range];
                        seg.read_kv(layer, kind, from, buf)?;
                        hasher.write(buf);
                    }
                    Part::Skip(_) => SKIPPED.with_borrow_mut(|scratch| {
                        scratch.resize(PIECE, 0);
                        let buf = &mut scratch[..range.len()];
                        seg.read_kv(layer, kind, from, buf)?;
                        hasher.write(buf);
                        Ok::<(), Error>(())
                    })?,
                }
            }
            at += n;
        }
        match seg.recorded_sum(layer, kind) == checksum_text(hasher.finish()) {
            true => Ok(()),
            false => Err(Error::ChecksumMismatch {
                path: seg.path().to_owned(),
                tensor: tensor_name(layer, kind),
            }),
        }
    }

    /// The bytes `range` of the tensor, verified as [`SegmentReader::read_kv`] verifies them.
    #[cfg(test)]
    pub(crate) fn read_all(
        &self,
        layer: usize,
        kind: KvKind,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<u8>> {
        let len = self.0.kv_len(layer, kind);
        let mut out = vec![0; range.len()];
        let mut parts = [
            Part::Skip(range.start),
            Part::Into(&mut out),
            Part::Skip(len - range.end),
        ];
        self.read_kv(layer, kind, &mut parts)?;
        Ok(out)
    }
}
