//! `y = x · Wᵀ`: weight panels split over threads by rows of `W`, each output element one
//! [`dot`](super::dot) bit for bit whatever the batch; quantized weights dequantized a few rows
//! at a time.

use kv_extract::AlignedBuf;

use super::dequant;
use super::dot::{LANES, MB, MR, NR, dot_1x1, dot_1x3, dot_1x4, dot_2x3};
use super::isa::{Isa, Recompile};
use super::quant::QMatrix;
use super::weight::{Weight, WeightData};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{grown, grown_aligned, resized, team, vectorized};

/// One weight panel against all rows of `x`: `out[i * ld + j] = dot(x[i], w[j])` for the
/// `rows` rows of `w` (`ld >= rows`: the panel may be a column block of a wider output).
#[inline(always)]
pub(super) fn panel_portable(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    out: &mut [f32],
    ld: usize,
) {
    let xrow = |i: usize| &x[i * k..(i + 1) * k];
    let wrow = |j: usize| &w[j * k..(j + 1) * k];
    if m == 1 {
        // Decode: one row of x against four weight rows at a time.
        let mut j = 0;
        while j + 4 <= rows {
            let r = dot_1x4(
                [xrow(0)],
                [wrow(j), wrow(j + 1), wrow(j + 2), wrow(j + 3)],
                k,
            );
            out[j..j + 4].copy_from_slice(&r[0]);
            j += 4;
        }
        for (j, o) in out[..rows].iter_mut().enumerate().skip(j) {
            *o = dot_1x1([xrow(0)], [wrow(j)], k)[0][0];
        }
        return;
    }
    for i0 in (0..m).step_by(MB) {
        let i1 = (i0 + MB).min(m);
        let mut j = 0;
        while j + NR <= rows {
            let ws = [wrow(j), wrow(j + 1), wrow(j + 2)];
            let mut i = i0;
            while i + MR <= i1 {
                let r = dot_2x3([xrow(i), xrow(i + 1)], ws, k);
                for (di, ri) in r.iter().enumerate() {
                    out[(i + di) * ld + j..][..NR].copy_from_slice(ri);
                }
                i += MR;
            }
            while i < i1 {
                let r = dot_1x3([xrow(i)], ws, k);
                out[i * ld + j..][..NR].copy_from_slice(&r[0]);
                i += 1;
            }
            j += NR;
        }
        while j < rows {
            for i in i0..i1 {
                out[i * ld + j] = dot_1x1([xrow(i)], [wrow(j)], k)[0][0];
            }
            j += 1;
        }
    }
}

/// [`panel_portable`] at `isa`: the hand-written x86 panel when the rows are whole 16-lane
/// chunks, else the portable source compiled for `isa`.
#[allow(clippy::too_many_arguments)]
pub(super) fn panel(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    out: &mut [f32],
    ld: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_simd() && k.is_multiple_of(LANES) {
        x86::panel(isa, x, m, k, w, rows, out, ld);
        return;
    }
    struct Panel<'a> {
        x: &'a [f32],
        m: usize,
        k: usize,
        w: &'a [f32],
        rows: usize,
        out: &'a mut [f32],
        ld: usize,
    }
    impl Recompile for Panel<'_> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            panel_portable(self.x, self.m, self.k, self.w, self.rows, self.out, self.ld);
        }
    }
    let kernel = Panel {
        x,
        m,
        k,
        w,
        rows,
        out,
        ld,
    };
    vectorized(isa, kernel);
}

/// `y = x · Wᵀ` for `m` rows of `x` (`[m, w.cols()]`, row-major) at `isa`: returns
/// `[m, w.rows()]`. [`matmul_into`] into new buffers.
///
/// # Panics
/// If `x.len() != m * w.cols()`.
pub fn matmul(isa: Isa, x: &[f32], m: usize, w: &Weight) -> Vec<f32> {
    let mut y = Vec::new();
    matmul_into(isa, x, m, w, &mut y, &mut MatmulScratch::default());
    y
}

