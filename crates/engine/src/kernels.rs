//! Numeric kernels of the forward pass (dot products, matmul, RMSNorm, RoPE, SiLU, causal
//! attention), written so that every result is batch-invariant and bitwise deterministic.
//!
//! The rule that makes this work: every output element is a reduction with one fixed order
//! that depends only on the reduction length, never on how many rows are computed together,
//! on how work is split between threads, or on which CPU features are present.
//!
//! * A dot product of length `k` keeps [`LANES`] independent partial sums (lane `l` sums
//!   elements `l, l + LANES, l + 2 * LANES, ...` in that order, each step a fused
//!   multiply-add `fma(x, w, acc)`, one rounding), then folds them with one fixed pairwise
//!   tree (`reduce`); a tail of `k % LANES` elements is zero-padded to one more chunk. The
//!   multi-row kernels compute several such dots at once to reuse loaded values, but each dot
//!   goes through exactly the same operations as [`dot`]. Matmul outputs and attention scores
//!   (`q · k`) are both such dot products.
//! * A fused multiply-add is exactly specified by IEEE 754 (`f32::mul_add`: one instruction
//!   where the CPU has FMA, a correctly rounded library call where it has not), and Rust never
//!   contracts a separate `a * b + c` on its own. So compiling the same source for AVX-512 or
//!   AVX2 (chosen at run time) or for plain SSE2 only changes how many lanes one instruction
//!   handles: every path gives the same bits (tests check it). Across machines `exp` (softmax,
//!   SiLU) is a fixed polynomial in plain multiplies and adds, not the platform's libm, so
//!   results are the same on every machine.
//! * Why fused: on Intel cores an FMA is one instruction on either of two ports where a
//!   multiply then an add is two, and the AVX-512 matmul kernel is bound by them (on AMD Zen 3,
//!   with separate add pipes, the two cost the same). The attention score kernel, with a
//!   16-lane reduction for every 64 products, was 1.4x faster fused on Zen 3 too.
//! * Attention for a (token, head) pair reads the cache rows `0..=pos` in order with a
//!   sequential softmax, whatever the batch.
//!
//! `unsafe` is needed in two places: calling the AVX-512- and AVX2-compiled copies after
//! checking at run time that the CPU has those features (the small `dispatch!` wrappers
//! below), and the hand-written kernels of `simd` (intrinsics, and one assembly
//! micro-kernel), where the compiler's output of the portable source is slow. Each is tested
//! bit for bit against the portable one, at every level the test machine has.
#![allow(unsafe_code)]

use std::ops::Range;

use kv_extract::{AlignedBuf, KvCache};
use rayon::prelude::*;

use crate::quant::QMatrix;

/// Independent partial sums per dot product: one AVX-512 register, two AVX2 registers, four
/// SSE registers. Part of the numeric definition: changing it changes every result.
pub const LANES: usize = 16;

/// Rows of `x` per matmul micro-kernel call ([`dot_2x3`]).
const MR: usize = 2;
/// Weight rows per matmul micro-kernel call (MR * NR * 2 AVX2 accumulators = 12 of 16).
const NR: usize = 3;
/// Rows of `x` swept per pass over a weight panel, so the rows stay in L2 across the panel.
const MB: usize = 32;

