//! `target/bench/report.md`: the machine a benchmark ran on, and the resume table (time to
//! first token resumed from the saved cache against re-prefilling the history).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bench::Row;

/// The machine and the conditions of a run: every table says where it was measured.
pub struct Machine {
    /// `model name` of `/proc/cpuinfo`.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Threads the engine ran with.
    pub threads: usize,
    /// `/proc/loadavg` before the benchmarks.
    pub load_before: String,
    /// `/proc/loadavg` after them.
    pub load_after: String,
    /// When the run ended, UTC, `YYYY-MM-DD HH:MM`.
    pub date: String,
    /// The commit the measured programs were built from ([`commit`]).
    pub built_from: String,
    /// Linux's transparent huge page mode ([`thp_mode`]): the engine asks for 2 MB pages for
    /// its large weights, which `never` refuses (Gemma 3 decodes about 6% slower without).
    pub huge_pages: String,
}

#[cfg(test)]
impl Machine {
    /// The machine the report tests describe.
    pub(crate) fn example() -> Machine {
        Machine {
            cpu: "AMD EPYC".into(),
            cpus: 2,
            threads: 2,
            load_before: "0.10 0.20 0.30".into(),
            load_after: "1.00 0.50 0.40".into(),
            date: "2026-12-02 03:04 UTC".into(),
            built_from: "0123abc".into(),
            huge_pages: "madvise".into(),
        }
    }
}

impl Machine {
    /// The current machine, `threads` engine threads, the given load averages, now; the
    /// programs built from `built_from`.
    pub fn current(
        threads: usize,
        load_before: String,
        load_after: String,
        built_from: &str,
    ) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Machine {
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown CPU".into()),
            cpus: logical_cpus(&cpuinfo).unwrap_or(available),
            threads,
            load_before,
            load_after,
            date: utc_date(secs),
            built_from: built_from.to_owned(),
            huge_pages: std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .ok()
                .and_then(|text| thp_mode(&text))
                .unwrap_or_else(|| "unknown".into()),
        }
    }
}

/// The selected mode of `/sys/kernel/mm/transparent_hugepage/enabled` (`always [madvise]
/// never` -> `madvise`).
pub fn thp_mode(text: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .map(str::to_owned)
}

/// The first `model name` of a `/proc/cpuinfo` (x86; most ARM kernels print none).
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name")
            .then(|| value.trim().to_owned())
            .filter(|v| !v.is_empty())
    })
}

/// How many `processor` entries a `/proc/cpuinfo` lists.
pub fn logical_cpus(cpuinfo: &str) -> Option<usize> {
    let n = cpuinfo
        .lines()
        .filter(|line| {
            line.split_once(':')
                .is_some_and(|(k, _)| k.trim() == "processor")
        })
        .count();
    (n > 0).then_some(n)
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time (xtask keeps free of a date crate).
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// `git rev-parse --short HEAD`, noting uncommitted changes to tracked files (the binary
/// measured was built from the working tree).
pub fn commit(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        None => "unknown commit".into(),
        Some(hash) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if changes.is_empty() => hash,
            _ => format!("{hash} with uncommitted changes"),
        },
    }
}

fn get(r: &Row, key: &str) -> f64 {
    r.get(key).copied().unwrap_or(f64::NAN)
}

fn cell(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "n/a".into()
    }
}

fn ratio(num: f64, den: f64) -> String {
    let r = num / den;
    if r.is_finite() {
        format!("{r:.1}x")
    } else {
        "n/a".into()
    }
}

/// The resume table in Markdown, one row per history length, with the notes that say what
/// each column measured.
pub fn resume_table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| history tokens | (a) re-prefill TTFT ms | (b) warm resume TTFT ms | (c) cold resume TTFT ms \
         | speedup (b) | speedup (c) | save ms | bytes/token |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let (a, b, c) = (
            get(r, "reprefill_ttft_ms"),
            get(r, "warm_ttft_ms"),
            get(r, "cold_ttft_ms"),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(get(r, "history"), 0),
            cell(a, 1),
            cell(b, 1),
            cell(c, 1),
            ratio(a, b),
            ratio(a, c),
            cell(get(r, "save_ms"), 1),
            cell(get(r, "bytes_per_token"), 0),
        );
    }
    s
}