/// Memory a matmul works in besides its output, kept by a caller that runs many (a forward
/// pass) so that each one reuses it instead of faulting in fresh pages: for a 512-token
/// prefill, new outputs and task buffers on every matmul cost about a tenth of the pass in
/// page faults and zeroing.
#[derive(Default)]
pub(crate) struct MatmulScratch {
    /// The tasks' column blocks, laid end to end (see [`join_columns`]). Only ever grown: cut
    /// to each matmul's size, a layer's wider matmuls zero-filled its difference again every
    /// time (a 16-token turn of Gemma 3 270M, when its matmuls still went through here: 5 MB
    /// of zeros, about 1% of it).
    chunks: Vec<f32>,
    /// A part's output in a stack of weights.
    part: Vec<f32>,
    /// Each task's dequantized weight rows (see [`matmul_dequant`]), one block per task.
    dequant: AlignedBuf,
}

/// `y = x · Wᵀ` for `m` rows of `x` (`[m, w.cols()]`, row-major) at `isa`, into `y` (made
/// `[m, w.rows()]`, its memory reused), working in `scratch`.
///
/// For f32 weights each output element is [`dot`](super::dot)`(x[i], W[j])` bit for bit,
/// whatever `m` and the number of threads; work is split over the rows of `W`. Quantized
/// weights give bitwise the results of their dequantized f32 values (see `matmul_dequant`).
///
/// # Panics
/// If `x.len() != m * w.cols()`.
pub(crate) fn matmul_into(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &Weight,
    y: &mut Vec<f32>,
    scratch: &mut MatmulScratch,
) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        m * k,
        "matmul input is not m rows of the weight's width"
    );
    if m == 0 || n == 0 {
        y.clear();
        return;
    }
    // The kernels load 16-lane chunks from the start of each row; with rows a whole number of
    // cache lines wide, an aligned start means that no 32-byte load straddles two lines (each
    // such load costs two: about 30% of the matmul).
    let copy;
    let x = if AlignedBuf::is_aligned(x) {
        x
    } else {
        copy = AlignedBuf::from_slice(x);
        &copy
    };
    let wd = match &w.data {
        WeightData::F32(wd) => wd,
        WeightData::Quant(q) => return matmul_dequant(isa, x, m, q, y, scratch),
        WeightData::Stack(parts) => return matmul_stack(isa, x, m, parts, n, y, scratch),
    };
    // Each task owns a block of weight rows: its columns of y, as a [m, rows] chunk.
    let tasks = rayon::current_num_threads() * 4;
    let rows_per_task = n.div_ceil(tasks).next_multiple_of(NR);
    let task = |c: usize, out: &mut [f32]| {
        let j0 = c * rows_per_task;
        let rows = out.len() / m;
        panel(isa, x, m, k, &wd[j0 * k..(j0 + rows) * k], rows, out, rows);
    };
    if m == 1 {
        // One row: the column blocks are y's own runs.
        team::for_each_chunk(resized(y, n), rows_per_task, task);
        return;
    }
    let chunks = grown(&mut scratch.chunks, m * n);
    team::for_each_chunk(chunks, rows_per_task * m, task);
    join_columns(chunks, m, n, rows_per_task, resized(y, m * n));
}

/// [`matmul_into`] of a stack of weights (`n` rows in all): each part's outputs, computed in
/// its own form, are its block of `y`'s columns.
fn matmul_stack(
    isa: Isa,
    x: &[f32],
    m: usize,
    parts: &[Weight],
    n: usize,
    y: &mut Vec<f32>,
    scratch: &mut MatmulScratch,
) {
    let y = resized(y, m * n);
    if m > 1 && m <= MB {
        let quantized: Option<Vec<&QMatrix>> = parts
            .iter()
            .map(|p| match &p.data {
                WeightData::Quant(q) => Some(q),
                _ => None,
            })
            .collect();
        if let Some(quantized) = quantized {
            dequant_parts(isa, x, m, &quantized, y);
            return;
        }
    }
    let mut part = std::mem::take(&mut scratch.part);
    let mut col = 0;
    for p in parts.iter().filter(|p| p.rows > 0) {
        matmul_into(isa, x, m, p, &mut part, scratch);
        for (dst, src) in y.chunks_exact_mut(n).zip(part.chunks_exact(p.rows)) {
            dst[col..col + p.rows].copy_from_slice(src);
        }
        col += p.rows;
    }
    scratch.part = part;
}

