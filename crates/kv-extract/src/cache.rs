//! The in-memory KV cache: per layer K and V `[n_kv_heads, capacity, head_dim]` in one
//! [`KvDtype`], the token ids they were computed from, and the surgery done on them between
//! turns.

use std::ops::Range;

use kv_store::KvDtype;

use crate::dtype::{self, KvRows};
use crate::{AlignedBuf, Error, Result};

/// The dimensions every layer of a cache shares, and which layers slide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// Number of transformer layers.
    pub n_layers: usize,
    /// Number of key/value heads (grouped-query attention shares each among several query heads).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// The sliding window of the layers that have one (Gemma 3's local layers), `None` when
    /// every layer attends to every earlier position.
    pub window: Option<SlidingWindow>,
}

/// Layers whose queries see only the last `size` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindow {
    /// A query at position `p` sees positions `p + 1 - size ..= p`.
    pub size: usize,
    /// Bit `i` set: layer `i` slides (layers from 128 on never do).
    pub layers: u128,
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

    /// The sliding window of `layer`, if it has one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.window
            .filter(|w| layer < 128 && w.layers >> layer & 1 == 1)
            .map(|w| w.size)
    }
}

/// Positions a sliding layer's buffer starts on a multiple of: attention reads a window's rows
/// from its first position rounded down to a multiple of 16 (the softmax sum's lanes), so those
/// rows must be in the buffer, though their values are never used.
const ALIGN: usize = 16;

/// K and V of one layer, head-major, as bytes of the cache's dtype: head `h`'s row for
/// position `p` is row `h * rows + (p - base)`. Cache-line aligned, so with 64-wide f32 or f16
/// heads every row the attention kernels load is too.
#[derive(Clone, Debug)]
pub(crate) struct LayerKv {
    k: AlignedBuf,
    v: AlignedBuf,
    /// The layer's sliding window.
    window: Option<usize>,
    /// Rows per head the buffers have room for.
    rows: usize,
    /// The position of each head's first row: 0, or for a sliding layer a multiple of
    /// [`ALIGN`] at or before `first`.
    base: usize,
    /// The first position whose K/V the layer holds: 0, or for a sliding layer the first
    /// position a continuation can still attend to (rows from `base` to here are padding).
    first: usize,
}

impl LayerKv {
    fn zeros(
        window: Option<usize>,
        rows: usize,
        base: usize,
        row_bytes: usize,
        heads: usize,
    ) -> LayerKv {
        let bytes = heads * rows * row_bytes;
        LayerKv {
            k: AlignedBuf::zeros(bytes.div_ceil(4)),
            v: AlignedBuf::zeros(bytes.div_ceil(4)),
            window,
            rows,
            base,
            first: base,
        }
    }

    pub(crate) fn k_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.k)
    }

    pub(crate) fn v_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.v)
    }

    /// Positions the buffers have room for, from `base`.
    fn end(&self) -> usize {
        self.base + self.rows
    }

    /// New zeroed buffers (`row_bytes` a row) for exactly the positions `self` holds up to
    /// `len`, from the same first position: what a copy of the layer is written into.
    fn empty_copy(&self, len: usize, row_bytes: usize, heads: usize) -> LayerKv {
        let base = aligned(self.first);
        let mut out = LayerKv::zeros(self.window, len - base, base, row_bytes, heads);
        out.first = self.first;
        out
    }
}

/// The buffer start for a sliding layer whose first held position is `first`: the multiple of
/// [`ALIGN`] at or before it.
fn aligned(first: usize) -> usize {
    first / ALIGN * ALIGN
}

