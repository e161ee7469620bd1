//! Every kernel against its definition, and at every instruction-set level this CPU has
//! against the portable build, bit for bit.

use kv_extract::{KvCache, KvDtype, KvShape};

use super::attention::{
    Task, accumulate_any, accumulate_group, attention_tasks, exp_and_sum, scale_and_max,
};
use super::dot::{LANES, dot, reduce};
use super::elementwise::exp;
use super::isa::{Isa, for_each_isa};
use super::matmul::{panel, panel_portable};
use super::quant::{QKind, QMatrix};
use super::*;
use crate::testing::values;

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Attention of `n_heads` query heads of width `head_dim` with the usual scale.
fn spec(n_heads: usize, head_dim: usize, window: Option<usize>) -> AttentionSpec {
    AttentionSpec {
        n_heads,
        scale: 1.0 / (head_dim as f32).sqrt(),
        window,
    }
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[test]
fn dot_matches_f64_reference() {
    for k in [1, 7, 16, 33, 64, 576, 1537] {
        let a = values(k, 1);
        let b = values(k, 2);
        let got = dot(&a, &b) as f64;
        let want = dot_f64(&a, &b);
        assert!(
            (got - want).abs() <= 1e-5 * (k as f64).sqrt(),
            "k={k}: {got} vs {want}"
        );
    }
}

#[test]
fn panel_is_the_portable_panel_bitwise_at_every_level() {
    // Row counts around the 2x3, 1x4, 4x6, 6x4 and 2x4 tiles and the MB sweep (with 4x6
    // tiles, the last four or five weight rows in 6x4 ones, the last one to three alone);
    // widths of one chunk up to the model's 1536, and widths that are not whole chunks (the
    // recompiled portable panel instead of the hand-written one).
    let shapes = [
        (16, 12, 640),
        (8, 17, 64),
        (9, 15, 32),
        (4, 6, 16),
        (3, 6, 48),
        (38, 11, 16),
        (1, 9, 64),
        (1, 3, 16),
        (2, 3, 16),
        (5, 7, 576),
        (16, 12, 576),
        (33, 13, 48),
        (70, 4, 1536),
        (13, 9, 64),
        (6, 4, 32),
        (1, 11, 100),
        (7, 11, 100),
    ];
    for_each_isa(|isa| {
        for (m, rows, k) in shapes {
            let x = values(m * k, 41);
            let w = values(rows * k, 42);
            // A column block of a wider output: columns outside it stay untouched.
            let ld = rows + 5;
            let mut want = vec![0.0; m * ld];
            panel_portable(&x, m, k, &w, rows, &mut want, ld);
            let mut got = vec![0.0; m * ld];
            panel(isa, &x, m, k, &w, rows, &mut got, ld);
            assert_eq!(bits(&got), bits(&want), "{isa:?} m={m} rows={rows} k={k}");
        }
    });
}

#[test]
fn dot_is_the_fused_16_lane_definition() {
    // An independent scalar statement of the definition: 16 lanes of fused multiply-adds
    // (the tail zero-padded), folded by `reduce`'s tree.
    fn reference(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; LANES];
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            acc[i % LANES] = x.mul_add(y, acc[i % LANES]);
        }
        reduce(&acc)
    }
    // The same order with a separate multiply and add: what the test must tell apart.
    fn unfused(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; LANES];
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            acc[i % LANES] += x * y;
        }
        reduce(&acc)
    }
    let mut fused_differs = false;
    for k in [1, 15, 16, 17, 64, 100] {
        for seed in 0..8 {
            let a = values(k, 40 + seed);
            let b = values(k, 80 + seed);
            let want = reference(&a, &b);
            assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "k {k}");
            fused_differs |= unfused(&a, &b).to_bits() != want.to_bits();
        }
    }
    // Otherwise the test could not tell a fused dot from a plain one.
    assert!(
        fused_differs,
        "no input told the fused dot from the unfused one"
    );
}

