//! Agents shared by two hosts through a real Garage cluster (three `garage` processes on
//! loopback, replication factor 3): two pools with their own directories, each talking to a
//! different node, on the deterministic fake engine (whose oracle panics if a cache holds K/V
//! that do not belong to its tokens, and whose replies are a function of the whole prompt, so
//! a wrong history shows as a wrong reply).
//!
//! An agent advanced on host A resumes on host B with its history computed nowhere but on A;
//! both hosts advancing it at once give one winner and a typed conflict, never a mixed
//! history; a system prompt used on both hosts is stored once; deletion is seen everywhere;
//! a store that cannot be reached or holds a damaged change refuses the change and loses
//! nothing acknowledged; a host killed while uploading a turn leaves the agent as it was.
//! With the real model, the second host continues bit for bit.
// Test code: a failed unwrap is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use agent_pool::testing::FakeBackend;
use agent_pool::{AgentPool, PoolConfig, PoolError, Reply, SharedStore};
use engine::Engine;
use engine::testing::{bitwise_equal, max_abs_diff, options, real_engine};
use kv_remote::testing::{Garage, garage_binary};
use kv_store::{KvDtype, SegmentId};

const SYSTEM: &str = "You review pull requests. Be precise and brief.";
const MAX_TOKENS: usize = 12;

/// A temporary directory and a 3-node cluster with its data in it (`None` after
/// `garage_binary`'s warning; under `AGENTKV_REQUIRE_MODEL` a missing Garage panics). Bind them
/// in this order, so that the cluster stops before its directory is removed.
fn setup() -> Option<(tempfile::TempDir, Garage)> {
    let binary = garage_binary()?;
    let dir = tempfile::tempdir().unwrap();
    let garage = Garage::start(&binary, &dir.path().join("garage"), 3);
    Some((dir, garage))
}

fn shared(garage: &Garage, node: usize, host: &str) -> SharedStore {
    SharedStore {
        remote: Arc::new(garage.remote(node, "fleet")),
        host: host.to_owned(),
    }
}

/// A pool in `dir` sharing the cluster's store through `node` as `host`.
fn host(
    dir: &Path,
    garage: &Garage,
    node: usize,
    name: &str,
    backend: FakeBackend,
) -> AgentPool<FakeBackend> {
    let config = PoolConfig {
        save_every_turn: false,
        shared: Some(shared(garage, node, name)),
        ..PoolConfig::default()
    };
    AgentPool::open(&dir.join(name), Arc::new(backend), config).unwrap()
}

/// A pool that shares nothing: what an uninterrupted conversation on one host gives.
fn alone(dir: &Path) -> AgentPool<FakeBackend> {
    AgentPool::open(
        &dir.join("alone"),
        Arc::new(FakeBackend::default()),
        PoolConfig::default(),
    )
    .unwrap()
}

fn turn<B: agent_pool::Backend>(pool: &AgentPool<B>, id: &str, text: &str) -> Reply {
    pool.generate(id, text, &options(MAX_TOKENS), &mut |_| {})
        .unwrap()
}

/// The tokens a turn computed rather than reused.
fn computed(reply: &Reply) -> usize {
    reply.prompt_tokens - reply.reused_tokens
}

/// The turns' (user, reply) texts.
fn history<B: agent_pool::Backend>(pool: &AgentPool<B>, id: &str) -> Vec<(String, String)> {
    pool.transcript(id)
        .unwrap()
        .iter()
        .map(|t| (t.user().to_owned(), t.reply.clone()))
        .collect()
}

