//! The matmul panel: one block of weight rows against every row of `x`, in tiles of 2x3
//! (AVX2) or 4x6 and 6x4 (AVX-512) dot products whose inner loops are in assembly.

use std::arch::x86_64::*;

use super::{acc_2x3, kernel, kernel512, reduce, reduce16};
use crate::kernels::dot::{LANES, MB};
use crate::kernels::isa::{Isa, Level};

/// One weight panel against rows of `x`, as the portable `panel` computes it:
/// `out[i * ld + j] = dot(x[i], w[j])` for the `rows` rows of `w`, all `k` long (a multiple
/// of [`LANES`]).
///
/// # Panics
/// If `isa` is the portable level or a length is short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn panel(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    out: &mut [f32],
    ld: usize,
) {
    assert!(
        k.is_multiple_of(LANES),
        "x86::panel needs whole 16-lane chunks"
    );
    assert!(x.len() >= m * k && w.len() >= rows * k, "x86::panel rows");
    // SAFETY: the CPU has `isa` (an `Isa` exists only for levels it has) and the input
    // lengths are checked above: every micro-kernel call reads rows i < m of x and j < rows of
    // w, k values each. Writes are indexed (bounds-checked).
    unsafe {
        match isa.level() {
            Level::Avx2 => panel_avx2(x.as_ptr(), m, k, w.as_ptr(), rows, out, ld),
            Level::Avx512 => panel_avx512(x.as_ptr(), m, k, w.as_ptr(), rows, out, ld),
            Level::Portable => panic!("x86::panel needs AVX2 or AVX-512"),
        }
    }
}

