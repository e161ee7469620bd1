//! agent-pool given bad input and damaged files: invalid ids, duplicates, unknown agents,
//! torn and corrupt transcripts, damaged caches, caches of another model, a damaged agent
//! file, a second pool on one directory, files with fields a newer build added. Clear errors
//! or documented recovery; never a panic, never a lost turn.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_pool::testing::FakeBackend;
use agent_pool::{AgentPool, PoolConfig, PoolError, RebuildReason};
use engine::testing::options;

const SYSTEM: &str = "You are terse.";

const MAX_TOKENS: usize = 10;

fn open_with(dir: &Path, fake: FakeBackend) -> AgentPool<FakeBackend> {
    AgentPool::open(dir, Arc::new(fake), PoolConfig::default()).expect("open")
}

fn open(dir: &Path) -> AgentPool<FakeBackend> {
    open_with(dir, FakeBackend::default())
}

fn say(pool: &AgentPool<FakeBackend>, id: &str, text: &str) -> agent_pool::Reply {
    pool.generate(id, text, &options(MAX_TOKENS), &mut |_| {})
        .expect("generate")
}

/// An agent with two turns, saved and closed. Returns its turns.
fn agent_with_two_turns(dir: &Path, id: &str) -> Vec<(String, String)> {
    let pool = open(dir);
    pool.create_agent(id, "t", SYSTEM).expect("create");
    let turns: Vec<(String, String)> = ["first", "second"]
        .iter()
        .map(|u| (u.to_string(), say(&pool, id, u).text))
        .collect();
    turns
}

fn transcript_path(dir: &Path, id: &str) -> PathBuf {
    dir.join("agents").join(id).join("transcript.jsonl")
}

fn pairs(pool: &AgentPool<FakeBackend>, id: &str) -> Vec<(String, String)> {
    pool.transcript(id)
        .expect("transcript")
        .into_iter()
        .map(|t| (t.user().to_owned(), t.reply))
        .collect()
}

#[test]
fn invalid_ids_are_rejected_everywhere_and_touch_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = open(dir.path());
    let long = "x".repeat(65);
    for bad in [
        "",
        "..",
        ".",
        "a/b",
        "../escape",
        "/abs",
        "Upper",
        "a.b",
        "sp ace",
        "ünï",
        long.as_str(),
    ] {
        let check = |r: Result<(), PoolError>| match r {
            Err(PoolError::InvalidId { id, .. }) => assert_eq!(id, bad),
            other => panic!("{bad:?}: {other:?}"),
        };
        check(pool.create_agent(bad, "t", SYSTEM).map(drop));
        check(
            pool.generate(bad, "hi", &options(MAX_TOKENS), &mut |_| {})
                .map(drop),
        );
        check(pool.load_agent(bad).map(drop));
        check(pool.save_agent(bad).map(drop));
        check(pool.evict(bad).map(drop));
        check(pool.delete(bad));
        check(pool.transcript(bad).map(drop));
        let message = pool.create_agent(bad, "t", SYSTEM).unwrap_err().to_string();
        assert!(message.contains("[a-z0-9_-]"), "{message}");
    }
    assert_eq!(
        fs::read_dir(dir.path().join("agents"))
            .expect("agents dir")
            .count(),
        0
    );
    assert!(pool.store().list().expect("caches").is_empty());
    assert!(
        pool.create_agent(&"x".repeat(64), "t", SYSTEM).is_ok(),
        "64 characters is the limit"
    );
}

