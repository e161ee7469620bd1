//! Conversations as trees, on the deterministic fake engine: a whole resent history continues
//! the deepest matching turn, a divergent one forks, a turn id continues (or forks) exactly
//! there, a turn's instructions are its own, deleted turns are gone, a detached reply reuses a
//! hot agent's prefix or a saved system prompt and writes nothing. Every reply is checked against the fake's reply to the full prompt computed from
//! scratch, so a wrong reuse would show as a wrong reply.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_pool::testing::FakeBackend;
use agent_pool::{AgentPool, Backend, Continue, Parent, PoolConfig, PoolError, Reply, Reused};
use engine::testing::options;
use engine::{Message, Role};
use kv_extract::{KvShape, SlidingWindow};

const SYSTEM: &str = "You are terse.";

const MAX_TOKENS: usize = 10;

fn open(dir: &Path) -> AgentPool<FakeBackend> {
    AgentPool::open(dir, Arc::new(FakeBackend::default()), PoolConfig::default()).expect("open")
}

/// The reply the fake gives to `conversation`, computed without any pool or cache.
fn expected(conversation: &[Message]) -> String {
    FakeBackend::default().reply_to_conversation(conversation, MAX_TOKENS)
}

fn respond(pool: &AgentPool<FakeBackend>, at: Continue, messages: &[Message]) -> Reply {
    pool.respond(
        "a",
        at,
        messages.to_vec(),
        &options(MAX_TOKENS),
        &mut |_| {},
    )
    .expect("respond")
}

#[test]
fn a_resent_history_continues_its_deepest_turn_and_a_divergent_one_forks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = open(dir.path());
    pool.create_agent("a", "t", SYSTEM).expect("create");
    let mut history = vec![Message::system(SYSTEM), Message::user("first")];
    let r0 = respond(&pool, Continue::Match, &history);
    assert_eq!(
        (r0.turn, r0.parent, r0.matched_messages),
        (Some(0), Parent::System, 1)
    );
    assert_eq!(r0.text, expected(&history));
    history.push(Message::assistant(r0.text.clone()));
    history.push(Message::user("second"));
    let r1 = respond(&pool, Continue::Match, &history);
    assert_eq!(
        (r1.turn, r1.parent, r1.matched_messages),
        (Some(1), Parent::Turn(0), 3)
    );
    assert_eq!(r1.text, expected(&history));
    // The cache held the first prompt and every generated token but the last.
    assert_eq!(r1.reused_tokens, r0.prompt_tokens + r0.tokens.len() - 1);

    // A different second question: back to turn 0, a fork.
    let mut fork = history.clone();
    fork[3] = Message::user("another second");
    let r2 = respond(&pool, Continue::Match, &fork);
    assert_eq!((r2.turn, r2.parent), (Some(2), Parent::Turn(0)));
    assert_eq!(r2.text, expected(&fork));
    // The cache was cut where the two prompts part, within the second user message.
    let fake = FakeBackend::default();
    let (p1, p2) = (
        fake.chat_tokens(&history, true).expect("tokens"),
        fake.chat_tokens(&fork, true).expect("tokens"),
    );
    let common = p1.iter().zip(&p2).take_while(|(a, b)| a == b).count();
    assert!(common > r0.prompt_tokens + r0.tokens.len());
    assert_eq!(r2.reused_tokens, common);

    // The first branch goes on where it was, after turn 1.
    history.push(Message::assistant(r1.text.clone()));
    history.push(Message::user("third"));
    let r3 = respond(&pool, Continue::Match, &history);
    assert_eq!(
        (r3.turn, r3.parent, r3.matched_messages),
        (Some(3), Parent::Turn(1), 5)
    );
    assert_eq!(r3.text, expected(&history));

    // A history whose system prompt is not the agent's starts bare.
    let bare = vec![Message::system("Be loud."), Message::user("first")];
    let r4 = respond(&pool, Continue::Match, &bare);
    assert_eq!(
        (r4.turn, r4.parent, r4.matched_messages),
        (Some(4), Parent::Bare, 0)
    );
    assert_eq!(r4.text, expected(&bare));
    let again = [
        bare.clone(),
        vec![Message::assistant(r4.text.clone()), Message::user("more")],
    ]
    .concat();
    let r5 = respond(&pool, Continue::Match, &again);
    assert_eq!(r5.parent, Parent::Turn(4));
    assert_eq!(r5.text, expected(&again));

    // Nothing new to answer.
    let done = [bare, vec![Message::assistant(r4.text)]].concat();
    let err = pool
        .respond(
            "a",
            Continue::Match,
            done,
            &options(MAX_TOKENS),
            &mut |_| {},
        )
        .expect_err("no input");
    assert!(matches!(err, PoolError::NoInput { .. }), "{err}");

    // The tree survives a reopen, and continues exactly where asked.
    drop(pool);
    let pool = open(dir.path());
    let turns = pool.transcript("a").expect("transcript");
    let parents: Vec<Parent> = turns.iter().map(|t| t.parent).collect();
    assert_eq!(
        parents,
        [
            Parent::System,
            Parent::Turn(0),
            Parent::Turn(0),
            Parent::Turn(1),
            Parent::Bare,
            Parent::Turn(4)
        ]
    );
    let r6 = respond(
        &pool,
        Continue::At(Parent::Turn(2)),
        &[Message::user("after the fork")],
    );
    let fork_conversation = [
        fork.clone(),
        vec![
            Message::assistant(r2.text.clone()),
            Message::user("after the fork"),
        ],
    ]
    .concat();
    assert_eq!(r6.text, expected(&fork_conversation));
    assert!(r6.resumed_from_disk);
}

