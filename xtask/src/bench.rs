//! `cargo xtask bench`: the criterion benchmarks; the engine's end-to-end speed (`bench_speed`
//! example) and, with `--peer llama.cpp`, llama.cpp on the same GGUF and thread count, side by
//! side with the ratios (stdout and `target/bench/engine.md`); and the resume benchmark
//! (`resume` binary of agentkv-benches: time to first token resumed from the saved cache, page
//! cache warm and cold, against re-prefilling the history), with a chart; and, when asked for,
//! what a lower-precision KV cache costs in quality, against llama.cpp's. Everything measured
//! goes to `target/bench/report.md`, which names the commit the programs were built from: each
//! is built once before anything runs, and run from a copy of its executable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use plotters::style::RGBColor;

use crate::chart::{self, Series};
use crate::report::{self, Machine};
use crate::venv::Venv;
use crate::{MODELS, ModelSource, SMOLLM2, cargo, fetch, project_root, run_step};

mod engine;
mod kv_quality;
mod serve;
mod store;

const USAGE: &str = "\
usage: cargo xtask bench [--only criterion|engine|resume|kv-quality|store[,...]|serve|hot-agents]
                         [--no-criterion] [--no-engine] [--no-resume] [--model NAME]
                         [--requantize TYPE] [--peer llama.cpp]
                         [--histories 512,2048,4096]
                         [--decode 32] [--repeats 3] [--resume-histories 256,1024,2048,4096]
                         [--resume-repeats 3] [--text PATH] [--chat PATH]
                         [-- <criterion args>]

  --model    the model every part runs: a name `cargo xtask fetch-model` knows (smollm2,
             the default, or gemma3-270m), fetched first if need be
  --requantize  run on the model requantized to TYPE (q4_k_m, q6_k, q8_0, ...) by llama.cpp's
             own quantizer in target/peer-venv (made once, in target/bench/models)
  criterion  kv-store vs plain file I/O, and each GGUF block type's matmul against Q4_1
             (cargo bench -p agentkv-benches --bench kv_store --bench quant)
  engine     prefill / decode tok/s, resume and re-prefill TTFT at --histories (bench_speed),
             --repeats runs (at least 3; median, min, max; each run's resume the median of
             5, on both sides); with --peer, llama.cpp's runs
             (flash attention off and on, the faster kept per figure) alternate with ours;
             table in target/bench/engine.md. llama.cpp is built for this CPU
             (target/peer-venv), or with AGENTKV_SIMD=avx2 for an AVX2-only CPU
             (target/peer-venv-avx2), as the engine then runs
  resume     time to first token of a 16-token turn at --resume-histories: re-prefill vs
             resume from the saved cache, page cache warm and cold; save ms, bytes/token;
             chart in target/bench/resume.png. Several minutes on two cores: each history
             is prefilled twice (to build the saved agent, and as the re-prefill baseline)
  kv-quality only when --only names it: what an f16 or q8_0 KV cache costs against f32 (the
             engine's kv_quality example) and llama.cpp's q8_0 against its f16 (peer
             script, target/peer-venv) on the first 4096 tokens of --text (default
             /usr/share/common-licenses/GPL-3) and on the conversations of --chat
             (default the demo's, crates/cli/src/demo_conversations.json; not with a
             model without a chat template), the same token ids on both sides: KL of the
             next-token distributions, top-1 agreement, greedy agreement after a save and
             load at each cut; tables in target/bench/kv-quality.md. About 8 minutes on
             two cores
  store      only when --only names it: the remote tier on a 3-node Garage cluster (installed
             as for `cargo xtask ci`) against plain object_store PUT and GET of the same
             bytes, segments of a SmolLM2-shaped f16 cache at --histories (default here
             1024,4096,16384), --repeats alternated runs; and the bytes 20 agents sharing a
             system prompt store against the ideal; table in target/bench/store.md
  serve      multi-round conversations against agentkv serve and llama.cpp's server, both
             restarted mid-way; runs alone (`cargo xtask bench --only serve --help`)
  hot-agents how many agents agentkv serve keeps hot under one --max-kv-bytes in each KV
             dtype; runs alone (`cargo xtask bench --only hot-agents --help`)
  Everything that ran is summarized in target/bench/report.md.";

/// The figures one bench reports for one history length.
pub type Row = BTreeMap<String, f64>;

struct Options {
    model: &'static ModelSource,
    /// The llama.cpp file type to requantize the model to first.
    requantize: Option<String>,
    peer: bool,
    histories: String,
    decode: String,
    /// Runs of each side of the engine bench.
    repeats: usize,
    criterion: bool,
    engine: bool,
    resume: bool,
    /// The KV cache quality comparison: never part of the default set, it needs the llama.cpp
    /// peer (a ~15-minute build on first use).
    kv_quality: bool,
    /// kv-quality's held-out text.
    text: Option<PathBuf>,
    /// kv-quality's conversations.
    chat: Option<PathBuf>,
    /// The remote tier against plain object_store: never part of the default set, it needs
    /// Garage (a ~17-minute build on first use).
    store: bool,
    /// Whether --histories was given (the store bench has its own default).
    histories_given: bool,
    resume_histories: String,
    resume_repeats: String,
    criterion_args: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        model: &SMOLLM2,
        requantize: None,
        peer: false,
        histories: "512,2048,4096".into(),
        decode: "32".into(),
        repeats: 3,
        criterion: true,
        engine: true,
        resume: true,
        kv_quality: false,
        text: None,
        chat: None,
        store: false,
        histories_given: false,
        resume_histories: "256,1024,2048,4096".into(),
        resume_repeats: "3".into(),
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
            "--model" => {
                let name = value("--model")?;
                o.model = MODELS
                    .into_iter()
                    .find(|m| m.name == name)
                    .with_context(|| {
                        let known: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
                        format!(
                            "--model takes {}, not {name:?}\n{USAGE}",
                            known.join(" or ")
                        )
                    })?;
            }
            "--requantize" => o.requantize = Some(value("--requantize")?),
            "--histories" => {
                o.histories = value("--histories")?;
                o.histories_given = true;
            }
            "--decode" => o.decode = value("--decode")?,
            "--repeats" => {
                let v = value("--repeats")?;
                o.repeats = v
                    .parse()
                    .with_context(|| format!("--repeats takes a number, not {v:?}\n{USAGE}"))?;
                engine::check_repeats(o.repeats)?;
            }
            "--resume-histories" => o.resume_histories = value("--resume-histories")?,
            "--resume-repeats" => o.resume_repeats = value("--resume-repeats")?,
            "--text" => o.text = Some(PathBuf::from(value("--text")?)),
            "--chat" => o.chat = Some(PathBuf::from(value("--chat")?)),
            "--no-criterion" => o.criterion = false,
            "--no-engine" => o.engine = false,
            "--no-resume" => o.resume = false,
            "--only" => {
                let only = value("--only")?;
                (o.criterion, o.engine, o.resume, o.kv_quality, o.store) =
                    (false, false, false, false, false);
                for part in only.split(',') {
                    match part.trim() {
                        "criterion" => o.criterion = true,
                        "engine" => o.engine = true,
                        "resume" => o.resume = true,
                        "kv-quality" => o.kv_quality = true,
                        "store" => o.store = true,
                        other => bail!(
                            "--only takes criterion, engine, resume, kv-quality or store (comma-separated), not {other:?}\n{USAGE}"
                        ),
                    }
                }
            }
            "--" => o.criterion_args.extend(it.by_ref().cloned()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.peer && !o.engine {
        bail!("--peer llama.cpp compares engine speed: it needs the engine bench\n{USAGE}");
    }
    if o.text.is_some() && !o.kv_quality {
        bail!("--text is kv-quality's held-out text: it needs --only kv-quality\n{USAGE}");
    }
    if o.chat.is_some() && !o.kv_quality {
        bail!("--chat is kv-quality's conversations: it needs --only kv-quality\n{USAGE}");
    }
    if o.chat.is_some() && !o.model.chat {
        bail!(
            "--chat renders conversations through the chat template, and {} is a base model \
             without one: leave --chat out (kv-quality then measures the text alone)\n{USAGE}",
            o.model.name
        );
    }
    if !o.model.chat && o.resume {
        // The resume benchmark runs agents' conversations through the chat template.
        if only_resume(args) {
            bail!(
                "the resume benchmark needs a chat model; {} is a base model: use \
                 --only engine\n{USAGE}",
                o.model.name
            );
        }
        eprintln!(
            "note: {} has no chat template: the resume benchmark (agents' conversations) is skipped",
            o.model.name
        );
        o.resume = false;
    }
    if !(o.criterion || o.engine || o.resume || o.kv_quality || o.store) {
        bail!("nothing to run\n{USAGE}");
    }
    Ok(o)
}

/// Whether `--only` names the resume benchmark.
fn only_resume(args: &[String]) -> bool {
    args.windows(2)
        .any(|w| w[0] == "--only" && w[1].split(',').any(|p| p.trim() == "resume"))
}

pub fn bench(args: &[String]) -> Result<()> {
    if let Some(rest) = serve::selected(args, "serve")? {
        return serve::bench(&rest);
    }
    if let Some(rest) = serve::selected(args, "hot-agents")? {
        return serve::hot_agents(&rest);
    }
    let ours = args.iter().take_while(|a| *a != "--");
    if ours.into_iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = parse(args)?;
    let held_out = opts
        .text
        .clone()
        .unwrap_or_else(|| PathBuf::from(kv_quality::DEFAULT_TEXT));
    // A base model has no chat template to render conversations with.
    let conversations = opts.model.chat.then(|| {
        opts.chat
            .clone()
            .unwrap_or_else(|| project_root().join(kv_quality::DEMO_CONVERSATIONS))
    });
    if opts.kv_quality {
        // Before the other parts run for minutes.
        kv_quality::check_inputs(&held_out, conversations.as_deref())?;
        if conversations.is_none() {
            eprintln!(
                "note: {} has no chat template: kv-quality measures the held-out text alone",
                opts.model.name
            );
        }
    }
    let mut model = fetch(opts.model)?;
    if let Some(kind) = &opts.requantize {
        model = requantize(&model, kind)?;
    }
    let load_before = loadavg();
    if opts.criterion {
        run_step(
            "criterion benches",
            cargo()
                .args(["bench", "-p", "agentkv-benches"])
                .args(["--bench", "kv_store", "--bench", "quant", "--"])
                .args(&opts.criterion_args),
        )?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = project_root().join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Every program is built before anything runs, so the whole report measures one build.
    let built_from = report::commit(&project_root());
    let engine_programs = if opts.engine {
        Some((
            Program::build("engine", "--example", "machine")?,
            Program::build("engine", "--example", "bench_speed")?,
        ))
    } else {
        None
    };
    let resume_program = if opts.resume {
        Some(Program::build("agentkv-benches", "--bin", "resume")?)
    } else {
        None
    };
    let kv_quality_program = if opts.kv_quality {
        Some(Program::build("engine", "--example", "kv_quality")?)
    } else {
        None
    };

    let engine_table = match &engine_programs {
        Some(programs) => Some(engine::run(
            &opts,
            &model,
            threads,
            programs,
            &load_before,
            &built_from,
            &dir,
        )?),
        None => None,
    };

    let resume = if let Some(program) = &resume_program {
        eprintln!("==> resume vs re-prefill");
        let mut cmd = program.command();
        cmd.args([
            "--histories",
            &opts.resume_histories,
            "--repeats",
            &opts.resume_repeats,
            "--model",
        ])
        .arg(&model)
        .arg("--workdir")
        .arg(dir.join("resume-work"))
        .env("RAYON_NUM_THREADS", threads.to_string());
        Some(run_for_rows(&mut cmd, "the resume benchmark", "RESUME ")?)
    } else {
        None
    };
    let kv_quality_table = match &kv_quality_program {
        Some(program) => Some(kv_quality::run(
            &held_out,
            conversations.as_deref(),
            &model,
            threads,
            program,
            &load_before,
            &built_from,
            &dir,
        )?),
        None => None,
    };
    let store_table = if opts.store {
        let histories = if opts.histories_given {
            opts.histories.as_str()
        } else {
            "1024,4096,16384"
        };
        Some(store::run(histories, opts.repeats.max(3), &dir)?)
    } else {
        None
    };
    let load_after = loadavg();
    let engine_threads = resume
        .as_ref()
        .and_then(|r| r.first())
        .and_then(|r| r.get("threads"))
        .map_or(threads, |&t| t as usize);
    let machine = Machine::current(engine_threads, load_before, load_after, &built_from);

    let chart_path = dir.join("resume.png");
    let chart = match &resume {
        Some(rows) => resume_chart(rows, &machine, &chart_path),
        None => Ok(()),
    };
    let chart_error = chart.as_ref().err().map(|e| format!("{e:#}"));
    let chart_link = match &chart_error {
        None => Ok("resume.png"),
        Some(e) => Err(e.as_str()),
    };
    let sections: Vec<&str> = [
        engine_table.as_deref(),
        kv_quality_table.as_deref(),
        store_table.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let text = report::report(&machine, resume.as_deref(), chart_link, &sections);
    print!("{text}");
    let path = dir.join("report.md");
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    if resume.is_some() {
        chart.context("drawing the resume chart (report.md was written without it)")?;
        eprintln!("wrote {}", chart_path.display());
    }
    Ok(())
}

/// The chart of TTFT against history length for re-prefill, warm and cold resume.
fn resume_chart(rows: &[Row], machine: &Machine, path: &Path) -> Result<()> {
    let line = |label: &str, key: &str, color: RGBColor| Series {
        label: label.to_owned(),
        color,
        // Warm is usually just under cold: its values go below the line, cold's above.
        values_below: key == "warm_ttft_ms",
        points: rows
            .iter()
            .map(|r| {
                let get = |k: &str| r.get(k).copied().unwrap_or(f64::NAN);
                (get("history"), get(key))
            })
            .collect(),
    };
    let turn = rows
        .first()
        .and_then(|r| r.get("turn_tokens"))
        .copied()
        .unwrap_or(f64::NAN);
    let series = [
        line(
            "(a) re-prefill the history",
            "reprefill_ttft_ms",
            RGBColor(214, 39, 40),
        ),
        line(
            "(b) resume, page cache warm",
            "warm_ttft_ms",
            RGBColor(31, 119, 180),
        ),
        line(
            "(c) resume, page cache cold",
            "cold_ttft_ms",
            RGBColor(44, 160, 44),
        ),
    ];
    let title = format!(
        "Time to first token of a {turn:.0}-token turn ({}, {} threads)",
        machine.cpu, machine.threads
    );
    chart::write_png(path, &title, &series)
}

/// `/proc/loadavg`'s three averages, or "unknown": the machine is shared, so every table
/// says how busy it was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// `model` requantized to `kind` by llama.cpp's quantizer (`benches/peer/requantize.py` in the
/// peer's virtualenv), made once in `target/bench/models`.
fn requantize(model: &Path, kind: &str) -> Result<PathBuf> {
    let stem = model
        .file_stem()
        .and_then(|s| s.to_str())
        .context("the model file has no name")?;
    // SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct.requantized-q4_k_m.gguf
    let base = stem.rsplit_once('.').map_or(stem, |(b, _)| b);
    let dir = project_root().join("target/bench/models");
    let out = dir.join(format!("{base}.requantized-{kind}.gguf"));
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let python = peer_python()?;
    run_step(
        &format!("requantize {} to {kind}", model.display()),
        Command::new(python)
            .arg(project_root().join("benches/peer/requantize.py"))
            .arg(model)
            .arg(&out)
            .arg(kind),
    )?;
    eprintln!("requantized to {}", out.display());
    Ok(out)
}

/// How llama.cpp is built for the peer: native code for this CPU, or code for a CPU with AVX2
/// and FMA only (the engine bench's build when the engine is forced to AVX2 on a CPU that has
/// more: llama.cpp on an AVX2-only CPU runs its AVX2 code, not AVX-512 and VNNI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PeerBuild {
    Native,
    Avx2,
}

impl PeerBuild {
    /// The build the engine bench compares with: [`PeerBuild::Avx2`] when `AGENTKV_SIMD`
    /// (`simd`) forces the engine to AVX2, so both sides run what an AVX2-only CPU would.
    fn for_engine(simd: Option<&str>) -> PeerBuild {
        match simd {
            Some("avx2") => PeerBuild::Avx2,
            _ => PeerBuild::Native,
        }
    }

    /// The `CMAKE_ARGS` llama-cpp-python is built with.
    ///
    /// Native: everything `-march=native` gives (AVX-512, VNNI, ...) except the AMX
    /// instructions. llama.cpp's AMX matmul (ggml-cpu/amx, llama-cpp-python 0.3.36) dies of
    /// SIGILL at its first `tileloadd` on a Xeon with amx_int8, even with the tile state
    /// granted by arch_prctl: its tile configuration is built on the stack and optimized away
    /// (llama.cpp PR #26954, open).
    ///
    /// AVX2: what an AMD EPYC of the Zen 2 and Zen 3 generations has (SSE4.2, AVX, AVX2, FMA,
    /// F16C, BMI2), and nothing newer: no AVX-VNNI, no AVX-512.
    pub(crate) fn cmake_args(self) -> &'static str {
        match self {
            PeerBuild::Native => {
                "-DGGML_NATIVE=ON \
                 -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
                 -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
            }
            PeerBuild::Avx2 => {
                "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON \
                 -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF \
                 -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
                 -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
                 -DGGML_AMX_BF16=OFF"
            }
        }
    }

    /// Its virtualenv, under `target/`.
    fn venv(self) -> &'static str {
        match self {
            PeerBuild::Native => "target/peer-venv",
            PeerBuild::Avx2 => "target/peer-venv-avx2",
        }
    }

    /// How the report names it.
    fn describe(self) -> &'static str {
        match self {
            PeerBuild::Native => "built for this CPU (GGML_NATIVE, without AMX)",
            PeerBuild::Avx2 => {
                "built for an AVX2-only CPU (SSE4.2, AVX, AVX2, FMA, F16C, BMI2; no AVX-512, no VNNI)"
            }
        }
    }
}

