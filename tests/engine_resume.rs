//! With the real SmolLM2-135M-Instruct: the Paris answer, and the exactness of resuming from a
//! saved cache and of reusing a cached prefix, against uninterrupted runs.
//!
//! These tests need the model (`cargo xtask fetch-model`); see
//! `engine::testing::real_model_path` for what happens without it.

use engine::testing::{bitwise_equal, max_abs_diff, options, real_engine};
use engine::{Engine, Generation, Message};
use kv_extract::KvCache;
use kv_store::{KvDtype, Store};

const SYSTEM: &str = "You are a helpful assistant.";

fn run(
    engine: &Engine,
    cache: &mut KvCache,
    messages: &[Message],
    max_tokens: usize,
) -> Generation {
    let prompt = engine
        .chat_tokens(messages, true)
        .expect("render and encode");
    engine
        .generate(cache, &prompt, &options(max_tokens), &mut |_| {})
        .expect("generate")
}

#[test]
fn answers_paris() {
    let Some(engine) = real_engine() else { return };
    let mut cache = engine.new_cache(KvDtype::F32).expect("cache");
    let messages = [
        Message::system(SYSTEM),
        Message::user("What is the capital of France?"),
    ];
    let out = run(&engine, &mut cache, &messages, 24);
    eprintln!("answer: {:?}", out.text);
    assert!(out.text.contains("Paris"), "{:?}", out.text);
}

/// Turn 1, then turn 2: once in one process, once with the cache saved after turn 1, everything
/// dropped, and turn 2 run on a fresh engine over the loaded cache.
struct ResumeRun {
    uninterrupted: Generation,
    resumed: Generation,
}

fn resume_run(dtype: KvDtype) -> Option<ResumeRun> {
    let engine = real_engine()?;
    let user1 = Message::user("What is the capital of France?");
    let user2 = Message::user("And what is the capital of Germany?");

    let mut cache = engine.new_cache(dtype).expect("cache");
    let turn1 = run(
        &engine,
        &mut cache,
        &[Message::system(SYSTEM), user1.clone()],
        24,
    );
    let conversation = [
        Message::system(SYSTEM),
        user1.clone(),
        Message::assistant(turn1.text.clone()),
        user2.clone(),
    ];
    let uninterrupted = run(&engine, &mut cache, &conversation, 16);

    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut cache = engine.new_cache(dtype).expect("cache");
        let again = run(&engine, &mut cache, &[Message::system(SYSTEM), user1], 24);
        assert_eq!(again.tokens, turn1.tokens, "turn 1 is deterministic");
        let store = Store::open(dir.path()).expect("open store");
        cache
            .save(&store, "agent", &engine.cache_meta(dtype))
            .expect("save");
    }
    // A fresh engine from the file, a fresh store handle, the cache from disk.
    let fresh = Engine::load(engine.path()).expect("reload model");
    let store = Store::open(dir.path()).expect("reopen store");
    let mut cache = KvCache::load(
        &store,
        "agent",
        &fresh.cache_meta(dtype),
        fresh.model().kv_shape(),
    )
    .expect("load");
    let resumed = run(&fresh, &mut cache, &conversation, 16);
    assert!(
        resumed.reused_tokens > turn1.prompt_tokens,
        "turn 2 resumed from the saved cache"
    );
    assert_eq!(resumed.reused_tokens, uninterrupted.reused_tokens);
    Some(ResumeRun {
        uninterrupted,
        resumed,
    })
}

/// The KV dtypes a cache can be held in.
const DTYPES: [KvDtype; 4] = [KvDtype::F32, KvDtype::F16, KvDtype::Bf16, KvDtype::Q8_0];

#[test]
fn resume_is_bitwise_exact_in_every_kv_dtype() {
    let mut f32_answer = None;
    for dtype in DTYPES {
        let Some(r) = resume_run(dtype) else { return };
        assert_eq!(r.resumed.tokens, r.uninterrupted.tokens, "{dtype}");
        assert!(
            bitwise_equal(&r.resumed.first_logits, &r.uninterrupted.first_logits),
            "{dtype}: max diff {}",
            max_abs_diff(&r.resumed.first_logits, &r.uninterrupted.first_logits)
        );
        // Each dtype really is another computation, close to f32's.
        match &f32_answer {
            None => f32_answer = Some(r.uninterrupted),
            Some(f32_run) => {
                let diff = max_abs_diff(&r.uninterrupted.first_logits, &f32_run.first_logits);
                eprintln!(
                    "{dtype}: largest first-position logit difference from f32 {diff:e}; \
                     answer {:?}",
                    r.uninterrupted.text
                );
                assert!(diff > 0.0, "{dtype} computed exactly f32's logits");
                assert!(r.uninterrupted.text.contains("Berlin"), "{dtype}");
                assert!(diff < LOGIT_BOUND, "{dtype}: {diff} from f32");
            }
        }
    }
}

