//! `cargo xtask bench --only serve`: multi-round conversations, shaped like LMCache's
//! multi-round QA benchmark, against `agentkv serve` and llama.cpp's own OpenAI-compatible
//! server (llama-cpp-python's `[server]` extra) on the same GGUF and thread count, each server
//! killed with SIGKILL and restarted mid-way. The driver is `benches/serve/multi_round.py`
//! (in the peer's virtualenv); this module installs what it needs, runs it, and turns its
//! figures into `target/bench/serve.md` (also appended to `report.md`) with each target's
//! verdict.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{PeerBuild, Program, loadavg, peer_python, rows};
use crate::report::{commit, cpu_model, logical_cpus, utc_date};
use crate::venv::Venv;
use crate::{OPENAI_PACKAGE, fetch_model, project_root, run_step};

mod hot;
mod summary;

pub use hot::bench as hot_agents;

const USAGE: &str = "\
usage: cargo xtask bench --only serve [--users 4] [--rounds 4] [--system-tokens 1000]
                         [--history-tokens 2000] [--answer-tokens 100] [--max-hot 2]
                         [--max-kv-bytes 512MiB]

  U users (each an agent of agentkv) share a system prompt and have a history of their own;
  in each of R rounds every user in turn asks a new question and gets a streamed answer of
  at most --answer-tokens tokens (greedy). Against agentkv serve (--kv-dtype f32) and
  llama.cpp's server (llama-cpp-python[server] in target/peer-venv, RAM prompt cache on),
  both killed with SIGKILL and restarted after round 2; and agentkv again, uninterrupted,
  for the replies the restarted one must reproduce. One server runs at a time.
  Writes target/bench/serve.md and appends it to target/bench/report.md.
  Full size: about 25 minutes on two cores (plus ~15 for the first build of llama.cpp).
  Quick check: --users 3 --rounds 3 --system-tokens 200 --history-tokens 200 --answer-tokens 16";

/// The round after which both servers are killed and restarted.
const RESTART_AFTER: usize = 2;

struct Options {
    users: usize,
    rounds: usize,
    system_tokens: usize,
    history_tokens: usize,
    answer_tokens: usize,
    max_hot: usize,
    max_kv_bytes: u64,
}

/// The arguments of a `cargo xtask bench` that runs `part` (`serve` or `hot-agents`, the
/// parts with a server of their own), without `--only PART`; `None` when it does not.
pub fn selected(args: &[String], part: &str) -> Result<Option<Vec<String>>> {
    let Some(at) = args.iter().position(|a| a == "--only") else {
        return Ok(None);
    };
    let Some(only) = args.get(at + 1) else {
        return Ok(None);
    };
    if !only.split(',').any(|p| p.trim() == part) {
        return Ok(None);
    }
    if only.trim() != part {
        bail!(
            "{part} runs alone (it needs the machine to itself): cargo xtask bench --only {part}"
        );
    }
    let mut rest = args.to_vec();
    rest.drain(at..at + 2);
    Ok(Some(rest))
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        users: 4,
        rounds: 4,
        system_tokens: 1000,
        history_tokens: 2000,
        answer_tokens: 100,
        max_hot: 2,
        max_kv_bytes: 512 << 20,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        const FLAGS: &[&str] = &[
            "--users",
            "--rounds",
            "--system-tokens",
            "--history-tokens",
            "--answer-tokens",
            "--max-hot",
            "--max-kv-bytes",
        ];
        if !FLAGS.contains(&a.as_str()) {
            bail!("unknown argument {a:?}\n{USAGE}");
        }
        let value = it
            .next()
            .with_context(|| format!("{a} needs a value\n{USAGE}"))?;
        let number = || -> Result<usize> {
            value
                .parse()
                .with_context(|| format!("{a} takes a number, not {value:?}\n{USAGE}"))
        };
        match a.as_str() {
            "--users" => o.users = number()?,
            "--rounds" => o.rounds = number()?,
            "--system-tokens" => o.system_tokens = number()?,
            "--history-tokens" => o.history_tokens = number()?,
            "--answer-tokens" => o.answer_tokens = number()?,
            "--max-hot" => o.max_hot = number()?,
            // --max-kv-bytes, the one flag left in FLAGS.
            _ => o.max_kv_bytes = parse_size(value)?,
        }
    }
    if o.users == 0 || o.answer_tokens == 0 || o.max_hot == 0 {
        bail!("--users, --answer-tokens and --max-hot must be at least 1\n{USAGE}");
    }
    if o.rounds <= RESTART_AFTER {
        bail!(
            "--rounds must be at least {}: the servers restart after round {RESTART_AFTER}\n{USAGE}",
            RESTART_AFTER + 1
        );
    }
    Ok(o)
}

