//! The weighted V sums of six queries at once (AVX-512) or of one (AVX2), 64 columns of the
//! V rows at a time, in assembly.

use std::ops::Range;

use crate::kernels::isa::{Isa, Level};

/// For each of six queries `q` (outputs `o[q * 64..][..64]`, weights `scores[q * len..]`),
/// `o[q] = fma(scores[q * len + j], v[j], o[q])` for the V rows `j` in `rows`, in order, where
/// `v[j]` is `v[j * stride..][..64]`.
///
/// # Panics
/// If `isa` is not AVX-512, `stride < 64` or a length is short.
pub(crate) fn pv_6x64(
    isa: Isa,
    o: &mut [f32],
    scores: &[f32],
    len: usize,
    rows: Range<usize>,
    v: &[f32],
    stride: usize,
) {
    assert!(
        isa.level() == Level::Avx512,
        "x86::pv_6x64 needs AVX-512, not {}",
        isa.name()
    );
    assert!(o.len() == 6 * 64 && rows.start <= rows.end, "pv_6x64 rows");
    assert!(
        scores.len() >= 5 * len + rows.end && v_in_bounds(v, &rows, stride),
        "pv_6x64 bounds"
    );
    if rows.is_empty() {
        return;
    }
    // SAFETY: the CPU has AVX-512F (an `Isa` of that level exists only then); `o` has six
    // 64-wide rows, query q's weights scores[q * len + j] and the V rows j * stride..+64 for j
    // in `rows` are in bounds (checked above: q * len + j < 5 * len + rows.end for q < 6 and
    // j in `rows`).
    unsafe {
        pv512_6x64(
            o.as_mut_ptr(),
            scores.as_ptr().add(rows.start),
            len,
            v.as_ptr().add(rows.start * stride),
            stride * size_of::<f32>(),
            rows.len(),
        )
    }
}

