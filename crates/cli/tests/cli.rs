//! The `agentkv` binary end to end, in a temporary AGENTKV_HOME: the two-session demo, every
//! `agents` subcommand, `run --json`, and bad input.
//!
//! Tests that need the real model find it with `engine::testing::real_model_path`, which
//! says what happens without it.
//! (Here rather than in the `tests` package because Cargo only hands a package's own tests
//! the path of its binaries, `CARGO_BIN_EXE_agentkv`.)

use std::path::Path;
use std::process::{Command, Output};

use engine::testing::real_model_path;

/// Runs `agentkv --home <home> [--model <model>] args...`.
fn agentkv(home: &Path, model: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentkv"));
    cmd.arg("--home").arg(home);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    cmd.args(args).env_remove("AGENTKV_HOME");
    cmd.output().expect("starting agentkv")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "agentkv failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Asserts failure and returns stderr.
fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "agentkv should have failed\nstdout: {}",
        stdout(&out)
    );
    stderr(&out)
}

/// Flips the last byte of one of the segment files in `segments`.
fn damage_a_segment(segments: &Path) {
    let seg = std::fs::read_dir(segments)
        .expect("listing the segments")
        .map(|e| e.expect("a directory entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a segment");
    let mut bytes = std::fs::read(&seg).expect("reading the segment");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&seg, bytes).expect("writing the segment");
}

#[test]
fn a_missing_system_prompt_file_says_so_once_and_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let missing = home.path().join("no-such-prompt.txt");
    let missing = missing.to_str().expect("a UTF-8 temp path");
    for command in ["run", "chat"] {
        let mut args = vec![command, "--agent", "a", "--system-file", missing];
        if command == "run" {
            args.push("hi");
        }
        let err = fails(agentkv(home.path(), None, &args));
        assert_eq!(
            err.matches("No such file or directory").count(),
            1,
            "{command}: the OS error once: {err}"
        );
        assert!(err.contains(missing), "{command}: names the file: {err}");
        assert!(
            err.contains("pass a readable file, or the prompt itself with --system"),
            "{command}: says what to do: {err}"
        );
    }
}

/// Errors from kv-store and agent-pool reach the terminal through a chain of causes: each
/// appears once. (`<home>/pool/kv` is a file, so the cache store's directory cannot be made.)
#[test]
fn a_library_error_prints_each_cause_once() {
    let home = tempfile::tempdir().unwrap();
    let model = home.path().join("tiny.gguf");
    engine::testing::write_tiny_llama_gguf(&model, &engine::testing::TinyConfig::default(), 1)
        .expect("writing the tiny model");
    std::fs::create_dir_all(home.path().join("pool")).unwrap();
    let kv = home.path().join("pool/kv");
    std::fs::write(&kv, b"not a directory").unwrap();
    // `agents gc` goes straight to kv-store; `agents list` opens the pool over it.
    for args in [&["agents", "gc"][..], &["agents", "list"]] {
        let err = fails(agentkv(home.path(), Some(&model), args));
        assert_eq!(
            err.matches("File exists").count(),
            1,
            "{args:?}: the OS error once: {err}"
        );
        assert!(
            err.contains(kv.to_str().expect("a UTF-8 temp path")),
            "{args:?}: names the directory: {err}"
        );
    }
}

#[test]
fn missing_model_names_the_fetch_command() {
    let home = tempfile::tempdir().unwrap();
    let nowhere = home.path().join("no-such-model.gguf");
    for args in [
        &["agents", "list"][..],
        &["run", "--agent", "a", "hi"],
        &["demo", "--session", "1"],
    ] {
        let err = fails(agentkv(home.path(), Some(&nowhere), args));
        assert!(err.contains("cargo xtask fetch-model"), "{args:?}: {err}");
        assert!(err.contains("no-such-model.gguf"), "{args:?}: {err}");
    }
}

