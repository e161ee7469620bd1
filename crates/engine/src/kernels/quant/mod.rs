//! Quantized weights kept in memory, and their exact dequantization: the definition the fast
//! kernels of [`super::dequant`] reproduce bit for bit.
//!
//! Two layouts:
//!
//! * Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (blocks of 32): split, the quantized values apart from
//!   their f16 scales (and minimums), so that the tuned kernels read the values of
//!   consecutive blocks as one stream and widen a row's scales to f32 once, into a small
//!   buffer, before its blocks. Memory holds the file's bytes, rearranged: a block's scale
//!   (and minimum) in one buffer each, its other bytes (a 5-bit kind's 32 high bits, then its
//!   nibbles) in another.
//! * The K-quants Q2_K to Q6_K (super-blocks of 256): the GGUF blocks as the file stores
//!   them, f16 scales inside, so memory holds the file's bytes. [`blocks`] dequantizes them
//!   exactly as ggml's reference does.
//!
//! An earlier path multiplied them against activations quantized per row to 8-bit blocks, with
//! integer dot products as llama.cpp does (`ggml_vec_dot_q4_1_q8_1`). Unused since that
//! quantization of the activations was found to change SmolLM2-135M's greedy answers, it was
//! removed.

pub(crate) mod blocks;
mod pages;

pub(crate) use blocks::QK_K;
use pages::WeightBytes;

/// Values per quantization block of the 32-value types (GGML's `QK4_0` ... `QK8_0`).
pub const QK: usize = 32;

/// Which GGML block format a [`QMatrix`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QKind {
    /// 32 4-bit values with a scale: `x = (q - 8) * d`.
    Q4_0,
    /// 32 unsigned 4-bit values with a scale and a minimum: `x = d * q + m`.
    Q4_1,
    /// 32 5-bit values with a scale: `x = (q - 16) * d`.
    Q5_0,
    /// 32 unsigned 5-bit values with a scale and a minimum: `x = q * d + m`.
    Q5_1,
    /// 32 signed 8-bit values with a scale: `x = d * q`.
    Q8_0,
    /// Super-blocks of 256 2-bit values, a 4-bit scale and minimum per 16.
    Q2K,
    /// Super-blocks of 256 3-bit values, a 6-bit scale per 16.
    Q3K,
    /// Super-blocks of 256 4-bit values, a 6-bit scale and minimum per 32.
    Q4K,
    /// Super-blocks of 256 5-bit values, a 6-bit scale and minimum per 32.
    Q5K,
    /// Super-blocks of 256 6-bit values, an 8-bit scale per 16.
    Q6K,
}

impl QKind {
    /// Every kind, in GGML's type order.
    pub const ALL: [QKind; 10] = [
        QKind::Q4_0,
        QKind::Q4_1,
        QKind::Q5_0,
        QKind::Q5_1,
        QKind::Q8_0,
        QKind::Q2K,
        QKind::Q3K,
        QKind::Q4K,
        QKind::Q5K,
        QKind::Q6K,
    ];

    /// GGML's name for the type (`Q4_K`, ...).
    pub fn name(self) -> &'static str {
        match self {
            QKind::Q4_0 => "Q4_0",
            QKind::Q4_1 => "Q4_1",
            QKind::Q5_0 => "Q5_0",
            QKind::Q5_1 => "Q5_1",
            QKind::Q8_0 => "Q8_0",
            QKind::Q2K => "Q2_K",
            QKind::Q3K => "Q3_K",
            QKind::Q4K => "Q4_K",
            QKind::Q5K => "Q5_K",
            QKind::Q6K => "Q6_K",
        }
    }

    /// Values per block: a row's length must be a multiple of it.
    pub fn block_values(self) -> usize {
        match self {
            QKind::Q4_0 | QKind::Q4_1 | QKind::Q5_0 | QKind::Q5_1 | QKind::Q8_0 => QK,
            QKind::Q2K | QKind::Q3K | QKind::Q4K | QKind::Q5K | QKind::Q6K => QK_K,
        }
    }

    /// Bytes of one block in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_0 => 18,
            QKind::Q4_1 => 20,
            QKind::Q5_0 => 22,
            QKind::Q5_1 => 24,
            QKind::Q8_0 => 34,
            QKind::Q2K => 84,
            QKind::Q3K => 110,
            QKind::Q4K => 144,
            QKind::Q5K => 176,
            QKind::Q6K => 210,
        }
    }

    /// Whether memory holds this kind split (f16 scales apart from the quantized values)
    /// rather than as the file's blocks: the kinds of 32 values, whose kernels are tuned to it.
    pub(crate) fn split(self) -> bool {
        self.block_values() == QK
    }

    /// Whether the kind's blocks carry a minimum beside their scale (`x = d * q + m`).
    pub(crate) fn has_minimum(self) -> bool {
        matches!(self, QKind::Q4_1 | QKind::Q5_1)
    }

    /// Bytes of quantized values per block in memory, for the split kinds: the file's block
    /// without its scale and minimum (a 5-bit kind's 32 high bits, then its nibbles, as in the
    /// file).
    pub(crate) fn qs_bytes(self) -> usize {
        match self {
            QKind::Q4_0 | QKind::Q4_1 => QK / 2,
            QKind::Q5_0 | QKind::Q5_1 => 4 + QK / 2,
            QKind::Q8_0 => QK,
            _ => self.block_bytes(),
        }
    }
}

