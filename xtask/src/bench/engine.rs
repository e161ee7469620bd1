//! The engine's speed, alone or against llama.cpp's: `bench_speed` and the peer script each run
//! `--repeats` times, alternately (ours, llama.cpp with flash attention off, on; ours, on, off;
//! ...), so that drift on a shared host hits both sides alike. Every figure is reported as the
//! median of its runs with the min and max; a ratio is the two medians' and carries the range
//! from the least to the most favourable pairing of the two sides' extremes; a ratio whose
//! range crosses 1.0 or its target is unsettled, not met.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Options, PeerBuild, Program, Row, loadavg, peer_python_for, run_for_output};
use crate::project_root;
use crate::report::Machine;

/// What one side printed over all its runs.
#[derive(Default)]
pub(super) struct Side {
    /// One entry per run: that run's rows, one per history.
    pub runs: Vec<Vec<Row>>,
    /// The `INFO key: value` lines of its first run.
    pub info: BTreeMap<String, String>,
}

impl Side {
    fn push(&mut self, stdout: &str, prefix: &str) -> Result<()> {
        if self.info.is_empty() {
            self.info = super::infos(stdout);
        }
        self.runs.push(super::rows(stdout, prefix)?);
        Ok(())
    }

    /// Every run's value of `key` at `history` (runs that lack it are left out).
    fn samples(&self, history: f64, key: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|run| run.iter().find(|r| r.get("history") == Some(&history)))
            .filter_map(|r| r.get(key).copied())
            .filter(|v| v.is_finite())
            .collect()
    }

    /// The history lengths of the first run, in order.
    fn histories(&self) -> Vec<f64> {
        self.runs.first().map_or_else(Vec::new, |run| {
            run.iter()
                .filter_map(|r| r.get("history").copied())
                .collect()
        })
    }
}

/// Both sides' runs: ours, and llama.cpp's with flash attention off and on; and the machine's
/// measured limits, for the resume floor.
#[derive(Default)]
pub(super) struct Runs {
    pub ours: Side,
    pub peer_off: Side,
    pub peer_on: Side,
    /// How the peer's llama.cpp was built, when there is a peer.
    pub peer_build: Option<PeerBuild>,
    pub limits: Option<Limits>,
}

/// What the engine's `machine` example measured: the limits a resume is judged against.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Limits {
    /// Copy bandwidth, bytes read plus bytes written per second.
    pub bandwidth: f64,
    /// f32 fused multiply-add flops per second, all threads, at the fastest level.
    pub fma_peak: f64,
    /// The same at each level measured, by the level's name (`avx2`, ...).
    pub fma_by_level: Vec<(String, f64)>,
}

impl Limits {
    /// Runs the `machine` example on `threads` threads.
    fn measure(machine: &Program, threads: usize) -> Result<Limits> {
        eprintln!("==> the machine's memory bandwidth and FMA peak");
        let mut cmd = machine.command();
        cmd.env("RAYON_NUM_THREADS", threads.to_string());
        let out = run_for_output(&mut cmd, "the machine example")?;
        let row = super::rows(&out, "MACHINE ")?.remove(0);
        let get = |key: &str| {
            row.get(key)
                .copied()
                .filter(|v| *v > 0.0)
                .with_context(|| format!("the machine example printed no {key}"))
        };
        let fma_by_level = row
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("fma_peak_flops_")?.to_owned(), *v)))
            .collect();
        Ok(Limits {
            bandwidth: get("bandwidth_bytes_s")?,
            fma_peak: get("fma_peak_flops")?,
            fma_by_level,
        })
    }

    /// The best of two measurements, figure by figure, so that a figure measured in a slow spell
    /// of the shared host (which would make the floor easier to come near) does not count.
    fn best(self, other: Limits) -> Limits {
        let mut fma_by_level = self.fma_by_level;
        for (level, flops) in other.fma_by_level {
            match fma_by_level.iter_mut().find(|(l, _)| *l == level) {
                Some((_, f)) => *f = f.max(flops),
                None => fma_by_level.push((level, flops)),
            }
        }
        Limits {
            bandwidth: self.bandwidth.max(other.bandwidth),
            fma_peak: self.fma_peak.max(other.fma_peak),
            fma_by_level,
        }
    }

    /// The FMA peak at `level`, the instruction set the engine ran at: a run forced to AVX2
    /// on an AVX-512 machine has AVX2's peak, as an AVX2-only CPU would. The fastest level's
    /// when `level` was not measured.
    fn peak_at(&self, level: &str) -> f64 {
        self.fma_by_level
            .iter()
            .find(|(l, _)| l == level)
            .map_or(self.fma_peak, |(_, f)| *f)
    }

    /// The floor of a resume, in ms: the cache copied at the bandwidth (its bytes read and
    /// written) plus the turn's arithmetic at the FMA peak `peak`.
    fn floor_ms(&self, peak: f64, cache_bytes: f64, turn_flops: f64) -> f64 {
        (2.0 * cache_bytes / self.bandwidth + turn_flops / peak) * 1e3
    }
}

