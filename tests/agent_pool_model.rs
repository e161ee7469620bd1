//! agent-pool with the real SmolLM2-135M-Instruct: three agents, a pool dropped and reopened
//! between turns, against an uninterrupted pool; and an agent started from another agent's
//! system-prompt segment, against a computation from scratch.
//!
//! These tests need the model (`cargo xtask fetch-model`); see
//! `engine::testing::real_model_path` for what happens without it.

use std::path::Path;
use std::sync::Arc;

use agent_pool::{AgentPool, PoolConfig, Reply};
use engine::testing::{bitwise_equal, max_abs_diff, options, real_engine};
use engine::{Engine, Message};
use kv_store::KvDtype;

const MAX_TOKENS: usize = 12;

const AGENTS: [(&str, &str, &str, &str); 3] = [
    (
        "geo",
        "You are a geography teacher. Answer in one sentence.",
        "What is the capital of France?",
        "And of Italy?",
    ),
    (
        "chef",
        "You are a chef. Be brief.",
        "How do I boil an egg?",
        "How long for a soft one?",
    ),
    (
        "poet",
        "You write short poems.",
        "Write a line about the sea.",
        "Now one about the sky.",
    ),
];

fn config(dtype: KvDtype) -> PoolConfig {
    PoolConfig {
        kv_dtype: dtype,
        ..PoolConfig::default()
    }
}

fn turn(pool: &AgentPool<Engine>, id: &str, text: &str) -> Reply {
    pool.generate(id, text, &options(MAX_TOKENS), &mut |_| {})
        .expect("generate")
}

/// What happens between the first and the second turn of every agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Between {
    /// Nothing: the caches stay in memory.
    Nothing,
    /// Every agent is evicted (its cache saved) and loaded again by its next turn.
    Evict,
    /// The pool is dropped and opened again from the same directory.
    Reopen,
}

/// Second-turn replies of the three agents.
fn second_turns(engine: &Arc<Engine>, root: &Path, dtype: KvDtype, between: Between) -> Vec<Reply> {
    let mut pool = AgentPool::open(root, Arc::clone(engine), config(dtype)).expect("open");
    for (id, system, first, _) in AGENTS {
        pool.create_agent(id, "test", system).expect("create");
        let reply = turn(&pool, id, first);
        assert!(!reply.text.is_empty());
    }
    match between {
        Between::Nothing => {}
        Between::Evict => {
            for (id, ..) in AGENTS {
                assert!(pool.evict(id).expect("evict"));
            }
        }
        Between::Reopen => {
            drop(pool);
            pool = AgentPool::open(root, Arc::clone(engine), config(dtype)).expect("reopen");
        }
    }
    let replies: Vec<Reply> = AGENTS
        .iter()
        .map(|(id, _, _, second)| turn(&pool, id, second))
        .collect();
    for r in &replies {
        assert_eq!(r.resumed_from_disk, between != Between::Nothing);
        assert!(r.rebuilt.is_none());
        assert!(
            r.reused_tokens > 20,
            "the first turn was reused: {}",
            r.reused_tokens
        );
    }
    let stats = pool.stats();
    assert_eq!(stats.hot.len(), 3);
    assert_eq!(pool.audit(), (3, stats.kv_bytes));
    assert_eq!(stats.weight_bytes, engine.model().weight_bytes());
    assert!(
        stats
            .rss_bytes
            .is_some_and(|rss| rss as usize > stats.weight_bytes)
    );
    replies
}

fn assert_same(dtype: KvDtype, what: &str, a: &[Reply], b: &[Reply]) {
    for ((id, ..), (a, b)) in AGENTS.iter().zip(a.iter().zip(b)) {
        eprintln!("{dtype} {id}: {:?}", b.text);
        assert_eq!(
            a.tokens, b.tokens,
            "{dtype} {id}: greedy replies differ ({what})"
        );
        assert_eq!(a.reused_tokens, b.reused_tokens);
        assert!(
            bitwise_equal(&a.first_logits, &b.first_logits),
            "{dtype} {id}: logits differ ({what}), by up to {:e}",
            max_abs_diff(&a.first_logits, &b.first_logits)
        );
    }
}

/// In every KV dtype a pool dropped and reopened (or evicting every agent) between turns gives,
/// bit for bit, the replies of a pool that stayed open: memory holds the values in the dtype
/// the files do.
#[test]
fn reopened_pool_continues_exactly_like_an_uninterrupted_one() {
    let Some(engine) = real_engine() else { return };
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
        let (a, b) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let uninterrupted = second_turns(&engine, a.path(), dtype, Between::Nothing);
        let reopened = second_turns(&engine, b.path(), dtype, Between::Reopen);
        assert_same(
            dtype,
            "reopened vs open throughout",
            &uninterrupted,
            &reopened,
        );
        if dtype == KvDtype::F16 {
            // The default dtype: evicted to disk and loaded back within one pool, too.
            let c = tempfile::tempdir().expect("tempdir");
            let evicted = second_turns(&engine, c.path(), dtype, Between::Evict);
            assert_same(
                dtype,
                "evicted vs open throughout",
                &uninterrupted,
                &evicted,
            );
        }
    }
}

#[test]
fn adopted_system_prefix_is_bitwise_equal_to_computing_from_scratch() {
    let Some(engine) = real_engine() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let pool =
        AgentPool::open(dir.path(), Arc::clone(&engine), config(KvDtype::F32)).expect("open");
    let (_, system, question, _) = AGENTS[0];
    assert!(
        !pool
            .create_agent("owner", "test", system)
            .expect("create")
            .adopted
    );
    let created = pool
        .create_agent("adopter", "test", system)
        .expect("create");
    assert!(
        created.adopted,
        "the second agent starts from the first one's segment"
    );
    let reply = turn(&pool, "adopter", question);
    assert_eq!(reply.reused_tokens, created.system_tokens);

    // The same prompt in one batch on an empty cache, outside any pool.
    let prompt = engine
        .chat_tokens(&[Message::system(system), Message::user(question)], true)
        .expect("tokens");
    let mut cache = engine.new_cache(KvDtype::F32).expect("cache");
    let scratch = engine
        .generate(&mut cache, &prompt, &options(MAX_TOKENS), &mut |_| {})
        .expect("generate");
    assert_eq!(scratch.reused_tokens, 0);
    eprintln!("adopted prefix: {:?}", reply.text);
    assert_eq!(reply.tokens, scratch.tokens);
    assert!(
        bitwise_equal(&reply.first_logits, &scratch.first_logits),
        "largest difference {:e}",
        max_abs_diff(&reply.first_logits, &scratch.first_logits)
    );
}