#[test]
fn an_agent_advanced_on_one_host_resumes_on_another_without_recomputing_its_history() {
    let Some((dir, garage)) = setup() else {
        return;
    };
    let a = host(dir.path(), &garage, 0, "host-a", FakeBackend::default());
    let b = host(dir.path(), &garage, 2, "host-b", FakeBackend::default());
    let one = alone(dir.path());
    a.create_agent("reviewer", "review", SYSTEM).unwrap();
    one.create_agent("reviewer", "review", SYSTEM).unwrap();
    let questions = [
        "Is this diff safe?",
        "What about the lock order?",
        "And the test?",
    ];
    for q in questions {
        let on_a = turn(&a, "reviewer", q);
        let on_one = turn(&one, "reviewer", q);
        assert_eq!(on_a.text, on_one.text);
    }

    // Host B has never seen the agent: it comes from the store, history and cache.
    let info = b.info("reviewer").unwrap();
    assert_eq!(info.system_prompt, SYSTEM);
    assert_eq!(history(&b, "reviewer"), history(&a, "reviewer"));
    let on_b = turn(&b, "reviewer", "Ship it?");
    let on_one = turn(&one, "reviewer", "Ship it?");
    assert_eq!(on_b.text, on_one.text, "host B answered another history");
    assert!(on_b.rebuilt.is_none(), "{:?}", on_b.rebuilt);
    assert!(on_b.resumed_from_disk);
    // Exactly what a host that kept the agent in memory computes: the new message alone.
    assert_eq!(computed(&on_b), computed(&on_one));
    assert!(on_b.reused_tokens > 0);
    let stats = b.stats().counters;
    assert_eq!(stats.rebuilds, 0);
    assert!(stats.shared_adoptions >= 1, "{stats:?}");

    // Host A, whose agent is still hot, takes B's turn and B's cache, and goes on.
    let on_a = turn(&a, "reviewer", "Merged. Anything else?");
    let on_one = turn(&one, "reviewer", "Merged. Anything else?");
    assert_eq!(on_a.text, on_one.text);
    assert_eq!(computed(&on_a), computed(&on_one));
    assert_eq!(a.stats().counters.rebuilds, 0);
    assert_eq!(history(&a, "reviewer"), history(&one, "reviewer"));
    assert_eq!(history(&b, "reviewer"), history(&one, "reviewer"));

    // A host that restarts keeps its local copy and catches up from the store.
    drop(b);
    let b = host(dir.path(), &garage, 1, "host-b", FakeBackend::default());
    assert_eq!(history(&b, "reviewer"), history(&one, "reviewer"));
}

#[test]
fn two_hosts_advancing_one_agent_at_once_give_one_winner_and_a_typed_conflict() {
    let Some((dir, garage)) = setup() else {
        return;
    };
    // Slow tokens, so that both hosts have read the agent's head before either commits.
    let slow = || FakeBackend::default().with_token_delay(Duration::from_millis(15));
    let a = host(dir.path(), &garage, 0, "host-a", slow());
    let b = host(dir.path(), &garage, 1, "host-b", slow());
    let one = alone(dir.path());
    a.create_agent("pair", "t", SYSTEM).unwrap();
    one.create_agent("pair", "t", SYSTEM).unwrap();
    turn(&a, "pair", "warm up");
    turn(&one, "pair", "warm up");
    assert_eq!(history(&b, "pair"), history(&one, "pair"));

    for round in 0..4 {
        let barrier = Barrier::new(2);
        let ask_a = format!("round {round} from a");
        let ask_b = format!("round {round} from b");
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                barrier.wait();
                a.generate("pair", &ask_a, &options(MAX_TOKENS), &mut |_| {})
            });
            let tb = s.spawn(|| {
                barrier.wait();
                b.generate("pair", &ask_b, &options(MAX_TOKENS), &mut |_| {})
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let (winner, loser) = match (&ra, &rb) {
            (Ok(_), Err(e)) => (&ask_a, e),
            (Err(e), Ok(_)) => (&ask_b, e),
            other => panic!("round {round}: exactly one host must win: {other:?}"),
        };
        assert!(
            matches!(loser, PoolError::Conflict { id, .. } if id == "pair"),
            "round {round}: {loser}"
        );
        // Both hosts hold the winner's turn and nothing of the loser's.
        let expected = turn(&one, "pair", winner);
        let ha = history(&a, "pair");
        assert_eq!(ha, history(&b, "pair"), "round {round}");
        assert_eq!(ha, history(&one, "pair"), "round {round}");
        assert_eq!(ha.last().unwrap().1, expected.text);
    }
    // The loser of the last round goes on from the winner's turn, without a rebuild.
    let next_a = turn(&a, "pair", "after the race");
    let next_one = turn(&one, "pair", "after the race");
    assert_eq!(next_a.text, next_one.text);
    assert_eq!(history(&b, "pair"), history(&one, "pair"));
    assert_eq!(a.stats().counters.rebuilds + b.stats().counters.rebuilds, 0);
}