/// Rows of `x` by weight rows per AVX-512 matmul tile: 24 accumulators, the tile's six
/// weight chunks and one `x` chunk fill 31 of the 32 registers. A turn's sixteen rows are four
/// whole tiles and a prompt's blocks of [`MB`] eight; the 6x4 tile before left a tail of four
/// or two rows (to the generic kernel). Measured on an Intel Xeon (AVX-512, 2 threads, builds
/// alternated three times): a load and 16-token turn of Gemma 3 270M after 2,048 tokens
/// 35.9-36.2 -> 35.3-35.4 ms, its prefill at 2,048 tokens 744-754 -> 771-772 tok/s,
/// SmolLM2's 626-635 -> 640-644 (its turn unchanged). Alone in L1, one thread, 4x6 was 3-6
/// points of the FMA peak below 6x4 at k <= 512 and 1-2 above at 640 and 1024.
const R512: usize = 4;
const C512: usize = 6;

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
    // A tile's sums into `out`: its row `di` at row `i + di`, from column `j`.
    macro_rules! put {
        ($t:expr, $i:expr, $j:expr) => {{
            let (i, j) = ($i, $j);
            for (di, row) in $t.iter().enumerate() {
                out[(i + di) * ld + j..][..row.len()].copy_from_slice(row);
            }
        }};
    }
    macro_rules! tile {
        ($r:expr, $c:literal, $i:expr, $j:expr) => {{
            let (i, j) = ($i, $j);
            put!(kernel512::<{ $r }, $c>(x.add(i * k), w.add(j * k), k), i, j);
        }};
    }
    // Weight rows `j..j + $c` against rows `i0..i1` of x: `$kernel`'s tiles of `$r` rows, then
    // the rows left in tiles of four (after a six-row kernel), two and one.
    macro_rules! columns {
        ($kernel:ident, $r:literal, $c:literal, $i0:expr, $i1:expr, $j:expr) => {{
            let (mut i, i1, j) = ($i0, $i1, $j);
            while i + $r <= i1 {
                put!($kernel(x.add(i * k), k, w.add(j * k)), i, j);
                i += $r;
            }
            if $r > 4 && i + 4 <= i1 {
                tile!(4, $c, i, j);
                i += 4;
            }
            if i + 2 <= i1 {
                tile!(2, $c, i, j);
                i += 2;
            }
            if i < i1 {
                tile!(1, $c, i, j);
            }
        }};
    }
    // SAFETY: the caller's bounds (see `panel`).
    unsafe {
        for i0 in (0..m).step_by(MB) {
            let i1 = (i0 + MB).min(m);
            let mut j = 0;
            // With fewer than four rows of x (decode from f32 weights), the 6x4 tiles as
            // before.
            while m >= R512 && j + C512 <= rows {
                columns!(kernel512_4x6, 4, 6, i0, i1, j);
                j += C512;
            }
            // The last four or five weight rows (or all of them, with fewer than four rows of
            // x) four at a time.
            while j + 4 <= rows {
                columns!(kernel512_6x4, 6, 4, i0, i1, j);
                j += 4;
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
        for i0 in (0..m).step_by(MB) {
            let i1 = (i0 + MB).min(m);
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

/// [`kernel`]`::<2, 3>` for rows `x0`, `x1` against the three rows of `w` (`k` apart), with
/// the accumulators of [`acc_2x3`] (assembly).
///
/// # Safety
/// As [`acc_2x3`].
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel_2x3(x0: *const f32, x1: *const f32, w: *const f32, k: usize) -> [[f32; 3]; 2] {
    // SAFETY: the caller's contract.
    unsafe {
        let a = acc_2x3(x0, x1, w, k);
        let r = |n: usize| reduce([a[n], a[n + 1]]);
        [[r(0), r(2), r(4)], [r(6), r(8), r(10)]]
    }
}

/// [`kernel512`]`::<6, 4>` for the six rows of `x` (`k` apart) against the four rows of
/// `w` (`k` apart), in assembly: the compiler's register allocation of the intrinsics
/// spills accumulators. 24 accumulators (`zmm0..=23`), the chunk's four weight registers
/// (`zmm24..=27`) and one `x` chunk (`zmm28`). Per lane the same fused multiply-add as
/// the portable `fmadd`, so the same bits.
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
        tile_sums(&a)
    }
}

/// [`kernel512`]`::<4, 6>` for the four rows of `x` (`k` apart) against the six rows of `w`
/// (`k` apart), in assembly: 24 accumulators (`zmm0..=23`), the chunk's six weight registers
/// (`zmm24..=29`) and one `x` chunk (`zmm30`). Per lane the same fused multiply-add as the
/// portable `fmadd`, so the same bits.
///
/// # Safety
/// AVX-512F is available; `x` points to `4 * k` values, `w` to `6 * k`, `k % 16 == 0`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel512_4x6(x: *const f32, k: usize, w: *const f32) -> [[f32; 6]; 4] {
    // SAFETY: the caller's contract. The loop body runs k / 16 times (k > 0 is checked
    // first, as the loop tests its bound at the end); every load is within the rows.
    unsafe {
        if k == 0 {
            return [[0.0; 6]; 4];
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
            "vmovups zmm28, [{w4} + {off}]",
            "vmovups zmm29, [{w5} + {off}]",
            "vmovups zmm30, [{x0} + {off}]",
            "vfmadd231ps zmm0, zmm30, zmm24",
            "vfmadd231ps zmm1, zmm30, zmm25",
            "vfmadd231ps zmm2, zmm30, zmm26",
            "vfmadd231ps zmm3, zmm30, zmm27",
            "vfmadd231ps zmm4, zmm30, zmm28",
            "vfmadd231ps zmm5, zmm30, zmm29",
            "vmovups zmm30, [{x1} + {off}]",
            "vfmadd231ps zmm6, zmm30, zmm24",
            "vfmadd231ps zmm7, zmm30, zmm25",
            "vfmadd231ps zmm8, zmm30, zmm26",
            "vfmadd231ps zmm9, zmm30, zmm27",
            "vfmadd231ps zmm10, zmm30, zmm28",
            "vfmadd231ps zmm11, zmm30, zmm29",
            "vmovups zmm30, [{x2} + {off}]",
            "vfmadd231ps zmm12, zmm30, zmm24",
            "vfmadd231ps zmm13, zmm30, zmm25",
            "vfmadd231ps zmm14, zmm30, zmm26",
            "vfmadd231ps zmm15, zmm30, zmm27",
            "vfmadd231ps zmm16, zmm30, zmm28",
            "vfmadd231ps zmm17, zmm30, zmm29",
            "vmovups zmm30, [{x3} + {off}]",
            "vfmadd231ps zmm18, zmm30, zmm24",
            "vfmadd231ps zmm19, zmm30, zmm25",
            "vfmadd231ps zmm20, zmm30, zmm26",
            "vfmadd231ps zmm21, zmm30, zmm27",
            "vfmadd231ps zmm22, zmm30, zmm28",
            "vfmadd231ps zmm23, zmm30, zmm29",
            "add {off}, 64",
            "cmp {off}, {end}",
            "jb 2b",
            x0 = in(reg) x,
            x1 = in(reg) x.add(k),
            x2 = in(reg) x.add(2 * k),
            x3 = in(reg) x.add(3 * k),
            w0 = in(reg) w,
            w1 = in(reg) w.add(k),
            w2 = in(reg) w.add(2 * k),
            w3 = in(reg) w.add(3 * k),
            w4 = in(reg) w.add(4 * k),
            w5 = in(reg) w.add(5 * k),
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
            out("zmm29") _,
            out("zmm30") _,
            options(nostack, readonly, pure),
        );
        tile_sums(&a)
    }
}

/// The sums of a 24-accumulator tile (`R * C == 24`, accumulator `C * i + j` output
/// `(i, j)`): outputs 0..16 in one batched reduction ([`reduce16`]), 16..24 (and eight zeros)
/// in another.
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn tile_sums<const R: usize, const C: usize>(a: &[__m512; 24]) -> [[f32; C]; R] {
    // SAFETY: the caller's contract.
    unsafe {
        let zero = _mm512_setzero_ps();
        let first: [__m512; 16] = std::array::from_fn(|n| a[n]);
        let rest: [__m512; 16] = std::array::from_fn(|n| if n < 8 { a[16 + n] } else { zero });
        let mut lanes = [0.0f32; 32];
        _mm512_storeu_ps(lanes.as_mut_ptr(), reduce16(&first));
        _mm512_storeu_ps(lanes.as_mut_ptr().add(16), reduce16(&rest));
        let mut out = [[0.0f32; C]; R];
        for (row, l) in out.iter_mut().zip(lanes.chunks_exact(C)) {
            row.copy_from_slice(l);
        }
        out
    }
}
