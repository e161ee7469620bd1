//! The in-memory KV cache: per layer K and V `[n_kv_heads, capacity, head_dim]` in f32, the
//! token ids they were computed from, and the surgery done on them between turns.

use std::ops::Range;

use crate::AlignedBuf;

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
    /// f32 values of K (or of V) for one token in one layer.
    pub fn row_len(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// K and V of one layer, head-major with room for `capacity` tokens per head. Cache-line
/// aligned, so with 64-wide heads every row the attention kernels load is too.
#[derive(Clone, Debug)]
pub(crate) struct LayerKv {
    pub(crate) k: AlignedBuf,
    pub(crate) v: AlignedBuf,
}

/// The attention KV cache of one conversation (batch 1).
///
/// Layout per layer is `[n_kv_heads, capacity, head_dim]`: each head's rows are contiguous, so
/// attention over the first `len` positions of a head reads one slice, and appending writes
/// past the end without touching the history. Capacity grows geometrically, so the history is
/// copied O(log n) times over a conversation, never once per token.
#[derive(Clone, Debug)]
pub struct KvCache {
    shape: KvShape,
    tokens: Vec<u32>,
    capacity: usize,
    layers: Vec<LayerKv>,
}

/// The smallest capacity a cache allocates, in tokens.
const MIN_CAPACITY: usize = 64;

impl KvCache {
    /// An empty cache with no memory reserved.
    pub fn new(shape: KvShape) -> Self {
        Self::with_capacity(shape, 0)
    }

    /// An empty cache with room for `capacity` tokens before it grows.
    pub fn with_capacity(shape: KvShape, capacity: usize) -> Self {
        let per_layer = shape.row_len() * capacity;
        let layers = (0..shape.n_layers)
            .map(|_| LayerKv {
                k: AlignedBuf::zeros(per_layer),
                v: AlignedBuf::zeros(per_layer),
            })
            .collect();
        KvCache {
            shape,
            tokens: Vec::new(),
            capacity,
            layers,
        }
    }

    /// The dimensions of this cache.
    pub fn shape(&self) -> KvShape {
        self.shape
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

    /// Distance in f32 values between the first rows of two consecutive heads.
    pub fn head_stride(&self) -> usize {
        self.capacity * self.shape.head_dim
    }

    /// Bytes of K and V held for the cached tokens: `2 * layers * kv_heads * len * head_dim * 4`.
    pub fn bytes_used(&self) -> usize {
        2 * self.shape.n_layers * self.shape.row_len() * self.len() * size_of::<f32>()
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
        let d = self.shape.head_dim;
        let len = self.len();
        for layer in &mut self.layers {
            for buf in [&mut layer.k, &mut layer.v] {
                let mut grown = AlignedBuf::zeros(self.shape.n_kv_heads * new_capacity * d);
                for h in 0..self.shape.n_kv_heads {
                    let src = &buf[h * self.capacity * d..][..len * d];
                    grown[h * new_capacity * d..][..len * d].copy_from_slice(src);
                }
                *buf = grown;
            }
        }
        self.capacity = new_capacity;
        self.tokens.reserve(new_capacity - self.tokens.len());
    }

    /// Writes K and V of `layer` for positions `start..start + n`, where the rows come
    /// token-major (`[n, n_kv_heads, head_dim]`, as a projection produces them).
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
        let cap = self.capacity;
        let l = &mut self.layers[layer];
        for t in 0..n {
            for h in 0..self.shape.n_kv_heads {
                let dst = (h * cap + start + t) * d;
                let src = t * row + h * d;
                l.k[dst..dst + d].copy_from_slice(&k_rows[src..src + d]);
                l.v[dst..dst + d].copy_from_slice(&v_rows[src..src + d]);
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

    /// All of K for `layer`, head-major with [`KvCache::head_stride`] between heads; rows past
    /// `len` (plus rows written but not yet pushed) are unspecified.
    pub fn k(&self, layer: usize) -> &[f32] {
        &self.layers[layer].k
    }

    /// All of V for `layer`; see [`KvCache::k`].
    pub fn v(&self, layer: usize) -> &[f32] {
        &self.layers[layer].v
    }

    /// K of one head for positions `range`, contiguous `[range.len(), head_dim]`.
    pub fn k_head(&self, layer: usize, head: usize, range: Range<usize>) -> &[f32] {
        let d = self.shape.head_dim;
        &self.layers[layer].k
            [(head * self.capacity + range.start) * d..(head * self.capacity + range.end) * d]
    }

    /// V of one head for positions `range`; see [`KvCache::k_head`].
    pub fn v_head(&self, layer: usize, head: usize, range: Range<usize>) -> &[f32] {
        let d = self.shape.head_dim;
        &self.layers[layer].v
            [(head * self.capacity + range.start) * d..(head * self.capacity + range.end) * d]
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
        let mut copy = KvCache::with_capacity(self.shape, self.len());
        copy.extend_from(self, 0..self.len());
        copy
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
    /// If the shapes differ or `range` is past `other`'s end.
    pub fn extend_from(&mut self, other: &KvCache, range: Range<usize>) {
        assert_eq!(self.shape, other.shape, "extend_from across cache shapes");
        assert!(range.end <= other.len(), "range past the other cache's end");
        let n = range.len();
        self.reserve(n);
        let d = self.shape.head_dim;
        let start = self.len();
        for (dst, src) in self.layers.iter_mut().zip(&other.layers) {
            for h in 0..self.shape.n_kv_heads {
                let to = (h * self.capacity + start) * d;
                let from = (h * other.capacity + range.start) * d;
                dst.k[to..to + n * d].copy_from_slice(&src.k[from..from + n * d]);
                dst.v[to..to + n * d].copy_from_slice(&src.v[from..from + n * d]);
            }
        }
        self.tokens.extend_from_slice(&other.tokens[range]);
    }

    /// Mutable K and V buffers of every layer with the head stride, for importers that fill
    /// a reserved cache directly.
    pub(crate) fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
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
        let mut cache = KvCache::new(shape());
        for chunk in 0..10u32 {
            let toks: Vec<u32> = (0..37).map(|i| chunk * 100 + i).collect();
            append(&mut cache, &toks);
        }
        assert_eq!(cache.len(), 370);
        assert!(cache.capacity() >= 370);
        let head1 = cache.k_head(1, 2, 369..370);
        assert_eq!(head1, &[1_369_020.0, 1_369_021.0, 1_369_022.0, 1_369_023.0]);
        assert_eq!(cache.v_head(0, 0, 0..1), &[-0.0, -1.0, -2.0, -3.0]);
    }

    #[test]
    fn truncate_fork_prefix_extend() {
        let mut a = KvCache::new(shape());
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
                assert_eq!(a.k_head(layer, h, 0..5), b.k_head(layer, h, 0..5));
                assert_eq!(a.v_head(layer, h, 0..5), b.v_head(layer, h, 0..5));
            }
        }
        // The fork is independent.
        b.truncate(0);
        assert_eq!(a.len(), 5);
    }

    #[test]
    fn byte_accounting() {
        let mut a = KvCache::with_capacity(shape(), 10);
        append(&mut a, &[1, 2, 3]);
        assert_eq!(a.bytes_used(), 2 * 2 * 3 * 3 * 4 * 4);
        // Each of the 4 buffers (K and V of 2 layers) has 15 values of alignment slack.
        assert_eq!(
            a.bytes_allocated(),
            2 * 2 * (3 * 10 * 4 + 15) * 4 + a.tokens.capacity() * 4
        );
    }
}