/// Calls `$portable` compiled for AVX-512 (as `$avx512`) or AVX2 and FMA (as `$avx2`), the
/// best the CPU has, and the baseline build otherwise. All come from the same
/// `#[inline(always)]` source, so they compute the same bits: Rust never contracts a multiply
/// and an add into an FMA, and `f32::mul_add` is the same fused operation in every build (an
/// instruction, or a call).
macro_rules! dispatch {
    ($avx512:ident, $avx2:ident, $portable:ident, fn($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn $avx512($($arg: $ty),*) $(-> $ret)? {
            $portable($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2($($arg: $ty),*) $(-> $ret)? {
            $portable($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        match simd::Level::best() {
            // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (`Level::best` checked), the only
            // requirement of the `#[target_feature]` function being called.
            Some(simd::Level::Avx512) => return unsafe { $avx512($($arg),*) },
            // SAFETY: as above, for AVX2 and FMA.
            Some(simd::Level::Avx2) => return unsafe { $avx2($($arg),*) },
            None => {}
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

/// How a [`Weight`]'s values are held; each variant has its own batch-invariant kernels.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum WeightData {
    /// Dequantized values, `rows * cols` of them.
    F32(Vec<f32>),
    /// GGUF blocks kept quantized, multiplied with integer dot products ([`crate::quant`]).
    Quant(QMatrix),
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

    /// A weight kept as quantized blocks.
    pub fn from_quant(q: QMatrix) -> Weight {
        Weight {
            rows: q.rows(),
            cols: q.cols(),
            data: WeightData::Quant(q),
        }
    }

    /// Stacks weights with the same column count into one (rows of the first, then of the
    /// second, ...): fused projections then need one pass over the input instead of several.
    /// Quantized parts of one kind stay quantized; any other mix is dequantized to f32.
    /// `None` if the column counts differ or `parts` is empty.
    pub fn concat_rows(parts: Vec<Weight>) -> Option<Weight> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let quant: Option<Vec<QMatrix>> = parts
            .iter()
            .map(|p| match &p.data {
                WeightData::Quant(q) => Some(q.clone()),
                WeightData::F32(_) => None,
            })
            .collect();
        if let Some(q) = quant.and_then(QMatrix::concat_rows) {
            return Some(Weight::from_quant(q));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for p in parts {
            data.extend_from_slice(&p.into_f32());
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
            WeightData::Quant(q) => q.row_into(r, out),
        }
    }

    /// All values as f32, row-major (dequantizing if need be).
    pub fn into_f32(self) -> Vec<f32> {
        match self.data {
            WeightData::F32(d) => d,
            WeightData::Quant(q) => q.to_f32(),
        }
    }

    /// Bytes of memory the values take.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(d) => d.len() * size_of::<f32>(),
            WeightData::Quant(q) => q.bytes(),
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

/// `acc[l] = fma(x[l], w[l], acc[l])` for the [`LANES`] lanes: one step of every dot product.
#[inline(always)]
fn fmadd(acc: &mut [f32; LANES], x: &[f32], w: &[f32]) {
    for l in 0..LANES {
        acc[l] = x[l].mul_add(w[l], acc[l]);
    }
}

/// Generates a micro-kernel computing `R x C` dot products of length `k` at once:
/// `out[i][j] = dot(xs[i], ws[j])`, each with exactly the operations of a lone [`dot`].
///
/// A macro rather than const generics: the accumulators must be indexed by literal constants
/// for LLVM to keep them in registers (with loops over `i` and `j` they stay in memory and the
/// kernel runs ~10x slower). The tail (`k % LANES` elements) is zero-padded to one more full
/// chunk, so every accumulator is only ever touched by `fmadd`.
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
        $( fmadd(&mut $acc[$i][$j], &$xs[$i][$off..$off + LANES], &$ws[$j][$off..$off + LANES]); )*
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
    dispatch!(
        dot_avx512,
        dot_avx2,
        dot_portable,
        fn(a: &[f32], b: &[f32]) -> f32
    );
}

/// The instruction set the kernels run at in this process: `avx512`, `avx2` or `portable`
/// (the best this CPU has, capped by `AGENTKV_SIMD`). Benchmarks report it.
pub fn isa_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    match simd::Level::best() {
        Some(simd::Level::Avx512) => "avx512",
        Some(simd::Level::Avx2) => "avx2",
        None => "portable",
    }
    #[cfg(not(target_arch = "x86_64"))]
    "portable"
}

/// Hand-written AVX-512 and AVX2 forms of the 16-lane dot products, for where the compiler's
/// output of the portable source is slow (the matmul tiles spill accumulators; attention
/// scores, where the out-of-line tree reduction is half the work of a 64-wide head). Same
/// operations per lane as [`fmadd`] and [`reduce`], so the same bits.
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::LANES;

    /// The x86-64 vector extensions the kernels are compiled for.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Level {
        /// AVX2 and FMA: 16 lanes are two registers.
        Avx2,
        /// AVX-512F (with AVX2 and FMA): 16 lanes are one register, and there are 32 of them.
        Avx512,
    }

    impl Level {
        /// The best level this CPU has, or `None` (the portable code).
        ///
        /// `AGENTKV_SIMD=avx2` or `=none` caps it, to compare the paths on one machine (they
        /// compute the same bits; only the speed differs).
        pub(crate) fn best() -> Option<Level> {
            static BEST: OnceLock<Option<Level>> = OnceLock::new();
            *BEST.get_or_init(|| {
                let cap = std::env::var("AGENTKV_SIMD").unwrap_or_default();
                let all = Level::all();
                match cap.as_str() {
                    "none" => None,
                    "avx2" => all.into_iter().find(|&l| l == Level::Avx2),
                    _ => all.last().copied(),
                }
            })
        }

        /// Every level this CPU has, lowest first (tests run each).
        pub(crate) fn all() -> Vec<Level> {
            let mut all = Vec::new();
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                all.push(Level::Avx2);
                if is_x86_feature_detected!("avx512f") {
                    all.push(Level::Avx512);
                }
            }
            all
        }

        /// Whether this CPU has `self`.
        fn present(self) -> bool {
            Level::all().contains(&self)
        }
    }

    /// `out[i * nb + j] = dot(a[i], b[j])` for `na` rows of `a` and `nb` rows of `b`, all `k`
    /// long (a multiple of [`LANES`]): the attention scores of several queries.
    ///
    /// # Panics
    /// If the CPU lacks `level` or a length is short.
    pub(crate) fn gram(
        level: Level,
        a: &[f32],
        na: usize,
        b: &[f32],
        nb: usize,
        k: usize,
        out: &mut [f32],
    ) {
        assert!(
            level.present(),
            "simd::gram at {level:?} on a CPU without it"
        );
        assert!(
            k.is_multiple_of(LANES),
            "simd::gram needs whole 16-lane chunks"
        );
        assert!(a.len() >= na * k && b.len() >= nb * k, "simd::gram rows");
        assert!(out.len() >= na * nb, "simd::gram output");
        // SAFETY: the CPU has `level` and the lengths are checked above: every micro-kernel
        // call reads rows i < na of a and j < nb of b, k values each, and writes
        // out[i * nb + j].
        unsafe {
            match level {
                Level::Avx2 => gram_avx2(a.as_ptr(), na, b.as_ptr(), nb, k, out),
                Level::Avx512 => gram_avx512(a.as_ptr(), na, b.as_ptr(), nb, k, out),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn gram_avx2(
        a: *const f32,
        na: usize,
        b: *const f32,
        nb: usize,
        k: usize,
        out: &mut [f32],
    ) {
        macro_rules! tile {
            ($r:literal, $c:literal, $i:expr, $j:expr) => {{
                let (i, j) = ($i, $j);
                let t = kernel::<$r, $c>(a.add(i * k), b.add(j * k), k);
                for (di, row) in t.iter().enumerate() {
                    out[(i + di) * nb + j..][..$c].copy_from_slice(row);
                }
            }};
        }
        // SAFETY: the caller's bounds (see `gram`).
        unsafe {
            let mut i = 0;
            if na == 1 {
                let mut j = 0;
                while j + 4 <= nb {
                    tile!(1, 4, 0, j);
                    j += 4;
                }
                for j in j..nb {
                    tile!(1, 1, 0, j);
                }
                return;
            }
            while i + 2 <= na {
                let mut j = 0;
                while j + 2 <= nb {
                    tile!(2, 2, i, j);
                    j += 2;
                }
                for j in j..nb {
                    tile!(2, 1, i, j);
                }
                i += 2;
            }
            if i < na {
                for j in 0..nb {
                    tile!(1, 1, i, j);
                }
            }
        }
    }

    /// Keys per AVX-512 score tile: their 16 sums are reduced together ([`reduce16`]).
    const KEYS512: usize = 16;

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn gram_avx512(
        a: *const f32,
        na: usize,
        b: *const f32,
        nb: usize,
        k: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's bounds (see `gram`).
        unsafe {
            // Blocks of 16 keys (16 KiB at most for 64-wide heads: they stay in L1 while
            // every query sweeps them), each query's 16 scores from one tile.
            let full = nb - nb % KEYS512;
            if k == 64 {
                for j in (0..full).step_by(KEYS512) {
                    // The next block's 64 lines, spread over the first (up to 16) queries: the
                    // first query's loads of a block otherwise wait on memory, the hardware
                    // prefetcher not running far enough ahead.
                    let next = b.add((j + KEYS512) * k);
                    let per = 64usize.div_ceil(na.clamp(1, 16));
                    for i in 0..na {
                        if j + KEYS512 < full {
                            for l in (i * per).min(64)..((i + 1) * per).min(64) {
                                _mm_prefetch::<_MM_HINT_T0>(next.add(l * 16).cast());
                            }
                        }
                        let scores = kernel512_1x16_k64(a.add(i * k), b.add(j * k));
                        out[i * nb + j..][..KEYS512].copy_from_slice(&scores);
                    }
                }
            } else {
                for j in (0..full).step_by(KEYS512) {
                    for i in 0..na {
                        let scores = kernel512_1x16(a.add(i * k), b.add(j * k), k);
                        out[i * nb + j..][..KEYS512].copy_from_slice(&scores);
                    }
                }
            }
            for i in 0..na {
                let mut j = full;
                while j + 4 <= nb {
                    let t = kernel512::<1, 4>(a.add(i * k), b.add(j * k), k);
                    out[i * nb + j..][..4].copy_from_slice(&t[0]);
                    j += 4;
                }
                for j in j..nb {
                    out[i * nb + j] = kernel512::<1, 1>(a.add(i * k), b.add(j * k), k)[0][0];
                }
            }
        }
    }

    /// The dot products of row `a` with the 16 rows of `b` (`k` apart), reduced together.
    ///
    /// # Safety
    /// AVX-512F is available; `a` has `k` values and `b` has `16 * k`, `k % 16 == 0`.
    #[inline(always)]
    unsafe fn kernel512_1x16(a: *const f32, b: *const f32, k: usize) -> [f32; KEYS512] {
        // SAFETY: the caller's contract.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); KEYS512];
            for c in (0..k).step_by(LANES) {
                let x = _mm512_loadu_ps(a.add(c));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(x, _mm512_loadu_ps(b.add(j * k + c)), *acc);
                }
            }
            let mut out = [0.0f32; KEYS512];
            _mm512_storeu_ps(out.as_mut_ptr(), reduce16(&acc));
            out
        }
    }

    /// [`kernel512_1x16`] for rows 64 long (SmolLM2's head width), in assembly: each K value
    /// is a memory operand at a constant offset from one pointer. (From the intrinsics, LLVM
    /// either chains a pointer addition per key, one multiply-add per cycle, or hoists the 64
    /// K loads out of the loop over queries and spills them to the stack.) Per lane the same
    /// fused multiply-adds from zero as [`super::fmadd`], so the same bits.
    ///
    /// # Safety
    /// AVX-512F is available; `a` has 64 values and `b` has `16 * 64`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn kernel512_1x16_k64(a: *const f32, b: *const f32) -> [f32; KEYS512] {
        // SAFETY: the caller's contract; every load is within the rows.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); KEYS512];
            std::arch::asm!(
                "vmovups zmm16, [{a}]",
                "vmovups zmm17, [{a} + 64]",
                "vmovups zmm18, [{a} + 128]",
                "vmovups zmm19, [{a} + 192]",
                "vxorps zmm0, zmm0, zmm0",
                "vxorps zmm1, zmm1, zmm1",
                "vxorps zmm2, zmm2, zmm2",
                "vxorps zmm3, zmm3, zmm3",
                "vxorps zmm4, zmm4, zmm4",
                "vxorps zmm5, zmm5, zmm5",
                "vxorps zmm6, zmm6, zmm6",
                "vxorps zmm7, zmm7, zmm7",
                "vxorps zmm8, zmm8, zmm8",
                "vxorps zmm9, zmm9, zmm9",
                "vxorps zmm10, zmm10, zmm10",
                "vxorps zmm11, zmm11, zmm11",
                "vxorps zmm12, zmm12, zmm12",
                "vxorps zmm13, zmm13, zmm13",
                "vxorps zmm14, zmm14, zmm14",
                "vxorps zmm15, zmm15, zmm15",
                "vfmadd231ps zmm0, zmm16, [{b}]",
                "vfmadd231ps zmm1, zmm16, [{b} + 256]",
                "vfmadd231ps zmm2, zmm16, [{b} + 512]",
                "vfmadd231ps zmm3, zmm16, [{b} + 768]",
                "vfmadd231ps zmm4, zmm16, [{b} + 1024]",
                "vfmadd231ps zmm5, zmm16, [{b} + 1280]",
                "vfmadd231ps zmm6, zmm16, [{b} + 1536]",
                "vfmadd231ps zmm7, zmm16, [{b} + 1792]",
                "vfmadd231ps zmm8, zmm16, [{b} + 2048]",
                "vfmadd231ps zmm9, zmm16, [{b} + 2304]",
                "vfmadd231ps zmm10, zmm16, [{b} + 2560]",
                "vfmadd231ps zmm11, zmm16, [{b} + 2816]",
                "vfmadd231ps zmm12, zmm16, [{b} + 3072]",
                "vfmadd231ps zmm13, zmm16, [{b} + 3328]",
                "vfmadd231ps zmm14, zmm16, [{b} + 3584]",
                "vfmadd231ps zmm15, zmm16, [{b} + 3840]",
                "vfmadd231ps zmm0, zmm17, [{b} + 64]",
                "vfmadd231ps zmm1, zmm17, [{b} + 320]",
                "vfmadd231ps zmm2, zmm17, [{b} + 576]",
                "vfmadd231ps zmm3, zmm17, [{b} + 832]",
                "vfmadd231ps zmm4, zmm17, [{b} + 1088]",
                "vfmadd231ps zmm5, zmm17, [{b} + 1344]",
                "vfmadd231ps zmm6, zmm17, [{b} + 1600]",
                "vfmadd231ps zmm7, zmm17, [{b} + 1856]",
                "vfmadd231ps zmm8, zmm17, [{b} + 2112]",
                "vfmadd231ps zmm9, zmm17, [{b} + 2368]",
                "vfmadd231ps zmm10, zmm17, [{b} + 2624]",
                "vfmadd231ps zmm11, zmm17, [{b} + 2880]",
                "vfmadd231ps zmm12, zmm17, [{b} + 3136]",
                "vfmadd231ps zmm13, zmm17, [{b} + 3392]",
                "vfmadd231ps zmm14, zmm17, [{b} + 3648]",
                "vfmadd231ps zmm15, zmm17, [{b} + 3904]",
                "vfmadd231ps zmm0, zmm18, [{b} + 128]",
                "vfmadd231ps zmm1, zmm18, [{b} + 384]",
                "vfmadd231ps zmm2, zmm18, [{b} + 640]",
                "vfmadd231ps zmm3, zmm18, [{b} + 896]",
                "vfmadd231ps zmm4, zmm18, [{b} + 1152]",
                "vfmadd231ps zmm5, zmm18, [{b} + 1408]",
                "vfmadd231ps zmm6, zmm18, [{b} + 1664]",
                "vfmadd231ps zmm7, zmm18, [{b} + 1920]",
                "vfmadd231ps zmm8, zmm18, [{b} + 2176]",
                "vfmadd231ps zmm9, zmm18, [{b} + 2432]",
                "vfmadd231ps zmm10, zmm18, [{b} + 2688]",
                "vfmadd231ps zmm11, zmm18, [{b} + 2944]",
                "vfmadd231ps zmm12, zmm18, [{b} + 3200]",
                "vfmadd231ps zmm13, zmm18, [{b} + 3456]",
                "vfmadd231ps zmm14, zmm18, [{b} + 3712]",
                "vfmadd231ps zmm15, zmm18, [{b} + 3968]",
                "vfmadd231ps zmm0, zmm19, [{b} + 192]",
                "vfmadd231ps zmm1, zmm19, [{b} + 448]",
                "vfmadd231ps zmm2, zmm19, [{b} + 704]",
                "vfmadd231ps zmm3, zmm19, [{b} + 960]",
                "vfmadd231ps zmm4, zmm19, [{b} + 1216]",
                "vfmadd231ps zmm5, zmm19, [{b} + 1472]",
                "vfmadd231ps zmm6, zmm19, [{b} + 1728]",
                "vfmadd231ps zmm7, zmm19, [{b} + 1984]",
                "vfmadd231ps zmm8, zmm19, [{b} + 2240]",
                "vfmadd231ps zmm9, zmm19, [{b} + 2496]",
                "vfmadd231ps zmm10, zmm19, [{b} + 2752]",
                "vfmadd231ps zmm11, zmm19, [{b} + 3008]",
                "vfmadd231ps zmm12, zmm19, [{b} + 3264]",
                "vfmadd231ps zmm13, zmm19, [{b} + 3520]",
                "vfmadd231ps zmm14, zmm19, [{b} + 3776]",
                "vfmadd231ps zmm15, zmm19, [{b} + 4032]",
                a = in(reg) a,
                b = in(reg) b,
                out("zmm0") acc[0],
                out("zmm1") acc[1],
                out("zmm2") acc[2],
                out("zmm3") acc[3],
                out("zmm4") acc[4],
                out("zmm5") acc[5],
                out("zmm6") acc[6],
                out("zmm7") acc[7],
                out("zmm8") acc[8],
                out("zmm9") acc[9],
                out("zmm10") acc[10],
                out("zmm11") acc[11],
                out("zmm12") acc[12],
                out("zmm13") acc[13],
                out("zmm14") acc[14],
                out("zmm15") acc[15],
                out("zmm16") _,
                out("zmm17") _,
                out("zmm18") _,
                out("zmm19") _,
                options(nostack, readonly, pure),
            );
            let mut out = [0.0f32; KEYS512];
            _mm512_storeu_ps(out.as_mut_ptr(), reduce16(&acc));
            out
        }
    }

    /// Weighted V sums of six queries over a run of V rows, for 64-wide heads: for each
    /// query `q` and row `j` of `0..n`, in order, `o[q] = fma(p[q][j], v[j], o[q])`, where
    /// `o[q]` is `o[q * 64..][..64]` and `p[q]` is `p.add(q * stride)`.
    ///
    /// In assembly so that each V row is loaded once into registers for the six queries (the
    /// compiler's output of the portable loop loads it again for every query, and the loads,
    /// not the multiply-adds, set its speed). 24 accumulators, four V registers and one
    /// broadcast weight. Per lane the same fused multiply-adds in the same order as
    /// [`super::accumulate`], so the same bits.
    ///
    /// # Safety
    /// AVX-512F is available; `o` has `6 * 64` values, each `p[q]` has `n` and `v` has `n * 64`.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn pv512_6x64(
        o: *mut f32,
        p: *const f32,
        stride: usize,
        v: *const f32,
        n: usize,
    ) {
        // SAFETY: the caller's contract. The loop body runs n times (n > 0 is checked first, as
        // the loop tests its bound at the end); every access is within the rows.
        unsafe {
            if n == 0 {
                return;
            }
            std::arch::asm!(
                "vmovups zmm0, [{o} + 0]",
                "vmovups zmm1, [{o} + 64]",
                "vmovups zmm2, [{o} + 128]",
                "vmovups zmm3, [{o} + 192]",
                "vmovups zmm4, [{o} + 256]",
                "vmovups zmm5, [{o} + 320]",
                "vmovups zmm6, [{o} + 384]",
                "vmovups zmm7, [{o} + 448]",
                "vmovups zmm8, [{o} + 512]",
                "vmovups zmm9, [{o} + 576]",
                "vmovups zmm10, [{o} + 640]",
                "vmovups zmm11, [{o} + 704]",
                "vmovups zmm12, [{o} + 768]",
                "vmovups zmm13, [{o} + 832]",
                "vmovups zmm14, [{o} + 896]",
                "vmovups zmm15, [{o} + 960]",
                "vmovups zmm16, [{o} + 1024]",
                "vmovups zmm17, [{o} + 1088]",
                "vmovups zmm18, [{o} + 1152]",
                "vmovups zmm19, [{o} + 1216]",
                "vmovups zmm20, [{o} + 1280]",
                "vmovups zmm21, [{o} + 1344]",
                "vmovups zmm22, [{o} + 1408]",
                "vmovups zmm23, [{o} + 1472]",
                "2:",
                "vmovups zmm24, [{v} + 0]",
                "vmovups zmm25, [{v} + 64]",
                "vmovups zmm26, [{v} + 128]",
                "vmovups zmm27, [{v} + 192]",
                "vbroadcastss zmm28, [{p0} + {off}]",
                "vfmadd231ps zmm0, zmm28, zmm24",
                "vfmadd231ps zmm1, zmm28, zmm25",
                "vfmadd231ps zmm2, zmm28, zmm26",
                "vfmadd231ps zmm3, zmm28, zmm27",
                "vbroadcastss zmm28, [{p1} + {off}]",
                "vfmadd231ps zmm4, zmm28, zmm24",
                "vfmadd231ps zmm5, zmm28, zmm25",
                "vfmadd231ps zmm6, zmm28, zmm26",
                "vfmadd231ps zmm7, zmm28, zmm27",
                "vbroadcastss zmm28, [{p2} + {off}]",
                "vfmadd231ps zmm8, zmm28, zmm24",
                "vfmadd231ps zmm9, zmm28, zmm25",
                "vfmadd231ps zmm10, zmm28, zmm26",
                "vfmadd231ps zmm11, zmm28, zmm27",
                "vbroadcastss zmm28, [{p3} + {off}]",
                "vfmadd231ps zmm12, zmm28, zmm24",
                "vfmadd231ps zmm13, zmm28, zmm25",
                "vfmadd231ps zmm14, zmm28, zmm26",
                "vfmadd231ps zmm15, zmm28, zmm27",
                "vbroadcastss zmm28, [{p4} + {off}]",
                "vfmadd231ps zmm16, zmm28, zmm24",
                "vfmadd231ps zmm17, zmm28, zmm25",
                "vfmadd231ps zmm18, zmm28, zmm26",
                "vfmadd231ps zmm19, zmm28, zmm27",
                "vbroadcastss zmm28, [{p5} + {off}]",
                "vfmadd231ps zmm20, zmm28, zmm24",
                "vfmadd231ps zmm21, zmm28, zmm25",
                "vfmadd231ps zmm22, zmm28, zmm26",
                "vfmadd231ps zmm23, zmm28, zmm27",
                "add {v}, 256",
                "add {off}, 4",
                "cmp {off}, {end}",
                "jb 2b",
                "vmovups [{o} + 0], zmm0",
                "vmovups [{o} + 64], zmm1",
                "vmovups [{o} + 128], zmm2",
                "vmovups [{o} + 192], zmm3",
                "vmovups [{o} + 256], zmm4",
                "vmovups [{o} + 320], zmm5",
                "vmovups [{o} + 384], zmm6",
                "vmovups [{o} + 448], zmm7",
                "vmovups [{o} + 512], zmm8",
                "vmovups [{o} + 576], zmm9",
                "vmovups [{o} + 640], zmm10",
                "vmovups [{o} + 704], zmm11",
                "vmovups [{o} + 768], zmm12",
                "vmovups [{o} + 832], zmm13",
                "vmovups [{o} + 896], zmm14",
                "vmovups [{o} + 960], zmm15",
                "vmovups [{o} + 1024], zmm16",
                "vmovups [{o} + 1088], zmm17",
                "vmovups [{o} + 1152], zmm18",
                "vmovups [{o} + 1216], zmm19",
                "vmovups [{o} + 1280], zmm20",
                "vmovups [{o} + 1344], zmm21",
                "vmovups [{o} + 1408], zmm22",
                "vmovups [{o} + 1472], zmm23",
                o = in(reg) o,
                p0 = in(reg) p,
                p1 = in(reg) p.add(stride),
                p2 = in(reg) p.add(2 * stride),
                p3 = in(reg) p.add(3 * stride),
                p4 = in(reg) p.add(4 * stride),
                p5 = in(reg) p.add(5 * stride),
                v = inout(reg) v => _,
                off = inout(reg) 0usize => _,
                end = in(reg) n * size_of::<f32>(),
                out("zmm0") _,
                out("zmm1") _,
                out("zmm2") _,
                out("zmm3") _,
                out("zmm4") _,
                out("zmm5") _,
                out("zmm6") _,
                out("zmm7") _,
                out("zmm8") _,
                out("zmm9") _,
                out("zmm10") _,
                out("zmm11") _,
                out("zmm12") _,
                out("zmm13") _,
                out("zmm14") _,
                out("zmm15") _,
                out("zmm16") _,
                out("zmm17") _,
                out("zmm18") _,
                out("zmm19") _,
                out("zmm20") _,
                out("zmm21") _,
                out("zmm22") _,
                out("zmm23") _,
                out("zmm24") _,
                out("zmm25") _,
                out("zmm26") _,
                out("zmm27") _,
                out("zmm28") _,
                options(nostack),
            );
        }
    }

    /// [`reduce512`] of 16 registers at once: lane `j` of the result is `reduce512(acc[j])`,
    /// with the same additions in the same tree (each step adds pairs of lanes of one
    /// accumulator, which shuffles first bring into the same lane). 45 instructions for 16
    /// sums, where 16 separate reductions take about 120.
    ///
    /// # Safety
    /// AVX-512F is available.
    #[inline(always)]
    unsafe fn reduce16(acc: &[__m512; KEYS512]) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe {
            // Inputs in transposed order: the shuffles below leave A[4p + q]'s sum in lane
            // 4q + p, so A[4p + q] = acc[4q + p] puts acc[j]'s sum in lane j.
            let a = |i: usize| acc[(i % 4) * 4 + i / 4];
            // s8[l] = x[l] + x[l + 8]: quarters (0, 2) and (1, 3) of A[2m] and A[2m + 1].
            let s: [__m512; 8] = std::array::from_fn(|m| {
                let (p, q) = (a(2 * m), a(2 * m + 1));
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x44>(p, q),
                    _mm512_shuffle_f32x4::<0xEE>(p, q),
                )
            });
            // s4[l] = s8[l] + s8[l + 4]: quarter q of u[n] is A[4n + q]'s s4.
            let u: [__m512; 4] = std::array::from_fn(|n| {
                let (p, q) = (s[2 * n], s[2 * n + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x88>(p, q),
                    _mm512_shuffle_f32x4::<0xDD>(p, q),
                )
            });
            // (s4[0] + s4[2]) + (s4[1] + s4[3]) within each quarter.
            let w: [__m512; 2] = std::array::from_fn(|n| {
                let (p, q) = (u[2 * n], u[2 * n + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_ps::<0x44>(p, q),
                    _mm512_shuffle_ps::<0xEE>(p, q),
                )
            });
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x88>(w[0], w[1]),
                _mm512_shuffle_ps::<0xDD>(w[0], w[1]),
            )
        }
    }

    /// One weight panel against rows of `x`, as [`super::panel_portable`] computes it:
    /// `out[i * ld + j] = dot(x[i], w[j])` for the `rows` rows of `w`, all `k` long (a multiple
    /// of [`LANES`]).
    ///
    /// # Panics
    /// If the CPU lacks `level` or a length is short.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn panel(
        level: Level,
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        rows: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        assert!(
            level.present(),
            "simd::panel at {level:?} on a CPU without it"
        );
        assert!(
            k.is_multiple_of(LANES),
            "simd::panel needs whole 16-lane chunks"
        );
        assert!(x.len() >= m * k && w.len() >= rows * k, "simd::panel rows");
        // SAFETY: the CPU has `level` and the input lengths are checked above: every
        // micro-kernel call reads rows i < m of x and j < rows of w, k values each. Writes are
        // indexed (bounds-checked).
        unsafe {
            match level {
                Level::Avx2 => panel_avx2(x.as_ptr(), m, k, w.as_ptr(), rows, out, ld),
                Level::Avx512 => panel_avx512(x.as_ptr(), m, k, w.as_ptr(), rows, out, ld),
            }
        }
    }

    /// Rows of `x` by weight rows per AVX-512 matmul tile: 24 accumulators, the tile's four
    /// weight chunks and one `x` chunk fill 29 of the 32 registers.
    const R512: usize = 6;
    const C512: usize = 4;

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn panel_avx512(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        rows: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        macro_rules! tile {
            ($r:expr, $c:literal, $i:expr, $j:expr) => {{
                let (i, j) = ($i, $j);
                let t = kernel512::<{ $r }, $c>(x.add(i * k), w.add(j * k), k);
                for (di, row) in t.iter().enumerate() {
                    out[(i + di) * ld + j..][..$c].copy_from_slice(row);
                }
            }};
        }
        // SAFETY: the caller's bounds (see `panel`).
        unsafe {
            for i0 in (0..m).step_by(super::MB) {
                let i1 = (i0 + super::MB).min(m);
                let mut j = 0;
                while j + C512 <= rows {
                    let mut i = i0;
                    while i + R512 <= i1 {
                        let t = kernel512_6x4(x.add(i * k), k, w.add(j * k));
                        for (di, row) in t.iter().enumerate() {
                            out[(i + di) * ld + j..][..C512].copy_from_slice(row);
                        }
                        i += R512;
                    }
                    if i + 4 <= i1 {
                        tile!(4, 4, i, j);
                        i += 4;
                    }
                    if i + 2 <= i1 {
                        tile!(2, 4, i, j);
                        i += 2;
                    }
                    if i < i1 {
                        tile!(1, 4, i, j);
                    }
                    j += C512;
                }
                for j in j..rows {
                    for i in i0..i1 {
                        tile!(1, 1, i, j);
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn panel_avx2(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        rows: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        macro_rules! tile {
            ($r:literal, $c:literal, $i:expr, $j:expr) => {{
                let (i, j) = ($i, $j);
                let t = kernel::<$r, $c>(x.add(i * k), w.add(j * k), k);
                for (di, row) in t.iter().enumerate() {
                    out[(i + di) * ld + j..][..$c].copy_from_slice(row);
                }
            }};
        }
        // SAFETY: the caller's bounds (see `panel`).
        unsafe {
            if m == 1 {
                let mut j = 0;
                while j + 4 <= rows {
                    tile!(1, 4, 0, j);
                    j += 4;
                }
                for j in j..rows {
                    tile!(1, 1, 0, j);
                }
                return;
            }
            for i0 in (0..m).step_by(super::MB) {
                let i1 = (i0 + super::MB).min(m);
                let mut j = 0;
                while j + 3 <= rows {
                    let mut i = i0;
                    while i + 2 <= i1 {
                        let t = kernel_2x3(x.add(i * k), x.add((i + 1) * k), w.add(j * k), k);
                        for (di, row) in t.iter().enumerate() {
                            out[(i + di) * ld + j..][..3].copy_from_slice(row);
                        }
                        i += 2;
                    }
                    if i < i1 {
                        tile!(1, 3, i, j);
                    }
                    j += 3;
                }
                for j in j..rows {
                    for i in i0..i1 {
                        tile!(1, 1, i, j);
                    }
                }
            }
        }
    }

    /// [`kernel`]`::<2, 3>` for rows `x0`, `x1` against the three rows of `w` (`k` apart), in
    /// assembly: the compiler's register allocation of the intrinsics spills accumulators.
    /// Twelve accumulators (`ymm0..=11`) and one `x` row's chunk (`ymm12..=13`); weight chunks
    /// are memory operands. Per lane it is the same fused multiply-add as [`super::fmadd`], so
    /// the same bits.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `x0` and `x1` point to `k` values, `w` to `3 * k`,
    /// `k % 16 == 0`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn kernel_2x3(x0: *const f32, x1: *const f32, w: *const f32, k: usize) -> [[f32; 3]; 2] {
        // SAFETY: the caller's contract. The loop body runs k / 16 times (k > 0 is checked
        // first, as the loop tests its bound at the end); every load is within the rows.
        unsafe {
            if k == 0 {
                return [[0.0; 3]; 2];
            }
            let (w0, w1, w2) = (w, w.add(k), w.add(2 * k));
            let mut a = [_mm256_setzero_ps(); 12];
            std::arch::asm!(
                "vxorps ymm0, ymm0, ymm0",
                "vxorps ymm1, ymm1, ymm1",
                "vxorps ymm2, ymm2, ymm2",
                "vxorps ymm3, ymm3, ymm3",
                "vxorps ymm4, ymm4, ymm4",
                "vxorps ymm5, ymm5, ymm5",
                "vxorps ymm6, ymm6, ymm6",
                "vxorps ymm7, ymm7, ymm7",
                "vxorps ymm8, ymm8, ymm8",
                "vxorps ymm9, ymm9, ymm9",
                "vxorps ymm10, ymm10, ymm10",
                "vxorps ymm11, ymm11, ymm11",
                "2:",
                "vmovups ymm12, [{x0} + {off}]",
                "vmovups ymm13, [{x0} + {off} + 32]",
                "vfmadd231ps ymm0, ymm12, [{w0} + {off}]",
                "vfmadd231ps ymm1, ymm13, [{w0} + {off} + 32]",
                "vfmadd231ps ymm2, ymm12, [{w1} + {off}]",
                "vfmadd231ps ymm3, ymm13, [{w1} + {off} + 32]",
                "vfmadd231ps ymm4, ymm12, [{w2} + {off}]",
                "vfmadd231ps ymm5, ymm13, [{w2} + {off} + 32]",
                "vmovups ymm12, [{x1} + {off}]",
                "vmovups ymm13, [{x1} + {off} + 32]",
                "vfmadd231ps ymm6, ymm12, [{w0} + {off}]",
                "vfmadd231ps ymm7, ymm13, [{w0} + {off} + 32]",
                "vfmadd231ps ymm8, ymm12, [{w1} + {off}]",
                "vfmadd231ps ymm9, ymm13, [{w1} + {off} + 32]",
                "vfmadd231ps ymm10, ymm12, [{w2} + {off}]",
                "vfmadd231ps ymm11, ymm13, [{w2} + {off} + 32]",
                "add {off}, 64",
                "cmp {off}, {end}",
                "jb 2b",
                x0 = in(reg) x0,
                x1 = in(reg) x1,
                w0 = in(reg) w0,
                w1 = in(reg) w1,
                w2 = in(reg) w2,
                off = inout(reg) 0usize => _,
                end = in(reg) k * size_of::<f32>(),
                out("ymm0") a[0],
                out("ymm1") a[1],
                out("ymm2") a[2],
                out("ymm3") a[3],
                out("ymm4") a[4],
                out("ymm5") a[5],
                out("ymm6") a[6],
                out("ymm7") a[7],
                out("ymm8") a[8],
                out("ymm9") a[9],
                out("ymm10") a[10],
                out("ymm11") a[11],
                out("ymm12") _,
                out("ymm13") _,
                options(nostack, readonly, pure),
            );
            let r = |n: usize| reduce([a[n], a[n + 1]]);
            [[r(0), r(2), r(4)], [r(6), r(8), r(10)]]
        }
    }

    /// [`kernel512`]`::<6, 4>` for the six rows of `x` (`k` apart) against the four rows of
    /// `w` (`k` apart), in assembly: the compiler's register allocation of the intrinsics
    /// spills accumulators. 24 accumulators (`zmm0..=23`), the chunk's four weight registers
    /// (`zmm24..=27`) and one `x` chunk (`zmm28`). Per lane the same fused multiply-add as
    /// [`super::fmadd`], so the same bits.
    ///
    /// # Safety
    /// AVX-512F is available; `x` points to `6 * k` values, `w` to `4 * k`, `k % 16 == 0`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn kernel512_6x4(x: *const f32, k: usize, w: *const f32) -> [[f32; 4]; 6] {
        // SAFETY: the caller's contract. The loop body runs k / 16 times (k > 0 is checked
        // first, as the loop tests its bound at the end); every load is within the rows.
        unsafe {
            if k == 0 {
                return [[0.0; 4]; 6];
            }
            let mut a = [_mm512_setzero_ps(); 24];
            std::arch::asm!(
                "vxorps zmm0, zmm0, zmm0",
                "vxorps zmm1, zmm1, zmm1",
                "vxorps zmm2, zmm2, zmm2",
                "vxorps zmm3, zmm3, zmm3",
                "vxorps zmm4, zmm4, zmm4",
                "vxorps zmm5, zmm5, zmm5",
                "vxorps zmm6, zmm6, zmm6",
                "vxorps zmm7, zmm7, zmm7",
                "vxorps zmm8, zmm8, zmm8",
                "vxorps zmm9, zmm9, zmm9",
                "vxorps zmm10, zmm10, zmm10",
                "vxorps zmm11, zmm11, zmm11",
                "vxorps zmm12, zmm12, zmm12",
                "vxorps zmm13, zmm13, zmm13",
                "vxorps zmm14, zmm14, zmm14",
                "vxorps zmm15, zmm15, zmm15",
                "vxorps zmm16, zmm16, zmm16",
                "vxorps zmm17, zmm17, zmm17",
                "vxorps zmm18, zmm18, zmm18",
                "vxorps zmm19, zmm19, zmm19",
                "vxorps zmm20, zmm20, zmm20",
                "vxorps zmm21, zmm21, zmm21",
                "vxorps zmm22, zmm22, zmm22",
                "vxorps zmm23, zmm23, zmm23",
                "2:",
                "vmovups zmm24, [{w0} + {off}]",
                "vmovups zmm25, [{w1} + {off}]",
                "vmovups zmm26, [{w2} + {off}]",
                "vmovups zmm27, [{w3} + {off}]",
                "vmovups zmm28, [{x0} + {off}]",
                "vfmadd231ps zmm0, zmm28, zmm24",
                "vfmadd231ps zmm1, zmm28, zmm25",
                "vfmadd231ps zmm2, zmm28, zmm26",
                "vfmadd231ps zmm3, zmm28, zmm27",
                "vmovups zmm28, [{x1} + {off}]",
                "vfmadd231ps zmm4, zmm28, zmm24",
                "vfmadd231ps zmm5, zmm28, zmm25",
                "vfmadd231ps zmm6, zmm28, zmm26",
                "vfmadd231ps zmm7, zmm28, zmm27",
                "vmovups zmm28, [{x2} + {off}]",
                "vfmadd231ps zmm8, zmm28, zmm24",
                "vfmadd231ps zmm9, zmm28, zmm25",
                "vfmadd231ps zmm10, zmm28, zmm26",
                "vfmadd231ps zmm11, zmm28, zmm27",
                "vmovups zmm28, [{x3} + {off}]",
                "vfmadd231ps zmm12, zmm28, zmm24",
                "vfmadd231ps zmm13, zmm28, zmm25",
                "vfmadd231ps zmm14, zmm28, zmm26",
                "vfmadd231ps zmm15, zmm28, zmm27",
                "vmovups zmm28, [{x4} + {off}]",
                "vfmadd231ps zmm16, zmm28, zmm24",
                "vfmadd231ps zmm17, zmm28, zmm25",
                "vfmadd231ps zmm18, zmm28, zmm26",
                "vfmadd231ps zmm19, zmm28, zmm27",
                "vmovups zmm28, [{x5} + {off}]",
                "vfmadd231ps zmm20, zmm28, zmm24",
                "vfmadd231ps zmm21, zmm28, zmm25",
                "vfmadd231ps zmm22, zmm28, zmm26",
                "vfmadd231ps zmm23, zmm28, zmm27",
                "add {off}, 64",
                "cmp {off}, {end}",
                "jb 2b",
                x0 = in(reg) x,
                x1 = in(reg) x.add(k),
                x2 = in(reg) x.add(2 * k),
                x3 = in(reg) x.add(3 * k),
                x4 = in(reg) x.add(4 * k),
                x5 = in(reg) x.add(5 * k),
                w0 = in(reg) w,
                w1 = in(reg) w.add(k),
                w2 = in(reg) w.add(2 * k),
                w3 = in(reg) w.add(3 * k),
                off = inout(reg) 0usize => _,
                end = in(reg) k * size_of::<f32>(),
                out("zmm0") a[0],
                out("zmm1") a[1],
                out("zmm2") a[2],
                out("zmm3") a[3],
                out("zmm4") a[4],
                out("zmm5") a[5],
                out("zmm6") a[6],
                out("zmm7") a[7],
                out("zmm8") a[8],
                out("zmm9") a[9],
                out("zmm10") a[10],
                out("zmm11") a[11],
                out("zmm12") a[12],
                out("zmm13") a[13],
                out("zmm14") a[14],
                out("zmm15") a[15],
                out("zmm16") a[16],
                out("zmm17") a[17],
                out("zmm18") a[18],
                out("zmm19") a[19],
                out("zmm20") a[20],
                out("zmm21") a[21],
                out("zmm22") a[22],
                out("zmm23") a[23],
                out("zmm24") _,
                out("zmm25") _,
                out("zmm26") _,
                out("zmm27") _,
                out("zmm28") _,
                options(nostack, readonly, pure),
            );
            // Rows 0..4 in one batched reduction, rows 4..6 (and eight zeros) in another: lane
            // 4i + j of each holds output (i, j) of its rows.
            let zero = _mm512_setzero_ps();
            let first: [__m512; 16] = std::array::from_fn(|n| a[n]);
            let rest: [__m512; 16] = std::array::from_fn(|n| if n < 8 { a[16 + n] } else { zero });
            let mut lanes = [0.0f32; 32];
            _mm512_storeu_ps(lanes.as_mut_ptr(), reduce16(&first));
            _mm512_storeu_ps(lanes.as_mut_ptr().add(16), reduce16(&rest));
            let mut out = [[0.0f32; 4]; 6];
            for (row, l) in out.iter_mut().zip(lanes.chunks_exact(4)) {
                row.copy_from_slice(l);
            }
            out
        }
    }

    /// `R x C` dot products of rows of `a` with rows of `b`, each in the 16-lane order of
    /// [`super::dot`]: lanes 0..8 and 8..16 are two registers.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `a` has `R` rows and `b` has `C` rows of `k` values,
    /// `k % 16 == 0`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // literal indices keep the accumulators in registers
    unsafe fn kernel<const R: usize, const C: usize>(
        a: *const f32,
        b: *const f32,
        k: usize,
    ) -> [[f32; C]; R] {
        // SAFETY: the caller's contract.
        unsafe {
            let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
            for c in (0..k).step_by(LANES) {
                for i in 0..R {
                    let ar = a.add(i * k + c);
                    let (x0, x1) = (_mm256_loadu_ps(ar), _mm256_loadu_ps(ar.add(8)));
                    for j in 0..C {
                        let br = b.add(j * k + c);
                        let (w0, w1) = (_mm256_loadu_ps(br), _mm256_loadu_ps(br.add(8)));
                        let a = &mut acc[i][j];
                        a[0] = _mm256_fmadd_ps(x0, w0, a[0]);
                        a[1] = _mm256_fmadd_ps(x1, w1, a[1]);
                    }
                }
            }
            let mut out = [[0.0f32; C]; R];
            for i in 0..R {
                for j in 0..C {
                    out[i][j] = reduce(acc[i][j]);
                }
            }
            out
        }
    }

    /// [`kernel`] with AVX-512: the 16 lanes are one register. Each chunk's `C` weight
    /// registers are loaded once and shared by the `R` rows of `a`.
    ///
    /// # Safety
    /// AVX-512F is available; `a` has `R` rows and `b` has `C` rows of `k` values,
    /// `k % 16 == 0`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // literal indices keep the accumulators in registers
    unsafe fn kernel512<const R: usize, const C: usize>(
        a: *const f32,
        b: *const f32,
        k: usize,
    ) -> [[f32; C]; R] {
        // SAFETY: the caller's contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for c in (0..k).step_by(LANES) {
                let mut w = [_mm512_setzero_ps(); C];
                for j in 0..C {
                    w[j] = _mm512_loadu_ps(b.add(j * k + c));
                }
                for i in 0..R {
                    let x = _mm512_loadu_ps(a.add(i * k + c));
                    for j in 0..C {
                        acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
                    }
                }
            }
            let mut out = [[0.0f32; C]; R];
            if R * C == KEYS512 {
                // Sixteen sums (the 4x4 tile): one batched reduction, lane i * C + j.
                let flat: [__m512; KEYS512] = std::array::from_fn(|n| acc[n / C][n % C]);
                let mut lanes = [0.0f32; KEYS512];
                _mm512_storeu_ps(lanes.as_mut_ptr(), reduce16(&flat));
                for (row, l) in out.iter_mut().zip(lanes.chunks_exact(C)) {
                    row.copy_from_slice(l);
                }
                return out;
            }
            for i in 0..R {
                for j in 0..C {
                    out[i][j] = reduce512(acc[i][j]);
                }
            }
            out
        }
    }

    /// [`super::reduce`] on 16 lanes held as two registers: lanes `l` and `l + 8`, then `l`
    /// and `l + 4`, then `(0 + 2) + (1 + 3)`.
    ///
    /// # Safety
    /// AVX is available.
    #[inline(always)]
    pub(crate) unsafe fn reduce(acc: [__m256; 2]) -> f32 {
        // SAFETY: the caller's contract.
        unsafe {
            let s8 = _mm256_add_ps(acc[0], acc[1]);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4)); // [s0 + s2, s1 + s3, ..]
            _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
        }
    }

    /// [`reduce`] on 16 lanes held as one AVX-512 register.
    ///
    /// # Safety
    /// AVX-512F is available.
    #[inline(always)]
    pub(crate) unsafe fn reduce512(acc: __m512) -> f32 {
        // SAFETY: the caller's contract.
        unsafe {
            let lo = _mm512_castps512_ps256(acc);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
            reduce([lo, hi])
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Matmul
// ---------------------------------------------------------------------------------------------

/// One weight panel against all rows of `x`: `out[i * ld + j] = dot(x[i], w[j])` for the
/// `rows` rows of `w` (`ld >= rows`: the panel may be a column block of a wider output).
#[inline(always)]
fn panel_portable(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    out: &mut [f32],
    ld: usize,
) {
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
        for (j, o) in out[..rows].iter_mut().enumerate().skip(j) {
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
                    out[(i + di) * ld + j..][..NR].copy_from_slice(ri);
                }
                i += MR;
            }
            while i < i1 {
                let r = dot_1x3([xrow(i)], ws, k);
                out[i * ld + j..][..NR].copy_from_slice(&r[0]);
                i += 1;
            }
            j += NR;
        }
        while j < rows {
            for i in i0..i1 {
                out[i * ld + j] = dot_1x1([xrow(i)], [wrow(j)], k)[0][0];
            }
            j += 1;
        }
    }
}

