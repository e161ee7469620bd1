//! The x86-64 code: with `kernels::team`, the one place in the engine with `unsafe`. It holds
//!
//! * [`recompiled`]: the portable kernels compiled again for AVX2 and FMA or for AVX-512
//!   (`#[target_feature]` copies of one source, so the same operations and the same bits);
//! * hand-written kernels for where the compiler's output of the portable source is slow:
//!   attention scores ([`gram`](fn@gram)), the matmul panel ([`panel`](fn@panel)), the
//!   weighted V sums of six queries ([`pv_6x64`]), of two ([`pv_2x64`], AVX2) or of one
//!   ([`pv_1x64`]) and quantized weights ([`dequantize_rows`], [`gemv`]; the kinds held as
//!   GGUF blocks in `blocks`):
//!   intrinsics, f16 and `q8_0` cache rows widened with F16C and AVX2 ([`f16_to_f32`],
//!   [`q8_0_to_f32`]), the softmax's exponentials and sums ([`exp_and_sum`]), and nine
//!   micro-kernels in assembly (`acc_2x3`, `s8_1x4_k64`,
//!   `kernel512_4x6`, `kernel512_6x4`, `kernel512_1x16_k64`, `quarters_1x16`, `pv512_6x64`,
//!   `pv256_2x32`, `pv256_1x64`);
//! * a safe wrapper for each, which checks every length the unsafe code relies on and takes an
//!   [`Isa`]: a value that exists only for levels this CPU has, so holding one proves the
//!   instructions are there.
//!
//! Each kernel computes per lane the same operations (fused multiply-adds; the softmax's
//! `exp`, plain multiplies and adds) in the same order as the portable definition
//! ([`crate::kernels::dot`]); tests check it bit for bit at every level the machine has.

use std::arch::x86_64::*;

use super::dot::LANES;
use super::isa::{Isa, Level, Recompile};

mod blocks;
mod convert;
mod dequant;
mod exp;
mod gram;
mod panel;
mod pv;

pub(crate) use convert::{f16_to_f32, q8_0_to_f32};
pub(crate) use dequant::{LineByLine, dequantize_rows, gemv, prefetch_rows};
pub(crate) use exp::exp_and_sum;
pub(crate) use gram::{Keys, QUARTER_KEYS, gram, gram_quarters, quarters};
pub(crate) use panel::panel;
pub(crate) use pv::{pv_1x64, pv_2x64, pv_6x64};

/// Bytes ahead of the current block that the decode gemv of every weight kind asks the CPU
/// to prefetch, in each of its row streams.
///
/// A stream from memory needs its lines asked for about a memory latency ahead. On an Intel
/// Xeon (family 6 model 167 as its VM reports it, 2 threads), Gemma 3's output matrix
/// (262,144 rows of 640) in Q8_0 took 5.4 ms with 2,048 bytes against 6.7 with 512 at AVX-512
/// (32.8 GB/s against 26.5; plain reads of memory reach 31-32), 7.0 against 8.7 at AVX2; Q4_1
/// 4.7 against 5.3; in cache nothing changed. The kinds held as GGUF blocks gained up to 12%
/// from memory.
const PREFETCH: usize = 2048;

/// Runs `kernel` compiled for `isa`'s extensions (the portable build for [`Isa::PORTABLE`]).
pub(crate) fn recompiled<K: Recompile>(isa: Isa, kernel: K) -> K::Output {
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn avx512<K: Recompile>(kernel: K) -> K::Output {
        kernel.run()
    }

    #[target_feature(enable = "avx2,fma")]
    fn avx2<K: Recompile>(kernel: K) -> K::Output {
        kernel.run()
    }

    match isa.level() {
        // SAFETY: an `Isa` of this level exists only when the CPU has AVX-512F, AVX2 and FMA
        // (see `Isa`), the only requirement of the `#[target_feature]` function.
        Level::Avx512 => unsafe { avx512(kernel) },
        // SAFETY: as above, for AVX2 and FMA.
        Level::Avx2 => unsafe { avx2(kernel) },
        Level::Portable => kernel.run(),
    }
}

