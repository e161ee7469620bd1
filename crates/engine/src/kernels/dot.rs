//! The dot product that defines every result of the forward pass: [`LANES`] partial sums of
//! fused multiply-adds folded by one fixed tree ([`reduce`]), and the multi-row micro-kernels
//! that compute several such dots at once with exactly the operations of a lone [`dot`].

/// Independent partial sums per dot product: one AVX-512 register, two AVX2 registers, four
/// SSE registers. Part of the numeric definition: changing it changes every result.
pub const LANES: usize = 16;

/// Rows of `x` per matmul micro-kernel call ([`dot_2x3`]).
pub(crate) const MR: usize = 2;
/// Weight rows per matmul micro-kernel call (MR * NR * 2 AVX2 accumulators = 12 of 16).
pub(crate) const NR: usize = 3;
/// Rows of `x` swept per pass over a weight panel, so the rows stay in L2 across the panel.
pub(crate) const MB: usize = 32;

/// Folds the [`LANES`] partial sums with a fixed pairwise tree.
///
/// Kept out of line on purpose: inlined into the kernels, LLVM's SLP vectorizer interleaves
/// this tree with the hot loop and scalarizes the accumulators (4-10x slower).
#[inline(never)]
pub(crate) fn reduce(acc: &[f32; LANES]) -> f32 {
    let mut s8 = [0.0f32; 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    let mut s4 = [0.0f32; 4];
    for l in 0..4 {
        s4[l] = s8[l] + s8[l + 4];
    }
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// `acc[l] = fma(x[l], w[l], acc[l])` for the [`LANES`] lanes: one step of every dot product.
#[inline(always)]
fn fmadd(acc: &mut [f32; LANES], x: &[f32], w: &[f32]) {
    for l in 0..LANES {
        acc[l] = x[l].mul_add(w[l], acc[l]);
    }
}

/// Generates a micro-kernel computing `R x C` dot products of length `k` at once:
/// `out[i][j] = dot(xs[i], ws[j])`, each with exactly the operations of a lone [`dot`].
///
/// A macro rather than const generics: the accumulators must be indexed by literal constants
/// for LLVM to keep them in registers (with loops over `i` and `j` they stay in memory and the
/// kernel runs ~10x slower). The tail (`k % LANES` elements) is zero-padded to one more full
/// chunk, so every accumulator is only ever touched by `fmadd`.
macro_rules! dot_kernel {
    ($name:ident, $r:literal, $c:literal, [$($i:tt),*], $js:tt) => {
        #[inline(always)]
        pub(crate) fn $name(xs: [&[f32]; $r], ws: [&[f32]; $c], k: usize) -> [[f32; $c]; $r] {
            let xs = xs.map(|s| &s[..k]);
            let ws = ws.map(|s| &s[..k]);
            let full = k - k % LANES;
            let mut acc = [[[0.0f32; LANES]; $c]; $r];
            let mut off = 0;
            while off < full {
                $( dot_kernel!(@row acc, xs, ws, off, $i, $js); )*
                off += LANES;
            }
            if full < k {
                let mut xt = [[0.0f32; LANES]; $r];
                let mut wt = [[0.0f32; LANES]; $c];
                for (t, s) in xt.iter_mut().zip(&xs) {
                    t[..k - full].copy_from_slice(&s[full..]);
                }
                for (t, s) in wt.iter_mut().zip(&ws) {
                    t[..k - full].copy_from_slice(&s[full..]);
                }
                let (xs, ws) = (xt.each_ref().map(|a| &a[..]), wt.each_ref().map(|a| &a[..]));
                let off = 0;
                $( dot_kernel!(@row acc, xs, ws, off, $i, $js); )*
            }
            let mut out = [[0.0f32; $c]; $r];
            for (o, a) in out.iter_mut().zip(&acc) {
                for (o, a) in o.iter_mut().zip(a) {
                    *o = reduce(a);
                }
            }
            out
        }
    };
    (@row $acc:ident, $xs:ident, $ws:ident, $off:ident, $i:tt, [$($j:tt),*]) => {
        $( fmadd(&mut $acc[$i][$j], &$xs[$i][$off..$off + LANES], &$ws[$j][$off..$off + LANES]); )*
    };
}

dot_kernel!(dot_1x1, 1, 1, [0], [0]);
dot_kernel!(dot_1x3, 1, 3, [0], [0, 1, 2]);
dot_kernel!(dot_1x4, 1, 4, [0], [0, 1, 2, 3]);
dot_kernel!(dot_2x3, 2, 3, [0, 1], [0, 1, 2]);

/// The dot product of two equal-length slices, in the crate's fixed reduction order: the
/// definition every kernel reproduces bit for bit, at every instruction-set level.
///
/// # Panics
/// If the lengths differ.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
    dot_1x1([a], [b], a.len())[0][0]
}
