//! `cargo xtask bench`: the criterion benchmarks, then the engine's end-to-end speed
//! (`bench_speed` example) and, with `--peer llama.cpp`, llama.cpp on the same GGUF and thread
//! count, side by side with the ratios. The table goes to stdout and `target/bench/engine.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, fetch_model, project_root, run_step};

const USAGE: &str = "\
usage: cargo xtask bench [--peer llama.cpp] [--histories 512,2048,4096] [--decode 32]
                         [--no-criterion] [-- <criterion args>]";

/// The figures one engine reports for one history length.
type Row = BTreeMap<String, f64>;

struct Options {
    peer: bool,
    histories: String,
    decode: String,
    criterion: bool,
    criterion_args: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        peer: false,
        histories: "512,2048,4096".into(),
        decode: "32".into(),
        criterion: true,
        criterion_args: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--peer" => {
                let p = value("--peer")?;
                if p != "llama.cpp" {
                    bail!("unknown peer {p:?}: the only peer is llama.cpp\n{USAGE}");
                }
                o.peer = true;
            }
            "--histories" => o.histories = value("--histories")?,
            "--decode" => o.decode = value("--decode")?,
            "--no-criterion" => o.criterion = false,
            "--" => o.criterion_args.extend(it.by_ref().cloned()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

pub fn bench(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let model = fetch_model()?;
    let load_before = loadavg();
    if opts.criterion {
        run_step(
            "criterion benches",
            cargo()
                .args(["bench", "-p", "agentkv-benches", "--"])
                .args(&opts.criterion_args),
        )?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    eprintln!("==> engine speed");
    let out = cargo()
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "engine",
            "--example",
            "bench_speed",
            "--",
            "--histories",
            &opts.histories,
            "--decode",
            &opts.decode,
            "--model",
        ])
        .arg(&model)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the bench_speed example")?;
    if !out.status.success() {
        bail!("bench_speed failed ({})", out.status);
    }
    let ours = rows(&String::from_utf8_lossy(&out.stdout), "ENGINE ")?;

    let peer = if opts.peer {
        let python = peer_python()?;
        eprintln!("==> llama.cpp peer");
        let script = project_root().join("benches/peer/llama_cpp_peer.py");
        let workdir = project_root().join("target/bench");
        std::fs::create_dir_all(&workdir)?;
        let out = Command::new(&python)
            .arg(&script)
            .arg(&model)
            .args(["--threads", &threads.to_string()])
            .args(["--histories", &opts.histories, "--decode", &opts.decode])
            .arg("--workdir")
            .arg(&workdir)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!("the llama.cpp peer failed ({})", out.status);
        }
        Some(rows(&String::from_utf8_lossy(&out.stdout), "PEER ")?)
    } else {
        None
    };
    let load_after = loadavg();

    let table = report(&ours, peer.as_ref(), threads, &load_before, &load_after);
    print!("{table}");
    let dir = project_root().join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("engine.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// `/proc/loadavg`'s three averages, or "unknown": the machine is shared, so every table
/// says how busy it was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The Python of `target/peer-venv`, installing llama-cpp-python there first if needed.
fn peer_python() -> Result<PathBuf> {
    let venv = project_root().join("target/peer-venv");
    let python = venv.join("bin/python");
    let importable = |p: &Path| {
        Command::new(p)
            .args(["-c", "import llama_cpp"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if python.exists() && importable(&python) {
        return Ok(python);
    }
    if !python.exists() {
        run_step(
            "create the peer virtualenv",
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
        )
        .context("creating target/peer-venv: install Python 3 with the venv module")?;
    }
    eprintln!(
        "installing llama-cpp-python into {} (it compiles llama.cpp: about 15 minutes on 2 cores)",
        venv.display()
    );
    run_step(
        "pip install llama-cpp-python",
        Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "llama-cpp-python"])
            .env("CMAKE_ARGS", "-DGGML_NATIVE=ON"),
    )
    .context("installing the llama.cpp peer: check that PyPI is reachable and a C++ compiler and cmake are installed")?;
    if !importable(&python) {
        bail!(
            "llama-cpp-python installed but `import llama_cpp` fails in {}",
            venv.display()
        );
    }
    Ok(python)
}

/// Parses the `{prefix}{flat json object of numbers}` lines of a bench's stdout.
fn rows(stdout: &str, prefix: &str) -> Result<Vec<Row>> {
    let rows: Vec<Row> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(parse_flat_json)
        .collect::<Result<_>>()?;
    if rows.is_empty() {
        bail!("no {prefix:?} lines in the bench output:\n{stdout}");
    }
    Ok(rows)
}

/// `{"a": 1, "b": 2.5}` → map. Only what the two bench scripts print: one flat object whose
/// values are numbers (xtask stays free of a JSON dependency).
fn parse_flat_json(s: &str) -> Result<Row> {
    let body = s
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .with_context(|| format!("not a JSON object: {s}"))?;
    body.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once(':')
                .with_context(|| format!("no ':' in {kv:?}"))?;
            let v: f64 = v
                .trim()
                .parse()
                .with_context(|| format!("{kv:?} is not a number"))?;
            Ok((k.trim().trim_matches('"').to_owned(), v))
        })
        .collect()
}

