//! The machine's limits a resume's time is judged against, both measured: memory bandwidth (a
//! parallel copy of 512 MiB, bytes read plus bytes written per second, best of five) and the
//! f32 fused multiply-add peak at each instruction-set level the CPU has (every thread running
//! independent FMA chains on registers, best of five).
//!
//! Measured, not computed from the clock: cores differ in how many FMA pipes they have and how
//! wide they are (an AMD Zen 4 core runs a 512-bit FMA as two 256-bit halves, so its AVX-512
//! peak is its AVX2 peak; an Intel server core has two 512-bit pipes), and a virtual machine's
//! clock is not what `/proc/cpuinfo` says.
//!
//! `cargo run --release -p engine --example machine`
//!
//! Prints `MACHINE {json}` on stdout.

mod common;

use std::time::Instant;

use anyhow::Result;
use engine::Isa;
use rayon::prelude::*;

fn main() -> std::process::ExitCode {
    common::main(run)
}

fn run() -> Result<()> {
    const BYTES: usize = 512 << 20;
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    let threads = rayon::current_num_threads();
    let chunk = BYTES / threads;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    let bandwidth = 2.0 * BYTES as f64 / best;

    // Each level's peak as its own figure (`fma_peak_flops_avx2`, ...): a benchmark run at a
    // lower level than the best is judged against that level's peak.
    let mut levels = serde_json::Map::new();
    let mut peak = (0.0f64, "portable");
    for isa in Isa::available() {
        let Some(flops) = fma::flops_per_second(isa.name(), threads) else {
            continue;
        };
        eprintln!(
            "f32 FMA peak at {}: {:.0} GFLOP/s ({threads} threads)",
            isa.name(),
            flops / 1e9
        );
        levels.insert(format!("fma_peak_flops_{}", isa.name()), flops.into());
        if flops > peak.0 {
            peak = (flops, isa.name());
        }
    }
    eprintln!(
        "memory bandwidth {:.1} GB/s (copy, read + write); f32 FMA peak {:.0} GFLOP/s ({})",
        bandwidth / 1e9,
        peak.0 / 1e9,
        peak.1
    );
    let mut row = levels;
    row.insert("bandwidth_bytes_s".into(), bandwidth.into());
    row.insert("fma_peak_flops".into(), peak.0.into());
    row.insert("fma_peak_isa".into(), peak.1.into());
    row.insert("threads".into(), threads.into());
    println!("MACHINE {}", serde_json::Value::Object(row));
    Ok(())
}

/// The FMA throughput of every thread at once at one level: each runs [`CHAINS`] independent
/// chains of `acc = fma(acc, a, b)` on registers (more than the FMA latency times the pipes,
/// so the pipes, not the chains, are the limit).
mod fma {
    use super::*;

    /// Independent accumulators per thread.
    const CHAINS: usize = 12;
    /// Steps per timed call: about 20-50 ms per thread.
    const STEPS: u64 = 20_000_000;

    /// A timed kernel: `STEPS` steps of every chain, on one thread; returns the sum of the
    /// chains (so that nothing is optimized away).
    type Kernel = fn(u64) -> f32;

    /// Flops per second of `threads` threads at the level called `isa`; `None` for a level
    /// without vector FMA code here (the portable level).
    pub(super) fn flops_per_second(isa: &str, threads: usize) -> Option<f64> {
        let (lanes, run): (usize, Kernel) = kernel(isa)?;
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            let sums: f32 = rayon::broadcast(|_| run(STEPS)).into_iter().sum();
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(sums);
        }
        let flops = (threads * CHAINS * lanes * 2) as f64 * STEPS as f64;
        Some(flops / best)
    }

    #[cfg(target_arch = "x86_64")]
    fn kernel(isa: &str) -> Option<(usize, Kernel)> {
        // Only levels `Isa::available` names reach here, so the CPU has their features.
        match isa {
            // SAFETY: the AVX2 level exists only where the CPU has AVX2 and FMA.
            "avx2" => Some((8, |steps| unsafe { x86::avx2(steps) })),
            // SAFETY: the AVX-512 level exists only where the CPU has AVX-512F.
            "avx512" => Some((16, |steps| unsafe { x86::avx512(steps) })),
            _ => None,
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn kernel(_isa: &str) -> Option<(usize, Kernel)> {
        None
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use super::CHAINS;

        /// # Safety
        /// The CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn avx2(steps: u64) -> f32 {
            // The chains converge to b / (1 - a) = 1: no overflow, no subnormals.
            let (a, b) = (_mm256_set1_ps(0.999), _mm256_set1_ps(0.001));
            let mut acc = [_mm256_setzero_ps(); CHAINS];
            for _ in 0..steps {
                for c in &mut acc {
                    *c = _mm256_fmadd_ps(*c, a, b);
                }
            }
            let mut out = [0.0f32; 8];
            let sum = acc
                .iter()
                .fold(_mm256_setzero_ps(), |s, &c| _mm256_add_ps(s, c));
            // SAFETY: eight floats into an eight-float array.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
            out.iter().sum()
        }

        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn avx512(steps: u64) -> f32 {
            let (a, b) = (_mm512_set1_ps(0.999), _mm512_set1_ps(0.001));
            let mut acc = [_mm512_setzero_ps(); CHAINS];
            for _ in 0..steps {
                for c in &mut acc {
                    *c = _mm512_fmadd_ps(*c, a, b);
                }
            }
            let sum = acc
                .iter()
                .fold(_mm512_setzero_ps(), |s, &c| _mm512_add_ps(s, c));
            _mm512_reduce_add_ps(sum)
        }
    }
}
