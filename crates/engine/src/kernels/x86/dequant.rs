//! Quantized weights against f32 activations: the 32-value kinds' blocks (Q4_0, Q4_1, Q5_0,
//! Q5_1 and Q8_0, held split, values apart from their f16 scales) widened to f32 eight or
//! sixteen values per instruction, exactly as the portable dequantization computes them, and
//! the dispatch to [`super::blocks`] for the K-quants, held as the file stores them.
//!
//! Held as the file's blocks (scales inside, 18, 22 or 24 bytes apart), Q4_0, Q5_0 and Q5_1
//! widened each block's scale on its own and read values across cache lines. Split, on an
//! Intel Xeon (640 rows of 2,048, criterion, best of two alternated runs): dequantizing took
//! 0.61x (Q4_0), 0.65x (Q5_0) and 0.61x (Q5_1) the time at AVX-512, 0.81-0.91x at AVX2; the
//! decode gemv 0.74x, 0.66x and 0.61x at AVX-512, 0.89x, 0.90x and 0.99x at AVX2. (With the
//! kernels compiled once per kind, see [`Split`], Q4_1's and Q8_0's took 0.88-1.00x too.)

use std::arch::x86_64::*;

use super::blocks;
use super::{PREFETCH, reduce, reduce512};
use crate::kernels::isa::{Isa, Level};
use crate::kernels::quant::{QK, QKind, QMatrix};

/// A split kind as a type: each kernel is compiled for one kind, its per-block `match` on
/// the kind folded away. (With the kind a value, a third kind's arm kept the match in the
/// block loops: Q4_1's decode gemv took 1.16x as long.)
trait Split {
    const KIND: QKind;
}

macro_rules! split_kinds {
    ($($t:ident: $kind:ident),*) => {$(
        enum $t {}
        impl Split for $t {
            const KIND: QKind = QKind::$kind;
        }
    )*};
}

split_kinds!(Q40: Q4_0, Q41: Q4_1, Q50: Q5_0, Q51: Q5_1, Q80: Q8_0);

/// `$body` with `$k` the [`Split`] type of `$kind`, a split kind.
macro_rules! with_split {
    ($kind:expr, $k:ident => $body:expr) => {
        with_split!(@ $kind, $k, $body, Q4_0: Q40, Q4_1: Q41, Q5_0: Q50, Q5_1: Q51, Q8_0: Q80)
    };
    (@ $kind:expr, $k:ident, $body:expr, $($name:ident: $t:ident),*) => {
        match $kind {
            $(QKind::$name => {
                type $k = $t;
                $body
            })*
            other => unreachable!("{other:?} is not held split: checked by the wrappers"),
        }
    };
}

/// Raw views of a split (32-value kind's) matrix's blocks.
struct Blocks<K: Split> {
    kind: std::marker::PhantomData<K>,
    nb: usize,
    qs: *const u8,
    d: *const u16,
    m: *const u16,
}

/// Blocks whose scales are widened at once: a row's are widened [`SCALES`] at a time into a
/// buffer on the stack, before its blocks are (a quarter of an instruction per block, where
/// widening each block's scale and minimum in the loop took six).
const SCALES: usize = 64;

/// The f32 scales (and Q4_1 minimums) of up to [`SCALES`] consecutive blocks of a row.
struct Scales {
    d: [f32; SCALES],
    m: [f32; SCALES],
}

impl Scales {
    fn new() -> Scales {
        Scales {
            d: [0.0; SCALES],
            m: [0.0; SCALES],
        }
    }

    /// Widens the scales (and minimums) of blocks `first..first + n` (`n <= SCALES`).
    ///
    /// # Safety
    /// AVX2 and F16C are available and the blocks exist.
    #[inline(always)]
    unsafe fn load<K: Split>(&mut self, b: &Blocks<K>, first: usize, n: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            widen(b.d.add(first), n, &mut self.d);
            if K::KIND.has_minimum() {
                widen(b.m.add(first), n, &mut self.m);
            }
        }
    }
}

/// `n` f16 values at `src` into `out[..n]`, exactly (F16C, eight at a time).
///
/// # Safety
/// AVX2 and F16C are available, `n <= SCALES` and `src` has `n` values.
#[inline(always)]
unsafe fn widen(src: *const u16, n: usize, out: &mut [f32; SCALES]) {
    // SAFETY: the caller's contract; every store is inside `out`.
    unsafe {
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.add(i).cast());
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        if i < n && n >= 8 {
            // The last eight again, overlapping what is done (the same values).
            let h = _mm_loadu_si128(src.add(n - 8).cast());
            _mm256_storeu_ps(out.as_mut_ptr().add(n - 8), _mm256_cvtph_ps(h));
            return;
        }
        while i < n {
            out[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(*src.add(i)))));
            i += 1;
        }
    }
}

impl<K: Split> Blocks<K> {
    /// Asks the CPU for the quants [`PREFETCH`] bytes ahead of block `blk` of row `row`, for
    /// the gemv. The address may point past the matrix; it is never dereferenced (a prefetch
    /// does not fault), hence `wrapping_add`.
    #[inline(always)]
    fn ask_ahead(&self, row: usize, blk: usize) {
        let ahead = self
            .qs
            .wrapping_add((row * self.nb + blk) * K::KIND.qs_bytes() + PREFETCH);
        // SAFETY: SSE is part of every x86-64 CPU; a prefetch reads nothing and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.cast()) }
    }

