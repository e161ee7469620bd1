//! GGUF blocks kept as the file stores them, widened to f32 with AVX2 or AVX-512: Q5_0, Q4_K
//! and Q6_K, the types Gemma 3 270M's Q4_K_M file holds besides Q8_0. Each value is the one
//! `quant::blocks` (ggml's reference) computes, bit for bit: the products are exact there (see
//! that module), so `d * q` is the same in any lane, and Q4_K's `d1 * q - m1` fused into one
//! FMA rounds once, as the reference's subtraction after its exact product does.

use std::arch::x86_64::*;

use crate::kernels::isa::{Isa, Level};
use crate::kernels::quant::blocks::scale_min_k4;
use crate::kernels::quant::{QK, QK_K, QKind};

/// Whether `kind` has a hand-written form here (the others are the portable source compiled
/// for the level).
pub(crate) fn has_kernel(kind: QKind) -> bool {
    matches!(kind, QKind::Q5_0 | QKind::Q4K | QKind::Q6K)
}

/// Widens `raw`, whole GGUF blocks of `kind`, into `out`, bitwise as
/// `quant::blocks::dequantize`, at `isa`.
///
/// # Panics
/// If `isa` is the portable level, `kind` has no form here ([`has_kernel`]) or `out` does not
/// hold exactly the blocks' values.
pub(crate) fn dequantize_blocks(isa: Isa, kind: QKind, raw: &[u8], out: &mut [f32]) {
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
    // (checked above), which is all each kernel reads and writes.
    unsafe {
        match (isa.level(), kind) {
            (Level::Avx512, QKind::Q5_0) => q5_0_avx512(src, n, dst),
            (Level::Avx512, QKind::Q4K) => q4_k_avx512(src, n, dst),
            (Level::Avx512, QKind::Q6K) => q6_k_avx512(src, n, dst),
            (Level::Avx2, QKind::Q5_0) => q5_0_avx2(src, n, dst),
            (Level::Avx2, QKind::Q4K) => q4_k_avx2(src, n, dst),
            (Level::Avx2, QKind::Q6K) => q6_k_avx2(src, n, dst),
            (level, kind) => panic!("x86::dequantize_blocks has no {kind:?} form at {level:?}"),
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

/// The eight values of bytes `8 * i .. 8 * i + 8` of `v` (unsigned) as i32 lanes.
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn widen8(v: __m256i, i: usize) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
        let half = match i / 2 {
            0 => _mm256_castsi256_si128(v),
            _ => _mm256_extracti128_si256::<1>(v),
        };
        let bytes = match i % 2 {
            0 => half,
            _ => _mm_srli_si128::<8>(half),
        };
        _mm256_cvtepu8_epi32(bytes)
    }
}

/// The sixteen values of bytes `16 * i .. 16 * i + 16` of `v` (unsigned) as i32 lanes.
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

// ---------------------------------------------------------------------------------------------
// Q5_0: x = (q - 16) * d, q's fifth bit in qh.
// ---------------------------------------------------------------------------------------------

/// # Safety
/// AVX-512F and F16C are available; `src` holds `n` 22-byte blocks and `dst` room for
/// `32 * n` values.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q5_0_avx512(src: *const u8, n: usize, dst: *mut f32) {
    // SAFETY: the caller's contract: block `b` is `src[22b..22b + 22]`, its values
    // `dst[32b..32b + 32]`.
    unsafe {
        let (mask, sixteen) = (_mm_set1_epi8(0x0F), _mm512_set1_epi32(16));
        for b in 0..n {
            let p = src.add(22 * b);
            let d = _mm512_set1_ps(f16_at(p));
            let qh = p.add(2).cast::<u32>().read_unaligned();
            let qs = _mm_loadu_si128(p.add(6).cast());
            let nibbles = [
                _mm_and_si128(qs, mask),
                _mm_and_si128(_mm_srli_epi16::<4>(qs), mask),
            ];
            for (h, &nib) in nibbles.iter().enumerate() {
                let q = _mm512_cvtepu8_epi32(nib);
                // Bit e of qh is element e's fifth bit: lanes whose bit is set get 16 or-ed in.
                let high = (qh >> (16 * h)) as u16;
                let q = _mm512_mask_or_epi32(q, high, q, sixteen);
                let x = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, sixteen));
                _mm512_storeu_ps(dst.add(QK * b + 16 * h), _mm512_mul_ps(x, d));
            }
        }
    }
}

