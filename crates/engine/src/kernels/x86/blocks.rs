//! GGUF blocks kept as the file stores them (the K-quants' super-blocks), widened
//! to f32 with AVX2 or AVX-512: into a buffer ([`dequantize_blocks`]) or straight into a dot
//! product with the activations ([`gemv`], decode). Each value is the one `quant::blocks`
//! (ggml's reference) computes, bit for bit: its products are exact (see that module), so
//! `d * q` is the same in any lane, and a minimum after one (`d * q + m`, `dl * q - ml`) fused
//! into one FMA rounds once, as the reference's addition after its exact product does.
//!
//! Each kind is a visitor over one block: it hands out the block's values sixteen at a time,
//! in order, as one AVX-512 register (`*_512`) or two AVX2 registers (`*_256`), every kind in
//! both forms. Storing them dequantizes; multiplying them into sixteen lanes of accumulators
//! as they come is [`dot`](crate::kernels::dot::dot)'s order.

use std::arch::x86_64::*;

use super::{PREFETCH, reduce, reduce512};
use crate::kernels::isa::{Isa, Level};
use crate::kernels::quant::QKind;

/// Widens `raw`, whole GGUF blocks of `kind`, into `out`, bitwise as
/// `quant::blocks::dequantize`, at `isa`.
///
/// # Panics
/// If `isa` is the portable level, `kind` is held split (see `x86::dequant`) or
/// `out` does not hold exactly the blocks' values.
pub(crate) fn dequantize_blocks(isa: Isa, kind: QKind, raw: &[u8], out: &mut [f32]) {
    assert!(!kind.split(), "{kind:?} is held split");
    let n = raw.len() / kind.block_bytes();
    assert!(
        raw.len() == n * kind.block_bytes() && out.len() == n * kind.block_values(),
        "x86::dequantize_blocks: {} bytes are not the blocks of {} values",
        raw.len(),
        out.len()
    );
    let (src, dst) = (raw.as_ptr(), out.as_mut_ptr());
    // SAFETY: the CPU has `isa` (an `Isa` exists only for levels it has; both x86 levels
    // include F16C), and `raw` holds exactly `n` blocks of `kind` whose values fit `out`
    // (checked above), which is all the kernels read and write.
    unsafe {
        match isa.level() {
            Level::Avx512 => dequantize_avx512(kind, src, n, dst),
            Level::Avx2 => dequantize_avx2(kind, src, n, dst),
            Level::Portable => panic!("x86::dequantize_blocks needs AVX2 or AVX-512"),
        }
    }
}

/// `out[j] = dot(x, row j of raw)` for the rows of GGUF blocks of `kind` in `raw` (each
/// `x.len()` values), at `isa`: bitwise what dequantizing them and calling `dot` gives.
///
/// Rows two at a time, one from each half of them (as the split kinds' gemv takes them): two
/// sequential streams, each with a software prefetch ahead, and two chains of multiply-adds that
/// overlap. On an Intel Xeon (family 6 model 167 as its VM reports it, 2 threads, 65,536 rows of
/// 2,048 from memory), pairs took 0.84-0.96x a row at a time's time at AVX-512 (Q2_K the same), and
/// at AVX2 0.8-0.97x for Q4_0, Q4_K, Q5_0, Q5_1 (held here then) and Q6_K but 1.27x for Q2_K and
/// the same for Q3_K and Q5_K, which AVX2 takes a row at a time (sixteen registers hold one row's
/// work, not two). Gemma 3's decode gained 7% at AVX-512 and 9% at AVX2. In cache (640 rows of
/// 2,048) pairs changed nothing at AVX-512 and cost up to 11% at AVX2. An earlier form on a Zen 4,
/// before the scales were read one by one ([`Table16`]), was mixed: Q2_K and Q4_0 0.75-0.9x at
/// AVX-512, Q4_K the same, Q6_K twice as long.
///
/// # Panics
/// If `isa` is the portable level, `kind` is held split, `x` is not whole blocks or `raw`
/// does not hold `out.len()` rows of them.
pub(crate) fn gemv(isa: Isa, kind: QKind, raw: &[u8], x: &[f32], out: &mut [f32]) {
    assert!(!kind.split(), "{kind:?} is held split");
    let nb = x.len() / kind.block_values();
    assert!(
        x.len() == nb * kind.block_values() && raw.len() == out.len() * nb * kind.block_bytes(),
        "x86::gemv: {} bytes are not {} rows of {} values",
        raw.len(),
        out.len(),
        x.len()
    );
    // SAFETY: as in `dequantize_blocks`; row `j` is `raw[j * row..(j + 1) * row]` with
    // `row = nb * block_bytes`, `nb` blocks against `x`'s `nb * block_values` values (checked).
    unsafe {
        match isa.level() {
            Level::Avx512 => gemv_avx512(kind, raw.as_ptr(), nb, x.as_ptr(), out),
            Level::Avx2 => gemv_avx2(kind, raw.as_ptr(), nb, x.as_ptr(), out),
            Level::Portable => panic!("x86::gemv needs AVX2 or AVX-512"),
        }
    }
}