    /// # Panics
    /// If `q` is not of a widened kind (the kernels below read its buffers as such).
    fn new(q: &QMatrix) -> Blocks<K> {
        assert!(q.kind().split(), "{:?} is not held split", q.kind());
        let (qs, d, m) = q.raw_parts();
        Blocks {
            kind: std::marker::PhantomData,
            nb: q.cols() / QK,
            qs: qs.as_ptr(),
            d: d.as_ptr(),
            m: m.as_ptr(),
        }
    }
}

/// [`dequantize_rows`](crate::kernels::dequant::dequantize_rows) at `isa` (AVX2 and FMA, or
/// AVX-512).
///
/// # Panics
/// If `isa` is the portable level, as the portable form otherwise.
pub(crate) fn dequantize_rows(isa: Isa, q: &QMatrix, r0: usize, count: usize, out: &mut [f32]) {
    let rows_end = r0.checked_add(count).expect("row range overflows");
    assert!(rows_end <= q.rows(), "dequantize_rows out of range");
    assert_eq!(out.len(), count * q.cols(), "dequantize_rows output length");
    if !q.kind().split() {
        let raw = q.row_blocks(r0..rows_end);
        blocks::dequantize_blocks(isa, q.kind(), raw, out);
        return;
    }
    let out = out.as_mut_ptr();
    // SAFETY: the CPU has `isa` (an `Isa` exists only for levels it has); rows r0..r0 + count
    // exist and `out` holds exactly their values (asserted above), so every block and output
    // offset the kernel forms is in bounds.
    with_split!(q.kind(), K => unsafe {
        let b = Blocks::<K>::new(q);
        match isa.level() {
            Level::Avx2 if isa.halves() => {
                dequantize_rows_halves(&b, r0, count, out)
            }
            Level::Avx2 => dequantize_rows_avx2(&b, r0, count, out),
            Level::Avx512 => dequantize_rows_avx512(&b, r0, count, out),
            Level::Portable => panic!("x86::dequantize_rows needs AVX2 or AVX-512"),
        }
    })
}

/// Asks the CPU to bring rows `r0..r0 + count` of `q` into its caches (their quantized
/// values; the split kinds' scales are small and follow on demand), so that loading them
/// overlaps the work done before they are dequantized. Rows past the end are ignored.
pub(crate) fn prefetch_rows(isa: Isa, q: &QMatrix, r0: usize, count: usize) {
    assert!(isa.is_simd(), "x86::prefetch_rows needs AVX2");
    let end = r0.saturating_add(count).min(q.rows());
    if r0 >= end {
        return;
    }
    prefetch(q.row_blocks(r0..end));
}

/// Asks the CPU to bring every cache line of `bytes` into its caches: a hint, which changes
/// no result.
#[inline]
fn prefetch(bytes: &[u8]) {
    for line in bytes.chunks(64) {
        // SAFETY: SSE is part of every x86-64 CPU; a prefetch reads nothing and cannot fault,
        // and the address is inside `bytes` anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) }
    }
}

/// [`prefetch`] spread over other work: the cache lines of some bytes asked for one at a
/// time ([`LineByLine::one`]), then whatever is left at once ([`LineByLine::rest`]). A burst of
/// a hundred lines or more fills the core's queue of misses, and the prefetches then wait on
/// memory themselves.
pub(crate) struct LineByLine<'a>(std::slice::Chunks<'a, u8>);

impl<'a> LineByLine<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> LineByLine<'a> {
        LineByLine(bytes.chunks(64))
    }

    /// Asks for the next line, if there is one.
    #[inline(always)]
    pub(crate) fn one(&mut self) {
        if let Some(line) = self.0.next() {
            prefetch(line);
        }
    }

    /// Asks for every line not asked for yet.
    pub(crate) fn rest(self) {
        self.0.for_each(prefetch);
    }
}

/// [`gemv`](crate::kernels::dequant::gemv) at `isa` (AVX2 and FMA, or AVX-512).
///
/// # Panics
/// If `isa` is the portable level, as the portable form otherwise.
pub(crate) fn gemv(isa: Isa, q: &QMatrix, r0: usize, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), q.cols(), "gemv input is not the weight's width");
    let rows_end = r0.checked_add(out.len()).expect("row range overflows");
    assert!(rows_end <= q.rows(), "gemv rows out of range");
    if !q.kind().split() {
        let raw = q.row_blocks(r0..rows_end);
        blocks::gemv(isa, q.kind(), raw, x, out);
        return;
    }
    // SAFETY: the CPU has `isa` (an `Isa` exists only for levels it has) and rows
    // r0..r0 + out.len() exist (asserted above); `x`
    // holds nb * QK values.
    with_split!(q.kind(), K => unsafe {
        let b = Blocks::<K>::new(q);
        match isa.level() {
            Level::Avx2 if isa.halves() => {
                gemv_halves(&b, r0, x.as_ptr(), out)
            }
            Level::Avx2 => gemv_avx2(&b, r0, x.as_ptr(), out),
            Level::Avx512 => gemv_avx512(&b, r0, x.as_ptr(), out),
            Level::Portable => panic!("x86::gemv needs AVX2 or AVX-512"),
        }
    })
}

