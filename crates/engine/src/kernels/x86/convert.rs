//! Cache rows held in f16, widened to f32 with F16C.

use std::arch::x86_64::*;

use super::{Isa, Level};

/// Half-precision values (their bits) as f32, exactly as [`kv_extract::f16_to_f32`] defines
/// them, eight at a time with `vcvtph2ps`.
///
/// # Panics
/// If `isa` is the portable level or the lengths differ.
pub(crate) fn f16_to_f32(isa: Isa, src: &[u16], dst: &mut [f32]) {
    assert!(
        isa.level() != Level::Portable,
        "x86::f16_to_f32 needs F16C, which the portable level does not promise"
    );
    assert_eq!(src.len(), dst.len(), "f16_to_f32 lengths");
    // SAFETY: an `Isa` above the portable level exists only when the CPU has AVX2, FMA and
    // F16C (see `Isa::available`); the lengths are equal (checked above).
    unsafe { widen(src, dst) }
}

/// # Safety
/// The CPU has F16C and AVX; `src` and `dst` have the same length.
#[target_feature(enable = "avx,f16c")]
unsafe fn widen(src: &[u16], dst: &mut [f32]) {
    let n = src.len() / 8 * 8;
    for i in (0..n).step_by(8) {
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
}