fn panel(x: &[f32], m: usize, k: usize, w: &[f32], rows: usize, out: &mut [f32], ld: usize) {
    #[cfg(target_arch = "x86_64")]
    if k.is_multiple_of(LANES)
        && let Some(level) = simd::Level::best()
    {
        simd::panel(level, x, m, k, w, rows, out, ld);
        return;
    }
    dispatch!(
        panel_avx512,
        panel_avx2,
        panel_portable,
        fn(x: &[f32], m: usize, k: usize, w: &[f32], rows: usize, out: &mut [f32], ld: usize)
    );
}

/// `y = x · Wᵀ` for `m` rows of `x` (`[m, w.cols()]`, row-major): returns `[m, w.rows()]`.
///
/// For f32 weights each output element is [`dot`]`(x[i], W[j])` bit for bit, whatever `m`
/// and the number of threads; work is split over the rows of `W`. Quantized weights give
/// bitwise the results of their dequantized f32 values (see `matmul_dequant`).
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
    // The kernels load 16-lane chunks from the start of each row; with rows a whole number of
    // cache lines wide, an aligned start means that no 32-byte load straddles two lines (each
    // such load costs two: about 30% of the matmul).
    let copy;
    let x = if AlignedBuf::is_aligned(x) {
        x
    } else {
        copy = AlignedBuf::from_slice(x);
        &copy
    };
    let wd = match &w.data {
        WeightData::F32(wd) => wd,
        WeightData::Quant(q) => return matmul_dequant(x, m, q),
    };
    // Each task owns a block of weight rows: its columns of y, as a [m, rows] chunk.
    let tasks = rayon::current_num_threads() * 4;
    let rows_per_task = n.div_ceil(tasks).next_multiple_of(NR);
    let mut chunks = vec![0.0f32; m * n];
    chunks
        .par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(c, out)| {
            let j0 = c * rows_per_task;
            let rows = out.len() / m;
            panel(x, m, k, &wd[j0 * k..(j0 + rows) * k], rows, out, rows);
        });
    join_columns(chunks, m, n, rows_per_task)
}