/// The 32 values of block `blk` as four registers of 8, in element order; its scale (and
/// minimum) is `s`'s entry `i`.
///
/// # Safety
/// AVX2 and FMA are available and `blk` is a block of the matrix.
#[inline(always)]
unsafe fn block<K: Split>(
    b: &Blocks<K>,
    s: &Scales,
    i: usize,
    row: usize,
    blk_in_row: usize,
) -> [__m256; 4] {
    // SAFETY: the caller's contract: blk < rows * nb.
    unsafe {
        let p = b.qs.add((row * b.nb + blk_in_row) * K::KIND.qs_bytes());
        let d = _mm256_set1_ps(s.d[i]);
        match K::KIND {
            QKind::Q4_0 => {
                // `q - 8` exactly, then `(q - 8) * d` as the reference multiplies (folding
                // the `- 8 * d` into a fused multiply-add gives +0.0 where it gives -0.0).
                let eight = _mm256_set1_epi32(8);
                nibbles(p).map(|q| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight)), d))
            }
            QKind::Q4_1 => {
                let m = _mm256_set1_ps(s.m[i]);
                // `d * q` is exact (an f16 scale has 11 significant bits, `q < 16` has 4),
                // so the fused multiply-add rounds once, exactly as the multiply (exact)
                // then the add of the reference: the same bits in one instruction.
                nibbles(p).map(|q| _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), m))
            }
            QKind::Q5_0 => {
                // `q - 16` exactly: the low four bits plus the entry of the quarter's eight
                // fifth bits (16 or 0, less 16), then `(q - 16) * d` as the reference
                // multiplies.
                let q = fifth_bits(nibbles(p.add(4)), p, &Q5_0_FIFTH);
                q.map(|q| _mm256_mul_ps(_mm256_cvtepi32_ps(q), d))
            }
            QKind::Q5_1 => {
                let m = _mm256_set1_ps(s.m[i]);
                // `q * d` is exact: one rounding, the addition's.
                let q = fifth_bits(nibbles(p.add(4)), p, &Q5_1_FIFTH);
                q.map(|q| _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m))
            }
            // Q8_0, the last split kind (see `Split`). Two other widenings were slower or
            // level in Gemma 3's decode, whose output matrix is Q8_0 (AMD EPYC, Zen 3, AVX2,
            // 2 threads, December 2026; one process alternating them every two steps after
            // 512 tokens, medians of 200 steps, two runs): each byte shuffled in its 128-bit
            // half to the top of its lane (`q * 2^24`, the scale divided by 2^24) 20.2 and
            // 21.6 ms against 18.7 and 20.7; `q + 0x4B40_0000` taken as an f32 (`1.5 * 2^23
            // + q`) and one fused multiply-subtract of the scale (exact) 18.9 and 21.2.
            _ => {
                let a = _mm_loadu_si128(p.cast());
                let c = _mm_loadu_si128(p.add(16).cast());
                let f = |bytes: __m128i| {
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)))
                };
                [f(a), f(_mm_srli_si128(a, 8)), f(c), f(_mm_srli_si128(c, 8))]
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_rows_avx2<K: Split>(b: &Blocks<K>, r0: usize, count: usize, out: *mut f32) {
    // SAFETY: the callers' bounds checks: rows r0..r0 + count exist and `out` has
    // count * nb * QK values.
    unsafe {
        let mut o = out;
        let mut s = Scales::new();
        for row in r0..r0 + count {
            for c0 in (0..b.nb).step_by(SCALES) {
                let n = SCALES.min(b.nb - c0);
                s.load(b, row * b.nb + c0, n);
                for i in 0..n {
                    for v in block(b, &s, i, row, c0 + i) {
                        _mm256_storeu_ps(o, v);
                        o = o.add(8);
                    }
                }
            }
        }
    }
}

