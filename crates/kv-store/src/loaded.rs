//! A cache loaded from disk: its validated segments in token order, and their K/V read back
//! as one cache. [`Store`](crate::Store) builds it; engines copy out of it.

use std::borrow::Cow;
use std::ops::Range;

use crate::manifest::Manifest;
use crate::meta::{CacheMeta, kept_from};
use crate::segment::{KvKind, KvSource, Segment};

/// A cache loaded from disk and validated, ready to be copied into an engine's buffers.
#[derive(Debug)]
pub struct LoadedCache {
    pub(crate) manifest: Manifest,
    pub(crate) segments: Vec<Segment>,
    pub(crate) tokens: Vec<u32>,
    /// Each layer's sliding window (from the meta), `None` for a global layer.
    pub(crate) windows: Vec<Option<usize>>,
}

impl LoadedCache {
    /// The cache's manifest (name, meta, chain).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The compatibility key the cache was saved under.
    pub fn meta(&self) -> &CacheMeta {
        &self.manifest.meta
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

    /// The segments in token order; each gives its K/V bytes per layer.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The first position of `layer` a continuation of this cache can attend to: 0, or for a
    /// sliding-window layer the start of the window of the next token. The layer's K/V are
    /// read from there on ([`LoadedCache::kv`]); the chain holds at least those positions
    /// (every segment was checked to hold what a continuation from its own end needs).
    pub fn kv_from(&self, layer: usize) -> usize {
        kept_from(self.windows[layer], self.len())
    }

    /// K or V of `layer` for the positions from [`LoadedCache::kv_from`] to the end,
    /// `[n_kv_heads, positions, head_dim]` little-endian bytes: borrowed from the file when
    /// one segment holds exactly those, else gathered in one copy.
    pub fn kv(&self, layer: usize, kind: KvKind) -> Cow<'_, [u8]> {
        let from = self.kv_from(layer);
        match self.segments.as_slice() {
            [one] if one.kv_from(layer) == from => Cow::Borrowed(one.kv(layer, kind)),
            _ => {
                let mut out = Vec::with_capacity(self.meta().kv_bytes(self.len() - from));
                self.gather(layer, kind, from..self.len(), &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Appends K or V of `layer` for positions `range` to `out`, `[n_kv_heads, range.len(),
    /// head_dim]`.
    ///
    /// # Panics
    /// If a segment does not hold a position of `range` that it covers (a sliding layer's
    /// positions before [`LoadedCache::kv_from`]).
    fn gather(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        let meta = self.meta();
        let row = meta.row_bytes();
        for h in 0..meta.model.n_kv_heads as usize {
            for seg in &self.segments {
                let (from, end) = (seg.kv_from(layer), seg.start() + seg.len());
                let lo = range.start.clamp(seg.start(), end);
                let hi = range.end.clamp(seg.start(), end);
                if lo < hi {
                    assert!(
                        lo >= from,
                        "positions {lo}..{hi} of layer {layer} are not held"
                    );
                    let n = end - from;
                    let head = &seg.kv(layer, kind)[h * n * row..(h + 1) * n * row];
                    out.extend_from_slice(&head[(lo - from) * row..(hi - from) * row]);
                }
            }
        }
    }
}

impl KvSource for LoadedCache {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn write_kv(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        self.gather(layer, kind, range, out);
    }
}