#[test]
fn duplicate_create_and_unknown_agents_are_errors_naming_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let pool = open(dir.path());
        pool.create_agent("alice", "t", SYSTEM).expect("create");
        say(&pool, "alice", "hello");
        match pool.create_agent("alice", "other", "another prompt") {
            Err(PoolError::AlreadyExists { id, .. }) => assert_eq!(id, "alice"),
            other => panic!("{other:?}"),
        }
    }
    let pool = open(dir.path());
    assert!(matches!(
        pool.create_agent("alice", "t", SYSTEM),
        Err(PoolError::AlreadyExists { .. })
    ));
    // The duplicate attempt changed nothing.
    assert_eq!(pool.info("alice").expect("info").agent_type, "t");
    assert_eq!(pool.transcript("alice").expect("transcript").len(), 1);

    let err = pool
        .generate("bob", "hi", &options(MAX_TOKENS), &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(&err, PoolError::UnknownAgent { id, .. } if id == "bob"),
        "{err}"
    );
    assert!(err.to_string().contains("\"bob\""), "{err}");
    for r in [
        pool.load_agent("bob").map(drop),
        pool.evict("bob").map(drop),
        pool.delete("bob"),
        pool.transcript("bob").map(drop),
    ] {
        assert!(matches!(r, Err(PoolError::UnknownAgent { .. })), "{r:?}");
    }
    pool.delete("alice").expect("delete");
    assert!(matches!(
        pool.generate("alice", "hi", &options(MAX_TOKENS), &mut |_| {}),
        Err(PoolError::UnknownAgent { .. })
    ));
    assert!(!dir.path().join("agents/alice").exists());
    assert!(pool.store().manifest("alice").expect("read").is_none());
    // The id is free again.
    pool.create_agent("alice", "t2", SYSTEM)
        .expect("create again");
    assert!(pool.transcript("alice").expect("transcript").is_empty());
}

#[test]
fn torn_transcript_tail_is_cut_reported_and_nothing_returned_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let turns = agent_with_two_turns(dir.path(), "a");
    let path = transcript_path(dir.path(), "a");
    let mut bytes = fs::read(&path).expect("read");
    let good = bytes.len();
    bytes.extend_from_slice(
        br#"{"v":1,"xxh3":"0123456789abcdef","turn":{"index":2,"unix_ms":5,"user":"lost"#,
    );
    fs::write(&path, &bytes).expect("write");

    let fake = FakeBackend::default();
    let pool = open(dir.path());
    let reply = say(&pool, "a", "third");
    let repair = reply.transcript_repair.expect("the repair is reported");
    assert_eq!(repair.dropped_bytes as usize, bytes.len() - good);
    assert_eq!(repair.kept_turns, 2);
    assert_eq!(pool.stats().counters.transcript_repairs, 1);
    assert_eq!(
        reply.text,
        fake.expected_reply(SYSTEM, &turns, "third", MAX_TOKENS)
    );
    let mut want = turns;
    want.push(("third".into(), reply.text));
    assert_eq!(pairs(&pool, "a"), want);
    drop(pool);
    assert_eq!(pairs(&open(dir.path()), "a"), want);
}

#[test]
fn corrupt_transcript_line_is_an_error_naming_file_and_line_and_nothing_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    agent_with_two_turns(dir.path(), "a");
    {
        let pool = open(dir.path());
        pool.create_agent("b", "t", SYSTEM).expect("create b");
    }
    let path = transcript_path(dir.path(), "a");
    let mut bytes = fs::read(&path).expect("read");
    let at = bytes
        .iter()
        .position(|&b| b == b'f')
        .expect("an 'f' in line 1 (\"first\")");
    bytes[at] = b'F';
    fs::write(&path, &bytes).expect("write");

    let pool = open(dir.path());
    for err in [
        pool.generate("a", "more", &options(MAX_TOKENS), &mut |_| {})
            .unwrap_err(),
        pool.transcript("a").unwrap_err(),
        pool.load_agent("a").unwrap_err(),
    ] {
        match &err {
            PoolError::CorruptTranscript { path: p, line, .. } => {
                assert_eq!((p, *line), (&path, 1))
            }
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("transcript.jsonl") && message.contains("line 1"),
            "{message}"
        );
    }
    assert_eq!(
        fs::read(&path).expect("read"),
        bytes,
        "the file is left as it was"
    );
    // Other agents are unaffected, and the damaged one can still be deleted.
    say(&pool, "b", "hello");
    pool.delete("a").expect("delete the damaged agent");
}

