//! agent-pool against a simple model, with the deterministic fake engine: random sequences of
//! operations (proptest), byte accounting, eviction and pinning, shared system prompts, and
//! threads working on different agents and on one agent.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use agent_pool::testing::FakeBackend;
use agent_pool::{AgentPool, Backend, PoolConfig, PoolError, Turn};
use engine::Message;
use engine::testing::options;
use kv_store::KvDtype;
use proptest::prelude::*;

const SYSTEMS: [&str; 3] = [
    "You are a careful researcher.",
    "You write code.",
    "You are a careful researcher.\nBe brief.",
];

fn pairs(turns: &[Turn]) -> Vec<(String, String)> {
    turns
        .iter()
        .map(|t| (t.user().to_owned(), t.reply.clone()))
        .collect()
}

/// Hot count and bytes as the pool reports them equal the caches' real sizes, within limits.
fn check_accounting(pool: &AgentPool<FakeBackend>) {
    let stats = pool.stats();
    let (count, bytes) = pool.audit();
    assert_eq!(
        stats.hot.len(),
        count,
        "hot agents reported vs holding a cache"
    );
    assert_eq!(
        stats.kv_bytes, bytes,
        "reported bytes vs bytes_allocated of the hot caches"
    );
    assert_eq!(
        stats.kv_bytes,
        stats.hot.iter().map(|h| h.bytes).sum::<usize>()
    );
    assert!(
        count <= stats.max_hot,
        "{count} hot > max {}",
        stats.max_hot
    );
    assert!(
        bytes <= stats.kv_budget_bytes,
        "{bytes} > budget {}",
        stats.kv_budget_bytes
    );
}