/// `y` (`[m, n]`, row-major) from the column blocks tasks computed: block `c` holds columns
/// `c * width..` as a row-major `[m, block width]` chunk, the chunks laid end to end.
///
/// Every copy is a run of a chunk's row: the transposed layout this replaced needed one
/// strided store per value, 7% of a 2048-token prefill.
fn join_columns(chunks: Vec<f32>, m: usize, n: usize, width: usize) -> Vec<f32> {
    if m == 1 {
        return chunks;
    }
    let mut y = vec![0.0f32; m * n];
    let fill = |(i, row): (usize, &mut [f32])| {
        for (c, dst) in row.chunks_mut(width).enumerate() {
            let w = dst.len();
            dst.copy_from_slice(&chunks[c * width * m + i * w..][..w]);
        }
    };
    if y.len() < 1 << 16 {
        // A few tokens' worth: not worth waking the other thread.
        y.chunks_mut(n).enumerate().for_each(fill);
    } else {
        y.par_chunks_mut(n).enumerate().for_each(fill);
    }
    y
}

/// Weight rows dequantized at a time by [`matmul_dequant`]: a multiple of the micro-kernels'
/// widths, small enough for the f32 copy to stay in L1/L2.
const DEQUANT_ROWS: usize = 12;

/// Dequantizes weight rows `r0..r0 + rows` into `buf` (at least `rows * cols` long) and
/// multiplies them with every row of `x` into `out[i * ld + j]` (see [`panel`]).
#[allow(clippy::too_many_arguments)]
fn dequant_panel(
    q: &QMatrix,
    r0: usize,
    rows: usize,
    x: &[f32],
    m: usize,
    buf: &mut [f32],
    out: &mut [f32],
    ld: usize,
) {
    let k = q.cols();
    let buf = &mut buf[..rows * k];
    crate::dequant::dequantize_rows(q, r0, rows, buf);
    panel(x, m, k, buf, rows, out, ld);
}

