//! `serve.md`: the per-round table of the multi-round benchmark, each target's verdict, and
//! the section's place in `report.md`.

use std::fmt::Write as _;

use super::{Options, RESTART_AFTER, Run};
use crate::bench::{PeerBuild, Row};

/// RSS allowed beyond the KV budget and the weights: the runtime and HTTP server, the
/// tokenizer and template, a prefill's activations, the segments mapped while a cache loads.
const RSS_OVERHEAD: u64 = 256 << 20;

/// A timing ratio this close to its threshold (as a fraction of it) is neither met nor missed:
/// the same command varies by 10-30% between runs on these shared machines.
const NOISE: f64 = 0.2;

/// The section's title in `report.md` (a run replaces the section an earlier one wrote).
pub(super) const TITLE: &str = "Multi-round conversations: agentkv serve and llama.cpp's server";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    NotMet,
    Unsettled,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "not met",
            Verdict::Unsettled => "unsettled",
        }
    }

    /// A measured figure against an exact threshold: `x <= max` (or `x >= min` with
    /// `at_least`). No figure is unsettled.
    fn exact(x: f64, threshold: f64, at_least: bool) -> Verdict {
        match (x.is_nan(), at_least) {
            (true, _) => Verdict::Unsettled,
            (false, true) if x >= threshold => Verdict::Met,
            (false, false) if x <= threshold => Verdict::Met,
            _ => Verdict::NotMet,
        }
    }

    /// A timing ratio against `ratio <= max`: within [`NOISE`] of `max` is unsettled.
    fn timing(ratio: f64, max: f64) -> Verdict {
        if !ratio.is_finite() {
            Verdict::Unsettled
        } else if ratio <= max * (1.0 - NOISE) {
            Verdict::Met
        } else if ratio > max * (1.0 + NOISE) {
            Verdict::NotMet
        } else {
            Verdict::Unsettled
        }
    }
}

fn get(r: &Row, key: &str) -> f64 {
    r.get(key).copied().unwrap_or(f64::NAN)
}

fn num(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "n/a".into()
    }
}

fn mib(bytes: f64) -> String {
    format!("{} MiB", num(bytes / f64::from(1 << 20), 0))
}

/// `cached / prompt (ratio)` of one server's round.
fn cached_cell(r: &Row, server: &str) -> String {
    let (cached, prompt) = (
        get(r, &format!("{server}_cached_tokens")),
        get(r, &format!("{server}_prompt_tokens")),
    );
    if cached.is_nan() {
        return format!("n/a / {}", num(prompt, 0));
    }
    format!(
        "{} / {} ({})",
        num(cached, 0),
        num(prompt, 0),
        num(cached / prompt, 3)
    )
}

fn round_label(r: &Row) -> String {
    let n = num(get(r, "round"), 0);
    if get(r, "restarted_before") == 1.0 {
        format!("{n} (after restart)")
    } else {
        n
    }
}

/// The per-round table.
fn table(rounds: &[Row]) -> String {
    let mut s = String::from(
        "| round | agentkv TTFT p50 / p90 ms | llama.cpp TTFT p50 / p90 ms | p50 agentkv / llama.cpp \
         | agentkv uninterrupted TTFT p50 ms | agentkv cached / prompt tokens \
         | llama.cpp cached / prompt tokens | agentkv cache source | replies differing \
         | mean answer tokens agentkv / llama.cpp |\n\
         |---|---:|---:|---:|---:|---:|---:|---|---:|---:|\n",
    );
    for r in rounds {
        let sources: Vec<String> = ["hot", "disk", "rebuilt", "miss"]
            .iter()
            .filter_map(|state| {
                let n = get(r, &format!("agentkv_{state}"));
                (n > 0.0).then(|| format!("{state} {n:.0}"))
            })
            .collect();
        let (ours, theirs) = (get(r, "agentkv_ttft_p50_ms"), get(r, "llama_ttft_p50_ms"));
        let _ = writeln!(
            s,
            "| {} | {} / {} | {} / {} | {}x | {} | {} | {} | {} | {} of {} | {} / {} |",
            round_label(r),
            num(ours, 0),
            num(get(r, "agentkv_ttft_p90_ms"), 0),
            num(theirs, 0),
            num(get(r, "llama_ttft_p90_ms"), 0),
            num(ours / theirs, 2),
            num(get(r, "uninterrupted_ttft_p50_ms"), 0),
            cached_cell(r, "agentkv"),
            cached_cell(r, "llama"),
            if sources.is_empty() {
                "n/a".into()
            } else {
                sources.join(", ")
            },
            num(get(r, "differing"), 0),
            num(get(r, "users"), 0),
            num(get(r, "agentkv_answer_tokens"), 0),
            num(get(r, "llama_answer_tokens"), 0),
        );
    }
    s
}