#[derive(Clone, Debug)]
enum Op {
    Create(usize, usize),
    Generate(usize, usize, usize),
    Evict(usize),
    Load(usize),
    Save(usize),
    Delete(usize),
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let agent = 0..5usize;
    prop_oneof![
        2 => (agent.clone(), 0..SYSTEMS.len()).prop_map(|(a, s)| Op::Create(a, s)),
        6 => (agent.clone(), 0..1000usize, 0..14usize).prop_map(|(a, u, m)| Op::Generate(a, u, m)),
        1 => agent.clone().prop_map(Op::Evict),
        1 => agent.clone().prop_map(Op::Load),
        1 => agent.clone().prop_map(Op::Save),
        1 => agent.prop_map(Op::Delete),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

fn config() -> impl Strategy<Value = PoolConfig> {
    (
        1..4usize,
        10_000..300_000usize,
        prop_oneof![Just(KvDtype::F32), Just(KvDtype::F16), Just(KvDtype::Bf16)],
        any::<bool>(),
    )
        .prop_map(
            |(max_hot, kv_budget_bytes, kv_dtype, save_every_turn)| PoolConfig {
                max_hot,
                kv_budget_bytes,
                kv_dtype,
                save_every_turn,
                shared: None,
            },
        )
}

/// What the pool must hold: per agent, its system prompt and its turns.
type Model = BTreeMap<String, (usize, Vec<(String, String)>)>;

fn check_against_model(pool: &AgentPool<FakeBackend>, model: &Model) {
    let listed: Vec<String> = pool.list().into_iter().map(|a| a.id).collect();
    assert_eq!(listed, model.keys().cloned().collect::<Vec<_>>());
    for (id, (sys, turns)) in model {
        assert_eq!(
            &pairs(&pool.transcript(id).expect("transcript")),
            turns,
            "{id}"
        );
        assert_eq!(pool.info(id).expect("info").system_prompt, SYSTEMS[*sys]);
    }
}

fn run_ops(config: PoolConfig, ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(FakeBackend::new("fake"));
    let open = || AgentPool::open(dir.path(), Arc::clone(&fake), config.clone()).expect("open");
    let mut pool = open();
    let mut model = Model::new();
    for (step, op) in ops.into_iter().enumerate() {
        let name = |a: usize| format!("agent-{a}");
        match op {
            Op::Create(a, sys) => {
                let id = name(a);
                let shared = model.values().any(|(s, _)| *s == sys);
                match pool.create_agent(&id, "tester", SYSTEMS[sys]) {
                    Ok(report) => {
                        assert!(!model.contains_key(&id));
                        assert!(report.system_tokens > 0);
                        if shared {
                            assert!(report.adopted, "a live agent shares this system prompt");
                        }
                        model.insert(id, (sys, Vec::new()));
                    }
                    Err(PoolError::AlreadyExists { .. }) => assert!(model.contains_key(&id)),
                    Err(e) => panic!("create {id}: {e}"),
                }
            }
            Op::Generate(a, u, max_tokens) => {
                let id = name(a);
                let user = format!("message {u} at step {step}");
                match pool.generate(&id, &user, &options(max_tokens), &mut |_| {}) {
                    Ok(reply) => {
                        let (sys, turns) = model.get_mut(&id).expect("generated for a live agent");
                        let want = fake.expected_reply(SYSTEMS[*sys], turns, &user, max_tokens);
                        assert_eq!(reply.text, want, "reply of {id} at step {step}");
                        assert_eq!(reply.turn, Some(turns.len() as u64));
                        turns.push((user, reply.text));
                    }
                    Err(PoolError::UnknownAgent { id: named, .. }) => {
                        assert_eq!(named, id);
                        assert!(!model.contains_key(&id));
                    }
                    Err(e) => panic!("generate {id}: {e}"),
                }
            }
            Op::Evict(a) => match pool.evict(&name(a)) {
                Ok(_) => assert!(model.contains_key(&name(a))),
                Err(PoolError::UnknownAgent { .. }) => assert!(!model.contains_key(&name(a))),
                Err(e) => panic!("evict: {e}"),
            },
            Op::Load(a) => match pool.load_agent(&name(a)) {
                Ok(report) => {
                    assert!(model.contains_key(&name(a)));
                    // Nothing is damaged here: every cold cache loads from disk.
                    assert_eq!(report.rebuilt, None);
                    assert!(report.already_hot || report.resumed_from_disk);
                }
                Err(PoolError::OverBudget { bytes, budget, .. }) => assert!(bytes > budget),
                Err(PoolError::UnknownAgent { .. }) => assert!(!model.contains_key(&name(a))),
                Err(e) => panic!("load: {e}"),
            },
            Op::Save(a) => match pool.save_agent(&name(a)) {
                Ok(_) => assert!(model.contains_key(&name(a))),
                Err(PoolError::UnknownAgent { .. }) => assert!(!model.contains_key(&name(a))),
                Err(e) => panic!("save: {e}"),
            },
            Op::Delete(a) => match pool.delete(&name(a)) {
                Ok(()) => assert!(model.remove(&name(a)).is_some()),
                Err(PoolError::UnknownAgent { .. }) => assert!(!model.contains_key(&name(a))),
                Err(e) => panic!("delete: {e}"),
            },
            Op::Reopen => {
                drop(pool);
                pool = open();
                check_against_model(&pool, &model);
            }
            Op::Crash => {
                pool.abandon();
                pool = open();
                check_against_model(&pool, &model);
            }
        }
        check_accounting(&pool);
    }
    drop(pool);
    let pool = open();
    check_against_model(&pool, &model);
    // Every agent loads, and its next reply is the one its transcript implies.
    for (id, (sys, turns)) in &model {
        let reply = pool
            .generate(id, "one more", &options(8), &mut |_| {})
            .expect("generate");
        assert_eq!(
            reply.text,
            fake.expected_reply(SYSTEMS[*sys], turns, "one more", 8)
        );
        check_accounting(&pool);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_model(config in config(), ops in proptest::collection::vec(op(), 1..40)) {
        run_ops(config, ops);
    }
}

fn fake_pool(
    dir: &std::path::Path,
    fake: FakeBackend,
    config: PoolConfig,
) -> AgentPool<FakeBackend> {
    AgentPool::open(dir, Arc::new(fake), config).expect("open")
}

#[test]
fn eviction_is_least_recently_used_and_saves_dirty_caches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = fake_pool(
        dir.path(),
        FakeBackend::default(),
        PoolConfig {
            max_hot: 2,
            ..PoolConfig::default()
        },
    );
    for id in ["a", "b", "c"] {
        pool.create_agent(id, "t", &format!("system of {id}"))
            .expect("create");
    }
    let hot =
        |p: &AgentPool<FakeBackend>| p.stats().hot.into_iter().map(|h| h.id).collect::<Vec<_>>();
    assert_eq!(hot(&pool), ["c", "b"]);
    let first = pool
        .generate("b", "hi", &options(8), &mut |_| {})
        .expect("b");
    pool.generate("a", "hi", &options(8), &mut |_| {})
        .expect("a");
    // a became hot: c (least recently used) left, b (used since) stayed.
    assert_eq!(hot(&pool), ["a", "b"]);
    assert!(pool.stats().hot.iter().all(|h| h.dirty));
    pool.generate("c", "hi", &options(8), &mut |_| {})
        .expect("c");
    assert_eq!(hot(&pool), ["c", "a"]);
    let stats = pool.stats();
    assert!(stats.counters.evictions >= 2);
    // b was evicted to make room for c: saved then, so it resumes from disk with its first
    // turn cached (the prompt and every reply token but the last, as the engine leaves it),
    // not just the system prompt.
    let reply = pool
        .generate("b", "again", &options(8), &mut |_| {})
        .expect("b again");
    assert!(reply.resumed_from_disk && reply.rebuilt.is_none());
    assert!(
        reply.reused_tokens >= first.prompt_tokens + first.tokens.len() - 1,
        "reused {} of a first turn of {} + {}",
        reply.reused_tokens,
        first.prompt_tokens,
        first.tokens.len()
    );
    check_accounting(&pool);
    assert_eq!(stats.weight_bytes, 1 << 20);
}

#[test]
fn a_load_at_max_hot_reuses_the_evicted_agents_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = fake_pool(
        dir.path(),
        FakeBackend::default(),
        PoolConfig {
            max_hot: 1,
            ..PoolConfig::default()
        },
    );
    pool.create_agent("a", "t", "short").expect("create a");
    pool.create_agent("b", "t", "a much longer system prompt than a's")
        .expect("create b");
    // b is hot and the pool full: loading a evicts b first and reads a into b's memory.
    let report = pool.load_agent("a").expect("load a");
    assert!(
        report.resumed_from_disk && report.reused_memory,
        "{report:?}"
    );
    // Back and forth with turns in between: each resume reuses the other's buffers (grown
    // when too small), and the fake engine checks every reused K/V position.
    for round in 0..3 {
        for id in ["b", "a"] {
            let reply = pool
                .generate(id, &format!("turn {round}"), &options(6), &mut |_| {})
                .expect("generate");
            assert!(reply.resumed_from_disk && reply.rebuilt.is_none());
            check_accounting(&pool);
        }
    }
    let report = pool.load_agent("b").expect("load b");
    assert!(report.reused_memory && report.tokens > 0, "{report:?}");
    assert_eq!(pool.stats().hot.len(), 1);
    // With room to spare nothing is evicted, and the load takes new memory.
    let roomy = tempfile::tempdir().expect("tempdir");
    let pool = fake_pool(roomy.path(), FakeBackend::default(), PoolConfig::default());
    pool.create_agent("a", "t", "short").expect("create a");
    pool.evict("a").expect("evict");
    let report = pool.load_agent("a").expect("load a");
    assert!(
        report.resumed_from_disk && !report.reused_memory,
        "{report:?}"
    );
}

#[test]
fn byte_budget_evicts_and_a_cache_larger_than_the_budget_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    const BUDGET: usize = 80_000;
    let config = PoolConfig {
        max_hot: 10,
        kv_budget_bytes: BUDGET,
        kv_dtype: KvDtype::F32,
        ..PoolConfig::default()
    };
    let pool = fake_pool(dir.path(), FakeBackend::default(), config);
    // A fake cache costs 128 bytes per token of capacity: a new agent holds 64 (8 KiB), a
    // loaded one its tokens plus 256 of headroom (about 35 kB here).
    for id in ["a", "b", "c"] {
        pool.create_agent(id, "t", "shared").expect("create");
        check_accounting(&pool);
    }
    assert_eq!(pool.stats().hot.len(), 3);
    for id in ["a", "b", "c"] {
        assert!(pool.evict(id).expect("evict"));
    }
    assert_eq!(pool.stats().kv_bytes, 0);
    pool.load_agent("a").expect("load a");
    pool.load_agent("b").expect("load b");
    let two = pool.stats();
    assert_eq!(two.hot.len(), 2, "{:?}", two.hot);
    assert!(
        two.kv_bytes + two.hot[0].bytes > BUDGET,
        "a third does not fit"
    );
    pool.load_agent("c").expect("load c");
    let hot: Vec<String> = pool.stats().hot.into_iter().map(|h| h.id).collect();
    assert_eq!(hot, ["c", "b"], "a, least recently used, left");
    check_accounting(&pool);

