//! The element types a cache holds K and V in, and the exact definitions of writing an f32 row
//! into each and reading it back.
//!
//! Writing rounds (f16, bf16: to nearest, ties to even) or quantizes (`q8_0`, below); reading
//! is exact: every stored value is an f32 value, and [`KvRows::to_f32`] gives it bit for bit.
//! So attention over a cache in any dtype is attention over f32 rows, which is what lets the
//! engine read them in place, widening a few rows at a time, and still compute the same bits
//! at every instruction-set level.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use kv_store::{KvDtype, Q8_0_BLOCK, Q8_0_BLOCK_BYTES};

/// Values converted per batch by the f16 writes: `half` converts whole slices with F16C when
/// the CPU has it (detected at run time), where one value at a time costs several times more.
/// Both round the same way.
const F16_BATCH: usize = 1024;

/// Rows of one head in a cache's dtype, as stored: `bytes` holds `len` rows of `width` values.
#[derive(Clone, Copy, Debug)]
pub struct KvRows<'a> {
    dtype: KvDtype,
    width: usize,
    bytes: &'a [u8],
}

impl<'a> KvRows<'a> {
    pub(crate) fn new(dtype: KvDtype, width: usize, bytes: &'a [u8]) -> KvRows<'a> {
        KvRows {
            dtype,
            width,
            bytes,
        }
    }

    /// The element type.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Values per row (the head width).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.row_bytes()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        row_bytes(self.dtype, self.width)
    }

    /// True when there is no row.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The rows as stored, little-endian.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The rows as f32 values when the dtype is f32: no conversion needed.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match self.dtype {
            KvDtype::F32 => Some(bytemuck::cast_slice(self.bytes)),
            _ => None,
        }
    }

    /// The rows as half-precision bit patterns when the dtype is f16 (or bf16).
    pub fn as_u16(&self) -> Option<&'a [u16]> {
        match self.dtype {
            KvDtype::F16 | KvDtype::Bf16 => Some(bytemuck::cast_slice(self.bytes)),
            _ => None,
        }
    }

    /// Rows `rows` as f32 into `out` (`rows.len() * width` values): the exact values stored.
    ///
    /// This is the definition every faster reader must match bit for bit. It is
    /// `#[inline(always)]` so that a caller compiled for a wider instruction set vectorizes it.
    ///
    /// # Panics
    /// If `rows` is past the end or `out` has another length: a bug in the caller.
    #[inline(always)]
    pub fn to_f32(&self, rows: Range<usize>, out: &mut [f32]) {
        let w = self.width;
        assert_eq!(out.len(), rows.len() * w, "output of another length");
        let rb = self.row_bytes();
        let src = &self.bytes[rows.start * rb..rows.end * rb];
        match self.dtype {
            KvDtype::F32 => out.copy_from_slice(bytemuck::cast_slice(src)),
            KvDtype::F16 => {
                let halves: &[u16] = bytemuck::cast_slice(src);
                for (o, &h) in out.iter_mut().zip(halves) {
                    *o = f16_to_f32(h);
                }
            }
            KvDtype::Bf16 => {
                let halves: &[u16] = bytemuck::cast_slice(src);
                for (o, &h) in out.iter_mut().zip(halves) {
                    *o = f32::from_bits(u32::from(h) << 16);
                }
            }
            _ => {
                for (o, block) in out
                    .chunks_exact_mut(Q8_0_BLOCK)
                    .zip(src.chunks_exact(Q8_0_BLOCK_BYTES))
                {
                    dequantize_q8_0(block, o);
                }
            }
        }
    }
}

/// Bytes of a row of `width` values; the cache only holds dtypes and widths that fit.
pub(crate) fn row_bytes(dtype: KvDtype, width: usize) -> usize {
    dtype.row_bytes(width).unwrap_or(0).max(1)
}

/// An IEEE half-precision value (its bits) as f32, exactly, as the x86 `vcvtph2ps` instruction
/// converts it (a signalling NaN comes out quiet).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match exp {
        // Zero or subnormal: man * 2^-24, exact in f32.
        0 => return f32::from_bits(sign | (man as f32 * (1.0 / 16_777_216.0)).to_bits()),
        0x1f if man == 0 => sign | 0x7f80_0000,
        0x1f => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// One `q8_0` block (34 bytes: f16 scale, 32 signed bytes) as 32 f32 values `d * q`; each
/// product is exact (an 11-bit by 8-bit product fits f32's 24 bits).
#[inline(always)]
pub fn dequantize_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
    for (o, &q) in out.iter_mut().zip(&block[2..Q8_0_BLOCK_BYTES]) {
        *o = d * f32::from(q as i8);
    }
}

