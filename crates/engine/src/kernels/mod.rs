//! Numeric kernels of the forward pass (dot products, matmul, RMSNorm, RoPE, SiLU, causal
//! attention), written so that every result is batch-invariant and bitwise deterministic.
//!
//! The rule that makes this work: every output element is a reduction with one fixed order
//! that depends only on the reduction length, never on how many rows are computed together,
//! on how work is split between threads, or on which CPU features are present.
//!
//! * A dot product of length `k` keeps [`LANES`](dot::LANES) independent partial sums (lane
//!   `l` sums elements `l, l + LANES, l + 2 * LANES, ...` in that order, each step a fused
//!   multiply-add `fma(x, w, acc)`, one rounding), then folds them with one fixed pairwise
//!   tree (`dot::reduce`); a tail of `k % LANES` elements is zero-padded to one more chunk. The
//!   multi-row kernels compute several such dots at once to reuse loaded values, but each dot
//!   goes through exactly the same operations as [`dot`]. Matmul outputs and attention scores
//!   (`q · k`) are both such dot products.
//! * A fused multiply-add is exactly specified by IEEE 754 (`f32::mul_add`: one instruction
//!   where the CPU has FMA, a correctly rounded library call where it has not), and Rust never
//!   contracts a separate `a * b + c` on its own. So compiling the same source for AVX-512 or
//!   AVX2 (chosen at run time) or for plain SSE2 only changes how many lanes one instruction
//!   handles: every path gives the same bits (tests check it). Across machines `exp` (softmax,
//!   SiLU) is a fixed polynomial in plain multiplies and adds, not the platform's libm, so
//!   results are the same on every machine.
//! * Why fused: on Intel cores an FMA is one instruction on either of two ports where a
//!   multiply then an add is two, and the AVX-512 matmul kernel is bound by them (on AMD Zen 3,
//!   with separate add pipes, the two cost the same). The attention score kernel, with a
//!   16-lane reduction for every 64 products, was 1.4x faster fused on Zen 3 too.
//! * Attention for a (token, head) pair reads the cache rows `0..=pos` in order with a
//!   sequential softmax, whatever the batch.
//!
//! The instruction-set level is a value, [`Isa`], detected where the model is loaded and passed
//! to every kernel call: tests run each kernel, attention and a whole forward pass at every
//! level the machine has (`isa::for_each_isa`) and compare it with the portable build bit for
//! bit. The portable build uses no SIMD code at all.
//!
//! Modules in dependency order: `dot` (the definition) and `quant` (GGUF blocks) are
//! leaves beside `isa`; `x86` (`unsafe`: `#[target_feature]` copies of the portable kernels,
//! and hand-written ones, each behind a safe wrapper) uses them; `team` (the threads of a
//! forward pass, the only other `unsafe`) is a leaf; then `weight` and `dequant`; then
//! `matmul`, `elementwise` and `attention`.

pub(crate) mod attention;
pub(crate) mod dequant;
pub(crate) mod dot;
pub(crate) mod elementwise;
pub(crate) mod isa;
pub(crate) mod matmul;
pub(crate) mod quant;
#[allow(unsafe_code)]
pub(crate) mod team;
pub(crate) mod weight;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

#[cfg(test)]
mod tests;

pub(crate) use attention::{AttentionSpec, attention};
pub(crate) use elementwise::{
    RopeStyle, RopeTable, add_bias_rows, add_in_place, gelu_mul_rows, rms_norm, silu_mul_rows,
};
pub use isa::Isa;
pub(crate) use matmul::{MatmulScratch, matmul, matmul_into};
pub(crate) use weight::Weight;

use isa::Recompile;
use kv_extract::AlignedBuf;

/// Runs `kernel` compiled for `isa`: the portable build, or its `#[target_feature]` copy for
/// AVX2 or AVX-512 (same source, same bits).
#[inline(always)]
fn vectorized<K: Recompile>(isa: Isa, kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    return x86::recompiled(isa, kernel);
    #[cfg(not(target_arch = "x86_64"))]
    return kernel.run();
}

/// `buf` as exactly `len` values, keeping its memory: what it held stays (callers overwrite
/// every value), only values it never had are zeroed. Buffers a forward pass reuses layer
/// after layer go through this instead of fresh allocations, whose first touch is page faults.
pub(crate) fn resized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    grown(buf, len);
    buf.truncate(len);
    buf
}

/// The first `len` values of `buf`, growing it (zero-filled) only if it is shorter: like
/// [`resized`], but the values past `len` stay for a later, longer use.
pub(crate) fn grown(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// [`grown`] for a line-aligned buffer: the first `len` values of `buf`, reallocated (zeroed)
/// only if it is shorter. What it held is lost then; callers overwrite every value they read.
pub(crate) fn grown_aligned(buf: &mut AlignedBuf, len: usize) -> &mut [f32] {
    if buf.len() < len {
        *buf = AlignedBuf::zeros(len);
    }
    &mut buf[..len]
}