/// The Python of `target/peer-venv` (llama.cpp built for this CPU), installing it first if
/// needed; see [`peer_python_for`].
fn peer_python() -> Result<PathBuf> {
    peer_python_for(PeerBuild::Native)
}

/// The Python of `build`'s virtualenv, installing llama-cpp-python there first if needed: when
/// it is missing, or was built with other flags than `build`'s (recorded beside it).
fn peer_python_for(build: PeerBuild) -> Result<PathBuf> {
    let venv = Venv {
        dir: project_root().join(build.venv()),
        module: "llama_cpp",
        stamp: build.cmake_args(),
        stamp_file: "agentkv-cmake-args",
    };
    venv.python(|python| {
        eprintln!(
            "installing llama-cpp-python into {} (it compiles llama.cpp: about 15 minutes on 2 cores)",
            venv.dir.display()
        );
        // --no-cache-dir: pip would otherwise reuse a wheel it built earlier with other flags.
        run_step(
            "pip install llama-cpp-python",
            Command::new(python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir"])
                .args(["--force-reinstall", "--no-deps", "llama-cpp-python"])
                .env("CMAKE_ARGS", build.cmake_args()),
        )
        .context("installing the llama.cpp peer: check that PyPI is reachable and a C++ compiler and cmake are installed")?;
        // --no-deps above keeps an installed numpy; a new venv still needs llama_cpp's
        // dependencies.
        run_step(
            "pip install the peer's dependencies",
            Command::new(python).args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "llama-cpp-python",
            ]),
        )
    })
}

