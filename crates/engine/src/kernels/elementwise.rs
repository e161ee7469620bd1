//! The per-row and element-wise steps of a layer: RMSNorm, residual and bias adds, the SiLU
//! and GELU gates, rotary position embeddings, and the `exp` every build computes alike.

use super::dot::dot;
use super::isa::{Isa, Recompile};
use super::vectorized;

/// RMSNorm of each row of `x` (rows of `w.len()`) at `isa`: `x / sqrt(mean(x²) + eps) * w`,
/// the sum of squares being [`dot`]`(row, row)`.
///
/// # Panics
/// If `x` is not a whole number of rows or `out` differs in length.
pub fn rms_norm(isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), out.len(), "rms_norm output length");
    assert_eq!(x.len() % d, 0, "rms_norm input is not whole rows");
    struct RmsNorm<'a> {
        x: &'a [f32],
        w: &'a [f32],
        eps: f32,
        out: &'a mut [f32],
    }
    impl Recompile for RmsNorm<'_> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            let d = self.w.len();
            for (row, o) in self.x.chunks_exact(d).zip(self.out.chunks_exact_mut(d)) {
                let ss = dot(row, row);
                let inv = 1.0 / (ss / d as f32 + self.eps).sqrt();
                for ((o, &xv), &wv) in o.iter_mut().zip(row).zip(self.w) {
                    *o = (xv * inv) * wv;
                }
            }
        }
    }
    vectorized(isa, RmsNorm { x, w, eps, out });
}

/// `a += b`, element-wise (a residual connection).
pub fn add_in_place(a: &mut [f32], b: &[f32]) {
    for (a, b) in a.iter_mut().zip(b) {
        *a += b;
    }
}

/// `rows[t][i] += bias[i]` for every row of `bias.len()` values of `rows` (a projection's
/// bias: one f32 add per element, whatever the batch).
///
/// # Panics
/// If `rows` is not a whole number of rows.
pub fn add_bias_rows(rows: &mut [f32], bias: &[f32]) {
    assert_eq!(
        rows.len() % bias.len(),
        0,
        "add_bias_rows input is not whole rows"
    );
    for row in rows.chunks_exact_mut(bias.len()) {
        add_in_place(row, bias);
    }
}

/// SiLU-gated product over rows laid out `[gate (f) | up (f)]` at `isa`: `silu(gate) * up`
/// into `out` (made `[rows, f]`).
pub fn silu_mul_rows(isa: Isa, gate_up: &[f32], f: usize, out: &mut Vec<f32>) {
    gated_rows(isa, gate_up, f, out, |g, u| (g / (1.0 + exp(-g))) * u);
}

/// GELU-gated product over rows laid out `[gate (f) | up (f)]` at `isa`: `gelu(gate) * up`
/// into `out` (made `[rows, f]`), with GELU's tanh form (Gemma's `gelu_pytorch_tanh`;
/// llama.cpp's `ggml_gelu`): `0.5 x (1 + tanh(sqrt(2 / pi) x (1 + 0.044715 x²)))`, `tanh` from
/// [`exp`], so every build gives the same bits. (llama.cpp's CPU backend rounds the input to
/// f16 and looks the result up in a table; this computes it in f32.)
pub fn gelu_mul_rows(isa: Isa, gate_up: &[f32], f: usize, out: &mut Vec<f32>) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    let gelu = |x: f32| {
        let u = SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x);
        // tanh(u) = sign(u) (1 - 2 / (exp(2|u|) + 1)), exact in sign and saturating to 1.
        let t = 1.0 - 2.0 / (exp(2.0 * u.abs()) + 1.0);
        0.5 * x * (1.0 + t.copysign(u))
    };
    gated_rows(isa, gate_up, f, out, move |g, u| gelu(g) * u);
}

