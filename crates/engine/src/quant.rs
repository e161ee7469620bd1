//! Quantized weights kept in memory as the GGUF file stores them (Q4_1 and Q8_0 blocks of 32),
//! and their matmul against activations quantized per row to 8-bit blocks, with integer dot
//! products as llama.cpp does on CPU (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0`).
//!
//! The numeric definition, shared by every code path, for output `(i, j)` (activation row `i`,
//! weight row `j`, `nb` blocks of [`QK`] values):
//!
//! * each block's 32 products are summed as integers into 8 lanes, lane `l` holding elements
//!   `4l..4l + 4` (exact, so the order of the integer adds is irrelevant);
//! * lane `l` of an 8-lane f32 accumulator does `acc[l] = fma(lane_l as f32, dw[b] * dx[b],
//!   acc[l])`, block after block;
//! * Q4_1 only: the blocks' minimum terms `mw[b] * sx[b]` are folded into the same lanes,
//!   block `b` into lane `b % 8`, again with one fma each, in block order, after all blocks;
//! * the 8 lanes are summed with the fixed tree `((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 +
//!   a7))`.
//!
//! Nothing in it depends on how many rows are computed together, on the thread split or on
//! the CPU: the AVX2+FMA kernel and the portable one give the same bits (a test checks it),
//! and `fma` is exactly rounded wherever it runs. Activation rows are quantized one at a time,
//! so a token's quantized row never depends on its batch either.
//!
//! The one `unsafe` part is the AVX2 module: intrinsics, raw pointer reads whose bounds are
//! checked once per call, and the call into it after the CPU features are detected.

use rayon::prelude::*;

