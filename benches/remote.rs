//! The remote tier against plain object_store calls of the same bytes, side by side in one run,
//! on a real 3-node Garage cluster (loopback, replication factor 3) this program starts.
//!
//! For a cache shaped like SmolLM2-135M (30 layers, 3 KV heads, head dim 64, f16) of each
//! history length, alternating `--repeats` times:
//! - save: `Remote::push_segment` of a new segment (a HEAD, reading and verifying the local
//!   file, the PUT) against a plain PUT of the same bytes under a new key;
//! - load: `Remote::fetch_segment` into an empty local store (GET, verifying every checksum
//!   and the id, temp file, fsync, rename) against a plain GET of the same object.
//!
//! Then 20 agents sharing one system prompt are pushed, and the bytes the bucket holds are
//! compared with the ideal (the prompt's segment once, plus each agent's own).
//!
//! Then, with the real model (SmolLM2-135M, f16 KV), an agent whose history of each length was
//! computed on host A (a pool sharing the cluster through node 1) answers its next turn on
//! host B (a new pool with an empty directory, through node 3): time to the first token,
//! fetching the changes and the cache included, against host C answering the same turn from
//! the same transcript by re-prefilling it (a pool without the shared store and without the
//! cache). Both must give the same token. Also reported: the commit of host B's turn (its
//! cache saved, the new segment pushed, the agent's head decided), which a turn on a pool
//! without a shared store does not pay.
//!
//! A history longer than SmolLM2's context runs on Gemma 3 270M instead (when fetched): a base
//! model, so raw text through the engine and the stores, without a pool.
//!
//! Prints `REMOTE {...}`, `SHARED {...}` and `SECOND {...}` lines for
//! `cargo xtask bench --only store`.
//! `cargo bench -p agentkv-benches --bench remote -- --histories 1024 --repeats 3` runs it
//! alone (Garage from AGENTKV_GARAGE or cargo's bin directory).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use agent_pool::{AgentPool, PoolConfig, SharedStore};
use engine::Engine;
use engine::testing::options;
use kv_remote::testing::{Garage, garage_binary};
use kv_store::{KvDtype, KvKind, KvSource, Store};

#[path = "smollm2_shape.rs"]
mod shape;

use shape::{HEAD_DIM, KV_HEADS, meta};

/// A cache whose bytes follow from (layer, kind, head, position, salt).
struct Blob {
    tokens: Vec<u32>,
    salt: u32,
}

impl Blob {
    fn new(tokens: Vec<u32>, salt: u32) -> Blob {
        Blob { tokens, salt }
    }
}

impl KvSource for Blob {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn write_kv(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        let lk = (layer * 2 + usize::from(kind == KvKind::V)) as u32;
        for h in 0..KV_HEADS as u32 {
            for p in range.clone() {
                let seed = (p as u32).wrapping_mul(2_654_435_761) ^ (lk * 7919) ^ (h * 104_729);
                let seed = seed ^ self.salt;
                out.extend((0..HEAD_DIM as u32 * 2).map(|i| (seed ^ i.wrapping_mul(31)) as u8));
            }
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn args() -> (Vec<usize>, usize) {
    let mut histories = vec![1024, 4096, 16384];
    let mut repeats = 5;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--histories" => {
                histories = it
                    .next()
                    .expect("--histories takes a list")
                    .split(',')
                    .map(|h| h.trim().parse().expect("a history length"))
                    .collect();
            }
            "--repeats" => {
                repeats = it
                    .next()
                    .and_then(|r| r.parse().ok())
                    .expect("--repeats takes a count");
            }
            // `cargo bench` passes `--bench`; nothing else is ours.
            _ => {}
        }
    }
    (histories, repeats.max(1))
}