/// `$then!(visitor, lanes, block bytes, block values, $args...)` for `$kind`'s visitor at
/// `$level` (`avx512` or `avx2`), `lanes` the type of the sixteen values it hands out: macros,
/// because each visitor is generic over the closure it is handed.
macro_rules! each_kind {
    ($kind:expr, avx512, $then:ident!($($args:tt)*)) => {
        match $kind {
            QKind::Q2K => $then!(q2_k_512, __m512, 84, 256, $($args)*),
            QKind::Q3K => $then!(q3_k_512, __m512, 110, 256, $($args)*),
            QKind::Q4K => $then!(q4_k_512, __m512, 144, 256, $($args)*),
            QKind::Q5K => $then!(q5_k_512, __m512, 176, 256, $($args)*),
            QKind::Q6K => $then!(q6_k_512, __m512, 210, 256, $($args)*),
            QKind::Q4_0 | QKind::Q4_1 | QKind::Q5_0 | QKind::Q5_1 | QKind::Q8_0 => {
                unreachable!("held split: checked by the wrappers")
            },
        }
    };
    ($kind:expr, avx2, $then:ident!($($args:tt)*)) => {
        match $kind {
            QKind::Q2K => $then!(q2_k_256, V256, 84, 256, $($args)*),
            QKind::Q3K => $then!(q3_k_256, V256, 110, 256, $($args)*),
            QKind::Q4K => $then!(q4_k_256, V256, 144, 256, $($args)*),
            QKind::Q5K => $then!(q5_k_256, V256, 176, 256, $($args)*),
            QKind::Q6K => $then!(q6_k_256, V256, 210, 256, $($args)*),
            QKind::Q4_0 | QKind::Q4_1 | QKind::Q5_0 | QKind::Q5_1 | QKind::Q8_0 => {
                unreachable!("held split: checked by the wrappers")
            },
        }
    };
}

/// Asks the CPU for the cache lines [`PREFETCH`] bytes ahead of the block of `bytes` at `p`,
/// one per 64 bytes of the block, so that a row's stream has every line it reads asked for
/// (the addresses may point past the matrix; a prefetch is never dereferenced and does not
/// fault, hence `wrapping_add`).
///
/// One line a block, as before, left three of a Q6_K block's four lines to the hardware
/// prefetcher, which fell behind: on an Intel Xeon (family 6 model 167 as its VM reports it, 2
/// threads, 32,768 rows of 2,048 from memory) Q6_K's gemv took 3.15 ms against 4.25 at AVX2
/// and 2.75 against 3.5 at AVX-512; Q5_K and Q3_K 0-10% less at AVX-512; Q2_K and Q4_K, and
/// every kind in cache, the same. Decode after 512 tokens (`bench_speed`, builds alternated
/// twice): SmolLM2 requantized to Q4_K_M 120-127 -> 132-136 tok/s at AVX-512 and 99-101 ->
/// 110-112 at AVX2, Gemma 3 270M Q4_K_M 70-71 -> 76-77 at AVX-512 (at AVX2 within noise).
#[inline(always)]
fn ask_ahead(p: *const u8, bytes: usize) {
    let mut at = 0;
    while at < bytes {
        // SAFETY: SSE is part of every x86-64 CPU; a prefetch reads nothing and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + at).cast()) };
        at += 64;
    }
}

/// Stores the values of the `$n` blocks at `$src` to `$dst`.
macro_rules! store_blocks {
    (
        $visit:ident, $lanes:ty, $bytes:literal, $values:literal,
        $src:ident, $n:ident, $dst:ident
    ) => {
        for b in 0..$n {
            let y = $dst.add($values * b);
            $visit($src.add($bytes * b), &mut |off, v: $lanes| {
                v.store(y.add(off))
            });
        }
    };
}

/// `$out[j]` = the dot product of `$x` with row `j` at `$src` (`$nb` blocks), each block's lines
/// asked for ahead ([`ask_ahead`]).
macro_rules! dot_rows {
    (
        $visit:ident, $lanes:ty, $bytes:literal, $values:literal,
        $src:ident, $nb:ident, $x:ident, $out:ident
    ) => {
        for (j, o) in $out.iter_mut().enumerate() {
            let row = $src.add(j * $nb * $bytes);
            let mut acc = <$lanes>::zero();
            for b in 0..$nb {
                let p = row.add($bytes * b);
                ask_ahead(p, $bytes);
                let xb = $x.add($values * b);
                $visit(p, &mut |off, v: $lanes| v.fmadd(xb.add(off), &mut acc));
            }
            *o = <$lanes>::reduce(acc);
        }
    };
}

/// [`dot_rows`] two rows at a time, one from each half of `$out`: each row's chain of
/// multiply-adds as alone, so each result is the same bits, the two chains overlapping.
macro_rules! dot_row_pairs {
    (
        $visit:ident, $lanes:ty, $bytes:literal, $values:literal,
        $src:ident, $nb:ident, $x:ident, $out:ident
    ) => {{
        let half = $out.len() / 2;
        let (first, second) = $out.split_at_mut(half);
        for (j, (a, b)) in first.iter_mut().zip(second.iter_mut()).enumerate() {
            let rows = [
                $src.add(j * $nb * $bytes),
                $src.add((half + j) * $nb * $bytes),
            ];
            let mut acc = [<$lanes>::zero(), <$lanes>::zero()];
            for blk in 0..$nb {
                let xb = $x.add($values * blk);
                for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                    let p = row.add($bytes * blk);
                    ask_ahead(p, $bytes);
                    $visit(p, &mut |off, v: $lanes| v.fmadd(xb.add(off), acc));
                }
            }
            let [r0, r1] = acc;
            [*a, *b] = [<$lanes>::reduce(r0), <$lanes>::reduce(r1)];
        }
        if $out.len() % 2 == 1 {
            let last = $out.len() - 1;
            let row = $src.add(last * $nb * $bytes);
            let odd = &mut $out[last..];
            dot_rows!($visit, $lanes, $bytes, $values, row, $nb, $x, odd);
        }
    }};
}