/// `y` (`[m, n]`, row-major) from the column blocks tasks computed: block `c` holds columns
/// `c * width..` as a row-major `[m, block width]` chunk, the chunks laid end to end.
///
/// Every copy is a run of a chunk's row: the transposed layout this replaced needed one
/// strided store per value, 7% of a 2048-token prefill.
fn join_columns(chunks: &[f32], m: usize, n: usize, width: usize, y: &mut [f32]) {
    let fill = |i: usize, row: &mut [f32]| {
        for (c, dst) in row.chunks_mut(width).enumerate() {
            let w = dst.len();
            dst.copy_from_slice(&chunks[c * width * m + i * w..][..w]);
        }
    };
    if y.len() < 1 << 16 {
        // A few tokens' worth: not worth handing to the other thread.
        y.chunks_mut(n)
            .enumerate()
            .for_each(|(i, row)| fill(i, row));
    } else {
        team::for_each_chunk(y, n, fill);
    }
}

/// Weight rows dequantized at a time by [`matmul_dequant`]: a multiple of the micro-kernels'
/// widths, small enough for the f32 copy to stay in L1/L2.
const DEQUANT_ROWS: usize = 12;

/// Dequantizes weight rows `r0..r0 + rows` into `buf` (at least `rows * cols` long) and
/// multiplies them with every row of `x` into `out[i * ld + j]` (see [`panel`]), asking the
/// CPU on the way for the next panel's rows, those of the next [`DEQUANT_ROWS`] below `limit`
/// (the end of the caller's rows): one of them before each row is dequantized.
///
/// The next panel's blocks start coming in while this one is worked on: with few tokens (a
/// turn) the multiplying is short, and dequantizing waited on memory for them (a turn after
/// 2,048 tokens: 6-8% faster). All of them at once, a burst of up to 150 cache lines, the
/// prefetches themselves waited on memory: 2.6% of a turn's samples, 1.5% spread.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn dequant_panel(
    isa: Isa,
    q: &QMatrix,
    r0: usize,
    rows: usize,
    limit: usize,
    x: &[f32],
    m: usize,
    buf: &mut [f32],
    out: &mut [f32],
    ld: usize,
) {
    let k = q.cols();
    let next = r0 + rows..(r0 + rows + DEQUANT_ROWS).min(limit);
    let buf = &mut buf[..rows * k];
    for (i, row) in buf.chunks_exact_mut(k).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if isa.is_simd() && next.start + i < next.end {
            x86::prefetch_rows(isa, q, next.start + i, 1);
        }
        dequant::dequantize_rows(isa, q, r0 + i, 1, row);
    }
    panel(isa, x, m, k, buf, rows, out, ld);
}

/// [`matmul`] for quantized weights: each task dequantizes a few rows at a time (exactly, as
/// the GGUF reference does) and runs the f32 kernels on them, so results are bitwise those of
/// the fully dequantized matrix while only the quantized blocks stream from memory. A single
/// row (decode) goes to [`dequant::gemv`], which does the same without the buffer.
///
/// Why not llama.cpp's integer dot products against 8-bit-quantized activations (an earlier
/// `quant::matmul`, since removed)? With SmolLM2-135M that quantization changes greedy
/// answers (llama.cpp itself answers "La femme de France, ..." to the capital-of-France
/// prompt); f32 activations keep "The capital of France is Paris.".
fn matmul_dequant(
    isa: Isa,
    x: &[f32],
    m: usize,
    q: &QMatrix,
    y: &mut Vec<f32>,
    scratch: &mut MatmulScratch,
) {
    let (n, k) = (q.rows(), q.cols());
    debug_assert_eq!(x.len(), m * k);
    let tasks = rayon::current_num_threads() * 4;
    if m == 1 {
        // Decode: blocks are widened in registers, never written out. (Cut finer, as a turn's
        // panels are, a decode step of SmolLM2 took 14% longer.)
        let rows_per_task = n.div_ceil(tasks);
        team::for_each_chunk(resized(y, n), rows_per_task, |c, out| {
            dequant::gemv(isa, q, c * rows_per_task, x, out)
        });
        return;
    }
    if m <= MB {
        dequant_parts(isa, x, m, &[q], resized(y, m * n));
        return;
    }
    // A prompt's rows: a task's panels write a chunk of its own, joined afterwards. (Each
    // panel writing its columns of `y` itself, as a turn's do, made a 512-token prefill of
    // Gemma 3 270M 11% slower: each of its 512 rows a separate 48-byte store far from the
    // last.)
    let rows_per_task = n.div_ceil(tasks).next_multiple_of(DEQUANT_ROWS);
    // Each task's block for its dequantized rows, kept across calls: a new one per task was
    // zeroed every time (a turn's 150 matmuls), and its first use faulted pages in.
    let block = DEQUANT_ROWS * k;
    let blocks = n.div_ceil(rows_per_task) * block;
    let dequant = grown_aligned(&mut scratch.dequant, blocks);
    let chunks = grown(&mut scratch.chunks, m * n);
    team::for_each_chunk2(
        chunks,
        rows_per_task * m,
        dequant,
        block,
        |c, out: &mut [f32], buf: &mut [f32]| {
            let (j0, width) = (c * rows_per_task, out.len() / m);
            // Prefetching stops at the task's last row.
            let end = j0 + width;
            for s in (0..width).step_by(DEQUANT_ROWS) {
                let rows = DEQUANT_ROWS.min(width - s);
                dequant_panel(isa, q, j0 + s, rows, end, x, m, buf, &mut out[s..], width);
            }
        },
    );
    join_columns(chunks, m, n, rows_per_task, resized(y, m * n));
}