/// Keys per AVX-512 score tile: their 16 sums are reduced together ([`reduce16`]).
const KEYS512: usize = 16;

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
        // Loops, not closures, here and in `within_quarters`: a closure's intrinsics are
        // calls wherever the compiler does not inline the closure, and it stopped inlining
        // these once a third kernel used this reduction (the attention's scores then took
        // several times as long). `cargo xtask inlining` checks the release build for that.
        let a = |i: usize| (i % 4) * 4 + i / 4;
        // s8[l] = x[l] + x[l + 8]: quarters (0, 2) and (1, 3) of A[2m] and A[2m + 1].
        let mut s = [_mm512_setzero_ps(); 8];
        for (m, s) in s.iter_mut().enumerate() {
            let (p, q) = (acc[a(2 * m)], acc[a(2 * m + 1)]);
            *s = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(p, q),
                _mm512_shuffle_f32x4::<0xEE>(p, q),
            );
        }
        // s4[l] = s8[l] + s8[l + 4]: quarter q of u[n] is A[4n + q]'s s4.
        let mut u = [_mm512_setzero_ps(); 4];
        for (n, u) in u.iter_mut().enumerate() {
            let (p, q) = (s[2 * n], s[2 * n + 1]);
            *u = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(p, q),
                _mm512_shuffle_f32x4::<0xDD>(p, q),
            );
        }
        within_quarters(&u)
    }
}

/// The last two steps of [`reduce`](crate::kernels::dot::reduce)'s tree, `(s4[0] + s4[2]) +
/// (s4[1] + s4[3])`, for sixteen sums whose `s4` are quarters of `u`: quarter `q` of `u[n]`
/// holds the `s4` of the sum that ends in lane `4q + n`.
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn within_quarters(u: &[__m512; 4]) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe {
        let mut w = [_mm512_setzero_ps(); 2];
        for (n, w) in w.iter_mut().enumerate() {
            let (p, q) = (u[2 * n], u[2 * n + 1]);
            *w = _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(p, q),
                _mm512_shuffle_ps::<0xEE>(p, q),
            );
        }
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(w[0], w[1]),
            _mm512_shuffle_ps::<0xDD>(w[0], w[1]),
        )
    }
}

/// `R x C` dot products of rows of `a` with rows of `b`, each in the 16-lane order of
/// [`dot`](crate::kernels::dot): lanes 0..8 and 8..16 are two registers.
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
        if R * C == 4 {
            // Four sums (the 2x2 and 1x4 tiles): one batched reduction, lane i * C + j.
            let mut flat = [[_mm256_setzero_ps(); 2]; 4];
            for n in 0..4 {
                flat[n] = acc[n / C][n % C];
            }
            let mut lanes = [0.0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), reduce4(&flat));
            for n in 0..4 {
                out[n / C][n % C] = lanes[n];
            }
            return out;
        }
        for i in 0..R {
            for j in 0..C {
                out[i][j] = reduce(acc[i][j]);
            }
        }
        out
    }
}

/// The accumulators of [`kernel`]`::<2, 3>` for rows `x0`, `x1` against the three rows of `w`
/// (`k` apart), in assembly: the compiler's register allocation of the intrinsics spills them.
/// The dot product of `x_i` with row `j` of `w` is in `acc[6i + 2j]` (lanes 0..8) and
/// `acc[6i + 2j + 1]` (lanes 8..16). The matmul panel's tile and the AVX2 attention scores'.
/// Twelve accumulators (`ymm0..=11`), the three weight rows' half-chunks (`ymm12..=14`) and
/// one `x` half-chunk (`ymm15`): ten loads per twelve FMAs. (Weight chunks as memory operands
/// of every FMA took sixteen, and the loads, not the FMA pipes, were the limit.) Per lane it
/// is the same fused multiply-add as the portable `fmadd`, so the same bits.
///
/// # Safety
/// AVX2 and FMA are available; `x0` and `x1` point to `k` values, `w` to `3 * k`,
/// `k % 16 == 0`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn acc_2x3(x0: *const f32, x1: *const f32, w: *const f32, k: usize) -> [__m256; 12] {
    // SAFETY: the caller's contract. The loop body runs k / 16 times (k > 0 is checked
    // first, as the loop tests its bound at the end); every load is within the rows.
    unsafe {
        if k == 0 {
            return [_mm256_setzero_ps(); 12];
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
            // Lanes 0..8 of the chunk: the three weight rows' halves in ymm12..=14, each
            // x row's half in ymm15 in turn.
            "vmovups ymm12, [{w0} + {off}]",
            "vmovups ymm13, [{w1} + {off}]",
            "vmovups ymm14, [{w2} + {off}]",
            "vmovups ymm15, [{x0} + {off}]",
            "vfmadd231ps ymm0, ymm15, ymm12",
            "vfmadd231ps ymm2, ymm15, ymm13",
            "vfmadd231ps ymm4, ymm15, ymm14",
            "vmovups ymm15, [{x1} + {off}]",
            "vfmadd231ps ymm6, ymm15, ymm12",
            "vfmadd231ps ymm8, ymm15, ymm13",
            "vfmadd231ps ymm10, ymm15, ymm14",
            // Lanes 8..16.
            "vmovups ymm12, [{w0} + {off} + 32]",
            "vmovups ymm13, [{w1} + {off} + 32]",
            "vmovups ymm14, [{w2} + {off} + 32]",
            "vmovups ymm15, [{x0} + {off} + 32]",
            "vfmadd231ps ymm1, ymm15, ymm12",
            "vfmadd231ps ymm3, ymm15, ymm13",
            "vfmadd231ps ymm5, ymm15, ymm14",
            "vmovups ymm15, [{x1} + {off} + 32]",
            "vfmadd231ps ymm7, ymm15, ymm12",
            "vfmadd231ps ymm9, ymm15, ymm13",
            "vfmadd231ps ymm11, ymm15, ymm14",
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
            out("ymm14") _,
            out("ymm15") _,
            options(nostack, readonly, pure),
        );
        a
    }
}