#[test]
fn instructions_open_their_own_turn_alone_and_every_turn_keeps_its_usage() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = open(dir.path());
    let created = pool.create_agent("a", "t", SYSTEM).expect("create");
    assert!(!created.adopted && created.system_tokens > 0);
    // The first turn computed nothing itself, but the system prompt was computed for it.
    let r0 = respond(
        &pool,
        Continue::At(Parent::System),
        &[Message::user("first")],
    );
    assert_eq!(r0.reused_tokens, 0);
    let history = vec![
        Message::system(SYSTEM),
        Message::user("first"),
        Message::assistant(r0.text.clone()),
    ];
    assert_eq!(r0.text, expected(&history[..2]));

    // Instructions that are the agent's system prompt (as agent SDKs resend them) change
    // nothing: the whole cache is reused and the turn records no instructions.
    let same = respond(
        &pool,
        Continue::At(Parent::Turn(0)),
        &[Message::system(SYSTEM), Message::user("second")],
    );
    let asked = [history.clone(), vec![Message::user("second")]].concat();
    assert_eq!(same.text, expected(&asked));
    assert_eq!(same.reused_tokens, r0.prompt_tokens + r0.tokens.len() - 1);

    // Other instructions open this turn's conversation in the system prompt's place.
    let loud = respond(
        &pool,
        Continue::At(Parent::Turn(0)),
        &[Message::system("Be loud."), Message::user("second")],
    );
    let mut loud_asked = asked.clone();
    loud_asked[0] = Message::system("Be loud.");
    assert_eq!(loud.text, expected(&loud_asked));
    // Only the template's opening before the system text is common.
    assert!(
        loud.reused_tokens < created.system_tokens,
        "{}",
        loud.reused_tokens
    );

    // ... and only this turn's: the one after it opens with the agent's system prompt again.
    let after = respond(
        &pool,
        Continue::At(Parent::Turn(2)),
        &[Message::user("third")],
    );
    let after_asked = [
        asked.clone(),
        vec![
            Message::assistant(loud.text.clone()),
            Message::user("third"),
        ],
    ]
    .concat();
    assert_eq!(after.text, expected(&after_asked));
    let text = |messages: &[Message]| -> Vec<(Role, String)> {
        messages
            .iter()
            .map(|m| (m.role, m.content.clone()))
            .collect()
    };
    // A detached continuation is prompted with what respond would render, by the same rule.
    let third = vec![Message::user("third")];
    let seen = pool.conversation_at("a", Parent::Turn(2), third.clone());
    assert_eq!(text(&seen.expect("conversation")), text(&after_asked));
    let mut opened = after_asked.clone();
    opened[0] = Message::system("Whisper.");
    let whispered = [vec![Message::system("Whisper.")], third].concat();
    let seen = pool.conversation_at("a", Parent::Turn(2), whispered);
    assert_eq!(text(&seen.expect("conversation")), text(&opened));

    // Instructions and usage are durable, and the input keeps no system message.
    drop(pool);
    let pool = open(dir.path());
    let turns = pool.transcript("a").expect("transcript");
    let instructions: Vec<Option<&str>> = turns.iter().map(|t| t.instructions.as_deref()).collect();
    assert_eq!(instructions, [None, None, Some("Be loud."), None]);
    assert_eq!(turns[2].input, [Message::user("second")]);
    let opened_with: Vec<Option<String>> = (0..4)
        .map(|i| pool.turn_system_prompt("a", i).expect("system prompt"))
        .collect();
    let (system, loud_text) = (Some(SYSTEM.to_owned()), Some("Be loud.".to_owned()));
    assert_eq!(
        opened_with,
        [system.clone(), system.clone(), loud_text, system]
    );
    for (turn, reply) in turns.iter().zip([&r0, &same, &loud, &after]) {
        let usage = turn.usage.expect("usage recorded");
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.reused_tokens,
                usage.output_tokens
            ),
            (reply.prompt_tokens, reply.reused_tokens, reply.tokens.len()),
            "turn {}",
            turn.index
        );
    }

    // A system prompt read back from disk was not computed for the turn: it counts as reused.
    pool.create_agent("b", "t", SYSTEM).expect("create");
    assert!(pool.evict("b").expect("evict"));
    let r = pool
        .respond(
            "b",
            Continue::Head,
            vec![Message::user("first")],
            &options(MAX_TOKENS),
            &mut |_| {},
        )
        .expect("respond");
    assert!(r.resumed_from_disk);
    assert_eq!(r.reused_tokens, created.system_tokens);
}

