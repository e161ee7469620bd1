//! The engine's matmul over weights held in each GGUF block type, against Q4_1 (the type
//! whose kernels were tuned first) on the same shape, side by side in one run.
//!
//! Shapes are Gemma 3 270M's MLP: `2048x640` (gate and up: 2048 rows of 640, which only the
//! 32-value types divide) and `640x2048` (down: every type). For each, decode (`m1`: one
//! activation row, the gemv) and prefill (`m64`: 64 rows), and the dequantization alone
//! (`dequant`: four rows at a time into an L1 buffer, one thread). These fit in the caches;
//! decode streams its weights from memory, so two more groups do: `m1/262144x640` is the gemv
//! of Gemma's output matrix, 262,144 rows of 640 (105-178 MB), as Gemma's GGUF holds it
//! (Q8_0) and as Q4_1, and `m1/32768x2048` that of 32,768 rows of 2,048 in Q4_K, Q5_K and
//! Q6_K against Q4_1 (a K-quant block asking for one cache line ahead instead of all of them
//! was the same in cache and up to 1.35x slower here). A kernel change for decode is judged
//! on those groups and on `bench_speed`'s decode, never on the cached shapes alone: dot
//! products of two rows interleaved were 1.1-1.9x faster on those at AVX-512, and Gemma 3's
//! decode 20-35% slower.
//! The level is `AGENTKV_SIMD`'s, else the best this CPU has (so `AGENTKV_SIMD=avx2` measures
//! the AVX2 forms on an AVX-512 machine). Ratios to Q4_1 come from criterion's estimates:
//! `python3 benches/quant_ratios.py` prints them as a table.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use engine::Isa;
use engine::testing::{BenchWeight, values};

/// `(rows, cols)` of the weights measured.
const SHAPES: [(usize, usize); 2] = [(2048, 640), (640, 2048)];

/// `(rows, cols)` of the matrices whose gemv streams from memory, and their types: Gemma 3's
/// output matrix as its GGUF holds it (Q8_0) and as Q4_1, then a `2048`-wide matrix of 32,768
/// rows (37-55 MB) in the K-quants a Q4_K_M or Q5_K_M file mixes, against Q4_1.
const STREAMED: [(usize, usize, &[&str]); 2] = [
    (262_144, 640, &["Q4_1", "Q8_0"]),
    (32_768, 2048, &["Q4_1", "Q4_K", "Q5_K", "Q6_K"]),
];

fn quantized_matmul(c: &mut Criterion) {
    let isa = Isa::from_env().expect("AGENTKV_SIMD names a level this CPU has");
    for (rows, cols) in SHAPES {
        let weights: Vec<(&str, BenchWeight)> = BenchWeight::types()
            .into_iter()
            .filter_map(|t| BenchWeight::random(t, rows, cols, 7).map(|w| (t, w)))
            .collect();
        for m in [1, 64] {
            let x = values(m * cols, 11);
            let mut g = c.benchmark_group(format!("{}/m{m}/{rows}x{cols}", isa.name()));
            g.sample_size(30)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(3))
                .throughput(Throughput::Elements((m * rows * cols) as u64));
            for (name, w) in &weights {
                g.bench_function(*name, |b| {
                    b.iter(|| black_box(w.matmul(isa, black_box(&x), m)))
                });
            }
            g.finish();
        }
        // The dequantization alone, as decode does it: four rows at a time into a buffer that
        // stays in L1.
        let mut g = c.benchmark_group(format!("{}/dequant/{rows}x{cols}", isa.name()));
        g.sample_size(30)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements((rows * cols) as u64));
        // Aligned to 64 bytes as the matmul's own buffer is: unaligned, each 64-byte store
        // straddles two cache lines, and the figure measured where the buffer fell.
        let mut raw = vec![0.0f32; 4 * cols + 15];
        let at = raw.as_ptr().align_offset(64);
        let buf = &mut raw[at..at + 4 * cols];
        for (name, w) in &weights {
            g.bench_function(*name, |b| {
                b.iter(|| {
                    for r0 in (0..rows).step_by(4) {
                        w.dequantize_rows(isa, r0, buf);
                    }
                    black_box(&*buf);
                })
            });
        }
        g.finish();
    }
    for (rows, cols, types) in STREAMED {
        let x = values(cols, 11);
        let mut g = c.benchmark_group(format!("{}/m1/{rows}x{cols}", isa.name()));
        g.sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements((rows * cols) as u64));
        for &name in types {
            let w = BenchWeight::random(name, rows, cols, 7).expect("a type the kernels hold");
            g.bench_function(name, |b| {
                b.iter(|| black_box(w.matmul(isa, black_box(&x), 1)))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, quantized_matmul);
criterion_main!(benches);