/// [`matmul`] for quantized weights: each task dequantizes a few rows at a time (exactly, as
/// the GGUF reference does) and runs the f32 kernels on them, so results are bitwise those of
/// the fully dequantized matrix while only the quantized blocks stream from memory. A single
/// row (decode) goes to [`crate::dequant::gemv`], which does the same without the buffer.
///
/// Why not llama.cpp's integer dot products against 8-bit-quantized activations (an earlier
/// `quant::matmul`, since removed)? With SmolLM2-135M that quantization changes greedy
/// answers (llama.cpp itself answers "La femme de France, ..." to the capital-of-France
/// prompt); f32 activations keep "The capital of France is Paris.".
fn matmul_dequant(x: &[f32], m: usize, q: &QMatrix) -> Vec<f32> {
    let (n, k) = (q.rows(), q.cols());
    if m == 0 || n == 0 {
        return Vec::new();
    }
    debug_assert_eq!(x.len(), m * k);
    let tasks = rayon::current_num_threads() * 4;
    if m == 1 {
        // Decode: blocks are widened in registers, never written out.
        let mut y = vec![0.0f32; n];
        let rows_per_task = n.div_ceil(tasks);
        y.par_chunks_mut(rows_per_task)
            .enumerate()
            .for_each(|(c, out)| crate::dequant::gemv(q, c * rows_per_task, x, out));
        return y;
    }
    let rows_per_task = n.div_ceil(tasks).next_multiple_of(DEQUANT_ROWS);
    let mut chunks = vec![0.0f32; m * n];
    chunks
        .par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each_init(
            || AlignedBuf::zeros(DEQUANT_ROWS * k),
            |buf, (c, out)| {
                let (j0, width) = (c * rows_per_task, out.len() / m);
                for s in (0..width).step_by(DEQUANT_ROWS) {
                    let rows = DEQUANT_ROWS.min(width - s);
                    dequant_panel(q, j0 + s, rows, x, m, buf, &mut out[s..], width);
                }
            },
        );
    join_columns(chunks, m, n, rows_per_task)
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
        out.extend(g.iter().zip(u).map(|(&g, &u)| (g / (1.0 + exp(-g))) * u));
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

/// `exp(x)`, with the Cephes single-precision polynomial (about 1 ulp), in plain multiplies
/// and adds so that every build (SSE2, AVX2, any vector width) gives the same bits, unlike a
/// platform libm. Inputs below -87 give a tiny positive number rather than a subnormal.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes' 5.0000001201e-1, which rounds to 0.5 in f32
    let y = (p * (r * r) + r) + 1.0;
    // `n` as an integer, read from the bits of `t` (in [2^23, 2^24) one unit is one ulp): the
    // same value as `n as i32`, without the saturating conversion that keeps loops of `exp`
    // from vectorizing.
    let n_int = t.to_bits().wrapping_sub(MAGIC.to_bits());
    y * f32::from_bits(n_int.wrapping_add(127) << 23)
}