/// What the table's columns measured, with the run counts actually used.
fn resume_notes(rows: &[Row]) -> String {
    let turn = rows.first().map_or(f64::NAN, |r| get(r, "turn_tokens"));
    let runs = rows.first().map_or(f64::NAN, |r| get(r, "resume_runs"));
    let once: Vec<String> = rows
        .iter()
        .filter(|r| get(r, "reprefill_runs") < runs)
        .map(|r| {
            format!(
                "{} ({} run{})",
                cell(get(r, "history"), 0),
                cell(get(r, "reprefill_runs"), 0),
                if get(r, "reprefill_runs") == 1.0 {
                    ""
                } else {
                    "s"
                }
            )
        })
        .collect();
    let mut s = format!(
        "Time to first token (TTFT) of a new turn of {} tokens after a history of N tokens, through \
         the agent pool; medians of {} runs.\n\n\
         - (a) re-prefill: render the conversation and prefill all of it on an empty cache.\n\
         - (b) warm resume: `AgentPool::generate` on an agent whose cache is on disk, files in the \
         page cache: read the transcript, load the f16 cache through kv-store (read into the \
         cache's buffers, each tensor checksummed as it arrives), prefill the {} new tokens.\n\
         - (c) cold resume: (b) after `posix_fadvise(POSIX_FADV_DONTNEED)` on every file of the \
         pool, so the cache is read from the disk.\n\
         - speedup: (a) / (b) and (a) / (c), measured side by side in the same run.\n\
         - save ms: the N-token cache saved as a new cache (one segment, f16, fsynced); \
         bytes/token: the agent's segments on disk / N.\n",
        cell(turn, 0),
        cell(runs, 0),
        cell(turn, 0),
    );
    if !once.is_empty() {
        let slow = rows
            .first()
            .map_or(f64::NAN, |r| get(r, "reprefill_slow_ms"))
            / 1e3;
        let _ = writeln!(
            s,
            "- re-prefill is repeated only while a run takes under {} s: {}.",
            cell(slow, 0),
            once.join(", ")
        );
    }
    if rows.iter().any(|r| get(r, "same_first_token") == 0.0) {
        let _ = writeln!(
            s,
            "- At some length the resumed first token differed from re-prefill's: the f16 \
             rounding of the saved cache changed a greedy choice."
        );
    }
    s
}

