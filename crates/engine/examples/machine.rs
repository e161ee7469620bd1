//! The machine's limits a resume's time is judged against: memory bandwidth, measured (a
//! parallel copy of 512 MiB, bytes read plus bytes written per second, best of five), and the
//! f32 fused multiply-add peak, computed from the clock `/proc/cpuinfo` reports, the thread
//! count and the widest level `engine::Isa` finds (two 256-bit FMA pipes per core for AVX2, as
//! on AMD Zen 3 and Intel cores since Haswell; two 512-bit ones for AVX-512).
//!
//! `cargo run --release -p engine --example machine`
//!
//! Prints `MACHINE {json}` on stdout.

mod common;

use std::time::Instant;

use anyhow::{Context, Result};
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

    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .context("no clock in /proc/cpuinfo")?;
    let isa = Isa::best();
    let lanes = match isa.name() {
        "avx512" => 16.0,
        "avx2" => 8.0,
        _ => 4.0,
    };
    // Two FMA pipes, two flops per lane.
    let peak = mhz * 1e6 * threads as f64 * 2.0 * lanes * 2.0;
    eprintln!(
        "memory bandwidth {:.1} GB/s (copy, read + write); f32 FMA peak {:.0} GFLOP/s \
         ({threads} threads at {mhz:.0} MHz, {})",
        bandwidth / 1e9,
        peak / 1e9,
        isa.name()
    );
    println!(
        "MACHINE {}",
        serde_json::json!({
            "bandwidth_bytes_s": bandwidth,
            "fma_peak_flops": peak,
            "threads": threads,
            "mhz": mhz,
            "isa": isa.name(),
        })
    );
    Ok(())
}
