//! Causal grouped-query attention over the cache: per (tokens, query heads of one KV head)
//! task, scores by [`dot`](super::dot), a sequential softmax, and V sums in position order, so
//! a query's result never depends on the batch or the task it is in.

use std::cell::RefCell;
use std::ops::Range;

use kv_extract::{AlignedBuf, KvCache, KvDtype, KvRows};

use super::dot::{LANES, MR, NR, dot_1x1, dot_1x3, dot_2x3, reduce};
use super::elementwise::{exp, exp_each};
use super::isa::{Isa, Level, Recompile};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{grown, grown_aligned, team, vectorized};

/// Queries of one attention task: query row `q[i]` sees the rows `firsts[i]..lens[i]` of the
/// K and V it is given.
struct Queries<'a> {
    q: &'a [f32],
    lens: &'a [usize],
    firsts: &'a [usize],
}

/// K and V rows are read in chunks of this many positions: a chunk of V stays in L1 while
/// every query sweeps it, and a cache held in f16 or `q8_0` converts one chunk at a time
/// into a buffer of that size.
const CHUNK: usize = 64;

/// A task's working memory. Each thread keeps one (see [`TASK_SCRATCH`]) across tasks, layers
/// and forward passes, so that it is allocated and zeroed once, not for every layer: the
/// scores of a turn after 2,048 tokens take 400 KB a task, and zeroing new ones every layer
/// was 1.8% of a resume's time under `perf` (0.5% left to other buffers). The cost: each
/// thread holds the scores of the longest history it has attended to (4 bytes for each of
/// up to 48 queries, SmolLM2's tile, and each position).
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    /// One chunk of K or V rows converted to f32, line-aligned like the cache's own rows.
    rows: AlignedBuf,
    /// One chunk of K rows in the quarter layout of the AVX-512 score kernel.
    quarters: AlignedBuf,
}

/// Keys per block of the quarter layout.
#[cfg(target_arch = "x86_64")]
const QUARTER_KEYS: usize = x86::QUARTER_KEYS;
#[cfg(not(target_arch = "x86_64"))]
const QUARTER_KEYS: usize = 16;

/// Fewest queries sharing a block of keys for which it is laid out in quarters. By count, not
/// measured: laying out 16 keys of 64 takes 128 shuffles, and each query scored from the
/// layout saves 24, so a decode step's three queries per task keep the row kernel and a
/// prompt's or a turn's tiles (up to 48) take the layout.
const QUARTERS_MIN_QUERIES: usize = 8;

/// Whether `nq` queries of width `d` are scored with the keys in the quarter layout
/// ([`x86::gram_quarters`], AVX-512 only). The same bits either way.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn quarters_apply(isa: Isa, d: usize, nq: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa.level() == Level::Avx512 && d.is_multiple_of(LANES) && nq >= QUARTERS_MIN_QUERIES {
        return true;
    }
    false
}

/// Scores of `nq` queries against K rows `keys` (whole blocks of [`QUARTER_KEYS`]) into
/// `out[i * ld + j]` (`j` from `keys.start`): the rows laid out in the quarter layout (f16
/// widened on the way, other dtypes converted to f32 first), asking the CPU for the rows
/// `next` as [`rows_f32`] does.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_quarters(
    isa: Isa,
    q: &[f32],
    nq: usize,
    k: KvRows<'_>,
    keys: Range<usize>,
    next: Range<usize>,
    (quarters, rows): (&mut AlignedBuf, &mut AlignedBuf),
    out: &mut [f32],
    ld: usize,
) {
    let d = k.width();
    let (j0, n) = (keys.start, keys.len());
    let (source, ahead) = match (k.as_f32(), k.dtype(), k.as_u16()) {
        (Some(all), _, _) => (x86::Keys::F32(&all[j0 * d..(j0 + n) * d]), &[][..]),
        (None, KvDtype::F16, Some(halves)) => (
            x86::Keys::F16(&halves[j0 * d..(j0 + n) * d]),
            bytes_of(k, next),
        ),
        _ => (
            x86::Keys::F32(rows_f32(isa, k, j0, j0 + n, next, rows)),
            &[][..],
        ),
    };
    let kq = grown_aligned(quarters, n * d);
    x86::quarters(isa, source, n, d, kq, ahead);
    x86::gram_quarters(isa, q, nq, kq, n, d, out, ld);
}

