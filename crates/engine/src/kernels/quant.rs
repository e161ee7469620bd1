//! Quantized weights kept in memory as the GGUF file stores them (Q4_1 and Q8_0 blocks of 32),
//! and their exact dequantization: `d * q + m` (Q4_1) or `d * q` (Q8_0), a multiply then an
//! add, in f32. The fast kernels over these blocks are in [`super::dequant`].
//!
//! An earlier path multiplied them against activations quantized per row to 8-bit blocks, with
//! integer dot products as llama.cpp does (`ggml_vec_dot_q4_1_q8_1`). Unused since that
//! quantization of the activations was found to change SmolLM2-135M's greedy answers, it was
//! removed.

/// Values per quantization block (GGML's `QK4_1` and `QK8_0`).
pub const QK: usize = 32;

/// Which GGML block format a [`QMatrix`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QKind {
    /// 32 unsigned 4-bit values with a scale and a minimum: `x = d * q + m`.
    Q4_1,
    /// 32 signed 8-bit values with a scale: `x = d * q`.
    Q8_0,
}

impl QKind {
    /// Bytes of one block in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_1 => 20,
            QKind::Q8_0 => 34,
        }
    }

    /// Bytes of quantized values per block in memory.
    pub(crate) fn qs_bytes(self) -> usize {
        match self {
            QKind::Q4_1 => QK / 2,
            QKind::Q8_0 => QK,
        }
    }
}

/// A `[rows, cols]` weight matrix of quantized blocks, one row per output feature.
///
/// Scales (and Q4_1 minimums) are widened from f16 to f32 at load time (exactly), so the
/// kernels do no conversion.
#[derive(Clone, Debug)]
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    /// Quantized values, row-major, block-major within a row.
    qs: Vec<u8>,
    /// One scale per block, `rows * nb`.
    d: Vec<f32>,
    /// Q4_1: one minimum per block, `rows * nb`; empty for Q8_0.
    m: Vec<f32>,
}

impl QMatrix {
    /// Parses `rows * cols / 32` GGML blocks. `None` if `cols` is not a multiple of [`QK`] or
    /// `bytes` has the wrong length.
    pub fn from_gguf_blocks(kind: QKind, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        if !cols.is_multiple_of(QK) {
            return None;
        }
        let nb = cols / QK;
        let blocks = rows.checked_mul(nb)?;
        if blocks.checked_mul(kind.block_bytes())? != bytes.len() {
            return None;
        }
        let mut qs = Vec::with_capacity(blocks * kind.qs_bytes());
        let mut d = Vec::with_capacity(blocks);
        let mut m = match kind {
            QKind::Q4_1 => Vec::with_capacity(blocks),
            QKind::Q8_0 => Vec::new(),
        };
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        for raw in bytes.chunks_exact(kind.block_bytes()) {
            d.push(f16(&raw[0..2]));
            match kind {
                QKind::Q4_1 => {
                    m.push(f16(&raw[2..4]));
                    qs.extend_from_slice(&raw[4..]);
                }
                QKind::Q8_0 => qs.extend_from_slice(&raw[2..]),
            }
        }
        Some(QMatrix {
            kind,
            rows,
            cols,
            qs,
            d,
            m,
        })
    }

    /// The block format.
    pub fn kind(&self) -> QKind {
        self.kind
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn nb(&self) -> usize {
        self.cols / QK
    }

    /// Bytes of memory the matrix takes.
    pub fn bytes(&self) -> usize {
        self.qs.len() + (self.d.len() + self.m.len()) * size_of::<f32>()
    }

    /// Stacks matrices of the same kind and width row-wise; `None` if they differ or `parts`
    /// is empty.
    pub fn concat_rows(parts: Vec<QMatrix>) -> Option<QMatrix> {
        let first = parts.first()?;
        let (kind, cols) = (first.kind, first.cols);
        if parts.iter().any(|p| p.kind != kind || p.cols != cols) {
            return None;
        }
        let mut out = QMatrix {
            kind,
            rows: 0,
            cols,
            qs: Vec::new(),
            d: Vec::new(),
            m: Vec::new(),
        };
        for p in parts {
            out.rows += p.rows;
            out.qs.extend_from_slice(&p.qs);
            out.d.extend_from_slice(&p.d);
            out.m.extend_from_slice(&p.m);
        }
        Some(out)
    }

    /// Dequantizes row `r` into `out` (`cols` values): `d * q` (+ `m` for Q4_1).
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "row_into output length");
        let nb = self.nb();
        let qb = self.kind.qs_bytes();
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let d = self.d[r * nb + b];
            let q = &self.qs[(r * nb + b) * qb..][..qb];
            match self.kind {
                QKind::Q4_1 => {
                    let m = self.m[r * nb + b];
                    for (e, o) in o.iter_mut().enumerate() {
                        *o = d * q4(q, e) as f32 + m;
                    }
                }
                QKind::Q8_0 => {
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = d * (q as i8) as f32;
                    }
                }
            }
        }
    }

    /// Dequantizes rows `r0..r0 + count` into `out` (`count * cols` values), exactly as
    /// [`QMatrix::row_into`] does, in a form the compiler vectorizes.
    ///
    /// # Panics
    /// If the rows are out of range or `out` has the wrong length.
    #[inline(always)]
    pub fn dequantize_rows(&self, r0: usize, count: usize, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            count * self.cols,
            "dequantize_rows output length"
        );
        let nb = self.nb();
        let qb = self.kind.qs_bytes();
        let blocks = r0 * nb..(r0 + count) * nb;
        let qs = &self.qs[blocks.start * qb..blocks.end * qb];
        let ds = &self.d[blocks];
        for (blk, (o, q)) in out
            .chunks_exact_mut(QK)
            .zip(qs.chunks_exact(qb))
            .enumerate()
        {
            let d = ds[blk];
            match self.kind {
                QKind::Q4_1 => {
                    let m = self.m[r0 * nb + blk];
                    let q: &[u8; QK / 2] = q.try_into().expect("block size");
                    let (lo, hi) = o.split_at_mut(QK / 2);
                    for e in 0..QK / 2 {
                        lo[e] = d * (q[e] & 0x0F) as f32 + m;
                        hi[e] = d * (q[e] >> 4) as f32 + m;
                    }
                }
                QKind::Q8_0 => {
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = d * (q as i8) as f32;
                    }
                }
            }
        }
    }

    /// The raw buffers: quantized values, scales and Q4_1 minimums (one per block, row-major).
    pub(crate) fn raw_parts(&self) -> (&[u8], &[f32], &[f32]) {
        (&self.qs, &self.d, &self.m)
    }

    /// Every value as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_into(r, row);
        }
        out
    }
}