/// Sixteen values as two AVX2 registers (lanes 0..8, 8..16).
type V256 = [__m256; 2];

/// Sixteen values: one AVX-512 register or two AVX2 ones (lanes 0..8, 8..16).
trait Sixteen: Copy {
    /// Stores the values at `p`.
    ///
    /// # Safety
    /// The vector instructions are available and `p..p + 16` is writable.
    unsafe fn store(self, p: *mut f32);
    /// The accumulators of a dot product, zero.
    type Acc;
    /// # Safety
    /// As for `store`.
    unsafe fn zero() -> Self::Acc;
    /// `acc = fma(x[0..16], self, acc)` lane by lane.
    ///
    /// # Safety
    /// As for `store`, and `x..x + 16` is readable.
    unsafe fn fmadd(self, x: *const f32, acc: &mut Self::Acc);
    /// The dot product's fixed reduction tree.
    ///
    /// # Safety
    /// As for `store`.
    unsafe fn reduce(acc: Self::Acc) -> f32;
}

impl Sixteen for [__m256; 2] {
    type Acc = [__m256; 2];
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe {
            _mm256_storeu_ps(p, self[0]);
            _mm256_storeu_ps(p.add(8), self[1]);
        }
    }
    #[inline(always)]
    unsafe fn zero() -> [__m256; 2] {
        // SAFETY: the caller's contract.
        unsafe { [_mm256_setzero_ps(); 2] }
    }
    #[inline(always)]
    unsafe fn fmadd(self, x: *const f32, acc: &mut [__m256; 2]) {
        // SAFETY: the caller's contract.
        unsafe {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x), self[0], acc[0]);
            acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8)), self[1], acc[1]);
        }
    }
    #[inline(always)]
    unsafe fn reduce(acc: [__m256; 2]) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { reduce(acc) }
    }
}

impl Sixteen for __m512 {
    type Acc = __m512;
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { _mm512_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn fmadd(self, x: *const f32, acc: &mut __m512) {
        // SAFETY: the caller's contract.
        unsafe { *acc = _mm512_fmadd_ps(_mm512_loadu_ps(x), self, *acc) }
    }
    #[inline(always)]
    unsafe fn reduce(acc: __m512) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { reduce512(acc) }
    }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn dequantize_avx512(kind: QKind, src: *const u8, n: usize, dst: *mut f32) {
    // SAFETY: the caller's contract (see `dequantize_blocks`): block `b` is
    // `src[b * bytes..]`, its values `dst[b * values..]`, and a visitor hands out offsets
    // below `values`.
    unsafe { each_kind!(kind, avx512, store_blocks!(src, n, dst)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_avx2(kind: QKind, src: *const u8, n: usize, dst: *mut f32) {
    // SAFETY: as in `dequantize_avx512`.
    unsafe { each_kind!(kind, avx2, store_blocks!(src, n, dst)) }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn gemv_avx512(kind: QKind, src: *const u8, nb: usize, x: *const f32, out: &mut [f32]) {
    // SAFETY: the caller's contract (see `gemv`): row `j` is `nb` blocks from
    // `src[j * nb * bytes..]`, block `b` against `x[b * values..]`.
    unsafe { each_kind!(kind, avx512, dot_row_pairs!(src, nb, x, out)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_avx2(kind: QKind, src: *const u8, nb: usize, x: *const f32, out: &mut [f32]) {
    // SAFETY: as in `gemv_avx512`.
    unsafe {
        match kind {
            QKind::Q2K | QKind::Q3K | QKind::Q5K => {
                each_kind!(kind, avx2, dot_rows!(src, nb, x, out))
            }
            _ => each_kind!(kind, avx2, dot_row_pairs!(src, nb, x, out)),
        }
    }
}

/// The f16 at `p`, widened.
///
/// # Safety
/// F16C is available and `p..p + 2` is readable.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        let bits = p.cast::<u16>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }
}

/// `d` times each of the eight unsigned bytes in the low half of `bytes`, as eight lanes.
///
/// Every super-block scale is such a product, a 6-bit integer times an f16 (at most 17
/// significant bits): exact, so computing them eight at a time gives the reference's values.
/// (One at a time, a conversion, a multiply and a broadcast each, they took about a fifth of
/// a K-quant gemv.)
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn times_u8(d: f32, bytes: __m128i) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        _mm256_mul_ps(
            _mm256_set1_ps(d),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)),
        )
    }
}

/// [`times_u8`] of signed bytes (exact likewise: at most 8 bits times an f16).
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn times_i8(d: f32, bytes: __m128i) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        _mm256_mul_ps(
            _mm256_set1_ps(d),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
        )
    }
}

/// Sixteen scales from two [`times_u8`]-like halves, kept in memory: each use is one
/// broadcast load. (Left to itself, the compiler kept the scales in registers and took each
/// out with two or three shuffles, which compete with the widening for the shuffle unit:
/// Q3_K's and Q6_K's AVX-512 gemv were 15-20% slower than with scalar scales.)
///
/// # Safety
/// AVX is available.
#[inline(always)]
unsafe fn table16(lo: __m256, hi: __m256) -> Table16 {
    let mut t = [0.0f32; 16];
    // SAFETY: the caller's contract; `t` holds sixteen values.
    unsafe {
        _mm256_storeu_ps(t.as_mut_ptr(), lo);
        _mm256_storeu_ps(t.as_mut_ptr().add(8), hi);
    }
    Table16(t)
}

/// A super-block's sixteen scales in memory, each read by a broadcast load of its own four
/// bytes, in assembly.
///
/// Read as an array, the compiler merged two neighbouring scales into one 8-byte load at
/// offset 4 of the 32-byte store that had just written them. On an Intel Xeon (family 6
/// model 167 as its VM reports it) that load waited each super-block: a fifth of Q4_K's
/// AVX-512 gemv samples sat on the instruction after it, and Q3_K, Q4_K and Q6_K took 1.8-2.8x
/// Q4_1's time there against 1.0-1.2x on AMD's Zen 4 and 5. With a volatile read per scale
/// (which cannot be merged) the K-quants' gemv took 0.5-0.8x its time on that Xeon at
/// AVX-512, and Q2_K, Q5_K and Q6_K 0.46-0.88x at AVX2 (Q3_K and Q4_K there the same); their
/// dequantization was unchanged. The compiler broadcast each volatile read with the shuffle
/// unit, which the widening needs; a broadcast from memory is a load alone. On that Xeon
/// (one thread, 640 rows of 2,048, 16 alternated runs, medians) Q2_K's AVX-512 gemv, two
/// broadcasts per 16 values, took 0.92x the time (Q4_1's, unchanged code, 0.96x: the builds
/// differ by that much), Q3_K, Q4_K and Q5_K 0.97-0.99x.
struct Table16([f32; 16]);

impl Table16 {
    /// Scale `i`.
    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        // SAFETY: `i < 16` (the index is checked), and the array is initialised and aligned.
        unsafe { std::ptr::read_volatile(&raw const self.0[i]) }
    }