fn main() {
    let (histories, repeats) = args();
    let Some(binary) = garage_binary() else {
        std::process::exit(1);
    };
    // Under target/, on the project's disk: /tmp may be a RAM disk, which would flatter fsync.
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp");
    std::fs::create_dir_all(&base).expect("create the bench directory");
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let garage = Garage::start(&binary, &dir.path().join("garage"), 3);
    let (writer, reader) = (garage.remote(0, "bench"), garage.remote(2, "bench"));
    let meta = meta();
    let local = Store::open(&dir.path().join("local")).expect("local store");
    let mut salt = 0;
    for &n in &histories {
        let (mut ours_save, mut base_save, mut ours_load, mut base_load) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut bytes = 0u64;
        for r in 0..repeats {
            salt += 1;
            let tokens: Vec<u32> = (0..n as u32).map(|t| (t + salt) % 49_152).collect();
            let name = format!("c{salt}");
            local
                .save(&name, &meta, &Blob::new(tokens, salt))
                .expect("local save");
            let id = local
                .manifest(&name)
                .expect("manifest")
                .expect("saved")
                .segments[0]
                .id
                .clone();
            let file = std::fs::read(local.segment_path(&id)).expect("segment");
            bytes = file.len() as u64;
            let key = format!("plain/{salt}");
            let mut one = |ours: bool| {
                if ours {
                    let t = Instant::now();
                    let pushed = writer.push_segment(&local, &id).expect("push");
                    assert!(!pushed.already_there);
                    ours_save.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    let t = Instant::now();
                    writer.put_raw(&key, file.clone()).expect("put");
                    base_save.push(t.elapsed().as_secs_f64() * 1e3);
                }
            };
            // Alternate which goes first.
            one(r % 2 == 0);
            one(r % 2 == 1);
            let fresh = tempfile::tempdir_in(dir.path()).expect("tempdir");
            let other = Store::open(fresh.path()).expect("fresh store");
            let mut one = |ours: bool| {
                if ours {
                    let t = Instant::now();
                    let got = reader.fetch_segment(&other, &id).expect("fetch");
                    assert_eq!(got.bytes, bytes);
                    ours_load.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    let t = Instant::now();
                    let got = reader.get_raw(&key).expect("get");
                    assert_eq!(got.len() as u64, bytes);
                    base_load.push(t.elapsed().as_secs_f64() * 1e3);
                }
            };
            one(r % 2 == 1);
            one(r % 2 == 0);
            local.delete(&name).expect("delete");
            local.gc().expect("gc");
        }
        let mut line = format!("REMOTE {{\"history\":{n},\"bytes\":{bytes},\"repeats\":{repeats}");
        for (name, v) in [
            ("ours_save", &mut ours_save),
            ("base_save", &mut base_save),
            ("ours_load", &mut ours_load),
            ("base_load", &mut base_load),
        ] {
            let (min, max) = (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(0.0, f64::max),
            );
            line += &format!(
                ",\"{name}_ms\":{:.2},\"{name}_min_ms\":{min:.2},\"{name}_max_ms\":{max:.2}",
                median(v)
            );
        }
        println!("{line}}}");
    }

    // 20 agents, one system prompt of 512 tokens, each with 256 tokens of its own.
    let shared = garage.remote(1, "shared");
    let system: Vec<u32> = (0..512).map(|t| t % 49_152 + 7).collect();
    let mut ideal = 0u64;
    for agent in 0..20u32 {
        let name = format!("agent{agent}");
        local
            .save(&name, &meta, &Blob::new(system.clone(), 0))
            .expect("save");
        let mut tokens = system.clone();
        tokens.extend((0..256).map(|t| 1000 + agent * 256 + t));
        local
            .save(&name, &meta, &Blob::new(tokens, 0))
            .expect("save");
        let chain = local
            .manifest(&name)
            .expect("manifest")
            .expect("saved")
            .segments;
        for (i, s) in chain.iter().enumerate() {
            let size = std::fs::metadata(local.segment_path(&s.id))
                .expect("size")
                .len();
            if i > 0 || agent == 0 {
                ideal += size;
            }
            shared.push_segment(&local, &s.id).expect("push");
        }
    }
    let stored = shared.stored_bytes("segments").expect("list");
    println!("SHARED {{\"agents\":20,\"stored_bytes\":{stored},\"ideal_bytes\":{ideal}}}");

    second_host(&garage, dir.path(), &histories, repeats);
}

