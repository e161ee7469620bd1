//! A cache loaded from disk: its validated segments in token order, and their K/V read back
//! as one cache. [`Store`](crate::Store) builds it; engines copy out of it.

use std::borrow::Cow;
use std::ops::Range;

use crate::manifest::Manifest;
use crate::meta::CacheMeta;
use crate::segment::{KvKind, KvSource, Segment};

/// A cache loaded from disk and validated, ready to be copied into an engine's buffers.
#[derive(Debug)]
pub struct LoadedCache {
    pub(crate) manifest: Manifest,
    pub(crate) segments: Vec<Segment>,
    pub(crate) tokens: Vec<u32>,
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

    /// K or V of `layer` for all tokens, `[n_kv_heads, len, head_dim]` little-endian bytes:
    /// borrowed from the file when the chain is one segment, else gathered in one copy.
    pub fn kv(&self, layer: usize, kind: KvKind) -> Cow<'_, [u8]> {
        match self.segments.as_slice() {
            [one] => Cow::Borrowed(one.kv(layer, kind)),
            _ => {
                let mut out = Vec::with_capacity(self.meta().kv_bytes(self.len()));
                self.gather(layer, kind, 0..self.len(), &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Appends K or V of `layer` for positions `range` to `out`, `[n_kv_heads, range.len(),
    /// head_dim]`.
    fn gather(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        let meta = self.meta();
        let row = meta.row_bytes();
        for h in 0..meta.model.n_kv_heads as usize {
            for seg in &self.segments {
                let (s, n) = (seg.start(), seg.len());
                let lo = range.start.clamp(s, s + n);
                let hi = range.end.clamp(s, s + n);
                if lo < hi {
                    let head = &seg.kv(layer, kind)[h * n * row..(h + 1) * n * row];
                    out.extend_from_slice(&head[(lo - s) * row..(hi - s) * row]);
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
