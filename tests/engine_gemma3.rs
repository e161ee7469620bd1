//! With the real Gemma 3 270M (Q4_K_M): its logits and greedy choices against llama.cpp's on
//! the same weights, before, at and well past its 512-token sliding window, and the
//! exactness of resuming from a saved cache at those lengths, under the engine's own cache
//! fingerprint.
//!
//! These tests need the model (`cargo xtask fetch-model gemma3-270m`); see
//! `engine::testing::real_gemma_path` for what happens without it. The reference is
//! `tests/data/gemma3_reference.json`, written by `tests/data/gemma3_reference.py` (which
//! says how llama.cpp was run).

use std::sync::{Arc, OnceLock};

use engine::testing::{bitwise_equal, max_abs_diff, real_gemma_path};
use engine::{Engine, Logits};
use kv_extract::KvCache;
use kv_store::{KvDtype, Store};
use serde_json::Value;

/// The engine (model and tokenizer), loaded once per test binary.
fn engine() -> Option<Arc<Engine>> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    let path = real_gemma_path()?;
    Some(Arc::clone(ENGINE.get_or_init(|| {
        Arc::new(Engine::load(&path).expect("loading Gemma 3 270M"))
    })))
}

fn reference() -> Value {
    let text = include_str!("data/gemma3_reference.json");
    serde_json::from_str(text).expect("the reference is json")
}