/// Everything an attention task works in besides its output: its queries, copied to a
/// line-aligned buffer, their lengths and first positions, and [`Scratch`].
#[derive(Default)]
struct TaskScratch {
    queries: AlignedBuf,
    lens: Vec<usize>,
    firsts: Vec<usize>,
    scratch: Scratch,
}

thread_local! {
    /// The [`TaskScratch`] of the tasks this thread runs. Every value a task reads from it,
    /// it has written first, so what an earlier task left there changes no result.
    static TASK_SCRATCH: RefCell<TaskScratch> = RefCell::new(TaskScratch::default());
}

/// Rows `j0..j1` of `rows` as f32: the cache's own slice when it holds f32, else converted
/// into `buf` (exactly, as [`KvRows::to_f32`] defines it; at the x86 levels, F16C for f16 and
/// AVX2 widening for `q8_0`: the same bits), asking the CPU on the way for the bytes of rows
/// `next` (clamped to the rows there are), which a later call converts: with them on their
/// way, its loads do not wait on memory. A hint: no result changes.
///
/// In a resume the rows come from memory: a turn's matmuls stream the weights through the caches
/// between the load and each layer's attention. Asked for earlier, during the MLP of the layer
/// before (each thread half of the next layer's K/V lines, 4 or 16 with each weight row it
/// dequantizes, `prefetcht1`), SmolLM2 Q4_K_M's resume after 2,048 tokens took 0.7% and 1.9% longer
/// on an Intel Xeon in December 2026 (medians of 150 each in one process, alternately); with the
/// lines handed out through one shared counter, 5-8% longer. Read by both threads in a pass just
/// before attention, the rows convert faster, but the pass costs more than that saves (7.6-8.0%
/// longer).
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn rows_f32<'b>(
    isa: Isa,
    rows: KvRows<'b>,
    j0: usize,
    j1: usize,
    next: Range<usize>,
    buf: &'b mut AlignedBuf,
) -> &'b [f32] {
    let d = rows.width();
    if let Some(all) = rows.as_f32() {
        return &all[j0 * d..j1 * d];
    }
    let out = grown_aligned(buf, (j1 - j0) * d);
    #[cfg(target_arch = "x86_64")]
    if isa.is_simd() {
        let (rb, bytes) = (rows.row_bytes(), rows.bytes());
        let ahead = bytes_of(rows, next);
        match (rows.dtype(), rows.as_u16()) {
            (KvDtype::F16, Some(halves)) => {
                x86::f16_to_f32(isa, &halves[j0 * d..j1 * d], out, ahead);
                return out;
            }
            (KvDtype::Q8_0, _) => {
                x86::q8_0_to_f32(isa, &bytes[j0 * rb..j1 * rb], out, ahead);
                return out;
            }
            _ => {}
        }
    }
    rows.to_f32(j0..j1, out);
    out
}

/// The bytes of rows `range` of `rows`, clamped to the rows there are: what a conversion asks
/// the CPU for ahead of converting it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bytes_of(rows: KvRows<'_>, range: Range<usize>) -> &[u8] {
    let (rb, bytes) = (rows.row_bytes(), rows.bytes());
    let end = (range.end * rb).min(bytes.len());
    &bytes[(range.start * rb).min(end)..end]
}