/// Flips one byte near the end of a segment file (inside the last tensor's data).
fn flip_last_byte(path: &Path) {
    let mut bytes = fs::read(path).expect("read segment");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x20;
    fs::write(path, bytes).expect("write segment");
}

#[test]
fn damaged_cache_is_rebuilt_from_the_transcript_and_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let turns = agent_with_two_turns(dir.path(), "a");
    {
        // Also a second agent sharing the system prompt segment.
        let pool = open(dir.path());
        assert!(pool.create_agent("b", "t", SYSTEM).expect("create").adopted);
    }
    let fake = FakeBackend::default();
    let store = kv_store::Store::open(&dir.path().join("kv")).expect("store");
    let chain = store.manifest("a").expect("read").expect("saved").segments;
    assert!(chain.len() >= 2, "system prompt segment, then the turns");
    flip_last_byte(&store.segment_path(&chain[chain.len() - 1].id));

    let pool = open(dir.path());
    let reply = say(&pool, "a", "third");
    let rebuilt = reply.rebuilt.clone().expect("rebuilt");
    assert_eq!(rebuilt.reason, RebuildReason::Damaged);
    assert!(rebuilt.detail.contains("checksum"), "{}", rebuilt.detail);
    assert!(!reply.resumed_from_disk);
    assert_eq!(
        reply.text,
        fake.expected_reply(SYSTEM, &turns, "third", MAX_TOKENS)
    );
    let stats = pool.stats();
    assert_eq!(stats.counters.rebuilds, 1);
    assert_eq!(stats.recent_rebuilds.len(), 1);
    assert_eq!(stats.recent_rebuilds[0].id, "a");
    // b's shared segment was healthy and is still used.
    assert!(say(&pool, "b", "hi").resumed_from_disk);
    drop(pool);

    // The rebuilt cache was saved over the damage: the next open loads it.
    let pool = open(dir.path());
    let reply = say(&pool, "a", "fourth");
    assert!(reply.resumed_from_disk && reply.rebuilt.is_none());
    assert_eq!(pool.transcript("a").expect("transcript").len(), 4);
}

#[test]
fn damaged_shared_system_segment_is_rebuilt_for_every_sharer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let turns = agent_with_two_turns(dir.path(), "a");
    {
        let pool = open(dir.path());
        assert!(pool.create_agent("b", "t", SYSTEM).expect("create").adopted);
    }
    let store = kv_store::Store::open(&dir.path().join("kv")).expect("store");
    let shared = store.manifest("b").expect("read").expect("saved").segments[0]
        .id
        .clone();
    flip_last_byte(&store.segment_path(&shared));

    let fake = FakeBackend::default();
    let pool = open(dir.path());
    let a = say(&pool, "a", "third");
    assert_eq!(a.rebuilt.map(|r| r.reason), Some(RebuildReason::Damaged));
    assert_eq!(
        a.text,
        fake.expected_reply(SYSTEM, &turns, "third", MAX_TOKENS)
    );
    let b = say(&pool, "b", "hello");
    assert!(b.rebuilt.is_some(), "b shared the damaged segment");
    assert_eq!(
        b.text,
        fake.expected_reply(SYSTEM, &[], "hello", MAX_TOKENS)
    );
    drop(pool);
    let pool = open(dir.path());
    for id in ["a", "b"] {
        let report = pool.load_agent(id).expect("load");
        assert!(report.resumed_from_disk, "{id}: {report:?}");
    }
    assert!(pool.store().load("a", pool.cache_meta()).is_ok());
}

#[test]
fn missing_cache_is_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let turns = agent_with_two_turns(dir.path(), "a");
    fs::remove_file(dir.path().join("kv/manifests/a.json")).expect("remove manifest");
    let pool = open(dir.path());
    let reply = say(&pool, "a", "third");
    assert_eq!(
        reply.rebuilt.map(|r| r.reason),
        Some(RebuildReason::Missing)
    );
    assert_eq!(
        reply.text,
        FakeBackend::default().expected_reply(SYSTEM, &turns, "third", MAX_TOKENS)
    );
}

