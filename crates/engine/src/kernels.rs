//! Numeric kernels of the forward pass (dot products, matmul, RMSNorm, RoPE, SiLU, causal
//! attention), written so that every result is batch-invariant and bitwise deterministic.
//!
//! The rule that makes this work: every output element is a reduction with one fixed order
//! that depends only on the reduction length, never on how many rows are computed together,
//! on how work is split between threads, or on which CPU features are present.
//!
//! * A dot product of length `k` keeps [`LANES`] independent partial sums (lane `l` sums
//!   elements `l, l + LANES, l + 2 * LANES, ...` in that order, as a separate multiply then
//!   add, never a fused multiply-add), then folds them with one fixed pairwise tree
//!   (`reduce`); a tail of `k % LANES` elements is zero-padded to one more chunk. The
//!   multi-row kernels compute several such dots at once to reuse loaded
//!   values, but each dot goes through exactly the same operations as [`dot`].
//! * Rust never contracts `a * b + c` into an FMA on its own, so compiling the same source
//!   for AVX2 (chosen at run time) or for plain SSE2 only changes how many lanes one
//!   instruction handles: both paths give the same bits (a test checks it). Across machines
//!   the only remaining source of difference is `exp` (softmax, SiLU), which comes from the
//!   platform's libm.
//! * Attention for a (token, head) pair reads the cache rows `0..=pos` in order with a
//!   sequential softmax, whatever the batch.
//!
//! The one place `unsafe` is needed is calling the AVX2-compiled copies after checking at run
//! time that the CPU has AVX2; it is confined to the small `dispatch!` wrappers below.
#![allow(unsafe_code)]

use kv_extract::KvCache;
use rayon::prelude::*;

/// Independent partial sums per dot product: one AVX-512 register, two AVX2 registers, four
/// SSE registers. Part of the numeric definition: changing it changes every result.
pub const LANES: usize = 16;

/// Rows of `x` per matmul micro-kernel call ([`dot_2x3`]).
const MR: usize = 2;
/// Weight rows per matmul micro-kernel call (MR * NR * 2 AVX2 accumulators = 12 of 16).
const NR: usize = 3;
/// Rows of `x` swept per pass over a weight panel, so the rows stay in L2 across the panel.
const MB: usize = 32;

/// Calls `$portable` compiled for AVX2 (as `$avx2`) when the CPU has it, and the baseline
/// build otherwise. Both come from the same `#[inline(always)]` source, so they compute the
/// same bits.
macro_rules! dispatch {
    ($avx2:ident, $portable:ident, fn($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2($($arg: $ty),*) $(-> $ret)? {
            $portable($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked on the line above), the only
            // requirement of the `#[target_feature]` function being called.
            return unsafe { $avx2($($arg),*) };
        }
        return $portable($($arg),*);
    };
}

// ---------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------

/// A weight matrix `[rows, cols]` in row-major order: one row per output feature, as GGUF
/// stores projections (`y = x · Wᵀ`).
#[derive(Clone, Debug)]
pub struct Weight {
    rows: usize,
    cols: usize,
    data: WeightData,
}

/// How a [`Weight`]'s values are held. Only f32 today; quantized blocks can be added as
/// variants with their own dot kernels (keeping each one batch-invariant).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum WeightData {
    /// Dequantized values, `rows * cols` of them.
    F32(Vec<f32>),
}