/// [`dequantize_rows_avx2`] in 128-bit registers, a quarter of a block at a time (see
/// [`gemv_halves`]). On the Zen 1 EPYC (quant bench, one thread, 2,048 rows of 640 and 640 of
/// 2,048, two alternated runs): Q8_0 took 0.84-0.91x the time of the 256-bit form, Q4_1
/// 0.96-0.98x, Q4_0 0.98-1.01x. Q5_0 and Q5_1, their fifth bits added from [`HighLanes`] (three
/// alternated runs, both shapes): 0.66-0.69x and 0.71-0.82x the time of the 256-bit form.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_rows_halves<K: Split>(b: &Blocks<K>, r0: usize, count: usize, out: *mut f32) {
    // SAFETY: the callers' bounds checks, as for `dequantize_rows_avx2`.
    unsafe {
        let mut o = out;
        let mut s = Scales::new();
        for row in r0..r0 + count {
            for c0 in (0..b.nb).step_by(SCALES) {
                let n = SCALES.min(b.nb - c0);
                s.load(b, row * b.nb + c0, n);
                for i in 0..n {
                    let p = b.qs.add((row * b.nb + c0 + i) * K::KIND.qs_bytes());
                    let (d, m) = (_mm_set1_ps(s.d[i]), _mm_set1_ps(s.m[i]));
                    let qh = high_bits::<K>(p);
                    for g in 0..4 {
                        let [low, high] = quarter::<K>(p, qh, g, d, m);
                        _mm_storeu_ps(o.add(4 * g), low);
                        _mm_storeu_ps(o.add(16 + 4 * g), high);
                    }
                    o = o.add(QK);
                }
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn dequantize_rows_avx512<K: Split>(b: &Blocks<K>, r0: usize, count: usize, out: *mut f32) {
    // SAFETY: the callers' bounds checks, as for `dequantize_rows_avx2`.
    unsafe {
        let mut o = out;
        let mut s = Scales::new();
        for row in r0..r0 + count {
            for c0 in (0..b.nb).step_by(SCALES) {
                let n = SCALES.min(b.nb - c0);
                s.load(b, row * b.nb + c0, n);
                for i in 0..n {
                    for v in block512(b, &s, i, row, c0 + i) {
                        _mm512_storeu_ps(o, v);
                        o = o.add(16);
                    }
                }
            }
        }
    }
}

/// `$out[j]` for rows `$r0 + j`: `$pair` of rows `[$r0 + j, $r0 + half + j]` into `$out[j]`
/// and `$out[half + j]` (one row from each half), then `$one` of the odd last row if any.
/// A macro, so that the kernels it is given are compiled with the caller's target features.
macro_rules! in_pairs {
    ($out:ident, $r0:ident, |$rows:ident| $pair:expr, |$row:ident| $one:expr) => {{
        let half = $out.len() / 2;
        let (first, second) = $out.split_at_mut(half);
        for (j, (a, b)) in first.iter_mut().zip(second.iter_mut()).enumerate() {
            let $rows = [$r0 + j, $r0 + half + j];
            [*a, *b] = $pair;
        }
        if $out.len() % 2 == 1 {
            let last = $out.len() - 1;
            let $row = $r0 + last;
            $out[last] = $one;
        }
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_avx2<K: Split>(b: &Blocks<K>, r0: usize, x: *const f32, out: &mut [f32]) {
    // SAFETY: the callers' bounds checks: rows r0..r0 + out.len() exist.
    unsafe {
        let mut s = [Scales::new(), Scales::new()];
        in_pairs!(out, r0, |rows| gemv_pair(b, &mut s, rows, x), |row| {
            gemv_row(b, &mut s[0], row, x)
        });
    }
}

/// [`gemv_row`] of two rows at once, each its own chains of multiply-adds in the same order
/// (so each result is that function's, bit for bit), sharing the loads of `x`.
///
/// # Safety
/// As for [`gemv_row`], for both rows.
#[inline(always)]
unsafe fn gemv_pair<K: Split>(
    b: &Blocks<K>,
    s: &mut [Scales; 2],
    rows: [usize; 2],
    x: *const f32,
) -> [f32; 2] {
    // SAFETY: as in `gemv_row`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; 2];
        for c0 in (0..b.nb).step_by(SCALES) {
            let n = SCALES.min(b.nb - c0);
            s[0].load(b, rows[0] * b.nb + c0, n);
            s[1].load(b, rows[1] * b.nb + c0, n);
            for i in 0..n {
                let blk = c0 + i;
                for row in rows {
                    b.ask_ahead(row, blk);
                }
                // Opaque to the optimizer (so the `x` loads stay memory operands, not
                // registers that spill) except for Q4_1, whose loop it otherwise passes
                // through the stack: on an AMD EPYC of the Zen 1 generation (family 23
                // model 1, AVX2, 2 threads) Q4_1's gemv on 2,048 rows of 640 took 163-165 us
                // without it against 185-186 with, on 262,144 rows 20.1-20.9 ms against
                // 21.6-22.3; Q5_0's 219-223 us with it against 229-232 without.
                let xp = if K::KIND == QKind::Q4_1 {
                    x.add(blk * QK)
                } else {
                    std::hint::black_box(x.add(blk * QK))
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let w = block(b, &s[r], i, rows[r], blk);
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp), w[0], acc[0]);
                    acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(8)), w[1], acc[1]);
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(16)), w[2], acc[0]);
                    acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(24)), w[3], acc[1]);
                }
            }
        }
        [reduce(acc[0]), reduce(acc[1])]
    }
}

/// A 5-bit block's 32 high bits (bit `e` is value `e`'s fifth), from its first four bytes
/// at `p`; 0 for the other kinds, which have none.
///
/// # Safety
/// The block's bytes are at `p`.
#[inline(always)]
unsafe fn high_bits<K: Split>(p: *const u8) -> u32 {
    match K::KIND {
        // SAFETY: the caller's contract: a 5-bit block starts with its four bytes of high bits.
        QKind::Q5_0 | QKind::Q5_1 => unsafe { p.cast::<u32>().read_unaligned() },
        _ => 0,
    }
}

/// Fifth bits made `L` i32 lanes to add to their values' low four bits: entry `n`'s lane `i`
/// is bit `i` of `n` times 16, plus an offset (-16 in the tables of Q5_0, whose values are
/// `q - 16`). Indexed by `L` of a block's [`high_bits`] (`N` is 2 to the `L`), an entry is one
/// load that the addition takes as its operand, where spreading the bits over the lanes in
/// registers took four instructions or more per four values.
#[repr(align(64))]
struct FifthBits<const L: usize, const N: usize>([[i32; L]; N]);

impl<const L: usize, const N: usize> FifthBits<L, N> {
    const fn new(offset: i32) -> Self {
        let mut t = [[0; L]; N];
        let mut n = 0;
        while n < N {
            let mut i = 0;
            while i < L {
                t[n][i] = ((n as i32 >> i) & 1) * 16 + offset;
                i += 1;
            }
            n += 1;
        }
        FifthBits(t)
    }
}

/// Four fifth bits as four lanes, for the 128-bit forms.
type HighLanes = FifthBits<4, 16>;