/// Queries of one attention task: query row `q[i]` sees cached positions `0..lens[i]`.
struct Queries<'a> {
    q: &'a [f32],
    lens: &'a [usize],
}

/// Attention of a set of queries sharing one KV head: scores against every K row any of them
/// sees, a softmax per query, then the weighted sum of V rows in position order.
///
/// Each query's result depends only on that query and its rows: its scores are [`dot`] bit
/// for bit, its softmax is [`scale_and_max`] and [`exp_and_sum`], and its V sums are
/// [`accumulate`]'s. Batching queries only shares loads.
#[inline(always)]
fn attend_portable(
    qs: Queries<'_>,
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let nq = qs.lens.len();
    let len = qs.lens.iter().copied().max().unwrap_or(0);
    let qrow = |i: usize| &qs.q[i * d..(i + 1) * d];
    let krow = |j: usize| &k[j * d..(j + 1) * d];
    scores.clear();
    scores.resize(nq * len, 0.0);
    // Scores: the AVX2 kernel when it applies, else two queries by three K rows at a time.
    let done = gram_simd(qs.q, nq, k, len, d, scores);
    let mut j = if done { len } else { 0 };
    while j + NR <= len {
        let ks = [krow(j), krow(j + 1), krow(j + 2)];
        let mut i = 0;
        while i + MR <= nq {
            let r = dot_2x3([qrow(i), qrow(i + 1)], ks, d);
            for (di, row) in r.iter().enumerate() {
                scores[(i + di) * len + j..][..NR].copy_from_slice(row);
            }
            i += MR;
        }
        if i < nq {
            let r = dot_1x3([qrow(i)], ks, d);
            scores[i * len + j..][..NR].copy_from_slice(&r[0]);
        }
        j += NR;
    }
    for j in j..len {
        for i in 0..nq {
            scores[i * len + j] = dot_1x1([qrow(i)], [krow(j)], d)[0][0];
        }
    }
    // Softmax numerators and their sums, per query.
    let mut sums = [0.0f32; 64];
    let mut sums_vec;
    let sums: &mut [f32] = if nq <= 64 {
        &mut sums[..nq]
    } else {
        sums_vec = vec![0.0f32; nq];
        &mut sums_vec
    };
    for ((i, &n), sum) in qs.lens.iter().enumerate().zip(sums.iter_mut()) {
        let s = &mut scores[i * len..i * len + n];
        let max = scale_and_max(s, scale);
        *sum = exp_and_sum(s, max);
    }
    // Weighted V sums: V rows in chunks that stay in L1 while every query sweeps them, up to
    // six queries at a time sharing each row's loads.
    const CHUNK: usize = 64;
    let pv6 = d == 64 && pv6_available();
    out.fill(0.0);
    for j0 in (0..len).step_by(CHUNK) {
        let end = |i: usize| qs.lens[i].clamp(j0, j0 + CHUNK);
        let mut i = 0;
        while i < nq {
            let group = match nq - i {
                r if r >= 6 && pv6 => 6,
                r if r >= 4 => 4,
                r => r.min(2),
            };
            // Rows every query of the group sees together, then each one's own rest.
            let common = (i..i + group).map(end).min().unwrap_or(j0);
            accumulate_group(
                &mut out[i * d..],
                &scores[i * len..],
                len,
                j0..common,
                v,
                d,
                group,
            );
            for q in i..i + group {
                let rest = common..end(q);
                accumulate_group(&mut out[q * d..], &scores[q * len..], len, rest, v, d, 1);
            }
            i += group;
        }
    }
    for (o, sum) in out.chunks_exact_mut(d).zip(sums.iter()) {
        let inv = 1.0 / sum;
        for o in o.iter_mut() {
            *o *= inv;
        }
    }
}