/// Weighted V sums of six queries over a run of V rows, 64 columns of them: for each
/// query `q` and row `j` of `0..n`, in order, `o[q] = fma(p[q][j], v[j], o[q])`, where
/// `o[q]` is `o[q * 64..][..64]`, `p[q]` is `p.add(q * stride)` and `v[j]` the 64 values at
/// `v` plus `j * v_bytes` bytes.
///
/// In assembly so that each V row is loaded once into registers for the six queries (the
/// compiler's output of the portable loop loads it again for every query, and the loads,
/// not the multiply-adds, set its speed). 24 accumulators, four V registers and one
/// broadcast weight. Per lane the same fused multiply-adds in the same order as
/// the portable `accumulate`, so the same bits.
///
/// # Safety
/// AVX-512F is available; `o` has `6 * 64` values, each `p[q]` has `n` and every `v[j]` is
/// readable.
#[target_feature(enable = "avx512f")]
unsafe fn pv512_6x64(
    o: *mut f32,
    p: *const f32,
    stride: usize,
    v: *const f32,
    v_bytes: usize,
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
            "add {v}, {v_bytes}",
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
            v_bytes = in(reg) v_bytes,
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

/// For one query (output `o[..64]`, weights `scores`), `o = fma(scores[j], v[j], o)` for the
/// V rows `j` in `rows`, in order, where `v[j]` is `v[j * stride..][..64]`: [`pv_6x64`] for a
/// lone query, at AVX2 (or above).
///
/// # Panics
/// If `isa` is the portable level, `stride < 64` or a length is short.
pub(crate) fn pv_1x64(
    isa: Isa,
    o: &mut [f32],
    scores: &[f32],
    rows: Range<usize>,
    v: &[f32],
    stride: usize,
) {
    assert!(isa.is_simd(), "x86::pv_1x64 needs AVX2");
    assert!(o.len() == 64 && rows.start <= rows.end, "pv_1x64 rows");
    assert!(
        scores.len() >= rows.end && v_in_bounds(v, &rows, stride),
        "pv_1x64 bounds"
    );
    if rows.is_empty() {
        return;
    }
    // SAFETY: the CPU has AVX2 and FMA (every level above the portable one does); `o` has 64
    // values, and the weights scores[j] and V rows j * stride..+64 for j in `rows` are in
    // bounds (checked above).
    unsafe {
        pv256_1x64(
            o.as_mut_ptr(),
            scores.as_ptr().add(rows.start),
            v.as_ptr().add(rows.start * stride),
            stride * size_of::<f32>(),
            rows.len(),
        )
    }
}

/// For two queries (outputs `o[..64]` and `o[64..128]`, weights `scores[..]` and
/// `scores[len..]`), `o[q] = fma(scores[q * len + j], v[j], o[q])` for the V rows `j` in
/// `rows`, in order, where `v[j]` is `v[j * stride..][..64]`: [`pv_6x64`] for a pair of
/// queries, at AVX2 (or above), 32 columns at a time ([`pv256_2x32`]).
///
/// # Panics
/// If `isa` is the portable level, `stride < 64` or a length is short.
pub(crate) fn pv_2x64(
    isa: Isa,
    o: &mut [f32],
    scores: &[f32],
    len: usize,
    rows: Range<usize>,
    v: &[f32],
    stride: usize,
) {
    assert!(isa.is_simd(), "x86::pv_2x64 needs AVX2");
    assert!(
        o.len() == 128 && rows.start <= rows.end && rows.end <= len,
        "pv_2x64 rows"
    );
    assert!(
        scores.len() >= len + rows.end && v_in_bounds(v, &rows, stride),
        "pv_2x64 bounds"
    );
    if rows.is_empty() {
        return;
    }
    // SAFETY: the CPU has AVX2 and FMA (every level above the portable one does); `o` has
    // 128 values, and the weights scores[q * len + j] and V rows j * stride..+64 for q < 2
    // and j in `rows` are in bounds (checked above): each half reads columns 0..32 or
    // 32..64 of them.
    unsafe {
        let (o, p) = (o.as_mut_ptr(), scores.as_ptr().add(rows.start));
        let v = v.as_ptr().add(rows.start * stride);
        for half in [0, 32] {
            pv256_2x32(
                [o.add(half), o.add(64 + half)],
                [p, p.add(len)],
                v.add(half),
                stride * size_of::<f32>(),
                rows.len(),
            );
        }
    }
}

/// Whether `v` holds the 64 values at `j * stride` for every `j` in `rows`.
fn v_in_bounds(v: &[f32], rows: &Range<usize>, stride: usize) -> bool {
    stride >= 64 && (rows.is_empty() || (rows.end - 1) * stride + 64 <= v.len())
}

/// Weighted V sums of one query over a run of V rows, 64 columns of them: for each row `j`
/// of `0..n`, in order, `o = fma(p[j], v[j], o)`, where `v[j]` is the 64 values at `v` plus
/// `j * v_bytes` bytes.
///
/// In assembly so that the eight accumulators stay in registers (`ymm0..=7`, one broadcast
/// weight in `ymm8`, V rows as memory operands): eight independent chains keep both FMA
/// pipes busy. The portable loop's output kept them on the stack. Per lane the same fused
/// multiply-adds in the same order as the portable `accumulate`, so the same bits.
///
/// # Safety
/// AVX2 and FMA are available; `o` has 64 values, `p` has `n` and every `v[j]` is readable.
#[target_feature(enable = "avx2,fma")]
unsafe fn pv256_1x64(o: *mut f32, p: *const f32, v: *const f32, v_bytes: usize, n: usize) {
    // SAFETY: the caller's contract. The loop body runs n times (n > 0 is checked first, as
    // the loop tests its bound at the end); every access is within the rows.
    unsafe {
        if n == 0 {
            return;
        }
        std::arch::asm!(
            "vmovups ymm0, [{o} + 0]",
            "vmovups ymm1, [{o} + 32]",
            "vmovups ymm2, [{o} + 64]",
            "vmovups ymm3, [{o} + 96]",
            "vmovups ymm4, [{o} + 128]",
            "vmovups ymm5, [{o} + 160]",
            "vmovups ymm6, [{o} + 192]",
            "vmovups ymm7, [{o} + 224]",
            "2:",
            "vbroadcastss ymm8, [{p}]",
            "vfmadd231ps ymm0, ymm8, [{v} + 0]",
            "vfmadd231ps ymm1, ymm8, [{v} + 32]",
            "vfmadd231ps ymm2, ymm8, [{v} + 64]",
            "vfmadd231ps ymm3, ymm8, [{v} + 96]",
            "vfmadd231ps ymm4, ymm8, [{v} + 128]",
            "vfmadd231ps ymm5, ymm8, [{v} + 160]",
            "vfmadd231ps ymm6, ymm8, [{v} + 192]",
            "vfmadd231ps ymm7, ymm8, [{v} + 224]",
            "add {p}, 4",
            "add {v}, {v_bytes}",
            "dec {n}",
            "jnz 2b",
            "vmovups [{o} + 0], ymm0",
            "vmovups [{o} + 32], ymm1",
            "vmovups [{o} + 64], ymm2",
            "vmovups [{o} + 96], ymm3",
            "vmovups [{o} + 128], ymm4",
            "vmovups [{o} + 160], ymm5",
            "vmovups [{o} + 192], ymm6",
            "vmovups [{o} + 224], ymm7",
            o = in(reg) o,
            p = inout(reg) p => _,
            v = inout(reg) v => _,
            v_bytes = in(reg) v_bytes,
            n = inout(reg) n => _,
            out("ymm0") _,
            out("ymm1") _,
            out("ymm2") _,
            out("ymm3") _,
            out("ymm4") _,
            out("ymm5") _,
            out("ymm6") _,
            out("ymm7") _,
            out("ymm8") _,
            options(nostack),
        );
    }
}

/// Weighted V sums of two queries over a run of V rows, 32 columns of them: for each row `j`
/// of `0..n`, in order, `o[q] = fma(p[q][j], v[j], o[q])` for both queries, where `v[j]` is
/// the 32 values at `v` plus `j * v_bytes` bytes and `o[q]` the 32 at `o[q]`.
///
/// In assembly, like [`pv256_1x64`]: eight accumulators (`ymm0..=7`, four a query), each
/// row's 32 values loaded once into `ymm8..=11` for both queries and the two weights
/// broadcast into `ymm12` and `ymm13`: six loads for eight multiply-adds, where one query's
/// 64 columns take nine (the V rows as memory operands and one broadcast), and Zen 1's loads
/// of 256-bit registers, one a cycle, are the limit. On an AMD EPYC (Zen 1), one thread, 48
/// queries over 2,048 rows of 64, 64 rows at a time (in L1): 34-35 GFLOP/s one query at a
/// time, 35-35.6 two; a 16-token turn's V sums after 2,048 tokens, 41.3 -> 39.4 ms of thread
/// time. Per lane the same fused multiply-adds in the same order as the portable
/// `accumulate`, so the same bits.
///
/// # Safety
/// AVX2 and FMA are available; each `o[q]` has 32 values, each `p[q]` has `n` and every
/// `v[j]` is readable.
#[target_feature(enable = "avx2,fma")]
unsafe fn pv256_2x32(
    o: [*mut f32; 2],
    p: [*const f32; 2],
    v: *const f32,
    v_bytes: usize,
    n: usize,
) {
    // SAFETY: the caller's contract. The loop body runs n times (n > 0 is checked first, as
    // the loop tests its bound at the end); every access is within the rows.
    unsafe {
        if n == 0 {
            return;
        }
        std::arch::asm!(
            "vmovups ymm0, [{o0} + 0]",
            "vmovups ymm1, [{o0} + 32]",
            "vmovups ymm2, [{o0} + 64]",
            "vmovups ymm3, [{o0} + 96]",
            "vmovups ymm4, [{o1} + 0]",
            "vmovups ymm5, [{o1} + 32]",
            "vmovups ymm6, [{o1} + 64]",
            "vmovups ymm7, [{o1} + 96]",
            "2:",
            "vmovups ymm8, [{v} + 0]",
            "vmovups ymm9, [{v} + 32]",
            "vmovups ymm10, [{v} + 64]",
            "vmovups ymm11, [{v} + 96]",
            "vbroadcastss ymm12, [{p0}]",
            "vbroadcastss ymm13, [{p1}]",
            "vfmadd231ps ymm0, ymm12, ymm8",
            "vfmadd231ps ymm1, ymm12, ymm9",
            "vfmadd231ps ymm2, ymm12, ymm10",
            "vfmadd231ps ymm3, ymm12, ymm11",
            "vfmadd231ps ymm4, ymm13, ymm8",
            "vfmadd231ps ymm5, ymm13, ymm9",
            "vfmadd231ps ymm6, ymm13, ymm10",
            "vfmadd231ps ymm7, ymm13, ymm11",
            "add {p0}, 4",
            "add {p1}, 4",
            "add {v}, {v_bytes}",
            "dec {n}",
            "jnz 2b",
            "vmovups [{o0} + 0], ymm0",
            "vmovups [{o0} + 32], ymm1",
            "vmovups [{o0} + 64], ymm2",
            "vmovups [{o0} + 96], ymm3",
            "vmovups [{o1} + 0], ymm4",
            "vmovups [{o1} + 32], ymm5",
            "vmovups [{o1} + 64], ymm6",
            "vmovups [{o1} + 96], ymm7",
            o0 = in(reg) o[0],
            o1 = in(reg) o[1],
            p0 = inout(reg) p[0] => _,
            p1 = inout(reg) p[1] => _,
            v = inout(reg) v => _,
            v_bytes = in(reg) v_bytes,
            n = inout(reg) n => _,
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
            options(nostack),
        );
    }
}