/// `op(gate, up)` of every row laid out `[gate (f) | up (f)]`, into `out` (`[rows, f]`, its
/// memory reused), compiled for `isa`: the same operations on wider registers, so the same
/// bits. (At the baseline's four lanes, a 16-token turn's gates were one thread's serial
/// work, the other waiting: about 1% of a turn after 2,048 tokens, at AVX-512 and AVX2.) A
/// prefill's rows are split over threads; each value is the same whichever thread computes
/// it.
fn gated_rows(
    isa: Isa,
    gate_up: &[f32],
    f: usize,
    out: &mut Vec<f32>,
    op: impl Fn(f32, f32) -> f32 + Sync,
) {
    struct Gated<'a, F> {
        gate_up: &'a [f32],
        out: &'a mut [f32],
        f: usize,
        op: &'a F,
    }
    impl<F: Fn(f32, f32) -> f32> Recompile for Gated<'_, F> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            let rows = self.gate_up.chunks_exact(2 * self.f);
            for (row, o) in rows.zip(self.out.chunks_exact_mut(self.f)) {
                let (g, u) = row.split_at(self.f);
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = (self.op)(g, u);
                }
            }
        }
    }
    let rows = gate_up.len() / (2 * f);
    let out = super::resized(out, rows * f);
    let run = |gate_up: &[f32], out: &mut [f32]| {
        let op = &op;
        vectorized(
            isa,
            Gated {
                gate_up,
                out,
                f,
                op,
            },
        );
    };
    if out.len() < 1 << 16 {
        // A few tokens' worth: not worth handing to the other thread.
        run(gate_up, out);
    } else {
        super::team::for_each_chunk(out, f, |i, o| run(&gate_up[i * 2 * f..][..2 * f], o));
    }
}

/// Which values of a head RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i + 1])`: GGUF llama models, whose converter permutes Q and
    /// K to match.
    Interleaved,
    /// Halves `(x[i], x[i + rope_dim / 2])`: GPT-NeoX's layout, used by Gemma.
    NeoX,
}

/// Rotary position embedding tables for `n` consecutive positions from `start`.
///
/// Row `t` holds `cos` and `sin` of `(start + t) * inv_freq[i]` for every rotated pair `i`;
/// the angle is computed in f64 from the position alone, so a position's row never depends
/// on which batch it is in.
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    pairs: usize,
}

impl RopeTable {
    /// Inverse frequencies `base^(-2i / rope_dim) / factors[i]` for `i < rope_dim / 2`, each
    /// factor `1` without `factors` (Llama 3's `rope_freqs.weight`, one per pair: llama.cpp's
    /// `ggml_rope_ext` divides each pair's angle by its factor).
    ///
    /// # Panics
    /// If `factors` is not `rope_dim / 2` long.
    pub fn inv_freq(base: f32, rope_dim: usize, factors: Option<&[f32]>) -> Vec<f64> {
        let pairs = rope_dim / 2;
        if let Some(f) = factors {
            assert_eq!(f.len(), pairs, "one rope frequency factor per pair");
        }
        (0..pairs)
            .map(|i| {
                let f = (base as f64).powf(-((2 * i) as f64) / rope_dim as f64);
                match factors {
                    Some(factors) => f / f64::from(factors[i]),
                    None => f,
                }
            })
            .collect()
    }