/// Runs a bench program with its stderr shown, and parses the `{prefix}{json}` lines of its
/// stdout; a failure to start or a non-zero exit is an error naming `what`.
fn run_for_rows(cmd: &mut Command, what: &str, prefix: &str) -> Result<Vec<Row>> {
    rows(&run_for_output(cmd, what)?, prefix)
}

/// Runs a bench program with its stderr shown and returns its stdout; a failure to start or a
/// non-zero exit is an error naming `what`.
fn run_for_output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bench program built once before a benchmark's runs, and run from a copy of its
/// executable: every run of a report measures the same build, however the tree or
/// `target/release` change while it runs (an edit there would otherwise be rebuilt into the
/// next `cargo run`, and a report would silently mix two versions).
pub(crate) struct Program {
    exe: PathBuf,
}

impl Program {
    /// Builds `name` (`kind`: `--bin` or `--example`) of `package` in release mode and copies
    /// its executable to `target/bench/bin/`.
    pub(crate) fn build(package: &str, kind: &str, name: &str) -> Result<Program> {
        let out = cargo()
            .args(["build", "--release", "--quiet", "-p", package, kind, name])
            .arg("--message-format=json-render-diagnostics")
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("building {name}"))?;
        if !out.status.success() {
            bail!(
                "building {name} failed ({}): cargo says why above",
                out.status
            );
        }
        let built = executable(&String::from_utf8_lossy(&out.stdout), name)
            .with_context(|| format!("cargo built {name} but named no executable for it"))?;
        let dir = project_root().join("target/bench/bin");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let exe = dir.join(name);
        // Removed first: a copy onto a running executable fails, a new file does not.
        let _ = std::fs::remove_file(&exe);
        std::fs::copy(&built, &exe)
            .with_context(|| format!("copying {} to {}", built.display(), exe.display()))?;
        Ok(Program { exe })
    }

    /// A command running the program.
    pub(crate) fn command(&self) -> Command {
        Command::new(&self.exe)
    }

    /// The copy of its executable that runs.
    pub(crate) fn path(&self) -> &Path {
        &self.exe
    }
}