/// [`reduce`] of four dot products at once: lane `n` of the result is `reduce(acc[n])`.
///
/// # Safety
/// AVX is available.
#[inline(always)]
unsafe fn reduce4(acc: &[[__m256; 2]; 4]) -> __m128 {
    // SAFETY: the caller's contract.
    unsafe { reduce4_s8(std::array::from_fn(|n| _mm256_add_ps(acc[n][0], acc[n][1]))) }
}

/// [`reduce`]'s tree after its first step, for four sums at once: `s8[n]` holds sum `n`'s
/// `s8[l] = x[l] + x[l + 8]`, and lane `n` of the result is its sum, with the same additions
/// in the same tree (shuffles first bring the lanes each step adds into the same lane). Each
/// sum's `s4` comes from its own register by an extraction: shuffles across 128-bit halves
/// are 8 micro-ops each on AMD's Zen 1, and took a tenth of the AVX2 scores' time there.
///
/// # Safety
/// AVX is available.
#[inline(always)]
unsafe fn reduce4_s8(s8: [__m256; 4]) -> __m128 {
    // SAFETY: the caller's contract.
    unsafe {
        // s4[l] = s8[l] + s8[l + 4]: one 128-bit register per sum.
        let s4: [__m128; 4] = std::array::from_fn(|n| {
            _mm_add_ps(
                _mm256_castps256_ps128(s8[n]),
                _mm256_extractf128_ps::<1>(s8[n]),
            )
        });
        // [s4[0] + s4[2], s4[1] + s4[3]] of sums 0 and 1, and of sums 2 and 3.
        let pair = |p: __m128, q: __m128| {
            _mm_add_ps(_mm_shuffle_ps::<0x44>(p, q), _mm_shuffle_ps::<0xEE>(p, q))
        };
        let (w01, w23) = (pair(s4[0], s4[1]), pair(s4[2], s4[3]));
        // (s4[0] + s4[2]) + (s4[1] + s4[3]) of the four sums.
        _mm_add_ps(
            _mm_shuffle_ps::<0x88>(w01, w23),
            _mm_shuffle_ps::<0xDD>(w01, w23),
        )
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

/// [`reduce`](crate::kernels::dot::reduce) on 16 lanes held as two registers: lanes `l` and
/// `l + 8`, then `l` and `l + 4`, then `(0 + 2) + (1 + 3)`.
///
/// # Safety
/// AVX is available.
#[inline(always)]
pub(crate) unsafe fn reduce(acc: [__m256; 2]) -> f32 {
    // SAFETY: the caller's contract.
    unsafe { reduce_s8(_mm256_add_ps(acc[0], acc[1])) }
}

/// [`reduce`]'s tree after its first step: `s8[l] = x[l] + x[l + 8]` in one register.
///
/// # Safety
/// AVX is available.
#[inline(always)]
unsafe fn reduce_s8(s8: __m256) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
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