/// `123`, `512KiB`, `64MiB`, `2GiB` (also `K`/`M`/`G`), as `agentkv serve` reads them.
fn parse_size(s: &str) -> Result<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{s:?} is not a size: write e.g. 512MiB or 2GiB"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => bail!("unknown size unit {other:?}: use KiB, MiB or GiB"),
    };
    n.checked_mul(1 << shift)
        .filter(|&n| n > 0)
        .with_context(|| format!("{s:?} is not a usable size"))
}

pub fn bench(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = parse(args)?;
    let flags = [
        ("--restart-after", RESTART_AFTER),
        ("--users", opts.users),
        ("--rounds", opts.rounds),
        ("--system-tokens", opts.system_tokens),
        ("--history-tokens", opts.history_tokens),
        ("--answer-tokens", opts.answer_tokens),
        ("--max-hot", opts.max_hot),
    ]
    .iter()
    .flat_map(|(flag, n)| [flag.to_string(), n.to_string()])
    .chain(["--max-kv-bytes".into(), opts.max_kv_bytes.to_string()])
    .collect::<Vec<_>>();
    let (stdout, run) = drive("multi_round.py", "multi-round conversations", &flags)?;
    let rounds = rows(&stdout, "ROUND ")?;
    let memory = rows(&stdout, "MEMORY ")?.remove(0);
    let run = Run {
        max_kv_bytes: opts.max_kv_bytes,
        ..run
    };
    let text = summary::report(&run, &opts, &rounds, &memory);
    print!("{text}");
    write_report("serve.md", summary::TITLE, &text)
}

/// Runs the driver `benches/serve/SCRIPT` in the peer's virtualenv (with llama.cpp's server
/// and the openai package) against a fresh build of `agentkv`, on the default model and this
/// machine's threads, with `args` after the common flags; returns its stdout and the [`Run`].
fn drive(script: &str, what: &str, args: &[String]) -> Result<(String, Run)> {
    let model = fetch_model()?;
    let python = server_python()?;
    let root = project_root();
    // What the binary is built from: others may commit while the benchmark runs.
    let built_from = commit(&root);
    let agentkv = Program::build("cli", "--bin", "agentkv")?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let load_before = loadavg();
    let work = dir.join(format!("{}-work", script.trim_end_matches(".py")));
    let script = root.join("benches/serve").join(script);
    eprintln!("==> {what} ({})", script.display());
    let out = Command::new(&python)
        .arg(&script)
        .arg("--agentkv")
        .arg(agentkv.path())
        .arg("--model")
        .arg(&model)
        .arg("--workdir")
        .arg(work)
        .args(["--threads", &threads.to_string()])
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let run = Run::now(threads, built_from, load_before, info_lines(&stdout));
    Ok((stdout, run))
}

/// A driver's `INFO key: value` lines.
fn info_lines(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("INFO "))
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Writes `text` (a section titled `title`) to `target/bench/FILE` and into
/// `target/bench/report.md`.
fn write_report(file: &str, title: &str, text: &str) -> Result<()> {
    let dir = project_root().join("target/bench");
    let path = dir.join(file);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    let path = dir.join("report.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, summary::with_section(&old, title, text))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The peer's Python with llama-cpp-python's `[server]` extra and the openai package installed
/// beside the llama.cpp build (which [`peer_python`] makes first, if needed). The extra is
/// asked for at the version already built, so pip adds its packages and compiles nothing.
fn server_python() -> Result<PathBuf> {
    let python = peer_python()?;
    let out = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('llama-cpp-python'))",
        ])
        .output()
        .context("asking the peer's Python for the llama-cpp-python version")?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || version.is_empty() {
        bail!(
            "llama-cpp-python has no version in {}: delete that virtualenv and run again",
            python.display()
        );
    }
    let server = format!("llama-cpp-python[server]=={version}");
    let stamp = format!("{server} {OPENAI_PACKAGE}");
    let dir = python
        .parent()
        .and_then(Path::parent)
        .context("the peer's Python is not in a virtualenv's bin/")?;
    let venv = Venv {
        dir: dir.to_owned(),
        module: "llama_cpp.server.app, openai",
        stamp: &stamp,
        stamp_file: "agentkv-serve-requirements",
    };
    venv.python(|python| {
        run_step(
            &format!("pip install {server} {OPENAI_PACKAGE}"),
            crate::venv::pip_install(python)
                .args([&server, OPENAI_PACKAGE])
                // Were pip to build llama.cpp after all, the same build as the peer's.
                .env("CMAKE_ARGS", PeerBuild::Native.cmake_args()),
        )
        .with_context(|| {
            format!(
                "installing llama.cpp's server and the openai package into {}: check that PyPI \
                 is reachable",
                dir.display()
            )
        })
    })
}