/// Multiplies `s` by `scale` in place and returns the largest result (`-inf` if empty).
///
/// The maximum is taken over sixteen interleaved partial maxima: the same value as a
/// sequential fold, since `max` is exact (a `±0` tie can pick either zero, which `x - max` then
/// cannot tell apart). `if x > m` rather than `f32::max` compiles to one `max` instruction; the
/// two agree on NaN too, which neither lets through.
#[inline(always)]
fn scale_and_max(s: &mut [f32], scale: f32) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] *= scale;
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    for x in chunks.into_remainder() {
        *x *= scale;
        m[0] = m[0].max(*x);
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Replaces each score `x` of one query by `exp(x - max)` and returns their sum.
///
/// The sum has sixteen lanes of partial sums (position `j` adds into lane `j % 16`, in position
/// order), folded by [`reduce`]'s tree: part of the numeric definition, like a dot product's
/// lanes. The lanes are independent chains, so the loop runs at the speed of `exp`.
#[inline(always)]
fn exp_and_sum(s: &mut [f32], max: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - max);
            acc[l] += c[l];
        }
    }
    for (x, a) in chunks.into_remainder().iter_mut().zip(&mut acc) {
        *x = exp(*x - max);
        *a += *x;
    }
    reduce(&acc)
}

/// Every `dot(a[i], b[j])` into `out[i * nb + j]` with [`simd::gram`] when the CPU has AVX2
/// and FMA and the rows are whole 16-lane chunks; `false` (nothing written) otherwise.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn gram_simd(a: &[f32], na: usize, b: &[f32], nb: usize, k: usize, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if k.is_multiple_of(LANES)
        && let Some(level) = simd::Level::best()
    {
        simd::gram(level, a, na, b, nb, k, out);
        return true;
    }
    false
}

/// For each of `Q` queries `q`, `o[q] = fma(p, v[j], o[q])` for the V rows `j` in `rows`, in
/// order, where `p = scores[q * len + j]` and `o[q]` is `o[q * D..][..D]`.
///
/// Each query's sums are the same operations whatever `Q` is: queries share only the loads
/// of V rows. Four queries keep 16 independent fused chains in flight (with one query, each
/// chain waits on the latency of the one before).
#[inline(always)]
fn accumulate<const D: usize, const Q: usize>(
    o: &mut [f32],
    scores: &[f32],
    len: usize,
    rows: Range<usize>,
    v: &[f32],
) {
    let mut acc = [[0.0f32; D]; Q];
    for (q, a) in acc.iter_mut().enumerate() {
        a.copy_from_slice(&o[q * D..(q + 1) * D]);
    }
    for j in rows {
        let vrow: &[f32; D] = v[j * D..(j + 1) * D].try_into().expect("head width");
        for (q, a) in acc.iter_mut().enumerate() {
            let p = scores[q * len + j];
            for l in 0..D {
                a[l] = p.mul_add(vrow[l], a[l]);
            }
        }
    }
    for (q, a) in acc.iter().enumerate() {
        o[q * D..(q + 1) * D].copy_from_slice(a);
    }
}

/// [`accumulate`] for the `group` queries whose outputs start `o` (`d` values each) and whose
/// scores start `scores` (`len` apart): the 64-wide kernels for SmolLM2's heads (six queries
/// only when [`pv6_available`]), [`accumulate_any`] for other widths.
#[inline(always)]
fn accumulate_group(
    o: &mut [f32],
    scores: &[f32],
    len: usize,
    rows: Range<usize>,
    v: &[f32],
    d: usize,
    group: usize,
) {
    let o = &mut o[..group * d];
    match (d, group) {
        (64, 6) => accumulate6(o, scores, len, rows, v),
        (64, 4) => accumulate::<64, 4>(o, scores, len, rows, v),
        (64, 2) => accumulate::<64, 2>(o, scores, len, rows, v),
        (64, 1) => accumulate::<64, 1>(o, scores, len, rows, v),
        _ => accumulate_any(o, scores, len, rows, v, d),
    }
}

/// Whether [`accumulate6`] has its AVX-512 kernel on this CPU.
#[inline(always)]
fn pv6_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd::Level::best() == Some(simd::Level::Avx512) {
        return true;
    }
    false
}