#[test]
fn cache_of_another_model_is_rebuilt_with_the_current_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let turns = agent_with_two_turns(dir.path(), "a");
    let other = FakeBackend::new("another-model");
    let pool = open_with(dir.path(), other.clone());
    let reply = pool
        .generate("a", "third", &options(MAX_TOKENS), &mut |_| {})
        .expect("generate");
    let rebuilt = reply.rebuilt.expect("rebuilt");
    assert_eq!(rebuilt.reason, RebuildReason::OtherModel);
    assert!(
        rebuilt.detail.contains("model weights"),
        "{}",
        rebuilt.detail
    );
    assert_eq!(
        reply.text,
        other.expected_reply(SYSTEM, &turns, "third", MAX_TOKENS),
        "computed by the current model"
    );
    assert_eq!(pool.transcript("a").expect("transcript").len(), 3);
    drop(pool);
    // Saved under the new model: it loads again with it.
    let pool = open_with(dir.path(), other);
    assert!(pool.load_agent("a").expect("load").resumed_from_disk);
}

fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Adds a member `extra` to the object at `key` of the JSON `text` and to the object itself,
/// and rewrites `checksum_key` as the xxh3-64 of that body's new bytes (as a newer build that
/// adds fields writes them).
fn add_fields(text: &str, key: &str, checksum_key: &str) -> String {
    let mut file: serde_json::Value = serde_json::from_str(text).expect("json");
    let mut body = file[key].take();
    body["from_a_newer_build"] = serde_json::json!({"list": [1, 2.5, "x"]});
    let body = serde_json::to_string(&body).expect("encode");
    file[checksum_key] = xxh3_hex(body.as_bytes()).into();
    file["from_a_newer_build"] = true.into();
    file[key] = serde_json::Value::Null;
    // The body's bytes go in as written: re-encoding them could change what the checksum
    // covers.
    let mut out = serde_json::to_string(&file).expect("encode");
    let null = format!(r#""{key}":null"#);
    out = out.replace(&null, &format!(r#""{key}":{body}"#));
    out
}

#[test]
fn files_with_fields_this_build_does_not_know_resume_and_are_kept() {
    // A newer build added fields to every file: agent.json, each transcript line, the
    // manifest, the segments. This build reads them as they are, resumes the cache from disk,
    // and leaves what it does not rewrite byte for byte.
    let dir = tempfile::tempdir().expect("tempdir");
    let turns = agent_with_two_turns(dir.path(), "a");
    let agent_file = dir.path().join("agents/a/agent.json");
    let text = fs::read_to_string(&agent_file).expect("read");
    fs::write(&agent_file, add_fields(&text, "agent", "checksum")).expect("write");
    let transcript = transcript_path(dir.path(), "a");
    let lines: Vec<String> = fs::read_to_string(&transcript)
        .expect("read")
        .lines()
        .map(|l| add_fields(l, "turn", "xxh3") + "\n")
        .collect();
    fs::write(&transcript, lines.concat()).expect("write");
    let manifest = dir.path().join("kv/manifests/a.json");
    let text = fs::read_to_string(&manifest).expect("read");
    fs::write(&manifest, add_fields(&text, "body", "checksum")).expect("write");
    let store = kv_store::Store::open(&dir.path().join("kv")).expect("store");
    let chain = store.manifest("a").expect("read").expect("saved").segments;
    for s in &chain {
        kv_store::testing::edit_segment_header(&store.segment_path(&s.id), |h| {
            h["from_a_newer_build"] = "yes".into();
        });
    }
    let before: Vec<Vec<u8>> = [agent_file.clone(), transcript.clone()]
        .into_iter()
        .chain(chain.iter().map(|s| store.segment_path(&s.id)))
        .map(|p| fs::read(p).expect("read"))
        .collect();

    let pool = open(dir.path());
    assert_eq!(pairs(&pool, "a"), turns);
    let reply = say(&pool, "a", "third");
    assert!(reply.resumed_from_disk, "{reply:?}");
    assert!(reply.rebuilt.is_none() && reply.transcript_repair.is_none());
    assert_eq!(
        reply.text,
        FakeBackend::default().expected_reply(SYSTEM, &turns, "third", MAX_TOKENS)
    );
    // As much of the prompt reused as from files without those fields.
    let control = tempfile::tempdir().expect("tempdir");
    agent_with_two_turns(control.path(), "a");
    let unchanged = say(&open(control.path()), "a", "third");
    assert!(unchanged.resumed_from_disk && unchanged.reused_tokens > 0);
    assert_eq!(
        (reply.prompt_tokens, reply.reused_tokens),
        (unchanged.prompt_tokens, unchanged.reused_tokens)
    );
    drop(pool);

    // agent.json and the segments as they were; the transcript grew by one line after the
    // old ones; the manifest, rewritten by the save, still has the newer build's field.
    let after: Vec<Vec<u8>> = [agent_file, transcript]
        .into_iter()
        .chain(chain.iter().map(|s| store.segment_path(&s.id)))
        .map(|p| fs::read(p).expect("read"))
        .collect();
    assert_eq!(after[0], before[0]);
    assert!(after[1].starts_with(&before[1]) && after[1].len() > before[1].len());
    assert_eq!(after[2..], before[2..]);
    let kept = store.manifest("a").expect("read").expect("saved");
    assert_eq!(kept.unknown["from_a_newer_build"]["list"][1], 2.5);
    assert!(kept.segments.starts_with(&chain));
    let pool = open(dir.path());
    assert!(pool.load_agent("a").expect("load").resumed_from_disk);
    assert_eq!(pool.transcript("a").expect("transcript").len(), 3);
}

#[test]
fn damaged_agent_file_is_reported_and_the_agent_can_be_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    agent_with_two_turns(dir.path(), "a");
    agent_with_two_turns(dir.path(), "b");
    fs::write(dir.path().join("agents/a/agent.json"), b"{not json").expect("write");
    let pool = open(dir.path());
    let listed = pool.list();
    assert_eq!(listed.len(), 2);
    assert!(listed[0].info.is_none() && listed[0].damage.is_some());
    assert!(listed[1].info.is_some());
    let err = pool
        .generate("a", "hi", &options(MAX_TOKENS), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, PoolError::CorruptAgentFile { .. }), "{err}");
    assert!(err.to_string().contains("agent.json"), "{err}");
    say(&pool, "b", "still fine");
    pool.delete("a").expect("delete");
    assert_eq!(pool.list().len(), 1);
}

#[test]
fn engine_failure_records_no_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = open(dir.path());
    pool.create_agent("a", "t", SYSTEM).expect("create");
    let huge = "y".repeat(agent_pool::testing::FAKE_CONTEXT + 10);
    let err = pool
        .generate("a", &huge, &options(MAX_TOKENS), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, PoolError::Engine { .. }), "{err}");
    assert!(pool.transcript("a").expect("transcript").is_empty());
    let reply = say(&pool, "a", "small");
    assert_eq!(reply.turn, Some(0));
    assert_eq!(
        reply.text,
        FakeBackend::default().expected_reply(SYSTEM, &[], "small", MAX_TOKENS)
    );
}