    // Grow c past the whole budget: after its turn it leaves memory too.
    let long = "x".repeat(700);
    let reply = pool
        .generate("c", &long, &options(4), &mut |_| {})
        .expect("long turn");
    assert!(reply.prompt_tokens > 700);
    check_accounting(&pool);
    assert!(pool.stats().hot.is_empty());
    match pool.load_agent("c") {
        Err(PoolError::OverBudget { id, bytes, budget }) => {
            assert_eq!((id.as_str(), budget), ("c", BUDGET));
            assert!(bytes > budget);
        }
        other => panic!("{other:?}"),
    }
    check_accounting(&pool);
    // It is still usable: each call loads it, runs, and lets it go.
    let reply = pool
        .generate("c", "short", &options(4), &mut |_| {})
        .expect("over-budget agent still runs");
    assert!(reply.resumed_from_disk);
    check_accounting(&pool);
}

#[test]
fn same_system_prompt_shares_one_segment_and_later_agents_adopt_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeBackend::default();
    let pool = fake_pool(dir.path(), fake.clone(), PoolConfig::default());
    let first = pool.create_agent("first", "t", SYSTEMS[0]).expect("create");
    assert!(!first.adopted && first.cache_saved);
    let second = pool
        .create_agent("second", "t", SYSTEMS[0])
        .expect("create");
    assert!(second.adopted);
    assert_eq!(second.system_tokens, first.system_tokens);
    let other = pool.create_agent("other", "t", SYSTEMS[1]).expect("create");
    assert!(!other.adopted);
    assert_eq!(pool.stats().counters.adoptions, 1);

    let store = pool.store();
    let chain = |id: &str| {
        store
            .manifest(id)
            .expect("manifest")
            .expect("saved")
            .segments
    };
    assert_eq!(chain("first"), chain("second"), "one shared segment");
    assert_ne!(chain("first")[0].id, chain("other")[0].id);
    let meta = pool.cache_meta().clone();
    let sys = fake
        .chat_tokens(&[Message::system(SYSTEMS[0])], false)
        .expect("tokens");
    assert_eq!(
        chain("first")[0].id,
        kv_store::SegmentId::compute(&meta, None, &sys)
    );

    // The adopted prefix continues exactly as a computed one (the fake's oracle checks every
    // K/V value), and a later turn keeps the shared segment as the chain's first link.
    let reply = pool
        .generate("second", "hello", &options(8), &mut |_| {})
        .expect("generate");
    assert_eq!(reply.reused_tokens, sys.len());
    assert_eq!(reply.text, fake.expected_reply(SYSTEMS[0], &[], "hello", 8));
    pool.save_agent("second").expect("save");
    assert_eq!(chain("second")[0], chain("first")[0]);
    assert_eq!(chain("second").len(), 2);

    // Deleting one sharer keeps the segment for the other.
    pool.delete("first").expect("delete");
    assert!(store.segment_path(&chain("second")[0].id).exists());
    let third = pool.create_agent("third", "t", SYSTEMS[0]).expect("create");
    assert!(third.adopted);
}

