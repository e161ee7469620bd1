//! The softmax's exponentials and their sum in registers: the portable `exp`'s operations
//! ([`crate::kernels::elementwise::exp`]), 16-lane chunks of scores at a time.

use std::arch::x86_64::*;

use crate::kernels::dot::LANES;
use crate::kernels::elementwise::exp_consts::{HIGH, LN2_HI, LN2_LO, LOG2E, LOW, MAGIC, P};

use super::{Isa, Level};

/// Replaces each score `x` of `s` (whole chunks of [`LANES`]) by `exp(x - max)` and adds
/// chunk after chunk into `acc` (score `j` into lane `j % 16`, in order): bit for bit what
/// the portable softmax computes (`x - max` rounded, then `exp`'s multiplies and adds, never
/// fused), with every step in registers, four chunks' chains interleaved. Compiled from the
/// portable loops, each step of a 64-score block went through arrays on the stack.
///
/// Measured on an Intel Xeon (family 6 model 167 as its VM reports it), December 2026: one
/// thread, 64 rows of 2,048 scores each scaled, their maximum taken, then through this,
/// 0.36-0.37 ns a score against 0.48-0.53 compiled from the portable loops at AVX-512, and
/// 0.51-0.52 against 0.56-0.62 at AVX2; SmolLM2 requantized to Q4_K_M, a load and 16-token
/// turn after 2,048 tokens (f16 cache, 2 threads, one process switching every ten turns,
/// medians of 200 each, logits equal bit for bit): 40.74-40.93 ms against 41.24-41.46 at
/// AVX-512, 52.43-52.54 against 53.85-53.89 at AVX2. (Gemma 3 270M, whose softmaxes are a
/// tenth of SmolLM2's, 32.65 against 32.74.)
///
/// # Panics
/// If `isa` is the portable level or `s` is not whole chunks.
pub(crate) fn exp_and_sum(isa: Isa, s: &mut [f32], max: f32, acc: &mut [f32; LANES]) {
    assert!(
        s.len().is_multiple_of(LANES),
        "x86::exp_and_sum takes whole chunks"
    );
    // SAFETY: an `Isa` of a level exists only when the CPU has its extensions (AVX-512F, or
    // AVX2 and FMA; see `Isa`); the kernels read and write `s` in whole chunks, which it is.
    unsafe {
        match isa.level() {
            Level::Avx512 => exp_and_sum_avx512(s, max, acc),
            Level::Avx2 => exp_and_sum_avx2(s, max, acc),
            Level::Portable => panic!("x86::exp_and_sum needs AVX2 or AVX-512"),
        }
    }
}

/// `step`: `exp` of registers of one width, from that width's intrinsics (`$pow2` is the
/// caller's macro that multiplies `y` by `2^n`, given `y`, `n` and `t`).
macro_rules! exp_step {
    ($set1:ident, $add:ident, $sub:ident, $mul:ident, $max:ident, $min:ident, $pow2:ident) => {
        /// `exp(v - max)` of `N` registers' lanes (see [`exp_and_sum`]), each step across
        /// all of them before the next, so that `N` independent chains are in flight.
        #[inline(always)]
        #[allow(clippy::needless_range_loop)] // literal indices keep the arrays in registers
        fn step<const N: usize>(v: [Reg; N], max: Reg) -> [Reg; N] {
            // SAFETY: `step` is called only from the function it is defined in, which has the
            // target features these intrinsics need.
            unsafe {
                let (mut x, mut t, mut n, mut r) = (v, v, v, v);
                for i in 0..N {
                    // `clamp(LOW, HIGH)`: `max(LOW, x)` is `LOW > x ? LOW : x` and
                    // `min(HIGH, x)` `HIGH < x ? HIGH : x`, so NaN stays NaN, as through
                    // `clamp`.
                    x[i] = $min($set1(HIGH), $max($set1(LOW), $sub(v[i], max)));
                }
                for i in 0..N {
                    t[i] = $add($mul(x[i], $set1(LOG2E)), $set1(MAGIC));
                }
                for i in 0..N {
                    n[i] = $sub(t[i], $set1(MAGIC));
                }
                for i in 0..N {
                    let hi = $sub(x[i], $mul(n[i], $set1(LN2_HI)));
                    r[i] = $sub(hi, $mul(n[i], $set1(LN2_LO)));
                }
                let mut p = [$set1(P[0]); N];
                for c in &P[1..] {
                    for i in 0..N {
                        p[i] = $add($mul(p[i], r[i]), $set1(*c));
                    }
                }
                for i in 0..N {
                    let y = $add($add($mul(p[i], $mul(r[i], r[i])), r[i]), $set1(1.0));
                    x[i] = $pow2!(y, n[i], t[i]);
                }
                x
            }
        }
    };
}