/// How close a resume should come to its floor, and at which histories.
const FLOOR_TARGET: (f64, &[f64]) = (1.5, &[2048.0]);

/// Resumes each run of either side times, reporting their median: a resume takes tens of
/// milliseconds, so timed once a run, one descheduled moment of a shared host decided a run's
/// figure (and the range of its ratio). The other figures take seconds and are timed once.
const RESUMES_PER_RUN: usize = 5;

/// Runs the engine's `bench_speed` (and the peer) `opts.repeats` times each, alternately,
/// each run after the `machine` example has measured the floor's limits (the best of those
/// measurements is kept), and writes `engine.md`; returns its text.
pub(super) fn run(
    opts: &Options,
    model: &Path,
    threads: usize,
    (machine, bench_speed): &(Program, Program),
    load_before: &str,
    built_from: &str,
    dir: &Path,
) -> Result<String> {
    let mut runs = Runs::default();
    if opts.peer {
        let simd = std::env::var("AGENTKV_SIMD").ok();
        runs.peer_build = Some(PeerBuild::for_engine(simd.as_deref()));
    }
    let python = runs.peer_build.map(peer_python_for).transpose()?;
    for i in 0..opts.repeats {
        let limits = Limits::measure(machine, threads)?;
        runs.limits = Some(match runs.limits.take() {
            Some(before) => before.best(limits),
            None => limits,
        });
        eprintln!("==> engine speed, run {} of {}", i + 1, opts.repeats);
        let mut cmd = bench_speed.command();
        cmd.args(["--histories", &opts.histories, "--decode", &opts.decode])
            .args(["--resumes", &RESUMES_PER_RUN.to_string()])
            .arg("--model")
            .arg(model)
            .env("RAYON_NUM_THREADS", threads.to_string());
        runs.ours.push(
            &run_for_output(&mut cmd, "the bench_speed example")?,
            "ENGINE ",
        )?;
        let Some(python) = &python else { continue };
        // Which setting goes first alternates too.
        let order = if i % 2 == 0 {
            ["off", "on"]
        } else {
            ["on", "off"]
        };
        for fa in order {
            eprintln!(
                "==> llama.cpp peer, flash attention {fa}, run {} of {}",
                i + 1,
                opts.repeats
            );
            let script = project_root().join("benches/peer/llama_cpp_peer.py");
            let mut cmd = Command::new(python);
            cmd.arg(&script)
                .arg(model)
                .args(["--threads", &threads.to_string()])
                .args(["--histories", &opts.histories, "--decode", &opts.decode])
                .args(["--resumes", &RESUMES_PER_RUN.to_string()])
                .args(["--flash-attn", fa])
                .arg("--workdir")
                .arg(dir);
            let what = format!("the llama.cpp peer ({})", script.display());
            let side = if fa == "on" {
                &mut runs.peer_on
            } else {
                &mut runs.peer_off
            };
            side.push(&run_for_output(&mut cmd, &what)?, "PEER ")?;
        }
    }
    let machine = Machine::current(threads, load_before.to_owned(), loadavg(), built_from);
    let table = report(&machine, &runs);
    let path = dir.join("engine.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(table)
}

/// Median, min and max of some runs' values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Spread {
    /// `None` for no values. The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            runs: n,
        })
    }

    fn cell(&self, decimals: usize) -> String {
        format!(
            "{:.decimals$} ({:.decimals$}-{:.decimals$})",
            self.median, self.min, self.max
        )
    }
}

