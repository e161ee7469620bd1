//! The reference dequantization of GGUF blocks: each function is ggml's `dequantize_row_*`
//! (`ggml/src/ggml-quants.c`) for one block, with the same f32 operations in the same order,
//! so its values are bitwise llama.cpp's (and candle's, whose `to_float` transliterates the
//! same code). The 32-value kinds are here too, though memory holds them split (see
//! [`super::QMatrix`]): these are their references on the file's bytes.
//!
//! Exactness: an f16 scale has at most 11 significant bits (its subnormals are multiples of
//! 2^-24, far inside f32's normal range), a sub-block scale at most 7 (`|sc| <= 128`) and a
//! quant at most 5 (`|q| <= 32`), so every product here (`d * sc`, `dl * q`, `d * sc * q`) has
//! at most 23 significant bits: exact in f32, and far from overflow. Only the addition of a
//! minimum (Q4_1's and Q5_1's `+ m`, the K-quants' `- ml`) rounds, once. So fusing
//! `dl * q - ml` into one FMA gives the same bits, which the x86 forms rely on.

use super::QKind;

/// Values per K-quant super-block (GGML's `QK_K`).
pub const QK_K: usize = 256;

/// The f16 at `b[at..at + 2]`, widened (exactly).
#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0, 18 bytes: `d` (f16), 16 bytes of nibbles (elements `j` and `j + 16` in byte `j`).
/// `x = (q - 8) * d`.
#[inline(always)]
pub(crate) fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q4_1, 20 bytes: `d`, `m`, 16 bytes of nibbles. `x = q * d + m`.
#[inline(always)]
pub(crate) fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32;
        let x1 = (qs[j] >> 4) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// Q5_0, 22 bytes: `d`, 32 high bits (`qh`, bit `e` for element `e`), 16 bytes of nibbles.
/// `x = (q - 16) * d`.
#[inline(always)]
pub(crate) fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh_0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | xh_1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q5_1, 24 bytes: `d`, `m`, `qh`, 16 bytes of nibbles. `x = q * d + m`.
#[inline(always)]
pub(crate) fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh_0) as i32;
        let x1 = ((qs[j] >> 4) | xh_1) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// Q8_0, 34 bytes: `d`, 32 signed bytes. `x = q * d`.
#[inline(always)]
pub(crate) fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// Q2_K, 84 bytes: 16 sub-block scale bytes (scale in the low nibble, minimum in the high),
/// 64 bytes of 2-bit quants, `d`, `dmin`. `x = d * sc * q - dmin * m` per 16 values.
#[inline(always)]
pub(crate) fn q2_k(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let scales = &b[0..16];
    let mut is = 0;
    let mut out = 0;
    for n in 0..2 {
        let q = &b[16 + 32 * n..16 + 32 * (n + 1)];
        let mut shift = 0;
        for _ in 0..4 {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0xF) as f32;
                let ml = min * (sc >> 4) as f32;
                for &q in &q[16 * half..16 * (half + 1)] {
                    y[out] = dl * (((q >> shift) & 3) as i8) as f32 - ml;
                    out += 1;
                }
            }
            shift += 2;
        }
    }
}

