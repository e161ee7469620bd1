//! The in-memory KV cache: per layer K and V `[n_kv_heads, capacity, head_dim]` in one
//! [`KvDtype`], the token ids they were computed from, and the surgery done on them between
//! turns.

use std::ops::Range;

use kv_store::KvDtype;

use crate::AlignedBuf;
use crate::dtype::{self, KvRows};

/// The dimensions every layer of a cache shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// Number of transformer layers.
    pub n_layers: usize,
    /// Number of key/value heads (grouped-query attention shares each among several query heads).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl KvShape {
    /// Values of K (or of V) for one token in one layer.
    pub fn row_len(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Whether a cache of this shape can hold its K and V in `dtype` (`q8_0` needs a head
    /// width that is a multiple of 32).
    pub fn supports(&self, dtype: KvDtype) -> bool {
        dtype.row_bytes(self.head_dim).is_some()
    }
}

/// K and V of one layer, head-major with room for `capacity` tokens per head, as bytes of the
/// cache's dtype. Cache-line aligned, so with 64-wide f32 or f16 heads every row the attention
/// kernels load is too.
#[derive(Clone, Debug)]
pub(crate) struct LayerKv {
    k: AlignedBuf,
    v: AlignedBuf,
}

impl LayerKv {
    fn zeros(bytes: usize) -> LayerKv {
        LayerKv {
            k: AlignedBuf::zeros(bytes.div_ceil(4)),
            v: AlignedBuf::zeros(bytes.div_ceil(4)),
        }
    }

    pub(crate) fn k_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.k)
    }

    pub(crate) fn v_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.v)
    }
}

/// The attention KV cache of one conversation (batch 1).
///
/// Layout per layer is `[n_kv_heads, capacity, head_dim]`: each head's rows are contiguous, so
/// attention over the first `len` positions of a head reads one slice, and appending writes
/// past the end without touching the history. Capacity grows geometrically, so the history is
/// copied O(log n) times over a conversation, never once per token.
///
/// Values are held in the cache's [`KvDtype`]: written rows are rounded (f16, bf16) or
/// quantized (`q8_0`) once, when [`KvCache::write_rows`] stores them, and read back exactly
/// ([`KvRows::to_f32`]). Saving writes these bytes as they are and loading copies them back,
/// so a cache resumed from disk holds the same bits as one that never left memory.
#[derive(Clone, Debug)]
pub struct KvCache {
    shape: KvShape,
    dtype: KvDtype,
    row_bytes: usize,
    tokens: Vec<u32>,
    capacity: usize,
    layers: Vec<LayerKv>,
}

/// The smallest capacity a cache allocates, in tokens.
const MIN_CAPACITY: usize = 64;

impl KvCache {
    /// An empty cache with no memory reserved.
    ///
    /// # Panics
    /// If the shape cannot hold `dtype` ([`KvShape::supports`]): callers check that where the
    /// dtype is chosen.
    pub fn new(shape: KvShape, dtype: KvDtype) -> Self {
        Self::with_capacity(shape, dtype, 0)
    }

    /// An empty cache with room for `capacity` tokens before it grows; see [`KvCache::new`].
    pub fn with_capacity(shape: KvShape, dtype: KvDtype, capacity: usize) -> Self {
        assert!(
            shape.supports(dtype),
            "kv dtype {dtype} cannot hold heads of width {}",
            shape.head_dim
        );
        let row_bytes = dtype::row_bytes(dtype, shape.head_dim);
        let per_layer = shape.n_kv_heads * capacity * row_bytes;
        KvCache {
            shape,
            dtype,
            row_bytes,
            tokens: Vec::new(),
            capacity,
            layers: (0..shape.n_layers)
                .map(|_| LayerKv::zeros(per_layer))
                .collect(),
        }
    }

    /// The dimensions of this cache.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// The element type K and V are held in.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Number of tokens cached.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when no token is cached.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token ids the cache was computed from, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens that fit before the next growth.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of K and V held for the cached tokens: `2 * layers * kv_heads * len` rows of
    /// `head_dim` values in the cache's dtype.
    pub fn bytes_used(&self) -> usize {
        2 * self.shape.n_layers * self.shape.n_kv_heads * self.len() * self.row_bytes
    }

    /// Bytes this cache holds in memory: the K/V buffers at their full capacity (each with up
    /// to 60 bytes of alignment slack) plus the token ids. This is what a memory budget must
    /// count.
    pub fn bytes_allocated(&self) -> usize {
        let kv: usize = self
            .layers
            .iter()
            .map(|l| l.k.bytes_allocated() + l.v.bytes_allocated())
            .sum();
        kv + self.tokens.capacity() * size_of::<u32>()
    }