/// Attention of a set of queries sharing one KV head: scores against every K row any of them
/// sees, a softmax per query, then the weighted sum of V rows in position order.
///
/// Each query's result depends only on that query and its rows: its scores are
/// [`dot`](super::dot::dot) bit for bit, its softmax is [`scale_and_max`] and
/// [`exp_and_sum_from`], and its V sums are [`accumulate`]'s. Batching queries only shares
/// loads. A cache held in another dtype than f32 is read as the f32 values it holds
/// ([`KvRows::to_f32`]), so its attention is this same definition applied to those values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_portable(
    isa: Isa,
    qs: Queries<'_>,
    k: KvRows<'_>,
    v: KvRows<'_>,
    d: usize,
    scale: f32,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let nq = qs.lens.len();
    let len = qs.lens.iter().copied().max().unwrap_or(0);
    let Scratch {
        scores,
        rows,
        quarters,
    } = scratch;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = quarters;
    // Every score is written below before it is read (each query's row in full, the rows
    // past its own length included), so the buffer only grows: zeroing it for every task was
    // a pass over it (48 queries by 2,064 positions in a layer's task of a turn) for nothing.
    let scores = grown(scores, nq * len);
    let by_quarters = quarters_apply(isa, d, nq);
    match k.as_f32() {
        Some(k) if !by_quarters => score_block(isa, qs.q, nq, k, len, d, scores, len),
        _ => {
            for j0 in (0..len).step_by(CHUNK) {
                let c = CHUNK.min(len - j0);
                let next = j0 + CHUNK..j0 + 2 * CHUNK;
                // Whole blocks of 16 keys in the quarter layout, when it applies; the rest
                // (the last chunk's last keys) as rows.
                let whole = if by_quarters { c - c % QUARTER_KEYS } else { 0 };
                if whole > 0 {
                    #[cfg(target_arch = "x86_64")]
                    score_quarters(
                        isa,
                        qs.q,
                        nq,
                        k,
                        j0..j0 + whole,
                        next.clone(),
                        (quarters, rows),
                        &mut scores[j0..],
                        len,
                    );
                }
                if whole < c {
                    let kc = rows_f32(isa, k, j0 + whole, j0 + c, next, rows);
                    // Straight into each query's row of scores (copied there from a block of
                    // the chunk's scores before: 1.5% of a turn after 2,048 tokens).
                    let out = &mut scores[j0 + whole..];
                    score_block(isa, qs.q, nq, kc, c - whole, d, out, len);
                }
            }
        }
    }
    // Softmax numerators and their sums, per query.
    let mut sums = [0.0f32; 64];
    let mut sums_vec;
    let sums: &mut [f32] = if nq <= 64 {
        &mut sums[..nq]
    } else {
        sums_vec = vec![0.0f32; nq];
        &mut sums_vec
    };
    for ((i, (&n, &first)), sum) in qs
        .lens
        .iter()
        .zip(qs.firsts)
        .enumerate()
        .zip(sums.iter_mut())
    {
        let s = &mut scores[i * len..i * len + n];
        let max = scale_and_max(&mut s[first..], scale);
        // Rows before a query's first are not its to see: their weights are zero and never
        // summed. The sum's lanes stay position % 16 (the K rows start on a multiple of 16).
        let aligned = first - first % LANES;
        s[..aligned].fill(0.0);
        *sum = exp_and_sum_from(isa, &mut s[aligned..], max, first - aligned);
    }
    // Weighted V sums: V rows a chunk at a time, up to six queries at a time sharing each
    // row's loads. Rows and scores are indexed from the chunk's start.
    let pv6 = d.is_multiple_of(64) && pv6_available(isa);
    // At AVX2 two queries at a time, with the x86 kernel, 32 columns at a time (`pv_2x64`):
    // a 64-wide query's sums are 8 registers, two queries' 32 columns too, and each V row's
    // loads are then shared (the portable loop's output kept even one query's sums on the
    // stack: a quarter of a 16-token turn after 2,048 tokens went to the V sums).
    let pairs = d.is_multiple_of(64) && isa.level() == Level::Avx2;
    out.fill(0.0);
    for j0 in (0..len).step_by(CHUNK) {
        let next = j0 + CHUNK..j0 + 2 * CHUNK;
        let vc = rows_f32(isa, v, j0, (j0 + CHUNK).min(len), next, rows);
        let end = |i: usize| qs.lens[i].clamp(j0, j0 + CHUNK) - j0;
        let begin = |i: usize| qs.firsts[i].clamp(j0, j0 + CHUNK) - j0;
        let mut i = 0;
        while i < nq {
            let group = match nq - i {
                r if pairs => r.min(2),
                r if r >= 6 && pv6 => 6,
                r if r >= 4 => 4,
                r => r.min(2),
            };
            // Each query's rows in position order: its own before the rows every query of the
            // group sees, those together, then its own after.
            let from = (i..i + group).map(begin).max().unwrap_or(0);
            let to = (i..i + group).map(end).min().unwrap_or(0).max(from);
            let s = &scores[j0..];
            for q in i..i + group {
                let own = begin(q)..from.min(end(q));
                let o = &mut out[q * d..];
                accumulate_group(isa, o, &s[q * len..], len, own, vc, d, 1);
            }
            accumulate_group(
                isa,
                &mut out[i * d..],
                &s[i * len..],
                len,
                from..to,
                vc,
                d,
                group,
            );
            for q in i..i + group {
                let rest = to.max(begin(q)).min(end(q))..end(q);
                let o = &mut out[q * d..];
                accumulate_group(isa, o, &s[q * len..], len, rest, vc, d, 1);
            }
            i += group;
        }
    }
    for (o, sum) in out.chunks_exact_mut(d).zip(sums.iter()) {
        let inv = 1.0 / sum;
        for o in o.iter_mut() {
            *o *= inv;
        }
    }
}