/// A `[rows, cols]` weight matrix of quantized blocks, one row per output feature.
///
/// The 32-value kinds are held split: quantized values apart from their f16 scales (and
/// minimums); the K-quants keep the file's blocks.
#[derive(Clone, Debug)]
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    /// Split kinds: quantized values, row-major, block-major within a row; else empty.
    qs: WeightBytes,
    /// Split kinds: one f16 scale per block (its bits), `rows * nb`; else empty.
    d: Vec<u16>,
    /// Split kinds with a minimum: one f16 minimum per block (its bits), `rows * nb`; else
    /// empty.
    m: Vec<u16>,
    /// Other kinds: the GGUF blocks as stored, row-major; empty for the split kinds.
    blocks: WeightBytes,
}

impl QMatrix {
    /// Parses `rows * cols / kind.block_values()` GGML blocks. `None` if `cols` is not a
    /// multiple of the block or `bytes` has the wrong length.
    pub fn from_gguf_blocks(kind: QKind, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        if !cols.is_multiple_of(kind.block_values()) {
            return None;
        }
        let nb = cols / kind.block_values();
        let blocks = rows.checked_mul(nb)?;
        if blocks.checked_mul(kind.block_bytes())? != bytes.len() {
            return None;
        }
        let mut out = QMatrix {
            kind,
            rows,
            cols,
            qs: WeightBytes::default(),
            d: Vec::new(),
            m: Vec::new(),
            blocks: WeightBytes::default(),
        };
        if !kind.split() {
            out.blocks = WeightBytes::copy_of(bytes);
            return Some(out);
        }
        let qb = kind.qs_bytes();
        out.qs = WeightBytes::zeroed(blocks * qb);
        out.d.reserve_exact(blocks);
        if kind.has_minimum() {
            out.m.reserve_exact(blocks);
        }
        let f16 = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
        for (raw, qs) in bytes
            .chunks_exact(kind.block_bytes())
            .zip(out.qs.chunks_exact_mut(qb))
        {
            out.d.push(f16(&raw[0..2]));
            if kind.has_minimum() {
                out.m.push(f16(&raw[2..4]));
            }
            qs.copy_from_slice(&raw[raw.len() - qb..]);
        }
        Some(out)
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

    /// Blocks per row.
    fn nb(&self) -> usize {
        self.cols / self.kind.block_values()
    }

    /// Bytes of one row of GGUF blocks (as the file stores them).
    pub(crate) fn row_bytes(&self) -> usize {
        self.nb() * self.kind.block_bytes()
    }

    /// Bytes of memory the matrix takes.
    pub fn bytes(&self) -> usize {
        self.qs.len() + self.blocks.len() + (self.d.len() + self.m.len()) * size_of::<u16>()
    }

    /// Stacks matrices of the same kind and width row-wise; `None` if they differ or `parts`
    /// is empty.
    pub fn concat_rows(parts: Vec<QMatrix>) -> Option<QMatrix> {
        let first = parts.first()?;
        let (kind, cols) = (first.kind, first.cols);
        if parts.iter().any(|p| p.kind != kind || p.cols != cols) {
            return None;
        }
        let total = |f: fn(&QMatrix) -> usize| parts.iter().map(f).sum::<usize>();
        let mut out = QMatrix {
            kind,
            rows: total(|p| p.rows),
            cols,
            qs: WeightBytes::zeroed(total(|p| p.qs.len())),
            d: Vec::with_capacity(total(|p| p.d.len())),
            m: Vec::with_capacity(total(|p| p.m.len())),
            blocks: WeightBytes::zeroed(total(|p| p.blocks.len())),
        };
        let (mut qs, mut blocks) = (0, 0);
        for p in parts {
            out.qs[qs..][..p.qs.len()].copy_from_slice(&p.qs);
            out.blocks[blocks..][..p.blocks.len()].copy_from_slice(&p.blocks);
            (qs, blocks) = (qs + p.qs.len(), blocks + p.blocks.len());
            out.d.extend_from_slice(&p.d);
            out.m.extend_from_slice(&p.m);
        }
        Some(out)
    }

    /// Dequantizes row `r` into `out` (`cols` values), as ggml's reference does.
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "row_into output length");
        if !self.kind.split() {
            let rb = self.row_bytes();
            blocks::dequantize(self.kind, &self.blocks[r * rb..(r + 1) * rb], out);
            return;
        }
        let nb = self.nb();
        let qb = self.kind.qs_bytes();
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let blk = r * nb + b;
            let m = self.m.get(blk).copied().map(f16_bits);
            let o: &mut [f32; QK] = o.try_into().expect("block size");
            split_block(
                self.kind,
                f16_bits(self.d[blk]),
                m,
                &self.qs[blk * qb..][..qb],
                o,
            );
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
        if !self.kind.split() {
            let rb = self.row_bytes();
            blocks::dequantize(self.kind, &self.blocks[r0 * rb..(r0 + count) * rb], out);
            return;
        }
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
            let d = f16_bits(ds[blk]);
            match self.kind {
                QKind::Q4_1 => {
                    let m = f16_bits(self.m[r0 * nb + blk]);
                    let q: &[u8; QK / 2] = q.try_into().expect("block size");
                    let (lo, hi) = o.split_at_mut(QK / 2);
                    for e in 0..QK / 2 {
                        lo[e] = d * (q[e] & 0x0F) as f32 + m;
                        hi[e] = d * (q[e] >> 4) as f32 + m;
                    }
                }
                kind => {
                    let m = self.m.get(r0 * nb + blk).copied().map(f16_bits);
                    let o: &mut [f32; QK] = o.try_into().expect("block size");
                    split_block(kind, d, m, q, o);
                }
            }
        }
    }

    /// The split kinds' buffers: quantized values, f16 scales and minimums (one per
    /// block, row-major, as bits).
    pub(crate) fn raw_parts(&self) -> (&[u8], &[u16], &[u16]) {
        (&self.qs, &self.d, &self.m)
    }

    /// The quantized bytes of `rows` as held in memory: the other kinds' GGUF blocks, the
    /// split kinds' quantized values without their scales.
    ///
    /// # Panics
    /// If the rows are out of range.
    pub(crate) fn row_blocks(&self, rows: std::ops::Range<usize>) -> &[u8] {
        let per_row = self.nb() * self.kind.qs_bytes();
        let all = if self.kind.split() {
            &self.qs
        } else {
            &self.blocks
        };
        &all[rows.start * per_row..rows.end * per_row]
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

/// The f16 whose bits are `b`, as f32 (exactly).
#[inline(always)]
fn f16_bits(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// A split block's 32 values from its scale `d`, minimum `m` (the kinds that have one) and
/// quantized bytes `q` (see [`QKind::qs_bytes`]), as `blocks` computes them from the file's
/// block: the same operations in the same order.
#[inline(always)]
fn split_block(kind: QKind, d: f32, m: Option<f32>, q: &[u8], out: &mut [f32; QK]) {
    let m = m.unwrap_or(0.0);
    for (e, o) in out.iter_mut().enumerate() {
        *o = match kind {
            QKind::Q4_0 => (nibble(q, e) - 8) as f32 * d,
            QKind::Q4_1 => d * nibble(q, e) as f32 + m,
            QKind::Q5_0 => (q5(q, e) - 16) as f32 * d,
            QKind::Q5_1 => q5(q, e) as f32 * d + m,
            QKind::Q8_0 => d * (q[e] as i8) as f32,
            _ => unreachable!("{kind:?} is not held split"),
        };
    }
}

/// Element `e` (0..32) of a 4-bit block's 16 packed bytes: low nibbles hold elements 0..16,
/// high nibbles 16..32.
#[inline(always)]
fn nibble(q: &[u8], e: usize) -> i32 {
    if e < QK / 2 {
        (q[e] & 0x0F) as i32
    } else {
        (q[e - QK / 2] >> 4) as i32
    }
}

/// Element `e` (0..32) of a 5-bit block's 20 bytes without its scale: 32 high bits (bit `e`
/// is element `e`'s fifth bit), then the nibbles as [`nibble`] reads them.
#[inline(always)]
fn q5(q: &[u8], e: usize) -> i32 {
    let qh = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
    nibble(&q[4..], e) | (((qh >> e) & 1) << 4) as i32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::values;

    /// How [`random_blocks`] picks the f16 scales and minimums.
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Scales {
        /// Positive scales around 0.03, minimums within ±0.2: weights of a plausible size,
        /// for products that do not overflow.
        Moderate,
        /// Every third block's from [`EXTREME`], the others' of any sign up to ±4.
        Extreme,
    }

    /// f16 scales at the edges: zeros of both signs, the largest finite values, the smallest
    /// subnormal and normal ones. (Not infinities and NaNs: a NaN's payload is not part of the
    /// definition, and Rust does not promise it.)
    const EXTREME: [f32; 8] = [
        0.0,
        -0.0,
        65504.0,
        -65504.0,
        5.960_464_5e-8,
        -6.103_515_6e-5,
        1.0,
        -1.0,
    ];

    /// Where a block's f16 scale (and minimum) sit.
    fn f16_offsets(kind: QKind) -> &'static [usize] {
        match kind {
            QKind::Q4_0 | QKind::Q5_0 | QKind::Q8_0 => &[0],
            QKind::Q4_1 | QKind::Q5_1 | QKind::Q4K | QKind::Q5K => &[0, 2],
            QKind::Q2K => &[80, 82],
            QKind::Q3K => &[108],
            QKind::Q6K => &[208],
        }
    }

    /// Deterministic pseudo-random bytes (xorshift).
    pub(crate) fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        crate::testing::xorshift(seed, 0x2545_F491_4F6C_DD1D)
            .take(n)
            .map(|s| (s >> 32) as u8)
            .collect()
    }

    /// Random GGUF blocks of `kind` for a `[rows, cols]` matrix: every quantized bit pattern
    /// (arbitrary bytes, and some blocks all zeros or all ones), scales as `scales` says.
    pub(crate) fn random_blocks(
        kind: QKind,
        rows: usize,
        cols: usize,
        seed: u64,
        scales: Scales,
    ) -> Vec<u8> {
        let n = rows * cols / kind.block_values();
        let mut bytes = random_bytes(n * kind.block_bytes(), seed);
        let v = values(2 * n, seed ^ 0x5CA1E);
        for (i, block) in bytes.chunks_exact_mut(kind.block_bytes()).enumerate() {
            match i % 16 {
                3 => block.fill(0x00),
                7 => block.fill(0xFF),
                _ => {}
            }
            for (j, &at) in f16_offsets(kind).iter().enumerate() {
                let x = match scales {
                    Scales::Moderate if j == 0 => 0.01 + v[2 * i].abs() * 0.05,
                    Scales::Moderate => v[2 * i + 1] * 0.2,
                    Scales::Extreme if i % 3 == 0 => EXTREME[(i / 3 + 3 * j) % EXTREME.len()],
                    Scales::Extreme => v[2 * i + j] * 4.0,
                };
                block[at..at + 2].copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
            }
        }
        bytes
    }

    /// A random matrix of `kind` with [`Scales::Moderate`] scales.
    pub(crate) fn matrix(kind: QKind, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let bytes = random_blocks(kind, rows, cols, seed, Scales::Moderate);
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

    #[test]
    fn every_kind_checks_its_shape_and_keeps_its_bytes() {
        for kind in QKind::ALL {
            let (rows, cols) = (3, 2 * kind.block_values());
            let raw = random_blocks(kind, rows, cols, 11, Scales::Moderate);
            assert_eq!(raw.len(), rows * 2 * kind.block_bytes());
            let q = QMatrix::from_gguf_blocks(kind, rows, cols, &raw).expect("whole blocks");
            // The file's bytes, every kind (the split ones rearranged).
            assert_eq!(q.bytes(), raw.len(), "{kind:?}");
            let short = &raw[..raw.len() - 1];
            assert!(QMatrix::from_gguf_blocks(kind, rows, cols, short).is_none());
            let half_block = cols - kind.block_values() / 2;
            let cut = &raw[..rows * (2 * kind.block_bytes() - kind.block_bytes() / 2)];
            assert!(QMatrix::from_gguf_blocks(kind, rows, half_block, cut).is_none());
        }
    }

    #[test]
    fn the_split_kinds_dequantize_as_their_gguf_blocks() {
        // The 32-value kinds are held split; their values are ggml's all the same.
        for kind in QKind::ALL.into_iter().filter(|k| k.split()) {
            let (rows, cols) = (5, 96);
            let raw = random_blocks(kind, rows, cols, 12, Scales::Extreme);
            let q = QMatrix::from_gguf_blocks(kind, rows, cols, &raw).expect("blocks");
            let mut want = vec![0.0f32; rows * cols];
            blocks::dequantize(kind, &raw, &mut want);
            assert_eq!(bits(&q.to_f32()), bits(&want), "{kind:?}");
            let mut got = vec![f32::NAN; 3 * cols];
            q.dequantize_rows(1, 3, &mut got);
            assert_eq!(bits(&got), bits(&want[cols..4 * cols]), "{kind:?}");
        }
    }

    #[test]
    fn blocks_decode_their_layout() {
        let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
        // Q4_0: nibble j is element j, its high nibble element j + 16; x = (q - 8) * d.
        let mut raw = f16(0.5).to_vec();
        raw.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = QMatrix::from_gguf_blocks(QKind::Q4_0, 1, 32, &raw)
            .expect("one block")
            .to_f32();
        assert_eq!((v[0], v[15], v[16], v[31]), (-4.0, 3.5, 3.5, -4.0));
        // Q5_0: bit e of qh is element e's fifth bit.
        let mut raw = f16(1.0).to_vec();
        raw.extend((1u32 << 1 | 1 << 17).to_le_bytes());
        raw.extend([0u8; 16]);
        let v = QMatrix::from_gguf_blocks(QKind::Q5_0, 1, 32, &raw)
            .expect("one block")
            .to_f32();
        assert_eq!((v[0], v[1], v[16], v[17]), (-16.0, 0.0, -16.0, 0.0));
        // Q4_K: sub-block 0 has scale 2 and minimum 1, sub-block 1 (the high nibbles of the
        // first 32 bytes) scale 1 and minimum 0; d = 0.5, dmin = 0.25.
        let mut raw = f16(0.5).to_vec();
        raw.extend(f16(0.25));
        raw.extend([2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        raw.extend((0..128).map(|i| if i == 0 { 0x3F } else { 0 }));
        let v = QMatrix::from_gguf_blocks(QKind::Q4K, 1, 256, &raw)
            .expect("one block")
            .to_f32();
        assert_eq!((v[0], v[1], v[32], v[33]), (15.0 - 0.25, -0.25, 1.5, 0.0));
        // Q6_K: x = d * sc * (q - 32); element 0's low nibble and high bits are 0x5 and 0b10.
        let mut raw = vec![0u8; 210];
        raw[0] = 0x5;
        raw[128] = 0b10;
        raw[192] = (-3i8) as u8;
        raw[208..].copy_from_slice(&f16(0.5));
        let v = QMatrix::from_gguf_blocks(QKind::Q6K, 1, 256, &raw)
            .expect("one block")
            .to_f32();
        assert_eq!(
            (v[0], v[1]),
            (0.5 * -3.0 * (37.0 - 32.0), 0.5 * -3.0 * -32.0)
        );
    }
}