fn report(
    ours: &[Row],
    peer: Option<&Vec<Row>>,
    threads: usize,
    load_before: &str,
    load_after: &str,
) -> String {
    let get = |r: &Row, k: &str| r.get(k).copied().unwrap_or(f64::NAN);
    let mut s = String::new();
    let _ = writeln!(s, "# Engine speed\n");
    let _ = writeln!(
        s,
        "{threads} threads; load average before {load_before}, after {load_after}; weights in memory {:.1} MiB.\n",
        ours.first().map_or(f64::NAN, |r| get(r, "weight_bytes")) / (1 << 20) as f64
    );
    let _ = writeln!(
        s,
        "Resume = load the history's f16 cache through kv-store (page cache) + a 16-token turn; \
         re-prefill = history + turn from an empty cache.\n"
    );
    match peer {
        None => {
            let _ = writeln!(
                s,
                "| history | prefill tok/s | decode tok/s | resume TTFT ms | re-prefill TTFT ms |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|");
            for r in ours {
                let _ = writeln!(
                    s,
                    "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    get(r, "history"),
                    get(r, "prefill_tok_s"),
                    get(r, "decode_tok_s"),
                    get(r, "resume_ttft_ms"),
                    get(r, "reprefill_ttft_ms"),
                );
            }
        }
        Some(peer) => {
            let _ = writeln!(
                s,
                "| history | figure | agentkv | llama.cpp | ratio | target |\n|---|---|---|---|---|---|"
            );
            for r in ours {
                let n = get(r, "history");
                let Some(p) = peer.iter().find(|p| get(p, "history") == n) else {
                    continue;
                };
                let figures = [
                    ("prefill tok/s", "prefill_tok_s", ">= 1.0x at 512, 2048"),
                    ("decode tok/s", "decode_tok_s", ">= 1.0x at 512, 2048"),
                    ("resume TTFT ms", "resume_ttft_ms", "<= 0.5x at 2048"),
                    ("re-prefill TTFT ms", "reprefill_ttft_ms", ""),
                ];
                for (label, key, target) in figures {
                    let (a, b) = (get(r, key), get(p, key));
                    let _ = writeln!(
                        s,
                        "| {n} | {label} | {a:.1} | {b:.1} | {:.2}x | {target} |",
                        a / b
                    );
                }
            }
            let _ = writeln!(
                s,
                "\nRatios are agentkv / llama.cpp: above 1 is faster for tok/s, below 1 is faster for TTFT."
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_json_lines_parse() {
        let r = parse_flat_json(r#"{"history": 512, "prefill_tok_s": 301.5, "x": 1e3}"#)
            .expect("valid");
        assert_eq!(r["history"], 512.0);
        assert_eq!(r["prefill_tok_s"], 301.5);
        assert_eq!(r["x"], 1000.0);
        assert!(parse_flat_json("[1]").is_err());
        assert!(parse_flat_json(r#"{"a": "b"}"#).is_err());
        let rs = rows("noise\nENGINE {\"history\":1}\n", "ENGINE ").expect("one row");
        assert_eq!(rs.len(), 1);
    }
}