/// One block of 32 values as `q8_0`, as llama.cpp's reference `quantize_row_q8_0` does it:
/// `d = max|x| / 127`, stored as f16; `q = round(x / d)` computed as `x * (1 / d)` with the
/// unrounded `d`, rounded half away from zero; all zeros give `d = 0`.
fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (o, &v) in out[2..Q8_0_BLOCK_BYTES].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
}

/// Writes `src` (whole rows of `width` values) into `dst` in `dtype`.
pub(crate) fn encode_rows(dtype: KvDtype, width: usize, src: &[f32], dst: &mut [u8]) {
    match dtype {
        KvDtype::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        KvDtype::F16 => {
            let mut buf = [f16::ZERO; F16_BATCH];
            for (s, d) in src.chunks(F16_BATCH).zip(dst.chunks_mut(2 * F16_BATCH)) {
                let b = &mut buf[..s.len()];
                b.convert_from_f32_slice(s);
                d.copy_from_slice(bytemuck::cast_slice(b));
            }
        }
        KvDtype::Bf16 => {
            for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
        }
        _ => {
            debug_assert!(width.is_multiple_of(Q8_0_BLOCK));
            for (x, out) in src
                .chunks_exact(Q8_0_BLOCK)
                .zip(dst.chunks_exact_mut(Q8_0_BLOCK_BYTES))
            {
                quantize_q8_0(x, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_to_f32_is_exact_for_every_half() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
                // Quiet, sign and payload kept, as vcvtph2ps gives them.
                let expect =
                    (u32::from(h & 0x8000) << 16) | 0x7fc0_0000 | (u32::from(h & 0x3ff) << 13);
                assert_eq!(got.to_bits(), expect, "{h:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn q8_0_follows_the_reference_quantization() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.77).sin() * 3.0).collect();
        let mut bytes = vec![0u8; 68];
        encode_rows(KvDtype::Q8_0, 64, &x, &mut bytes);
        let rows = KvRows::new(KvDtype::Q8_0, 64, &bytes);
        assert_eq!(rows.len(), 1);
        let mut back = vec![0.0f32; 64];
        rows.to_f32(0..1, &mut back);
        for (block, xs) in x.chunks(32).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = f16::from_le_bytes([bytes[block * 34], bytes[block * 34 + 1]]).to_f32();
            assert_eq!(d, f16::from_f32(amax / 127.0).to_f32());
            // The largest value maps to +-127; every value is within half a step, plus the
            // scale's own rounding.
            let q: Vec<i8> = bytes[block * 34 + 2..][..32]
                .iter()
                .map(|&b| b as i8)
                .collect();
            assert_eq!(q.iter().map(|q| q.unsigned_abs()).max(), Some(127));
            for (i, &v) in xs.iter().enumerate() {
                let got = back[block * 32 + i];
                assert_eq!(got, d * f32::from(q[i]));
                assert!((got - v).abs() <= d * 0.5 + amax / 1024.0, "{v} vs {got}");
            }
        }
        // All zeros: a zero scale, zero values.
        let mut zeros = vec![0xffu8; 34];
        encode_rows(KvDtype::Q8_0, 32, &[0.0; 32], &mut zeros);
        assert!(zeros.iter().all(|&b| b == 0));
    }

    #[test]
    fn every_dtype_reads_back_what_it_wrote() {
        let x: Vec<f32> = (0..96).map(|i| (i as f32 - 40.0) * 0.173).collect();
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16, KvDtype::Q8_0] {
            let rb = row_bytes(dtype, 32);
            let mut bytes = vec![0u8; 3 * rb];
            encode_rows(dtype, 32, &x, &mut bytes);
            let rows = KvRows::new(dtype, 32, &bytes);
            assert_eq!(rows.len(), 3);
            let mut all = vec![0.0f32; 96];
            rows.to_f32(0..3, &mut all);
            let mut one = vec![0.0f32; 32];
            rows.to_f32(2..3, &mut one);
            assert_eq!(one, all[64..]);
            let tolerance = match dtype {
                KvDtype::F32 => 0.0,
                KvDtype::F16 => 1.0 / 2048.0,
                KvDtype::Bf16 => 1.0 / 256.0,
                _ => 1.0 / 100.0,
            };
            for (a, b) in x.iter().zip(&all) {
                assert!(
                    (a - b).abs() <= tolerance * 10.0 * a.abs().max(1.0),
                    "{dtype}: {a} {b}"
                );
            }
            // Writing what was read back changes nothing: the stored values are fixed points.
            let mut again = vec![0u8; 3 * rb];
            encode_rows(dtype, 32, &all, &mut again);
            assert_eq!(again, bytes, "{dtype}");
        }
    }
}
