//! Cache rows held in f16, widened to f32 with F16C.

use std::arch::x86_64::*;

use kv_store::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};

use super::{Isa, Level, LineByLine};

/// Half-precision values (their bits) as f32, exactly as [`kv_extract::f16_to_f32`] defines
/// them, eight at a time with `vcvtph2ps`, asking the CPU for the bytes of `ahead` (the next
/// rows to be converted) on the way: a cache line of them per line converted. (The whole next
/// chunk asked for at once, 128 lines, the prefetches waited on memory themselves.) A hint:
/// no value depends on `ahead`.
///
/// # Panics
/// If `isa` is the portable level or the lengths differ.
pub(crate) fn f16_to_f32(isa: Isa, src: &[u16], dst: &mut [f32], ahead: &[u8]) {
    assert!(
        isa.level() != Level::Portable,
        "x86::f16_to_f32 needs F16C, which the portable level does not promise"
    );
    assert_eq!(src.len(), dst.len(), "f16_to_f32 lengths");
    // SAFETY: an `Isa` above the portable level exists only when the CPU has AVX2, FMA and
    // F16C (see `Isa::available`); the lengths are equal (checked above).
    unsafe { widen(src, dst, ahead) }
}

/// f16 values per cache line.
const LINE_HALVES: usize = 32;

/// # Safety
/// The CPU has F16C and AVX; `src` and `dst` have the same length.
#[target_feature(enable = "avx,f16c")]
unsafe fn widen(src: &[u16], dst: &mut [f32], ahead: &[u8]) {
    let mut ahead = LineByLine::new(ahead);
    let n = src.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        if i % LINE_HALVES == 0 {
            ahead.one();
        }
        // SAFETY: `i + 8 <= n <= src.len() == dst.len()`: eight values in bounds of each;
        // unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    for (d, &h) in dst[n..].iter_mut().zip(&src[n..]) {
        *d = kv_extract::f16_to_f32(h);
    }
    ahead.rest();
}

/// `q8_0` blocks (34 bytes: an f16 scale, 32 signed bytes) as f32, exactly as
/// [`kv_extract::dequantize_q8_0`] defines them (`d * q`, exact in f32), eight values per step,
/// asking for the bytes of `ahead` on the way as [`f16_to_f32`] does.
///
/// # Panics
/// If `isa` is the portable level or `dst` does not hold 32 values per block of `src`.
pub(crate) fn q8_0_to_f32(isa: Isa, src: &[u8], dst: &mut [f32], ahead: &[u8]) {
    assert!(
        isa.level() != Level::Portable,
        "x86::q8_0_to_f32 needs AVX2 and F16C, which the portable level does not promise"
    );
    assert!(
        src.len().is_multiple_of(Q8_0_BLOCK_BYTES)
            && dst.len() == src.len() / Q8_0_BLOCK_BYTES * Q8_0_BLOCK,
        "q8_0_to_f32 lengths"
    );
    // SAFETY: an `Isa` above the portable level exists only when the CPU has AVX2, FMA and
    // F16C (see `Isa::available`); `dst` holds 32 values per 34-byte block of `src` (checked).
    unsafe { widen_q8_0(src, dst, ahead) }
}

/// # Safety
/// The CPU has AVX2 and F16C; `src` is whole 34-byte blocks and `dst` 32 values per block.
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_q8_0(src: &[u8], dst: &mut [f32], ahead: &[u8]) {
    let mut ahead = LineByLine::new(ahead);
    for (b, (block, out)) in src
        .chunks_exact(Q8_0_BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(Q8_0_BLOCK))
        .enumerate()
    {
        // A line of `ahead` per 64 bytes of blocks converted.
        if (b * Q8_0_BLOCK_BYTES) % 64 < Q8_0_BLOCK_BYTES {
            ahead.one();
        }
        let bits = i16::from_le_bytes([block[0], block[1]]);
        // SAFETY: each step reads bytes 2 + 8i .. 10 + 8i < 34 of the block and writes values
        // 8i .. 8i + 8 <= 32 of `out`; unaligned loads and stores.
        unsafe {
            let d = _mm256_cvtph_ps(_mm_set1_epi16(bits));
            for i in 0..4 {
                let q = _mm_loadl_epi64(block.as_ptr().add(2 + 8 * i).cast());
                let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), _mm256_mul_ps(d, v));
            }
        }
    }
    ahead.rest();
}
