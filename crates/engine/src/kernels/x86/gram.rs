//! Attention scores: the dot products of several query rows with many K rows at once.

use std::arch::x86_64::*;

use super::{
    KEYS512, acc_2x3, kernel, kernel512, reduce_s8, reduce4_s8, reduce16, within_quarters,
};
use crate::kernels::dot::LANES;
use crate::kernels::isa::{Isa, Level};

/// `out[i * ld + j] = dot(a[i], b[j])` for `na` rows of `a` and `nb` rows of `b`, all `k`
/// long (a multiple of [`LANES`]): the attention scores of several queries, each query's in
/// its row of `out` (`ld` apart, at least `nb`).
///
/// Each key's sixteen partial sums are reduced by shuffles ([`reduce16`], or [`reduce4_s8`]
/// at AVX2). Keys transposed instead, one key a lane, make that tree fifteen additions of whole
/// registers and no shuffle. Tried at both levels (Zen 4, 2 threads), same bits, not kept: in
/// cache, 48 queries against 2,048 keys of 64 widened from f16, this kernel does about 80% of
/// the FMA peak and the transposed one 75% at AVX-512 (the transposition's shuffles and
/// stores are new work, and the reduction's shuffles had overlapped the multiply-adds); in a
/// 16-token turn after 2,048 tokens the scores took 5-15% more cycles at AVX-512 and the turn
/// 3% longer at AVX2. Many queries at AVX-512 use a layout between the two, [`quarters`].
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

/// The head width the AVX2 scores keep one query of in registers ([`s8_1x4_k64`]).
const HEAD64: usize = 64;
/// Keys per block of the AVX2 scores of 64-wide heads: the block (16 KB) stays in L1 while
/// each query is scored against it, as the chunks attention converts are (its `CHUNK`).
const HEAD64_KEYS: usize = 64;

