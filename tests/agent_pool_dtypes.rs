//! How many agents a pool keeps hot under one byte budget in each KV dtype: agents of
//! SmolLM2-135M's cache shape (30 layers, 3 KV heads of width 64) with 2,048-token
//! conversations, on the deterministic fake engine (the byte accounting is the pool's, not
//! the model's). `agentkv serve --max-kv-bytes` is this budget.

use std::sync::Arc;

use agent_pool::testing::FakeBackend;
use agent_pool::{AgentPool, PoolConfig};
use engine::testing::options;
use kv_extract::KvShape;
use kv_store::KvDtype;

/// SmolLM2-135M's cache shape.
const SMOLLM2: KvShape = KvShape {
    n_layers: 30,
    n_kv_heads: 3,
    head_dim: 64,
    window: None,
};
/// Agents created; more than the most any dtype keeps hot.
const AGENTS: usize = 10;
/// Tokens of each agent's conversation: the fake engine makes a token of every byte.
const HISTORY: usize = 2048;

/// Agents hot once `agents` agents have each had one 2,048-token turn under `budget` bytes,
/// and the bytes each hot cache holds.
fn hot_under(dtype: KvDtype, budget: usize, agents: usize) -> (usize, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(FakeBackend::default().with_shape(SMOLLM2));
    let config = PoolConfig {
        max_hot: agents,
        kv_budget_bytes: budget,
        kv_dtype: dtype,
        save_every_turn: false,
        shared: None,
    };
    let pool = AgentPool::open(dir.path(), backend, config).expect("open");
    for i in 0..agents {
        let id = format!("agent-{i}");
        pool.create_agent(&id, "test", "You are one of many.")
            .expect("create");
        // The rendered turn (system, user, markers) plus the reply come to about HISTORY.
        let user = "x".repeat(HISTORY - 64);
        pool.generate(&id, &user, &options(8), &mut |_| {})
            .expect("turn");
    }
    let stats = pool.stats();
    let per_agent = stats.kv_bytes / stats.hot.len().max(1);
    for hot in &stats.hot {
        assert!(hot.tokens >= HISTORY - 32, "{} tokens", hot.tokens);
    }
    (stats.hot.len(), per_agent)
}

#[test]
fn f16_keeps_twice_and_q8_0_three_and_a_half_times_as_many_agents_hot_as_f32() {
    // A budget that holds two and a half f32 agents of 2,048 tokens, as one measures.
    let (_, one_f32) = hot_under(KvDtype::F32, usize::MAX, 1);
    let budget = one_f32 * 5 / 2;
    let (f32_hot, f32_bytes) = hot_under(KvDtype::F32, budget, AGENTS);
    let (f16_hot, f16_bytes) = hot_under(KvDtype::F16, budget, AGENTS);
    let (q8_hot, q8_bytes) = hot_under(KvDtype::Q8_0, budget, AGENTS);
    eprintln!(
        "budget {budget} B: f32 {f32_hot} hot ({f32_bytes} B each), f16 {f16_hot} \
         ({f16_bytes} B each), q8_0 {q8_hot} ({q8_bytes} B each)"
    );
    assert!(f32_hot >= 2, "f32 keeps {f32_hot}");
    assert!(f16_hot >= 2 * f32_hot, "f16 keeps {f16_hot}, f32 {f32_hot}");
    assert!(
        q8_hot * 2 >= 7 * f32_hot,
        "q8_0 keeps {q8_hot}, f32 {f32_hot}"
    );
    // The bytes behind it: f16 half of f32's, q8_0 34/128 of them, plus the token ids and
    // alignment slack every dtype holds alike (a tenth of a percent of an f32 cache here).
    let share = |bytes: usize| bytes as f64 / f32_bytes as f64;
    assert!(share(f16_bytes) <= 0.5 + 1e-3, "f16: {}", share(f16_bytes));
    assert!(
        share(q8_bytes) <= 34.0 / 128.0 + 1e-3,
        "q8_0: {}",
        share(q8_bytes)
    );
}