/// One target: what it asks, what was measured, the verdict.
struct Target {
    what: String,
    measured: String,
    verdict: Verdict,
}

fn targets(rounds: &[Row], memory: &Row, max_kv_bytes: u64) -> Vec<Target> {
    let round = |n: usize| rounds.iter().find(|r| get(r, "round") == n as f64);
    let p50 = |n: usize, server: &str| {
        round(n).map_or(f64::NAN, |r| get(r, &format!("{server}_ttft_p50_ms")))
    };
    let mut out = Vec::new();

    // The worst round from round 2 on (NaN if any round lacks the figure).
    let ratios: Vec<(f64, f64)> = rounds
        .iter()
        .filter(|r| get(r, "round") >= 2.0)
        .map(|r| {
            (
                get(r, "round"),
                get(r, "agentkv_cached_tokens") / get(r, "agentkv_prompt_tokens"),
            )
        })
        .collect();
    let worst = ratios
        .iter()
        .copied()
        .reduce(|a, b| if b.1 < a.1 || b.1.is_nan() { b } else { a });
    let (worst_round, worst_ratio) = worst.unwrap_or((f64::NAN, f64::NAN));
    out.push(Target {
        what: "agentkv cached / prompt tokens >= 0.95 in every round from 2 on (the round after \
               the restart included)"
            .into(),
        measured: format!(
            "lowest {} (round {})",
            num(worst_ratio, 3),
            num(worst_round, 0)
        ),
        verdict: Verdict::exact(worst_ratio, 0.95, true),
    });

    let timing = |what: &str, ours: f64, theirs: f64, max: f64, of: &str| {
        let ratio = ours / theirs;
        Target {
            what: what.into(),
            measured: format!(
                "{}x ({} / {} ms {of})",
                num(ratio, 3),
                num(ours, 0),
                num(theirs, 0)
            ),
            verdict: Verdict::timing(ratio, max),
        }
    };
    out.push(timing(
        "round 2 TTFT p50 <= 0.8x llama.cpp's",
        p50(2, "agentkv"),
        p50(2, "llama"),
        0.8,
        "agentkv / llama.cpp",
    ));
    let after = RESTART_AFTER + 1;
    out.push(timing(
        &format!("round {after} (after the restart) TTFT p50 <= 0.1x llama.cpp's"),
        p50(after, "agentkv"),
        p50(after, "llama"),
        0.1,
        "agentkv / llama.cpp",
    ));
    out.push(timing(
        &format!("round {after} TTFT p50 <= 1.5x agentkv's own round 2"),
        p50(after, "agentkv"),
        p50(2, "agentkv"),
        1.5,
        &format!("round {after} / round 2"),
    ));

    let differing: f64 = rounds.iter().map(|r| get(r, "differing")).sum();
    let replies: f64 = rounds.iter().map(|r| get(r, "users")).sum();
    out.push(Target {
        what: "agentkv replies that differ from the uninterrupted server's: 0".into(),
        measured: format!("{} of {}", num(differing, 0), num(replies, 0)),
        verdict: Verdict::exact(differing, 0.0, false),
    });

    let peak = get(memory, "agentkv_peak_rss");
    let weights = get(memory, "model_bytes");
    let limit = max_kv_bytes as f64 + weights + RSS_OVERHEAD as f64;
    out.push(Target {
        what: format!(
            "agentkv peak RSS <= --max-kv-bytes + model file + {} overhead",
            mib(RSS_OVERHEAD as f64)
        ),
        measured: format!(
            "{} against {} ({} + {} + {})",
            mib(peak),
            mib(limit),
            mib(max_kv_bytes as f64),
            mib(weights),
            mib(RSS_OVERHEAD as f64)
        ),
        verdict: Verdict::exact(peak, limit, false),
    });
    out
}