/// The first step of the sums of one query of [`HEAD64`] values with `n4 * 4` keys (rows of
/// 64, from `b`), `s8[j][l] = x[l] + x[l + 8]` for key `j` (the rest of the tree is
/// [`reduce4_s8`]'s, four keys at a time), in assembly: the query's four chunks stay in
/// `ymm8..=15` for every key, and each key's values are the memory operands of its eight fused
/// multiply-adds (two chains of four, lanes 0..8 and 8..16; `ymm0..=7` for four keys). Per
/// lane the same fused multiply-adds from zero in the same order as the portable `dot`, so
/// the same bits.
///
/// The 2x3 tile of [`acc_2x3`] before (two queries by three keys, each call four chunks
/// deep) did 23 GFLOP/s on an AMD EPYC (Zen 1), one thread, 48 queries against 2,048 keys of
/// 64 in blocks of 64 keys, and this kernel 28-29: its loads are the keys' (one per
/// multiply-add, where the tile's were ten per twelve), but nothing is set up, spilled or
/// reloaded per tile. With the reduction's last steps in the assembly too (straight to the
/// scores, no `s8` stored), 24-25.
///
/// # Safety
/// AVX2 and FMA are available; `q` points to 64 values, `b` to `n4 * 4` rows of 64 and `s8`
/// to `n4 * 4` writable registers.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn s8_1x4_k64(q: *const f32, b: *const f32, n4: usize, s8: *mut __m256) {
    // SAFETY: the caller's contract. The loop body runs n4 times (n4 > 0 is checked first,
    // as the loop tests its count at the end), each reading four rows of 64 values and
    // writing four registers' worth of `s8`.
    unsafe {
        if n4 == 0 {
            return;
        }
        std::arch::asm!(
            // The query: chunk c's lanes 0..8 in ymm(8 + 2c), lanes 8..16 in ymm(9 + 2c).
            "vmovups ymm8, [{q}]",
            "vmovups ymm9, [{q} + 32]",
            "vmovups ymm10, [{q} + 64]",
            "vmovups ymm11, [{q} + 96]",
            "vmovups ymm12, [{q} + 128]",
            "vmovups ymm13, [{q} + 160]",
            "vmovups ymm14, [{q} + 192]",
            "vmovups ymm15, [{q} + 224]",
            "2:",
            // Key t's lanes 0..8 in ymm(2t), 8..16 in ymm(2t + 1); a chunk for all four
            // keys, then the next.
            "vxorps ymm0, ymm0, ymm0",
            "vxorps ymm1, ymm1, ymm1",
            "vxorps ymm2, ymm2, ymm2",
            "vxorps ymm3, ymm3, ymm3",
            "vxorps ymm4, ymm4, ymm4",
            "vxorps ymm5, ymm5, ymm5",
            "vxorps ymm6, ymm6, ymm6",
            "vxorps ymm7, ymm7, ymm7",
            "vfmadd231ps ymm0, ymm8, [{b}]",
            "vfmadd231ps ymm1, ymm9, [{b} + 32]",
            "vfmadd231ps ymm2, ymm8, [{b} + 256]",
            "vfmadd231ps ymm3, ymm9, [{b} + 288]",
            "vfmadd231ps ymm4, ymm8, [{b} + 512]",
            "vfmadd231ps ymm5, ymm9, [{b} + 544]",
            "vfmadd231ps ymm6, ymm8, [{b} + 768]",
            "vfmadd231ps ymm7, ymm9, [{b} + 800]",
            "vfmadd231ps ymm0, ymm10, [{b} + 64]",
            "vfmadd231ps ymm1, ymm11, [{b} + 96]",
            "vfmadd231ps ymm2, ymm10, [{b} + 320]",
            "vfmadd231ps ymm3, ymm11, [{b} + 352]",
            "vfmadd231ps ymm4, ymm10, [{b} + 576]",
            "vfmadd231ps ymm5, ymm11, [{b} + 608]",
            "vfmadd231ps ymm6, ymm10, [{b} + 832]",
            "vfmadd231ps ymm7, ymm11, [{b} + 864]",
            "vfmadd231ps ymm0, ymm12, [{b} + 128]",
            "vfmadd231ps ymm1, ymm13, [{b} + 160]",
            "vfmadd231ps ymm2, ymm12, [{b} + 384]",
            "vfmadd231ps ymm3, ymm13, [{b} + 416]",
            "vfmadd231ps ymm4, ymm12, [{b} + 640]",
            "vfmadd231ps ymm5, ymm13, [{b} + 672]",
            "vfmadd231ps ymm6, ymm12, [{b} + 896]",
            "vfmadd231ps ymm7, ymm13, [{b} + 928]",
            "vfmadd231ps ymm0, ymm14, [{b} + 192]",
            "vfmadd231ps ymm1, ymm15, [{b} + 224]",
            "vfmadd231ps ymm2, ymm14, [{b} + 448]",
            "vfmadd231ps ymm3, ymm15, [{b} + 480]",
            "vfmadd231ps ymm4, ymm14, [{b} + 704]",
            "vfmadd231ps ymm5, ymm15, [{b} + 736]",
            "vfmadd231ps ymm6, ymm14, [{b} + 960]",
            "vfmadd231ps ymm7, ymm15, [{b} + 992]",
            // The first step of each key's reduction, s8[l] = lanes l + l + 8, stored.
            "vaddps ymm0, ymm0, ymm1",
            "vaddps ymm2, ymm2, ymm3",
            "vaddps ymm4, ymm4, ymm5",
            "vaddps ymm6, ymm6, ymm7",
            "vmovups [{s8}], ymm0",
            "vmovups [{s8} + 32], ymm2",
            "vmovups [{s8} + 64], ymm4",
            "vmovups [{s8} + 96], ymm6",
            "add {b}, 1024",
            "add {s8}, 128",
            "dec {n}",
            "jnz 2b",
            q = in(reg) q,
            b = inout(reg) b => _,
            s8 = inout(reg) s8 => _,
            n = inout(reg) n4 => _,
            out("ymm0") _,
            out("ymm1") _,
            out("ymm2") _,
            out("ymm3") _,
            out("ymm4") _,
            out("ymm5") _,
            out("ymm6") _,
            out("ymm7") _,
            out("ymm8") _,
            out("ymm9") _,
            out("ymm10") _,
            out("ymm11") _,
            out("ymm12") _,
            out("ymm13") _,
            out("ymm14") _,
            out("ymm15") _,
            options(nostack),
        );
    }
}

/// Keys per pass of the AVX2 scores over two queries: a chunk of a cache converted to f32 (64
/// keys) in one pass, with room for its tiles of three.
const KEYS256: usize = 66;