/// [`HighLanes`] for Q5_1: the fifth bits alone.
static Q5_1_HIGH: HighLanes = FifthBits::new(0);
/// [`HighLanes`] for Q5_0: the fifth bits less 16.
static Q5_0_HIGH: HighLanes = FifthBits::new(-16);

/// [`gemv_avx2`] in 128-bit registers, for a CPU that runs each 256-bit operation as two
/// halves ([`Isa::halves`]): each 128-bit instruction is one micro-op there, and a quarter of
/// a block's values is read straight into the lanes it widens (`vpmovsxbd` / `vpmovzxbd` of
/// four bytes in memory), where the 256-bit form widens eight bytes across halves. On an AMD
/// EPYC of the Zen 1 generation (family 23 model 1, one thread, a throwaway loop over pairs of
/// rows of 640 in cache, the same bits) a block of one row took 12.0 cycles against 15.0 for
/// Q8_0 and 14.7 against 16.2 for Q4_1. The quant bench there (two threads, two alternated
/// runs): Gemma 3's Q8_0 output matrix (262,144 rows of 640, streamed) 14.9-15.0 ms against
/// 17.9-18.5; in cache, Q8_0 0.82-0.91x the time, Q4_1 0.84-0.94x, Q4_0 0.90-0.97x; Q5_0
/// 0.85x and Q5_1 0.83x (three alternated runs, both shapes; 0.91-0.96x with the fifth bits
/// merged by the 256-bit form's byte shuffle and widened from a copy on the stack).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_halves<K: Split>(b: &Blocks<K>, r0: usize, x: *const f32, out: &mut [f32]) {
    // SAFETY: the callers' bounds checks: rows r0..r0 + out.len() exist.
    unsafe {
        let mut s = [Scales::new(), Scales::new()];
        in_pairs!(out, r0, |rows| gemv_pair128(b, &mut s, rows, x), |row| {
            gemv_row(b, &mut s[0], row, x)
        });
    }
}

/// [`gemv_pair`] in 128-bit registers: row `r`'s 256-bit accumulator `c` is `acc[r][c]`, its
/// low and high four lanes. Quarter `g` of a block (its values from `4g` and from `16 + 4g`,
/// four each) goes to chain `g / 2`, half `g % 2`: each lane takes the same values in the
/// same order as in [`gemv_row`], so the sums are its sums, bit for bit.
///
/// # Safety
/// As for [`gemv_row`], for both rows.
#[inline(always)]
unsafe fn gemv_pair128<K: Split>(
    b: &Blocks<K>,
    s: &mut [Scales; 2],
    rows: [usize; 2],
    x: *const f32,
) -> [f32; 2] {
    // SAFETY: as in `gemv_row`.
    unsafe {
        let mut acc = [[[_mm_setzero_ps(); 2]; 2]; 2];
        for c0 in (0..b.nb).step_by(SCALES) {
            let n = SCALES.min(b.nb - c0);
            s[0].load(b, rows[0] * b.nb + c0, n);
            s[1].load(b, rows[1] * b.nb + c0, n);
            for i in 0..n {
                let blk = c0 + i;
                for row in rows {
                    b.ask_ahead(row, blk);
                }
                // Opaque to the optimizer, as in `gemv_row`.
                let xp = std::hint::black_box(x.add(blk * QK));
                let at = |row: usize| (row * b.nb + blk) * K::KIND.qs_bytes();
                let p = [b.qs.add(at(rows[0])), b.qs.add(at(rows[1]))];
                let qh = [high_bits::<K>(p[0]), high_bits::<K>(p[1])];
                let d = [_mm_set1_ps(s[0].d[i]), _mm_set1_ps(s[1].d[i])];
                let m = [_mm_set1_ps(s[0].m[i]), _mm_set1_ps(s[1].m[i])];
                for g in 0..4 {
                    let (low, high) = (
                        _mm_loadu_ps(xp.add(4 * g)),
                        _mm_loadu_ps(xp.add(16 + 4 * g)),
                    );
                    for r in 0..2 {
                        let [wl, wh] = quarter::<K>(p[r], qh[r], g, d[r], m[r]);
                        let acc = &mut acc[r][g / 2][g % 2];
                        *acc = _mm_fmadd_ps(low, wl, *acc);
                        *acc = _mm_fmadd_ps(high, wh, *acc);
                    }
                }
            }
        }
        let mut sums = [0.0; 2];
        for (sum, [c0, c1]) in sums.iter_mut().zip(acc) {
            *sum = reduce([_mm256_set_m128(c0[1], c0[0]), _mm256_set_m128(c1[1], c1[0])]);
        }
        sums
    }
}