/// [`matmul_dequant`] of a few rows of `x` (`1 < m <= MB`: a turn's) against a stack of
/// quantized weights, laid side by side in `y` (`[m, n]`, `n` their rows in all), in one
/// parallel region: each panel of [`DEQUANT_ROWS`] rows of a part is an item, whose outputs
/// go straight to their columns. There are many items, and the team's guided runs leave the
/// threads within about one panel of each other at the region's end; a stack's parts in one
/// region (a layer's q, k and v, its gate and up) wait at one end instead of several, and
/// are not copied from a part's buffer into their columns afterwards.
///
/// Measured on an Intel Xeon (2 threads), against eight tasks a matmul and a region a part
/// (one process switching between the two every ten loads and 16-token turns after 2,048
/// tokens, 40 switches): at AVX-512 Gemma 3 270M's mean 2.1-2.6% shorter (three runs),
/// SmolLM2's 0.0-1.0%; at AVX2 1.9-3.7% and 0.5-0.9% (two runs). The threads' waiting went
/// from 9.0% to 6.1% of Gemma's `perf` samples at AVX-512.
fn dequant_parts(isa: Isa, x: &[f32], m: usize, parts: &[&QMatrix], y: &mut [f32]) {
    let n = y.len() / m;
    // Each panel's columns, and its part with the part's first column.
    let mut blocks = Vec::new();
    let mut owners = Vec::new();
    let mut col = 0;
    for (p, q) in parts.iter().enumerate() {
        for j in (0..q.rows()).step_by(DEQUANT_ROWS) {
            blocks.push(col + j..col + (j + DEQUANT_ROWS).min(q.rows()));
            owners.push((p, col));
        }
        col += q.rows();
    }
    team::for_each_columns(y, n, &blocks, |c, mut cols| {
        let (p, col) = owners[c];
        let q = parts[p];
        let k = q.cols();
        PANEL_SCRATCH.with_borrow_mut(|PanelScratch { rows, out }| {
            let (j0, width) = (cols.start() - col, cols.width());
            let buf = grown_aligned(rows, DEQUANT_ROWS * k);
            let out = grown(out, m * width);
            // The next panel is most often this thread's own (a run is consecutive panels).
            dequant_panel(isa, q, j0, width, q.rows(), x, m, buf, out, width);
            cols.write(out);
        })
    });
}

/// A thread's buffers for [`dequant_parts`]' panels, kept across matmuls (a turn runs about
/// 150) so that a panel never zeroes or faults in new memory.
#[derive(Default)]
struct PanelScratch {
    /// The panel's dequantized weight rows.
    rows: AlignedBuf,
    /// The panel's outputs, `[m, rows]`, before they go to their columns.
    out: Vec<f32>,
}

thread_local! {
    static PANEL_SCRATCH: std::cell::RefCell<PanelScratch> =
        std::cell::RefCell::new(PanelScratch::default());
}

// ---------------------------------------------------------------------------------------------
// Element-wise and per-row kernels
// ---------------------------------------------------------------------------------------------
