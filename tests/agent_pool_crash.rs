//! Kill -9 at random moments: a child process (this test binary, re-executed in child mode)
//! runs turns on several agents with the fake engine, evicting and saving caches all the time,
//! and reports each turn once `generate` has returned. The parent kills it with SIGKILL,
//! reopens the pool, and checks that every reported turn is in its transcript, exactly, and
//! that every agent loads and answers as its transcript implies.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_pool::testing::FakeBackend;
use agent_pool::{AgentPool, PoolConfig};
use engine::testing::options;
use kv_extract::KvShape;

const CHILD_ENV: &str = "AGENT_POOL_CRASH_CHILD_ROOT";
const AGENTS: [&str; 4] = ["crash-a", "crash-b", "crash-c", "crash-d"];
const SYSTEMS: [&str; 2] = ["You are agent one.", "You are agent two."];
const MAX_TOKENS: usize = 12;

/// Bigger caches than the default fake's, so that saves take real time and a kill often
/// lands in one.
fn backend() -> FakeBackend {
    FakeBackend::new("crash").with_shape(KvShape {
        n_layers: 8,
        n_kv_heads: 4,
        head_dim: 64,
        window: None,
    })
}

fn config() -> PoolConfig {
    // One hot agent: every switch evicts, so a save happens before nearly every turn.
    PoolConfig {
        max_hot: 1,
        ..PoolConfig::default()
    }
}

/// Child mode: runs turns until killed. Does nothing when the test runs normally.
#[test]
fn crash_child() {
    let Some(root) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let pool =
        AgentPool::open(Path::new(&root), Arc::new(backend()), config()).expect("child: open");
    let existing: Vec<String> = pool.list().into_iter().map(|a| a.id).collect();
    for (i, id) in AGENTS.iter().enumerate() {
        if !existing.iter().any(|e| e == id) {
            pool.create_agent(id, "crash", SYSTEMS[i % 2])
                .expect("child: create");
        }
    }
    let pid = std::process::id();
    for k in 0u64.. {
        // Now and then, an agent that is created and deleted again.
        if k % 9 == 4 {
            let churn = format!("churn-{pid}-{k}");
            pool.create_agent(&churn, "churn", SYSTEMS[0])
                .expect("child: create churn");
            pool.delete(&churn).expect("child: delete churn");
        }
        let id = AGENTS[(k as usize * 3 + 1) % AGENTS.len()];
        let user = format!("message {k} from {pid}");
        let reply = pool
            .generate(id, &user, &options(MAX_TOKENS), &mut |_| {})
            .expect("child: generate");
        let line = serde_json::json!({"id": id, "turn": reply.turn.expect("a committed turn"), "user": user, "reply": reply.text});
        println!("TURN {line}");
    }
}

/// A small xorshift generator: the kill times only need to vary, and the seed is printed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct Reported {
    id: String,
    turn: u64,
    user: String,
    reply: String,
}

fn parse(line: &str) -> Option<Reported> {
    // libtest prints "test crash_child ... " without a newline before the first report.
    let (_, json) = line.split_once("TURN ")?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(Reported {
        id: v["id"].as_str()?.to_owned(),
        turn: v["turn"].as_u64()?,
        user: v["user"].as_str()?.to_owned(),
        reply: v["reply"].as_str()?.to_owned(),
    })
}

/// When to kill the child, once it has reported some turns.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// After this long.
    After(Duration),
    /// As soon as a segment is being written (a temporary file exists in the store).
    MidSave,
}

fn saving(root: &Path) -> bool {
    ["kv/segments", "kv/manifests"].iter().any(|d| {
        std::fs::read_dir(root.join(d))
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            })
            .unwrap_or(false)
    })
}