/// Two queries by three keys at a time ([`acc_2x3`], the matmul panel's tile), each sum's
/// first step of the reduction stored, and the rest of the tree done for each query's keys
/// four at a time after the pass ([`reduce4_s8`]), where the reductions of many keys overlap
/// one another. The 2x2 tiles before reduced their four sums right after their 32
/// multiply-adds (64-wide heads), and waited for them. On an AMD EPYC (Zen 1), one thread, in
/// cache, 48 queries against 2,048 keys of 64: 680-685 -> 524-531 us (18.5 -> 24 GFLOP/s);
/// keys of 128: 553 -> 449 us. Each tile reduced during the next one's multiply-adds instead
/// (its sums kept across the assembly, which spills them) took 551-581 us. Rows 64 wide go to
/// [`gram_avx2_k64`].
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
        if k == HEAD64 {
            return gram_avx2_k64(a, na, b, nb, out, ld);
        }
        let mut i = 0;
        if na >= 2 {
            // s8[di][j]: the first step of key j's sum with query i + di.
            let mut s8 = [[_mm256_setzero_ps(); KEYS256]; 2];
            while i + 2 <= na {
                let (x0, x1) = (a.add(i * k), a.add((i + 1) * k));
                for j0 in (0..nb).step_by(KEYS256) {
                    let n = KEYS256.min(nb - j0);
                    let whole = n - n % 3;
                    for j in (0..whole).step_by(3) {
                        let acc = acc_2x3(x0, x1, b.add((j0 + j) * k), k);
                        for (di, s8) in s8.iter_mut().enumerate() {
                            for dj in 0..3 {
                                let n = 6 * di + 2 * dj;
                                s8[j + dj] = _mm256_add_ps(acc[n], acc[n + 1]);
                            }
                        }
                    }
                    for (di, s8) in s8.iter().enumerate() {
                        reduce_s8_into(&s8[..whole], &mut out[(i + di) * ld + j0..][..whole]);
                    }
                    for j in j0 + whole..j0 + n {
                        tile!(2, 1, i, j);
                    }
                }
                i += 2;
            }
        }
        if i < na {
            // One query: the last of an odd number, or a decode step's.
            let mut j = 0;
            while j + 4 <= nb {
                tile!(1, 4, i, j);
                j += 4;
            }
            for j in j..nb {
                tile!(1, 1, i, j);
            }
        }
    }
}

/// [`gram_avx2`] for 64-wide rows: each query kept in registers ([`s8_1x4_k64`]) against
/// blocks of [`HEAD64_KEYS`] keys, blocks outer and queries inner, so that a block stays in L1
/// while every query is scored against it (the whole history comes at once when the cache is
/// f32); the rest of each sum's tree four keys at a time after the block.
///
/// # Safety
/// As [`gram_avx2`] with `k == 64`.
#[target_feature(enable = "avx2,fma")]
unsafe fn gram_avx2_k64(
    a: *const f32,
    na: usize,
    b: *const f32,
    nb: usize,
    out: &mut [f32],
    ld: usize,
) {
    const K: usize = HEAD64;
    // SAFETY: the caller's bounds (see `gram`), for rows of 64.
    unsafe {
        let mut s8 = [_mm256_setzero_ps(); HEAD64_KEYS];
        for j0 in (0..nb).step_by(HEAD64_KEYS) {
            let n = HEAD64_KEYS.min(nb - j0);
            let whole = n - n % 4;
            for i in 0..na {
                s8_1x4_k64(a.add(i * K), b.add(j0 * K), whole / 4, s8.as_mut_ptr());
                let row = &mut out[i * ld + j0..][..n];
                reduce_s8_into(&s8[..whole], &mut row[..whole]);
                for (j, o) in row.iter_mut().enumerate().skip(whole) {
                    *o = kernel::<1, 1>(a.add(i * K), b.add((j0 + j) * K), K)[0][0];
                }
            }
        }
    }
}