impl Weight {
    /// A weight from dequantized f32 values; `None` if `data.len() != rows * cols`.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Option<Weight> {
        (rows.checked_mul(cols) == Some(data.len())).then_some(Weight {
            rows,
            cols,
            data: WeightData::F32(data),
        })
    }

    /// Stacks weights with the same column count into one (rows of the first, then of the
    /// second, ...): fused projections then need one pass over the input instead of several.
    /// `None` if the column counts differ or `parts` is empty.
    pub fn concat_rows(parts: Vec<Weight>) -> Option<Weight> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for p in parts {
            match p.data {
                WeightData::F32(d) => data.extend_from_slice(&d),
            }
        }
        Weight::from_f32(rows, cols, data)
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Copies row `r` as f32 into `out` (an embedding lookup).
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols`: callers check token ids first.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match &self.data {
            WeightData::F32(d) => out.copy_from_slice(&d[r * self.cols..(r + 1) * self.cols]),
        }
    }

    /// All values as f32, row-major (dequantizing if need be).
    pub fn into_f32(self) -> Vec<f32> {
        match self.data {
            WeightData::F32(d) => d,
        }
    }

    /// Bytes of memory the values take.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(d) => d.len() * size_of::<f32>(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------------------------

/// Folds the [`LANES`] partial sums with a fixed pairwise tree.
///
/// Kept out of line on purpose: inlined into the kernels, LLVM's SLP vectorizer interleaves
/// this tree with the hot loop and scalarizes the accumulators (4-10x slower).
#[inline(never)]
fn reduce(acc: &[f32; LANES]) -> f32 {
    let mut s8 = [0.0f32; 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    let mut s4 = [0.0f32; 4];
    for l in 0..4 {
        s4[l] = s8[l] + s8[l + 4];
    }
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// `acc[l] += x[l] * w[l]` for the [`LANES`] lanes: a multiply, then an add.
#[inline(always)]
fn madd(acc: &mut [f32; LANES], x: &[f32], w: &[f32]) {
    for l in 0..LANES {
        acc[l] += x[l] * w[l];
    }
}

/// Generates a micro-kernel computing `R x C` dot products of length `k` at once:
/// `out[i][j] = dot(xs[i], ws[j])`, each with exactly the operations of a lone [`dot`].
///
/// A macro rather than const generics: the accumulators must be indexed by literal constants
/// for LLVM to keep them in registers (with loops over `i` and `j` they stay in memory and the
/// kernel runs ~10x slower). The tail (`k % LANES` elements) is zero-padded to one more full
/// chunk, so every accumulator is only ever touched by `madd`.
macro_rules! dot_kernel {
    ($name:ident, $r:literal, $c:literal, [$($i:tt),*], $js:tt) => {
        #[inline(always)]
        fn $name(xs: [&[f32]; $r], ws: [&[f32]; $c], k: usize) -> [[f32; $c]; $r] {
            let xs = xs.map(|s| &s[..k]);
            let ws = ws.map(|s| &s[..k]);
            let full = k - k % LANES;
            let mut acc = [[[0.0f32; LANES]; $c]; $r];
            let mut off = 0;
            while off < full {
                $( dot_kernel!(@row acc, xs, ws, off, $i, $js); )*
                off += LANES;
            }
            if full < k {
                let mut xt = [[0.0f32; LANES]; $r];
                let mut wt = [[0.0f32; LANES]; $c];
                for (t, s) in xt.iter_mut().zip(&xs) {
                    t[..k - full].copy_from_slice(&s[full..]);
                }
                for (t, s) in wt.iter_mut().zip(&ws) {
                    t[..k - full].copy_from_slice(&s[full..]);
                }
                let (xs, ws) = (xt.each_ref().map(|a| &a[..]), wt.each_ref().map(|a| &a[..]));
                let off = 0;
                $( dot_kernel!(@row acc, xs, ws, off, $i, $js); )*
            }
            let mut out = [[0.0f32; $c]; $r];
            for (o, a) in out.iter_mut().zip(&acc) {
                for (o, a) in o.iter_mut().zip(a) {
                    *o = reduce(a);
                }
            }
            out
        }
    };
    (@row $acc:ident, $xs:ident, $ws:ident, $off:ident, $i:tt, [$($j:tt),*]) => {
        $( madd(&mut $acc[$i][$j], &$xs[$i][$off..$off + LANES], &$ws[$j][$off..$off + LANES]); )*
    };
}

dot_kernel!(dot_1x1, 1, 1, [0], [0]);
dot_kernel!(dot_1x3, 1, 3, [0], [0, 1, 2]);
dot_kernel!(dot_1x4, 1, 4, [0], [0, 1, 2, 3]);
dot_kernel!(dot_2x3, 2, 3, [0, 1], [0, 1, 2]);

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    dot_1x1([a], [b], a.len())[0][0]
}

/// The dot product of two equal-length slices, in the crate's fixed reduction order.
///
/// # Panics
/// If the lengths differ.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
    dispatch!(dot_avx2, dot_portable, fn(a: &[f32], b: &[f32]) -> f32);
}

// ---------------------------------------------------------------------------------------------
// Matmul
// ---------------------------------------------------------------------------------------------

/// One weight panel against all rows of `x`: `out[j * m + i] = dot(x[i], w[j])` for the
/// `out.len() / m` rows of `w`.
#[inline(always)]
fn panel_portable(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) {
    let rows = out.len() / m;
    let xrow = |i: usize| &x[i * k..(i + 1) * k];
    let wrow = |j: usize| &w[j * k..(j + 1) * k];
    if m == 1 {
        // Decode: one row of x against four weight rows at a time.
        let mut j = 0;
        while j + 4 <= rows {
            let r = dot_1x4(
                [xrow(0)],
                [wrow(j), wrow(j + 1), wrow(j + 2), wrow(j + 3)],
                k,
            );
            out[j..j + 4].copy_from_slice(&r[0]);
            j += 4;
        }
        for (j, o) in out.iter_mut().enumerate().skip(j) {
            *o = dot_1x1([xrow(0)], [wrow(j)], k)[0][0];
        }
        return;
    }
    for i0 in (0..m).step_by(MB) {
        let i1 = (i0 + MB).min(m);
        let mut j = 0;
        while j + NR <= rows {
            let ws = [wrow(j), wrow(j + 1), wrow(j + 2)];
            let mut i = i0;
            while i + MR <= i1 {
                let r = dot_2x3([xrow(i), xrow(i + 1)], ws, k);
                for (di, ri) in r.iter().enumerate() {
                    for (dj, v) in ri.iter().enumerate() {
                        out[(j + dj) * m + i + di] = *v;
                    }
                }
                i += MR;
            }
            while i < i1 {
                let r = dot_1x3([xrow(i)], ws, k);
                for (dj, v) in r[0].iter().enumerate() {
                    out[(j + dj) * m + i] = *v;
                }
                i += 1;
            }
            j += NR;
        }
        while j < rows {
            for i in i0..i1 {
                out[j * m + i] = dot_1x1([xrow(i)], [wrow(j)], k)[0][0];
            }
            j += 1;
        }
    }
}

fn panel(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) {
    dispatch!(
        panel_avx2,
        panel_portable,
        fn(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32])
    );
}

/// `y = x · Wᵀ` for `m` rows of `x` (`[m, w.cols()]`, row-major): returns `[m, w.rows()]`.
///
/// Each output element is [`dot`]`(x[i], W[j])` bit for bit, whatever `m` and the number of
/// threads; work is split over the rows of `W`.
///
/// # Panics
/// If `x.len() != m * w.cols()`.
pub fn matmul(x: &[f32], m: usize, w: &Weight) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        m * k,
        "matmul input is not m rows of the weight's width"
    );
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let WeightData::F32(wd) = &w.data;
    // Transposed output: each task owns a contiguous block of weight rows.
    let mut yt = vec![0.0f32; n * m];
    let tasks = rayon::current_num_threads() * 4;
    let rows_per_task = n.div_ceil(tasks).next_multiple_of(NR);
    yt.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(c, out)| {
            let j0 = c * rows_per_task;
            let rows = out.len() / m;
            panel(x, m, k, &wd[j0 * k..(j0 + rows) * k], out);
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0.0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            y[i * n + j] = *v;
        }
    }
    y
}

// ---------------------------------------------------------------------------------------------
// Element-wise and per-row kernels
// ---------------------------------------------------------------------------------------------

/// RMSNorm of each row of `x` (rows of `w.len()`): `x / sqrt(mean(x²) + eps) * w`.
///
/// # Panics
/// If `x` is not a whole number of rows or `out` differs in length.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), out.len(), "rms_norm output length");
    assert_eq!(x.len() % d, 0, "rms_norm input is not whole rows");
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot(row, row);
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, &xv), &wv) in o.iter_mut().zip(row).zip(w) {
            *o = (xv * inv) * wv;
        }
    }
}

/// `a += b`, element-wise (a residual connection).
pub fn add_in_place(a: &mut [f32], b: &[f32]) {
    for (a, b) in a.iter_mut().zip(b) {
        *a += b;
    }
}

/// SiLU-gated product over rows laid out `[gate (f) | up (f)]`: returns `silu(gate) * up`,
/// `[rows, f]`.
pub fn silu_mul_rows(gate_up: &[f32], f: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * f) {
        let (g, u) = row.split_at(f);
        out.extend(g.iter().zip(u).map(|(&g, &u)| (g / (1.0 + (-g).exp())) * u));
    }
    out
}

/// Rotary position embedding tables for `n` consecutive positions from `start`.
///
/// Row `t` holds `cos` and `sin` of `(start + t) * inv_freq[i]` for every rotated pair `i`;
/// the angle is computed in f64 from the position alone, so a position's row never depends
/// on which batch it is in.
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    pairs: usize,
}

impl RopeTable {
    /// Inverse frequencies `base^(-2i / rope_dim)` for `i < rope_dim / 2`.
    pub fn inv_freq(base: f32, rope_dim: usize) -> Vec<f64> {
        (0..rope_dim / 2)
            .map(|i| (base as f64).powf(-((2 * i) as f64) / rope_dim as f64))
            .collect()
    }

    /// The table for positions `start..start + n`.
    pub fn new(inv_freq: &[f64], start: usize, n: usize) -> RopeTable {
        let pairs = inv_freq.len();
        let mut cos = Vec::with_capacity(n * pairs);
        let mut sin = Vec::with_capacity(n * pairs);
        for t in 0..n {
            let pos = (start + t) as f64;
            for &f in inv_freq {
                let angle = pos * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { cos, sin, pairs }
    }

    /// Rotates, in place, adjacent pairs `(x[2i], x[2i+1])` of the first `2 * pairs` values of
    /// every head of every token in `x` (`[n, n_heads, head_dim]`): the interleaved ("normal")
    /// RoPE of GGUF llama models, whose converter permutes Q and K to match it.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, head_dim: usize) {
        for (t, tok) in x.chunks_exact_mut(n_heads * head_dim).enumerate() {
            let cos = &self.cos[t * self.pairs..(t + 1) * self.pairs];
            let sin = &self.sin[t * self.pairs..(t + 1) * self.pairs];
            for head in tok.chunks_exact_mut(head_dim) {
                for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Attention of one query head over `len` cached rows: scores, a sequential softmax, then the
/// weighted sum of V rows in position order.
#[inline(always)]
fn attend_portable(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = q.len();
    let len = k.len() / d;
    scores.clear();
    let mut j = 0;
    while j + 4 <= len {
        let r = dot_1x4(
            [q],
            [
                &k[j * d..(j + 1) * d],
                &k[(j + 1) * d..(j + 2) * d],
                &k[(j + 2) * d..(j + 3) * d],
                &k[(j + 3) * d..(j + 4) * d],
            ],
            d,
        );
        scores.extend(r[0].iter().map(|s| s * scale));
        j += 4;
    }
    while j < len {
        scores.push(dot_1x1([q], [&k[j * d..(j + 1) * d]], d)[0][0] * scale);
        j += 1;
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (p, vrow) in scores.iter().zip(v.chunks_exact(d)) {
        for (o, &vv) in out.iter_mut().zip(vrow) {
            *o += p * vv;
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

fn attend(q: &[f32], k: &[f32], v: &[f32], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    dispatch!(
        attend_avx2,
        attend_portable,
        fn(q: &[f32], k: &[f32], v: &[f32], scale: f32, scores: &mut Vec<f32>, out: &mut [f32])
    );
}

/// Causal grouped-query attention for `n` new tokens at positions `start..start + n`, whose K
/// and V are already written to `cache` (layer `layer`) at those positions.
///
/// `q` is `[n, n_heads, head_dim]` (after RoPE); returns the attention output in the same
/// layout. Query head `h` reads KV head `h / (n_heads / n_kv_heads)`. Work is parallel over
/// (token, head) pairs; each pair's result does not depend on the others.
pub fn attention(
    q: &[f32],
    n: usize,
    start: usize,
    n_heads: usize,
    cache: &KvCache,
    layer: usize,
) -> Vec<f32> {
    let shape = cache.shape();
    let d = shape.head_dim;
    let group = n_heads / shape.n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0f32; n * n_heads * d];
    out.par_chunks_mut(d)
        .enumerate()
        .for_each_init(Vec::new, |scores, (idx, o)| {
            let (t, h) = (idx / n_heads, idx % n_heads);
            let pos = start + t;
            let kv = h / group;
            let k = cache.k_head(layer, kv, 0..pos + 1);
            let v = cache.v_head(layer, kv, 0..pos + 1);
            attend(&q[idx * d..(idx + 1) * d], k, v, scale, scores, o);
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_extract::KvShape;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    #[test]
    fn dot_matches_f64_reference() {
        for k in [1, 7, 16, 33, 64, 576, 1537] {
            let a = values(k, 1);
            let b = values(k, 2);
            let got = dot(&a, &b) as f64;
            let want = dot_f64(&a, &b);
            assert!(
                (got - want).abs() <= 1e-5 * (k as f64).sqrt(),
                "k={k}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn simd_and_portable_paths_agree_bitwise() {
        let (n, k) = (11, 100);
        for m in [1, 7] {
            let x = values(m * k, 3);
            let w = values(n * k, 4);
            let mut out_portable = vec![0.0; n * m];
            panel_portable(&x, m, k, &w, &mut out_portable);
            let mut out_dispatched = vec![0.0; n * m];
            panel(&x, m, k, &w, &mut out_dispatched);
            assert_eq!(
                out_portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                out_dispatched
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            );
        }
        let x = values(k, 3);
        let w = values(k, 4);
        assert_eq!(
            dot_portable(&x[..k], &w[..k]).to_bits(),
            dot(&x[..k], &w[..k]).to_bits()
        );
    }

    #[test]
    fn matmul_matches_reference_and_is_batch_invariant() {
        let (m, n, k) = (37, 29, 100);
        let x = values(m * k, 5);
        let wv = values(n * k, 6);
        let w = Weight::from_f32(n, k, wv.clone()).expect("sizes match");
        let y = matmul(&x, m, &w);
        for i in 0..m {
            for j in 0..n {
                let want = dot_f64(&x[i * k..(i + 1) * k], &wv[j * k..(j + 1) * k]);
                assert!((y[i * n + j] as f64 - want).abs() < 1e-4);
                // Bitwise the lone dot, and bitwise the row computed on its own.
                assert_eq!(
                    y[i * n + j].to_bits(),
                    dot(&x[i * k..(i + 1) * k], &wv[j * k..(j + 1) * k]).to_bits()
                );
            }
            let alone = matmul(&x[i * k..(i + 1) * k], 1, &w);
            assert_eq!(&y[i * n..(i + 1) * n], &alone[..]);
        }
    }

    #[test]
    fn weight_concat_and_rows() {
        let a = Weight::from_f32(1, 2, vec![1.0, 2.0]).expect("sizes match");
        let b = Weight::from_f32(2, 2, vec![3.0, 4.0, 5.0, 6.0]).expect("sizes match");
        let c = Weight::concat_rows(vec![a, b]).expect("same width");
        assert_eq!((c.rows(), c.cols()), (3, 2));
        let mut row = [0.0; 2];
        c.row_into(2, &mut row);
        assert_eq!(row, [5.0, 6.0]);
        assert!(Weight::from_f32(2, 2, vec![0.0; 3]).is_none());
        let narrow = Weight::from_f32(1, 1, vec![0.0]).expect("sizes match");
        assert!(Weight::concat_rows(vec![c, narrow]).is_none());
    }

    #[test]
    fn rms_norm_of_known_row() {
        let x = [3.0f32, 4.0];
        let mut out = [0.0; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_adjacent_pairs() {
        // head_dim 4, base 10000: pair 0 turns by pos rad, pair 1 by pos / 100 rad.
        let inv = RopeTable::inv_freq(10000.0, 4);
        assert!((inv[1] - 0.01).abs() < 1e-12);
        let table = RopeTable::new(&inv, 2, 1);
        let mut x = [1.0f32, 0.0, 0.0, 1.0];
        table.apply(&mut x, 1, 4);
        let (c0, s0) = (2.0f32.cos(), 2.0f32.sin());
        let (c1, s1) = (0.02f32.cos(), 0.02f32.sin());
        let want = [c0, s0, -s1, c1];
        for (g, w) in x.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{x:?} vs {want:?}");
        }
        // Position 0 is the identity.
        let mut y = [0.3f32, -0.7, 1.5, 2.5];
        RopeTable::new(&inv, 0, 1).apply(&mut y, 1, 4);
        assert_eq!(y, [0.3, -0.7, 1.5, 2.5]);
    }

    #[test]
    fn silu_mul_known_values() {
        let out = silu_mul_rows(&[0.0, 1.0, 2.0, 3.0], 2);
        let silu1 = 1.0 / (1.0 + (-1.0f32).exp());
        assert_eq!(out[0], 0.0);
        assert!((out[1] - silu1 * 3.0).abs() < 1e-6);
    }

    #[test]
    fn attention_matches_naive_softmax_and_is_causal() {
        let shape = KvShape {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let mut cache = KvCache::new(shape);
        let n = 5;
        let k = values(n * 4, 7);
        let v = values(n * 4, 8);
        cache.reserve(n);
        cache.write_rows(0, 0, &k, &v);
        cache.push_tokens(&[0; 5]);
        // Two query heads share the one KV head.
        let q = values(n * 2 * 4, 9);
        let out = attention(&q, n, 0, 2, &cache, 0);
        for t in 0..n {
            for h in 0..2 {
                let qh = &q[(t * 2 + h) * 4..][..4];
                let s: Vec<f64> = (0..=t)
                    .map(|j| dot_f64(qh, &k[j * 4..][..4]) / 2.0)
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for dd in 0..4 {
                    let want: f64 = (0..=t).map(|j| e[j] / z * v[j * 4 + dd] as f64).sum();
                    let got = out[(t * 2 + h) * 4 + dd] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "t={t} h={h} d={dd}: {got} vs {want}"
                    );
                }
            }
        }
        // Decoding the last token alone gives the same bits.
        let last = attention(&q[(n - 1) * 8..], 1, n - 1, 2, &cache, 0);
        assert_eq!(&out[(n - 1) * 8..], &last[..]);
    }
}