/// Q3_K, 110 bytes: 32 bytes of high bits (`hmask`), 64 bytes of 2-bit quants, 12 bytes of
/// 6-bit sub-block scales, `d`. `x = d * (sc - 32) * (q - 4 * !high)` per 16 values.
#[inline(always)]
pub(crate) fn q3_k(b: &[u8; 110], y: &mut [f32; QK_K]) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let d_all = f16_at(b, 108);
    let hm = &b[0..32];
    let word = |i: usize| u32::from_le_bytes([b[96 + i], b[97 + i], b[98 + i], b[99 + i]]);
    let mut aux = [word(0), word(4), word(8), 0];
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    // ggml reads `aux` through an `int8_t *`: little-endian bytes.
    let mut scales = [0i8; 16];
    for (s, byte) in scales
        .iter_mut()
        .zip(aux.iter().flat_map(|w| w.to_le_bytes()))
    {
        *s = byte as i8;
    }
    let mut m = 1u8;
    let mut is = 0;
    let mut out = 0;
    for n in 0..2 {
        let q = &b[32 + 32 * n..32 + 32 * (n + 1)];
        let mut shift = 0;
        for _ in 0..4 {
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 16 * half..16 * (half + 1) {
                    let low = ((q[l] >> shift) & 3) as i8 as i32;
                    let high = if hm[l] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (low - high) as f32;
                    out += 1;
                }
            }
            shift += 2;
            m <<= 1;
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K or Q5_K super-block, from its
/// 12 packed bytes (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K, 144 bytes: `d`, `dmin`, 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles
/// (each 32 bytes hold 64 values: low nibbles first). `x = d * sc * q - dmin * m` per 32 values.
#[inline(always)]
pub(crate) fn q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    for j in 0..4 {
        let q = &b[16 + 32 * j..16 + 32 * (j + 1)];
        let (sc, m) = scale_min_k4(2 * j, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * j + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let y = &mut y[64 * j..64 * (j + 1)];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
        }
        for l in 0..32 {
            y[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K, 176 bytes: `d`, `dmin`, 12 bytes of scales and minimums, 32 bytes of high bits (bit
/// `2j` for the low nibbles of quarter `j`, `2j + 1` for its high ones), 128 bytes of nibbles.
/// `x = d * sc * q - dmin * m` per 32 values.
#[inline(always)]
pub(crate) fn q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let (mut u1, mut u2) = (1u8, 2u8);
    for j in 0..4 {
        let ql = &b[48 + 32 * j..48 + 32 * (j + 1)];
        let (sc, m) = scale_min_k4(2 * j, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * j + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let y = &mut y[64 * j..64 * (j + 1)];
        for l in 0..32 {
            let q = (ql[l] & 0xF) as i32 + if qh[l] & u1 != 0 { 16 } else { 0 };
            y[l] = d1 * q as f32 - m1;
        }
        for l in 0..32 {
            let q = (ql[l] >> 4) as i32 + if qh[l] & u2 != 0 { 16 } else { 0 };
            y[32 + l] = d2 * q as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed 8-bit
/// sub-block scales, `d`. `x = d * sc * (q - 32)` per 16 values.
#[inline(always)]
pub(crate) fn q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * (n + 1)];
        let qh = &b[128 + 32 * n..128 + 32 * (n + 1)];
        let sc = &b[192 + 8 * n..192 + 8 * (n + 1)];
        let y = &mut y[128 * n..128 * (n + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Dequantizes `raw`, whole GGUF blocks of `kind`, into `out` (their values, in order): the
/// reference every faster form matches bit for bit.
///
/// # Panics
/// If `raw` is not whole blocks or `out` does not have exactly their values.
#[inline(always)]
pub(crate) fn dequantize(kind: QKind, raw: &[u8], out: &mut [f32]) {
    match kind {
        QKind::Q4_0 => each(raw, out, q4_0),
        QKind::Q4_1 => each(raw, out, q4_1),
        QKind::Q5_0 => each(raw, out, q5_0),
        QKind::Q5_1 => each(raw, out, q5_1),
        QKind::Q8_0 => each(raw, out, q8_0),
        QKind::Q2K => each(raw, out, q2_k),
        QKind::Q3K => each(raw, out, q3_k),
        QKind::Q4K => each(raw, out, q4_k),
        QKind::Q5K => each(raw, out, q5_k),
        QKind::Q6K => each(raw, out, q6_k),
    }
}

/// `block` on each `B`-byte block of `raw` and its `V` values of `out`.
#[inline(always)]
fn each<const B: usize, const V: usize>(
    raw: &[u8],
    out: &mut [f32],
    block: impl Fn(&[u8; B], &mut [f32; V]),
) {
    let (blocks, rest) = raw.as_chunks::<B>();
    let (values, tail) = out.as_chunks_mut::<V>();
    assert!(
        rest.is_empty() && tail.is_empty() && blocks.len() == values.len(),
        "dequantize: {} bytes are not the blocks of {} values",
        raw.len(),
        out.len()
    );
    for (b, y) in blocks.iter().zip(values) {
        block(b, y);
    }
}