/// [`accumulate`]`::<64, 6>` with [`simd::pv512_6x64`]; only called when
/// [`pv6_available`].
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn accumulate6(o: &mut [f32], scores: &[f32], len: usize, rows: Range<usize>, v: &[f32]) {
    assert!(
        o.len() == 6 * 64 && rows.start <= rows.end,
        "accumulate6 rows"
    );
    assert!(
        scores.len() >= 5 * len + rows.end && v.len() >= rows.end * 64,
        "accumulate6 bounds"
    );
    #[cfg(target_arch = "x86_64")]
    {
        assert!(pv6_available(), "accumulate6 without AVX-512");
        // SAFETY: the CPU has AVX-512F (checked above); `o` has six 64-wide rows, query q's
        // weights scores[q * len + j] and the V rows j * 64.. for j in `rows` are in bounds
        // (checked above: q * len + j < 5 * len + rows.end for q < 6 and j in `rows`).
        unsafe {
            simd::pv512_6x64(
                o.as_mut_ptr(),
                scores.as_ptr().add(rows.start),
                len,
                v.as_ptr().add(rows.start * 64),
                rows.len(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("accumulate6 is only called with AVX-512");
}

/// [`accumulate`] for any head width `d`, one query after another.
#[inline(always)]
fn accumulate_any(
    o: &mut [f32],
    scores: &[f32],
    len: usize,
    rows: Range<usize>,
    v: &[f32],
    d: usize,
) {
    for (q, o) in o.chunks_exact_mut(d).enumerate() {
        for j in rows.clone() {
            let p = scores[q * len + j];
            for (o, &vv) in o.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                *o = p.mul_add(vv, *o);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    lens: &[usize],
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn portable(
        q: &[f32],
        lens: &[usize],
        k: &[f32],
        v: &[f32],
        d: usize,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        attend_portable(Queries { q, lens }, k, v, d, scale, scores, out)
    }
    dispatch!(
        attend_avx512,
        attend_avx2,
        portable,
        fn(
            q: &[f32],
            lens: &[usize],
            k: &[f32],
            v: &[f32],
            d: usize,
            scale: f32,
            scores: &mut Vec<f32>,
            out: &mut [f32],
        )
    );
}

/// Below this many new tokens (decode), attention tasks split a group's query heads.
const FEW_TOKENS: usize = 8;
/// Tokens per attention tile in a prefill or a turn: their queries share each K/V row load.
const TOKEN_TILE: usize = 16;

/// One attention task: tokens `t0..t1` times query heads `h0..h0 + nh`, all of one KV head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Task {
    t0: usize,
    t1: usize,
    h0: usize,
    nh: usize,
}

/// Splits the attention of `n` new tokens into tasks for `threads` workers.
///
/// Few tokens (decode): each group's query heads split in two tasks (one for a group of one),
/// so both cores have work while K/V are read twice per step, not once per query head.
///
/// Many tokens: tiles of [`TOKEN_TILE`] tokens. Within a tile, the groups' work laid end to end
/// is cut into `threads` equal runs, and each run at group boundaries: with SmolLM2's three
/// groups on two threads, one whole group, half the next, then the other half and the last.
/// Reading a KV head costs more than its arithmetic when the history is long, so most tasks
/// take a whole group (whose K/V rows are then read once per tile) and the threads still get
/// equal shares.
fn attention_tasks(n: usize, n_heads: usize, group: usize, threads: usize) -> Vec<Task> {
    let groups = n_heads / group;
    if n < FEW_TOKENS {
        let per = group.div_ceil(2);
        return (0..groups)
            .flat_map(|g| {
                (g * group..(g + 1) * group)
                    .step_by(per)
                    .map(move |h0| Task {
                        t0: 0,
                        t1: n,
                        h0,
                        nh: per.min((g + 1) * group - h0),
                    })
            })
            .collect();
    }
    let threads = threads.max(1);
    let mut tasks = Vec::new();
    for a0 in (0..n).step_by(TOKEN_TILE) {
        let m = TOKEN_TILE.min(n - a0);
        let total = groups * m;
        let mut cuts: Vec<usize> = (0..=threads)
            .map(|i| i * total / threads)
            .chain((0..=groups).map(|g| g * m))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let g = w[0] / m;
            tasks.push(Task {
                t0: a0 + w[0] - g * m,
                t1: a0 + w[1] - g * m,
                h0: g * group,
                nh: group,
            });
        }
    }
    tasks
}

/// Causal grouped-query attention for `n` new tokens at positions `start..start + n`, whose K
/// and V are already written to `cache` (layer `layer`) at those positions.
///
/// `q` is `[n, n_heads, head_dim]` (after RoPE); returns the attention output in the same
/// layout. Query head `h` reads KV head `h / (n_heads / n_kv_heads)`. Work is parallel over
/// tasks of (tokens, query heads of one KV head), split by `attention_tasks`; each query's
/// result does not depend on which task it is in.
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
    let tasks = attention_tasks(n, n_heads, group, rayon::current_num_threads());
    let most = tasks
        .iter()
        .map(|t| (t.t1 - t.t0) * t.nh)
        .max()
        .unwrap_or(0);
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(
            // Queries are copied to a line-aligned buffer: with 64-wide heads, the score
            // kernel's loads of them and of the (aligned) K rows then never straddle lines.
            || (Vec::new(), AlignedBuf::zeros(most * d), Vec::new()),
            |(scores, qs, lens), &Task { t0, t1, h0, nh }| {
                let qbuf = &mut qs[..(t1 - t0) * nh * d];
                lens.clear();
                for (t, rows) in (t0..t1).zip(qbuf.chunks_exact_mut(nh * d)) {
                    rows.copy_from_slice(&q[(t * n_heads + h0) * d..][..nh * d]);
                    lens.extend(std::iter::repeat_n(start + t + 1, nh));
                }
                let kv = h0 / group;
                let k = cache.k_head(layer, kv, 0..start + t1);
                let v = cache.v_head(layer, kv, 0..start + t1);
                let mut out = vec![0.0f32; qbuf.len()];
                attend(qbuf, lens, k, v, d, scale, scores, &mut out);
                out
            },
        )
        .collect();
    let mut out = vec![0.0f32; n * n_heads * d];
    for (&Task { t0, h0, nh, .. }, res) in tasks.iter().zip(&results) {
        for (r, t) in res.chunks_exact(nh * d).zip(t0..) {
            out[(t * n_heads + h0) * d..][..nh * d].copy_from_slice(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;
    use kv_extract::KvShape;

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
            panel_portable(&x, m, k, &w, n, &mut out_portable, n);
            let mut out_dispatched = vec![0.0; n * m];
            panel(&x, m, k, &w, n, &mut out_dispatched, n);
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
    fn dot_is_the_fused_16_lane_definition() {
        // An independent scalar statement of the definition: 16 lanes of fused multiply-adds
        // (the tail zero-padded), folded by `reduce`'s tree.
        fn reference(a: &[f32], b: &[f32]) -> f32 {
            let mut acc = [0.0f32; LANES];
            for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
                acc[i % LANES] = x.mul_add(y, acc[i % LANES]);
            }
            reduce(&acc)
        }
        // The same order with a separate multiply and add: what the test must tell apart.
        fn unfused(a: &[f32], b: &[f32]) -> f32 {
            let mut acc = [0.0f32; LANES];
            for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
                acc[i % LANES] += x * y;
            }
            reduce(&acc)
        }
        let mut fused_differs = false;
        for k in [1, 15, 16, 17, 64, 100] {
            for seed in 0..8 {
                let a = values(k, 40 + seed);
                let b = values(k, 80 + seed);
                let want = reference(&a, &b);
                assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "k {k}");
                assert_eq!(dot_portable(&a, &b).to_bits(), want.to_bits(), "k {k}");
                fused_differs |= unfused(&a, &b).to_bits() != want.to_bits();
            }
        }
        // Otherwise the test could not tell a fused dot from a plain one.
        assert!(
            fused_differs,
            "no input told the fused dot from the unfused one"
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gram_is_dot_bitwise() {
        let levels = simd::Level::all();
        if levels.is_empty() {
            eprintln!("skipping: no AVX2 and FMA");
        }
        // Odd counts on both sides exercise every edge micro-kernel.
        for level in levels {
            for (na, nb, k) in [
                (1, 7, 64),
                (5, 7, 64),
                (4, 9, 32),
                (3, 2, 576),
                (9, 13, 64),
                (1, 16, 64),
                (3, 37, 64),
                (20, 50, 64),
                (2, 50, 16),
            ] {
                let a = values(na * k, 31);
                let b = values(nb * k, 32);
                let mut out = vec![f32::NAN; na * nb];
                simd::gram(level, &a, na, &b, nb, k, &mut out);
                for i in 0..na {
                    for j in 0..nb {
                        let want = dot_portable(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
                        assert_eq!(
                            out[i * nb + j].to_bits(),
                            want.to_bits(),
                            "{level:?} {na}x{nb} ({i}, {j})"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_panel_is_portable_panel_bitwise() {
        let levels = simd::Level::all();
        if levels.is_empty() {
            eprintln!("skipping: no AVX2 and FMA");
        }
        // Row counts around the 2x3, 1x4, 6x4 and 2x4 tiles and the MB sweep; widths of one
        // chunk up to the model's 1536.
        for level in levels {
            for (m, rows, k) in [
                (1, 9, 64),
                (1, 3, 16),
                (2, 3, 16),
                (5, 7, 576),
                (16, 12, 576),
                (33, 13, 48),
                (70, 4, 1536),
                (13, 9, 64),
                (6, 4, 32),
            ] {
                let x = values(m * k, 41);
                let w = values(rows * k, 42);
                // A column block of a wider output: columns outside it stay untouched.
                let ld = rows + 5;
                let mut want = vec![0.0; m * ld];
                panel_portable(&x, m, k, &w, rows, &mut want, ld);
                let mut got = vec![0.0; m * ld];
                simd::panel(level, &x, m, k, &w, rows, &mut got, ld);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{level:?} m={m} rows={rows} k={k}"
                );
            }
        }
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
    fn quantized_matmul_equals_dequantized_bitwise() {
        let (m, n, k) = (37, 29, 96);
        // Q4_1 blocks: f16 scale 0.25, f16 min -1.0, nibbles from a pattern.
        let mut raw = Vec::new();
        for b in 0..n * k / 32 {
            raw.extend_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
            raw.extend_from_slice(&half::f16::from_f32(-1.0 + b as f32 * 0.01).to_le_bytes());
            raw.extend((0..16u8).map(|i| i.wrapping_mul(37).wrapping_add(b as u8)));
        }
        let q = QMatrix::from_gguf_blocks(crate::quant::QKind::Q4_1, n, k, &raw).expect("blocks");
        let wf = Weight::from_f32(n, k, q.to_f32()).expect("sizes");
        let wq = Weight::from_quant(q);
        let x = values(m * k, 8);
        let a = matmul(&x, m, &wq);
        let b = matmul(&x, m, &wf);
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let alone = matmul(&x[..k], 1, &wq);
        assert_eq!(&a[..n], &alone[..]);
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
    fn exp_is_close_to_libm() {
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = -87.0 + i as f32 * (175.0 / 200_000.0);
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 4e-7, "relative error {worst:e}");
        // The integer part read from the bits is `n as i32`, bit for bit, over the whole
        // clamped range and past both ends.
        let as_cast = |x: f32| {
            let x = x.clamp(-87.0, 88.0);
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            n as i32
        };
        for i in 0..400_000 {
            let x = -100.0 + i as f32 * (200.0 / 400_000.0);
            let t = x.clamp(-87.0, 88.0) * std::f32::consts::LOG2_E + 12_582_912.0;
            assert_eq!(
                t.to_bits().wrapping_sub(12_582_912.0f32.to_bits()) as i32,
                as_cast(x),
                "{x}"
            );
        }
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
    }

    #[test]
    fn softmax_helpers_match_their_definitions_bitwise() {
        let len = 203;
        for nq in [1, 3, 4, 9] {
            let mut scores = values(nq * len, 51);
            let lens: Vec<usize> = (0..nq).map(|i| len - (i * 7) % 11).collect();
            for (i, &n) in lens.iter().enumerate() {
                let row = &mut scores[i * len..i * len + n];
                let mut seq = row.to_vec();
                for x in &mut seq {
                    *x *= 0.125;
                }
                let want = seq.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                assert_eq!(scale_and_max(row, 0.125).to_bits(), want.to_bits());
                assert_eq!(row, &seq[..]);
            }
        }
        // exp_and_sum: lane j % 16 sums positions j in order, then the 16 lanes fold as
        // ((l + l8) + (l4 + l12)) pairs: ((s4[0] + s4[2]) + (s4[1] + s4[3])).
        for n in [0, 1, 15, 16, 17, 203] {
            let mut row = values(n, 52);
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let e: Vec<f32> = row.iter().map(|&x| exp(x - max)).collect();
            let mut lanes = [0.0f32; 16];
            for (j, &x) in e.iter().enumerate() {
                lanes[j % 16] += x;
            }
            let s4: Vec<f32> = (0..4)
                .map(|l| (lanes[l] + lanes[l + 8]) + (lanes[l + 4] + lanes[l + 12]))
                .collect();
            let want = (s4[0] + s4[2]) + (s4[1] + s4[3]);
            assert_eq!(
                exp_and_sum(&mut row, max).to_bits(),
                want.to_bits(),
                "n={n}"
            );
            assert_eq!(row, e);
            let f64_sum: f64 = e.iter().map(|&x| x as f64).sum();
            assert!((want as f64 - f64_sum).abs() <= 1e-6 * f64_sum.max(1.0));
        }
        assert_eq!(scale_and_max(&mut [], 2.0), f32::NEG_INFINITY);
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

    #[test]
    fn attention_tasks_cover_each_query_once_in_even_shares() {
        for (n, n_heads, group) in [(1, 9, 3), (5, 9, 3), (16, 9, 3), (35, 9, 3), (40, 8, 1)] {
            for threads in 1..=3 {
                let tasks = attention_tasks(n, n_heads, group, threads);
                let mut seen = vec![0; n * n_heads];
                for t in &tasks {
                    assert!(t.t0 < t.t1 && t.t1 <= n && t.nh > 0, "{t:?}");
                    assert_eq!(
                        t.h0 / group,
                        (t.h0 + t.nh - 1) / group,
                        "{t:?} spans groups"
                    );
                    for tok in t.t0..t.t1 {
                        for h in t.h0..t.h0 + t.nh {
                            seen[tok * n_heads + h] += 1;
                        }
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "n {n}, {threads} threads");
            }
        }
        // A 16-token turn of SmolLM2 on two threads: one whole group, half the next, the other
        // half and the last; in task order, the two halves of the list are equal work.
        let t = |t0, t1, h0| Task { t0, t1, h0, nh: 3 };
        assert_eq!(
            attention_tasks(16, 9, 3, 2),
            [t(0, 16, 0), t(0, 8, 3), t(8, 16, 3), t(0, 16, 6)]
        );
    }

    #[test]
    fn attention_is_the_same_bits_in_prefill_tiles_and_decode_tasks() {
        // Groups of three query heads (SmolLM2's), split 2 + 1 in decode. 35 tokens make two
        // full prefill tiles and a partial one; 150 positions make the V sums run over several
        // chunks; a 48-wide head takes the generic (not 64-wide) path. The whole attention also
        // runs on one and on three threads, which split the tiles into other tasks.
        for (d, n) in [(64, 35), (64, 150), (48, 21)] {
            let (n_kv, group) = (2, 3);
            let n_heads = n_kv * group;
            let shape = KvShape {
                n_layers: 1,
                n_kv_heads: n_kv,
                head_dim: d,
            };
            let mut cache = KvCache::new(shape);
            cache.reserve(n);
            cache.write_rows(0, 0, &values(n * n_kv * d, 61), &values(n * n_kv * d, 62));
            cache.push_tokens(&vec![0; n]);
            let q = values(n * n_heads * d, 63);
            let row = n_heads * d;
            let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let all = attention(&q, n, 0, n_heads, &cache, 0);
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let other = pool.install(|| attention(&q, n, 0, n_heads, &cache, 0));
                assert_eq!(bits(&other), bits(&all), "d {d}, {threads} threads");
            }
            for t in 0..n {
                let one = attention(&q[t * row..][..row], 1, t, n_heads, &cache, 0);
                assert_eq!(bits(&one), bits(&all[t * row..][..row]), "d {d}, token {t}");
            }
            // A few tokens at once (split as decode is, with causal lengths), and one tile.
            for (t0, m) in [(5, 3), (n - 7, 7), (n - 8, 8)] {
                let part = attention(&q[t0 * row..][..m * row], m, t0, n_heads, &cache, 0);
                assert_eq!(
                    bits(&part),
                    bits(&all[t0 * row..][..m * row]),
                    "d {d}, {t0}+{m}"
                );
            }
        }
    }
}