fn ids(v: &Value) -> Vec<u32> {
    let list = v.as_array().expect("a list of ids");
    list.iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// How far our logits may be from llama.cpp's on the same f32 weights. Measured on this text
/// (AMD EPYC, 2026-12-02): at most 0.011 over the whole vocabulary at every recorded position,
/// with logits spanning about 40. The difference is llama.cpp's GELU, which it looks up in an
/// f16 table; a wrong norm, RoPE base, window or scale moves logits by whole units.
const LOGIT_TOLERANCE: f32 = 0.05;

#[test]
fn logits_match_llama_cpp_before_at_and_past_the_window() {
    let Some(engine) = engine() else { return };
    let model = engine.model();
    assert_eq!(model.config().sliding_window, Some(512));
    let r = reference();
    let logits = &r["logits"];
    let ids = ids(&logits["ids"]);
    let mut cache = model.new_cache(KvDtype::F32).expect("cache");
    let mut worst = 0.0f32;
    for at in logits["positions"].as_array().expect("positions") {
        let p = at["position"].as_u64().expect("position") as usize;
        let ours = model
            .forward(&ids[cache.len()..=p], &mut cache, Logits::Last)
            .expect("forward");
        let top = at["top"].as_array().expect("top logits");
        for (rank, pair) in top.iter().enumerate() {
            let id = pair[0].as_u64().expect("id") as usize;
            let theirs = pair[1].as_f64().expect("logit") as f32;
            let diff = (ours[id] - theirs).abs();
            worst = worst.max(diff);
            assert!(
                diff < LOGIT_TOLERANCE,
                "position {p}, rank {rank} (token {id}): ours {} vs llama.cpp's {theirs}",
                ours[id]
            );
        }
        let first = top[0][0].as_u64().expect("id") as usize;
        assert_eq!(argmax(&ours), first, "position {p}: greedy choice");
    }
    eprintln!("largest logit difference from llama.cpp: {worst}");
}

/// A step of llama.cpp's greedy run whose first choice leads its second by less than this is
/// a near-tie: llama.cpp multiplies quantized weights by activations rounded to 8 bits, which
/// moves logits by about 0.2, so either choice is right. Where the margin is larger, our
/// choice must be llama.cpp's.
const NEAR_TIE: f64 = 0.5;

#[test]
fn greedy_choices_match_llama_cpp_on_the_same_gguf() {
    let Some(engine) = engine() else { return };
    let model = engine.model();
    let r = reference();
    let (mut compared, mut steps) = (0, 0);
    for run in r["greedy"].as_array().expect("greedy runs") {
        let prompt = ids(&run["prompt"]);
        let tokens = ids(&run["tokens"]);
        let margins = run["margins"].as_array().expect("margins");
        let mut cache = model.new_cache(KvDtype::F32).expect("cache");
        // Teacher-forced: llama.cpp's own continuation is fed back, so one near-tie does not
        // make the rest of the run another text.
        let mut logits = model
            .forward(&prompt, &mut cache, Logits::Last)
            .expect("prefill");
        for (i, (&want, margin)) in tokens.iter().zip(margins).enumerate() {
            let margin = margin.as_f64().expect("margin");
            steps += 1;
            if margin >= NEAR_TIE {
                compared += 1;
                assert_eq!(
                    argmax(&logits) as u32,
                    want,
                    "prompt of {} tokens, step {i}: llama.cpp's margin {margin}",
                    prompt.len()
                );
            }
            logits = model
                .forward(&[want], &mut cache, Logits::Last)
                .expect("decode");
        }
    }
    eprintln!("{compared} of {steps} greedy steps had a clear margin and matched");
    assert!(compared * 2 > steps, "too few clear steps to mean anything");
}

#[test]
fn resume_is_bitwise_exact_shorter_than_at_and_past_the_window() {
    let Some(engine) = engine() else { return };
    let model = engine.model();
    let r = reference();
    let text = ids(&r["logits"]["ids"]);
    let window = model.config().sliding_window.expect("a window");
    // The window and which layers have it are part of what the cached K/V mean.
    let extra = engine.cache_meta(KvDtype::F32).model.extra;
    assert_eq!(extra.get("sliding_window").map(String::as_str), Some("512"));
    assert_eq!(
        extra.get("sliding_window_layers").map(String::as_str),
        Some("SSSSSGSSSSSGSSSSSG")
    );
    // Several windows long: the text, then its start again.
    let text: Vec<u32> = text.iter().chain(&text).copied().collect();
    let meta = engine.cache_meta(KvDtype::F32);
    for history in [300, window, window + 1, 1400, 2000] {
        let (past, next) = (&text[..history], &text[history..history + 6]);
        // Uninterrupted: the whole history in one call, then one token at a time.
        let mut cache = model.new_cache(KvDtype::F32).expect("cache");
        model
            .forward(past, &mut cache, Logits::None)
            .expect("prefill");
        let mut want = Vec::new();
        for &t in next {
            want.push(
                model
                    .forward(&[t], &mut cache, Logits::Last)
                    .expect("decode"),
            );
        }

        // Resumed: the history prefilled in other pieces, saved, loaded into a fresh cache.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        {
            let mut cache = model.new_cache(KvDtype::F32).expect("cache");
            for piece in past.chunks(97) {
                model
                    .forward(piece, &mut cache, Logits::None)
                    .expect("prefill");
            }
            cache.save(&store, "agent", &meta).expect("save");
            // In memory and on disk, a sliding layer holds the 511 positions the next token
            // sees besides itself, a global layer all of them.
            let held = |l: usize| match model.config().layer_window(l) {
                Some(w) => history.min(w - 1),
                None => history,
            };
            let rows: usize = (0..model.config().n_layers).map(held).sum();
            assert_eq!(cache.bytes_used(), 2 * rows * meta.row_bytes(), "{history}");
            let loaded = store.load("agent", &meta).expect("load");
            for l in 0..model.config().n_layers {
                let k = loaded.kv(l, kv_store::KvKind::K);
                assert_eq!(k.len(), held(l) * meta.row_bytes(), "{history}, layer {l}");
            }
        }
        let mut cache = KvCache::load(&store, "agent", &meta, model.kv_shape()).expect("load");
        assert_eq!(cache.len(), history);
        for (i, &t) in next.iter().enumerate() {
            let got = model
                .forward(&[t], &mut cache, Logits::Last)
                .expect("decode");
            assert!(
                bitwise_equal(&got, &want[i]),
                "history {history}, token {i}: max diff {}",
                max_abs_diff(&got, &want[i])
            );
        }
    }
}