/// The whole report: machine, resume table and chart, then the other parts' tables
/// (`sections`: the engine's, kv-quality's), each a document of its own whose headings become
/// one level deeper.
pub fn report(
    machine: &Machine,
    resume: Option<&[Row]>,
    chart: Result<&str, &str>,
    sections: &[&str],
) -> String {
    let mut s = String::from("# agentkv benchmarks\n\n");
    let _ = writeln!(
        s,
        "{}; {}, {} logical CPUs; built from {}; engine threads {}; transparent huge pages {}; \
         load average before {}, after {}.\n",
        machine.date,
        machine.cpu,
        machine.cpus,
        machine.built_from,
        machine.threads,
        machine.huge_pages,
        machine.load_before,
        machine.load_after
    );
    if let Some(rows) = resume {
        let _ = writeln!(s, "## Resume from the saved cache vs re-prefill\n");
        s.push_str(&resume_table(rows));
        s.push('\n');
        s.push_str(&resume_notes(rows));
        match chart {
            Ok(file) => {
                let _ = writeln!(s, "\n![TTFT against history length]({file})");
            }
            Err(why) => {
                let _ = writeln!(s, "\n(No chart: {why}.)");
            }
        }
    }
    for section in sections {
        if !s.ends_with("\n\n") {
            s.push('\n');
        }
        if section.starts_with("# ") {
            s.push('#');
        }
        s.push_str(section);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
        model name\t: AMD EPYC 7B13 64-Core Processor\ncpu cores\t: 1\n\n\
        processor\t: 1\nvendor_id\t: AuthenticAMD\n\
        model name\t: AMD EPYC 7B13 64-Core Processor\ncpu cores\t: 1\n";

    #[test]
    fn cpuinfo_gives_model_and_count() {
        assert_eq!(
            cpu_model(CPUINFO).as_deref(),
            Some("AMD EPYC 7B13 64-Core Processor")
        );
        assert_eq!(logical_cpus(CPUINFO), Some(2));
        // An ARM kernel's cpuinfo: processors but no model name.
        let arm = "processor\t: 0\nBogoMIPS\t: 48.00\nCPU part\t: 0xd0c\n";
        assert_eq!(cpu_model(arm), None);
        assert_eq!(logical_cpus(arm), Some(1));
        assert_eq!(logical_cpus(""), None);
    }

    #[test]
    fn thp_mode_is_the_bracketed_word() {
        assert_eq!(
            thp_mode("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(
            thp_mode("[always] madvise never").as_deref(),
            Some("always")
        );
        assert_eq!(thp_mode("always madvise [never]").as_deref(), Some("never"));
        assert_eq!(thp_mode("always madvise never"), None);
        assert_eq!(thp_mode(""), None);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(utc_date(4_107_542_399), "2100-02-28 23:59 UTC");
    }

    fn row(pairs: &[(&str, f64)]) -> Row {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    fn rows() -> Vec<Row> {
        vec![
            row(&[
                ("history", 256.0),
                ("turn_tokens", 16.0),
                ("reprefill_ttft_ms", 3000.0),
                ("reprefill_runs", 3.0),
                ("warm_ttft_ms", 250.0),
                ("cold_ttft_ms", 300.0),
                ("resume_runs", 3.0),
                ("save_ms", 47.84),
                ("bytes_per_token", 23103.5),
                ("same_first_token", 1.0),
                ("reprefill_slow_ms", 10000.0),
            ]),
            row(&[
                ("history", 4096.0),
                ("turn_tokens", 16.0),
                ("reprefill_ttft_ms", 41000.0),
                ("reprefill_runs", 1.0),
                ("warm_ttft_ms", 410.0),
                ("resume_runs", 3.0),
                ("save_ms", 400.0),
                ("bytes_per_token", 23040.2),
                ("same_first_token", 0.0),
            ]),
        ]
    }

    #[test]
    fn resume_table_rows_and_ratios() {
        let t = resume_table(&rows());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "header, rule, two rows:\n{t}");
        assert_eq!(lines[0].matches('|').count(), 9);
        assert_eq!(
            lines[2],
            "| 256 | 3000.0 | 250.0 | 300.0 | 12.0x | 10.0x | 47.8 | 23104 |"
        );
        // No cold figure (not Linux): n/a, not NaN, and no made-up ratio.
        assert_eq!(
            lines[3],
            "| 4096 | 41000.0 | 410.0 | n/a | 100.0x | n/a | 400.0 | 23040 |"
        );
    }

    #[test]
    fn report_has_machine_table_chart_and_notes() {
        let machine = Machine::example();
        let rows = rows();
        let r = report(
            &machine,
            Some(&rows),
            Ok("resume.png"),
            &[
                "# Engine speed\n\nx\n",
                "# KV cache precision and quality\n\ny\n",
            ],
        );
        assert!(r.contains(
            "2026-12-02 03:04 UTC; AMD EPYC, 2 logical CPUs; built from 0123abc; engine threads 2"
        ));
        assert!(r.contains(
            "engine threads 2; transparent huge pages madvise; load average before 0.10 0.20 \
             0.30, after 1.00 0.50 0.40"
        ));
        assert!(r.contains("| 256 | 3000.0 |"));
        assert!(r.contains("![TTFT against history length](resume.png)"));
        assert!(r.contains("a new turn of 16 tokens"));
        assert!(r.contains("under 10 s: 4096 (1 run)."), "{r}");
        assert!(r.contains("resumed first token differed"));
        assert!(
            r.contains("\n## Engine speed\n"),
            "engine title demoted:\n{r}"
        );

        assert!(
            r.contains("\nx\n\n## KV cache precision and quality\n\ny\n"),
            "kv-quality title demoted, after the engine's:\n{r}"
        );

        let r = report(&machine, Some(&rows), Err("no font"), &[]);
        assert!(r.contains("(No chart: no font.)"));
        assert!(!r.contains("Engine speed"));
        let r = report(&machine, None, Err("unused"), &["# Engine speed\n"]);
        assert!(!r.contains("Resume") && !r.contains("No chart"));
        assert!(
            r.contains("after 1.00 0.50 0.40.\n\n## Engine speed\n"),
            "{r}"
        );
    }
}