/// `row[j] = reduce_s8(s8[j])` for every `j` (`row` as long as `s8`): four sums at a time
/// ([`reduce4_s8`], the same tree), the last one to three alone.
///
/// # Safety
/// AVX is available.
#[inline(always)]
unsafe fn reduce_s8_into(s8: &[__m256], row: &mut [f32]) {
    debug_assert_eq!(s8.len(), row.len());
    // SAFETY: the caller's contract; each store writes one chunk of four values of `row`.
    unsafe {
        let mut quads = s8.chunks_exact(4);
        let mut out = row.chunks_exact_mut(4);
        for (s, o) in (&mut quads).zip(&mut out) {
            _mm_storeu_ps(o.as_mut_ptr(), reduce4_s8([s[0], s[1], s[2], s[3]]));
        }
        for (&s, o) in quads.remainder().iter().zip(out.into_remainder()) {
            *o = reduce_s8(s);
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

/// Keys per block of the quarter layout ([`quarters`]).
pub(crate) const QUARTER_KEYS: usize = 16;

/// K rows for [`quarters`]: f32 values, or f16 bits widened on the way.
#[derive(Clone, Copy)]
pub(crate) enum Keys<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

/// Writes `nb` K rows of `k` values (`nb` a multiple of [`QUARTER_KEYS`], `k` of [`LANES`])
/// into `out` in the quarter layout that [`gram_quarters`] reads, asking the CPU on the way
/// for the bytes of `ahead` (the rows converted next) as [`f16_to_f32`](super::f16_to_f32)
/// does.
///
/// The layout, per block of 16 keys and per 16-column chunk `b` of their rows: 16 registers'
/// worth, register `4 * g + p` holding columns `16b + 4g .. 16b + 4g + 4` (a quarter of the
/// chunk) of keys `p`, `p + 4`, `p + 8` and `p + 12`, a key in each 128-bit lane. A query's
/// quarter `g`, broadcast to the four lanes, then multiplies four keys' quarter `g` at once:
/// each lane keeps the sums of one of a dot product's 16 lanes, so three quarters of the
/// reduction tree are additions of whole registers (see [`gram_quarters`]).
///
/// # Panics
/// If `isa` is not AVX-512 or a length is short.
pub(crate) fn quarters(
    isa: Isa,
    keys: Keys<'_>,
    nb: usize,
    k: usize,
    out: &mut [f32],
    ahead: &[u8],
) {
    assert_eq!(isa.level(), Level::Avx512, "x86::quarters needs AVX-512");
    assert!(
        nb.is_multiple_of(QUARTER_KEYS) && k.is_multiple_of(LANES),
        "x86::quarters needs whole blocks of keys and of columns"
    );
    let len = match keys {
        Keys::F32(rows) => rows.len(),
        Keys::F16(rows) => rows.len(),
    };
    assert!(len >= nb * k && out.len() >= nb * k, "x86::quarters rows");
    // SAFETY: the CPU has AVX-512F (an `Isa` of this level exists only when it does); the
    // lengths are checked above.
    unsafe { quarters_avx512(keys, nb, k, out.as_mut_ptr(), ahead) }
}

/// # Safety
/// AVX-512F is available; `keys` holds `nb * k` values, `out` room for as many, `nb % 16 ==
/// 0`, `k % 16 == 0`.
#[target_feature(enable = "avx512f")]
unsafe fn quarters_avx512(keys: Keys<'_>, nb: usize, k: usize, out: *mut f32, ahead: &[u8]) {
    let mut ahead = super::LineByLine::new(ahead);
    // SAFETY: the caller's contract: key `j0 + 4c + p` (< nb) has `k` values from
    // `(j0 + 4c + p) * k`, read 16 at a time at `16b < k`; each block writes its own 16 * k
    // values from `j0 * k`.
    unsafe {
        macro_rules! load {
            ($j:expr, $col:expr) => {
                match keys {
                    Keys::F32(rows) => _mm512_loadu_ps(rows.as_ptr().add($j * k + $col)),
                    Keys::F16(rows) => {
                        _mm512_cvtph_ps(_mm256_loadu_si256(rows.as_ptr().add($j * k + $col).cast()))
                    }
                }
            };
        }
        for j0 in (0..nb).step_by(QUARTER_KEYS) {
            let block = out.add(j0 * k);
            for b in 0..k / LANES {
                let (dst, col) = (block.add(b * 16 * LANES), b * LANES);
                for p in 0..4 {
                    // A line of `ahead` per line of f16 rows read (four keys' 16 values).
                    if matches!(keys, Keys::F16(_)) {
                        ahead.one();
                        ahead.one();
                    }
                    let r = [
                        load!(j0 + p, col),
                        load!(j0 + 4 + p, col),
                        load!(j0 + 8 + p, col),
                        load!(j0 + 12 + p, col),
                    ];
                    // Quarters 0, 1 of keys p and p + 4, then 2, 3; the same for p + 8, p + 12.
                    let x0 = _mm512_shuffle_f32x4::<0x44>(r[0], r[1]);
                    let x1 = _mm512_shuffle_f32x4::<0xEE>(r[0], r[1]);
                    let y0 = _mm512_shuffle_f32x4::<0x44>(r[2], r[3]);
                    let y1 = _mm512_shuffle_f32x4::<0xEE>(r[2], r[3]);
                    // Quarter g of the four keys, in key order.
                    let g = [
                        _mm512_shuffle_f32x4::<0x88>(x0, y0),
                        _mm512_shuffle_f32x4::<0xDD>(x0, y0),
                        _mm512_shuffle_f32x4::<0x88>(x1, y1),
                        _mm512_shuffle_f32x4::<0xDD>(x1, y1),
                    ];
                    for (q, g) in g.into_iter().enumerate() {
                        _mm512_storeu_ps(dst.add((4 * q + p) * LANES), g);
                    }
                }
            }
        }
    }
    ahead.rest();
}

/// [`gram`] with the keys in the quarter layout of [`quarters`] (`nb` a multiple of
/// [`QUARTER_KEYS`]): `out[i * ld + j] = dot(a[i], key j)`, the same bits.
///
/// Per query and block of 16 keys: 64 multiply-adds for 64-wide rows (as [`gram`]), 16 loads of
/// a query quarter broadcast to four lanes, and a reduction of 15 additions and 6 shuffles
/// (where [`reduce16`] takes 30 shuffles): on Intel cores the shuffles take the port that half
/// the multiply-adds need. Laying the keys out costs two shuffles per 16 values, so it pays from
/// a few queries per block on. Measured on an Intel Xeon (family 6 model 167 as its VM reports
/// it, 2 threads), against [`gram`] in one process, alternately: SmolLM2's resume (the load and
/// a 16-token turn after 2,048 tokens) 48.8 -> 47.7 ms (median of 100 each), its prefill of
/// 2,048 tokens 557 -> 570 tok/s; Gemma 3's 256-wide heads, whose longer dot products amortize
/// the reduction, gained 0.3 ms of 40. Not measured on AMD.
///
/// On that Xeon (December 2026) this kernel is bound by loads, not by its multiply-adds: the core
/// does 213 GFLOP/s with register operands and 144 with a 64-byte memory operand on every
/// multiply-add, and here every multiply-add loads its key values and every four a query quarter. A
/// form for 64-wide rows that keeps one query's sixteen quarters in registers over all the blocks
/// (one load per multiply-add, the same operations, the same bits) ran 1.22x as fast in L1 (one
/// thread, 24 or 48 queries by 64 keys: 129-130 GFLOP/s against 106-109), but only 0-7% faster as
/// attention runs it (each 64-key chunk laid out, then scored into rows 2,064 apart) and 0.3% in
/// SmolLM2 Q4_K_M's resume (43.39 against 43.51 ms, medians of 200 each in one process,
/// alternately). Not kept.
///
/// # Panics
/// If `isa` is not AVX-512 or a length is short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gram_quarters(
    isa: Isa,
    a: &[f32],
    na: usize,
    kq: &[f32],
    nb: usize,
    k: usize,
    out: &mut [f32],
    ld: usize,
) {
    assert_eq!(
        isa.level(),
        Level::Avx512,
        "x86::gram_quarters needs AVX-512"
    );
    assert!(
        nb.is_multiple_of(QUARTER_KEYS) && k.is_multiple_of(LANES) && k > 0,
        "x86::gram_quarters needs whole blocks of keys and of columns"
    );
    assert!(
        a.len() >= na * k && kq.len() >= nb * k,
        "x86::gram_quarters rows"
    );
    assert!(
        ld >= nb && (na == 0 || out.len() >= (na - 1) * ld + nb),
        "x86::gram_quarters output"
    );
    // SAFETY: the CPU has AVX-512F (an `Isa` of this level exists only when it does) and the
    // lengths are checked above.
    unsafe { gram_quarters_avx512(a.as_ptr(), na, kq.as_ptr(), nb, k, out.as_mut_ptr(), ld) }
}

/// # Safety
/// AVX-512F is available; `a` holds `na * k` values, `kq` `nb * k`, `out` `(na - 1) * ld +
/// nb`; `nb % 16 == 0`, `k % 16 == 0`, `k > 0`.
#[target_feature(enable = "avx512f")]
unsafe fn gram_quarters_avx512(
    a: *const f32,
    na: usize,
    kq: *const f32,
    nb: usize,
    k: usize,
    out: *mut f32,
    ld: usize,
) {
    // SAFETY: the caller's contract: each step reads query i < na and one block of 16 * k key
    // values below nb * k, and writes scores j..j + 16 <= nb of row i.
    unsafe {
        for j in (0..nb).step_by(QUARTER_KEYS) {
            let block = kq.add(j * k);
            for i in 0..na {
                let scores = quarters_1x16(a.add(i * k), block, k);
                _mm512_storeu_ps(out.add(i * ld + j), scores);
            }
        }
    }
}

/// One query's dot products with a block of 16 keys in the quarter layout, in assembly (the
/// block's loads as memory operands: from intrinsics, LLVM hoists them out of the loop over
/// queries and spills them).
///
/// Accumulator `4g + p` (`zmm0..=15`) holds, in lane `4c + i`, lane `4g + i` of the 16-lane
/// sums of key `4c + p`: the same fused multiply-adds from zero, in the same column order, as
/// [`fmadd`](crate::kernels::dot). Then [`reduce`](crate::kernels::dot::reduce)'s tree:
/// `s8[l] = acc[l] + acc[l + 8]` adds accumulators `g` and `g + 2`, `s4[l] = s8[l] +
/// s8[l + 4]` the two results, and the last two steps, within each lane, are
/// [`within_quarters`].
///
/// # Safety
/// AVX-512F is available; `a` has `k` values and `kq` a block of `16 * k`; `k % 16 == 0`,
/// `k > 0`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn quarters_1x16(a: *const f32, kq: *const f32, k: usize) -> __m512 {
    // SAFETY: the caller's contract. The loop runs k / 16 times (k > 0), reading 64 bytes of
    // the query and 1 KiB of the block per pass.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 16];
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
            "2:",
            "vbroadcastf32x4 zmm16, [{a}]",
            "vbroadcastf32x4 zmm17, [{a} + 16]",
            "vbroadcastf32x4 zmm18, [{a} + 32]",
            "vbroadcastf32x4 zmm19, [{a} + 48]",
            "vfmadd231ps zmm0, zmm16, [{b}]",
            "vfmadd231ps zmm1, zmm16, [{b} + 64]",
            "vfmadd231ps zmm2, zmm16, [{b} + 128]",
            "vfmadd231ps zmm3, zmm16, [{b} + 192]",
            "vfmadd231ps zmm4, zmm17, [{b} + 256]",
            "vfmadd231ps zmm5, zmm17, [{b} + 320]",
            "vfmadd231ps zmm6, zmm17, [{b} + 384]",
            "vfmadd231ps zmm7, zmm17, [{b} + 448]",
            "vfmadd231ps zmm8, zmm18, [{b} + 512]",
            "vfmadd231ps zmm9, zmm18, [{b} + 576]",
            "vfmadd231ps zmm10, zmm18, [{b} + 640]",
            "vfmadd231ps zmm11, zmm18, [{b} + 704]",
            "vfmadd231ps zmm12, zmm19, [{b} + 768]",
            "vfmadd231ps zmm13, zmm19, [{b} + 832]",
            "vfmadd231ps zmm14, zmm19, [{b} + 896]",
            "vfmadd231ps zmm15, zmm19, [{b} + 960]",
            "add {a}, 64",
            "add {b}, 1024",
            "cmp {a}, {end}",
            "jb 2b",
            a = inout(reg) a => _,
            b = inout(reg) kq => _,
            end = in(reg) a.add(k),
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
        // u[p]: lane 4c + i is s4[i] of key 4c + p.
        let u: [__m512; 4] = std::array::from_fn(|p| {
            _mm512_add_ps(
                _mm512_add_ps(acc[p], acc[8 + p]),
                _mm512_add_ps(acc[4 + p], acc[12 + p]),
            )
        });
        // Lane 4c + p ends with the sum of key 4c + p.
        within_quarters(&u)
    }
}
