//! The model on tiny generated GGUF files (and the real one when present): configuration,
//! batch invariance, every instruction-set level, bad files and bad input.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use kv_extract::{KvCache, KvDtype, KvShape};

use super::*;
use crate::error::EngineError;
use crate::testing::{TinyConfig, write_tiny_llama_gguf};

/// Writes a tiny model to a fresh temp dir.
fn write_tiny(cfg: &TinyConfig, seed: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama_gguf(&path, cfg, seed).expect("write tiny gguf");
    (dir, path)
}

fn tiny_model(cfg: &TinyConfig) -> Model {
    let (_dir, path) = write_tiny(cfg, 7);
    Model::load(&path).expect("load tiny model")
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The byte-level tokens of "a".."z" in the tiny vocabulary (bytes start at id 3).
fn letters() -> Vec<u32> {
    (b'a'..=b'z').map(|b| 3 + b as u32).collect()
}

/// Every K and V byte the cache holds, layer by layer, head by head (a sliding-window layer's
/// from its first held position, which is part of the result).
fn cache_bits(cache: &KvCache) -> Vec<u8> {
    let s = cache.shape();
    let mut out = Vec::new();
    for l in 0..s.n_layers {
        let held = cache.held_from(l)..cache.len();
        out.extend_from_slice(&(held.start as u64).to_le_bytes());
        for h in 0..s.n_kv_heads {
            out.extend_from_slice(cache.k_head(l, h, held.clone()).bytes());
            out.extend_from_slice(cache.v_head(l, h, held.clone()).bytes());
        }
    }
    out
}

/// A tiny model with SmolLM2's 64-wide heads, which every KV dtype can hold.
fn wide_heads() -> TinyConfig {
    TinyConfig {
        dim: 384,
        n_heads: 6,
        n_kv_heads: 1,
        ffn_dim: 128,
        ..TinyConfig::default()
    }
}

/// The default tiny model read as Qwen2: q/k/v biases, NeoX RoPE, its own LM head.
fn tiny_qwen2() -> TinyConfig {
    TinyConfig {
        architecture: "qwen2".into(),
        separate_output: true,
        extra_tensors: qkv_biases(&TinyConfig::default()),
        ..TinyConfig::default()
    }
}

/// A tiny Gemma 3 with 64-wide heads (which every KV dtype can hold: two query heads on one
/// KV head) whose sliding layers see `window` positions: with six or more layers, llama.cpp's
/// pattern gives both kinds (layer 5 of each six is global).
fn tiny_gemma3(window: usize, n_layers: usize) -> TinyConfig {
    TinyConfig {
        architecture: "gemma3".into(),
        n_layers,
        dim: 128,
        n_heads: 2,
        n_kv_heads: 1,
        ffn_dim: 256,
        sliding_window: Some(window),
        ..TinyConfig::default()
    }
}

/// `n` token ids spread over the whole tiny vocabulary, in no pattern.
fn scattered_tokens(n: usize) -> Vec<u32> {
    crate::testing::xorshift(11, 0x2545_F491_4F6C_DD1D)
        .take(n)
        .map(|s| (s % 268) as u32)
        .collect()
}

/// Non-zero q, k and v biases for every layer of `cfg`.
fn qkv_biases(cfg: &TinyConfig) -> Vec<(String, Vec<f32>)> {
    let hd = cfg.dim / cfg.n_heads;
    let mut out = Vec::new();
    for i in 0..cfg.n_layers {
        for (t, rows) in [
            ("attn_q", cfg.n_heads * hd),
            ("attn_k", cfg.n_kv_heads * hd),
            ("attn_v", cfg.n_kv_heads * hd),
        ] {
            out.push((
                format!("blk.{i}.{t}.bias"),
                crate::testing::values(rows, 100 + i as u64),
            ));
        }
    }
    out
}

/// The KV dtypes a cache can be held in.
const KV_DTYPES: [KvDtype; 4] = [KvDtype::F32, KvDtype::F16, KvDtype::Bf16, KvDtype::Q8_0];

#[test]
fn tiny_config_is_read_from_metadata() {
    let m = tiny_model(&TinyConfig::default());
    let c = m.config();
    assert_eq!(
        (
            c.n_layers,
            c.dim,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.ffn_dim
        ),
        (2, 32, 4, 2, 8, 64)
    );
    assert_eq!((c.rope_dim, c.context_length, c.vocab_size), (8, 512, 268));
    assert_eq!(
        m.kv_shape(),
        KvShape {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 8,
            window: None,
        }
    );
    assert_eq!(m.weights_hash().len(), 32);
}

#[test]
fn a_forward_pass_is_the_same_bits_at_every_instruction_set_level() {
    // 64-wide heads in groups of six queries (SmolLM2's width, and the AVX-512 V-sum
    // kernel's group) with quantized and f32 weights; 40 tokens make prefill tiles, then
    // decode steps.
    // Every KV dtype the heads can hold: the cache's rows are read in place, converted.
    // A tiny Gemma 3 too: its norms, GELU, and 20-position windows that start mid-lane.
    let configs = [
        TinyConfig::default(),
        wide_heads(),
        TinyConfig {
            weight_dtype: GgmlDType::F32,
            ..TinyConfig::default()
        },
        tiny_qwen2(),
        tiny_gemma3(20, 7),
    ];
    // 90 tokens: attention over more than one 64-row chunk of a converted cache.
    let toks: Vec<u32> = letters().into_iter().cycle().take(90).collect();
    for cfg in configs {
        let mut m = tiny_model(&cfg);
        let shape = m.kv_shape();
        for dtype in KV_DTYPES.into_iter().filter(|&d| shape.supports(d)) {
            let run = |m: &Model| {
                let mut cache = m.new_cache(dtype).expect("cache");
                let mut logits = m.forward(&toks, &mut cache, Logits::All).expect("prefill");
                for &t in &toks[..3] {
                    logits.extend(m.forward(&[t], &mut cache, Logits::Last).expect("decode"));
                }
                (bits(&logits), cache_bits(&cache))
            };
            m.set_isa(Isa::PORTABLE);
            let portable = run(&m);
            crate::kernels::isa::for_each_isa(|isa| {
                m.set_isa(isa);
                assert!(
                    run(&m) == portable,
                    "{isa:?}, {} heads, {dtype}",
                    cfg.n_heads
                );
            });
        }
    }
}

#[test]
fn prefill_split_prefill_and_decode_are_bitwise_equal() {
    let m = tiny_model(&TinyConfig::default());
    let toks = letters();
    let mut whole = m.new_cache(KvDtype::F32).expect("f32 cache");
    let all = m.forward(&toks, &mut whole, Logits::All).expect("prefill");
    assert_eq!(all.len(), toks.len() * 268);
    assert!(all.iter().all(|x| x.is_finite()));

    let mut split = m.new_cache(KvDtype::F32).expect("f32 cache");
    let mut split_logits = m
        .forward(&toks[..5], &mut split, Logits::All)
        .expect("first part");
    split_logits.extend(
        m.forward(&toks[5..], &mut split, Logits::All)
            .expect("second part"),
    );
    assert_eq!(bits(&all), bits(&split_logits));

    let mut decode = m.new_cache(KvDtype::F32).expect("f32 cache");
    let mut decode_logits = Vec::new();
    for t in &toks {
        decode_logits.extend(m.forward(&[*t], &mut decode, Logits::Last).expect("decode"));
    }
    assert_eq!(bits(&all), bits(&decode_logits));

    assert_eq!(whole.tokens(), &toks[..]);
    assert_eq!(cache_bits(&whole), cache_bits(&split));
    assert_eq!(cache_bits(&whole), cache_bits(&decode));

    // Logits::Last is the last row of Logits::All; Logits::None returns nothing.
    let mut c = m.new_cache(KvDtype::F32).expect("f32 cache");
    let last = m.forward(&toks, &mut c, Logits::Last).expect("last");
    assert_eq!(bits(&last), bits(&all[(toks.len() - 1) * 268..]));
    let mut c = m.new_cache(KvDtype::F32).expect("f32 cache");
    assert!(
        m.forward(&toks, &mut c, Logits::None)
            .expect("none")
            .is_empty()
    );
    assert_eq!(cache_bits(&c), cache_bits(&whole));
}

#[test]
fn every_kv_dtype_keeps_prefill_split_prefill_and_decode_bitwise_equal() {
    // A row is rounded or quantized once, when it is written, whatever the batch: so the
    // batch invariance that bitwise resume rests on holds for each dtype.
    let m = tiny_model(&wide_heads());
    let toks: Vec<u32> = letters().into_iter().cycle().take(80).collect();
    let mut reference = None;
    for dtype in KV_DTYPES {
        let mut whole = m.new_cache(dtype).expect("cache");
        let all = m.forward(&toks, &mut whole, Logits::All).expect("prefill");
        let mut split = m.new_cache(dtype).expect("cache");
        let mut split_logits = m
            .forward(&toks[..37], &mut split, Logits::All)
            .expect("part");
        split_logits.extend(
            m.forward(&toks[37..], &mut split, Logits::All)
                .expect("rest"),
        );
        assert_eq!(bits(&all), bits(&split_logits), "{dtype}");
        let mut decode = m.new_cache(dtype).expect("cache");
        m.forward(&toks[..70], &mut decode, Logits::None)
            .expect("prefix");
        let mut decode_logits = Vec::new();
        for t in &toks[70..] {
            decode_logits.extend(m.forward(&[*t], &mut decode, Logits::Last).expect("decode"));
        }
        assert_eq!(bits(&all[70 * 268..]), bits(&decode_logits), "{dtype}");
        assert_eq!(cache_bits(&whole), cache_bits(&split), "{dtype}");
        assert_eq!(cache_bits(&whole), cache_bits(&decode), "{dtype}");
        assert_eq!(
            whole.bytes_used(),
            2 * 2 * 80 * whole.dtype().row_bytes(64).expect("64")
        );
        // The dtypes do compute different (close) logits: the test is not comparing f32
        // with itself.
        match &reference {
            None => reference = Some(all),
            Some(f32_logits) => {
                assert_ne!(bits(f32_logits), bits(&all), "{dtype}");
                let worst = f32_logits
                    .iter()
                    .zip(&all)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst < 0.5, "{dtype}: logits differ by {worst}");
            }
        }
    }
    // A dtype the heads cannot hold is a typed error.
    let narrow = tiny_model(&TinyConfig::default());
    let err = narrow.new_cache(KvDtype::Q8_0).expect_err("8-wide heads");
    assert!(
        matches!(err, EngineError::UnsupportedKvDtype { .. }),
        "{err}"
    );
}