/// For a history longer than SmolLM2's context: Gemma 3 270M (a base model, so raw text and no
/// pool, which needs a chat template), f16 KV. Host A prefills `n` tokens, saves the cache and
/// pushes its segments; host B (an empty local store, another node) fetches them, loads the
/// cache and answers the next 8 tokens of text with one generated token; host C prefills
/// history and question from scratch. Both must give the same token.
fn second_host_raw(garage: &Garage, dir: &Path, model: &Path, n: usize, repeats: usize) {
    let engine = Engine::load(model).expect("load Gemma 3");
    let meta = engine.cache_meta(KvDtype::F16);
    let tok = engine.tokenizer();
    let mut history: Vec<u32> = tok
        .bos_id()
        .filter(|_| tok.add_bos_token())
        .into_iter()
        .collect();
    let text = filler(&engine, n + n / 20, 7);
    history.extend(tok.encode_plain(&text).expect("tokenize"));
    history.truncate(n);
    let mut prompt = history.clone();
    prompt.extend(
        tok.encode_plain(" item1 item2 item3 item4")
            .expect("tokenize"),
    );
    let a_store = Store::open(&dir.join("raw-a")).expect("host A's store");
    let remote_a = garage.remote(0, "raw");
    let mut cache = engine.new_cache(KvDtype::F16).expect("cache");
    engine.sync(&mut cache, &history).expect("host A prefills");
    cache.save(&a_store, "long", &meta).expect("host A saves");
    let chain: Vec<_> = a_store
        .manifest("long")
        .expect("manifest")
        .expect("saved")
        .segments
        .into_iter()
        .map(|s| s.id)
        .collect();
    for id in &chain {
        remote_a.push_segment(&a_store, id).expect("host A pushes");
    }
    drop(cache);
    let remote_b = garage.remote(2, "raw");
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for r in 0..repeats {
        let mut token = [None, None];
        let mut one = |ours_first: bool| {
            let t = Instant::now();
            let mut cache = if ours_first {
                let fresh = tempfile::tempdir_in(dir).expect("tempdir");
                let b_store = Store::open(fresh.path()).expect("host B's store");
                for id in &chain {
                    remote_b
                        .fetch_segment(&b_store, id)
                        .expect("host B fetches");
                }
                let loaded = b_store.adopt("long", &meta, &chain).expect("host B adopts");
                let shape = engine.model().kv_shape();
                kv_extract::KvCache::import(&loaded, &meta, shape).expect("host B loads")
            } else {
                engine.new_cache(KvDtype::F16).expect("cache")
            };
            let reply = engine
                .generate(&mut cache, &prompt, &options(1), &mut |_| {})
                .expect("the next token");
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if ours_first {
                assert_eq!(reply.reused_tokens, history.len());
                ours.push(ms);
                token[0] = Some(reply.tokens);
            } else {
                base.push(ms);
                token[1] = Some(reply.tokens);
            }
        };
        one(r % 2 == 0);
        one(r % 2 == 1);
        assert_eq!(token[0], token[1], "hosts B and C answered differently");
    }
    let (o, b) = (median(&mut ours), median(&mut base));
    println!(
        "SECOND {{\"history\":{n},\"tokens\":{},\"raw_gemma\":1,\"repeats\":{repeats},\"ours_ms\":{o:.2},\"base_ms\":{b:.2}}}",
        history.len()
    );
}

/// A user message of about `n` tokens, different for every `salt`.
fn filler(engine: &Engine, n: usize, salt: usize) -> String {
    let words = |k: usize| -> String {
        (0..k)
            .map(|i| format!("item{} ", (i * 7919 + salt * 104_729) % 100_000))
            .collect()
    };
    let sample = 200;
    let per_word = engine
        .tokenizer()
        .encode_plain(&words(sample))
        .expect("tokenize")
        .len() as f64
        / sample as f64;
    words((n as f64 / per_word) as usize)
}