/// `serve.md`: the setting, the per-round table, memory, and the targets with their verdicts.
pub(super) fn report(run: &Run, opts: &Options, rounds: &[Row], memory: &Row) -> String {
    let mut s = format!("# {TITLE}\n\n");
    let _ = writeln!(
        s,
        "{}; {}, {} logical CPUs, {}; commit {}; load average before {}, after {}.\n",
        run.date, run.cpu, run.cpus, run.isa, run.commit, run.load_before, run.load_after
    );
    let _ = writeln!(
        s,
        "Workload (LMCache's multi-round QA shape): {} users, each an agent of agentkv \
         (`model: user-k`), share a system prompt of {} tokens and have a history of {} tokens \
         each (mean; message text before the chat template). In each of {} rounds every user in \
         turn asks a new question and gets an answer of at most {} tokens, temperature 0, \
         streamed: TTFT is from sending the request to the first chunk with text; p50 and p90 \
         over the users. Both servers are killed with SIGKILL after round {RESTART_AFTER} and \
         started again: agentkv on the same home (its agents resume from disk), llama.cpp with \
         an empty RAM cache. A third server, agentkv never interrupted (fresh home), gives the \
         replies the restarted one is compared with. One server runs at a time.\n",
        opts.users,
        num(get(memory, "system_tokens"), 0),
        num(get(memory, "history_tokens_mean"), 0),
        opts.rounds,
        opts.answer_tokens,
    );
    let _ = writeln!(
        s,
        "- agentkv: `{}`, RAYON_NUM_THREADS={}.\n\
         - llama.cpp: llama-cpp-python {} (built with `CMAKE_ARGS=\"{}\"`), \
         `{} --host 127.0.0.1 --port P`, requests naming its own model id (from /v1/models); \
         system info: {}.\n\
         - Client: the openai package {}, one request at a time.\n",
        run.info("agentkv command"),
        run.threads,
        run.info("llama-cpp-python"),
        PeerBuild::Native.cmake_args(),
        run.info("llama.cpp command"),
        run.info("llama.cpp system info"),
        run.info("openai"),
    );
    s.push_str(&table(rounds));
    let _ = writeln!(
        s,
        "\nagentkv's token counts are its `usage` (`prompt_tokens_details.cached_tokens`). \
         llama.cpp's server streams no `usage` (and has no cached count in it when not \
         streaming): its figures come from its log, `Llama.generate: N prefix-match hit, \
         remaining M prompt tokens` (cached N of N + M; no such line: nothing reused), and its \
         answer tokens are the streamed chunks, one per token. Cache source: the \
         `x-agentkv-cache` header of each reply (hot: in memory; disk: loaded from its saved \
         cache, or a new agent's shared system prompt; rebuilt: computed again from the \
         transcript; miss: nothing reused).\n"
    );
    let _ = writeln!(
        s,
        "Peak RSS (VmHWM, read before each kill and at the end): agentkv {} (uninterrupted {}), \
         llama.cpp {}; --max-kv-bytes {}, model file {}; agentkv exit code on SIGTERM at the \
         end: {}.\n",
        mib(get(memory, "agentkv_peak_rss")),
        mib(get(memory, "uninterrupted_peak_rss")),
        mib(get(memory, "llama_peak_rss")),
        mib(run.max_kv_bytes as f64),
        mib(get(memory, "model_bytes")),
        num(get(memory, "agentkv_exit"), 0),
    );
    let _ = writeln!(s, "| target | measured | verdict |\n|---|---|---|");
    for t in targets(rounds, memory, run.max_kv_bytes) {
        let _ = writeln!(s, "| {} | {} | {} |", t.what, t.measured, t.verdict.word());
    }
    let _ = writeln!(
        s,
        "\nTiming ratios within {:.0}% of their threshold are unsettled: the same command varies \
         by 10-30% between runs on a shared machine, and a p50 over {} users is a small sample.",
        NOISE * 100.0,
        opts.users
    );
    s
}