#[test]
fn tiny_gemma3_has_five_sliding_layers_then_a_global_one() {
    let m = tiny_model(&tiny_gemma3(20, 7));
    let c = m.config();
    assert_eq!(c.arch, Architecture::Gemma3);
    assert_eq!(
        (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim),
        (7, 128, 2, 1, 64)
    );
    assert_eq!(c.sliding_window, Some(20));
    assert_eq!((c.rope_base, c.rope_base_swa), (1_000_000.0, 10000.0));
    let windows: Vec<Option<usize>> = (0..7).map(|i| c.layer_window(i)).collect();
    let (s, g) = (Some(20), None);
    assert_eq!(windows, [s, s, s, s, s, g, s]);
    assert!(
        m.layers
            .iter()
            .zip(&windows)
            .all(|(l, w)| l.gemma.is_some() && l.window == *w)
    );
    assert!(m.output.is_none(), "the LM head is tied, as Gemma 3's is");
    assert!(KV_DTYPES.iter().all(|&d| m.kv_shape().supports(d)));

    // Without the key every layer is global.
    let global = tiny_model(&TinyConfig {
        sliding_window: None,
        ..tiny_gemma3(20, 7)
    });
    assert_eq!(global.config().sliding_window, None);
    assert!((0..7).all(|i| global.config().layer_window(i).is_none()));
    // Gemma's norms are written, and the loader needs them.
    let (_dir, path) = write_tiny(
        &TinyConfig {
            omit_tensor: Some("blk.3.post_ffw_norm.weight".into()),
            ..tiny_gemma3(20, 7)
        },
        7,
    );
    let err = Model::load(&path).expect_err("a gemma norm missing");
    assert!(
        matches!(&err, EngineError::MissingTensor { name } if name == "blk.3.post_ffw_norm.weight"),
        "{err:?}"
    );
}