/// Every score `dot(q[i], k[j])` of `nq` queries against `nk` K rows into
/// `out[i * ld + j]`: the x86 kernel when it applies, else two queries by three K rows at a
/// time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_block(
    isa: Isa,
    q: &[f32],
    nq: usize,
    k: &[f32],
    nk: usize,
    d: usize,
    out: &mut [f32],
    ld: usize,
) {
    let qrow = |i: usize| &q[i * d..(i + 1) * d];
    let krow = |j: usize| &k[j * d..(j + 1) * d];
    let done = gram_simd(isa, q, nq, k, nk, d, out, ld);
    let mut j = if done { nk } else { 0 };
    while j + NR <= nk {
        let ks = [krow(j), krow(j + 1), krow(j + 2)];
        let mut i = 0;
        while i + MR <= nq {
            let r = dot_2x3([qrow(i), qrow(i + 1)], ks, d);
            for (di, row) in r.iter().enumerate() {
                out[(i + di) * ld + j..][..NR].copy_from_slice(row);
            }
            i += MR;
        }
        if i < nq {
            let r = dot_1x3([qrow(i)], ks, d);
            out[i * ld + j..][..NR].copy_from_slice(&r[0]);
        }
        j += NR;
    }
    for j in j..nk {
        for i in 0..nq {
            out[i * ld + j] = dot_1x1([qrow(i)], [krow(j)], d)[0][0];
        }
    }
}