/// Values `4g..4g + 4` and `16 + 4g..16 + 4g + 4` of the block whose bytes are at `p` (its
/// [`high_bits`] `qh`, scale `d`, minimum `m`), exactly as [`block`] computes them.
///
/// # Safety
/// AVX2 and FMA are available, `g < 4` and the block's bytes are at `p`.
#[inline(always)]
unsafe fn quarter<K: Split>(p: *const u8, qh: u32, g: usize, d: __m128, m: __m128) -> [__m128; 2] {
    // SAFETY: the caller's contract: the four bytes read are inside the block.
    unsafe {
        let four = |at: usize| _mm_cvtsi32_si128(p.add(at).cast::<i32>().read_unaligned());
        match K::KIND {
            QKind::Q8_0 => {
                let f = |at: usize| _mm_mul_ps(d, _mm_cvtepi32_ps(_mm_cvtepi8_epi32(four(at))));
                [f(4 * g), f(16 + 4 * g)]
            }
            kind => {
                // Q4_0, Q4_1, Q5_0 or Q5_1: byte j of the nibbles (after a 5-bit block's four
                // bytes of high bits) holds value j in its low nibble and 16 + j in its high.
                let five = matches!(kind, QKind::Q5_0 | QKind::Q5_1);
                let q = _mm_cvtepu8_epi32(four(if five { 4 } else { 0 } + 4 * g));
                let (low, high) = (
                    _mm_and_si128(q, _mm_set1_epi32(0x0F)),
                    _mm_srli_epi32::<4>(q),
                );
                // Each value's offset, exactly, in i32 lanes: Q4_0's - 8; a 5-bit value's
                // fifth bit (and Q5_0's - 16) from its four bits of `qh`.
                let [low, high] = match kind {
                    QKind::Q4_0 => [low, high].map(|q| _mm_sub_epi32(q, _mm_set1_epi32(8))),
                    QKind::Q5_0 | QKind::Q5_1 => {
                        let table = if kind == QKind::Q5_0 {
                            &Q5_0_HIGH
                        } else {
                            &Q5_1_HIGH
                        };
                        let lanes = |shift: usize| {
                            let n = (qh >> shift) as usize & 15;
                            _mm_load_si128(table.0[n].as_ptr().cast())
                        };
                        [
                            _mm_add_epi32(low, lanes(4 * g)),
                            _mm_add_epi32(high, lanes(16 + 4 * g)),
                        ]
                    }
                    _ => [low, high],
                };
                [low, high].map(|q| {
                    if kind.has_minimum() {
                        // `d * q` is exact: one rounding, the addition's.
                        _mm_fmadd_ps(d, _mm_cvtepi32_ps(q), m)
                    } else {
                        // `(q - 8) * d` or `(q - 16) * d`, as the reference multiplies.
                        _mm_mul_ps(_mm_cvtepi32_ps(q), d)
                    }
                })
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn gemv_avx512<K: Split>(b: &Blocks<K>, r0: usize, x: *const f32, out: &mut [f32]) {
    // SAFETY: the callers' bounds checks: rows r0..r0 + out.len() exist.
    unsafe {
        let mut s = [Scales::new(), Scales::new()];
        in_pairs!(out, r0, |rows| gemv_pair512(b, &mut s, rows, x), |row| {
            gemv_row512(b, &mut s[0], row, x)
        });
    }
}

/// [`gemv_row512`] of two rows at once, each its own chain of multiply-adds in the same order
/// (so each result is that function's, bit for bit), sharing the loads of `x`.
///
/// # Safety
/// As for [`gemv_row512`], for both rows.
#[inline(always)]
unsafe fn gemv_pair512<K: Split>(
    b: &Blocks<K>,
    s: &mut [Scales; 2],
    rows: [usize; 2],
    x: *const f32,
) -> [f32; 2] {
    // SAFETY: as in `gemv_row`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 2];
        for c0 in (0..b.nb).step_by(SCALES) {
            let n = SCALES.min(b.nb - c0);
            s[0].load(b, rows[0] * b.nb + c0, n);
            s[1].load(b, rows[1] * b.nb + c0, n);
            for i in 0..n {
                let blk = c0 + i;
                for row in rows {
                    b.ask_ahead(row, blk);
                }
                let xp = x.add(blk * QK);
                let w0 = block512(b, &s[0], i, rows[0], blk);
                let w1 = block512(b, &s[1], i, rows[1], blk);
                let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
                acc[0] = _mm512_fmadd_ps(x0, w0[0], acc[0]);
                acc[1] = _mm512_fmadd_ps(x0, w1[0], acc[1]);
                acc[0] = _mm512_fmadd_ps(x1, w0[1], acc[0]);
                acc[1] = _mm512_fmadd_ps(x1, w1[1], acc[1]);
            }
        }
        [reduce512(acc[0]), reduce512(acc[1])]
    }
}

/// [`block`] as two AVX-512 registers: values 0..16 and 16..32.
///
/// # Safety
/// AVX-512F is available and `blk` is a block of the matrix.
#[inline(always)]
unsafe fn block512<K: Split>(
    b: &Blocks<K>,
    s: &Scales,
    i: usize,
    row: usize,
    blk_in_row: usize,
) -> [__m512; 2] {
    // SAFETY: the caller's contract, as for `block`.
    unsafe {
        let p = b.qs.add((row * b.nb + blk_in_row) * K::KIND.qs_bytes());
        let d = _mm512_set1_ps(s.d[i]);
        let iota = blocks::iota16();
        match K::KIND {
            QKind::Q4_0 | QKind::Q4_1 => {
                // The block's sixteen possible values, `(q - 8) * d` for q = 0..16 (`q - 8`
                // is exact in f32) or `d * q + m` (exact to fuse, as in `block`), each value
                // then picked by its nibble: byte `j` widened is value `j`'s index and,
                // shifted right by four, value `16 + j`'s.
                let table = if K::KIND == QKind::Q4_0 {
                    _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.0)), d)
                } else {
                    _mm512_fmadd_ps(d, iota, _mm512_set1_ps(s.m[i]))
                };
                let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
                [
                    blocks::pick16(idx, table),
                    blocks::pick16(_mm512_srli_epi32::<4>(idx), table),
                ]
            }
            QKind::Q5_0 | QKind::Q5_1 => {
                // The 32 possible values, `(q - 16) * d` for q = 0..32 (`q - 16` is exact in
                // f32) or `q * d + m` (exact to fuse), picked by quant.
                let sixteen = _mm512_set1_ps(16.0);
                let (lo, hi) = if K::KIND == QKind::Q5_0 {
                    (
                        _mm512_mul_ps(_mm512_sub_ps(iota, sixteen), d),
                        _mm512_mul_ps(iota, d),
                    )
                } else {
                    let m = _mm512_set1_ps(s.m[i]);
                    (
                        _mm512_fmadd_ps(iota, d, m),
                        _mm512_fmadd_ps(_mm512_add_ps(iota, sixteen), d, m),
                    )
                };
                let [q0, q1] = q5_indices512(p.add(4), p);
                [pick32(q0, lo, hi), pick32(q1, lo, hi)]
            }
            // Q8_0, as in `block`.
            _ => {
                let f = |bytes: __m128i| {
                    _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)))
                };
                [
                    f(_mm_loadu_si128(p.cast())),
                    f(_mm_loadu_si128(p.add(16).cast())),
                ]
            }
        }
    }
}