/// `out[i * ld + j]` is `dot(a[i], b[j])` bit for bit for every row of `a` and of `b` (`k`
/// values each), and the gaps of a row wider than `b` (`ld` apart) still hold the NaN they
/// were filled with.
#[cfg(target_arch = "x86_64")]
fn assert_scores_are_dot(out: &[f32], a: &[f32], b: &[f32], k: usize, ld: usize, what: &str) {
    let (na, nb) = (a.len() / k, b.len() / k);
    for i in 0..na {
        for j in 0..ld {
            let got = out[i * ld + j];
            if j >= nb {
                assert!(
                    got.is_nan(),
                    "{what} {na}x{nb}x{k} ld {ld} wrote ({i}, {j})"
                );
                continue;
            }
            let want = dot(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{what} {na}x{nb}x{k} ld {ld} ({i}, {j})"
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn scores_from_the_quarter_layout_are_dot_bitwise() {
    // The layout is AVX-512's alone.
    for_each_isa(|isa| {
        if isa.level() != isa::Level::Avx512 {
            return;
        }
        quarter_scores_are_dot_bitwise(isa);
    });
}

#[cfg(target_arch = "x86_64")]
fn quarter_scores_are_dot_bitwise(isa: Isa) {
    use super::x86::{Keys, gram_quarters, quarters};
    // SmolLM2's and Gemma 3's head widths and narrower ones; one block of keys and three.
    for (na, nb, k) in [
        (9, 16, 64),
        (1, 48, 64),
        (5, 32, 256),
        (3, 16, 16),
        (8, 48, 48),
    ] {
        let a = values(na * k, 33);
        // Finite halves of both signs (exponents up to 14, subnormals among them), and the
        // same keys as f32.
        let halves: Vec<u16> = crate::testing::xorshift(34, 0x9e37_79b9)
            .take(nb * k)
            .map(|x| x as u16 & 0xbbff)
            .collect();
        let b: Vec<f32> = halves.iter().map(|&h| kv_extract::f16_to_f32(h)).collect();
        for keys in [Keys::F32(&b), Keys::F16(&halves)] {
            let mut kq = vec![f32::NAN; nb * k];
            quarters(isa, keys, nb, k, &mut kq, &[]);
            for ld in [nb, nb + 5] {
                let mut out = vec![f32::NAN; na * ld];
                gram_quarters(isa, &a, na, &kq, nb, k, &mut out, ld);
                assert_scores_are_dot(&out, &a, &b, k, ld, &format!("{isa:?} quarters"));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn gram_is_dot_bitwise_at_every_simd_level() {
    // Odd counts on both sides exercise every edge micro-kernel, and more keys than an AVX2
    // pass takes (66) its passes and their tails.
    for_each_isa(|isa| {
        if !isa.is_simd() {
            return;
        }
        for (na, nb, k) in [
            (1, 7, 64),
            (5, 7, 64),
            (4, 9, 32),
            (3, 2, 576),
            (9, 13, 64),
            (1, 16, 64),
            (3, 37, 64),
            (20, 50, 64),
            (2, 50, 16),
            (4, 140, 64),
            (3, 67, 32),
        ] {
            let a = values(na * k, 31);
            let b = values(nb * k, 32);
            // Rows of scores packed, and apart in a wider buffer (a chunk of K rows scored
            // into each query's row of a longer history), whose gaps stay untouched.
            for ld in [nb, nb + 5] {
                let mut out = vec![f32::NAN; na * ld];
                super::x86::gram(isa, &a, na, &b, nb, k, &mut out, ld);
                assert_scores_are_dot(&out, &a, &b, k, ld, &format!("{isa:?}"));
            }
        }
    });
}

/// The portable accumulation of 64-wide queries (`start.len() / 64` of them), one value at a
/// time: from `start`, for each query `q` and each V row `j` in `rows` in order,
/// `o[q][l] = fma(scores[q * len + j], v[j * stride + l], o[q][l])`.
#[cfg(target_arch = "x86_64")]
fn v_sums_64(
    start: &[f32],
    scores: &[f32],
    len: usize,
    rows: std::ops::Range<usize>,
    v: &[f32],
    stride: usize,
) -> Vec<f32> {
    let mut o = start.to_vec();
    for (q, o) in o.chunks_exact_mut(64).enumerate() {
        for j in rows.clone() {
            let p = scores[q * len + j];
            for (l, o) in o.iter_mut().enumerate() {
                *o = p.mul_add(v[j * stride + l], *o);
            }
        }
    }
    o
}

#[cfg(target_arch = "x86_64")]
#[test]
fn pv_6x64_is_the_portable_accumulation_bitwise() {
    // Six queries' weights 70 apart over V rows 3..61 (not a whole number of anything), on
    // top of outputs that already hold sums; V rows 64 wide (SmolLM2's heads) and 64 columns
    // of 256-wide rows (Gemma 3's), the second of the four.
    let (len, rows) = (70, 3..61);
    let scores = values(6 * len, 71);
    let start = values(6 * 64, 73);
    for (stride, col) in [(64, 0), (256, 64)] {
        let v = values(len * stride, 72);
        let want = v_sums_64(&start, &scores, len, rows.clone(), &v[col..], stride);
        for_each_isa(|isa| {
            if isa.name() != "avx512" {
                return;
            }
            let mut got = start.clone();
            let v = &v[col..];
            super::x86::pv_6x64(isa, &mut got, &scores, len, rows.clone(), v, stride);
            assert_eq!(bits(&got), bits(&want), "stride {stride}");
            super::x86::pv_6x64(isa, &mut got, &scores, len, 70..70, v, stride);
            assert_eq!(bits(&got), bits(&want), "stride {stride}: an empty run");
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn pv_1x64_and_2x64_are_the_portable_accumulation_bitwise() {
    // One query's and two queries' weights (90 apart) over V rows 5..83, on top of outputs
    // that already hold sums, 64 wide and the last 64 columns of 256-wide rows; and an empty
    // run at the end, which must leave the outputs alone.
    let (len, rows) = (90, 5..83);
    for queries in [1, 2] {
        let scores = values(queries * len, 81);
        let start = values(queries * 64, 83);
        for (stride, col) in [(64, 0), (256, 192)] {
            let v = values(len * stride, 82);
            let want = v_sums_64(&start, &scores, len, rows.clone(), &v[col..], stride);
            for_each_isa(|isa| {
                if !isa.is_simd() {
                    return;
                }
                let v = &v[col..];
                let run = |got: &mut [f32], rows| match queries {
                    1 => super::x86::pv_1x64(isa, got, &scores, rows, v, stride),
                    _ => super::x86::pv_2x64(isa, got, &scores, len, rows, v, stride),
                };
                let mut got = start.clone();
                run(&mut got, rows.clone());
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{isa:?}, {queries}, stride {stride}"
                );
                run(&mut got, 90..90);
                assert_eq!(bits(&got), bits(&want), "{isa:?}, {queries}: an empty run");
            });
        }
    }
}

#[test]
fn grouped_v_sums_are_the_one_query_definition_bitwise_at_every_level() {
    // Every group size the attention uses, on SmolLM2's 64-wide heads, Gemma 3's 256-wide
    // ones (64 columns at a time) and a width that is neither; runs that start and end
    // mid-chunk, and an empty one.
    let len = 64;
    for d in [64, 256, 48] {
        let v = values(len * d, 91);
        let scores = values(6 * len, 92);
        let start = values(6 * d, 93);
        for group in [1, 2, 4, 6] {
            for rows in [0..64, 3..61, 17..17] {
                let mut want = start[..group * d].to_vec();
                accumulate_any(&mut want, &scores, len, rows.clone(), &v, d);
                for_each_isa(|isa| {
                    if group == 6 && isa.name() != "avx512" {
                        return;
                    }
                    let mut got = start[..group * d].to_vec();
                    accumulate_group(isa, &mut got, &scores, len, rows.clone(), &v, d, group);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "d {d}, {group} queries, {rows:?}, {isa:?}"
                    );
                });
            }
        }
    }
}

#[test]
fn matmul_matches_reference_and_is_batch_invariant() {
    let (m, n, k) = (37, 29, 100);
    let x = values(m * k, 5);
    let wv = values(n * k, 6);
    let w = Weight::from_f32(n, k, wv.clone()).expect("sizes match");
    let y = matmul(Isa::PORTABLE, &x, m, &w);
    for i in 0..m {
        for j in 0..n {
            let want = dot_f64(&x[i * k..(i + 1) * k], &wv[j * k..(j + 1) * k]);
            assert!((y[i * n + j] as f64 - want).abs() < 1e-4);
            // Bitwise the lone dot, and bitwise the row computed on its own.
            assert_eq!(
                y[i * n + j].to_bits(),
                dot(&x[i * k..(i + 1) * k], &wv[j * k..(j + 1) * k]).to_bits()
            );
        }
        let alone = matmul(Isa::PORTABLE, &x[i * k..(i + 1) * k], 1, &w);
        assert_eq!(&y[i * n..(i + 1) * n], &alone[..]);
    }
    for_each_isa(|isa| {
        assert_eq!(bits(&matmul(isa, &x, m, &w)), bits(&y), "{isa:?}");
        let one = matmul(isa, &x[..k], 1, &w);
        assert_eq!(bits(&one), bits(&y[..n]), "{isa:?}");
    });
}

#[test]
fn quantized_matmul_equals_dequantized_bitwise() {
    let (m, n, k) = (37, 29, 96);
    // Q4_1 blocks: f16 scale 0.25, f16 min -1.0, nibbles from a pattern.
    let mut raw = Vec::new();
    for b in 0..n * k / 32 {
        raw.extend_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        raw.extend_from_slice(&half::f16::from_f32(-1.0 + b as f32 * 0.01).to_le_bytes());
        raw.extend((0..16u8).map(|i| i.wrapping_mul(37).wrapping_add(b as u8)));
    }
    let q = QMatrix::from_gguf_blocks(QKind::Q4_1, n, k, &raw).expect("blocks");
    let wf = Weight::from_f32(n, k, q.to_f32()).expect("sizes");
    let wq = Weight::from_quant(q);
    let x = values(m * k, 8);
    let b = matmul(Isa::PORTABLE, &x, m, &wf);
    for_each_isa(|isa| {
        let a = matmul(isa, &x, m, &wq);
        assert_eq!(bits(&a), bits(&b), "{isa:?}");
        let alone = matmul(isa, &x[..k], 1, &wq);
        assert_eq!(bits(&alone), bits(&b[..n]), "{isa:?}");
    });
}

#[test]
fn every_quantized_kind_multiplies_as_its_dequantized_matrix_bitwise() {
    // Decode (one row: each kind's register gemv), a few rows, and more than a 2x3 or 6x4 tile
    // sweep, at every level, against the f32 matmul of the dequantized matrix at the portable
    // level.
    for kind in QKind::ALL {
        let (n, k) = (29, 3 * kind.block_values());
        let q = crate::kernels::quant::tests::matrix(kind, n, k, 21);
        let wf = Weight::from_f32(n, k, q.to_f32()).expect("sizes");
        let wq = Weight::from_quant(q);
        assert!(wq.bytes() < wf.bytes() / 3, "{kind:?} is held quantized");
        // 1: the gemv; 3 and 17: a turn's panels, each writing its columns; 40: a prompt's
        // tasks, each a chunk of its own.
        for m in [1, 3, 17, 40] {
            let x = values(m * k, 30 + m as u64);
            let want = matmul(Isa::PORTABLE, &x, m, &wf);
            for_each_isa(|isa| {
                let got = matmul(isa, &x, m, &wq);
                assert_eq!(bits(&got), bits(&want), "{kind:?} m={m} {isa:?}");
            });
        }
    }
}

#[test]
fn split_kinds_widen_their_scales_right_at_every_row_width() {
    // The split kinds' rows widen their scales 64 blocks at a time, 8 per instruction, the
    // last eight overlapping and fewer than eight one by one: rows of 3, 8, 18 (SmolLM2's 576
    // columns) and 150 blocks (two buffers and a tail) cover each path.
    for kind in QKind::ALL.into_iter().filter(|k| k.split()) {
        for blocks in [3, 8, 18, 150] {
            let (n, k) = (5, blocks * kind.block_values());
            let q = crate::kernels::quant::tests::matrix(kind, n, k, 23);
            let wf = Weight::from_f32(n, k, q.to_f32()).expect("sizes");
            let wq = Weight::from_quant(q);
            for m in [1, 7] {
                let x = values(m * k, 50 + m as u64);
                let want = matmul(Isa::PORTABLE, &x, m, &wf);
                for_each_isa(|isa| {
                    let got = matmul(isa, &x, m, &wq);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{kind:?} {blocks} blocks m={m} {isa:?}"
                    );
                });
            }
        }
    }
}

#[test]
fn weights_of_different_kinds_stack_without_dequantizing() {
    // A Q4_K_M file's attention: Q5_0 Q and K over a Q8_0 V; and an f32 part and a K-quant.
    let k = 256;
    let matrix = crate::kernels::quant::tests::matrix;
    let parts = vec![
        Weight::from_quant(matrix(QKind::Q5_0, 5, k, 1)),
        Weight::from_quant(matrix(QKind::Q5_0, 4, k, 2)),
        Weight::from_quant(matrix(QKind::Q8_0, 3, k, 3)),
        Weight::from_f32(2, k, values(2 * k, 4)).expect("sizes"),
        Weight::from_quant(matrix(QKind::Q4K, 7, k, 5)),
    ];
    let bytes: usize = parts.iter().map(Weight::bytes).sum();
    let flat: Vec<f32> = parts.iter().flat_map(|p| p.clone().into_f32()).collect();
    let stack = Weight::concat_rows(parts).expect("same width");
    assert!(matches!(stack.data, weight::WeightData::Stack(_)));
    assert_eq!((stack.rows, stack.cols, stack.bytes()), (21, k, bytes));
    let wf = Weight::from_f32(21, k, flat.clone()).expect("sizes");
    let mut row = vec![0.0f32; k];
    for r in [0, 4, 5, 9, 12, 13, 14, 20] {
        stack.row_into(r, &mut row);
        assert_eq!(bits(&row), bits(&flat[r * k..(r + 1) * k]), "row {r}");
    }
    // The stack against its rows as one f32 matrix, at every level, for `m` rows of x.
    let multiplies_as = |stack: &Weight, wf: &Weight, m: usize, seed: u64| {
        let x = values(m * k, seed);
        let want = matmul(Isa::PORTABLE, &x, m, wf);
        for_each_isa(|isa| {
            assert_eq!(
                bits(&matmul(isa, &x, m, stack)),
                bits(&want),
                "{} rows, m={m} {isa:?}",
                wf.rows
            );
        });
    };
    for m in [1, 3, 17] {
        multiplies_as(&stack, &wf, m, 40 + m as u64);
    }
    // Quantized parts alone multiply in one region, their panels written straight to their
    // columns (a turn's rows), or part by part (decode, a prompt's rows).
    let parts = vec![
        Weight::from_quant(matrix(QKind::Q5_0, 29, k, 7)),
        Weight::from_quant(matrix(QKind::Q5_0, 13, k, 8)),
        Weight::from_quant(matrix(QKind::Q8_0, 7, k, 9)),
        Weight::from_quant(matrix(QKind::Q6K, 24, k, 10)),
    ];
    let flat: Vec<f32> = parts.iter().flat_map(|p| p.clone().into_f32()).collect();
    let stack = Weight::concat_rows(parts).expect("same width");
    let wf = Weight::from_f32(73, k, flat).expect("sizes");
    for m in [1, 2, 16, 32, 33] {
        multiplies_as(&stack, &wf, m, 60 + m as u64);
    }
    // One kind stays one matrix.
    let same = Weight::concat_rows(vec![
        Weight::from_quant(matrix(QKind::Q6K, 2, k, 6)),
        Weight::from_quant(matrix(QKind::Q6K, 3, k, 7)),
    ])
    .expect("same width");
    assert!(matches!(same.data, weight::WeightData::Quant(_)));
}

#[test]
fn weight_concat_and_rows() {
    let a = Weight::from_f32(1, 2, vec![1.0, 2.0]).expect("sizes match");
    let b = Weight::from_f32(2, 2, vec![3.0, 4.0, 5.0, 6.0]).expect("sizes match");
    let c = Weight::concat_rows(vec![a, b]).expect("same width");
    assert_eq!((c.rows, c.cols), (3, 2));
    let mut row = [0.0; 2];
    c.row_into(2, &mut row);
    assert_eq!(row, [5.0, 6.0]);
    assert!(Weight::from_f32(2, 2, vec![0.0; 3]).is_none());
    let narrow = Weight::from_f32(1, 1, vec![0.0]).expect("sizes match");
    assert!(Weight::concat_rows(vec![c, narrow]).is_none());
}

#[test]
fn rms_norm_of_known_row() {
    let x = [3.0f32, 4.0];
    let mut out = [0.0; 2];
    rms_norm(Isa::PORTABLE, &x, &[1.0, 2.0], 0.0, &mut out);
    let r = (12.5f32).sqrt();
    assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    // Rows of the model's width at every level: the portable bits.
    let (x, w) = (values(3 * 576, 11), values(576, 12));
    let mut want = vec![0.0; x.len()];
    rms_norm(Isa::PORTABLE, &x, &w, 1e-5, &mut want);
    for_each_isa(|isa| {
        let mut got = vec![f32::NAN; x.len()];
        rms_norm(isa, &x, &w, 1e-5, &mut got);
        assert_eq!(bits(&got), bits(&want), "{isa:?}");
    });
}

#[test]
fn rope_rotates_adjacent_pairs() {
    // head_dim 4, base 10000: pair 0 turns by pos rad, pair 1 by pos / 100 rad.
    let inv = RopeTable::inv_freq(10000.0, 4, None);
    assert!((inv[1] - 0.01).abs() < 1e-12);
    let table = RopeTable::new(&inv, 2, 1);
    let mut x = [1.0f32, 0.0, 0.0, 1.0];
    table.apply(RopeStyle::Interleaved, &mut x, 1, 4);
    let (c0, s0) = (2.0f32.cos(), 2.0f32.sin());
    let (c1, s1) = (0.02f32.cos(), 0.02f32.sin());
    let want = [c0, s0, -s1, c1];
    for (g, w) in x.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{x:?} vs {want:?}");
    }
    // NeoX pairs are (0, 2) and (1, 3).
    let mut x = [1.0f32, 0.0, 0.0, 1.0];
    table.apply(RopeStyle::NeoX, &mut x, 1, 4);
    let want = [c0, -s1, s0, c1];
    for (g, w) in x.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{x:?} vs {want:?}");
    }
    // Position 0 is the identity.
    for style in [RopeStyle::Interleaved, RopeStyle::NeoX] {
        let mut y = [0.3f32, -0.7, 1.5, 2.5];
        RopeTable::new(&inv, 0, 1).apply(style, &mut y, 1, 4);
        assert_eq!(y, [0.3, -0.7, 1.5, 2.5]);
    }
}

#[test]
fn rope_frequency_factors_divide_each_pairs_frequency() {
    // Llama 3's `rope_freqs.weight`: pair i turns by pos * base^(-2i/d) / factors[i].
    let plain = RopeTable::inv_freq(10000.0, 8, None);
    let factors = [1.0f32, 1.5, 8.0, 8.0];
    let scaled = RopeTable::inv_freq(10000.0, 8, Some(&factors));
    for ((p, s), f) in plain.iter().zip(&scaled).zip(factors) {
        assert_eq!(*s, p / f64::from(f));
    }
    assert_eq!(scaled[0], 1.0);
    // At position 3, pair 2 turns by 3 * 0.01 / 8 rad.
    let table = RopeTable::new(&scaled, 3, 1);
    let mut x = [0.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    table.apply(RopeStyle::Interleaved, &mut x, 1, 8);
    let angle = 3.0 * 0.01 / 8.0;
    assert!((x[4] - (angle as f32).cos()).abs() < 1e-7, "{x:?}");
    assert!((x[5] - (angle as f32).sin()).abs() < 1e-7, "{x:?}");
}

#[test]
fn gelu_matches_the_tanh_formula() {
    let f = 5;
    let gate: Vec<f32> = vec![-12.0, -1.5, 0.0, 0.7, 30.0];
    let up = values(f, 3);
    let mut gate_up = gate.clone();
    gate_up.extend_from_slice(&up);
    let mut got = Vec::new();
    gelu_mul_rows(Isa::PORTABLE, &gate_up, f, &mut got);
    for ((&g, &u), &y) in gate.iter().zip(&up).zip(&got) {
        let x = g as f64;
        let want = 0.5
            * x
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
            * u as f64;
        assert!(
            (y as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
            "gelu({g}) * {u}: {y} vs {want}"
        );
    }
}

#[test]
fn exp_is_close_to_libm() {
    let mut worst = 0.0f64;
    for i in 0..200_000 {
        let x = -87.0 + i as f32 * (175.0 / 200_000.0);
        let got = exp(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max(((got - want) / want).abs());
    }
    assert!(worst < 4e-7, "relative error {worst:e}");
    // The integer part read from the bits is `n as i32`, bit for bit, over the whole
    // clamped range and past both ends.
    let as_cast = |x: f32| {
        let x = x.clamp(-87.0, 88.0);
        let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        n as i32
    };
    for i in 0..400_000 {
        let x = -100.0 + i as f32 * (200.0 / 400_000.0);
        let t = x.clamp(-87.0, 88.0) * std::f32::consts::LOG2_E + 12_582_912.0;
        assert_eq!(
            t.to_bits().wrapping_sub(12_582_912.0f32.to_bits()) as i32,
            as_cast(x),
            "{x}"
        );
    }
    assert!(exp(f32::NAN).is_nan());
    assert_eq!(exp(0.0), 1.0);
    assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
}

/// A softmax denominator as the definition sums it: lane j % 16 sums positions j in order,
/// then the 16 lanes fold as ((l + l8) + (l4 + l12)) pairs: ((s4[0] + s4[2]) + (s4[1] +
/// s4[3])).
fn lane_sum(e: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for (j, &x) in e.iter().enumerate() {
        lanes[j % 16] += x;
    }
    let s4: Vec<f32> = (0..4)
        .map(|l| (lanes[l] + lanes[l + 8]) + (lanes[l + 4] + lanes[l + 12]))
        .collect();
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

#[test]
fn softmax_helpers_match_their_definitions_bitwise() {
    let len = 203;
    for nq in [1, 3, 4, 9] {
        let mut scores = values(nq * len, 51);
        let lens: Vec<usize> = (0..nq).map(|i| len - (i * 7) % 11).collect();
        for (i, &n) in lens.iter().enumerate() {
            let row = &mut scores[i * len..i * len + n];
            let mut seq = row.to_vec();
            for x in &mut seq {
                *x *= 0.125;
            }
            let want = seq.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(scale_and_max(row, 0.125).to_bits(), want.to_bits());
            assert_eq!(row, &seq[..]);
        }
    }
    // exp_and_sum: the exponentials summed as `lane_sum` defines.
    for n in [0, 1, 15, 16, 17, 64, 80, 203] {
        let row = values(n, 52);
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let e: Vec<f32> = row.iter().map(|&x| exp(x - max)).collect();
        let want = lane_sum(&e);
        for_each_isa(|isa| {
            let mut row = row.clone();
            assert_eq!(
                exp_and_sum(isa, &mut row, max).to_bits(),
                want.to_bits(),
                "n={n} {}",
                isa.name()
            );
            assert_eq!(bits(&row), bits(&e), "{}", isa.name());
        });
        let f64_sum: f64 = e.iter().map(|&x| x as f64).sum();
        assert!((want as f64 - f64_sum).abs() <= 1e-6 * f64_sum.max(1.0));
    }
    assert_eq!(scale_and_max(&mut [], 2.0), f32::NEG_INFINITY);
}

#[test]
fn softmax_exponentials_are_exps_bits_at_every_level() {
    // Scores over and past the clamp on both sides, both zeros, infinities, NaN and
    // subnormals; each less a maximum (a score's own, 0, a large one) and summed in lanes,
    // against `exp` one value at a time.
    let mut scores: Vec<f32> = (0..4096)
        .map(|i| (i as f32 - 2048.0) * 0.061)
        .chain(values(1000, 53).iter().map(|v| v * 300.0))
        .collect();
    scores.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-40,
        -1e-40,
        f32::MAX,
        f32::MIN,
        -87.0,
        88.0,
        -87.000_01,
        88.000_01,
    ]);
    scores.resize(scores.len().next_multiple_of(16) + 7, 0.5);
    for max in [0.0, 3.5, 95.0, scores[100]] {
        let e: Vec<f32> = scores.iter().map(|&x| exp(x - max)).collect();
        let want = lane_sum(&e);
        for_each_isa(|isa| {
            let mut row = scores.clone();
            let sum = exp_and_sum(isa, &mut row, max);
            let wrong = (0..row.len()).find(|&j| row[j].to_bits() != e[j].to_bits());
            assert_eq!(
                wrong.map(|j| (scores[j], row[j], e[j])),
                None,
                "(score, exp, want) less max {max} at {}",
                isa.name()
            );
            assert_eq!(sum.to_bits(), want.to_bits(), "max {max} {}", isa.name());
        });
    }
}

#[test]
fn gated_rows_of_a_prefill_split_over_threads_are_each_rows_own_bits() {
    // 40 rows of 2,048 (past the size where rows go to both threads), against each row
    // alone; into a buffer that held more, and other values. At every level, each the
    // portable level's bits.
    let (rows, f) = (40, 2048);
    // Gates over the range where GELU's tanh and SiLU's exp saturate, both signs.
    let gate_up: Vec<f32> = values(rows * 2 * f, 95).iter().map(|v| v * 24.0).collect();
    for gated in [silu_mul_rows, gelu_mul_rows] {
        let mut portable = Vec::new();
        gated(Isa::PORTABLE, &gate_up, f, &mut portable);
        for_each_isa(|isa| {
            let mut all = vec![1.0; rows * f + 100];
            gated(isa, &gate_up, f, &mut all);
            assert_eq!(all.len(), rows * f);
            assert_eq!(bits(&all), bits(&portable), "{}", isa.name());
            let mut one = Vec::new();
            for (r, row) in gate_up.chunks_exact(2 * f).enumerate() {
                gated(isa, row, f, &mut one);
                assert_eq!(
                    bits(&all[r * f..][..f]),
                    bits(&one),
                    "{} row {r}",
                    isa.name()
                );
            }
        });
    }
}

#[test]
fn silu_mul_known_values() {
    let mut out = vec![f32::NAN; 7];
    silu_mul_rows(Isa::PORTABLE, &[0.0, 1.0, 2.0, 3.0], 2, &mut out);
    assert_eq!(out.len(), 2);
    let silu1 = 1.0 / (1.0 + (-1.0f32).exp());
    assert_eq!(out[0], 0.0);
    assert!((out[1] - silu1 * 3.0).abs() < 1e-6);
}

#[test]
fn attention_matches_naive_softmax_and_is_causal() {
    let shape = KvShape {
        n_layers: 1,
        n_kv_heads: 1,
        head_dim: 4,
        window: None,
    };
    let mut cache = KvCache::new(shape, KvDtype::F32);
    let n = 5;
    let k = values(n * 4, 7);
    let v = values(n * 4, 8);
    cache.reserve(n);
    cache.write_rows(0, 0, &k, &v);
    cache.push_tokens(&[0; 5]);
    // Two query heads share the one KV head.
    let q = values(n * 2 * 4, 9);
    let out = attention(Isa::PORTABLE, &q, n, 0, spec(2, 4, None), &cache, 0);
    for t in 0..n {
        for h in 0..2 {
            let qh = &q[(t * 2 + h) * 4..][..4];
            let s: Vec<f64> = (0..=t)
                .map(|j| dot_f64(qh, &k[j * 4..][..4]) / 2.0)
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for dd in 0..4 {
                let want: f64 = (0..=t).map(|j| e[j] / z * v[j * 4 + dd] as f64).sum();
                let got = out[(t * 2 + h) * 4 + dd] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "t={t} h={h} d={dd}: {got} vs {want}"
                );
            }
        }
    }
    // Decoding the last token alone gives the same bits.
    let last = attention(
        Isa::PORTABLE,
        &q[(n - 1) * 8..],
        1,
        n - 1,
        spec(2, 4, None),
        &cache,
        0,
    );
    assert_eq!(&out[(n - 1) * 8..], &last[..]);
}

#[test]
fn sliding_window_attention_sees_only_its_window() {
    let shape = KvShape {
        n_layers: 1,
        n_kv_heads: 1,
        window: None,
        head_dim: 16,
    };
    let (n, window, d) = (40, 7, 16);
    let mut cache = KvCache::new(shape, KvDtype::F32);
    let k = values(n * d, 17);
    let v = values(n * d, 18);
    cache.reserve(n);
    cache.write_rows(0, 0, &k, &v);
    cache.push_tokens(&[0; 40]);
    let q = values(n * d, 19);
    let out = attention(Isa::PORTABLE, &q, n, 0, spec(1, d, Some(window)), &cache, 0);
    for t in 0..n {
        let qt = &q[t * d..][..d];
        let seen = t.saturating_sub(window - 1)..=t;
        let s: Vec<f64> = seen
            .clone()
            .map(|j| dot_f64(qt, &k[j * d..][..d]) / 4.0)
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let z: f64 = e.iter().sum();
        for dd in 0..d {
            let want: f64 = seen
                .clone()
                .zip(&e)
                .map(|(j, e)| e / z * v[j * d + dd] as f64)
                .sum();
            let got = out[t * d + dd] as f64;
            assert!((got - want).abs() < 1e-5, "t={t} d={dd}: {got} vs {want}");
        }
    }
    // A window as long as the history is no window at all.
    let full = attention(Isa::PORTABLE, &q, n, 0, spec(1, d, None), &cache, 0);
    let wide = attention(Isa::PORTABLE, &q, n, 0, spec(1, d, Some(n)), &cache, 0);
    assert_eq!(bits(&full), bits(&wide));
}

#[test]
fn attention_tasks_cover_each_query_once_in_even_shares() {
    for (n, n_heads, group) in [(1, 9, 3), (5, 9, 3), (16, 9, 3), (35, 9, 3), (40, 8, 1)] {
        for threads in 1..=3 {
            let tasks = attention_tasks(n, n_heads, group, threads);
            let mut seen = vec![0; n * n_heads];
            for t in &tasks {
                assert!(t.t0 < t.t1 && t.t1 <= n && t.nh > 0, "{t:?}");
                assert_eq!(
                    t.h0 / group,
                    (t.h0 + t.nh - 1) / group,
                    "{t:?} spans groups"
                );
                for tok in t.t0..t.t1 {
                    for h in t.h0..t.h0 + t.nh {
                        seen[tok * n_heads + h] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "n {n}, {threads} threads");
        }
    }
    // A 16-token turn of SmolLM2 on two threads: one whole group, half the next, the other
    // half and the last; in task order, the two halves of the list are equal work.
    let t = |t0, t1, h0| Task { t0, t1, h0, nh: 3 };
    assert_eq!(
        attention_tasks(16, 9, 3, 2),
        [t(0, 16, 0), t(0, 8, 3), t(8, 16, 3), t(0, 16, 6)]
    );
    // A decode step: the first group and one head of the second, the second's other two and
    // the last; each half of the list reads two KV heads.
    let h = |h0, nh| Task {
        t0: 0,
        t1: 1,
        h0,
        nh,
    };
    assert_eq!(
        attention_tasks(1, 9, 3, 2),
        [h(0, 3), h(3, 1), h(4, 2), h(6, 3)]
    );
}

#[test]
fn attention_is_the_same_bits_in_prefill_tiles_and_decode_tasks_at_every_level() {
    // Groups of three query heads (SmolLM2's), split 2 + 1 in decode. 35 tokens make two
    // full prefill tiles and a partial one; 150 positions make the V sums run over several
    // chunks; a 48-wide head takes the generic (not 64-wide) path. The whole attention also
    // runs on one and on three threads, which split the tiles into other tasks.
    // Each KV dtype the head can hold: rows read in place and converted per chunk.
    let dtypes = [KvDtype::F32, KvDtype::F16, KvDtype::Bf16, KvDtype::Q8_0];
    //
    // Sliding windows: shorter than a tile, not a multiple of 16, longer than a chunk, on
    // Gemma 3's 256-wide heads too; a query's window then starts anywhere in the rows its
    // task reads.
    let cases = [
        (64, 35, None),
        (64, 150, None),
        (48, 21, None),
        (64, 150, Some(70)),
        (48, 40, Some(16)),
        (256, 45, Some(11)),
        (256, 150, None),
        (256, 150, Some(100)),
    ];
    for (d, n, window, dtype) in cases
        .into_iter()
        .flat_map(|(d, n, w)| dtypes.map(|dtype| (d, n, w, dtype)))
        .filter(|&(d, _, _, dtype)| dtype.row_bytes(d).is_some())
    {
        let (n_kv, group) = (2, 3);
        let n_heads = n_kv * group;
        let shape = KvShape {
            n_layers: 1,
            window: None,
            n_kv_heads: n_kv,
            head_dim: d,
        };
        let mut cache = KvCache::new(shape, dtype);
        cache.reserve(n);
        cache.write_rows(0, 0, &values(n * n_kv * d, 61), &values(n * n_kv * d, 62));
        cache.push_tokens(&vec![0; n]);
        let q = values(n * n_heads * d, 63);
        let row = n_heads * d;
        let all = attention(Isa::PORTABLE, &q, n, 0, spec(n_heads, d, window), &cache, 0);
        // The definition: attention over the f32 values the cache holds.
        let exact = cache.convert(KvDtype::F32);
        let want = attention(Isa::PORTABLE, &q, n, 0, spec(n_heads, d, window), &exact, 0);
        assert_eq!(
            bits(&all),
            bits(&want),
            "d {d}, window {window:?}, {dtype}: not the f32 definition"
        );
        for_each_isa(|isa| {
            let at = attention(isa, &q, n, 0, spec(n_heads, d, window), &cache, 0);
            assert_eq!(
                bits(&at),
                bits(&all),
                "d {d}, window {window:?}, {dtype}, {isa:?}"
            );
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let other =
                    pool.install(|| attention(isa, &q, n, 0, spec(n_heads, d, window), &cache, 0));
                assert_eq!(
                    bits(&other),
                    bits(&all),
                    "d {d}, window {window:?}, {dtype}, {threads} threads, {isa:?}"
                );
            }
            for t in 0..n {
                let one = attention(
                    isa,
                    &q[t * row..][..row],
                    1,
                    t,
                    spec(n_heads, d, window),
                    &cache,
                    0,
                );
                let want = bits(&all[t * row..][..row]);
                assert_eq!(
                    bits(&one),
                    want,
                    "d {d}, window {window:?}, {dtype}, token {t}, {isa:?}"
                );
            }
            // A few tokens at once (split as decode is, with causal lengths), and one tile.
            for (t0, m) in [(5, 3), (n - 7, 7), (n - 8, 8)] {
                let q = &q[t0 * row..][..m * row];
                let part = attention(isa, q, m, t0, spec(n_heads, d, window), &cache, 0);
                let want = bits(&all[t0 * row..][..m * row]);
                assert_eq!(
                    bits(&part),
                    want,
                    "d {d}, window {window:?}, {dtype}, {t0}+{m}, {isa:?}"
                );
            }
        });
    }
}

#[test]
fn f16_rows_widen_to_the_same_bits_at_every_level() {
    // Every half-precision value, in a length that leaves a tail past the 8-wide steps.
    let halves: Vec<u16> = (0..=u16::MAX).chain(0..5).collect();
    let want: Vec<u32> = halves
        .iter()
        .map(|&h| kv_extract::f16_to_f32(h).to_bits())
        .collect();
    for_each_isa(|isa| {
        #[cfg(target_arch = "x86_64")]
        if isa.is_simd() {
            // What the conversion asks the CPU for on the way (none, fewer lines than it
            // converts, more) changes no value.
            let next = vec![7u8; 300_000];
            for ahead in [&next[..0], &next[..1000], &next[..]] {
                let mut got = vec![0.0f32; halves.len()];
                super::x86::f16_to_f32(isa, &halves, &mut got, ahead);
                assert_eq!(bits(&got), want, "{isa:?} {} bytes ahead", ahead.len());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
    });
}

#[test]
fn q8_0_rows_widen_to_the_same_bits_at_every_level() {
    // Blocks with every scale sign and size and every quant byte, through the cache's own
    // writer and reader.
    let shape = KvShape {
        window: None,
        n_layers: 1,
        n_kv_heads: 1,
        head_dim: 64,
    };
    let n = 40;
    let mut cache = KvCache::new(shape, KvDtype::Q8_0);
    cache.reserve(n);
    let rows: Vec<f32> = values(n * 64, 71)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1 << (i % 23)) as f32 * 1e-3)
        .collect();
    cache.write_rows(0, 0, &rows, &rows);
    cache.push_tokens(&vec![0; n]);
    let k = cache.k_head(0, 0, 0..n);
    let mut want = vec![0.0f32; n * 64];
    k.to_f32(0..n, &mut want);
    for_each_isa(|isa| {
        #[cfg(target_arch = "x86_64")]
        if isa.is_simd() {
            let next = vec![7u8; 5000];
            for ahead in [&next[..0], &next[..100], &next[..]] {
                let mut got = vec![0.0f32; n * 64];
                super::x86::q8_0_to_f32(isa, k.bytes(), &mut got, ahead);
                let n = ahead.len();
                assert_eq!(bits(&got), bits(&want), "{isa:?} {n} bytes ahead");
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
    });
}