/// Multiplies `s` by `scale` in place and returns the largest result (`-inf` if empty).
///
/// The maximum is taken over sixteen interleaved partial maxima: the same value as a
/// sequential fold, since `max` is exact (a `±0` tie can pick either zero, which `x - max` then
/// cannot tell apart). `if x > m` rather than `f32::max` compiles to one `max` instruction; the
/// two agree on NaN too, which neither lets through.
#[inline(always)]
pub(super) fn scale_and_max(s: &mut [f32], scale: f32) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] *= scale;
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    for x in chunks.into_remainder() {
        *x *= scale;
        m[0] = m[0].max(*x);
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// [`exp_and_sum_from`] of every score (the tests' entry point).
#[cfg(test)]
pub(super) fn exp_and_sum(isa: Isa, s: &mut [f32], max: f32) -> f32 {
    exp_and_sum_from(isa, s, max, 0)
}

/// Replaces each score `x` of one query from `s[skip]` on (`skip < 16`) by `exp(x - max)` and
/// returns their sum; the first `skip` become 0 and are not summed (a sliding window's first
/// visible position need not start a lane).
///
/// The sum has sixteen lanes of partial sums (position `j` adds into lane `j % 16`, counted
/// from `s[0]`, in position order), folded by [`reduce`]'s tree: part of the numeric
/// definition, like a dot product's lanes. The lanes are independent chains, so the loop runs
/// at the speed of `exp`.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(super) fn exp_and_sum_from(isa: Isa, s: &mut [f32], max: f32, skip: usize) -> f32 {
    debug_assert!(skip < LANES);
    let mut acc = [0.0f32; LANES];
    let (head, s) = s.split_at_mut(if skip > 0 { LANES.min(s.len()) } else { 0 });
    for (l, x) in head.iter_mut().enumerate() {
        if l < skip {
            *x = 0.0;
        } else {
            *x = exp(*x - max);
            acc[l] += *x;
        }
    }
    // Whole chunks in registers at x86's levels (the same bits); else four chunks of lanes at
    // a time through `exp_each` (the same bits as `exp` one by one), then the rest one chunk
    // at a time.
    #[cfg(target_arch = "x86_64")]
    let s = if isa.is_simd() {
        let (whole, rest) = s.split_at_mut(s.len() / LANES * LANES);
        x86::exp_and_sum(isa, whole, max, &mut acc);
        rest
    } else {
        s
    };
    let mut blocks = s.chunks_exact_mut(EXP_BLOCK);
    for b in &mut blocks {
        let b: &mut [f32; EXP_BLOCK] = b.try_into().expect("a whole block");
        for x in b.iter_mut() {
            *x -= max;
        }
        exp_each(b);
        for c in b.chunks_exact(LANES) {
            for l in 0..LANES {
                acc[l] += c[l];
            }
        }
    }
    let mut chunks = blocks.into_remainder().chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - max);
            acc[l] += c[l];
        }
    }
    for (x, a) in chunks.into_remainder().iter_mut().zip(&mut acc) {
        *x = exp(*x - max);
        *a += *x;
    }
    reduce(&acc)
}

/// Scores a softmax exponentiates at once ([`exp_each`]): four chunks of [`LANES`].
const EXP_BLOCK: usize = 4 * LANES;

/// Every `dot(a[i], b[j])` into `out[i * ld + j]` with the x86 `gram` kernel when `isa` has
/// one and the rows are whole 16-lane chunks; `false` (nothing written) otherwise.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn gram_simd(
    isa: Isa,
    a: &[f32],
    na: usize,
    b: &[f32],
    nb: usize,
    k: usize,
    out: &mut [f32],
    ld: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa.is_simd() && k.is_multiple_of(LANES) {
        x86::gram(isa, a, na, b, nb, k, out, ld);
        return true;
    }
    false
}

/// For each of `Q` queries `q`, `o[q] = fma(p, v[j], o[q])` for the V rows `j` in `rows`, in
/// order, where `p = scores[q * len + j]`, `o[q]` is `o[q * D..][..D]` and `v[j]` is
/// `v[j * stride..][..D]` (`D` columns of rows `stride` wide).
///
/// Each query's sums are the same operations whatever `Q` is: queries share only the loads
/// of V rows. Four queries keep 16 independent fused chains in flight (with one query, each
/// chain waits on the latency of the one before).
#[inline(always)]
fn accumulate<const D: usize, const Q: usize>(
    o: &mut [f32],
    scores: &[f32],
    len: usize,
    rows: Range<usize>,
    v: &[f32],
    stride: usize,
) {
    let mut acc = [[0.0f32; D]; Q];
    for (q, a) in acc.iter_mut().enumerate() {
        a.copy_from_slice(&o[q * D..(q + 1) * D]);
    }
    for j in rows {
        let vrow: &[f32; D] = v[j * stride..j * stride + D]
            .try_into()
            .expect("head width");
        for (q, a) in acc.iter_mut().enumerate() {
            let p = scores[q * len + j];
            for l in 0..D {
                a[l] = p.mul_add(vrow[l], a[l]);
            }
        }
    }
    for (q, a) in acc.iter().enumerate() {
        o[q * D..(q + 1) * D].copy_from_slice(a);
    }
}