/// `ours / peer` of the medians, and the range over the sides' extremes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Ratio {
    pub median: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Ratio {
    pub fn of(ours: &Spread, peer: &Spread) -> Ratio {
        Ratio {
            median: ours.median / peer.median,
            lo: ours.min / peer.max,
            hi: ours.max / peer.min,
        }
    }

    /// Whether `x` lies within the range: the runs cannot tell which side of it is true.
    pub fn straddles(&self, x: f64) -> bool {
        self.lo <= x && x <= self.hi
    }
}

/// A figure of the table.
struct Figure {
    label: &'static str,
    key: &'static str,
    higher_is_better: bool,
    decimals: usize,
    /// The target ratio and the histories it applies to.
    target: Option<(f64, &'static [f64])>,
}

/// The speed targets: prefill >= 1.5x llama.cpp and decode >= 1.2x at 512 and 2048 tokens,
/// resume TTFT <= 0.5x at 2048.
const FIGURES: [Figure; 7] = [
    Figure {
        label: "prefill tok/s",
        key: "prefill_tok_s",
        higher_is_better: true,
        decimals: 1,
        target: Some((1.5, &[512.0, 2048.0])),
    },
    Figure {
        label: "decode tok/s",
        key: "decode_tok_s",
        higher_is_better: true,
        decimals: 1,
        target: Some((1.2, &[512.0, 2048.0])),
    },
    Figure {
        label: "resume TTFT ms",
        key: "resume_ttft_ms",
        higher_is_better: false,
        decimals: 1,
        target: Some((0.5, &[2048.0])),
    },
    Figure {
        label: "resume: of which loading ms",
        key: "resume_load_ms",
        higher_is_better: false,
        decimals: 1,
        target: None,
    },
    Figure {
        label: "resume TTFT ms, new buffers",
        key: "resume_fresh_ttft_ms",
        higher_is_better: false,
        decimals: 1,
        target: None,
    },
    Figure {
        label: "re-prefill TTFT ms",
        key: "reprefill_ttft_ms",
        higher_is_better: false,
        decimals: 1,
        target: None,
    },
    Figure {
        label: "saved history, bytes/token",
        key: "disk_bytes_per_token",
        higher_is_better: false,
        decimals: 0,
        target: Some((1.0, &[2048.0])),
    },
];

/// What a ratio says about its target: met or not only when its whole range agrees.
fn verdict(ratio: &Ratio, target: f64, higher_is_better: bool) -> &'static str {
    if ratio.straddles(target) {
        return "unsettled";
    }
    let good = if higher_is_better {
        ratio.lo >= target
    } else {
        ratio.hi <= target
    };
    if good { "met" } else { "not met" }
}

/// llama.cpp's figure from the flash-attention setting with the better median, and which.
fn best_peer(runs: &Runs, history: f64, figure: &Figure) -> Option<(Spread, &'static str)> {
    let off = Spread::of(&runs.peer_off.samples(history, figure.key));
    let on = Spread::of(&runs.peer_on.samples(history, figure.key));
    match (off, on) {
        (Some(a), Some(b)) => {
            let on_wins = if figure.higher_is_better {
                b.median > a.median
            } else {
                b.median < a.median
            };
            Some(if on_wins { (b, "on") } else { (a, "off") })
        }
        (Some(a), None) => Some((a, "off")),
        (None, Some(b)) => Some((b, "on")),
        (None, None) => None,
    }
}