    /// Scale `i` in each of sixteen lanes, by one broadcast load.
    ///
    /// # Safety
    /// AVX-512F is available.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn splat512(&self, i: usize) -> __m512 {
        let at = &self.0[i];
        let v: __m512;
        // SAFETY: the caller's contract; `at` is a readable f32.
        unsafe {
            std::arch::asm!(
                "vbroadcastss {v}, dword ptr [{at}]",
                v = out(zmm_reg) v,
                at = in(reg) at,
                options(nostack, readonly, pure, preserves_flags),
            );
        }
        v
    }
}

/// Bytes `8 * i .. 8 * i + 8` of `v` (unsigned) as eight i32 lanes.
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn widen8(v: __m256i, i: usize) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_cvtepu8_epi32(octet(v, i)) }
}

/// Bytes `8 * i .. 8 * i + 8` of `v` (signed) as eight i32 lanes.
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn widen8_signed(v: __m256i, i: usize) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_cvtepi8_epi32(octet(v, i)) }
}

/// Bytes `8 * i .. 8 * i + 8` of `v` in the low half of a 128-bit register.
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn octet(v: __m256i, i: usize) -> __m128i {
    // SAFETY: the caller's contract.
    unsafe {
        let half = match i / 2 {
            0 => _mm256_castsi256_si128(v),
            _ => _mm256_extracti128_si256::<1>(v),
        };
        match i % 2 {
            0 => half,
            _ => _mm_srli_si128::<8>(half),
        }
    }
}

/// Bytes `16 * i .. 16 * i + 16` of `v` (unsigned) as sixteen i32 lanes.
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn widen16(v: __m256i, i: usize) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        let half = match i {
            0 => _mm256_castsi256_si128(v),
            _ => _mm256_extracti128_si256::<1>(v),
        };
        _mm512_cvtepu8_epi32(half)
    }
}

/// Bytes `16 * i .. 16 * i + 16` of `v` (signed) as sixteen i32 lanes.
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn widen16_signed(v: __m256i, i: usize) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        let half = match i {
            0 => _mm256_castsi256_si128(v),
            _ => _mm256_extracti128_si256::<1>(v),
        };
        _mm512_cvtepi8_epi32(half)
    }
}

/// 0.0, 1.0, .., 15.0: the quants a table of a block's values is computed from.
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
pub(super) unsafe fn iota16() -> __m512 {
    // SAFETY: the caller's contract.
    unsafe {
        _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        )
    }
}

/// Each 32-bit lane of `idx` replaced by `table`'s entry at its low four bits (the lane's
/// other bits are ignored, so the widened byte of two packed nibbles picks by its low one).
///
/// Widening a quant to f32 and scaling it, value by value, took two more instructions per
/// sixteen values than scaling the sixteen quants a block can hold once and picking from
/// them; each entry is computed from its quant exactly as the value was, so the values are
/// the same bits.
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
pub(super) unsafe fn pick16(idx: __m512i, table: __m512) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe { _mm512_permutexvar_ps(idx, table) }
}

/// The low and high nibbles of the 32 bytes at `p`.
///
/// # Safety
/// AVX2 is available and `p..p + 32` is readable.
#[inline(always)]
unsafe fn nibbles32(p: *const u8) -> (__m256i, __m256i) {
    // SAFETY: the caller's contract.
    unsafe {
        let (q, mask) = (_mm256_loadu_si256(p.cast()), _mm256_set1_epi8(0x0F));
        (
            _mm256_and_si256(q, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
        )
    }
}

/// 0x10 in each byte of 32 whose bit `bit` of `qh` is set, else 0: the fifth bits of a Q5_K
/// quarter's values, from its 32 bytes of high bits.
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn fifth_bits(qh: __m256i, bit: u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
        let m = _mm256_set1_epi8(bit as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }
}

// ---------------------------------------------------------------------------------------------
// Q2_K: x = d * sc * q - dmin * m per 16 values.
// ---------------------------------------------------------------------------------------------

/// `v`'s 16-bit lanes shifted right by `2 * j` bits.
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn shift_pairs(v: __m256i, j: usize) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
        match j {
            0 => v,
            1 => _mm256_srli_epi16::<2>(v),
            2 => _mm256_srli_epi16::<4>(v),
            _ => _mm256_srli_epi16::<6>(v),
        }
    }
}

