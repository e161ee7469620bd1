//! Attention scores: the dot products of several query rows with many K rows at once.

use std::arch::x86_64::*;

use super::{KEYS512, kernel, kernel512, reduce16};
use crate::kernels::dot::LANES;
use crate::kernels::isa::{Isa, Level};

/// `out[i * ld + j] = dot(a[i], b[j])` for `na` rows of `a` and `nb` rows of `b`, all `k`
/// long (a multiple of [`LANES`]): the attention scores of several queries, each query's in
/// its row of `out` (`ld` apart, at least `nb`).
///
/// Each key's sixteen partial sums are reduced by shuffles ([`reduce16`], or `reduce4` at
/// AVX2). Keys transposed instead, one key a lane, make that tree fifteen additions of whole
/// registers and no shuffle. Tried at both levels (Zen 4, 2 threads), same bits, not kept: in
/// cache, 48 queries against 2,048 keys of 64 widened from f16, this kernel does about 80% of
/// the FMA peak and the transposed one 75% at AVX-512 (the transposition's shuffles and
/// stores are new work, and the reduction's shuffles had overlapped the multiply-adds); in a
/// 16-token turn after 2,048 tokens the scores took 5-15% more cycles at AVX-512 and the turn
/// 3% longer at AVX2.
///
/// # Panics
/// If `isa` is the portable level or a length is short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gram(
    isa: Isa,
    a: &[f32],
    na: usize,
    b: &[f32],
    nb: usize,
    k: usize,
    out: &mut [f32],
    ld: usize,
) {
    assert!(
        k.is_multiple_of(LANES),
        "x86::gram needs whole 16-lane chunks"
    );
    assert!(a.len() >= na * k && b.len() >= nb * k, "x86::gram rows");
    assert!(
        ld >= nb && (na == 0 || out.len() >= (na - 1) * ld + nb),
        "x86::gram output"
    );
    // SAFETY: the CPU has `isa` (an `Isa` exists only for levels it has) and the lengths are
    // checked above: every micro-kernel call reads rows i < na of a and j < nb of b, k values
    // each, and writes out[i * ld + j].
    unsafe {
        match isa.level() {
            Level::Avx2 => gram_avx2(a.as_ptr(), na, b.as_ptr(), nb, k, out, ld),
            Level::Avx512 => gram_avx512(a.as_ptr(), na, b.as_ptr(), nb, k, out, ld),
            Level::Portable => panic!("x86::gram needs AVX2 or AVX-512"),
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
    ld: usize,
) {
    macro_rules! tile {
        ($r:literal, $c:literal, $i:expr, $j:expr) => {{
            let (i, j) = ($i, $j);
            let t = kernel::<$r, $c>(a.add(i * k), b.add(j * k), k);
            for (di, row) in t.iter().enumerate() {
                out[(i + di) * ld + j..][..$c].copy_from_slice(row);
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

#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gram_avx512(
    a: *const f32,
    na: usize,
    b: *const f32,
    nb: usize,
    k: usize,
    out: &mut [f32],
    ld: usize,
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
                    out[i * ld + j..][..KEYS512].copy_from_slice(&scores);
                }
            }
        } else {
            for j in (0..full).step_by(KEYS512) {
                for i in 0..na {
                    let scores = kernel512_1x16(a.add(i * k), b.add(j * k), k);
                    out[i * ld + j..][..KEYS512].copy_from_slice(&scores);
                }
            }
        }
        for i in 0..na {
            let mut j = full;
            while j + 4 <= nb {
                let t = kernel512::<1, 4>(a.add(i * k), b.add(j * k), k);
                out[i * ld + j..][..4].copy_from_slice(&t[0]);
                j += 4;
            }
            for j in j..nb {
                out[i * ld + j] = kernel512::<1, 1>(a.add(i * k), b.add(j * k), k)[0][0];
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
/// fused multiply-adds from zero as [`fmadd`](crate::kernels::dot), so the same bits.
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