/// The executable cargo's JSON messages (`--message-format=json`) name for the target `name`.
fn executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
            .then(|| v["executable"].as_str().map(PathBuf::from))
            .flatten()
    })
}

/// The `INFO key: value` lines of a bench's stdout.
fn infos(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("INFO "))
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
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

/// `{"a": 1, "b": 2.5, "c": "x"}` → `{a: 1, b: 2.5}`: the figures of one flat JSON object.
/// Values that are not numbers (a label such as the KV dtype) are not figures and are left
/// out; the benches print what they ran with on `INFO` lines.
fn parse_flat_json(s: &str) -> Result<Row> {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(s.trim()).with_context(|| format!("not a JSON object: {s}"))?;
    Ok(object
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.as_f64()?)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_runs_avx2_code_when_the_engine_is_forced_to_avx2() {
        assert_eq!(PeerBuild::for_engine(Some("avx2")), PeerBuild::Avx2);
        for simd in [None, Some(""), Some("avx512"), Some("portable")] {
            assert_eq!(PeerBuild::for_engine(simd), PeerBuild::Native, "{simd:?}");
        }
        let avx2 = PeerBuild::Avx2.cmake_args();
        assert!(avx2.contains("-DGGML_NATIVE=OFF") && avx2.contains("-DGGML_AVX2=ON"));
        assert!(avx2.contains("-DGGML_AVX512=OFF") && avx2.contains("-DGGML_AVX_VNNI=OFF"));
        // The stamp of an existing native build stays valid (no 15-minute rebuild).
        assert_eq!(
            PeerBuild::Native.cmake_args(),
            "-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
             -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
        );
        assert_ne!(PeerBuild::Native.venv(), PeerBuild::Avx2.venv());
    }

    #[test]
    fn store_runs_only_when_named() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert!(!parse(&args("")).expect("valid").store);
        let o = parse(&args("--only store")).expect("valid");
        assert!(o.store && !o.criterion && !o.engine && !o.resume && !o.histories_given);
        let o = parse(&args("--only store --histories 1024")).expect("valid");
        assert!(o.store && o.histories_given);
    }

    #[test]
    fn the_built_executable_is_read_from_cargos_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"engine"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"machine"},"#,
            r#""executable":"/t/release/examples/machine"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            executable(messages, "machine"),
            Some(PathBuf::from("/t/release/examples/machine"))
        );
        assert_eq!(executable(messages, "engine"), None);
        assert_eq!(executable(messages, "bench_speed"), None);
    }

    #[test]
    fn flat_json_lines_parse() {
        let r = parse_flat_json(r#"{"history": 512, "prefill_tok_s": 301.5, "x": 1e3}"#)
            .expect("valid");
        assert_eq!(r["history"], 512.0);
        assert_eq!(r["prefill_tok_s"], 301.5);
        assert_eq!(r["x"], 1000.0);
        assert!(parse_flat_json("[1]").is_err());
        assert!(parse_flat_json("{\"a\": 1").is_err());
        let labelled =
            parse_flat_json(r#"{"kv_dtype": "f16", "decode_tok_s": 60}"#).expect("valid");
        assert_eq!(labelled.len(), 1);
        assert_eq!(labelled["decode_tok_s"], 60.0);
        let out = "noise\nINFO isa: avx2\nENGINE {\"history\":1}\nINFO flags: a=1 b: 2\n";
        let rs = rows(out, "ENGINE ").expect("one row");
        assert_eq!(rs.len(), 1);
        let info = infos(out);
        assert_eq!(info["isa"], "avx2");
        assert_eq!(info["flags"], "a=1 b: 2");
    }

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn options_select_what_runs() {
        let o = parse(&[]).expect("defaults");
        assert!(o.criterion && o.engine && o.resume && !o.peer);
        assert_eq!(o.resume_histories, "256,1024,2048,4096");

        let o = parse(&args("--only resume --resume-histories 256,1024")).expect("valid");
        assert!(!o.criterion && !o.engine && o.resume);
        assert_eq!(o.resume_histories, "256,1024");

        let o = parse(&args("--no-criterion --no-engine --resume-repeats 5")).expect("valid");
        assert!(!o.criterion && !o.engine && o.resume);
        assert_eq!(o.resume_repeats, "5");

        let o = parse(&args("--only engine,criterion -- --quick")).expect("valid");
        assert!(o.criterion && o.engine && !o.resume);
        assert_eq!(o.criterion_args, ["--quick"]);

        assert!(parse(&args("--only speed")).is_err());
        assert!(parse(&args("--no-criterion --no-engine --no-resume")).is_err());
        assert!(parse(&args("--only resume --peer llama.cpp")).is_err());
        assert!(parse(&args("--resume-histories")).is_err());
        assert_eq!(parse(&args("--repeats 5")).expect("valid").repeats, 5);
        assert!(parse(&args("--repeats 2")).is_err());
        assert!(parse(&args("--repeats x")).is_err());
    }

    #[test]
    fn kv_quality_runs_only_when_named() {
        let o = parse(&[]).expect("defaults");
        assert!(!o.kv_quality && o.text.is_none());

        let o = parse(&args("--only kv-quality")).expect("valid");
        assert!(o.kv_quality && !o.criterion && !o.engine && !o.resume);
        assert!(o.text.is_none());

        let o = parse(&args("--only resume,kv-quality --text /tmp/held-out.txt")).expect("valid");
        assert!(o.kv_quality && o.resume && !o.criterion && !o.engine);
        assert_eq!(o.text.as_deref(), Some(Path::new("/tmp/held-out.txt")));

        // --text belongs to kv-quality; kv-quality does not make --peer's engine bench run.
        assert!(parse(&args("--text /tmp/held-out.txt")).is_err());
        assert!(parse(&args("--only resume --text /tmp/held-out.txt")).is_err());
        assert!(parse(&args("--only kv-quality --text")).is_err());
        // --chat too, and only with a model that has a chat template.
        let o = parse(&args("--only kv-quality --chat /tmp/chats.json")).expect("valid");
        assert_eq!(o.chat.as_deref(), Some(Path::new("/tmp/chats.json")));
        assert!(
            parse(&args("--only kv-quality"))
                .expect("valid")
                .chat
                .is_none()
        );
        assert!(parse(&args("--chat /tmp/chats.json")).is_err());
        match parse(&args(
            "--only kv-quality --model gemma3-270m --chat /tmp/c.json",
        )) {
            Err(err) => assert!(format!("{err:#}").contains("leave --chat out"), "{err:#}"),
            Ok(_) => panic!("--chat with a base model was accepted"),
        }
        assert!(parse(&args("--only kv-quality --model gemma3-270m")).is_ok());
        assert!(parse(&args("--only kv-quality --peer llama.cpp")).is_err());
        assert!(parse(&args("--only kv_quality")).is_err());
    }
}
