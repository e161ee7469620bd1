//! Times the forward pass on the real SmolLM2 model: prefill of N seeded random tokens, then
//! greedy decode steps after it. `cargo run --release -p engine --example bench_speed
//! [model.gguf] [prefill_tokens] [decode_steps]`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use engine::{Logits, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEFAULT_MODEL: &str = "/root/.local/share/agentkv/models/SmolLM2-135M-Instruct.Q4_1.gguf";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().unwrap_or_else(|| DEFAULT_MODEL.to_owned()));
    let n_prefill: usize = args.next().map_or(Ok(512), |s| s.parse())?;
    let n_decode: usize = args.next().map_or(Ok(32), |s| s.parse())?;

    let t = Instant::now();
    let model = Model::load(&path)?;
    println!(
        "loaded {} in {:.2}s ({} MiB of f32 weights, {} threads, weights {})",
        path.display(),
        t.elapsed().as_secs_f64(),
        model.weight_bytes() >> 20,
        rayon::current_num_threads(),
        model.weights_hash()
    );

    let vocab = model.config().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(1234);
    let prompt: Vec<u32> = (0..n_prefill).map(|_| rng.random_range(0..vocab)).collect();

    let mut cache = model.new_cache();
    let t = Instant::now();
    let mut logits = model.forward(&prompt, &mut cache, Logits::Last)?;
    let prefill = t.elapsed().as_secs_f64();
    println!(
        "prefill {n_prefill} tokens: {prefill:.3}s = {:.1} tok/s",
        n_prefill as f64 / prefill
    );

    let t = Instant::now();
    for _ in 0..n_decode {
        let next = logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0 as u32;
        logits = model.forward(&[next], &mut cache, Logits::Last)?;
    }
    let decode = t.elapsed().as_secs_f64();
    println!(
        "decode {n_decode} tokens after {n_prefill}: {decode:.3}s = {:.1} tok/s",
        n_decode as f64 / decode
    );
    Ok(())
}