/// `engine.md`: the conditions, then one row per history and figure (with llama.cpp's beside
/// ours when the runs had a peer).
pub(super) fn report(machine: &Machine, runs: &Runs) -> String {
    let peer = runs.peer_build.is_some();
    let mut s = String::from("# Engine speed\n\n");
    let info = |side: &Side, key: &str| side.info.get(key).cloned().unwrap_or_else(|| "?".into());
    let weights = runs
        .ours
        .runs
        .first()
        .and_then(|run| run.first())
        .and_then(|r| r.get("weight_bytes"))
        .map_or(f64::NAN, |b| b / (1 << 20) as f64);
    let _ = writeln!(
        s,
        "{}; {}, {} logical CPUs; built from {}; model {}; engine kernels: {}, {} threads, \
         {weights:.1} MiB of weights, KV cache in {}; load average before {}, after {}.\n",
        machine.date,
        machine.cpu,
        machine.cpus,
        machine.built_from,
        info(&runs.ours, "model"),
        info(&runs.ours, "isa"),
        machine.threads,
        info(&runs.ours, "kv dtype"),
        machine.load_before,
        machine.load_after,
    );
    let n = runs.ours.runs.len();
    if let Some(build) = runs.peer_build {
        let _ = writeln!(
            s,
            "llama.cpp: {}, {}; {}; flags {} (and the same with flash_attn=on).\n",
            info(&runs.peer_off, "version"),
            build.describe(),
            info(&runs.peer_off, "system"),
            info(&runs.peer_off, "flags"),
        );
        let _ = writeln!(
            s,
            "Each figure is the median of {n} runs with its min-max; the runs alternated \
             (agentkv, llama.cpp with flash attention off and on, in turn first). For each \
             figure llama.cpp's better flash-attention setting is kept (FA). Ratio = agentkv / \
             llama.cpp of the medians, with the range from the least to the most favourable \
             pairing of min and max; a ratio whose range crosses 1.0 is marked unsettled, and \
             a target whose range crosses it is unsettled, not met. Above 1 is faster for \
             tok/s, below 1 is faster for TTFT.\n"
        );
    } else {
        let _ = writeln!(
            s,
            "Each figure is the median of {n} runs with its min-max.\n"
        );
    }
    let _ = writeln!(
        s,
        "Resume = load the history's f16 cache through kv-store (page cache) into the buffers \
         the history was computed in (llama.cpp: its state into its existing context) + a \
         16-token turn; \"new buffers\" = the same into freshly allocated memory (page faults \
         included); re-prefill = history + turn from an empty cache.\n"
    );
    let resumes = match peer {
        true => format!(
            "{} resumes (llama.cpp's runs: {})",
            info(&runs.ours, "resumes"),
            info(&runs.peer_off, "resumes")
        ),
        false => format!("{} resumes", info(&runs.ours, "resumes")),
    };
    let _ = writeln!(
        s,
        "A run's resume figures are the medians of its {resumes}; every other figure is timed \
         once a run.\n"
    );
    if peer {
        let _ = writeln!(
            s,
            "| history | figure | agentkv | llama.cpp | FA | ratio | target | verdict |\n\
             |---|---|---|---|---|---|---|---|"
        );
    } else {
        let _ = writeln!(s, "| history | figure | agentkv |\n|---|---|---|");
    }
    for history in runs.ours.histories() {
        for figure in &FIGURES {
            let Some(ours) = Spread::of(&runs.ours.samples(history, figure.key)) else {
                continue;
            };
            let mine = ours.cell(figure.decimals);
            if !peer {
                let _ = writeln!(s, "| {history} | {} | {mine} |", figure.label);
                continue;
            }
            let Some((theirs, fa)) = best_peer(runs, history, figure) else {
                let _ = writeln!(s, "| {history} | {} | {mine} | | | | | |", figure.label);
                continue;
            };
            let ratio = Ratio::of(&ours, &theirs);
            let unsettled = if ratio.straddles(1.0) {
                ", unsettled"
            } else {
                ""
            };
            let (target, verdict) = match figure.target {
                Some((t, at)) if at.contains(&history) => (
                    format!("{} {t}x", if figure.higher_is_better { ">=" } else { "<=" }),
                    verdict(&ratio, t, figure.higher_is_better),
                ),
                _ => (String::new(), ""),
            };
            let _ = writeln!(
                s,
                "| {history} | {} | {mine} | {} | {fa} | {:.2}x ({:.2}-{:.2}{unsettled}) | {target} | {verdict} |",
                figure.label,
                theirs.cell(figure.decimals),
                ratio.median,
                ratio.lo,
                ratio.hi,
            );
        }
    }
    if let Some(limits) = &runs.limits {
        floor_section(&mut s, limits, &runs.ours);
    }
    s
}