/// The attention KV cache of one conversation (batch 1).
///
/// Layout per layer is `[n_kv_heads, rows, head_dim]`: each head's rows are contiguous, so
/// attention over a range of positions of a head reads one slice, and appending writes past
/// the end without touching the history. A layer that attends to every position holds them
/// all, from 0, and grows geometrically, so the history is copied O(log n) times over a
/// conversation, never once per token. A sliding-window layer holds only what the next token
/// can still see: after a pass ending at `n`, positions from `n + 1 - window` on
/// ([`kv_store::kept_from`]); when it needs room it moves those to the front of its buffer
/// (from a multiple of 16 positions before them) instead of growing, so its memory is bounded
/// by the window plus a pass, however long the conversation.
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
        KvCache {
            shape,
            dtype,
            row_bytes,
            tokens: Vec::new(),
            layers: (0..shape.n_layers)
                .map(|l| {
                    let w = shape.layer_window(l);
                    LayerKv::zeros(w, capacity, 0, row_bytes, shape.n_kv_heads)
                })
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

    /// Positions that fit before the next growth (or, for a sliding layer, the next move).
    pub fn capacity(&self) -> usize {
        self.layers.iter().map(LayerKv::end).min().unwrap_or(0)
    }

    /// Whether every layer has room for `n` more positions without growing or moving.
    pub fn has_room(&self, n: usize) -> bool {
        self.len() + n <= self.capacity()
    }

    /// The first position whose K and V `layer` holds: 0, or for a sliding-window layer the
    /// first one a continuation can still attend to. Reading earlier rows gives padding.
    pub fn held_from(&self, layer: usize) -> usize {
        self.layers[layer].first
    }

    /// Bytes of K and V held for the cached tokens: for each layer, `2 * kv_heads` rows of
    /// `head_dim` values in the cache's dtype per position it holds.
    pub fn bytes_used(&self) -> usize {
        let rows: usize = self.layers.iter().map(|l| self.len() - l.first).sum();
        2 * self.shape.n_kv_heads * rows * self.row_bytes
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

    /// Makes room for `additional` more tokens in every layer; see [`KvCache::reserve_pass`].
    pub fn reserve(&mut self, additional: usize) {
        self.reserve_pass(additional, additional);
    }

    /// Makes room for a pass writing `pass` more positions, expecting about `ahead` (at least
    /// `pass`) before the conversation pauses.
    ///
    /// A layer that holds every position and lacks room grows to hold `ahead` more, at least
    /// doubling. A sliding layer first drops the positions its window no longer reaches (moving
    /// the rest to the front of its buffer), and grows only if that is not enough, to hold
    /// its window, the pass, and up to a window more of `ahead` (so that it moves at most once
    /// per window of decoded tokens).
    pub fn reserve_pass(&mut self, pass: usize, ahead: usize) {
        let ahead = ahead.max(pass);
        let len = self.len();
        let (heads, rb) = (self.shape.n_kv_heads, self.row_bytes);
        let mut grew = false;
        for l in &mut self.layers {
            if l.end() >= len + pass {
                continue;
            }
            let (base, rows) = match l.window {
                None => (0, (len + ahead).max(l.rows * 2).max(MIN_CAPACITY)),
                Some(w) => {
                    let base = aligned(l.first);
                    let keep = len - base;
                    if keep + pass <= l.rows {
                        move_rows(l, base, len, heads, rb);
                        continue;
                    }
                    (base, keep + pass + (ahead - pass).min(w))
                }
            };
            let mut grown = LayerKv::zeros(l.window, rows, base, rb, heads);
            grown.first = l.first;
            copy_rows(l, &mut grown, l.first..len, heads, rb);
            *l = grown;
            grew = true;
        }
        if grew {
            let room = self.capacity() - len;
            self.tokens.reserve(room);
        }
    }

    /// Byte range of rows `range` of head `head` in `layer`'s buffers.
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    fn span(&self, layer: usize, head: usize, range: Range<usize>) -> Range<usize> {
        span(&self.layers[layer], head, range, self.row_bytes)
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
        assert!(
            start + n <= self.layers[layer].end(),
            "write past reserved capacity"
        );
        for h in 0..self.shape.n_kv_heads {
            for t in 0..n {
                let dst = self.span(layer, h, start + t..start + t + 1);
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

    /// Records that positions `len..len + tokens.len()` now hold these tokens' K and V; a
    /// sliding layer then lets go of the positions the next token cannot see.
    ///
    /// # Panics
    /// If the tokens do not fit the reserved capacity.
    pub fn push_tokens(&mut self, tokens: &[u32]) {
        assert!(self.has_room(tokens.len()), "push past reserved capacity");
        self.tokens.extend_from_slice(tokens);
        let len = self.len();
        for l in &mut self.layers {
            l.first = l.first.max(kv_store::kept_from(l.window, len));
        }
    }

    /// The whole K buffer of `layer`, as bytes: for tests that check a buffer was reused.
    pub fn k_bytes(&self, layer: usize) -> &[u8] {
        bytemuck::cast_slice(&self.layers[layer].k)
    }

    /// K of one head for positions `range`: `range.len()` rows of `head_dim` values in the
    /// cache's dtype. Rows past `len` (but within capacity) hold whatever was last written, and
    /// so do a sliding layer's rows before [`KvCache::held_from`].
    ///
    /// # Panics
    /// If the range is outside the layer's buffer (before a multiple of 16 at or before
    /// [`KvCache::held_from`], or past the capacity).
    pub fn k_head(&self, layer: usize, head: usize, range: Range<usize>) -> KvRows<'_> {
        let bytes: &[u8] = bytemuck::cast_slice(&self.layers[layer].k);
        KvRows::new(
            self.dtype,
            self.shape.head_dim,
            &bytes[self.span(layer, head, range)],
        )
    }

    /// V of one head for positions `range`; see [`KvCache::k_head`].
    pub fn v_head(&self, layer: usize, head: usize, range: Range<usize>) -> KvRows<'_> {
        let bytes: &[u8] = bytemuck::cast_slice(&self.layers[layer].v);
        KvRows::new(
            self.dtype,
            self.shape.head_dim,
            &bytes[self.span(layer, head, range)],
        )
    }

    /// Whether the cache can be rolled back to its first `n` tokens: always for a cache
    /// without sliding layers; with them, only while every sliding layer still holds the
    /// positions a continuation from `n` would see.
    pub fn can_truncate(&self, n: usize) -> bool {
        self.first_dropped(n).is_none()
    }

    /// The first layer that no longer holds what a continuation from `n` tokens needs, as
    /// (layer, first position needed).
    fn first_dropped(&self, n: usize) -> Option<(usize, usize)> {
        if n >= self.len() {
            return None;
        }
        self.layers.iter().enumerate().find_map(|(i, l)| {
            let needed = kv_store::kept_from(l.window, n);
            (needed < l.first).then_some((i, needed))
        })
    }

    /// Forgets every token from position `n` on (rolls back a turn). Keeps the memory.
    ///
    /// A sliding layer that has already let go of positions a continuation from `n` would see
    /// cannot be rolled back: [`Error::WindowDropped`], and the cache is unchanged (rebuild
    /// it from its tokens, or start from a saved prefix).
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if let Some((layer, needed)) = self.first_dropped(n) {
            return Err(Error::WindowDropped {
                layer,
                needed,
                held_from: self.layers[layer].first,
            });
        }
        self.tokens.truncate(n);
        Ok(())
    }

    /// Forgets everything. Keeps the memory.
    pub fn clear(&mut self) {
        self.tokens.clear();
        for l in &mut self.layers {
            l.base = 0;
            l.first = 0;
        }
    }

    /// An independent copy holding exactly the cached tokens (no spare capacity).
    pub fn fork(&self) -> KvCache {
        let mut copy = KvCache::new(self.shape, self.dtype);
        let (heads, rb) = (self.shape.n_kv_heads, self.row_bytes);
        for (l, c) in self.layers.iter().zip(&mut copy.layers) {
            *c = l.empty_copy(self.len(), rb, heads);
            copy_rows(l, c, l.first..self.len(), heads, rb);
        }
        copy.tokens.extend_from_slice(&self.tokens);
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
        let mut out = KvCache::new(self.shape, dtype);
        let (d, len) = (self.shape.head_dim, self.len());
        let rb = dtype::row_bytes(dtype, d);
        let mut values = vec![0.0f32; len * d];
        for (layer, l) in self.layers.iter().enumerate() {
            let o = &mut out.layers[layer];
            *o = l.empty_copy(len, rb, self.shape.n_kv_heads);
            let held = l.first..len;
            for h in 0..self.shape.n_kv_heads {
                let dst = span(o, h, held.clone(), rb);
                let values = &mut values[..held.len() * d];
                self.k_head(layer, h, held.clone())
                    .to_f32(0..held.len(), values);
                dtype::encode_rows(dtype, d, values, &mut o.k_mut()[dst.clone()]);
                self.v_head(layer, h, held.clone())
                    .to_f32(0..held.len(), values);
                dtype::encode_rows(dtype, d, values, &mut o.v_mut()[dst]);
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

    /// How many of `tokens` this cache can serve: [`KvCache::common_prefix_len`] when the cache
    /// can be rolled back to it ([`KvCache::can_truncate`]), else 0 (a sliding window has
    /// dropped positions that prefix needs, and the cache must be rebuilt).
    pub fn reusable_prefix_len(&self, tokens: &[u32]) -> usize {
        let n = self.common_prefix_len(tokens);
        if self.can_truncate(n) { n } else { 0 }
    }

    /// Appends positions `range` of `other` (K, V and tokens) after this cache's last token,
    /// which must be `range.start`.
    ///
    /// Correct only when `other`'s K/V at those positions were computed with the same
    /// preceding tokens as this cache's: typically `other` is a continuation of this cache
    /// (same prefix). A sliding layer copies only the positions the next token will see;
    /// if `other` no longer holds them, [`Error::WindowDropped`] and this cache is unchanged.
    ///
    /// # Panics
    /// If the shapes or dtypes differ, `range.start` is not this cache's length or `range` is
    /// past `other`'s end.
    pub fn extend_from(&mut self, other: &KvCache, range: Range<usize>) -> Result<()> {
        assert_eq!(self.shape, other.shape, "extend_from across cache shapes");
        assert_eq!(self.dtype, other.dtype, "extend_from across dtypes");
        assert_eq!(
            range.start,
            self.len(),
            "extend_from must start at the cache's end"
        );
        assert!(range.end <= other.len(), "range past the other cache's end");
        let copied = |l: &LayerKv| range.start.max(kv_store::kept_from(l.window, range.end));
        for (layer, o) in other.layers.iter().enumerate() {
            let from = copied(o);
            if from < range.end && o.first > from {
                return Err(Error::WindowDropped {
                    layer,
                    needed: from,
                    held_from: o.first,
                });
            }
        }
        self.reserve(range.len());
        let (heads, rb) = (self.shape.n_kv_heads, self.row_bytes);
        for (l, o) in self.layers.iter_mut().zip(&other.layers) {
            let from = copied(o);
            copy_rows(o, l, from..range.end, heads, rb);
        }
        self.push_tokens(&other.tokens[range]);
        Ok(())
    }

    /// Mutable layers, for importers that fill a cache directly.
    pub(crate) fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
    }

    /// Makes every layer ready to receive a cache of `n` tokens: an empty cache whose sliding
    /// layers start at the first position a continuation from `n` sees, with room for `n`
    /// plus `headroom` positions (existing buffers reused when they are large enough).
    pub(crate) fn prepare_import(&mut self, n: usize, headroom: usize) {
        self.clear();
        let (heads, rb) = (self.shape.n_kv_heads, self.row_bytes);
        for l in &mut self.layers {
            let first = kv_store::kept_from(l.window, n);
            let base = aligned(first);
            if l.rows < n - base {
                *l = LayerKv::zeros(l.window, n - base + headroom, base, rb, heads);
            }
            l.base = base;
            l.first = first;
        }
    }

    /// Byte range of rows `range` of head `head` in `layer`'s buffers, for importers.
    pub(crate) fn row_range(&self, layer: usize, head: usize, range: Range<usize>) -> Range<usize> {
        self.span(layer, head, range)
    }

    /// Records the imported tokens (whose K/V were copied in place).
    pub(crate) fn set_imported_tokens(&mut self, tokens: &[u32]) {
        self.tokens.clear();
        self.tokens.extend_from_slice(tokens);
    }
}

/// Byte range of rows `range` of head `head` in layer `l`'s buffers.
fn span(l: &LayerKv, head: usize, range: Range<usize>, row_bytes: usize) -> Range<usize> {
    assert!(
        range.start >= l.base && range.end <= l.end(),
        "positions {range:?} are outside the layer's rows {}..{}",
        l.base,
        l.end()
    );
    let at = head * l.rows + (range.start - l.base);
    at * row_bytes..(at + range.len()) * row_bytes
}

/// Copies K and V rows of positions `range` from `src` to `dst` (both must hold them).
fn copy_rows(src: &LayerKv, dst: &mut LayerKv, range: Range<usize>, heads: usize, rb: usize) {
    if range.is_empty() {
        return;
    }
    for h in 0..heads {
        let (from, to) = (
            span(src, h, range.clone(), rb),
            span(dst, h, range.clone(), rb),
        );
        let (sk, sv): (&[u8], &[u8]) = (bytemuck::cast_slice(&src.k), bytemuck::cast_slice(&src.v));
        dst.k_mut()[to.clone()].copy_from_slice(&sk[from.clone()]);
        dst.v_mut()[to].copy_from_slice(&sv[from]);
    }
}

/// Moves a sliding layer's rows from `base` to `len` to the front of its buffers, which then
/// start at position `base`.
fn move_rows(l: &mut LayerKv, base: usize, len: usize, heads: usize, rb: usize) {
    if base == l.base {
        return;
    }
    for h in 0..heads {
        let from = span(l, h, base..len, rb);
        let to = h * l.rows * rb;
        l.k_mut().copy_within(from.clone(), to);
        l.v_mut().copy_within(from, to);
    }
    l.base = base;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            n_layers: 2,
            n_kv_heads: 3,
            head_dim: 4,
            window: None,
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
        b.truncate(3).unwrap();
        assert_eq!(b.common_prefix_len(&[1, 2, 3, 9]), 3);
        assert_eq!(a.common_prefix_len(&[1, 2, 7]), 2);
        b.extend_from(&a, 3..5).unwrap();
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
        b.truncate(0).unwrap();
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
            window: None,
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
            spliced.extend_from(&cache, 0..60).unwrap();
            spliced.extend_from(&cache, 60..127).unwrap();
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

    /// [`shape`] with layer 0 sliding over 20 positions.
    fn windowed() -> KvShape {
        KvShape {
            window: Some(SlidingWindow {
                size: 20,
                layers: 0b01,
            }),
            ..shape()
        }
    }

    /// What [`append`] wrote for `layer`'s K at positions `range`, head `h`.
    fn expected_k(layer: usize, h: usize, range: Range<usize>) -> Vec<f32> {
        range
            .flat_map(|p| (0..4).map(move |i| (layer * 1_000_000 + p * 1000 + h * 10 + i) as f32))
            .collect()
    }

    #[test]
    fn a_sliding_layer_holds_its_window_and_refuses_what_it_dropped() {
        let mut cache = KvCache::new(windowed(), KvDtype::F32);
        let mut tokens = Vec::new();
        for chunk in 0..30u32 {
            let toks: Vec<u32> = (0..7).map(|i| chunk * 7 + i).collect();
            tokens.extend_from_slice(&toks);
            append(&mut cache, &toks);
            let len = cache.len();
            assert_eq!(cache.held_from(0), (len + 1).saturating_sub(20), "{len}");
            assert_eq!(cache.held_from(1), 0);
            for h in 0..3 {
                let held = cache.held_from(0)..len;
                assert_eq!(
                    values(cache.k_head(0, h, held.clone())),
                    expected_k(0, h, held)
                );
                assert_eq!(values(cache.k_head(1, h, 0..len)), expected_k(1, h, 0..len));
            }
            // The sliding layer's buffer stays within the window (19 positions, up to 15 of
            // alignment before them) and one pass of 7.
            assert!(
                cache.layers[0].rows <= 19 + 15 + 7,
                "{}",
                cache.layers[0].rows
            );
        }
        assert_eq!(cache.bytes_used(), 2 * 3 * (19 + 210) * 16);

        // Rolling back needs positions the window dropped: refused, nothing changed.
        assert!(!cache.can_truncate(209));
        let err = cache.truncate(209).unwrap_err();
        assert!(
            matches!(
                err,
                Error::WindowDropped {
                    layer: 0,
                    needed: 190,
                    held_from: 191
                }
            ),
            "{err}"
        );
        assert_eq!(cache.len(), 210);
        cache.truncate(210).unwrap();
        assert_eq!(cache.reusable_prefix_len(&tokens[..209]), 0);
        let mut longer = tokens.clone();
        longer.push(7);
        assert_eq!(cache.reusable_prefix_len(&longer), 210);

        // Copies hold the same positions; a copy of a prefix the window dropped is refused.
        let copy = cache.fork();
        let mut spliced = KvCache::new(windowed(), KvDtype::F32);
        spliced.extend_from(&cache, 0..210).unwrap();
        // (Converted to f32, its own dtype: the values here are too large for f16.)
        let converted = cache.convert(KvDtype::F32);
        for c in [&copy, &spliced, &converted] {
            assert_eq!(c.held_from(0), 191);
            for h in 0..3 {
                assert_eq!(values(c.k_head(0, h, 191..210)), expected_k(0, h, 191..210));
                assert_eq!(
                    values(c.v_head(1, h, 0..210)),
                    values(cache.v_head(1, h, 0..210))
                );
            }
        }
        let mut prefix = KvCache::new(windowed(), KvDtype::F32);
        let err = prefix.extend_from(&cache, 0..100).unwrap_err();
        assert!(
            matches!(err, Error::WindowDropped { layer: 0, .. }),
            "{err}"
        );
        assert!(prefix.is_empty());

        // Short of the window, everything is held and a rollback works.
        cache.clear();
        append(&mut cache, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(cache.held_from(0), 0);
        cache.truncate(3).unwrap();
        append(&mut cache, &[9; 30]);
        assert_eq!(cache.held_from(0), 14);
        for h in 0..3 {
            assert_eq!(values(cache.k_head(0, h, 14..33)), expected_k(0, h, 14..33));
        }
    }
}