/// [`gemv_row`] with AVX-512: the 16 lanes are one register; a block's first 16 values are
/// one chunk and its last 16 the next, as there.
///
/// # Safety
/// AVX-512F is available, row `row` exists and `x` has `nb * QK` values.
#[inline(always)]
unsafe fn gemv_row512<K: Split>(b: &Blocks<K>, s: &mut Scales, row: usize, x: *const f32) -> f32 {
    // SAFETY: as in `gemv_row`.
    unsafe {
        let mut acc = _mm512_setzero_ps();
        for c0 in (0..b.nb).step_by(SCALES) {
            let n = SCALES.min(b.nb - c0);
            s.load(b, row * b.nb + c0, n);
            for i in 0..n {
                let blk = c0 + i;
                b.ask_ahead(row, blk);
                let xp = x.add(blk * QK);
                let w = block512(b, s, i, row, blk);
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(xp), w[0], acc);
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(16)), w[1], acc);
            }
        }
        reduce512(acc)
    }
}

/// The dot product of `x` with row `row`, in the 16-lane order of `kernels::dot`: lanes
/// 0..8 and 8..16 are two registers, a block's first 16 values are one chunk and its last
/// 16 the next.
///
/// A call's rows go two at a time ([`gemv_pair`]), one from each half of them: two streams
/// a half apart, each with its own prefetch. One row's lanes are chains of FMAs, each
/// waiting on the last, which held one row to about 16 values per FMA latency; two
/// independent rows overlap. Measured on a Zen 4 (2 threads, Gemma 3's output matrix of
/// 262,144 rows of 640, streamed): Q8_0 5.3-5.8 ms against 7.1-7.3 one row at a time at
/// AVX-512, 5.8 against 7.5 at AVX2. Rows side by side did worse before: four adjacent rows
/// (sharing the `x` loads) took 2x as long on the 49,152-row output head, and two adjacent
/// ones (on a Zen 5) made Q8_0 2x slower, their streams one row apart.
///
/// # Safety
/// AVX2 and FMA are available, row `row` exists and `x` has `nb * QK` values.
#[inline(always)]
unsafe fn gemv_row<K: Split>(b: &Blocks<K>, s: &mut Scales, row: usize, x: *const f32) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 2];
        for c0 in (0..b.nb).step_by(SCALES) {
            let n = SCALES.min(b.nb - c0);
            s.load(b, row * b.nb + c0, n);
            for i in 0..n {
                let blk = c0 + i;
                b.ask_ahead(row, blk);
                // Opaque to the optimizer so the x loads stay memory operands of the
                // multiplies (hoisted into registers, they made a multi-row kernel spill).
                let xp = std::hint::black_box(x.add(blk * QK));
                let w = block(b, s, i, row, blk);
                let xs = [
                    _mm256_loadu_ps(xp),
                    _mm256_loadu_ps(xp.add(8)),
                    _mm256_loadu_ps(xp.add(16)),
                    _mm256_loadu_ps(xp.add(24)),
                ];
                acc[0] = _mm256_fmadd_ps(xs[0], w[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(xs[1], w[1], acc[1]);
                acc[0] = _mm256_fmadd_ps(xs[2], w[2], acc[0]);
                acc[1] = _mm256_fmadd_ps(xs[3], w[3], acc[1]);
            }
        }
        reduce(acc)
    }
}