#[test]
fn tiny_gemma3_prefill_split_prefill_and_decode_are_bitwise_equal() {
    // A 20-position window over 100 tokens: queries whose window starts mid-lane (the
    // attention's rows start on multiples of 16), prefill parts that begin inside the window
    // of their first query, and at positions that are not multiples of 16.
    let m = tiny_model(&tiny_gemma3(20, 7));
    let vocab = m.config().vocab_size;
    let toks = scattered_tokens(100);
    let splits: [&[usize]; 4] = [&[7], &[20], &[37, 45], &[16, 33, 50, 83, 99]];
    let mut reference: Option<Vec<f32>> = None;
    for dtype in KV_DTYPES {
        let mut whole = m.new_cache(dtype).expect("cache");
        let all = m.forward(&toks, &mut whole, Logits::All).expect("prefill");
        assert_eq!(all.len(), toks.len() * vocab);
        assert!(all.iter().all(|x| x.is_finite()), "{dtype}");
        for cuts in splits {
            let mut split = m.new_cache(dtype).expect("cache");
            let mut logits = Vec::new();
            let bounds: Vec<usize> = [&[0][..], cuts, &[toks.len()]].concat();
            for w in bounds.windows(2) {
                logits.extend(
                    m.forward(&toks[w[0]..w[1]], &mut split, Logits::All)
                        .expect("part"),
                );
            }
            assert!(bits(&all) == bits(&logits), "{dtype}, split at {cuts:?}");
            assert!(
                cache_bits(&whole) == cache_bits(&split),
                "{dtype}, {cuts:?}"
            );
        }
        let mut decode = m.new_cache(dtype).expect("cache");
        let mut decode_logits = Vec::new();
        for t in &toks {
            decode_logits.extend(m.forward(&[*t], &mut decode, Logits::Last).expect("decode"));
        }
        assert!(bits(&all) == bits(&decode_logits), "{dtype}: decode");
        assert!(cache_bits(&whole) == cache_bits(&decode), "{dtype}: decode");
        // The dtypes compute different logits: no dtype is compared with f32 by mistake.
        match &reference {
            None => reference = Some(all),
            Some(f32_logits) => assert!(bits(f32_logits) != bits(&all), "{dtype}"),
        }
    }
}

#[test]
fn sliding_layers_keep_only_their_window_and_resume_bitwise() {
    // Histories shorter than the 19 positions a continuation sees, equal to it, one past the
    // window, and several windows long; each saved, loaded and continued (a prefill part,
    // then token by token) next to the cache that never left memory.
    let (_dir, path) = write_tiny(&tiny_gemma3(20, 7), 7);
    let engine = crate::Engine::load(&path).expect("tiny gemma3 engine");
    let m = engine.model();
    let toks = scattered_tokens(170);
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = kv_store::Store::open(store_dir.path()).expect("store");
    for dtype in KV_DTYPES {
        let meta = engine.cache_meta(dtype);
        for history in [15, 19, 20, 21, 100] {
            let mut live = m.new_cache(dtype).expect("cache");
            m.forward(&toks[..history], &mut live, Logits::None)
                .expect("prefill");
            let sliding = |l: usize| m.config().layer_window(l).is_some();
            let held = |l: usize| if sliding(l) { history.min(19) } else { history };
            let rows: usize = (0..7).map(held).sum();
            let row = meta.row_bytes();
            assert_eq!(live.bytes_used(), 2 * rows * row, "{dtype} {history}");
            let name = format!("h{history}");
            live.save(&store, &name, &meta).expect("save");
            // The file holds what memory holds.
            let loaded = store.load(&name, &meta).expect("load");
            for l in 0..7 {
                let k = loaded.kv(l, kv_store::KvKind::K);
                assert_eq!(k.len(), held(l) * row, "{dtype} {history} layer {l}");
            }
            let mut resumed = KvCache::load(&store, &name, &meta, m.kv_shape()).expect("resume");
            assert!(
                cache_bits(&resumed) == cache_bits(&live),
                "{dtype} {history}"
            );
            let more = &toks[history..history + 37];
            let a = m.forward(&more[..7], &mut live, Logits::All).expect("live");
            let b = m
                .forward(&more[..7], &mut resumed, Logits::All)
                .expect("resumed");
            assert!(
                bits(&a) == bits(&b),
                "{dtype} {history}: prefill after resume"
            );
            for &t in &more[7..] {
                let a = m.forward(&[t], &mut live, Logits::Last).expect("live");
                let b = m
                    .forward(&[t], &mut resumed, Logits::Last)
                    .expect("resumed");
                assert!(
                    bits(&a) == bits(&b),
                    "{dtype} {history}: decode after resume"
                );
            }
            assert!(
                cache_bits(&resumed) == cache_bits(&live),
                "{dtype} {history}"
            );
        }
    }
}