#[test]
fn a_system_prompt_used_on_both_hosts_is_computed_and_stored_once() {
    let Some((dir, garage)) = setup() else {
        return;
    };
    let a = host(dir.path(), &garage, 0, "host-a", FakeBackend::default());
    let b = host(dir.path(), &garage, 2, "host-b", FakeBackend::default());
    let made = a.create_agent("first", "t", SYSTEM).unwrap();
    assert!(!made.adopted);
    let segments_after_one = garage.remote(1, "fleet").list_segments().unwrap();
    assert_eq!(segments_after_one.len(), 1);
    let adopted = b.create_agent("second", "t", SYSTEM).unwrap();
    assert!(adopted.adopted, "host B computed the system prompt again");
    assert_eq!(
        garage.remote(1, "fleet").list_segments().unwrap(),
        segments_after_one
    );
    // Both agents answer as agents of that prompt.
    let on_b = turn(&b, "second", "hello");
    let expected = FakeBackend::default().expected_reply(SYSTEM, &[], "hello", MAX_TOKENS);
    assert_eq!(on_b.text, expected);
    // An id taken on one host is taken on the other.
    assert!(matches!(
        b.create_agent("first", "t", "another prompt"),
        Err(PoolError::AlreadyExists { .. })
    ));
}

#[test]
fn deleting_on_one_host_deletes_everywhere_and_the_id_can_be_used_again() {
    let Some((dir, garage)) = setup() else {
        return;
    };
    let a = host(dir.path(), &garage, 0, "host-a", FakeBackend::default());
    let b = host(dir.path(), &garage, 1, "host-b", FakeBackend::default());
    a.create_agent("temp", "t", SYSTEM).unwrap();
    let first = turn(&a, "temp", "one");
    let second = turn(&b, "temp", "two");
    // A deleted turn is deleted on both hosts.
    b.delete_turn("temp", 0).unwrap();
    assert!(matches!(
        a.turn("temp", 0),
        Err(PoolError::UnknownTurn { .. })
    ));
    assert_eq!(a.turn("temp", 1).unwrap().reply, second.text);
    assert_ne!(first.text, "");

    a.delete("temp").unwrap();
    assert!(matches!(
        b.info("temp"),
        Err(PoolError::UnknownAgent { .. })
    ));
    assert!(!dir.path().join("host-b/agents/temp").exists());
    // Created again on B, under another prompt: A sees the new agent, not the old one.
    b.create_agent("temp", "t", "A new prompt.").unwrap();
    assert_eq!(a.info("temp").unwrap().system_prompt, "A new prompt.");
    assert!(a.transcript("temp").unwrap().is_empty());
    let on_a = turn(&a, "temp", "hi");
    let expected = FakeBackend::default().expected_reply("A new prompt.", &[], "hi", MAX_TOKENS);
    assert_eq!(on_a.text, expected);
}

#[test]
fn an_unreachable_store_refuses_changes_and_loses_nothing_acknowledged() {
    let Some((dir, mut garage)) = setup() else {
        return;
    };
    let a = host(dir.path(), &garage, 0, "host-a", FakeBackend::default());
    a.create_agent("steady", "t", SYSTEM).unwrap();
    let kept = turn(&a, "steady", "before the outage");
    for i in 0..3 {
        garage.stop_node(i);
    }
    let r = a.generate(
        "steady",
        "during the outage",
        &options(MAX_TOKENS),
        &mut |_| {},
    );
    assert!(matches!(r, Err(PoolError::Shared { .. })), "{r:?}");
    // Reads fall back to the local copy, which holds every acknowledged turn and nothing else.
    let local = history(&a, "steady");
    assert_eq!(
        local,
        vec![("before the outage".to_owned(), kept.text.clone())]
    );
    assert!(a.stats().counters.shared_unreachable > 0);
    // A new agent cannot be created without the store either, and leaves nothing behind.
    assert!(matches!(
        a.create_agent("later", "t", SYSTEM),
        Err(PoolError::Shared { .. })
    ));
    assert!(!dir.path().join("host-a/agents/later").exists());
    for i in 0..3 {
        garage.start_node(i);
    }
    let after = turn(&a, "steady", "after the outage");
    let expected = FakeBackend::default().expected_reply(
        SYSTEM,
        &[("before the outage".to_owned(), kept.text)],
        "after the outage",
        MAX_TOKENS,
    );
    assert_eq!(after.text, expected);
    let b = host(dir.path(), &garage, 2, "host-b", FakeBackend::default());
    assert_eq!(history(&b, "steady"), history(&a, "steady"));
}