/// # Safety
/// AVX2 and F16C are available; `src` holds `n` 22-byte blocks and `dst` room for `32 * n`
/// values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_avx2(src: *const u8, n: usize, dst: *mut f32) {
    // SAFETY: as for `q5_0_avx512`.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        let (sixteen, lane) = (
            _mm256_set1_epi32(16),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        for b in 0..n {
            let p = src.add(22 * b);
            let d = _mm256_set1_ps(f16_at(p));
            let qh = p.add(2).cast::<u32>().read_unaligned();
            let qs = _mm_loadu_si128(p.add(6).cast());
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), mask);
            let bytes = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
            for (g, &bytes) in bytes.iter().enumerate() {
                // ggml's `((qh >> j) << 4) & 0x10` for the group's eight elements j.
                let bits = _mm256_set1_epi32(((qh >> (8 * g)) << 4) as i32);
                let high = _mm256_and_si256(_mm256_srlv_epi32(bits, lane), sixteen);
                let q = _mm256_or_si256(_mm256_cvtepu8_epi32(bytes), high);
                let x = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, sixteen));
                _mm256_storeu_ps(dst.add(QK * b + 8 * g), _mm256_mul_ps(x, d));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_K: x = d * sc * q - dmin * m per 32 values.
// ---------------------------------------------------------------------------------------------

/// The four (scale, minimum) pairs of quarter `j` of a Q4_K super-block as `[d1, m1, d2, m2]`:
/// `d * sc` and `dmin * m` of sub-blocks `2j` and `2j + 1`, as the reference computes them.
#[inline(always)]
fn q4_k_scales(d: f32, dmin: f32, scales: &[u8], j: usize) -> [f32; 4] {
    let (sc1, m1) = scale_min_k4(2 * j, scales);
    let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
    [
        d * sc1 as f32,
        dmin * m1 as f32,
        d * sc2 as f32,
        dmin * m2 as f32,
    ]
}

/// # Safety
/// AVX-512F and F16C are available; `src` holds `n` 144-byte blocks and `dst` room for
/// `256 * n` values.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4_k_avx512(src: *const u8, n: usize, dst: *mut f32) {
    // SAFETY: the caller's contract: block `b` is `src[144b..144b + 144]`, its values
    // `dst[256b..256b + 256]`; quarter `j` reads bytes 16 + 32j .. 48 + 32j of the block.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        for b in 0..n {
            let p = src.add(144 * b);
            let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
            let scales = std::slice::from_raw_parts(p.add(4), 12);
            let y = dst.add(QK_K * b);
            for j in 0..4 {
                let [d1, m1, d2, m2] = q4_k_scales(d, dmin, scales, j);
                let q = _mm256_loadu_si256(p.add(16 + 32 * j).cast());
                let lo = _mm256_and_si256(q, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask);
                for (s, (nib, dl, ml)) in [(lo, d1, m1), (hi, d2, m2)].into_iter().enumerate() {
                    let (dl, ml) = (_mm512_set1_ps(dl), _mm512_set1_ps(ml));
                    for i in 0..2 {
                        let x = _mm512_cvtepi32_ps(widen16(nib, i));
                        // `dl * x` is exact: one rounding, the subtraction's.
                        let v = _mm512_fmsub_ps(dl, x, ml);
                        _mm512_storeu_ps(y.add(64 * j + 32 * s + 16 * i), v);
                    }
                }
            }
        }
    }
}