/// `report.md` with `section` (a document of its own titled `title`, headings demoted one
/// level) in place of the one an earlier run wrote, or appended; a missing report gets the
/// benchmarks' title.
pub(super) fn with_section(report: &str, title: &str, section: &str) -> String {
    let heading = format!("## {title}");
    let mut kept = String::new();
    let mut skipping = false;
    for line in report.lines() {
        if line == heading {
            skipping = true;
        } else if skipping && line.starts_with("## ") {
            skipping = false;
        }
        if !skipping {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let mut s = kept.trim_end().to_owned();
    if s.is_empty() {
        s.push_str("# agentkv benchmarks");
    }
    s.push_str("\n\n");
    for line in section.lines() {
        if line.starts_with('#') {
            s.push('#');
        }
        s.push_str(line);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, f64)]) -> Row {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn verdicts_leave_the_noise_band_unsettled() {
        assert_eq!(Verdict::timing(0.05, 0.1), Verdict::Met);
        assert_eq!(Verdict::timing(0.09, 0.1), Verdict::Unsettled);
        assert_eq!(Verdict::timing(0.11, 0.1), Verdict::Unsettled);
        assert_eq!(Verdict::timing(0.2, 0.1), Verdict::NotMet);
        assert_eq!(Verdict::timing(f64::NAN, 0.1), Verdict::Unsettled);
        assert_eq!(Verdict::exact(0.95, 0.95, true), Verdict::Met);
        assert_eq!(Verdict::exact(0.949, 0.95, true), Verdict::NotMet);
        assert_eq!(Verdict::exact(1.0, 0.0, false), Verdict::NotMet);
        assert_eq!(Verdict::exact(f64::NAN, 0.0, false), Verdict::Unsettled);
    }

    fn rounds() -> Vec<Row> {
        let round =
            |n: f64, restarted: f64, ours: f64, theirs: f64, cached: f64, differing: f64| {
                row(&[
                    ("round", n),
                    ("users", 4.0),
                    ("restarted_before", restarted),
                    ("agentkv_ttft_p50_ms", ours),
                    ("agentkv_ttft_p90_ms", ours * 1.5),
                    ("uninterrupted_ttft_p50_ms", ours),
                    ("llama_ttft_p50_ms", theirs),
                    ("llama_ttft_p90_ms", theirs * 1.2),
                    ("agentkv_prompt_tokens", 12000.0),
                    ("agentkv_cached_tokens", cached),
                    ("llama_prompt_tokens", 12000.0),
                    ("agentkv_answer_tokens", 100.0),
                    ("llama_answer_tokens", 98.5),
                    ("agentkv_disk", 4.0),
                    ("differing", differing),
                ])
            };
        vec![
            round(1.0, 0.0, 20000.0, 21000.0, 3000.0, 0.0),
            round(2.0, 0.0, 200.0, 400.0, 11800.0, 0.0),
            round(3.0, 1.0, 230.0, 22000.0, 11700.0, 1.0),
            round(4.0, 0.0, 210.0, 450.0, 11000.0, 0.0),
        ]
    }

    #[test]
    fn table_and_targets() {
        let memory = row(&[
            ("agentkv_peak_rss", (700u64 << 20) as f64),
            ("model_bytes", (90u64 << 20) as f64),
            ("system_tokens", 1003.0),
            ("history_tokens_mean", 2010.0),
        ]);
        let t = table(&rounds());
        assert!(
            t.contains(
                "| 3 (after restart) | 230 / 345 | 22000 / 26400 | 0.01x | 230 | 11700 / 12000 (0.975) \
                 | n/a / 12000 | disk 4 | 1 of 4 | 100 / 98 |"
            ),
            "{t}"
        );
        let ts = targets(&rounds(), &memory, 512 << 20);
        let verdicts: Vec<Verdict> = ts.iter().map(|t| t.verdict).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::NotMet, // round 4: 11000 / 12000
                Verdict::Met,    // 0.5x
                Verdict::Met,    // 0.011x
                Verdict::Met,    // 1.15x
                Verdict::NotMet, // one differing reply
                Verdict::Met,    // 700 <= 512 + 90 + 256 MiB
            ]
        );
        assert!(
            ts[0].measured.contains("lowest 0.917 (round 4)"),
            "{}",
            ts[0].measured
        );
        assert!(
            ts[5].measured.contains("700 MiB against 858 MiB"),
            "{}",
            ts[5].measured
        );
    }

    #[test]
    fn the_section_replaces_an_earlier_one() {
        let section = format!("# {TITLE}\n\nfirst\n");
        let fresh = with_section("", TITLE, &section);
        assert!(
            fresh.starts_with("# agentkv benchmarks\n\n## Multi-round"),
            "{fresh}"
        );
        let other = "# agentkv benchmarks\n\nmachine\n\n## Engine speed\n\nx\n";
        let once = with_section(other, TITLE, &section);
        assert!(
            once.contains("## Engine speed\n\nx\n\n## Multi-round"),
            "{once}"
        );
        let twice = with_section(&once, TITLE, &format!("# {TITLE}\n\nsecond\n"));
        assert!(
            !twice.contains("first") && twice.contains("second"),
            "{twice}"
        );
        assert_eq!(twice.matches("## Multi-round").count(), 1);
        // A section after ours survives.
        let after = format!("{once}\n## Later\n\ny\n");
        let replaced = with_section(&after, TITLE, &section);
        assert!(replaced.contains("## Later\n\ny\n"), "{replaced}");
    }
}