/// The widest vector instructions the CPU has, as the engine picks its kernels.
fn instruction_set(cpuinfo: &str) -> String {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "flags").then_some(v)
        })
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &str| flags.contains(&f);
    let isa = if has("avx512f") {
        "AVX-512"
    } else if has("avx2") && has("fma") {
        "AVX2+FMA"
    } else if has("avx2") {
        "AVX2"
    } else if flags.is_empty() {
        "instruction set unknown"
    } else {
        "no AVX2"
    };
    match std::env::var("AGENTKV_SIMD") {
        Ok(cap) if !cap.is_empty() => format!("{isa} (agentkv kernels at AGENTKV_SIMD={cap})"),
        _ => isa.to_owned(),
    }
}

/// Where and how the benchmark ran.
struct Run {
    date: String,
    cpu: String,
    cpus: usize,
    isa: String,
    commit: String,
    threads: usize,
    load_before: String,
    load_after: String,
    max_kv_bytes: u64,
    /// The driver's `INFO key: value` lines: versions and command lines.
    info: Vec<(String, String)>,
}

impl Run {
    /// This machine, now, for a run of `threads` threads of programs built from `commit`;
    /// `max_kv_bytes` is 0 until the caller sets the budget its servers ran under.
    fn now(
        threads: usize,
        commit: String,
        load_before: String,
        info: Vec<(String, String)>,
    ) -> Run {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Run {
            date: utc_date(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            ),
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown CPU".into()),
            cpus: logical_cpus(&cpuinfo).unwrap_or(threads),
            isa: instruction_set(&cpuinfo),
            commit,
            threads,
            load_before,
            load_after: loadavg(),
            max_kv_bytes: 0,
            info,
        }
    }

    fn info(&self, key: &str) -> &str {
        self.info
            .iter()
            .find(|(k, _)| k == key)
            .map_or("?", |(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn only_serve_is_taken_out_and_runs_alone() {
        assert!(
            selected(&args("--only resume"), "serve")
                .expect("valid")
                .is_none()
        );
        assert!(selected(&[], "serve").expect("valid").is_none());
        let rest = selected(&args("--users 2 --only serve --rounds 3"), "serve")
            .expect("valid")
            .expect("serve selected");
        assert_eq!(rest, args("--users 2 --rounds 3"));
        assert!(selected(&args("--only serve,engine"), "serve").is_err());
        assert!(
            selected(&args("--only serve"), "hot-agents")
                .expect("valid")
                .is_none()
        );
        let rest = selected(&args("--only hot-agents --agents 4"), "hot-agents")
            .expect("valid")
            .expect("hot-agents selected");
        assert_eq!(rest, args("--agents 4"));
    }

    #[test]
    fn options_and_sizes() {
        let o = parse(&[]).expect("defaults");
        assert_eq!((o.users, o.rounds, o.history_tokens), (4, 4, 2000));
        assert_eq!(o.max_kv_bytes, 512 << 20);
        let o = parse(&args(
            "--users 2 --rounds 3 --history-tokens 200 --max-kv-bytes 1GiB",
        ))
        .expect("valid");
        assert_eq!((o.users, o.rounds, o.history_tokens), (2, 3, 200));
        assert_eq!(o.max_kv_bytes, 1 << 30);
        assert!(
            parse(&args("--rounds 2")).is_err(),
            "no round after the restart"
        );
        assert!(parse(&args("--users 0")).is_err());
        assert!(parse(&args("--users many")).is_err());
        assert!(parse(&args("--users")).is_err());
        let unknown = parse(&args("--users 2 --peer"))
            .err()
            .expect("unknown flag");
        assert!(format!("{unknown}").contains("unknown argument \"--peer\""));
        assert_eq!(parse_size("1000").expect("bytes"), 1000);
        assert_eq!(parse_size("64M").expect("MiB"), 64 << 20);
        assert!(parse_size("0").is_err());
        assert!(parse_size("5TB").is_err());
    }
}