/// Most queries [`accumulate_group`] is given at once.
const MAX_GROUP: usize = 6;

/// [`accumulate`] for the `group` queries whose outputs start `o` (`d` values each) and whose
/// scores start `scores` (`len` apart). Heads a multiple of 64 wide run 64 columns at a time
/// through [`accumulate64`] (a lane's sums are the same fused multiply-adds in the same order
/// whichever columns run beside it); other widths through [`accumulate_any`].
///
/// A 64-row chunk of Gemma 3's 256-wide V rows is 64 KB in f32, more than a Zen 5's 48 KB of
/// L1, and each group of queries reads all of it. Summing one 64-column slice for every group
/// before the next (16 KB of V a slice, read from L1) changed nothing measurable: Gemma 3's
/// resume after 2,048 tokens 23.78 against 23.50 ms and 23.85 against 23.82 (medians of 200
/// each in one process, alternately; AMD EPYC Zen 5, AVX-512, December 2026). Not kept.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn accumulate_group(
    isa: Isa,
    o: &mut [f32],
    scores: &[f32],
    len: usize,
    rows: Range<usize>,
    v: &[f32],
    d: usize,
    group: usize,
) {
    let o = &mut o[..group * d];
    if d == 64 {
        return accumulate64(isa, o, scores, len, rows, v, d, group);
    }
    if !d.is_multiple_of(64) || group > MAX_GROUP {
        return accumulate_any(o, scores, len, rows, v, d);
    }
    // Gemma 3's 256-wide heads: each 64-column slice of the queries' outputs gathered into
    // a contiguous block, summed, and put back.
    let mut slice = [0.0f32; MAX_GROUP * 64];
    let slice = &mut slice[..group * 64];
    for c in (0..d).step_by(64) {
        for (q, s) in slice.chunks_exact_mut(64).enumerate() {
            s.copy_from_slice(&o[q * d + c..][..64]);
        }
        accumulate64(isa, slice, scores, len, rows.clone(), &v[c..], d, group);
        for (q, s) in slice.chunks_exact(64).enumerate() {
            o[q * d + c..][..64].copy_from_slice(s);
        }
    }
}

/// [`accumulate`]`::<64, group>` over V rows `stride` wide: six queries only when
/// [`pv6_available`], one with the x86 kernel at any SIMD level.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn accumulate64(
    isa: Isa,
    o: &mut [f32],
    scores: &[f32],
    len: usize,
    rows: Range<usize>,
    v: &[f32],
    stride: usize,
    group: usize,
) {
    match group {
        #[cfg(target_arch = "x86_64")]
        1 if isa.is_simd() => x86::pv_1x64(isa, o, scores, rows, v, stride),
        #[cfg(target_arch = "x86_64")]
        2 if isa.is_simd() => x86::pv_2x64(isa, o, scores, len, rows, v, stride),
        // Only when `pv6_available`.
        #[cfg(target_arch = "x86_64")]
        6 => x86::pv_6x64(isa, o, scores, len, rows, v, stride),
        4 => accumulate::<64, 4>(o, scores, len, rows, v, stride),
        2 => accumulate::<64, 2>(o, scores, len, rows, v, stride),
        1 => accumulate::<64, 1>(o, scores, len, rows, v, stride),
        _ => unreachable!("attend_portable groups 1, 2, 4 or 6 queries, not {group}"),
    }
}

/// Whether six queries at a time have their AVX-512 kernel (`x86::pv_6x64`) at `isa`.
#[inline(always)]
fn pv6_available(isa: Isa) -> bool {
    isa.level() == Level::Avx512
}

/// [`accumulate`] for any head width `d`, one query after another.
#[inline(always)]
pub(super) fn accumulate_any(
    o: &mut [f32],
    scores: &[f32],
    len: usize,
    rows: Range<usize>,
    v: &[f32],
    d: usize,
) {
    for (q, o) in o.chunks_exact_mut(d).enumerate() {
        for j in rows.clone() {
            let p = scores[q * len + j];
            for (o, &vv) in o.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                *o = p.mul_add(vv, *o);
            }
        }
    }
}