/// Runs the child until it has reported `min_turns` turns, then kills it as `kill` says.
/// Returns the turns it reported and whether it was caught in the middle of a save.
fn run_and_kill(root: &Path, min_turns: usize, kill: Kill) -> (Vec<Reported>, bool) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(r) = parse(&line) {
                    lines.lock().expect("lines").push(r);
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines.lock().expect("lines").len() < min_turns {
        assert!(Instant::now() < deadline, "the child made no progress");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the child exited by itself: {status}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut mid_save = false;
    match kill {
        Kill::After(extra) => std::thread::sleep(extra),
        Kill::MidSave => {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !mid_save && Instant::now() < deadline {
                mid_save = saving(root);
            }
        }
    }
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix.
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the child was killed");
    reader.join().expect("reader");
    let lines = Arc::try_unwrap(lines)
        .ok()
        .expect("reader done")
        .into_inner()
        .expect("lines");
    (lines, mid_save)
}

#[test]
fn sigkill_at_random_moments_loses_no_returned_turn() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("kill schedule seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = backend();
    let mut reported: BTreeMap<(String, u64), (String, String)> = BTreeMap::new();
    const ROUNDS: u64 = 8;
    let mut caught_mid_save = 0;
    for round in 0..ROUNDS {
        let min_turns = 1 + rng.below(12) as usize;
        let kill = if round % 2 == 1 {
            Kill::MidSave
        } else {
            Kill::After(Duration::from_micros(rng.below(40_000)))
        };
        let (got, mid_save) = run_and_kill(dir.path(), min_turns, kill);
        caught_mid_save += usize::from(mid_save);
        eprintln!(
            "round {round}: killed {kill:?} (in a save: {mid_save}) after {} reports",
            got.len()
        );
        for r in got {
            reported.insert((r.id, r.turn), (r.user, r.reply));
        }

        let pool =
            AgentPool::open(dir.path(), Arc::new(backend()), config()).expect("reopen after kill");
        assert!(
            !saving(dir.path()),
            "open removes the litter of interrupted saves"
        );
        let mut on_disk = 0;
        for (i, id) in AGENTS.iter().enumerate() {
            let turns = pool.transcript(id).expect("transcript readable");
            // Every turn the child reported is there, exactly; each reply is the one its
            // history implies (so no turn is missing or reordered before it either).
            let mut history = Vec::new();
            for t in &turns {
                assert_eq!(
                    t.reply,
                    fake.expected_reply(SYSTEMS[i % 2], &history, t.user(), MAX_TOKENS),
                    "{id} turn {}",
                    t.index
                );
                history.push((t.user().to_owned(), t.reply.clone()));
            }
            for ((rid, turn), (user, reply)) in
                reported.range((id.to_string(), 0)..=(id.to_string(), u64::MAX))
            {
                let t = turns.get(*turn as usize).unwrap_or_else(|| {
                    panic!("round {round}: reported turn {rid}#{turn} is missing")
                });
                assert_eq!((t.user(), &t.reply), (user.as_str(), reply));
            }
            on_disk += turns.len();
        }
        // At most one turn per kill was committed without being reported yet.
        assert!(
            on_disk >= reported.len() && on_disk <= reported.len() + round as usize + 1,
            "{on_disk} on disk, {} reported",
            reported.len()
        );
        // Every agent (churn leftovers included) loads.
        for agent in pool.list() {
            let report = pool
                .load_agent(&agent.id)
                .unwrap_or_else(|e| panic!("round {round}: {} does not load: {e}", agent.id));
            assert!(
                report.tokens > 0,
                "{}: at least the system prompt is cached",
                agent.id
            );
        }
        eprintln!(
            "round {round}: {} turns reported, {on_disk} on disk, {} agents, {} rebuilt",
            reported.len(),
            pool.list().len(),
            pool.stats().counters.rebuilds
        );
        pool.abandon();
    }
    assert!(caught_mid_save > 0, "no kill landed in a save");
    // And the pool goes on: one more turn each, answered from the full history.
    let pool = AgentPool::open(dir.path(), Arc::new(backend()), config()).expect("reopen");
    for (i, id) in AGENTS.iter().enumerate() {
        let history: Vec<(String, String)> = pool
            .transcript(id)
            .expect("transcript")
            .into_iter()
            .map(|t| (t.user().to_owned(), t.reply))
            .collect();
        let reply = pool
            .generate(id, "after the crashes", &options(MAX_TOKENS), &mut |_| {})
            .expect("generate");
        assert_eq!(
            reply.text,
            fake.expected_reply(SYSTEMS[i % 2], &history, "after the crashes", MAX_TOKENS)
        );
    }
}