/// How far a lower-precision cache may move the first logits of turn 2 from f32's. Measured
/// on this conversation (the test prints it; AMD EPYC, 2026-12-02): f16 7.8e-3, bf16 0.12,
/// q8_0 0.36. The bound is about 5x the largest: a dtype read wrongly (another layout, a
/// wrong scale) moves logits by whole units, and the answer is checked too.
const LOGIT_BOUND: f32 = 2.0;

#[test]
fn prefix_reuse_matches_prefill_from_scratch() {
    let Some(engine) = real_engine() else { return };
    let p = engine
        .chat_tokens(
            &[
                Message::system(SYSTEM),
                Message::user("What is the capital of France?"),
            ],
            true,
        )
        .expect("p");
    let p2 = engine
        .chat_tokens(
            &[
                Message::system(SYSTEM),
                Message::user("What is the capital of Italy? Answer briefly."),
            ],
            true,
        )
        .expect("p2");
    let common = p.iter().zip(&p2).take_while(|(a, b)| a == b).count();
    assert!(
        common > 5 && common < p.len(),
        "the prompts share a real prefix"
    );

    let mut scratch = engine.new_cache(KvDtype::F32).expect("cache");
    let (expected, reused) = engine.sync(&mut scratch, &p2).expect("prefill p2");
    assert_eq!(reused, 0);

    // In memory: a cache for P, cut back to the common prefix, continued over the rest of P'.
    let mut cache = engine.new_cache(KvDtype::F32).expect("cache");
    engine.sync(&mut cache, &p).expect("prefill p");
    let (logits, reused) = engine.sync(&mut cache, &p2).expect("continue over p2");
    assert_eq!(reused, common);
    assert!(
        bitwise_equal(&logits, &expected),
        "max diff {}",
        max_abs_diff(&logits, &expected)
    );

    // Through disk (f32): the same.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let meta = engine.cache_meta(KvDtype::F32);
    let mut cache = engine.new_cache(KvDtype::F32).expect("cache");
    engine.sync(&mut cache, &p).expect("prefill p");
    cache.save(&store, "p", &meta).expect("save");
    let mut loaded = KvCache::load(&store, "p", &meta, engine.model().kv_shape()).expect("load");
    let (logits, reused) = engine.sync(&mut loaded, &p2).expect("continue over p2");
    assert_eq!(reused, common);
    assert!(bitwise_equal(&logits, &expected));
}

#[test]
fn cache_from_another_model_is_refused() {
    let Some(engine) = real_engine() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut cache = engine.new_cache(KvDtype::F32).expect("cache");
    engine.sync(&mut cache, &[1, 2, 3, 4]).expect("prefill");
    let mut other = engine.cache_meta(KvDtype::F32);
    other.model.weights_hash = "0".repeat(32);
    cache
        .save(&store, "x", &other)
        .expect("save under another fingerprint");
    let err = KvCache::load(
        &store,
        "x",
        &engine.cache_meta(KvDtype::F32),
        engine.model().kv_shape(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("model weights") && text.contains(engine.model().weights_hash()),
        "{text}"
    );
}

#[test]
fn a_rounded_cache_from_before_caches_were_held_in_their_dtype_is_refused() {
    let Some(engine) = real_engine() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    // f32 caches are computed as they always were: their key is unchanged.
    assert!(engine.cache_meta(KvDtype::F32).model.extra.is_empty());
    // An f16 cache saved under the key an f32-in-memory engine gave it (no `extra`).
    let mut older = engine.cache_meta(KvDtype::F16);
    assert!(!older.model.extra.is_empty());
    older.model.extra.clear();
    let mut cache = engine.new_cache(KvDtype::F16).expect("cache");
    engine.sync(&mut cache, &[1, 2, 3, 4]).expect("prefill");
    cache.save(&store, "old", &older).expect("save");
    let err = KvCache::load(
        &store,
        "old",
        &engine.cache_meta(KvDtype::F16),
        engine.model().kv_shape(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("model parameters"), "{err}");
}