#[test]
fn a_damaged_change_on_the_store_is_an_error_and_the_local_copy_stays() {
    let Some((dir, garage)) = setup() else {
        return;
    };
    let a = host(dir.path(), &garage, 0, "host-a", FakeBackend::default());
    let b = host(dir.path(), &garage, 1, "host-b", FakeBackend::default());
    a.create_agent("fragile", "t", SYSTEM).unwrap();
    turn(&a, "fragile", "one");
    let before = history(&b, "fragile");
    // Generation 3 (creation, one turn, then this) is garbage, decided as far as readers
    // can tell.
    let raw = garage.remote(2, "fleet");
    raw.put_raw(
        &format!("heads/fragile/{:020}/decided", 3),
        b"{\"format\":\"agentkv.change\",\"version\":1,\"host\":\"x\",\"nonce\":\"0\",\"change\":{\"line\":\"{not a line\"}}".to_vec(),
    )
    .unwrap();
    for pool in [&a, &b] {
        let r = pool.transcript("fragile");
        assert!(
            matches!(&r, Err(PoolError::SharedRecord { generation: 3, .. })),
            "{r:?}"
        );
    }
    let path = dir.path().join("host-b/agents/fragile/transcript.jsonl");
    let lines = std::fs::read_to_string(&path).unwrap().lines().count();
    assert_eq!(lines, before.len(), "the local copy changed");
    // A turn on top of the damage is refused too: it cannot be placed after it.
    assert!(
        a.generate("fragile", "two", &options(MAX_TOKENS), &mut |_| {})
            .is_err()
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("host-a/agents/fragile/transcript.jsonl"))
            .unwrap()
            .lines()
            .count(),
        1
    );
}

/// Three turns of one agent with the real model: the first two on host A, the third on host B
/// (or, for `hosts` = 1, all on one pool that keeps the agent in memory).
fn third_turn(
    engine: &Arc<Engine>,
    dir: &Path,
    garage: &Garage,
    dtype: KvDtype,
    hosts: usize,
) -> Reply {
    let config = |name: &str, node: usize| PoolConfig {
        kv_dtype: dtype,
        shared: (hosts == 2).then(|| shared(garage, node, name)),
        ..PoolConfig::default()
    };
    let a = AgentPool::open(&dir.join("a"), Arc::clone(engine), config("host-a", 0)).unwrap();
    let id = format!(
        "geo-{}-{dtype}",
        engine.cache_meta(dtype).model.architecture
    );
    a.create_agent(
        &id,
        "t",
        "You are a geography teacher. Answer in one sentence.",
    )
    .unwrap();
    turn(&a, &id, "What is the capital of France?");
    turn(&a, &id, "And of Italy?");
    if hosts == 1 {
        return turn(&a, &id, "Which of the two is further north?");
    }
    let b = AgentPool::open(&dir.join("b"), Arc::clone(engine), config("host-b", 2)).unwrap();
    let reply = turn(&b, &id, "Which of the two is further north?");
    assert!(reply.rebuilt.is_none(), "{:?}", reply.rebuilt);
    assert_eq!(b.stats().counters.shared_adoptions, 1);
    reply
}

/// With the real model (SmolLM2, in f32 and f16 KV), a turn answered on a second host from the first
/// host's shared cache is, bit for bit, the turn a host that kept the agent in memory gives.
#[test]
fn with_the_real_model_the_second_host_continues_bit_for_bit() {
    let Some((dir, garage)) = setup() else {
        return;
    };
    let Some(engine) = real_engine() else { return };
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let run = |hosts: usize| {
            let dir = dir.path().join(format!("{dtype}-{hosts}"));
            third_turn(&engine, &dir, &garage, dtype, hosts)
        };
        let (one, two) = (run(1), run(2));
        assert_eq!(one.tokens, two.tokens, "{dtype}: greedy replies differ");
        assert_eq!(one.reused_tokens, two.reused_tokens, "{dtype}");
        assert!(two.reused_tokens > 40, "{dtype}: {}", two.reused_tokens);
        assert!(
            bitwise_equal(&one.first_logits, &two.first_logits),
            "{dtype}: logits differ by up to {:e}",
            max_abs_diff(&one.first_logits, &two.first_logits)
        );
    }
}