#[test]
fn one_pool_per_directory_and_bad_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = open(dir.path());
    let second = AgentPool::open(
        dir.path(),
        Arc::new(FakeBackend::default()),
        PoolConfig::default(),
    );
    assert!(
        matches!(second, Err(PoolError::Locked { .. })),
        "{second:?}"
    );
    drop(pool);
    assert!(
        AgentPool::open(
            dir.path(),
            Arc::new(FakeBackend::default()),
            PoolConfig::default()
        )
        .is_ok()
    );

    let other = tempfile::tempdir().expect("tempdir");
    for config in [
        PoolConfig {
            max_hot: 0,
            ..PoolConfig::default()
        },
        PoolConfig {
            kv_budget_bytes: 0,
            ..PoolConfig::default()
        },
    ] {
        let r = AgentPool::open(other.path(), Arc::new(FakeBackend::default()), config);
        assert!(matches!(r, Err(PoolError::InvalidConfig { .. })), "{r:?}");
    }
}

#[test]
fn interrupted_create_and_delete_leave_no_agent_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    agent_with_two_turns(dir.path(), "keep");
    // What a crash leaves: a half-made agent directory, and one renamed away for deletion.
    let agents = dir.path().join("agents");
    fs::create_dir(agents.join(".tmp-create-ghost-1-0")).expect("mkdir");
    fs::write(agents.join(".tmp-create-ghost-1-0/agent.json"), b"{").expect("write");
    fs::create_dir(agents.join(".tmp-delete-gone-1-1")).expect("mkdir");
    let pool = open(dir.path());
    assert_eq!(
        pool.list().into_iter().map(|a| a.id).collect::<Vec<_>>(),
        ["keep"]
    );
    assert_eq!(
        fs::read_dir(&agents).expect("ls").count(),
        1,
        "litter removed"
    );
    pool.create_agent("ghost", "t", SYSTEM)
        .expect("the id was never taken");
}