/// Hands each run of 32 values of the Q2_K super-block at `p` to `visit(at, q, sub, dl, ml)`:
/// their offset, their quants as 32 bytes (0..4), and where their two 16-value halves' scales
/// are: `d * sc` at `dl[sub]` and `dl[sub + 1]`, `dmin * m` at `ml[sub]` and `ml[sub + 1]`.
///
/// # Safety
/// AVX2 and F16C are available and the 84-byte block at `p` is readable.
#[inline(always)]
unsafe fn q2_k_runs(
    p: *const u8,
    mut visit: impl FnMut(usize, __m256i, usize, &Table16, &Table16),
) {
    // SAFETY: the caller's contract: scales at 0..16, quants at 16..80, d and dmin at 80..84.
    unsafe {
        let (d, min) = (f16_at(p.add(80)), f16_at(p.add(82)));
        // Each scale byte is `m << 4 | sc`: `d * sc` of all sixteen, then `dmin * m`.
        let packed = _mm_loadu_si128(p.cast());
        let mask = _mm_set1_epi8(0x0F);
        let (sc, m) = (
            _mm_and_si128(packed, mask),
            _mm_and_si128(_mm_srli_epi16::<4>(packed), mask),
        );
        let dl = table16(times_u8(d, sc), times_u8(d, _mm_srli_si128::<8>(sc)));
        let ml = table16(times_u8(min, m), times_u8(min, _mm_srli_si128::<8>(m)));
        let three = _mm256_set1_epi8(3);
        for n in 0..2 {
            let q = _mm256_loadu_si256(p.add(16 + 32 * n).cast());
            for j in 0..4 {
                // Each byte's bits 2j..2j + 2 (16-bit shifts bring in the next byte's bits,
                // above the mask).
                let v = _mm256_and_si256(shift_pairs(q, j), three);
                visit(128 * n + 32 * j, v, 8 * n + 2 * j, &dl, &ml);
            }
        }
    }
}

/// # Safety
/// AVX2, FMA and F16C are available and the 84-byte block at `p` is readable.
#[inline(always)]
unsafe fn q2_k_256(p: *const u8, emit: &mut impl FnMut(usize, [__m256; 2])) {
    // SAFETY: the caller's contract.
    unsafe {
        q2_k_runs(p, |at, v, sub, dl, ml| {
            for half in 0..2 {
                let (dl, ml) = (
                    _mm256_set1_ps(dl.get(sub + half)),
                    _mm256_set1_ps(ml.get(sub + half)),
                );
                // `dl * q` is exact: one rounding, the subtraction's.
                let f =
                    |i: usize| _mm256_fmsub_ps(dl, _mm256_cvtepi32_ps(widen8(v, 2 * half + i)), ml);
                emit(at + 16 * half, [f(0), f(1)]);
            }
        })
    }
}

/// # Safety
/// AVX-512F, FMA and F16C are available and the 84-byte block at `p` is readable.
#[inline(always)]
unsafe fn q2_k_512(p: *const u8, emit: &mut impl FnMut(usize, __m512)) {
    // SAFETY: the caller's contract.
    unsafe {
        q2_k_runs(p, |at, v, sub, dl, ml| {
            for half in 0..2 {
                let x = _mm512_cvtepi32_ps(widen16(v, half));
                // Exact to fuse, as at AVX2.
                let (dl, ml) = (dl.splat512(sub + half), ml.splat512(sub + half));
                emit(at + 16 * half, _mm512_fmsub_ps(dl, x, ml));
            }
        })
    }
}

/// Emits a run of 32 values from offset `at` that are a scale times a signed quant (Q3_K's and
/// Q6_K's): the 32 quants `q` (signed bytes), the first 16 times `scales[sub]`, the last 16
/// times `scales[sub + 1]`, as two AVX2 registers each. Both products are exact, as in the
/// reference.
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn scaled_run_256(
    at: usize,
    q: __m256i,
    sub: usize,
    scales: &Table16,
    emit: &mut impl FnMut(usize, [__m256; 2]),
) {
    // SAFETY: the caller's contract.
    unsafe {
        for half in 0..2 {
            let s = _mm256_set1_ps(scales.get(sub + half));
            let f = |i: usize| _mm256_mul_ps(s, _mm256_cvtepi32_ps(widen8_signed(q, 2 * half + i)));
            emit(at + 16 * half, [f(0), f(1)]);
        }
    }
}