#[test]
fn a_generating_agent_is_pinned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeBackend::default().with_token_delay(Duration::from_millis(25));
    let pool = Arc::new(fake_pool(
        dir.path(),
        fake,
        PoolConfig {
            max_hot: 1,
            ..PoolConfig::default()
        },
    ));
    pool.create_agent("busy", "t", "s1").expect("create");
    pool.create_agent("other", "t", "s2").expect("create");
    let started = Arc::new(Barrier::new(2));
    let worker = {
        let (pool, started) = (Arc::clone(&pool), Arc::clone(&started));
        std::thread::spawn(move || {
            let mut first = true;
            pool.generate("busy", "a long answer please", &options(12), &mut |_| {
                if std::mem::take(&mut first) {
                    started.wait();
                }
            })
        })
    };
    started.wait();
    // "busy" is mid-generation: making "other" hot must not evict it. (With one slot and
    // "busy" pinned, "other" is the one that leaves again.)
    let evictions = pool.stats().counters.evictions;
    pool.load_agent("other").expect("load other");
    let during = pool.stats();
    assert_eq!(
        during.hot.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
        ["busy"]
    );
    assert_eq!(during.counters.evictions, evictions + 1);
    let reply = worker.join().expect("worker").expect("generate");
    assert!(!reply.text.is_empty());
    // Once it is done, the limit holds again.
    assert_eq!(pool.stats().hot.len(), 1);
    let (count, _) = pool.audit();
    assert_eq!(count, 1);
}