#[test]
fn deleted_turns_cannot_be_read_or_continued_and_their_children_live_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = open(dir.path());
    pool.create_agent("a", "t", SYSTEM).expect("create");
    let r0 = respond(&pool, Continue::At(Parent::System), &[Message::user("one")]);
    let r1 = respond(&pool, Continue::Head, &[Message::user("two")]);
    assert_eq!(r1.parent, Parent::Turn(0));
    pool.delete_turn("a", 0).expect("delete");
    for err in [
        pool.turn("a", 0).expect_err("deleted"),
        pool.delete_turn("a", 0).expect_err("twice"),
        pool.turn("a", 7).expect_err("never written"),
        pool.respond(
            "a",
            Continue::At(Parent::Turn(0)),
            vec![Message::user("x")],
            &options(MAX_TOKENS),
            &mut |_| {},
        )
        .expect_err("continue a deleted turn"),
    ] {
        assert!(matches!(err, PoolError::UnknownTurn { .. }), "{err}");
    }
    assert_eq!(pool.turn("a", 1).expect("turn 1").reply, r1.text);
    drop(pool);
    let pool = open(dir.path());
    assert!(pool.turn("a", 0).is_err(), "the deletion is durable");
    let r2 = respond(
        &pool,
        Continue::At(Parent::Turn(1)),
        &[Message::user("three")],
    );
    let conversation = [
        Message::system(SYSTEM),
        Message::user("one"),
        Message::assistant(r0.text),
        Message::user("two"),
        Message::assistant(r1.text),
        Message::user("three"),
    ];
    assert_eq!(r2.text, expected(&conversation));
}

/// A detached question under `system`: the messages, the system message's token count, the
/// reply and what `on_reuse` heard.
fn ask_detached(
    pool: &AgentPool<FakeBackend>,
    system: &str,
) -> (Vec<Message>, usize, Reply, Option<Reused>) {
    let messages = vec![Message::system(system), Message::user("a stranger asks")];
    let system_tokens = FakeBackend::default()
        .chat_tokens(&messages[..1], false)
        .expect("tokens")
        .len();
    let mut told = None;
    let reply = pool
        .respond_detached(
            &messages,
            &options(MAX_TOKENS),
            &mut |n| told = Some(n),
            &mut |_| {},
        )
        .expect("detached");
    (messages, system_tokens, reply, told)
}

#[test]
fn a_detached_reply_reads_a_saved_system_prompt_from_disk_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = open(dir.path());
    let long = format!("{SYSTEM} {}", "Always cite sources. ".repeat(20));
    pool.create_agent("a", "t", &long).expect("create");
    respond(&pool, Continue::Head, &[Message::user("hello")]);
    pool.flush().expect("flush");
    assert!(pool.evict("a").expect("evict"), "the agent was hot");
    let files = |root: &Path| -> Vec<(PathBuf, u64)> {
        let mut all = Vec::new();
        let mut dirs = vec![root.to_owned()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).expect("read dir") {
                let e = e.expect("entry");
                let meta = e.metadata().expect("metadata");
                if meta.is_dir() {
                    dirs.push(e.path());
                } else {
                    all.push((e.path(), meta.len()));
                }
            }
        }
        all.sort();
        all
    };
    let before = files(dir.path());
    let (messages, system_tokens, reply, told) = ask_detached(&pool, &long);
    // Nothing hot shares the prompt: the system prompt comes from the agent's first segment.
    assert_eq!(
        told,
        Some(Reused {
            tokens: system_tokens,
            from_disk: true
        })
    );
    assert_eq!(reply.reused_tokens, system_tokens);
    assert_eq!(reply.text, expected(&messages));
    assert_eq!(files(dir.path()), before, "a detached reply wrote a file");
    assert!(pool.stats().hot.is_empty());

    // Another system prompt: nothing saved to read, nothing reused.
    let other = [
        Message::system("Be terse."),
        Message::user("a stranger asks"),
    ];
    let mut told = None;
    let reply = pool
        .respond_detached(
            &other,
            &options(MAX_TOKENS),
            &mut |n| told = Some(n),
            &mut |_| {},
        )
        .expect("detached");
    assert_eq!(told.map(|r| r.from_disk), Some(false));
    assert_eq!(reply.text, expected(&other));
}