/// # Safety
/// AVX2, FMA and F16C are available; `src` holds `n` 144-byte blocks and `dst` room for
/// `256 * n` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_avx2(src: *const u8, n: usize, dst: *mut f32) {
    // SAFETY: as for `q4_k_avx512`.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        for b in 0..n {
            let p = src.add(144 * b);
            let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
            let scales = std::slice::from_raw_parts(p.add(4), 12);
            let y = dst.add(QK_K * b);
            for j in 0..4 {
                let [d1, m1, d2, m2] = q4_k_scales(d, dmin, scales, j);
                let q = _mm256_loadu_si256(p.add(16 + 32 * j).cast());
                let lo = _mm256_and_si256(q, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask);
                for (s, (nib, dl, ml)) in [(lo, d1, m1), (hi, d2, m2)].into_iter().enumerate() {
                    let (dl, ml) = (_mm256_set1_ps(dl), _mm256_set1_ps(ml));
                    for i in 0..4 {
                        let x = _mm256_cvtepi32_ps(widen8(nib, i));
                        // Exact to fuse, as at AVX-512.
                        let v = _mm256_fmsub_ps(dl, x, ml);
                        _mm256_storeu_ps(y.add(64 * j + 32 * s + 8 * i), v);
                    }
                }
            }
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
        let ql0 = _mm256_loadu_si256(p.add(64 * h).cast());
        let ql1 = _mm256_loadu_si256(p.add(64 * h + 32).cast());
        let qh = _mm256_loadu_si256(p.add(128 + 32 * h).cast());
        let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        // Each value's high pair moved to bits 4..6 of its byte (16-bit shifts carry bits
        // across bytes, which the 0x30 mask drops).
        let high = [
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
            _mm256_and_si256(qh, m30),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
        ];
        let low = [
            _mm256_and_si256(ql0, m4),
            _mm256_and_si256(ql1, m4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
        ];
        std::array::from_fn(|k| _mm256_or_si256(low[k], high[k]))
    }
}

/// `d * sc` of the eight sub-blocks of half `h` of a Q6_K super-block, as the reference
/// computes them (exact).
///
/// # Safety
/// The block at `p` is readable.
#[inline(always)]
unsafe fn q6_k_scales(p: *const u8, d: f32, h: usize) -> [f32; 8] {
    // SAFETY: the caller's contract: bytes 192 + 8h .. 200 + 8h of the block.
    std::array::from_fn(|i| d * (unsafe { *p.add(192 + 8 * h + i) } as i8) as f32)
}

/// # Safety
/// AVX-512F and F16C are available; `src` holds `n` 210-byte blocks and `dst` room for
/// `256 * n` values.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q6_k_avx512(src: *const u8, n: usize, dst: *mut f32) {
    // SAFETY: the caller's contract: block `b` is `src[210b..210b + 210]`, its values
    // `dst[256b..256b + 256]`.
    unsafe {
        let offset = _mm512_set1_epi32(32);
        for b in 0..n {
            let p = src.add(210 * b);
            let d = f16_at(p.add(208));
            for h in 0..2 {
                let dsc = q6_k_scales(p, d, h);
                let y = dst.add(QK_K * b + 128 * h);
                for (k, q) in q6_k_quants(p, h).into_iter().enumerate() {
                    for i in 0..2 {
                        let q = _mm512_sub_epi32(widen16(q, i), offset);
                        let v =
                            _mm512_mul_ps(_mm512_set1_ps(dsc[2 * k + i]), _mm512_cvtepi32_ps(q));
                        _mm512_storeu_ps(y.add(32 * k + 16 * i), v);
                    }
                }
            }
        }
    }
}

/// # Safety
/// AVX2 and F16C are available; `src` holds `n` 210-byte blocks and `dst` room for `256 * n`
/// values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_avx2(src: *const u8, n: usize, dst: *mut f32) {
    // SAFETY: as for `q6_k_avx512`.
    unsafe {
        let offset = _mm256_set1_epi32(32);
        for b in 0..n {
            let p = src.add(210 * b);
            let d = f16_at(p.add(208));
            for h in 0..2 {
                let dsc = q6_k_scales(p, d, h);
                let y = dst.add(QK_K * b + 128 * h);
                for (k, q) in q6_k_quants(p, h).into_iter().enumerate() {
                    for i in 0..4 {
                        let q = _mm256_sub_epi32(widen8(q, i), offset);
                        let s = _mm256_set1_ps(dsc[2 * k + i / 2]);
                        let v = _mm256_mul_ps(s, _mm256_cvtepi32_ps(q));
                        _mm256_storeu_ps(y.add(32 * k + 8 * i), v);
                    }
                }
            }
        }
    }
}