fn second_host(garage: &Garage, dir: &Path, histories: &[usize], repeats: usize) {
    let Some(model) = engine::testing::real_model_path() else {
        std::process::exit(1);
    };
    let engine = Arc::new(Engine::load(&model).expect("load the model"));
    let context = engine.context_len();
    let shared = |node: usize, host: &str| PoolConfig {
        shared: Some(SharedStore {
            remote: Arc::new(garage.remote(node, "second")),
            host: host.to_owned(),
        }),
        ..PoolConfig::default()
    };
    let system = "You are a careful assistant. Answer in one short sentence.";
    let a = AgentPool::open(
        &dir.join("host-a"),
        Arc::clone(&engine),
        shared(0, "host-a"),
    )
    .expect("host A");
    let mut salt = 0;
    for &n in histories {
        if n + 64 > context {
            // Longer than SmolLM2's context: the base Gemma 3 model, raw text, if fetched.
            match engine::testing::real_gemma_path() {
                Some(gemma) => second_host_raw(garage, dir, &gemma, n, repeats),
                None => println!("SECOND {{\"history\":{n},\"context\":{context}}}"),
            }
            continue;
        }
        let (mut ours, mut base, mut commit) = (Vec::new(), Vec::new(), Vec::new());
        let mut history = 0;
        for r in 0..repeats {
            salt += 1;
            let id = format!("agent-{salt}");
            a.create_agent(&id, "bench", system).expect("create");
            let first = a
                .generate(&id, &filler(&engine, n, salt), &options(1), &mut |_| {})
                .expect("first turn on host A");
            history = first.prompt_tokens + first.tokens.len();
            // Host C: the same transcript, no cache, no shared store.
            let c_root = dir.join(format!("host-c-{salt}"));
            std::fs::create_dir_all(c_root.join("agents/").join(&id)).expect("host C");
            for file in ["agent.json", "transcript.jsonl"] {
                std::fs::copy(
                    dir.join("host-a/agents").join(&id).join(file),
                    c_root.join("agents").join(&id).join(file),
                )
                .expect("copy the transcript");
            }
            let c = AgentPool::open(&c_root, Arc::clone(&engine), PoolConfig::default())
                .expect("host C");
            let b = AgentPool::open(
                &dir.join(format!("host-b-{salt}")),
                Arc::clone(&engine),
                shared(2, &format!("host-b-{salt}")),
            )
            .expect("host B");
            let question = "Which item came first?";
            let mut token = [None, None];
            let mut one = |ours_first: bool| {
                let pool = if ours_first { &b } else { &c };
                let t = Instant::now();
                let reply = pool
                    .generate(&id, question, &options(1), &mut |_| {})
                    .expect("next turn");
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if ours_first {
                    assert!(
                        reply.rebuilt.is_none(),
                        "host B rebuilt: {:?}",
                        reply.rebuilt
                    );
                    ours.push(ms);
                    commit.push(reply.timings.commit.as_secs_f64() * 1e3);
                    token[0] = Some(reply.tokens);
                } else {
                    assert!(reply.rebuilt.is_some(), "host C did not re-prefill");
                    base.push(ms);
                    token[1] = Some(reply.tokens);
                }
            };
            one(r % 2 == 0);
            one(r % 2 == 1);
            assert_eq!(token[0], token[1], "hosts B and C answered differently");
        }
        let (o, b, c) = (median(&mut ours), median(&mut base), median(&mut commit));
        println!(
            "SECOND {{\"history\":{n},\"tokens\":{history},\"repeats\":{repeats},\"ours_ms\":{o:.2},\"base_ms\":{b:.2},\"commit_ms\":{c:.2}}}"
        );
    }
}