#[test]
fn a_prompt_that_needs_positions_a_window_dropped_rebuilds_the_cache() {
    let (_dir, path) = write_tiny(&tiny_gemma3(20, 7), 7);
    let engine = crate::Engine::load(&path).expect("tiny gemma3 engine");
    let toks = scattered_tokens(140);
    let fresh = |prompt: &[u32]| {
        let mut cache = engine.new_cache(KvDtype::F32).expect("cache");
        engine.sync(&mut cache, prompt).expect("sync").0
    };
    let mut cache = engine.new_cache(KvDtype::F32).expect("cache");
    engine.sync(&mut cache, &toks[..100]).expect("sync");
    // Continuing: everything cached is reused.
    let (logits, reused) = engine.sync(&mut cache, &toks[..110]).expect("continue");
    assert_eq!(reused, 100);
    assert!(bits(&logits) == bits(&fresh(&toks[..110])));
    // The same prompt again: its last token is recomputed for its logits, and its window
    // starts at 90, one position before what the sliding layers still hold: rebuilt.
    let (logits, reused) = engine.sync(&mut cache, &toks[..110]).expect("again");
    assert_eq!(reused, 0);
    assert!(bits(&logits) == bits(&fresh(&toks[..110])));
    // Diverging at 90: the sliding layers no longer hold 71..91, so the prompt is computed
    // from the first token, and gives the logits of a fresh cache.
    let mut other = toks[..90].to_vec();
    other.extend_from_slice(&toks[120..140]);
    assert!(!cache.can_truncate(90));
    let (logits, reused) = engine.sync(&mut cache, &other).expect("rebuild");
    assert_eq!(reused, 0);
    assert!(bits(&logits) == bits(&fresh(&other)));
    // Short of the window a rollback still reuses the common prefix.
    let mut short = engine.new_cache(KvDtype::F32).expect("cache");
    engine.sync(&mut short, &toks[..15]).expect("sync");
    let mut branch = toks[..10].to_vec();
    branch.extend_from_slice(&toks[50..60]);
    let (logits, reused) = engine.sync(&mut short, &branch).expect("branch");
    assert_eq!(reused, 10);
    assert!(bits(&logits) == bits(&fresh(&branch)));
}

#[test]
fn a_sliding_window_hides_exactly_the_keys_older_than_the_window() {
    // The same weights with a window wider than the sequence: every layer sees every key.
    // Position p sees keys p - 19 ..= p through a 20-position window, so up to position 19
    // both models read the same keys and give the same bits; from position 20 on, key 0 (and
    // then more) drops out of the sliding layers, and every position's logits change.
    let window = 20;
    let narrow = tiny_model(&tiny_gemma3(window, 7));
    let wide = tiny_model(&tiny_gemma3(512, 7));
    assert_eq!(narrow.weights_hash(), wide.weights_hash());
    let vocab = narrow.config().vocab_size;
    let toks = scattered_tokens(100);
    let run = |m: &Model| {
        let mut cache = m.new_cache(KvDtype::F32).expect("f32 cache");
        m.forward(&toks, &mut cache, Logits::All).expect("prefill")
    };
    let (a, b) = (run(&narrow), run(&wide));
    for (p, (x, y)) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)).enumerate() {
        match p < window {
            true => assert!(bits(x) == bits(y), "position {p} inside the window differs"),
            false => assert!(
                crate::testing::max_abs_diff(x, y) > 1e-4,
                "position {p} past the window still sees its oldest keys"
            ),
        }
    }
}

#[test]
fn a_prompt_in_chunks_is_bitwise_the_prompt_in_one_pass() {
    let m = tiny_model(&TinyConfig::default());
    let toks = letters();
    for want in [Logits::All, Logits::Last, Logits::None] {
        let mut one = m.new_cache(KvDtype::F32).expect("f32 cache");
        let whole = m
            .forward_chunked(&toks, &mut one, want, usize::MAX)
            .expect("one pass");
        for chunk in [1, 3, 7, 25] {
            let mut parts = m.new_cache(KvDtype::F32).expect("f32 cache");
            let chunked = m
                .forward_chunked(&toks, &mut parts, want, chunk)
                .expect("chunks");
            assert_eq!(
                bits(&chunked),
                bits(&whole),
                "{want:?} in chunks of {chunk}"
            );
            assert_eq!(cache_bits(&parts), cache_bits(&one));
            assert_eq!(parts.tokens(), &toks[..]);
        }
    }
    // A prompt that overflows the context is refused before any chunk runs.
    let mut cache = m.new_cache(KvDtype::F32).expect("f32 cache");
    m.forward(&toks[..4], &mut cache, Logits::None)
        .expect("start");
    let long = vec![toks[0]; 600];
    let err = m
        .forward_chunked(&long, &mut cache, Logits::Last, 7)
        .expect_err("past the context");
    assert!(matches!(err, EngineError::ContextOverflow { .. }), "{err}");
    assert_eq!(cache.tokens(), &toks[..4]);
}

#[test]
fn cache_capacity_does_not_change_results() {
    let m = tiny_model(&TinyConfig::default());
    let toks = letters();
    let mut small = m.new_cache(KvDtype::F32).expect("f32 cache");
    let mut big = KvCache::with_capacity(m.kv_shape(), KvDtype::F32, 1000);
    let a = m.forward(&toks, &mut small, Logits::All).expect("small");
    let b = m.forward(&toks, &mut big, Logits::All).expect("big");
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(cache_bits(&small), cache_bits(&big));
    // Growing mid-conversation (64 -> 128 tokens) changes nothing either.
    let more: Vec<u32> = (0..80).map(|i| 3 + (i * 7 % 256) as u32).collect();
    let a = m
        .forward(&more, &mut small, Logits::All)
        .expect("grow small");
    let b = m.forward(&more, &mut big, Logits::All).expect("grow big");
    assert_eq!(bits(&a), bits(&b));
}