/// The resume floor per history and how far above it the resume runs, at the FMA peak of the
/// level the engine ran at.
fn floor_section(s: &mut String, limits: &Limits, ours: &Side) {
    let level = ours.info.get("isa").map_or("?", String::as_str);
    let peak = limits.peak_at(level);
    let _ = writeln!(
        s,
        "\nResume floor (the `machine` example, run before each run, the best of its figures: \
         {:.1} GB/s copy bandwidth, {:.0} GFLOP/s f32 FMA peak at {level}, the level the engine \
         ran at; {:.0} at the machine's best): the cache's bytes copied at that bandwidth plus \
         the turn's flops at that peak.\n\n\
         | history | floor ms | of which copy | resume TTFT ms | resume / floor | target | verdict |\n\
         |---|---|---|---|---|---|---|",
        limits.bandwidth / 1e9,
        peak / 1e9,
        limits.fma_peak / 1e9,
    );
    for history in ours.histories() {
        let median = |key: &str| Spread::of(&ours.samples(history, key)).map(|v| v.median);
        let (Some(per_token), Some(flops), Some(resume)) = (
            median("kv_bytes_per_token"),
            median("turn_flops"),
            Spread::of(&ours.samples(history, "resume_ttft_ms")),
        ) else {
            continue;
        };
        let cache = per_token * history;
        let floor = limits.floor_ms(peak, cache, flops);
        let copy = limits.floor_ms(peak, cache, 0.0);
        let ratio = Ratio {
            median: resume.median / floor,
            lo: resume.min / floor,
            hi: resume.max / floor,
        };
        let (target, verdict) = if FLOOR_TARGET.1.contains(&history) {
            (
                format!("<= {}x", FLOOR_TARGET.0),
                verdict(&ratio, FLOOR_TARGET.0, false),
            )
        } else {
            (String::new(), "")
        };
        let _ = writeln!(
            s,
            "| {history} | {floor:.1} | {copy:.1} | {} | {:.2}x ({:.2}-{:.2}) | {target} | {verdict} |",
            resume.cell(1),
            ratio.median,
            ratio.lo,
            ratio.hi,
        );
    }
}