/// [`attend_portable`] compiled for `isa`.
#[allow(clippy::too_many_arguments)]
fn attend(
    isa: Isa,
    qs: Queries<'_>,
    k: KvRows<'_>,
    v: KvRows<'_>,
    d: usize,
    scale: f32,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    struct Attend<'a> {
        isa: Isa,
        qs: Queries<'a>,
        k: KvRows<'a>,
        v: KvRows<'a>,
        d: usize,
        scale: f32,
        scratch: &'a mut Scratch,
        out: &'a mut [f32],
    }
    impl Recompile for Attend<'_> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            let Attend {
                isa,
                qs,
                k,
                v,
                d,
                scale,
                scratch,
                out,
            } = self;
            attend_portable(isa, qs, k, v, d, scale, scratch, out);
        }
    }
    let kernel = Attend {
        isa,
        qs,
        k,
        v,
        d,
        scale,
        scratch,
        out,
    };
    vectorized(isa, kernel);
}

/// Below this many new tokens (decode), attention tasks split the query heads, not the tokens.
const FEW_TOKENS: usize = 8;
/// Tokens per attention tile in a prefill or a turn: their queries share each K/V row load.
const TOKEN_TILE: usize = 16;

/// One attention task: tokens `t0..t1` times query heads `h0..h0 + nh`, all of one KV head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Task {
    pub(super) t0: usize,
    pub(super) t1: usize,
    pub(super) h0: usize,
    pub(super) nh: usize,
}

/// Splits the attention of `n` new tokens into tasks for `threads` workers.
///
/// In both cases the work laid end to end is cut into `threads` equal runs, and each run at
/// group boundaries. Reading a KV head costs more than its arithmetic when the history is
/// long, so most tasks take a whole group (whose K/V rows are then read once) and the threads
/// still get equal shares.
///
/// Few tokens (decode): the work is the query heads, all tokens in each task. With SmolLM2's
/// nine heads in three groups on two threads: the first group and one head of the second, then
/// the second's other two and the last group, so each thread reads two KV heads (splitting
/// every group in two, as before, had each read three). Reading no row twice, a decode step
/// split by positions for the scores, then by columns for the softmax's V sums (two regions of
/// the team a layer), was slower: on an AMD EPYC of the Zen 3 generation (AVX2, 2 threads,
/// December 2026; one process alternating the two every two decode steps, medians of 200-300
/// steps) SmolLM2's step after 2,048 tokens took 14.6-15.1 ms against 13.8, Gemma 3's
/// 17.0-21.0 against 17.4-21.3. The rows of a head both threads read come to the second from
/// the shared L3.
///
/// Many tokens: tiles of [`TOKEN_TILE`] tokens, and within a tile the work is each group's
/// tokens: one whole group, half the next, then the other half and the last.
pub(super) fn attention_tasks(n: usize, n_heads: usize, group: usize, threads: usize) -> Vec<Task> {
    let (groups, threads) = (n_heads / group, threads.max(1));
    // `0..total` cut at every multiple of `unit` and into `threads` equal runs.
    let cuts = |total: usize, unit: usize| {
        let mut cuts: Vec<usize> = (0..=threads)
            .map(|i| i * total / threads)
            .chain((0..=groups).map(|g| g * unit))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    };
    if n < FEW_TOKENS {
        return cuts(n_heads, group)
            .windows(2)
            .map(|w| Task {
                t0: 0,
                t1: n,
                h0: w[0],
                nh: w[1] - w[0],
            })
            .collect();
    }
    let mut tasks = Vec::new();
    for a0 in (0..n).step_by(TOKEN_TILE) {
        let m = TOKEN_TILE.min(n - a0);
        for w in cuts(groups * m, m).windows(2) {
            let g = w[0] / m;
            tasks.push(Task {
                t0: a0 + w[0] - g * m,
                t1: a0 + w[1] - g * m,
                h0: g * group,
                nh: group,
            });
        }
    }
    tasks
}