#[test]
fn prefix_reuse_matches_prefill_from_scratch() {
    let m = tiny_model(&TinyConfig::default());
    let toks = letters();
    let mut cache = m.new_cache(KvDtype::F32).expect("f32 cache");
    m.forward(&toks, &mut cache, Logits::None).expect("prefill");
    let other: Vec<u32> = [&toks[..10], &[100, 101, 102, 7][..]].concat();
    let keep = cache.common_prefix_len(&other);
    assert_eq!(keep, 10);
    cache.truncate(keep).unwrap();
    let resumed = m
        .forward(&other[keep..], &mut cache, Logits::All)
        .expect("continue");
    let mut fresh = m.new_cache(KvDtype::F32).expect("f32 cache");
    let scratch = m.forward(&other, &mut fresh, Logits::All).expect("scratch");
    assert_eq!(bits(&resumed), bits(&scratch[keep * 268..]));
    assert_eq!(cache_bits(&cache), cache_bits(&fresh));
}

#[test]
fn separate_output_head_and_f32_weights() {
    let cfg = TinyConfig {
        separate_output: true,
        weight_dtype: candle_core::quantized::GgmlDType::F32,
        ..TinyConfig::default()
    };
    let m = tiny_model(&cfg);
    assert!(m.output.is_some());
    let tied = tiny_model(&TinyConfig::default());
    assert!(tied.output.is_none());
    assert_ne!(m.weights_hash(), tied.weights_hash());
    let mut c = m.new_cache(KvDtype::F32).expect("f32 cache");
    let logits = m
        .forward(&letters(), &mut c, Logits::Last)
        .expect("forward");
    assert_eq!(logits.len(), 268);
}

#[test]
fn weights_hash_is_stable_and_content_dependent() {
    let (_d1, p1) = write_tiny(&TinyConfig::default(), 1);
    let (_d2, p2) = write_tiny(&TinyConfig::default(), 2);
    let a = Model::load(&p1).expect("load");
    let b = Model::load(&p1).expect("load again");
    let c = Model::load(&p2).expect("load other");
    assert_eq!(a.weights_hash(), b.weights_hash());
    assert_ne!(a.weights_hash(), c.weights_hash());
    assert_eq!(a.config(), b.config());
}

#[test]
fn truncated_file_is_an_error() {
    let (_dir, path) = write_tiny(&TinyConfig::default(), 3);
    let bytes = std::fs::read(&path).expect("read");
    for cut in [bytes.len() / 2, bytes.len() - 1, 100, 10, 0] {
        std::fs::write(&path, &bytes[..cut]).expect("truncate");
        let err = Model::load(&path).expect_err("truncated file must not load");
        assert!(
            matches!(
                err,
                EngineError::Gguf { .. } | EngineError::TensorData { .. }
            ),
            "cut at {cut}: {err:?}"
        );
    }
    std::fs::write(&path, b"definitely not a gguf file at all").expect("write junk");
    assert!(matches!(Model::load(&path), Err(EngineError::Gguf { .. })));
}