/// Checks `--repeats`.
pub(super) fn check_repeats(n: usize) -> Result<()> {
    if n < 3 {
        bail!("--repeats {n}: a median with a spread needs at least 3 runs of each side");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(history: f64, pairs: &[(&str, f64)]) -> Row {
        let mut r: Row = pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        r.insert("history".into(), history);
        r
    }

    fn side(runs: Vec<Vec<Row>>, info: &[(&str, &str)]) -> Side {
        Side {
            runs,
            info: info
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn machine() -> Machine {
        Machine::example()
    }

    #[test]
    fn spread_is_median_min_max() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0, 2.0, 10.0, f64::NAN]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.runs), (3.0, 1.0, 10.0, 4));
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn ratios_are_of_medians_with_the_extremes_as_range() {
        let ours = Spread::of(&[200.0, 300.0, 250.0]).expect("values");
        let peer = Spread::of(&[100.0, 125.0, 150.0]).expect("values");
        let r = Ratio::of(&ours, &peer);
        assert_eq!((r.median, r.lo, r.hi), (2.0, 200.0 / 150.0, 3.0));
        assert!(!r.straddles(1.0));
        assert!(r.straddles(1.5));
        assert_eq!(verdict(&r, 1.5, true), "unsettled");
        assert_eq!(verdict(&r, 1.2, true), "met");
        assert_eq!(verdict(&r, 3.5, true), "not met");
        // Lower is better: met only when even the worst pairing is under the target.
        let ms = Ratio {
            median: 0.4,
            lo: 0.3,
            hi: 0.45,
        };
        assert_eq!(verdict(&ms, 0.5, false), "met");
        let ms = Ratio {
            median: 0.45,
            lo: 0.35,
            hi: 0.6,
        };
        assert_eq!(verdict(&ms, 0.5, false), "unsettled");
        let ms = Ratio {
            median: 0.7,
            lo: 0.6,
            hi: 0.8,
        };
        assert_eq!(verdict(&ms, 0.5, false), "not met");
    }

    /// Three runs a side at 2048 tokens: fixed timings, so every cell is known.
    fn runs() -> Runs {
        let ours = [
            (300.0, 50.0, 100.0),
            (330.0, 60.0, 110.0),
            (360.0, 55.0, 90.0),
        ];
        let off = [
            (180.0, 50.0, 200.0),
            (200.0, 52.0, 190.0),
            (190.0, 48.0, 210.0),
        ];
        let on = [
            (210.0, 40.0, 230.0),
            (220.0, 42.0, 240.0),
            (205.0, 41.0, 220.0),
        ];
        let to_runs = |v: &[(f64, f64, f64)]| -> Vec<Vec<Row>> {
            v.iter()
                .map(|&(p, d, r)| {
                    vec![row(
                        2048.0,
                        &[
                            ("prefill_tok_s", p),
                            ("decode_tok_s", d),
                            ("resume_ttft_ms", r),
                            ("weight_bytes", 98566144.0),
                            ("kv_bytes_per_token", 23040.0),
                            ("turn_flops", 5.73e9),
                        ],
                    )]
                })
                .collect()
        };
        Runs {
            ours: side(
                to_runs(&ours),
                &[
                    ("model", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                    ("isa", "avx2"),
                    ("kv dtype", "f16"),
                    ("resumes", "5"),
                ],
            ),
            peer_off: side(
                to_runs(&off),
                &[
                    ("version", "llama-cpp-python 0.3.36"),
                    ("system", "CPU : AVX2 = 1"),
                    ("flags", "n_threads=2 flash_attn=off"),
                    ("resumes", "5"),
                ],
            ),
            peer_on: side(to_runs(&on), &[("flags", "n_threads=2 flash_attn=on")]),
            peer_build: Some(PeerBuild::Avx2),
            limits: Some(Limits {
                bandwidth: 36.8e9,
                fma_peak: 454e9,
                fma_by_level: vec![("avx2".into(), 227e9), ("avx512".into(), 454e9)],
            }),
        }
    }

    #[test]
    fn report_gives_the_resume_floor_and_how_far_above_it_the_resume_is() {
        let text = report(&machine(), &runs());
        // 2048 * 23040 bytes copied at 36.8 GB/s: 2 * 47.19 MB / 36.8 GB/s = 2.56 ms; 5.73
        // GFLOP at AVX2's 227 GFLOP/s (the engine ran at avx2; the machine's best is twice
        // that) = 25.24 ms; 27.81 ms in all. Resume 100 (90-110) ms: 3.60x (3.24-3.96), over
        // the 1.5x target in every run.
        assert!(
            text.contains(
                "(the `machine` example, run before each run, the best of its figures: 36.8 GB/s \
                 copy bandwidth, 227 GFLOP/s f32 FMA peak at avx2, the level the engine ran at; \
                 454 at the machine's best)"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| 2048 | 27.8 | 2.6 | 100.0 (90.0-110.0) | 3.60x (3.24-3.96) | <= 1.5x | not met |"
            ),
            "{text}"
        );
        let mut r = runs();
        r.limits = None;
        assert!(!report(&machine(), &r).contains("Resume floor"));
    }

    /// Measured before each run, the floor keeps each figure's best: a slow spell of the host
    /// during one measurement does not lower the floor's demands.
    #[test]
    fn limits_keep_the_best_of_each_figure() {
        let a = Limits {
            bandwidth: 30e9,
            fma_peak: 450e9,
            fma_by_level: vec![("avx2".into(), 240e9), ("avx512".into(), 450e9)],
        };
        let b = Limits {
            bandwidth: 40e9,
            fma_peak: 340e9,
            fma_by_level: vec![("avx2".into(), 197e9), ("avx512".into(), 340e9)],
        };
        let best = a.clone().best(b.clone());
        assert_eq!(best, b.clone().best(a));
        assert_eq!(
            best,
            Limits {
                bandwidth: 40e9,
                fma_peak: 450e9,
                fma_by_level: vec![("avx2".into(), 240e9), ("avx512".into(), 450e9)],
            }
        );
        assert_eq!(best.peak_at("avx2"), 240e9);
    }

    #[test]
    fn report_keeps_llama_cpps_better_setting_and_marks_what_is_unsettled() {
        let text = report(&machine(), &runs());
        assert!(
            text.contains("2026-12-02 03:04 UTC; AMD EPYC, 2 logical CPUs; built from 0123abc; model SmolLM2-135M-Instruct.Q4_1.gguf; engine kernels: avx2, 2 threads, 94.0 MiB of weights, KV cache in f16; load average before 0.10 0.20 0.30, after 1.00 0.50 0.40."),
            "{text}"
        );
        assert!(text.contains(
            "llama.cpp: llama-cpp-python 0.3.36, built for an AVX2-only CPU (SSE4.2, AVX, AVX2, \
             FMA, F16C, BMI2; no AVX-512, no VNNI); CPU : AVX2 = 1; flags n_threads=2 \
             flash_attn=off"
        ));
        assert!(text.contains(
            "A run's resume figures are the medians of its 5 resumes (llama.cpp's runs: 5); \
             every other figure is timed once a run."
        ));
        // Prefill: flash attention on is faster (median 210 against 190); 330 / 210 = 1.57x,
        // range 300/220 = 1.36 to 360/205 = 1.76: crosses the 1.5x target.
        assert!(
            text.contains("| 2048 | prefill tok/s | 330.0 (300.0-360.0) | 210.0 (205.0-220.0) | on | 1.57x (1.36-1.76) | >= 1.5x | unsettled |"),
            "{text}"
        );
        // Decode: off is faster (50 against 41); 55 / 50 = 1.10x, range 50/52 to 60/48: crosses
        // 1.0 as well as the target.
        assert!(
            text.contains("| 2048 | decode tok/s | 55.0 (50.0-60.0) | 50.0 (48.0-52.0) | off | 1.10x (0.96-1.25, unsettled) | >= 1.2x | unsettled |"),
            "{text}"
        );
        // Resume: off is faster (200 ms against 230); 100 / 200 = 0.50x, range 90/210 to
        // 110/190.
        assert!(
            text.contains("| 2048 | resume TTFT ms | 100.0 (90.0-110.0) | 200.0 (190.0-210.0) | off | 0.50x (0.43-0.58) | <= 0.5x | unsettled |"),
            "{text}"
        );
        // Figures no run printed are left out.
        assert!(!text.contains("re-prefill TTFT ms |"), "{text}");
    }

    #[test]
    fn report_says_met_only_when_every_pairing_agrees() {
        let mut r = runs();
        for run in &mut r.ours.runs {
            run[0].insert("prefill_tok_s".into(), 400.0);
        }
        let text = report(&machine(), &r);
        // 400 / 220 = 1.82 at worst: met.
        assert!(
            text.contains("| 2048 | prefill tok/s | 400.0 (400.0-400.0) | 210.0 (205.0-220.0) | on | 1.90x (1.82-1.95) | >= 1.5x | met |"),
            "{text}"
        );
        r.peer_build = None;
        let alone = report(&machine(), &r);
        assert!(
            alone.contains("| 2048 | decode tok/s | 55.0 (50.0-60.0) |"),
            "{alone}"
        );
        assert!(!alone.contains("llama-cpp-python"), "{alone}");
    }

    #[test]
    fn fewer_than_three_runs_are_refused() {
        assert!(check_repeats(2).is_err());
        assert!(check_repeats(3).is_ok());
    }
}