    /// Makes room for `additional` more tokens, growing capacity at least twofold.
    pub fn reserve(&mut self, additional: usize) {
        let needed = self.len() + additional;
        if needed <= self.capacity {
            return;
        }
        let new_capacity = needed.max(self.capacity * 2).max(MIN_CAPACITY);
        let mut grown = KvCache::with_capacity(self.shape, self.dtype, new_capacity);
        grown.extend_from(self, 0..self.len());
        grown.tokens.reserve(new_capacity - grown.tokens.len());
        *self = grown;
    }

    /// Byte range of rows `range` of head `head` in a layer's buffer.
    fn rows(&self, head: usize, range: Range<usize>) -> Range<usize> {
        let base = head * self.capacity;
        (base + range.start) * self.row_bytes..(base + range.end) * self.row_bytes
    }

    /// Writes K and V of `layer` for positions `start..start + n`, where the rows come
    /// token-major (`[n, n_kv_heads, head_dim]`, as a projection produces them), converting
    /// them to the cache's dtype.
    ///
    /// The positions become part of the cache only once [`KvCache::push_tokens`] is called for
    /// them; the forward pass writes every layer first, then pushes the tokens.
    ///
    /// # Panics
    /// If the rows do not fit the reserved capacity or have a length that is not a whole number
    /// of tokens: both are bugs in the caller, not bad input.
    pub fn write_rows(&mut self, layer: usize, start: usize, k_rows: &[f32], v_rows: &[f32]) {
        let row = self.shape.row_len();
        let d = self.shape.head_dim;
        assert_eq!(k_rows.len() % row, 0, "k rows are not whole tokens");
        assert_eq!(k_rows.len(), v_rows.len(), "k and v rows differ in length");
        let n = k_rows.len() / row;
        assert!(start + n <= self.capacity, "write past reserved capacity");
        for h in 0..self.shape.n_kv_heads {
            for t in 0..n {
                let dst = self.rows(h, start + t..start + t + 1);
                let src = t * row + h * d..t * row + (h + 1) * d;
                let l = &mut self.layers[layer];
                dtype::encode_rows(
                    self.dtype,
                    d,
                    &k_rows[src.clone()],
                    &mut l.k_mut()[dst.clone()],
                );
                dtype::encode_rows(self.dtype, d, &v_rows[src], &mut l.v_mut()[dst]);
            }
        }
    }

    /// Records that positions `len..len + tokens.len()` now hold these tokens' K and V.
    ///
    /// # Panics
    /// If the tokens do not fit the reserved capacity.
    pub fn push_tokens(&mut self, tokens: &[u32]) {
        assert!(
            self.len() + tokens.len() <= self.capacity,
            "push past reserved capacity"
        );
        self.tokens.extend_from_slice(tokens);
    }

    /// The whole K buffer of `layer`, as bytes: for tests that check a buffer was reused.
    pub fn k_bytes(&self, layer: usize) -> &[u8] {
        bytemuck::cast_slice(&self.layers[layer].k)
    }