#[test]
fn missing_file_is_model_not_found() {
    let err = Model::load(Path::new("/nonexistent/dir/model.gguf")).expect_err("no file");
    assert!(matches!(err, EngineError::ModelNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/dir/model.gguf"));
}

#[test]
fn unsupported_architecture_is_named() {
    let (_dir, path) = write_tiny(
        &TinyConfig {
            architecture: "mamba".into(),
            ..TinyConfig::default()
        },
        1,
    );
    let err = Model::load(&path).expect_err("mamba is not supported");
    assert!(
        matches!(&err, EngineError::UnsupportedArchitecture { name } if name == "mamba"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("mamba") && msg.contains("llama, gemma3, qwen2"),
        "{msg}"
    );
}

#[test]
fn qwen2_reads_biases_and_differs_from_llama_on_the_same_tensors() {
    // NeoX pairs and the biases: the same file read as llama, or without biases, computes
    // other logits (that they are llama.cpp's is tests/engine_tiny_models.rs's to check).
    let run = |cfg: &TinyConfig| {
        let m = tiny_model(cfg);
        let mut c = m.new_cache(KvDtype::F32).expect("f32 cache");
        (
            m.config().arch,
            m.forward(&letters(), &mut c, Logits::All).expect("forward"),
        )
    };
    let (arch, qwen) = run(&tiny_qwen2());
    assert_eq!(arch, Architecture::Qwen2);
    let (arch, as_llama) = run(&TinyConfig {
        architecture: "llama".into(),
        ..tiny_qwen2()
    });
    assert_eq!(arch, Architecture::Llama);
    let (_, no_bias) = run(&TinyConfig {
        extra_tensors: Vec::new(),
        ..tiny_qwen2()
    });
    assert!(crate::testing::max_abs_diff(&qwen, &as_llama) > 0.01);
    assert!(crate::testing::max_abs_diff(&qwen, &no_bias) > 0.01);
    // A projection's bias alone is taken too (llama.cpp adds each that is present).
    let key_only = TinyConfig {
        extra_tensors: qkv_biases(&TinyConfig::default())
            .into_iter()
            .filter(|(name, _)| name.contains("attn_k"))
            .collect(),
        ..tiny_qwen2()
    };
    let (_, k_bias) = run(&key_only);
    assert!(crate::testing::max_abs_diff(&k_bias, &no_bias) > 0.01);
    assert!(crate::testing::max_abs_diff(&k_bias, &qwen) > 0.01);
}

#[test]
fn rope_frequency_factors_are_read_and_checked() {
    let with = |factors: Vec<f32>| TinyConfig {
        extra_tensors: vec![("rope_freqs.weight".into(), factors)],
        ..TinyConfig::default()
    };
    // 8-wide heads: four pairs.
    let m = tiny_model(&with(vec![1.0, 2.0, 4.0, 8.0]));
    assert_eq!(m.rope_freq_factors(), Some(&[1.0, 2.0, 4.0, 8.0][..]));
    let plain = tiny_model(&TinyConfig::default());
    assert_eq!(plain.rope_freq_factors(), None);
    let mut a = m.new_cache(KvDtype::F32).expect("f32 cache");
    let mut b = plain.new_cache(KvDtype::F32).expect("f32 cache");
    let toks = letters();
    let scaled = m.forward(&toks, &mut a, Logits::All).expect("forward");
    let unscaled = plain.forward(&toks, &mut b, Logits::All).expect("forward");
    // Position 0 does not turn; later ones do, by other angles.
    assert_eq!(bits(&scaled[..268]), bits(&unscaled[..268]));
    assert!(crate::testing::max_abs_diff(&scaled, &unscaled) > 0.01);
    // All ones is no scaling at all.
    let ones = tiny_model(&with(vec![1.0; 4]));
    let mut c = ones.new_cache(KvDtype::F32).expect("f32 cache");
    let same = ones.forward(&toks, &mut c, Logits::All).expect("forward");
    assert_eq!(bits(&same), bits(&unscaled));

    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let (_dir, path) = write_tiny(&with(vec![1.0, bad, 4.0, 8.0]), 7);
        let err = Model::load(&path).expect_err("a factor that is not positive");
        assert!(
            matches!(&err, EngineError::InvalidTensor { name, .. } if name == "rope_freqs.weight"),
            "{bad}: {err:?}"
        );
    }
    let (_dir, path) = write_tiny(&with(vec![1.0; 3]), 7);
    let err = Model::load(&path).expect_err("one factor per pair");
    assert!(
        matches!(&err, EngineError::TensorShape { name, expected, .. }
            if name == "rope_freqs.weight" && expected == &[4]),
        "{err:?}"
    );
}

#[test]
fn a_tensor_that_would_change_the_output_is_not_ignored() {
    // llama.cpp applies these; running without them would give other logits in silence.
    let cases = [
        ("llama", "blk.0.attn_output.bias", 32),
        ("llama", "blk.1.ffn_down.bias", 32),
        ("llama", "output.bias", 268),
        ("qwen2", "rope_freqs.weight", 4),
        ("llama", "rope_factors_long.weight", 4),
    ];
    for (arch, name, n) in cases {
        let cfg = TinyConfig {
            architecture: arch.into(),
            extra_tensors: vec![(name.into(), vec![0.5; n])],
            ..TinyConfig::default()
        };
        let (_dir, path) = write_tiny(&cfg, 1);
        let err = Model::load(&path).expect_err("a tensor the engine would ignore");
        assert!(
            matches!(&err, EngineError::UnsupportedTensor { name: t, arch: a } if t == name && *a == arch),
            "{arch} {name}: {err:?}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
    // Qwen2's LM head bias is applied.
    let mut cfg = tiny_qwen2();
    cfg.extra_tensors
        .push(("output.bias".into(), vec![0.5; 268]));
    let biased = tiny_model(&cfg);
    let plain = tiny_model(&tiny_qwen2());
    let mut a = biased.new_cache(KvDtype::F32).expect("f32 cache");
    let mut b = plain.new_cache(KvDtype::F32).expect("f32 cache");
    let x = biased
        .forward(&[5, 6], &mut a, Logits::All)
        .expect("forward");
    let y = plain
        .forward(&[5, 6], &mut b, Logits::All)
        .expect("forward");
    assert!(x.iter().zip(&y).all(|(x, y)| *x == y + 0.5));
}

#[test]
fn missing_tensor_is_named() {
    let cfg = TinyConfig {
        omit_tensor: Some("blk.1.ffn_up.weight".into()),
        ..TinyConfig::default()
    };
    let (_dir, path) = write_tiny(&cfg, 1);
    let err = Model::load(&path).expect_err("tensor missing");
    assert!(
        matches!(&err, EngineError::MissingTensor { name } if name == "blk.1.ffn_up.weight"),
        "{err:?}"
    );
    let cfg = TinyConfig {
        omit_tensor: Some("token_embd.weight".into()),
        ..TinyConfig::default()
    };
    let (_dir, path) = write_tiny(&cfg, 1);
    let err = Model::load(&path).expect_err("embeddings missing");
    assert!(
        matches!(&err, EngineError::MissingTensor { name } if name == "token_embd.weight"),
        "{err:?}"
    );
}

#[test]
fn bad_inputs_are_errors_and_leave_the_cache_alone() {
    let m = tiny_model(&TinyConfig {
        context_length: 30,
        ..TinyConfig::default()
    });
    let mut cache = m.new_cache(KvDtype::F32).expect("f32 cache");
    m.forward(&[5, 6, 7], &mut cache, Logits::None)
        .expect("prefill");
    let err = m
        .forward(&[5, 268], &mut cache, Logits::Last)
        .expect_err("out of vocab");
    assert!(
        matches!(
            err,
            EngineError::TokenOutOfVocab {
                token: 268,
                vocab: 268
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        m.forward(&[], &mut cache, Logits::Last),
        Err(EngineError::EmptyInput)
    ));
    let err = m
        .forward(&[5; 28], &mut cache, Logits::Last)
        .expect_err("past context");
    assert!(
        matches!(
            err,
            EngineError::ContextOverflow {
                needed: 31,
                max: 30
            }
        ),
        "{err:?}"
    );
    assert_eq!(cache.tokens(), &[5, 6, 7]);
    let mut wrong = KvCache::new(
        KvShape {
            n_layers: 3,
            n_kv_heads: 2,
            head_dim: 8,
            window: None,
        },
        KvDtype::F32,
    );
    let err = m
        .forward(&[5], &mut wrong, Logits::Last)
        .expect_err("wrong shape");
    assert!(
        matches!(err, EngineError::CacheShapeMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn real_model_answers_capital_of_france() {
    use crate::chat::{ChatTemplate, Message};
    use crate::sample::{Sampler, SamplingConfig};
    use crate::tokenizer::Tokenizer;

    let Some(path) = crate::testing::real_model_path() else {
        return;
    };
    let mut content = crate::gguf::GgufFile::open(&path).expect("open real model");
    let model = Model::from_file(&mut content).expect("load real model");
    let c = model.config();
    assert_eq!(
        (
            c.n_layers,
            c.dim,
            c.ffn_dim,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim
        ),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!(
        (c.rope_dim, c.rope_base, c.context_length, c.vocab_size),
        (64, 100000.0, 8192, 49152)
    );
    assert!(
        model.output.is_none(),
        "smollm2 ties its lm head to the embeddings"
    );
    // Memory holds the file's Q4_1 and Q8_0 blocks, rearranged: the same bytes.
    let (resident, file) = (model.weight_bytes(), model.file_tensor_bytes());
    assert_eq!((resident, file), (96_576_768, 96_576_768));

    let tokenizer = Tokenizer::from_gguf(&content).expect("tokenizer");
    let template = ChatTemplate::from_gguf(&content).expect("chat template");
    let messages = [
        Message::system("You are a helpful assistant."),
        Message::user("What is the capital of France?"),
    ];
    let prompt = template.render(&messages, true).expect("render");
    let ids = tokenizer.encode(&prompt).expect("encode");

    // Prefill in two uneven parts, then check the last logits against a one-shot prefill.
    let mut cache = model.new_cache(KvDtype::F32).expect("f32 cache");
    model
        .forward(&ids[..7], &mut cache, Logits::None)
        .expect("prefill part 1");
    let mut logits = model
        .forward(&ids[7..], &mut cache, Logits::Last)
        .expect("prefill part 2");
    let mut whole = model.new_cache(KvDtype::F32).expect("f32 cache");
    let once = model
        .forward(&ids, &mut whole, Logits::Last)
        .expect("prefill at once");
    assert_eq!(bits(&logits), bits(&once));

    let mut sampler = Sampler::new(SamplingConfig::greedy()).expect("greedy");
    let stop = tokenizer.stop_ids();
    let mut out = Vec::new();
    for _ in 0..12 {
        let next = sampler.sample(&logits).expect("sample");
        if stop.contains(&next) {
            break;
        }
        out.push(next);
        logits = model
            .forward(&[next], &mut cache, Logits::Last)
            .expect("decode");
    }
    let text = tokenizer.decode(&out).expect("decode ids");
    assert!(
        text.starts_with("The capital of France is Paris."),
        "model said {text:?}"
    );
}

/// The model at `path` loaded twice: weights as stored, and every weight dequantized to f32.
fn quantized_and_f32(path: &Path) -> (Model, Model) {
    let open = || crate::gguf::GgufFile::open(path).expect("open");
    let quantized = Model::from_file_as(&mut open(), WeightForm::Quantized).expect("load");
    let f32 = Model::from_file_as(&mut open(), WeightForm::F32).expect("load as f32");
    (quantized, f32)
}

/// Logits of a prefill of `prompt` (every token's) and of `steps` greedy decode steps, and the
/// tokens chosen.
fn prefill_and_greedy(m: &Model, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<u32>) {
    let vocab = m.config().vocab_size;
    let mut cache = m.new_cache(KvDtype::F32).expect("cache");
    let mut logits = m.forward(prompt, &mut cache, Logits::All).expect("prefill");
    let mut tokens = Vec::new();
    let mut last = logits[logits.len() - vocab..].to_vec();
    for _ in 0..steps {
        let next = last
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| match x > best.1 {
                true => (i, x),
                false => best,
            })
            .0 as u32;
        tokens.push(next);
        last = m
            .forward(&[next], &mut cache, Logits::Last)
            .expect("decode");
        logits.extend_from_slice(&last);
    }
    (bits(&logits), tokens)
}

/// Asserts that `quantized` gives at every level the bits `f32` (its weights dequantized)
/// gives at the portable one.
fn assert_same_bits_as_f32(quantized: &mut Model, f32: &mut Model, prompt: &[u32], what: &str) {
    f32.set_isa(Isa::PORTABLE);
    let want = prefill_and_greedy(f32, prompt, 4);
    crate::kernels::isa::for_each_isa(|isa| {
        quantized.set_isa(isa);
        let got = prefill_and_greedy(quantized, prompt, 4);
        assert!(got.0 == want.0, "{what} at {isa:?}: logits differ");
        assert_eq!(got.1, want.1, "{what} at {isa:?}: greedy tokens");
    });
}

#[test]
fn every_quantized_type_runs_as_its_dequantized_f32_model() {
    // 256-wide rows, so the K-quants apply to every projection.
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let cfg = TinyConfig {
            dim: 256,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 512,
            weight_dtype: dtype,
            embed_dtype: dtype,
            ..TinyConfig::default()
        };
        let (_dir, path) = write_tiny(&cfg, 9);
        let (mut quantized, mut f32) = quantized_and_f32(&path);
        assert!(
            quantized.weight_bytes() * 3 < f32.weight_bytes(),
            "{dtype:?} weights are held quantized"
        );
        let prompt: Vec<u32> = letters().into_iter().cycle().take(21).collect();
        assert_same_bits_as_f32(&mut quantized, &mut f32, &prompt, &format!("{dtype:?}"));
    }
}

#[test]
fn unsupported_types_and_partial_blocks_are_named_errors() {
    // Q8_1 is a GGML type candle reads but the engine does not hold.
    let (_dir, path) = write_tiny(
        &TinyConfig {
            weight_dtype: GgmlDType::Q8_1,
            ..TinyConfig::default()
        },
        1,
    );
    let err = Model::load(&path).expect_err("q8_1 weights");
    assert!(
        matches!(&err, EngineError::UnsupportedTensorType { name, dtype, .. }
            if name == "blk.0.attn_k.weight" && dtype == "Q8_1"),
        "{err:?}"
    );
    assert!(err.to_string().contains("Q4_K"), "{err}");
    // 128-wide rows of Q4_K, half a super-block each: candle writes no such file, so a Q4_0
    // tensor (as many bytes per value) is relabeled Q4_K in the header.
    let (_dir, path) = write_tiny(
        &TinyConfig {
            dim: 128,
            ffn_dim: 256,
            weight_dtype: GgmlDType::Q4_0,
            ..TinyConfig::default()
        },
        1,
    );
    relabel_tensor_type(&path, "blk.1.ffn_up.weight", 12);
    let err = Model::load(&path).expect_err("partial blocks");
    assert!(
        matches!(&err, EngineError::PartialBlocks { name, dtype, cols: 128, block: 256 }
            if name == "blk.1.ffn_up.weight" && dtype == "Q4_K"),
        "{err:?}"
    );
    assert!(err.to_string().contains("blk.1.ffn_up.weight"), "{err}");
}

/// Rewrites the GGML type number of tensor `name` in the header of the GGUF at `path`.
fn relabel_tensor_type(path: &Path, name: &str, ty: u32) {
    let mut bytes = std::fs::read(path).expect("read");
    let key = [&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat();
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the tensor's entry")
        + key.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    let ty_at = at + 4 + 8 * dims;
    bytes[ty_at..ty_at + 4].copy_from_slice(&ty.to_le_bytes());
    std::fs::write(path, bytes).expect("write");
}

/// SmolLM2's first layers as f32, read once per test binary; `None` (after the warning) where
/// the real model is missing.
fn smollm2_source() -> Option<&'static crate::testing::GgufSource> {
    static SOURCE: std::sync::OnceLock<crate::testing::GgufSource> = std::sync::OnceLock::new();
    let path = crate::testing::real_model_path()?;
    Some(SOURCE.get_or_init(|| {
        crate::testing::GgufSource::read(&path, 4).expect("reading the real model")
    }))
}

/// llama.cpp's choice for a tensor whose rows are not whole super-blocks (SmolLM2's 576).
fn fallback(dtype: GgmlDType) -> GgmlDType {
    match dtype {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    }
}

/// Writes SmolLM2's first layers requantized by `dtype(name, dims)` (1-D tensors stay f32)
/// and checks the model held quantized against the same file dequantized to f32.
fn check_requantized_smollm2(what: &str, dtype: impl Fn(&str, &[usize]) -> GgmlDType) {
    let Some(source) = smollm2_source() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("requantized.gguf");
    source
        .write(&path, |name, dims| match dims.len() {
            1 => GgmlDType::F32,
            _ => dtype(name, dims),
        })
        .expect("write the requantized model");
    let (mut quantized, mut f32) = quantized_and_f32(&path);
    assert!(quantized.weight_bytes() * 3 < f32.weight_bytes(), "{what}");
    // Memory holds the file's blocks (Q4_1's and Q8_0's rearranged): the same bytes.
    let (resident, file) = (quantized.weight_bytes(), quantized.file_tensor_bytes());
    assert_eq!(resident, file, "{what}: bytes resident against the file's");
    let tokenizer =
        crate::tokenizer::Tokenizer::from_gguf(&crate::gguf::GgufFile::open(&path).expect("open"))
            .expect("tokenizer");
    let prompt = tokenizer
        .encode("The capital of France is")
        .expect("encode");
    assert_same_bits_as_f32(&mut quantized, &mut f32, &prompt, what);
}

/// One test per block type: every weight whose rows are whole blocks of it in that type, the
/// others in llama.cpp's fallback.
macro_rules! requantized_smollm2 {
    ($($test:ident: $dtype:expr,)*) => {$(
        #[test]
        fn $test() {
            let dtype: GgmlDType = $dtype;
            check_requantized_smollm2(&format!("{dtype:?}"), |_, dims| {
                match dims[dims.len() - 1] % dtype.block_size() {
                    0 => dtype,
                    _ => fallback(dtype),
                }
            });
        }
    )*};
}

requantized_smollm2! {
    requantized_smollm2_q4_0_is_its_f32_twin: GgmlDType::Q4_0,
    requantized_smollm2_q5_0_is_its_f32_twin: GgmlDType::Q5_0,
    requantized_smollm2_q5_1_is_its_f32_twin: GgmlDType::Q5_1,
    requantized_smollm2_q2_k_is_its_f32_twin: GgmlDType::Q2K,
    requantized_smollm2_q3_k_is_its_f32_twin: GgmlDType::Q3K,
    requantized_smollm2_q4_k_is_its_f32_twin: GgmlDType::Q4K,
    requantized_smollm2_q5_k_is_its_f32_twin: GgmlDType::Q5K,
    requantized_smollm2_q6_k_is_its_f32_twin: GgmlDType::Q6K,
}

#[test]
fn requantized_smollm2_in_gemma_s_mix_is_its_f32_twin() {
    // Gemma 3 270M's Q4_K_M choices, on SmolLM2's shapes: Q5_0 where rows are not whole
    // super-blocks, V in Q8_0 every other layer (so Q, K and V stack different kinds), the
    // down projection in Q6_K and Q4_K by turns, a Q8_0 embedding.
    check_requantized_smollm2("gemma's mix", |name, dims| {
        let layer: usize = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        let whole = dims[dims.len() - 1].is_multiple_of(256);
        match name {
            "token_embd.weight" => GgmlDType::Q8_0,
            _ if name.ends_with("attn_v.weight") && layer.is_multiple_of(2) => GgmlDType::Q8_0,
            _ if name.ends_with("ffn_down.weight") && whole => match layer % 2 {
                0 => GgmlDType::Q6K,
                _ => GgmlDType::Q4K,
            },
            _ if name.ends_with("attn_output.weight") && whole => GgmlDType::Q4K,
            _ => GgmlDType::Q5_0,
        }
    });
}