#[test]
fn threads_on_different_agents_do_not_interfere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeBackend::default().with_token_delay(Duration::from_micros(300));
    let pool = Arc::new(fake_pool(
        dir.path(),
        fake.clone(),
        PoolConfig {
            max_hot: 2,
            kv_budget_bytes: 200_000,
            ..PoolConfig::default()
        },
    ));
    let ids: Vec<String> = (0..4).map(|i| format!("worker-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        pool.create_agent(id, "t", SYSTEMS[i % 2]).expect("create");
    }
    let handles: Vec<_> = ids
        .iter()
        .cloned()
        .map(|id| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                (0..6)
                    .map(|k| {
                        let reply = pool
                            .generate(&id, &format!("{id} says {k}"), &options(10), &mut |_| {})
                            .expect("generate");
                        assert_eq!(reply.turn, Some(k));
                        reply.text
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // Meanwhile, poke at the pool from here.
    for k in 0..30 {
        let id = &ids[k % ids.len()];
        match k % 3 {
            0 => drop(pool.evict(id).expect("evict")),
            1 => drop(pool.stats()),
            _ => drop(pool.transcript(id).expect("transcript")),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let replies: Vec<Vec<String>> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let turns = pool.transcript(id).expect("transcript");
        assert_eq!(turns.len(), 6);
        let mut history = Vec::new();
        for (k, t) in turns.iter().enumerate() {
            assert_eq!(t.user(), format!("{id} says {k}"));
            assert_eq!(
                t.reply,
                fake.expected_reply(SYSTEMS[i % 2], &history, t.user(), 10)
            );
            assert_eq!(t.reply, replies[i][k]);
            history.push((t.user().to_owned(), t.reply.clone()));
        }
    }
    let stats = pool.stats();
    assert!(stats.hot.len() <= 2 && stats.kv_bytes <= 200_000);
    assert_eq!(pool.audit(), (stats.hot.len(), stats.kv_bytes));
}

#[test]
fn calls_on_one_agent_are_serialized() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeBackend::default().with_token_delay(Duration::from_micros(200));
    let pool = Arc::new(fake_pool(dir.path(), fake.clone(), PoolConfig::default()));
    pool.create_agent("shared", "t", SYSTEMS[0])
        .expect("create");
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                for k in 0..4 {
                    pool.generate(
                        "shared",
                        &format!("thread {t} turn {k}"),
                        &options(6),
                        &mut |_| {},
                    )
                    .expect("generate");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    // 16 turns in some order, numbered 0..16, each answered in the context of those before.
    let turns = pool.transcript("shared").expect("transcript");
    assert_eq!(turns.len(), 16);
    let mut history = Vec::new();
    for (i, t) in turns.iter().enumerate() {
        assert_eq!(t.index, i as u64);
        assert_eq!(
            t.reply,
            fake.expected_reply(SYSTEMS[0], &history, t.user(), 6)
        );
        history.push((t.user().to_owned(), t.reply.clone()));
    }
}

#[test]
fn pool_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<AgentPool<FakeBackend>>();
    check::<AgentPool<engine::Engine>>();
    check::<AgentPool<dyn Backend>>();
}