/// [`scaled_run_256`] as AVX-512 registers, each scale broadcast from memory
/// ([`Table16::splat512`]).
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn scaled_run_512(
    at: usize,
    q: __m256i,
    sub: usize,
    scales: &Table16,
    emit: &mut impl FnMut(usize, __m512),
) {
    // SAFETY: the caller's contract.
    unsafe {
        for half in 0..2 {
            let x = _mm512_cvtepi32_ps(widen16_signed(q, half));
            emit(
                at + 16 * half,
                _mm512_mul_ps(scales.splat512(sub + half), x),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q3_K: x = d * (sc - 32) * (q - 4 * !high) per 16 values.
// ---------------------------------------------------------------------------------------------

/// Hands each run of 32 values of the Q3_K super-block at `p` to `visit(at, q, sub, dl)`:
/// their offset, their quants as 32 signed bytes (-4..4, the high bit applied), and where
/// their two 16-value halves' `d * (sc - 32)` are: `dl[sub]` and `dl[sub + 1]`.
///
/// # Safety
/// AVX2 and F16C are available and the 110-byte block at `p` is readable.
#[inline(always)]
unsafe fn q3_k_runs(p: *const u8, mut visit: impl FnMut(usize, __m256i, usize, &Table16)) {
    // SAFETY: the caller's contract: high bits at 0..32, quants at 32..96, scales at
    // 96..108, d at 108..110.
    unsafe {
        let d_all = f16_at(p.add(108));
        // `d * (sc - 32)` of all sixteen (sc - 32 fits a signed byte).
        let scales = q3_k_scales(std::slice::from_raw_parts(p.add(96), 12));
        let sc = _mm_sub_epi8(scales, _mm_set1_epi8(32));
        let dl = table16(
            times_i8(d_all, sc),
            times_i8(d_all, _mm_srli_si128::<8>(sc)),
        );
        let hm = _mm256_loadu_si256(p.cast());
        let (three, four) = (_mm256_set1_epi8(3), _mm256_set1_epi8(4));
        for n in 0..2 {
            let q = _mm256_loadu_si256(p.add(32 + 32 * n).cast());
            for j in 0..4 {
                let low = _mm256_and_si256(shift_pairs(q, j), three);
                // 4 where the value's high bit (bit 4n + j of its hmask byte) is clear.
                let m = _mm256_set1_epi8((1u8 << (4 * n + j)) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, m), m);
                let v = _mm256_sub_epi8(low, _mm256_andnot_si256(set, four));
                visit(128 * n + 32 * j, v, 8 * n + 2 * j, &dl);
            }
        }
    }
}

/// # Safety
/// AVX2 and F16C are available and the 110-byte block at `p` is readable.
#[inline(always)]
unsafe fn q3_k_256(p: *const u8, emit: &mut impl FnMut(usize, [__m256; 2])) {
    // SAFETY: the caller's contract.
    unsafe { q3_k_runs(p, |at, q, sub, dl| scaled_run_256(at, q, sub, dl, emit)) }
}

/// # Safety
/// AVX-512F and F16C are available and the 110-byte block at `p` is readable.
#[inline(always)]
unsafe fn q3_k_512(p: *const u8, emit: &mut impl FnMut(usize, __m512)) {
    // SAFETY: the caller's contract.
    unsafe { q3_k_runs(p, |at, q, sub, dl| scaled_run_512(at, q, sub, dl, emit)) }
}

/// A Q3_K super-block's sixteen 6-bit scales (still offset by 32) from their 12 packed bytes,
/// as the reference unpacks them, in the bytes of a register built from four words (as an
/// array of bytes, they went into the register one byte at a time).
///
/// # Safety
/// SSE2 is available.
#[inline(always)]
unsafe fn q3_k_scales(packed: &[u8]) -> __m128i {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let word =
        |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (a0, a1, tmp) = (word(0), word(4), word(8));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let [a, b, c, d] = aux.map(|w| w as i32);
    // SAFETY: the caller's contract.
    unsafe { _mm_set_epi32(d, c, b, a) }
}

// ---------------------------------------------------------------------------------------------
// Q4_K and Q5_K: x = d * sc * q - dmin * m per 32 values.
// ---------------------------------------------------------------------------------------------

/// `d * sc` of the eight sub-blocks of a Q4_K or Q5_K super-block at `p`, then `dmin * m`:
/// the reference's values (`scale_min_k4`'s unpacking, done four bytes at a time as ggml's
/// `utmp` does it).
///
/// # Safety
/// AVX2 and F16C are available and bytes 0..16 of the block at `p` are readable.
#[inline(always)]
unsafe fn k4_table(p: *const u8) -> Table16 {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    // SAFETY: the caller's contract: d and dmin at 0..4, the packed scales at 4..16.
    unsafe {
        let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
        let word = |i: usize| p.add(4 + 4 * i).cast::<u32>().read_unaligned();
        let (a, b, c) = (word(0), word(1), word(2));
        // Sub-blocks 0..4 keep their six bits in bytes 0..4 (scales) and 4..8 (minimums);
        // 4..8 have their low four in the nibbles of bytes 8..12 and their top two in the
        // top bits of bytes 0..8.
        let sc = [a & LOW6, (c & LOW4) | (((a >> 6) & LOW2) << 4)];
        let m = [b & LOW6, ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4)];
        let bytes = |w: [u32; 2]| _mm_cvtsi64_si128(i64::from(w[0]) | i64::from(w[1]) << 32);
        table16(times_u8(d, bytes(sc)), times_u8(dmin, bytes(m)))
    }
}

/// `[d1, m1, d2, m2]` of quarter `j` (sub-blocks `2j` and `2j + 1`) from [`k4_table`].
#[inline(always)]
fn k4_quarter_scales(t: &Table16, j: usize) -> [f32; 4] {
    [
        t.get(2 * j),
        t.get(8 + 2 * j),
        t.get(2 * j + 1),
        t.get(9 + 2 * j),
    ]
}

/// Emits the 64 values of one quarter: `lo` (32 quants of scale `d1`, minimum `m1`) then `hi`
/// (`d2`, `m2`), from offset `at`.
///
/// # Safety
/// AVX2 and FMA are available.
#[inline(always)]
unsafe fn k4_quarter_256(
    at: usize,
    (lo, hi): (__m256i, __m256i),
    [d1, m1, d2, m2]: [f32; 4],
    emit: &mut impl FnMut(usize, [__m256; 2]),
) {
    // SAFETY: the caller's contract.
    unsafe {
        for (s, (q, dl, ml)) in [(lo, d1, m1), (hi, d2, m2)].into_iter().enumerate() {
            let (dl, ml) = (_mm256_set1_ps(dl), _mm256_set1_ps(ml));
            // `dl * q` is exact: one rounding, the subtraction's.
            let f = |i: usize| _mm256_fmsub_ps(dl, _mm256_cvtepi32_ps(widen8(q, i)), ml);
            emit(at + 32 * s, [f(0), f(1)]);
            emit(at + 32 * s + 16, [f(2), f(3)]);
        }
    }
}

/// # Safety
/// AVX2, FMA and F16C are available and the 144-byte block at `p` is readable.
#[inline(always)]
unsafe fn q4_k_256(p: *const u8, emit: &mut impl FnMut(usize, [__m256; 2])) {
    // SAFETY: the caller's contract: d and dmin at 0..4, scales at 4..16, quants at 16..144.
    unsafe {
        let t = k4_table(p);
        for j in 0..4 {
            let q = nibbles32(p.add(16 + 32 * j));
            k4_quarter_256(64 * j, q, k4_quarter_scales(&t, j), emit);
        }
    }
}

/// Each sub-block's sixteen possible values, `dl * q - ml` for q = 0..16 (exact to fuse, as
/// at AVX2), then each value picked from them by its nibble, as Q4_0's are: byte `i` of a
/// quarter widened is value `i`'s index in the first sub-block and, shifted right by four,
/// in the second.
///
/// On an Intel Xeon (family 6 model 167 as its VM reports it) the gemv took 0.87x its time
/// in cache and 0.85x from memory, dequantizing the same. An earlier form, measured on a Zen
/// 4 by its dequantization alone, was slower there: not yet measured on AMD in this form.
/// Q5_K in the same way (its fifth bit merged into the index by one bitwise select, a
/// two-table permute) took 0.93-0.97x the time of its gemv on that Xeon but 1.05x to
/// dequantize, and was not kept.
///
/// # Safety
/// AVX-512F and F16C are available and the 144-byte block at `p` is readable.
#[inline(always)]
unsafe fn q4_k_512(p: *const u8, emit: &mut impl FnMut(usize, __m512)) {
    // SAFETY: the caller's contract, as for `q4_k_256`.
    unsafe {
        let t = k4_table(p);
        let iota = iota16();
        for j in 0..4 {
            // Sub-block `i`'s table: its scale at `t[i]`, its minimum at `t[8 + i]`.
            let table = |i: usize| _mm512_fmsub_ps(t.splat512(i), iota, t.splat512(8 + i));
            let (lo, hi) = (table(2 * j), table(2 * j + 1));
            let q = p.add(16 + 32 * j);
            let idx = [
                _mm512_cvtepu8_epi32(_mm_loadu_si128(q.cast())),
                _mm512_cvtepu8_epi32(_mm_loadu_si128(q.add(16).cast())),
            ];
            emit(64 * j, pick16(idx[0], lo));
            emit(64 * j + 16, pick16(idx[1], lo));
            emit(64 * j + 32, pick16(_mm512_srli_epi32::<4>(idx[0]), hi));
            emit(64 * j + 48, pick16(_mm512_srli_epi32::<4>(idx[1]), hi));
        }
    }
}

/// [`k4_quarter_256`] in AVX-512 registers, the scales of quarter `j` broadcast from `t`
/// ([`k4_table`]).
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn k4_quarter_512(
    at: usize,
    (lo, hi): (__m256i, __m256i),
    t: &Table16,
    j: usize,
    emit: &mut impl FnMut(usize, __m512),
) {
    // SAFETY: the caller's contract.
    unsafe {
        for (s, q) in [lo, hi].into_iter().enumerate() {
            let (dl, ml) = (t.splat512(2 * j + s), t.splat512(8 + 2 * j + s));
            for i in 0..2 {
                let x = _mm512_cvtepi32_ps(widen16(q, i));
                // Exact to fuse, as at AVX2.
                emit(at + 32 * s + 16 * i, _mm512_fmsub_ps(dl, x, ml));
            }
        }
    }
}

/// # Safety
/// AVX2, FMA and F16C are available and the 176-byte block at `p` is readable.
#[inline(always)]
unsafe fn q5_k_256(p: *const u8, emit: &mut impl FnMut(usize, [__m256; 2])) {
    // SAFETY: the caller's contract: d and dmin at 0..4, scales at 4..16, high bits at
    // 16..48, quants at 48..176.
    unsafe {
        let t = k4_table(p);
        let qh = _mm256_loadu_si256(p.add(16).cast());
        for j in 0..4 {
            let (lo, hi) = nibbles32(p.add(48 + 32 * j));
            let lo = _mm256_or_si256(lo, fifth_bits(qh, 1 << (2 * j)));
            let hi = _mm256_or_si256(hi, fifth_bits(qh, 2 << (2 * j)));
            k4_quarter_256(64 * j, (lo, hi), k4_quarter_scales(&t, j), emit);
        }
    }
}

/// # Safety
/// AVX-512F and F16C are available and the 176-byte block at `p` is readable.
#[inline(always)]
unsafe fn q5_k_512(p: *const u8, emit: &mut impl FnMut(usize, __m512)) {
    // SAFETY: the caller's contract, as for `q5_k_256`.
    unsafe {
        let t = k4_table(p);
        let qh = _mm256_loadu_si256(p.add(16).cast());
        for j in 0..4 {
            let (lo, hi) = nibbles32(p.add(48 + 32 * j));
            let lo = _mm256_or_si256(lo, fifth_bits(qh, 1 << (2 * j)));
            let hi = _mm256_or_si256(hi, fifth_bits(qh, 2 << (2 * j)));
            k4_quarter_512(64 * j, (lo, hi), &t, j, emit);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q6_K: x = d * sc * (q - 32) per 16 values.
// ---------------------------------------------------------------------------------------------

/// Half `h` of a Q6_K super-block at `p` (128 values) as four vectors of 32 six-bit values
/// (0..64): values `32k .. 32k + 32` of the half in vector `k`.
///
/// # Safety
/// AVX2 is available and the block at `p` is readable.
#[inline(always)]
unsafe fn q6_k_quants(p: *const u8, h: usize) -> [__m256i; 4] {
    // SAFETY: the caller's contract: bytes 64h .. 64h + 64 (low nibbles) and
    // 128 + 32h .. 160 + 32h (high bit pairs) of the 210-byte block.
    unsafe {
        let (ql0, ql1) = nibbles32(p.add(64 * h));
        let (ql2, ql3) = nibbles32(p.add(64 * h + 32));
        let qh = _mm256_loadu_si256(p.add(128 + 32 * h).cast());
        let m30 = _mm256_set1_epi8(0x30);
        // Each value's high pair moved to bits 4..6 of its byte (16-bit shifts carry bits
        // across bytes, which the 0x30 mask drops).
        let high = [
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
            _mm256_and_si256(qh, m30),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
        ];
        // Low nibbles: of bytes 0..32 (values 0..32), of 32..64 (32..64), then the high
        // nibbles of each (64..96, 96..128).
        let low = [ql0, ql2, ql1, ql3];
        std::array::from_fn(|k| _mm256_or_si256(low[k], high[k]))
    }
}

/// `d * sc` of the sixteen sub-blocks of a Q6_K super-block, as the reference computes them
/// (exact).
///
/// # Safety
/// AVX2 and F16C are available and the 210-byte block at `p` is readable.
#[inline(always)]
unsafe fn q6_k_scales(p: *const u8) -> Table16 {
    // SAFETY: the caller's contract: the signed scales at 192..208, d at 208..210.
    unsafe {
        let d = f16_at(p.add(208));
        let sc = _mm_loadu_si128(p.add(192).cast());
        table16(times_i8(d, sc), times_i8(d, _mm_srli_si128::<8>(sc)))
    }
}

/// Hands each run of 32 values of the Q6_K super-block at `p` to `visit(at, q, sub, dsc)`:
/// their offset, their quants less 32 as 32 signed bytes (-32..32, `q - 32` on the 32 bytes at
/// once), and where their two 16-value halves' `d * sc` are: `dsc[sub]` and `dsc[sub + 1]`.
///
/// # Safety
/// AVX2 and F16C are available and the 210-byte block at `p` is readable.
#[inline(always)]
unsafe fn q6_k_runs(p: *const u8, mut visit: impl FnMut(usize, __m256i, usize, &Table16)) {
    // SAFETY: the caller's contract: d at 208..210, the rest as `q6_k_quants` and
    // `q6_k_scales` read it.
    unsafe {
        let dsc = q6_k_scales(p);
        let offset = _mm256_set1_epi8(32);
        for h in 0..2 {
            for (k, q) in q6_k_quants(p, h).into_iter().enumerate() {
                let sub = 8 * h + 2 * k;
                visit(16 * sub, _mm256_sub_epi8(q, offset), sub, &dsc);
            }
        }
    }
}

/// # Safety
/// AVX2 and F16C are available and the 210-byte block at `p` is readable.
#[inline(always)]
unsafe fn q6_k_256(p: *const u8, emit: &mut impl FnMut(usize, [__m256; 2])) {
    // SAFETY: the caller's contract.
    unsafe { q6_k_runs(p, |at, q, sub, dsc| scaled_run_256(at, q, sub, dsc, emit)) }
}

/// [`q6_k_runs`] (the quants put together in 256-bit registers, as at AVX2), then sixteen
/// values per 512-bit register, each sub-block's scale broadcast from memory (see
/// [`Table16::splat512`]). Put together in 512-bit registers, 64 values at a time, each needed
/// its `- 32` in 32-bit lanes (AVX-512F has no byte arithmetic) and its bytes taken out of the
/// register before widening, on the two ports that run 512-bit operations, where 256-bit ones
/// have three: on an Intel Xeon (family 6 model 167 as its VM reports it, 2 threads, three
/// alternated runs) the gemv took 55.5 us against 59.4 for 640 rows of 2,048 in cache and 2.60
/// ms against 2.77 for 32,768 streamed; dequantizing, 83 against 84-85 us. (Decode of
/// SmolLM2 requantized to Q4_K_M and of Gemma 3, whose Q6_K tensors are about half their
/// `ffn_down`, within noise.)
///
/// # Safety
/// AVX-512F and F16C are available and the 210-byte block at `p` is readable.
#[inline(always)]
unsafe fn q6_k_512(p: *const u8, emit: &mut impl FnMut(usize, __m512)) {
    // SAFETY: the caller's contract.
    unsafe { q6_k_runs(p, |at, q, sub, dsc| scaled_run_512(at, q, sub, dsc, emit)) }
}