/// What one layer's attention computes, besides its inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    /// Query heads.
    pub n_heads: usize,
    /// Scores are `dot(q, k) * scale`.
    pub scale: f32,
    /// A sliding window: the query at position `p` sees positions `p + 1 - window ..= p`
    /// (llama.cpp's standard SWA mask); `None` sees every earlier position.
    pub window: Option<usize>,
}

/// Causal grouped-query attention at `isa` for `n` new tokens at positions `start..start + n`,
/// whose K and V are already written to `cache` (layer `layer`) at those positions.
///
/// `q` is `[n, n_heads, head_dim]` (after RoPE); returns the attention output in the same
/// layout. Query head `h` reads KV head `h / (n_heads / n_kv_heads)`. Work is parallel over
/// tasks of (tokens, query heads of one KV head), split by `attention_tasks`; each query's
/// result does not depend on which task it is in, nor (in a sliding window) on where the
/// rows its task reads begin.
pub fn attention(
    isa: Isa,
    q: &[f32],
    n: usize,
    start: usize,
    spec: AttentionSpec,
    cache: &KvCache,
    layer: usize,
) -> Vec<f32> {
    let AttentionSpec {
        n_heads,
        scale,
        window,
    } = spec;
    let shape = cache.shape();
    let d = shape.head_dim;
    let group = n_heads / shape.n_kv_heads;
    // The first position the query at `p` sees.
    let first = |p: usize| window.map_or(0, |w| (p + 1).saturating_sub(w));
    let tasks = attention_tasks(n, n_heads, group, rayon::current_num_threads());
    let task = |&Task { t0, t1, h0, nh }: &Task, ts: &mut TaskScratch| {
        let TaskScratch {
            queries,
            lens,
            firsts,
            scratch,
        } = ts;
        // Queries are copied to a line-aligned buffer: with 64-wide heads, the score kernel's
        // loads of them and of the (aligned) K rows then never straddle lines.
        let qbuf = grown_aligned(queries, (t1 - t0) * nh * d);
        // The rows read start on a multiple of 16 positions, so that a softmax sum's lanes
        // are the same whichever task a query is in.
        let lo = first(start + t0) / LANES * LANES;
        lens.clear();
        firsts.clear();
        for (t, rows) in (t0..t1).zip(qbuf.chunks_exact_mut(nh * d)) {
            rows.copy_from_slice(&q[(t * n_heads + h0) * d..][..nh * d]);
            lens.extend(std::iter::repeat_n(start + t + 1 - lo, nh));
            firsts.extend(std::iter::repeat_n(first(start + t) - lo, nh));
        }
        let kv = h0 / group;
        let k = cache.k_head(layer, kv, lo..start + t1);
        let v = cache.v_head(layer, kv, lo..start + t1);
        let mut out = vec![0.0f32; qbuf.len()];
        let queries = Queries {
            q: qbuf,
            lens,
            firsts,
        };
        attend(isa, queries, k, v, d, scale, scratch, &mut out);
        out
    };
    let mut results: Vec<Vec<f32>> = vec![Vec::new(); tasks.len()];
    // A decode step or a turn is one tile, whose tasks are cut so that one run a thread is
    // equal work. A prompt's tiles are claimed a few at a time, as threads come free (in a
    // causal prompt later tiles see more positions: one run a thread, in order, gave the
    // second thread about three times the first's work in a prompt's first chunk).
    let cut = match n <= TOKEN_TILE {
        true => team::Cut::PerThread,
        false => team::Cut::Equal,
    };
    team::for_each_chunk_cut(&mut results, 1, cut, |i, r| {
        r[0] = TASK_SCRATCH.with_borrow_mut(|ts| task(&tasks[i], ts));
    });
    let mut out = vec![0.0f32; n * n_heads * d];
    for (&Task { t0, h0, nh, .. }, res) in tasks.iter().zip(&results) {
        for (r, t) in res.chunks_exact(nh * d).zip(t0..) {
            out[(t * n_heads + h0) * d..][..nh * d].copy_from_slice(r);
        }
    }
    out
}
