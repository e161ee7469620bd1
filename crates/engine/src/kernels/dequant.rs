//! Quantized weights against f32 activations: the fast paths behind
//! [`matmul`](fn@super::matmul) for [`QMatrix`] weights.
//!
//! The numeric definition is the f32 one of [`crate::kernels`]: a weight value is what
//! ggml's reference dequantization computes (`d * q + m` for Q4_1, `d * q` for Q8_0, the
//! K-quants' `d * sc * q - dmin * m`, ...: see `quant::blocks`), exactly as
//! [`QMatrix::dequantize_rows`] computes it, and an output is the 16-lane [`dot`](super::dot)
//! of the activation row with those values. The two kernels here only compute it faster:
//!
//! * [`dequantize_rows`] widens blocks to f32 eight or sixteen values per instruction (the
//!   prefill path dequantizes a few rows into a buffer, then runs the f32 micro-kernels over
//!   every token);
//! * [`gemv`] is the decode path (one activation row): it widens each block in registers and
//!   multiplies it at once, one weight row at a time, so nothing is written back to memory.
//!
//! Both have a portable form (the reference) and hand-written x86 forms for every kind
//! (`x86::dequant` for the split 32-value kinds, `x86::blocks` for the K-quants' blocks)
//! with the same operations in the same order per lane (the dot products' fused multiply-adds
//! included); tests check they give the same bits at every level the machine has. Where a
//! weight is a product plus a minimum (`d * q + m`, the K-quants' `dl * q - ml`) it is
//! exact to fuse: the product loses nothing, so one rounding remains either way.

use super::dot::dot;
use super::isa::Isa;
use super::quant::QMatrix;
#[cfg(target_arch = "x86_64")]
use super::x86;

/// Dequantizes rows `r0..r0 + count` of `q` into `out` (`count * q.cols()` values), bitwise
/// as [`QMatrix::dequantize_rows`], at `isa`.
///
/// # Panics
/// If the rows are out of range or `out` has the wrong length.
pub(crate) fn dequantize_rows(isa: Isa, q: &QMatrix, r0: usize, count: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_simd() {
        x86::dequantize_rows(isa, q, r0, count, out);
        return;
    }
    q.dequantize_rows(r0, count, out);
}

/// `out[j] = dot(x, row r0 + j of q)` for `j < out.len()`, at `isa`: bitwise what
/// dequantizing the rows and calling [`dot`] on each gives.
///
/// # Panics
/// If `x.len() != q.cols()` or the rows are out of range.
pub(crate) fn gemv(isa: Isa, q: &QMatrix, r0: usize, x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_simd() {
        x86::gemv(isa, q, r0, x, out);
        return;
    }
    gemv_portable(q, r0, x, out);
}

/// The reference for [`gemv`]: one row at a time through an f32 buffer.
fn gemv_portable(q: &QMatrix, r0: usize, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), q.cols(), "gemv input is not the weight's width");
    let mut row = vec![0.0f32; q.cols()];
    for (j, o) in out.iter_mut().enumerate() {
        q.dequantize_rows(r0 + j, 1, &mut row);
        *o = dot(x, &row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::for_each_isa;
    use crate::kernels::quant::tests::{Scales, bits, matrix, random_blocks};
    use crate::kernels::quant::{QK, QKind};
    use crate::testing::values;

    #[test]
    fn dequantize_rows_matches_the_reference_bitwise() {
        for kind in QKind::ALL {
            for scales in [Scales::Moderate, Scales::Extreme] {
                let (rows, cols) = (7, 3 * kind.block_values());
                let raw = random_blocks(kind, rows, cols, 3, scales);
                let q = QMatrix::from_gguf_blocks(kind, rows, cols, &raw).expect("blocks");
                let mut want = vec![0.0f32; 5 * cols];
                q.dequantize_rows(1, 5, &mut want);
                for_each_isa(|isa| {
                    let mut got = vec![f32::NAN; 5 * cols];
                    dequantize_rows(isa, &q, 1, 5, &mut got);
                    assert_eq!(bits(&got), bits(&want), "{kind:?} {scales:?} {isa:?}");
                });
                // The reference itself against row_into, one row at a time.
                let mut row = vec![0.0f32; cols];
                for r in 1..6 {
                    q.row_into(r, &mut row);
                    let at = (r - 1) * cols;
                    assert_eq!(bits(&row), bits(&want[at..at + cols]), "{kind:?} row {r}");
                }
            }
        }
    }

    #[test]
    fn gemv_matches_dequantize_then_dot_bitwise() {
        // 11 rows of 7 or 70 blocks of 32 (the x86 kernels widen scales 64 blocks at a
        // time), or of 2 super-blocks; from row 1, 10 rows and 9 (the x86 kernels take rows
        // in pairs, one from each half, and an odd one alone).
        let shapes = QKind::ALL.into_iter().flat_map(|kind| {
            let widths = match kind.block_values() {
                QK => vec![7 * QK, 70 * QK],
                k => vec![2 * k],
            };
            widths.into_iter().map(move |cols| (kind, cols))
        });
        for (kind, cols) in shapes {
            let rows = 11;
            let q = matrix(kind, rows, cols, 5);
            let x = values(cols, 9);
            let mut reference = vec![f32::NAN; rows - 1];
            gemv_portable(&q, 1, &x, &mut reference);
            let mut row = vec![0.0f32; cols];
            for (j, &r) in reference.iter().enumerate() {
                q.row_into(1 + j, &mut row);
                assert_eq!(r.to_bits(), dot(&x, &row).to_bits(), "{kind:?} row {j}");
            }
            for_each_isa(|isa| {
                for count in [rows - 1, rows - 2] {
                    let mut got = vec![f32::NAN; count];
                    gemv(isa, &q, 1, &x, &mut got);
                    assert_eq!(
                        bits(&got),
                        bits(&reference[..count]),
                        "{kind:?} {cols} wide, {count} rows, {isa:?}"
                    );
                }
            });
        }
    }
}