/// Element `e` (0..32) of a Q4_1 block's 16 packed bytes: low nibbles hold elements 0..16,
/// high nibbles 16..32.
#[inline(always)]
fn q4(q: &[u8], e: usize) -> i32 {
    if e < QK / 2 {
        (q[e] & 0x0F) as i32
    } else {
        (q[e - QK / 2] >> 4) as i32
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::values;

    /// Random GGUF blocks: f16 scales in a sane range, arbitrary quantized bytes (including
    /// -128 for Q8_0).
    fn random_blocks(kind: QKind, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let n = rows * cols / QK;
        let v = values(n * kind.block_bytes(), seed);
        let mut out = Vec::new();
        for chunk in v.chunks_exact(kind.block_bytes()) {
            let d = half::f16::from_f32(0.01 + chunk[0].abs() * 0.05);
            out.extend_from_slice(&d.to_le_bytes());
            let q = match kind {
                QKind::Q4_1 => {
                    let m = half::f16::from_f32(chunk[1] * 0.2);
                    out.extend_from_slice(&m.to_le_bytes());
                    &chunk[4..]
                }
                QKind::Q8_0 => &chunk[2..],
            };
            out.extend(
                q.iter()
                    .map(|x| ((x * 128.0) as i32 + 128).clamp(0, 255) as u8),
            );
        }
        out
    }

    pub(crate) fn matrix(kind: QKind, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let bytes = random_blocks(kind, rows, cols, seed);
        QMatrix::from_gguf_blocks(kind, rows, cols, &bytes).expect("well-formed blocks")
    }

    pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn parses_and_dequantizes_blocks() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        raw.extend_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
        raw.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let w = QMatrix::from_gguf_blocks(QKind::Q4_1, 1, 32, &raw).expect("one block");
        let v = w.to_f32();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[15], 0.5 * 15.0 - 1.0);
        assert_eq!(v[16], 0.5 * 15.0 - 1.0);
        assert_eq!(v[31], -1.0);
        assert!(QMatrix::from_gguf_blocks(QKind::Q4_1, 1, 32, &raw[1..]).is_none());
        assert!(QMatrix::from_gguf_blocks(QKind::Q4_1, 1, 16, &raw).is_none());

        let mut raw = half::f16::from_f32(2.0).to_le_bytes().to_vec();
        raw.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let w = QMatrix::from_gguf_blocks(QKind::Q8_0, 1, 32, &raw).expect("one block");
        assert_eq!(w.to_f32()[0], -32.0);
        assert_eq!(w.to_f32()[31], 30.0);
    }

    #[test]
    fn concat_rows_stacks() {
        let a = matrix(QKind::Q4_1, 2, 64, 1);
        let b = matrix(QKind::Q4_1, 3, 64, 2);
        let c = QMatrix::concat_rows(vec![a.clone(), b.clone()]).expect("same kind and width");
        assert_eq!(c.rows(), 5);
        let cf = c.to_f32();
        assert_eq!(&cf[..2 * 64], &a.to_f32()[..]);
        assert_eq!(&cf[2 * 64..], &b.to_f32()[..]);
        let q8 = matrix(QKind::Q8_0, 1, 64, 3);
        assert!(QMatrix::concat_rows(vec![a, q8]).is_none());
    }
}