/// A base model (a GGUF without a chat template, as Gemma 3 270M's) loads, but no agent can
/// talk through it: the commands that talk say so before they start, naming the file and what
/// to pass instead; `agents list` still works on it.
#[test]
fn a_base_model_is_refused_by_the_commands_that_talk() {
    let home = tempfile::tempdir().unwrap();
    let model = home.path().join("base.gguf");
    let cfg = engine::testing::TinyConfig {
        chat_template: false,
        ..engine::testing::TinyConfig::default()
    };
    engine::testing::write_tiny_llama_gguf(&model, &cfg, 1).expect("writing the tiny model");
    let refused = |args: &[&str], err: &str| {
        assert!(
            err.contains("base.gguf has no chat template"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("pass --model PATH to a chat"),
            "{args:?}: {err}"
        );
    };
    for args in [
        &["run", "--agent", "a", "hi"][..],
        &["chat", "--agent", "a"],
        &["demo", "--session", "1"],
    ] {
        refused(args, &fails(agentkv(home.path(), Some(&model), args)));
    }
    // The server must exit rather than start: stopped after a minute if it serves instead.
    let mut server = Command::new(env!("CARGO_BIN_EXE_agentkv"))
        .arg("--home")
        .arg(home.path())
        .arg("--model")
        .arg(&model)
        .args(["serve", "--port", "0"])
        .env_remove("AGENTKV_HOME")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting agentkv serve");
    let started = std::time::Instant::now();
    while server
        .try_wait()
        .expect("waiting for agentkv serve")
        .is_none()
    {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            server.kill().expect("stopping agentkv serve");
            panic!("agentkv serve started on a model without a chat template");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    refused(
        &["serve"],
        &fails(server.wait_with_output().expect("its output")),
    );
    let list = ok(agentkv(home.path(), Some(&model), &["agents", "list"]));
    assert!(list.contains("no agents in"), "{list}");
    assert!(
        !home.path().join("pool/agents/a").exists(),
        "no agent was made"
    );
}

#[test]
fn session_2_before_session_1_says_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let err = fails(agentkv(home.path(), None, &["demo", "--session", "2"]));
    assert!(err.contains("demo --session 1"), "{err}");
}

#[test]
fn session_must_be_1_or_2() {
    let home = tempfile::tempdir().unwrap();
    let err = fails(agentkv(home.path(), None, &["demo", "--session", "3"]));
    assert!(err.contains("--session"), "{err}");
}

#[test]
fn demo_session_1_then_2() {
    let Some(model) = real_model_path() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let demo = ["demo", "--max-tokens", "4", "--session"];
    let one = ok(agentkv(
        home.path(),
        Some(&model),
        &[&demo[..], &["1"]].concat(),
    ));
    for header in ["prompt tok", "prefill ms", "decode tok/s", "save ms"] {
        assert!(one.contains(header), "{one}");
    }
    for agent in ["specialist", "product", "qa"] {
        assert!(one.contains(agent), "{one}");
    }

    let two = agentkv(home.path(), Some(&model), &[&demo[..], &["2"]].concat());
    let err = stderr(&two);
    let two = ok(two);
    for header in ["load ms", "resume TTFT ms", "re-prefill TTFT ms", "speedup"] {
        assert!(two.contains(header), "{two}");
    }
    assert!(
        !err.contains("rebuilt") && !err.contains("note:"),
        "a clean resume: {err}"
    );

    // A third session after damage to a segment: the pool rebuilds that agent's cache from
    // its transcript, and the demo says so instead of printing a resume figure as if nothing
    // happened.
    damage_a_segment(&home.path().join("demo/kv/segments"));
    let three = agentkv(home.path(), Some(&model), &[&demo[..], &["2"]].concat());
    let err = stderr(&three);
    let three = ok(three);
    assert!(
        err.contains("damaged") && err.contains("prefilled again"),
        "{err}"
    );
    assert!(three.contains("rebuilt rather than resumed"), "{three}");
}

#[test]
fn agents_subcommands_and_bad_input() {
    let Some(model) = real_model_path() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let m = Some(model.as_path());

    let empty = ok(agentkv(home.path(), m, &["agents", "list"]));
    assert!(empty.contains("no agents"), "{empty}");

    let json = ok(agentkv(
        home.path(),
        m,
        &[
            "run",
            "--agent",
            "alpha",
            "--system",
            "You answer briefly.",
            "--max-tokens",
            "4",
            "--json",
            "Say hi.",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
    assert_eq!(v["agent"], "alpha");
    assert_eq!(v["turn"], 0);
    assert!(v["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(v["timings_ms"]["prefill"].as_f64().is_some());

    // A second run resumes alpha from disk in a new process.
    let json = ok(agentkv(
        home.path(),
        m,
        &[
            "run",
            "--agent",
            "alpha",
            "--max-tokens",
            "4",
            "--json",
            "Again.",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["turn"], 1);
    assert_eq!(v["resumed_from_disk"], true, "{v}");
    assert!(v["reused_tokens"].as_u64().unwrap() > 0, "{v}");

    ok(agentkv(
        home.path(),
        m,
        &[
            "--quiet",
            "run",
            "--agent",
            "beta",
            "--max-tokens",
            "4",
            "Hello.",
        ],
    ));

    let list = ok(agentkv(home.path(), m, &["agents", "list"]));
    assert!(list.contains("alpha") && list.contains("beta"), "{list}");
    assert!(
        list.contains("last use") && list.contains("on disk"),
        "{list}"
    );
    assert!(list.contains("f16") && !list.contains("q8_0"), "{list}");

    // Another KV dtype: beta's f16 cache is computed again in q8_0, with a note, and saved
    // in it; an unknown dtype is refused before anything runs.
    let out = agentkv(
        home.path(),
        m,
        &[
            "--kv-dtype",
            "q8_0",
            "run",
            "--agent",
            "beta",
            "--max-tokens",
            "4",
            "More.",
        ],
    );
    let note = stderr(&out);
    ok(out);
    assert!(
        note.contains("rebuilt") && note.contains("kv dtype"),
        "{note}"
    );
    let list = ok(agentkv(home.path(), m, &["agents", "list"]));
    assert!(list.contains("q8_0") && list.contains("f16"), "{list}");
    let err = fails(agentkv(
        home.path(),
        m,
        &["--kv-dtype", "q4", "agents", "list"],
    ));
    assert!(err.contains("q4") && err.contains("q8_0"), "{err}");

    let show = ok(agentkv(home.path(), m, &["agents", "show", "alpha"]));
    assert!(
        show.contains("You answer briefly.") && show.contains("Say hi.") && show.contains("Again."),
        "{show}"
    );

    let verify = ok(agentkv(home.path(), m, &["agents", "verify"]));
    assert!(
        verify.contains("alpha: ok") && verify.contains("beta: ok"),
        "{verify}"
    );

    ok(agentkv(home.path(), m, &["agents", "rm", "beta"]));
    let list = ok(agentkv(home.path(), m, &["agents", "list"]));
    assert!(list.contains("alpha") && !list.contains("beta"), "{list}");

    // A segment no manifest references (as a crash between a segment and its manifest
    // leaves): gc removes it and counts its bytes.
    let orphan = home
        .path()
        .join(format!("pool/kv/segments/{}.safetensors", "0".repeat(32)));
    std::fs::write(&orphan, vec![7u8; 1000]).unwrap();
    let gc = ok(agentkv(home.path(), m, &["agents", "gc"]));
    assert!(gc.contains("freed 1000 B (1 segments"), "{gc}");
    assert!(!orphan.exists());

    // Damage a segment: verify must fail and name the problem.
    damage_a_segment(&home.path().join("pool/kv/segments"));
    let err = fails(agentkv(home.path(), m, &["agents", "verify"]));
    assert!(err.contains("problems found"), "{err}");

    // Bad input.
    let err = fails(agentkv(home.path(), m, &["agents", "show", "nosuch"]));
    assert!(err.contains("no agent \"nosuch\""), "{err}");
    let err = fails(agentkv(home.path(), m, &["agents", "rm", "nosuch"]));
    assert!(err.contains("nosuch"), "{err}");
    let err = fails(agentkv(
        home.path(),
        m,
        &["run", "--agent", "Bad/Name", "hi"],
    ));
    assert!(err.contains("invalid agent id"), "{err}");
}

/// One HTTP/1.1 exchange over a plain socket: (status code, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[test]
fn serve_answers_shares_the_pool_with_agents_list_and_stops_on_sigterm() {
    use std::io::BufRead;
    let Some(model) = real_model_path() else {
        return;
    };
    let home = tempfile::tempdir().expect("temp dir");
    let mut server = Command::new(env!("CARGO_BIN_EXE_agentkv"))
        .arg("--home")
        .arg(home.path())
        .arg("--model")
        .arg(&model)
        .args(["--quiet", "serve", "--port", "0"])
        .env_remove("AGENTKV_HOME")
        .env_remove("AGENTKV_API_KEY")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting agentkv serve");
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the ready line");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model": "scribe", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}"#,
    );
    assert_eq!(status, 200, "{body}");

    // The server holds the pool; listing and showing read its files instead.
    let list = ok(agentkv(home.path(), Some(&model), &["agents", "list"]));
    assert!(list.contains("scribe"), "{list}");
    let show = ok(agentkv(
        home.path(),
        Some(&model),
        &["agents", "show", "scribe"],
    ));
    assert!(show.contains("[0] user: Hi"), "{show}");
    let err = fails(agentkv(
        home.path(),
        Some(&model),
        &["agents", "rm", "scribe"],
    ));
    assert!(err.contains("DELETE /agentkv/agents"), "{err}");

    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = server.wait().expect("wait");
    assert!(status.success(), "agentkv serve exited with {status}");
    // Stopped: the pool is free, and the agent is there with its turn.
    let show = ok(agentkv(
        home.path(),
        Some(&model),
        &["agents", "show", "scribe"],
    ));
    assert!(show.contains("[0] user: Hi"), "{show}");
}