    /// The table for positions `start..start + n`.
    pub fn new(inv_freq: &[f64], start: usize, n: usize) -> RopeTable {
        let pairs = inv_freq.len();
        let mut cos = Vec::with_capacity(n * pairs);
        let mut sin = Vec::with_capacity(n * pairs);
        for t in 0..n {
            let pos = (start + t) as f64;
            for &f in inv_freq {
                let angle = pos * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { cos, sin, pairs }
    }

    /// Rotates, in place, the first `2 * pairs` values of every head of every token in `x`
    /// (`[n, n_heads, head_dim]`), pair `i` by row `t`'s angle `i`, pairs taken as `style`
    /// says.
    pub fn apply(&self, style: RopeStyle, x: &mut [f32], n_heads: usize, head_dim: usize) {
        let rotate = |a: f32, b: f32, c: f32, s: f32| (a * c - b * s, a * s + b * c);
        for (t, tok) in x.chunks_exact_mut(n_heads * head_dim).enumerate() {
            let cos = &self.cos[t * self.pairs..(t + 1) * self.pairs];
            let sin = &self.sin[t * self.pairs..(t + 1) * self.pairs];
            for head in tok.chunks_exact_mut(head_dim) {
                match style {
                    RopeStyle::Interleaved => {
                        for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                            (pair[0], pair[1]) = rotate(pair[0], pair[1], c, s);
                        }
                    }
                    RopeStyle::NeoX => {
                        let (lo, hi) = head[..2 * self.pairs].split_at_mut(self.pairs);
                        for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
                            (*a, *b) = rotate(*a, *b, c, s);
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// `exp(x)`, with the Cephes single-precision polynomial (about 1 ulp), in plain multiplies
/// and adds so that every build (SSE2, AVX2, any vector width) gives the same bits, unlike a
/// platform libm. Inputs below -87 give a tiny positive number rather than a subnormal.
/// [`exp_each`] of one value.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let mut x = [x];
    exp_each(&mut x);
    x[0]
}

/// [`exp`]'s constants, shared with the x86 softmax kernel (`x86::exp_and_sum`), which does the
/// same operations in registers.
pub(crate) mod exp_consts {
    /// Inputs are clamped to `LOW..=HIGH` first.
    pub(crate) const LOW: f32 = -87.0;
    pub(crate) const HIGH: f32 = 88.0;
    pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 in two parts, `LN2_HI + LN2_LO`, for the range reduction.
    pub(crate) const LN2_HI: f32 = 0.693_359_4;
    pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
    /// 1.5 * 2^23: adding it rounds to an integer.
    pub(crate) const MAGIC: f32 = 12_582_912.0;
    /// The polynomial's coefficients, highest first. The last is Cephes' 5.0000001201e-1,
    /// which rounds to 0.5 in f32.
    pub(crate) const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
}

/// [`exp`] of each of `N` values in place, each step across all of them before the next: the
/// same operations on every value, so the same bits, but a vectorizing compiler then
/// interleaves `N / 8` (AVX2) independent chains. A vector `exp` is a chain of about 25
/// dependent operations, and with one or two in flight most of the time goes to waiting on
/// them. On an AMD EPYC (Zen 1), one thread, a softmax of 2,048 scores (scaled, their
/// maximum, `exp` and sum) took 2.0 ns a score with `exp` 16 values at a time, 1.5 with 64 at
/// a time step by step (1.5 with 32, 1.6 with 128).
#[inline(always)]
pub fn exp_each<const N: usize>(x: &mut [f32; N]) {
    use exp_consts::*;
    let (mut t, mut r, mut p) = ([0.0f32; N], [0.0f32; N], [P[0]; N]);
    for x in x.iter_mut() {
        *x = x.clamp(LOW, HIGH);
    }
    for (t, &x) in t.iter_mut().zip(x.iter()) {
        *t = x * LOG2E + MAGIC;
    }
    for ((r, &t), &x) in r.iter_mut().zip(&t).zip(x.iter()) {
        let n = t - MAGIC;
        *r = (x - n * LN2_HI) - n * LN2_LO;
    }
    for c in &P[1..] {
        for (p, &r) in p.iter_mut().zip(&r) {
            *p = *p * r + c;
        }
    }
    for (((x, &p), &r), &t) in x.iter_mut().zip(&p).zip(&r).zip(&t) {
        let y = (p * (r * r) + r) + 1.0;
        // `n` as an integer, read from the bits of `t` (in [2^23, 2^24) one unit is one
        // ulp): the same value as `n as i32`, without the saturating conversion that keeps
        // loops of `exp` from vectorizing.
        let n_int = t.to_bits().wrapping_sub(MAGIC.to_bits());
        *x = y * f32::from_bits(n_int.wrapping_add(127) << 23);
    }
}