    /// K of one head for positions `range`: `range.len()` rows of `head_dim` values in the
    /// cache's dtype. Rows past `len` (but within capacity) hold whatever was last written.
    pub fn k_head(&self, layer: usize, head: usize, range: Range<usize>) -> KvRows<'_> {
        let bytes: &[u8] = bytemuck::cast_slice(&self.layers[layer].k);
        KvRows::new(
            self.dtype,
            self.shape.head_dim,
            &bytes[self.rows(head, range)],
        )
    }

    /// V of one head for positions `range`; see [`KvCache::k_head`].
    pub fn v_head(&self, layer: usize, head: usize, range: Range<usize>) -> KvRows<'_> {
        let bytes: &[u8] = bytemuck::cast_slice(&self.layers[layer].v);
        KvRows::new(
            self.dtype,
            self.shape.head_dim,
            &bytes[self.rows(head, range)],
        )
    }

    /// Forgets every token from position `n` on (rolls back a turn). Keeps the memory.
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }

    /// Forgets everything. Keeps the memory.
    pub fn clear(&mut self) {
        self.tokens.clear();
    }

    /// An independent copy holding exactly the cached tokens (no spare capacity).
    pub fn fork(&self) -> KvCache {
        let mut copy = KvCache::with_capacity(self.shape, self.dtype, self.len());
        copy.extend_from(self, 0..self.len());
        copy
    }

    /// A copy holding the cached tokens in `dtype`: each value read back exactly and written
    /// again in `dtype` (rounded or quantized). Explicit, because the result is not the cache
    /// a session run in `dtype` would have built: later positions were computed from the old
    /// values.
    ///
    /// # Panics
    /// If the shape cannot hold `dtype` ([`KvShape::supports`]).
    pub fn convert(&self, dtype: KvDtype) -> KvCache {
        let mut out = KvCache::with_capacity(self.shape, dtype, self.len());
        let (d, len) = (self.shape.head_dim, self.len());
        let mut values = vec![0.0f32; len * d];
        for layer in 0..self.shape.n_layers {
            for h in 0..self.shape.n_kv_heads {
                let dst = out.rows(h, 0..len);
                self.k_head(layer, h, 0..len).to_f32(0..len, &mut values);
                dtype::encode_rows(
                    dtype,
                    d,
                    &values,
                    &mut out.layers[layer].k_mut()[dst.clone()],
                );
                self.v_head(layer, h, 0..len).to_f32(0..len, &mut values);
                dtype::encode_rows(dtype, d, &values, &mut out.layers[layer].v_mut()[dst]);
            }
        }
        out.tokens.extend_from_slice(&self.tokens);
        out
    }

    /// Length of the longest common prefix of the cached tokens and `tokens`: how much of a
    /// new prompt this cache already covers.
    pub fn common_prefix_len(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Appends positions `range` of `other` (K, V and tokens) after this cache's last token.
    ///
    /// Correct only when `other`'s K/V at those positions were computed with the same
    /// preceding tokens as this cache's: typically `other` is a continuation of this cache
    /// (same prefix), and `range.start == self.len()`.
    ///
    /// # Panics
    /// If the shapes or dtypes differ or `range` is past `other`'s end.
    pub fn extend_from(&mut self, other: &KvCache, range: Range<usize>) {
        assert_eq!(self.shape, other.shape, "extend_from across cache shapes");
        assert_eq!(self.dtype, other.dtype, "extend_from across dtypes");
        assert!(range.end <= other.len(), "range past the other cache's end");
        let n = range.len();
        self.reserve(n);
        let start = self.len();
        for h in 0..self.shape.n_kv_heads {
            let to = self.rows(h, start..start + n);
            let from = other.rows(h, range.clone());
            for (dst, src) in self.layers.iter_mut().zip(&other.layers) {
                let (sk, sv): (&[u8], &[u8]) =
                    (bytemuck::cast_slice(&src.k), bytemuck::cast_slice(&src.v));
                dst.k_mut()[to.clone()].copy_from_slice(&sk[from.clone()]);
                dst.v_mut()[to.clone()].copy_from_slice(&sv[from.clone()]);
            }
        }
        self.tokens.extend_from_slice(&other.tokens[range]);
    }

    /// Mutable K and V buffers of every layer, for importers that fill a reserved cache
    /// directly, with the byte range of rows `range` of head `head` in each.
    pub(crate) fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
    }

    /// Byte range of rows `range` of head `head` in a layer's buffer, for importers.
    pub(crate) fn row_range(&self, head: usize, range: Range<usize>) -> Range<usize> {
        self.rows(head, range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            n_layers: 2,
            n_kv_heads: 3,
            head_dim: 4,
        }
    }

    fn values(rows: KvRows<'_>) -> Vec<f32> {
        let mut out = vec![0.0; rows.len() * rows.width()];
        rows.to_f32(0..rows.len(), &mut out);
        out
    }

    /// Fills `n` tokens starting at the cache's end with values derived from (layer, pos, head, i).
    fn append(cache: &mut KvCache, tokens: &[u32]) {
        let s = cache.shape();
        cache.reserve(tokens.len());
        let start = cache.len();
        for layer in 0..s.n_layers {
            let mut k = Vec::new();
            let mut v = Vec::new();
            for t in 0..tokens.len() {
                for h in 0..s.n_kv_heads {
                    for i in 0..s.head_dim {
                        let x = (layer * 1_000_000 + (start + t) * 1000 + h * 10 + i) as f32;
                        k.push(x);
                        v.push(-x);
                    }
                }
            }
            cache.write_rows(layer, start, &k, &v);
        }
        cache.push_tokens(tokens);
    }

    #[test]
    fn growth_keeps_history_and_layout() {
        let mut cache = KvCache::new(shape(), KvDtype::F32);
        for chunk in 0..10u32 {
            let toks: Vec<u32> = (0..37).map(|i| chunk * 100 + i).collect();
            append(&mut cache, &toks);
        }
        assert_eq!(cache.len(), 370);
        assert!(cache.capacity() >= 370);
        let head1 = values(cache.k_head(1, 2, 369..370));
        assert_eq!(head1, &[1_369_020.0, 1_369_021.0, 1_369_022.0, 1_369_023.0]);
        assert_eq!(values(cache.v_head(0, 0, 0..1)), &[-0.0, -1.0, -2.0, -3.0]);
    }

    #[test]
    fn truncate_fork_prefix_extend() {
        let mut a = KvCache::new(shape(), KvDtype::F32);
        append(&mut a, &[1, 2, 3, 4, 5]);
        let mut b = a.fork();
        assert_eq!(b.capacity(), 5);
        b.truncate(3);
        assert_eq!(b.common_prefix_len(&[1, 2, 3, 9]), 3);
        assert_eq!(a.common_prefix_len(&[1, 2, 7]), 2);
        b.extend_from(&a, 3..5);
        assert_eq!(b.tokens(), a.tokens());
        for layer in 0..2 {
            for h in 0..3 {
                assert_eq!(
                    a.k_head(layer, h, 0..5).bytes(),
                    b.k_head(layer, h, 0..5).bytes()
                );
                assert_eq!(
                    a.v_head(layer, h, 0..5).bytes(),
                    b.v_head(layer, h, 0..5).bytes()
                );
            }
        }
        // The fork is independent.
        b.truncate(0);
        assert_eq!(a.len(), 5);
    }

    #[test]
    fn byte_accounting() {
        let mut a = KvCache::with_capacity(shape(), KvDtype::F32, 10);
        append(&mut a, &[1, 2, 3]);
        assert_eq!(a.bytes_used(), 2 * 2 * 3 * 3 * 4 * 4);
        // Each of the 4 buffers (K and V of 2 layers) has 15 values of alignment slack.
        assert_eq!(
            a.bytes_allocated(),
            2 * 2 * (3 * 10 * 4 + 15) * 4 + a.tokens.capacity() * 4
        );
    }

    #[test]
    fn every_dtype_stores_rows_once_and_keeps_them_through_growth_and_surgery() {
        let shape = KvShape {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 32,
        };
        let rows = |n: usize, seed: usize| -> Vec<f32> {
            (0..n * shape.row_len())
                .map(|i| (((i + seed * 7919) as f32) * 0.0137).sin() * 5.0)
                .collect()
        };
        let fill = |cache: &mut KvCache| {
            for (chunk, n) in [(0usize, 50usize), (1, 30), (2, 47)] {
                let start = cache.len();
                cache.reserve(n);
                for layer in 0..shape.n_layers {
                    let (k, v) = (rows(n, chunk * 10 + layer), rows(n, chunk * 10 + layer + 5));
                    cache.write_rows(layer, start, &k, &v);
                }
                cache.push_tokens(&vec![chunk as u32; n]);
            }
        };
        let mut exact = KvCache::new(shape, KvDtype::F32);
        fill(&mut exact);
        for (dtype, row_bytes) in [
            (KvDtype::F32, 128),
            (KvDtype::F16, 64),
            (KvDtype::Bf16, 64),
            (KvDtype::Q8_0, 34),
        ] {
            let mut cache = KvCache::new(shape, dtype);
            fill(&mut cache);
            assert_eq!(cache.dtype(), dtype);
            assert_eq!(cache.bytes_used(), 2 * 2 * 2 * 127 * row_bytes, "{dtype}");
            // Rows written in the dtype equal f32 rows converted: one rounding, at the write.
            let converted = exact.convert(dtype);
            let copy = cache.fork();
            let mut spliced = KvCache::new(shape, dtype);
            spliced.extend_from(&cache, 0..60);
            spliced.extend_from(&cache, 60..127);
            for layer in 0..2 {
                for h in 0..2 {
                    let want = cache.k_head(layer, h, 0..127).bytes();
                    assert_eq!(converted.k_head(layer, h, 0..127).bytes(), want, "{dtype}");
                    assert_eq!(copy.k_head(layer, h, 0..127).bytes(), want, "{dtype}");
                    assert_eq!(spliced.k_head(layer, h, 0..127).bytes(), want, "{dtype}");
                    let want = cache.v_head(layer, h, 0..127).bytes();
                    assert_eq!(spliced.v_head(layer, h, 0..127).bytes(), want, "{dtype}");
                }
            }
        }
        assert!(
            !KvShape {
                head_dim: 40,
                ..shape
            }
            .supports(KvDtype::Q8_0)
        );
        assert!(
            KvShape {
                head_dim: 40,
                ..shape
            }
            .supports(KvDtype::F16)
        );
    }
}