mod parsers {
    use agent_pool::testing::{parse_agent_file, parse_transcript, transcript_line};
    use agent_pool::{Parent, PoolError, Turn, Usage};
    use engine::Message;
    use proptest::prelude::*;
    use proptest::sample::Index;

    fn turns(n: usize) -> Vec<Turn> {
        (0..n as u64)
            .map(|i| Turn {
                index: i,
                unix_ms: 1_700_000_000_000 + i,
                parent: i.checked_sub(1).map_or(Parent::System, Parent::Turn),
                input: vec![Message::user(format!("question {i}: \"why\"?\n"))],
                reply: format!("because {}", "ü".repeat(i as usize)),
                reply_tokens: (0..i as u32).collect(),
                instructions: (i % 3 == 2).then(|| format!("be \"{i}\"\n")),
                usage: (i % 2 == 1).then_some(Usage {
                    prompt_tokens: 7 * i as usize,
                    reused_tokens: i as usize,
                    output_tokens: 5,
                }),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// The same entry points a fuzzer would call: any bytes give a value or an error.
        #[test]
        fn parsers_survive_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = parse_transcript(&bytes);
            let _ = parse_agent_file(&bytes, "a");
        }

        /// Damage anywhere (flipped bytes, a cut) is either reported or, when it only tore the
        /// end, leaves a prefix of the real turns: never a changed or invented turn.
        #[test]
        fn damaged_transcript_never_yields_a_wrong_turn(
            n in 1..6usize,
            flips in proptest::collection::vec((any::<Index>(), 1u8..=255), 0..4),
            cut in proptest::option::of(any::<Index>()),
        ) {
            let original = turns(n);
            let mut bytes: Vec<u8> = original.iter().flat_map(transcript_line).collect();
            for (at, x) in &flips {
                let at = at.index(bytes.len());
                bytes[at] ^= x;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            match parse_transcript(&bytes) {
                Ok((got, good_len)) => {
                    prop_assert!(good_len <= bytes.len());
                    prop_assert!(got.len() <= n);
                    prop_assert_eq!(&got[..], &original[..got.len()]);
                    if flips.is_empty() && cut.is_none() {
                        prop_assert_eq!(got.len(), n);
                    }
                }
                Err(PoolError::CorruptTranscript { line, .. }) => prop_assert!(line >= 1 && line <= n + 1),
                Err(PoolError::UnsupportedVersion { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