/// # Safety
/// The CPU has AVX-512F; `s.len()` is a multiple of 16.
#[target_feature(enable = "avx512f")]
unsafe fn exp_and_sum_avx512(s: &mut [f32], max: f32, acc: &mut [f32; LANES]) {
    type Reg = __m512;
    // `y * 2^n` in one instruction: `n` is a whole number in -126..=127 (`x` is clamped),
    // so both this and the multiply by `2^n` are exact (`y` is at least 1.4 where `n` is
    // -126: no result is subnormal), and a NaN `y` comes through as itself either way.
    macro_rules! scalef {
        ($y:expr, $n:expr, $t:expr) => {
            _mm512_scalef_ps($y, $n)
        };
    }
    exp_step!(
        _mm512_set1_ps,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_mul_ps,
        _mm512_max_ps,
        _mm512_min_ps,
        scalef
    );
    // SAFETY: every load and store is 16 values of a chunk of `s` (a block of 64 or, after
    // the blocks, one of 16: its length is a multiple of 16) or of `acc`.
    unsafe {
        let max = _mm512_set1_ps(max);
        let mut sum = _mm512_loadu_ps(acc.as_ptr());
        let mut chunks = s.chunks_exact_mut(4 * LANES);
        for c in &mut chunks {
            let p = c.as_mut_ptr();
            let v = std::array::from_fn(|i| _mm512_loadu_ps(p.add(i * LANES)));
            for (i, e) in step::<4>(v, max).into_iter().enumerate() {
                _mm512_storeu_ps(p.add(i * LANES), e);
                sum = _mm512_add_ps(sum, e);
            }
        }
        for c in chunks.into_remainder().chunks_exact_mut(LANES) {
            let [e] = step::<1>([_mm512_loadu_ps(c.as_ptr())], max);
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm512_add_ps(sum, e);
        }
        _mm512_storeu_ps(acc.as_mut_ptr(), sum);
    }
}

/// # Safety
/// The CPU has AVX2; `s.len()` is a multiple of 16.
#[target_feature(enable = "avx2")]
unsafe fn exp_and_sum_avx2(s: &mut [f32], max: f32, acc: &mut [f32; LANES]) {
    type Reg = __m256;
    // `y * 2^n` as the portable `exp` computes it: `2^n` from the bits of `t`
    // (`(bits(t) - bits(MAGIC) + 127) << 23` in wrapping arithmetic, the two constants taken
    // together: the same bits modulo 2^32), then a multiply.
    macro_rules! pow2 {
        ($y:expr, $n:expr, $t:expr) => {{
            let bias = MAGIC.to_bits().wrapping_sub(127) as i32;
            let bits = _mm256_sub_epi32(_mm256_castps_si256($t), _mm256_set1_epi32(bias));
            _mm256_mul_ps($y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
        }};
    }
    exp_step!(
        _mm256_set1_ps,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_mul_ps,
        _mm256_max_ps,
        _mm256_min_ps,
        pow2
    );
    // SAFETY: as in `exp_and_sum_avx512`, with lanes 0..8 and 8..16 of a chunk two registers.
    unsafe {
        let max = _mm256_set1_ps(max);
        let (mut lo, mut hi) = (
            _mm256_loadu_ps(acc.as_ptr()),
            _mm256_loadu_ps(acc.as_ptr().add(8)),
        );
        let mut chunks = s.chunks_exact_mut(2 * LANES);
        for c in &mut chunks {
            let p = c.as_mut_ptr();
            let v = std::array::from_fn(|i| _mm256_loadu_ps(p.add(i * 8)));
            let e = step::<4>(v, max);
            for (i, e) in e.into_iter().enumerate() {
                _mm256_storeu_ps(p.add(i * 8), e);
            }
            lo = _mm256_add_ps(_mm256_add_ps(lo, e[0]), e[2]);
            hi = _mm256_add_ps(_mm256_add_ps(hi, e[1]), e[3]);
        }
        for c in chunks.into_remainder().chunks_exact_mut(LANES) {
            let p = c.as_mut_ptr();
            let [a, b] = step::<2>([_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))], max);
            _mm256_storeu_ps(p, a);
            _mm256_storeu_ps(p.add(8), b);
            lo = _mm256_add_ps(lo, a);
            hi = _mm256_add_ps(hi, b);
        }
        _mm256_storeu_ps(acc.as_mut_ptr(), lo);
        _mm256_storeu_ps(acc.as_mut_ptr().add(8), hi);
    }
}