/// Values per quantization block (GGML's `QK4_1` and `QK8_0`).
pub const QK: usize = 32;
/// Lanes of the f32 accumulator of one dot product (one AVX2 register).
const LANES: usize = 8;
/// Activation rows per micro-kernel call.
const MR: usize = 4;
/// Weight rows per micro-kernel call.
const NR: usize = 2;
/// Weight rows per micro-kernel call when there is a single activation row (decode).
const NR_DECODE: usize = 4;

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
/// kernels do no conversion; minimums are padded per row to a multiple of 8 blocks with zeros.
#[derive(Clone, Debug)]
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    /// Quantized values, row-major, block-major within a row.
    qs: Vec<u8>,
    /// One scale per block, `rows * nb`.
    d: Vec<f32>,
    /// Q4_1: one minimum per block, `rows * nb_padded`; empty for Q8_0.
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
        let nbp = nb.next_multiple_of(LANES);
        let mut qs = Vec::with_capacity(blocks * kind.qs_bytes());
        let mut d = Vec::with_capacity(blocks);
        let mut m = match kind {
            QKind::Q4_1 => vec![0.0f32; rows * nbp],
            QKind::Q8_0 => Vec::new(),
        };
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (blk, raw) in bytes.chunks_exact(kind.block_bytes()).enumerate() {
            d.push(f16(&raw[0..2]));
            match kind {
                QKind::Q4_1 => {
                    m[(blk / nb) * nbp + blk % nb] = f16(&raw[2..4]);
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
        let nbp = nb.next_multiple_of(LANES);
        let qb = self.kind.qs_bytes();
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let d = self.d[r * nb + b];
            let q = &self.qs[(r * nb + b) * qb..][..qb];
            match self.kind {
                QKind::Q4_1 => {
                    let m = self.m[r * nbp + b];
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
        let nbp = nb.next_multiple_of(LANES);
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
                    let m = self.m[(r0 + blk / nb) * nbp + blk % nb];
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

    /// The raw buffers: quantized values, scales, Q4_1 minimums, and the minimums' row stride
    /// (blocks per row padded to a multiple of 8).
    pub(crate) fn raw_parts(&self) -> (&[u8], &[f32], &[f32], usize) {
        (
            &self.qs,
            &self.d,
            &self.m,
            self.nb().next_multiple_of(LANES),
        )
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

/// Rows of activations quantized to 8-bit blocks (GGML's Q8_1: scale and scaled sum).
#[derive(Clone, Debug)]
pub struct QActs {
    rows: usize,
    cols: usize,
    /// `rows * cols` values in `-127..=127`.
    qs: Vec<i8>,
    /// One scale per block, `rows * nb`.
    d: Vec<f32>,
    /// `d * sum(q)` per block, `rows * nb_padded` (zero padding).
    s: Vec<f32>,
}

impl QActs {
    /// Quantizes each row of `x` (`rows` rows of `cols`, a multiple of [`QK`]) on its own.
    ///
    /// # Panics
    /// If `cols` is not a multiple of [`QK`] or `x.len() != rows * cols`.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> QActs {
        assert_eq!(cols % QK, 0, "activation width is not whole blocks");
        assert_eq!(x.len(), rows * cols, "activation rows");
        let nb = cols / QK;
        let nbp = nb.next_multiple_of(LANES);
        let mut qs = vec![0i8; rows * cols];
        let mut d = vec![0.0f32; rows * nb];
        let mut s = vec![0.0f32; rows * nbp];
        for (blk, (xb, qb)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
            let amax = xb.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                // Round to nearest-even by adding and removing 1.5 * 2^23 (exact for |v * inv|
                // <= 127; `f32::round` is a libm call without SSE4.1). `as` saturates and maps
                // NaN to 0; the clamp keeps -128 out.
                const MAGIC: f32 = 12_582_912.0;
                let r = (((v * inv) + MAGIC) - MAGIC) as i32;
                let r = r.clamp(-127, 127);
                *q = r as i8;
                sum += r;
            }
            d[blk] = scale;
            s[(blk / nb) * nbp + blk % nb] = scale * sum as f32;
        }
        QActs {
            rows,
            cols,
            qs,
            d,
            s,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Portable reference kernel
// ---------------------------------------------------------------------------------------------

/// The 8-lane tree every kernel ends with.
#[inline(always)]
fn reduce8(a: &[f32; LANES]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// One output, as the numeric definition in the module docs says.
fn dot_portable(w: &QMatrix, j: usize, x: &QActs, i: usize) -> f32 {
    let nb = w.nb();
    let nbp = nb.next_multiple_of(LANES);
    let qb = w.kind.qs_bytes();
    let mut acc = [0.0f32; LANES];
    for b in 0..nb {
        let wq = &w.qs[(j * nb + b) * qb..][..qb];
        let xq = &x.qs[i * x.cols + b * QK..][..QK];
        let sc = w.d[j * nb + b] * x.d[i * nb + b];
        for (l, a) in acc.iter_mut().enumerate() {
            let mut p = 0i32;
            for e in 4 * l..4 * l + 4 {
                let wv = match w.kind {
                    QKind::Q4_1 => q4(wq, e),
                    QKind::Q8_0 => (wq[e] as i8) as i32,
                };
                p += wv * xq[e] as i32;
            }
            *a = (p as f32).mul_add(sc, *a);
        }
    }
    if w.kind == QKind::Q4_1 {
        let mw = &w.m[j * nbp..(j + 1) * nbp];
        let sx = &x.s[i * nbp..(i + 1) * nbp];
        for (mc, sc) in mw.chunks_exact(LANES).zip(sx.chunks_exact(LANES)) {
            for l in 0..LANES {
                acc[l] = mc[l].mul_add(sc[l], acc[l]);
            }
        }
    }
    reduce8(&acc)
}

/// Outputs for activation rows `rows` and weight rows `cols`, written `out[(i - rows.start) *
/// stride + (j - cols.start)]`.
fn tile_portable(
    w: &QMatrix,
    x: &QActs,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    for i in rows.clone() {
        for j in cols.clone() {
            out[(i - rows.start) * stride + (j - cols.start)] = dot_portable(w, j, x, i);
        }
    }
}

fn tile(
    w: &QMatrix,
    x: &QActs,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        avx2::tile(w, x, rows, cols, out, stride);
        return;
    }
    tile_portable(w, x, rows, cols, out, stride);
}

/// `y = x · Wᵀ` for `m` f32 rows of `x` against a quantized `W`: returns `[m, w.rows()]`.
///
/// Each row of `x` is quantized on its own; each output follows the module's numeric
/// definition, whatever `m` and the number of threads.
///
/// # Panics
/// If `x.len() != m * w.cols()`.
pub fn matmul(x: &[f32], m: usize, w: &QMatrix) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        m * k,
        "matmul input is not m rows of the weight's width"
    );
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let xq = QActs::quantize(x, m, k);
    let threads = rayon::current_num_threads();
    let mut y = vec![0.0f32; m * n];
    if m >= 8 * threads * MR {
        // Prefill: each task owns a block of rows of y and sweeps all of W.
        let rows_per_task = m.div_ceil(threads * 4).next_multiple_of(MR);
        y.par_chunks_mut(rows_per_task * n)
            .enumerate()
            .for_each(|(t, out)| {
                let i0 = t * rows_per_task;
                let rows = i0..i0 + out.len() / n;
                tile(w, &xq, rows, 0..n, out, n);
            });
    } else {
        // Decode and short turns: split W's rows; each task fills a tile, then it is copied.
        let tasks = threads * 4;
        let cols_per_task = n.div_ceil(tasks).next_multiple_of(NR_DECODE);
        let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(cols_per_task))
            .into_par_iter()
            .map(|t| {
                let j0 = t * cols_per_task;
                let j1 = (j0 + cols_per_task).min(n);
                let mut out = vec![0.0f32; m * (j1 - j0)];
                tile(w, &xq, 0..m, j0..j1, &mut out, j1 - j0);
                (j0, out)
            })
            .collect();
        for (j0, t) in tiles {
            let width = t.len() / m;
            for (dst, src) in y.chunks_exact_mut(n).zip(t.chunks_exact(width)) {
                dst[j0..j0 + width].copy_from_slice(src);
            }
        }
    }
    y
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA kernel
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::{LANES, MR, NR, NR_DECODE, QActs, QK, QKind, QMatrix};
    use std::arch::x86_64::*;
    use std::ops::Range;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Safe entry point; see [`super::tile_portable`] for the contract.
    ///
    /// # Panics
    /// If the ranges or `out` do not fit the matrices (checked here, once, so the kernels can
    /// read through raw pointers).
    pub(super) fn tile(
        w: &QMatrix,
        x: &QActs,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        assert!(available(), "avx2::tile called without AVX2 and FMA");
        assert_eq!(w.cols, x.cols, "matrix widths differ");
        assert!(
            rows.end <= x.rows && cols.end <= w.rows,
            "tile out of range"
        );
        assert!(cols.len() <= stride, "tile wider than its stride");
        if rows.is_empty() || cols.is_empty() {
            return;
        }
        assert!(
            out.len() >= (rows.len() - 1) * stride + cols.len(),
            "tile output too short"
        );
        // SAFETY: the CPU has AVX2 and FMA (asserted above); every index the kernels form is
        // within the bounds asserted above: rows < x.rows, cols < w.rows, and blocks < nb,
        // for buffers whose lengths QMatrix / QActs construction fixes.
        unsafe { tile_avx2(w, x, rows, cols, out, stride) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2(
        w: &QMatrix,
        x: &QActs,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        let p = Ptrs::new(w, x);
        let put = |out: &mut [f32], i: usize, j: usize, v: f32| {
            out[(i - rows.start) * stride + (j - cols.start)] = v;
        };
        macro_rules! sweep {
            ($r:literal, $c:literal, $i:ident, $j:ident) => {{
                // SAFETY: see `tile`: $i + $r <= rows.end and $j + $c <= cols.end.
                let r = unsafe { kernel::<$r, $c>(&p, $i, $j) };
                for (di, row) in r.iter().enumerate() {
                    for (dj, v) in row.iter().enumerate() {
                        put(out, $i + di, $j + dj, *v);
                    }
                }
            }};
        }
        if rows.len() == 1 {
            let i = rows.start;
            let mut j = cols.start;
            while j + NR_DECODE <= cols.end {
                sweep!(1, 4, i, j);
                j += NR_DECODE;
            }
            while j < cols.end {
                sweep!(1, 1, i, j);
                j += 1;
            }
            return;
        }
        let mut j = cols.start;
        while j + NR <= cols.end {
            let mut i = rows.start;
            while i + MR <= rows.end {
                sweep!(4, 2, i, j);
                i += MR;
            }
            while i < rows.end {
                sweep!(1, 2, i, j);
                i += 1;
            }
            j += NR;
        }
        while j < cols.end {
            for i in rows.clone() {
                sweep!(1, 1, i, j);
            }
            j += 1;
        }
    }

    /// Raw views of the two operands.
    struct Ptrs {
        kind: QKind,
        nb: usize,
        nbp: usize,
        k: usize,
        wq: *const u8,
        wd: *const f32,
        wm: *const f32,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
    }

    impl Ptrs {
        fn new(w: &QMatrix, x: &QActs) -> Ptrs {
            let nb = w.cols / QK;
            Ptrs {
                kind: w.kind,
                nb,
                nbp: nb.next_multiple_of(LANES),
                k: w.cols,
                wq: w.qs.as_ptr(),
                wd: w.d.as_ptr(),
                wm: w.m.as_ptr(),
                xq: x.qs.as_ptr(),
                xd: x.d.as_ptr(),
                xs: x.s.as_ptr(),
            }
        }
    }

    /// 32 Q4_1 values of a block as bytes 0..15 in element order.
    ///
    /// # Safety
    /// AVX2 is available and `q` points to 16 readable bytes.
    #[inline(always)]
    unsafe fn unpack_q4(q: *const u8) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe {
            let v = _mm_loadu_si128(q.cast());
            let hi = _mm_srli_epi16(v, 4);
            _mm256_and_si256(_mm256_set_m128i(hi, v), _mm256_set1_epi8(0x0F))
        }
    }

    /// `R x C` outputs starting at activation row `i0` and weight row `j0`.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `i0 + R <= x.rows` and `j0 + C <= w.rows`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // literal indices keep the accumulators in registers
    unsafe fn kernel<const R: usize, const C: usize>(
        p: &Ptrs,
        i0: usize,
        j0: usize,
    ) -> [[f32; C]; R] {
        let q4 = p.kind == QKind::Q4_1;
        let qb = if q4 { QK / 2 } else { QK };
        // SAFETY (whole body): the CPU features are the caller's contract; every offset below
        // addresses row i0 + i < x.rows or j0 + j < w.rows, block b < nb (or padded block <
        // nbp), within the buffers' lengths.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let ones = _mm256_set1_epi16(1);
            for b in 0..p.nb {
                let mut wv = [_mm256_setzero_si256(); C];
                let mut wd = [0.0f32; C];
                for j in 0..C {
                    let blk = (j0 + j) * p.nb + b;
                    wv[j] = if q4 {
                        unpack_q4(p.wq.add(blk * qb))
                    } else {
                        _mm256_loadu_si256(p.wq.add(blk * qb).cast())
                    };
                    wd[j] = *p.wd.add(blk);
                }
                for i in 0..R {
                    let xv = _mm256_loadu_si256(p.xq.add((i0 + i) * p.k + b * QK).cast());
                    let dx = *p.xd.add((i0 + i) * p.nb + b);
                    for j in 0..C {
                        let prod = if q4 {
                            _mm256_maddubs_epi16(wv[j], xv)
                        } else {
                            // |w| * (x with w's sign) = w * x; |w| <= 128 and |x| <= 127 keep
                            // the pair sums inside i16.
                            _mm256_maddubs_epi16(
                                _mm256_abs_epi8(wv[j]),
                                _mm256_sign_epi8(xv, wv[j]),
                            )
                        };
                        let lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
                        let sc = _mm256_set1_ps(wd[j] * dx);
                        acc[i][j] = _mm256_fmadd_ps(lanes, sc, acc[i][j]);
                    }
                }
            }
            if q4 {
                for c in (0..p.nbp).step_by(LANES) {
                    for j in 0..C {
                        let mw = _mm256_loadu_ps(p.wm.add((j0 + j) * p.nbp + c));
                        for i in 0..R {
                            let sx = _mm256_loadu_ps(p.xs.add((i0 + i) * p.nbp + c));
                            acc[i][j] = _mm256_fmadd_ps(mw, sx, acc[i][j]);
                        }
                    }
                }
            }
            let mut out = [[0.0f32; C]; R];
            for i in 0..R {
                for j in 0..C {
                    out[i][j] = reduce(acc[i][j]);
                }
            }
            out
        }
    }

    /// `((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))`, as [`super::reduce8`].
    ///
    /// # Safety
    /// AVX is available.
    #[inline(always)]
    unsafe fn reduce(v: __m256) -> f32 {
        // SAFETY: the caller's contract.
        unsafe {
            let h1 = _mm256_hadd_ps(v, v); // [a0+a1, a2+a3, .., .. | a4+a5, a6+a7, .., ..]
            let h2 = _mm256_hadd_ps(h1, h1); // [(a0+a1)+(a2+a3), .. | (a4+a5)+(a6+a7), ..]
            let lo = _mm256_castps256_ps128(h2);
            let hi = _mm256_extractf128_ps(h2, 1);
            _mm_cvtss_f32(_mm_add_ss(lo, hi))
        }
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
    fn simd_and_portable_paths_agree_bitwise() {
        for kind in [QKind::Q4_1, QKind::Q8_0] {
            for (m, n, k) in [(1, 13, 96), (7, 11, 64), (9, 6, 288)] {
                let w = matrix(kind, n, k, 11);
                let mut x = values(m * k, 12);
                x[3] = 0.0;
                x[QK..2 * QK].fill(0.0); // an all-zero block
                let xq = QActs::quantize(&x, m, k);
                let mut want = vec![0.0; m * n];
                tile_portable(&w, &xq, 0..m, 0..n, &mut want, n);
                let mut got = vec![0.0; m * n];
                tile(&w, &xq, 0..m, 0..n, &mut got, n);
                assert_eq!(bits(&want), bits(&got), "{kind:?} m={m} n={n} k={k}");
            }
        }
    }

    #[test]
    fn matmul_is_close_to_f32_and_batch_invariant() {
        for kind in [QKind::Q4_1, QKind::Q8_0] {
            let (m, n, k) = (70, 29, 160);
            let w = matrix(kind, n, k, 21);
            let wf = w.to_f32();
            let x = values(m * k, 22);
            let y = matmul(&x, m, &w);
            for i in 0..m {
                let xr = &x[i * k..(i + 1) * k];
                for j in 0..n {
                    let want: f64 = xr
                        .iter()
                        .zip(&wf[j * k..(j + 1) * k])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    let scale: f64 = wf[j * k..(j + 1) * k].iter().map(|v| v.abs() as f64).sum();
                    let err = (y[i * n + j] as f64 - want).abs();
                    assert!(
                        err <= 0.01 * scale,
                        "{kind:?} ({i},{j}): {} vs {want}",
                        y[i * n + j]
                    );
                }
                let alone = matmul(xr, 1, &w);
                assert_eq!(
                    bits(&y[i * n..(i + 1) * n]),
                    bits(&alone),
                    "{kind:?} row {i}"
                );
            }
            // Any split of the batch, any thread count.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .expect("pool");
            let y3 = pool.install(|| matmul(&x, m, &w));
            assert_eq!(bits(&y), bits(&y3));
            let head = matmul(&x[..5 * k], 5, &w);
            assert_eq!(bits(&y[..5 * n]), bits(&head));
        }
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