/// The 32 quants of a 4-bit block's 16 bytes at `p` (low nibbles first, then high) as four
/// registers of eight i32 lanes, in element order.
///
/// The bytes are loaded into both 128-bit halves and moved into their lanes by a byte
/// shuffle within each half, where widening eight bytes of one 128-bit register to a 256-bit
/// one (`vpmovzxbd`) crosses halves. On an AMD EPYC of the Zen 1 generation (family 23
/// model 1, AVX2, 2 threads; criterion, two alternated runs) dequantizing 2,048 rows of 640
/// took 274-283 us against 309-317 for Q4_1, 282-289 against 303-310 for Q4_0; the decode
/// gemv was level.
///
/// # Safety
/// AVX2 is available and `p..p + 16` is readable.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller's contract.
    unsafe {
        let q = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
        // `first` puts bytes 0..8 into lanes 0..8 (bytes 0..4 from the low half, 4..8 from
        // the high), `second` bytes 8..16; -1 zeroes the other three bytes of each lane.
        let z = -1;
        #[rustfmt::skip]
        let first = _mm256_setr_epi8(
            0, z, z, z, 1, z, z, z, 2, z, z, z, 3, z, z, z,
            4, z, z, z, 5, z, z, z, 6, z, z, z, 7, z, z, z,
        );
        #[rustfmt::skip]
        let second = _mm256_setr_epi8(
            8, z, z, z, 9, z, z, z, 10, z, z, z, 11, z, z, z,
            12, z, z, z, 13, z, z, z, 14, z, z, z, 15, z, z, z,
        );
        let (a, b) = (
            _mm256_shuffle_epi8(q, first),
            _mm256_shuffle_epi8(q, second),
        );
        let mask = _mm256_set1_epi32(0x0F);
        [
            _mm256_and_si256(a, mask),
            _mm256_and_si256(b, mask),
            _mm256_srli_epi32::<4>(a),
            _mm256_srli_epi32::<4>(b),
        ]
    }
}

/// Eight fifth bits as eight lanes, for the 256-bit form, indexed by a byte of a 5-bit
/// block's high bits, which holds the fifth bits of one of [`nibbles`]' registers: building
/// the 32 quants as bytes with ggml's `bytes_from_bits_32` and widening them took about 40%
/// more instructions per block. On an AMD EPYC of the Zen 3 generation (family 25 model 1,
/// AVX2, 2 threads; criterion, two alternated runs on a noisy host) the decode gemv of 2,048
/// rows of 640 then took 0.65-0.71x the time for Q5_0 and 0.64-0.66x for Q5_1, of 640 rows of
/// 2,048 0.73-0.97x and 0.70-0.80x.
type ByteLanes = FifthBits<8, 256>;

/// [`ByteLanes`] for Q5_1: the fifth bits alone.
static Q5_1_FIFTH: ByteLanes = FifthBits::new(0);
/// [`ByteLanes`] for Q5_0: the fifth bits less 16.
static Q5_0_FIFTH: ByteLanes = FifthBits::new(-16);

/// The quants of a 5-bit block whose low four bits are `low` ([`nibbles`]) and whose 32 high
/// bits are at `qh`: register `g` holds values `8g..8g + 8`, whose fifth bits are byte `g` of
/// the high bits.
///
/// # Safety
/// AVX2 is available and `qh..qh + 4` is readable.
#[inline(always)]
unsafe fn fifth_bits(low: [__m256i; 4], qh: *const u8, table: &ByteLanes) -> [__m256i; 4] {
    // SAFETY: the caller's contract; a byte indexes one of the 256 entries.
    unsafe {
        let f = |g: usize| {
            let entry = table.0.get_unchecked(usize::from(*qh.add(g)));
            _mm256_add_epi32(low[g], _mm256_load_si256(entry.as_ptr().cast()))
        };
        [f(0), f(1), f(2), f(3)]
    }
}

/// [`blocks::pick16`] from 32 entries: `lo` for indices 0..16, `hi` for 16..32 (the low five
/// bits of each lane).
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn pick32(idx: __m512i, lo: __m512, hi: __m512) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe { _mm512_permutex2var_ps(lo, idx, hi) }
}

/// A 5-bit block's quants as two vectors of sixteen i32 lanes (values 0..16, 16..32) for
/// [`pick32`], which reads a lane's low five bits only (the bits above are not zero), from
/// its 16 bytes of nibbles at `qs` and its 32 high bits at `qh`.
///
/// Lane j widens byte j of the nibbles (values j and 16 + j) and takes the high bits rotated
/// so that value j's lands in bit 4 (value 16 + j's in bit 8): one rotation and one ternary
/// logic instruction per sixteen values, where setting the bits through a mask took a move to
/// a mask register and a masked or, and two widenings. Q5_0's dequantization (640 rows of
/// 2,048, one thread, an Intel Xeon at AVX-512) took 69.5 us against 81.7.
///
/// # Safety
/// AVX-512F is available, `qs..qs + 16` and `qh..qh + 4` are readable.
#[inline(always)]
unsafe fn q5_indices512(qs: *const u8, qh: *const u8) -> [__m512i; 2] {
    // SAFETY: the caller's contract.
    unsafe {
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.cast()));
        let qh = _mm512_set1_epi32(qh.cast::<i32>().read_unaligned());
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        // Lane j's copy of the high bits rotated left by `by - j` (mod 32).
        let rot = |by: i32| {
            let by = _mm512_and_si512(
                _mm512_sub_epi32(_mm512_set1_epi32(by), lane),
                _mm512_set1_epi32(31),
            );
            _mm512_rolv_epi32(qh, by)
        };
        // Where the constant's bits are set, `bytes`' bits; elsewhere the rotation's.
        let select = |keep: i32, rotated: __m512i| {
            _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi32(keep), bytes, rotated)
        };
        // Value j: bit j to bit 4 (a left rotation by 4 - j); value 16 + j: bit 16 + j to
        // bit 8 (by -8 - j), then the high nibble and that bit shifted down by four.
        [
            select(0x0F, rot(36)),
            _mm512_srli_epi32::<4>(select(0xF0, rot(24))),
        ]
    }
}