#[test]
fn verify_and_gc_cover_the_shared_store_and_gc_keeps_what_any_host_still_names() {
    let Some((dir, garage)) = setup() else {
        return;
    };
    let a = host(dir.path(), &garage, 0, "host-a", FakeBackend::default());
    let b = host(dir.path(), &garage, 1, "host-b", FakeBackend::default());
    a.create_agent("keep", "t", SYSTEM).unwrap();
    turn(&a, "keep", "one");
    turn(&a, "keep", "two");
    a.create_agent("gone", "t", "A prompt of its own.").unwrap();
    turn(&a, "gone", "one");
    b.create_agent("other", "t", SYSTEM).unwrap();
    turn(&b, "other", "hello");
    a.delete("gone").unwrap();

    let checks = a.verify_shared().unwrap();
    let ids: Vec<&str> = checks.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["gone", "keep", "other"]);
    assert!(checks[0].deleted && checks[0].problem.is_none());
    for c in &checks[1..] {
        assert!(c.problem.is_none(), "{c:?}");
        assert!(c.segments > 0 && c.bytes > 0, "{c:?}");
    }
    assert_eq!(checks[1].turns, 2);

    let store = garage.remote(2, "fleet");
    let before = store.list_segments().unwrap();
    // Everything is younger than an hour: nothing goes.
    let young = a.gc_shared(Duration::from_secs(3600)).unwrap();
    assert_eq!((young.removed, young.recent > 0), (0, true), "{young:?}");
    let report = b.gc_shared(Duration::ZERO).unwrap();
    assert!(report.removed > 0 && report.bytes_freed > 0, "{report:?}");
    // (Looked up one by one: a listing right after the deletes may still show some.)
    let gone = before
        .iter()
        .filter(|id| !store.has_segment(id).unwrap())
        .count();
    assert_eq!(gone as u64, report.removed);
    // What the live agents name is still there: a third host resumes both from the store.
    let c = host(dir.path(), &garage, 2, "host-c", FakeBackend::default());
    for id in ["keep", "other"] {
        let reply = turn(&c, id, "still there?");
        assert!(reply.rebuilt.is_none(), "{id}: {:?}", reply.rebuilt);
    }
    assert_eq!(c.stats().counters.shared_adoptions, 2);
    assert!(
        c.verify_shared()
            .unwrap()
            .iter()
            .all(|c| c.problem.is_none())
    );

    // A segment altered on the store is reported, with the agent it belongs to.
    let victim = c.store().manifest("keep").unwrap().unwrap().segments[0]
        .id
        .clone();
    store
        .put_raw(
            &format!("segments/{victim}.safetensors"),
            b"not a segment".to_vec(),
        )
        .unwrap();
    let checks = c.verify_shared().unwrap();
    let keep = checks.iter().find(|c| c.id == "keep").unwrap();
    assert!(
        keep.problem
            .as_deref()
            .is_some_and(|p| p.contains("damaged")),
        "{keep:?}"
    );
}

const UPLOAD_CHILD_ENV: &str = "AGENT_POOL_SHARED_UPLOAD_CHILD";

/// SmolLM2's cache shape: a 4,000-token turn makes a segment of about 90 MB (f16), whose upload
/// takes long enough to be killed in the middle of.
fn big_backend() -> FakeBackend {
    FakeBackend::new("upload").with_shape(kv_extract::KvShape {
        n_layers: 30,
        n_kv_heads: 3,
        head_dim: 64,
        window: None,
    })
}

fn long_message() -> String {
    (0..4000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect()
}

/// Child mode: host A answers one long turn of agent "victim" (the parent kills it while the
/// turn's segment is being uploaded). Does nothing when the test runs normally.
#[test]
fn upload_child() {
    let Some(spec) = std::env::var(UPLOAD_CHILD_ENV).ok() else {
        return;
    };
    // dir \t endpoint \t key id \t secret
    let parts: Vec<&str> = spec.split('\t').collect();
    let settings = [
        ("aws_endpoint", parts[1]),
        ("aws_access_key_id", parts[2]),
        ("aws_secret_access_key", parts[3]),
        ("aws_region", "garage"),
    ];
    let remote = kv_remote::Remote::open("s3://agentkv/fleet", &settings).unwrap();
    let config = PoolConfig {
        shared: Some(SharedStore {
            remote: Arc::new(remote),
            host: "host-a".to_owned(),
        }),
        ..PoolConfig::default()
    };
    let a = AgentPool::open(Path::new(parts[0]), Arc::new(big_backend()), config).unwrap();
    println!("READY");
    a.generate("victim", &long_message(), &options(MAX_TOKENS), &mut |_| {})
        .unwrap();
    println!("DONE");
}

/// The ids of the segment files in `dir`, temporary files of saves in progress left out.
fn segment_ids(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).map_or(BTreeSet::new(), |d| {
        d.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".safetensors")?;
                (!id.starts_with('.')).then(|| id.to_owned())
            })
            .collect()
    })
}