#[test]
fn a_detached_reply_reuses_a_hot_prefix_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = open(dir.path());
    let long = format!("{SYSTEM} {}", "Always cite sources. ".repeat(20));
    pool.create_agent("a", "t", &long).expect("create");
    respond(&pool, Continue::Head, &[Message::user("hello")]);
    let before = pool.transcript("a").expect("transcript");
    let (messages, system_tokens, reply, told) = ask_detached(&pool, &long);
    assert_eq!(reply.text, expected(&messages));
    assert_eq!(reply.turn, None);
    assert!(
        reply.reused_tokens >= system_tokens,
        "{} < {system_tokens}",
        reply.reused_tokens
    );
    assert_eq!(
        told,
        Some(Reused {
            tokens: reply.reused_tokens,
            from_disk: false
        })
    );
    assert_eq!(pool.transcript("a").expect("transcript"), before);
    assert_eq!(pool.list().len(), 1);
    // A prompt that fills the context is refused before any work.
    let huge = [Message::user("x".repeat(agent_pool::testing::FAKE_CONTEXT))];
    let err = pool
        .respond_detached(&huge, &options(MAX_TOKENS), &mut |_| {}, &mut |_| {})
        .expect_err("too long");
    assert!(
        matches!(&err, PoolError::Engine { source, .. } if matches!(**source, engine::EngineError::ContextOverflow { .. })),
        "{err}"
    );
}

#[test]
fn sliding_window_caches_share_system_prompts_resume_and_rebuild_what_the_window_dropped() {
    // Layer 0 of this fake slides over 24 positions: its caches keep the last 23, in memory
    // and in files. The fake's oracle checks every position a cache holds against its tokens
    // (a dropped or misplaced position would panic), and every reply is checked against the
    // reply to the whole prompt.
    let fake = FakeBackend::default().with_shape(KvShape {
        n_layers: 2,
        n_kv_heads: 2,
        head_dim: 4,
        window: Some(SlidingWindow {
            size: 24,
            layers: 0b01,
        }),
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let pool =
        AgentPool::open(dir.path(), Arc::new(fake.clone()), PoolConfig::default()).expect("open");
    let expect = |c: &[Message]| fake.reply_to_conversation(c, MAX_TOKENS);
    let reply = |id: &str, at: Continue, user: &str| {
        pool.respond(
            id,
            at,
            vec![Message::user(user)],
            &options(MAX_TOKENS),
            &mut |_| {},
        )
        .expect("respond")
    };
    // A system prompt longer than the window, saved once and shared.
    let system = "You answer in one short line, and never more than that.";
    let a = pool.create_agent("a", "t", system).expect("create a");
    let b = pool.create_agent("b", "t", system).expect("create b");
    assert!(a.system_tokens > 24 && !a.adopted && b.adopted);
    let mut history = vec![Message::system(system)];
    for (i, user) in ["first", "second", "third"].into_iter().enumerate() {
        history.push(Message::user(user));
        let r = reply("a", Continue::Head, user);
        assert_eq!(r.text, expect(&history), "turn {i}");
        // (The first turn counts the system prompt computed at creation as its own.)
        if i > 0 {
            assert!(
                r.reused_tokens > a.system_tokens,
                "turn {i}: {}",
                r.reused_tokens
            );
        }
        history.push(Message::assistant(r.text.clone()));
    }
    let rb = reply("b", Continue::Head, "first");
    assert_eq!(rb.text, expect(&history[..2]));
    assert_eq!(rb.reused_tokens, b.system_tokens);

    // Evicted and resumed: the window's positions come back from disk.
    assert!(pool.evict("a").expect("evict"));
    history.push(Message::user("fourth"));
    let r = reply("a", Continue::Head, "fourth");
    assert!(r.resumed_from_disk && r.rebuilt.is_none());
    assert_eq!(r.text, expect(&history));
    assert!(r.reused_tokens > 24);

    // Back to the first turn: the window no longer holds what its continuation sees, so the
    // prompt is computed from the first token, and the answer is the same.
    let fork = reply("a", Continue::At(Parent::Turn(0)), "again");
    let forked = [history[..3].to_vec(), vec![Message::user("again")]].concat();
    assert_eq!(fork.text, expect(&forked));
    assert_eq!(fork.reused_tokens, 0);

    // A detached reply: copies what a hot cache can give, or computes the prompt.
    let conversation = [Message::system(system), Message::user("hi")];
    let detached = pool
        .respond_detached(
            &conversation,
            &options(MAX_TOKENS),
            &mut |_| {},
            &mut |_| {},
        )
        .expect("detached");
    assert_eq!(detached.text, expect(&conversation));
}