#[test]
fn a_host_killed_while_uploading_a_turn_leaves_the_agent_as_it_was() {
    if std::env::var_os(UPLOAD_CHILD_ENV).is_some() {
        return;
    }
    let Some((dir, garage)) = setup() else {
        return;
    };
    let a_dir = dir.path().join("host-a");
    let before = {
        let a = host(dir.path(), &garage, 0, "host-a", big_backend());
        a.create_agent("victim", "t", SYSTEM).unwrap();
        turn(&a, "victim", "a short first turn");
        history(&a, "victim")
    };
    let segments = a_dir.join("kv/segments");
    let segments_before = segment_ids(&segments);

    let options = garage.options(0);
    let spec = format!(
        "{}\t{}\t{}\t{}",
        a_dir.display(),
        options[0].1,
        options[1].1,
        options[2].1
    );
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["upload_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(UPLOAD_CHILD_ENV, spec)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed as soon as the turn's segment is saved locally: its upload (about 90 MB) has
    // just started.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while segment_ids(&segments).len() <= segments_before.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "the child saved nothing"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited by itself"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    child.kill().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    child.wait().unwrap();
    assert!(
        !out.contains("DONE"),
        "the turn finished before the kill: {out}"
    );

    // The segments the killed turn saved are not on the store, whole or in part. (Found by
    // their files, not by the restarted host's chain: the kill can land before the turn's
    // local manifest names them, and the chain's last segment is then the first turn's.)
    let restarted = host(dir.path(), &garage, 0, "host-a", big_backend());
    let saved: Vec<SegmentId> = segment_ids(&segments)
        .difference(&segments_before)
        .map(|id| SegmentId::parse(id).unwrap())
        .collect();
    assert!(!saved.is_empty());
    let store = garage.remote(1, "fleet");
    for id in &saved {
        assert!(
            !store.has_segment(id).unwrap(),
            "the killed upload of {id} was not mid-way"
        );
    }
    // Another host sees the agent as it was, and the store verifies.
    let b = host(dir.path(), &garage, 2, "host-b", big_backend());
    assert_eq!(history(&b, "victim"), before);
    assert!(
        b.verify_shared()
            .unwrap()
            .iter()
            .all(|c| c.problem.is_none())
    );
    // The restarted host agrees and goes on; the other host continues from its turn.
    assert_eq!(history(&restarted, "victim"), before);
    let next = turn(&restarted, "victim", "after the kill");
    let expected =
        big_backend().expected_reply(SYSTEM, &[before[0].clone()], "after the kill", MAX_TOKENS);
    assert_eq!(next.text, expected);
    let on_b = turn(&b, "victim", "and on b");
    assert!(on_b.rebuilt.is_none());
    assert_eq!(history(&b, "victim"), history(&restarted, "victim"));
}

#[test]
fn calls_racing_to_bring_an_agent_from_the_store_all_find_it() {
    let Some((dir, garage)) = setup() else {
        return;
    };
    let a = host(dir.path(), &garage, 0, "host-a", FakeBackend::default());
    a.create_agent("popular", "t", SYSTEM).unwrap();
    let first = turn(&a, "popular", "one");
    let b = host(dir.path(), &garage, 1, "host-b", FakeBackend::default());
    let barrier = Barrier::new(4);
    let replies: Vec<String> = std::thread::scope(|s| {
        let readers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    b.turn("popular", 0).map(|t| t.reply)
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().unwrap().unwrap())
            .collect()
    });
    assert!(replies.iter().all(|r| *r == first.text), "{replies:?}");
}

#[test]
fn a_long_history_comes_from_the_store_whole_and_in_order() {
    let Some((dir, garage)) = setup() else {
        return;
    };
    let a = host(dir.path(), &garage, 0, "host-a", FakeBackend::default());
    a.create_agent("chatty", "t", SYSTEM).unwrap();
    // More changes than one batch of reads (64), so the walk crosses batches.
    for i in 0..70 {
        turn(&a, "chatty", &format!("message {i}"));
    }
    a.delete_turn("chatty", 3).unwrap();
    let b = host(dir.path(), &garage, 1, "host-b", FakeBackend::default());
    assert_eq!(history(&b, "chatty"), history(&a, "chatty"));
    assert!(matches!(
        b.turn("chatty", 3),
        Err(PoolError::UnknownTurn { .. })
    ));
    let checks = b.verify_shared().unwrap();
    assert_eq!((checks[0].changes, checks[0].turns), (72, 71));
}
