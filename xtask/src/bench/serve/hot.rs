//! `cargo xtask bench --only hot-agents`: how many agents `agentkv serve` keeps hot under one
//! `--max-kv-bytes` in each KV dtype, on the real model through the openai client, against
//! f32: f16 should keep twice as many and `q8_0` three and a half times. The driver is
//! `benches/serve/hot_agents.py` (in the peer's virtualenv, as for the serve part); this
//! module runs it and turns its figures into `target/bench/hot-agents.md` (also put into
//! `report.md`).

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Run, drive, write_report};
use crate::bench::rows;

const USAGE: &str = "\
usage: cargo xtask bench --only hot-agents [--agents 10] [--history-tokens 1750]

  The budget is two and a half f32 agents' caches, measured on one agent of about
  --history-tokens tokens of messages (about 2,050 with the chat template and the question).
  For each of f32, f16 and q8_0, agentkv serve (--kv-dtype DTYPE, --max-kv-bytes that budget)
  on an empty home takes --agents agents one after the other, each one turn of its own
  conversation of that size; then its /agentkv/agents says which are hot, and the next turn of
  the least recently used hot agent and of the last one evicted say where their caches were
  (x-agentkv-cache: hot, disk). The openai package is the client (target/peer-venv, as for
  --only serve). Targets: f16 keeps at least twice as many agents hot as f32, q8_0 three and a
  half times. About 4 minutes on two cores of an AVX-512 CPU (31 prefills of about 2,050
  tokens), longer on an AVX2-only one. Writes target/bench/hot-agents.md and puts it into
  target/bench/report.md.";

/// The section's title in `report.md`.
const TITLE: &str = "Agents hot under one --max-kv-bytes: agentkv serve in each KV dtype";

/// Hot agents a dtype must keep, as a multiple of f32's.
const TARGETS: [(&str, f64); 2] = [("f16", 2.0), ("q8_0", 3.5)];

struct Options {
    agents: usize,
    history_tokens: usize,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        agents: 10,
        history_tokens: 1750,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{a} needs a value\n{USAGE}"))?;
        let number = value
            .parse::<usize>()
            .with_context(|| format!("{a} takes a number, not {value:?}\n{USAGE}"));
        match a.as_str() {
            "--agents" => o.agents = number?,
            "--history-tokens" => o.history_tokens = number?,
            _ => bail!("unknown argument {a:?}\n{USAGE}"),
        }
    }
    if o.agents < 2 || o.history_tokens == 0 {
        bail!("--agents must be at least 2 and --history-tokens at least 1\n{USAGE}");
    }
    Ok(o)
}

/// One dtype's server, as the driver's `HOT` line gives it.
struct Hot {
    dtype: String,
    agents: usize,
    hot: usize,
    kv_bytes: f64,
    tokens: (f64, f64),
    /// Whether the hot agents are the most recently used ones.
    lru_order: bool,
    /// `x-agentkv-cache` of the next turn of the least recently used hot agent, and of the
    /// agent evicted last (`None` where there is no such agent).
    oldest_hot_next: Option<String>,
    last_evicted_next: Option<String>,
    exit: i64,
}

impl Hot {
    fn parse(line: &str) -> Result<Hot> {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON object: {line}"))?;
        let num = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("no number {k:?} in {line}"))
        };
        let text = |k: &str| v[k].as_str().map(str::to_owned);
        Ok(Hot {
            dtype: text("dtype").with_context(|| format!("no dtype in {line}"))?,
            agents: num("agents")? as usize,
            hot: num("hot")? as usize,
            kv_bytes: num("kv_bytes")?,
            tokens: (num("tokens_min")?, num("tokens_max")?),
            lru_order: num("lru_order")? == 1.0,
            oldest_hot_next: text("oldest_hot_next_turn"),
            last_evicted_next: text("last_evicted_next_turn"),
            exit: num("exit")? as i64,
        })
    }

    /// Whether the server's own account of the next turns agrees with its listing: the least
    /// recently used hot agent answered from memory, the last evicted one from disk.
    fn listing_confirmed(&self) -> bool {
        let hot_ok = self.hot == 0 || self.oldest_hot_next.as_deref() == Some("hot");
        let cold_ok = self.hot == self.agents || self.last_evicted_next.as_deref() == Some("disk");
        hot_ok && cold_ok
    }
}

pub fn bench(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = parse(args)?;
    let flags = [
        "--agents".to_owned(),
        opts.agents.to_string(),
        "--history-tokens".to_owned(),
        opts.history_tokens.to_string(),
    ];
    let (stdout, run) = drive("hot_agents.py", "agents hot under one budget", &flags)?;
    let budget = rows(&stdout, "BUDGET ")?.remove(0);
    let hot: Vec<Hot> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("HOT "))
        .map(Hot::parse)
        .collect::<Result<_>>()?;
    let run = Run {
        max_kv_bytes: budget.get("budget_bytes").copied().unwrap_or(0.0) as u64,
        ..run
    };
    let text = report(&run, &budget, &hot)?;
    print!("{text}");
    write_report("hot-agents.md", TITLE, &text)
}

/// The table and each target's verdict; an error when a dtype's line is missing.
fn report(run: &Run, budget: &crate::bench::Row, hot: &[Hot]) -> Result<String> {
    let of = |dtype: &str| {
        hot.iter()
            .find(|h| h.dtype == dtype)
            .with_context(|| format!("the driver gave no {dtype} figures"))
    };
    let (f32_hot, f32_confirmed) = (of("f32")?.hot, of("f32")?.listing_confirmed());
    let mut s = format!("# {TITLE}\n\n");
    let _ = writeln!(
        s,
        "{}; {}, {} logical CPUs, {}; commit {}; load average before {}, after {}.\n",
        run.date, run.cpu, run.cpus, run.isa, run.commit, run.load_before, run.load_after
    );
    let figure = |k: &str| budget.get(k).copied().unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "Budget: `--max-kv-bytes {}` ({:.1} MiB), {} times the cache of one f32 agent of {:.0} \
         tokens ({:.1} MiB, measured on a server holding that agent alone). Each server: `{}`, \
         RAYON_NUM_THREADS={}, an empty home, agents made one after the other through the \
         openai package {} (chat completions, `model: user-k`), each one turn of its own \
         conversation. Hot: what `/agentkv/agents` lists as hot after the last agent's turn; \
         the next turns' `x-agentkv-cache` headers check it.\n",
        run.max_kv_bytes,
        run.max_kv_bytes as f64 / f64::from(1 << 20),
        figure("budget_agents"),
        figure("f32_agent_tokens"),
        figure("f32_agent_bytes") / f64::from(1 << 20),
        run.info("agentkv command"),
        run.threads,
        run.info("openai"),
    );
    s.push_str(
        "| KV dtype | agents made | hot | x f32 | KV bytes held (MiB) | MiB per hot agent | \
         tokens per hot agent | least recently used hot agent's next turn | last evicted \
         agent's next turn |\n|---|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for h in hot {
        let mib = h.kv_bytes / f64::from(1 << 20);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1}x | {:.1} | {:.1} | {:.0}-{:.0} | {} | {} |",
            h.dtype,
            h.agents,
            h.hot,
            h.hot as f64 / f32_hot.max(1) as f64,
            mib,
            mib / h.hot.max(1) as f64,
            h.tokens.0,
            h.tokens.1,
            h.oldest_hot_next.as_deref().unwrap_or("-"),
            h.last_evicted_next.as_deref().unwrap_or("-"),
        );
    }
    s.push_str("\nTargets:\n");
    for (dtype, times) in TARGETS {
        let h = of(dtype)?;
        let verdict = if !h.listing_confirmed() || !f32_confirmed {
            "unsettled (the next turns contradict a listing, below)"
        } else if h.hot == h.agents {
            // Every agent made fits: the count says only that the budget holds at least
            // this many.
            "unsettled (every agent made is hot: make more with --agents)"
        } else if f32_hot > 0 && h.hot as f64 >= times * f32_hot as f64 {
            "met"
        } else {
            "not met"
        };
        let _ = writeln!(
            s,
            "- {dtype} keeps >= {times}x as many agents hot as f32: {} against {f32_hot}, \
             {verdict}.",
            h.hot
        );
    }
    for h in hot {
        if !h.listing_confirmed() {
            let _ = writeln!(
                s,
                "- {}: the next turns contradict the listing (least recently used hot agent: \
                 {}, last evicted: {}).",
                h.dtype,
                h.oldest_hot_next.as_deref().unwrap_or("-"),
                h.last_evicted_next.as_deref().unwrap_or("-"),
            );
        }
        if !h.lru_order {
            let _ = writeln!(
                s,
                "- {}: the hot agents are not the most recently used ones.",
                h.dtype
            );
        }
        if h.exit != 0 {
            let _ = writeln!(
                s,
                "- {}: the server exited with {} after SIGTERM (expected 0).",
                h.dtype, h.exit
            );
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn run() -> Run {
        Run {
            date: "2026-12-06".into(),
            cpu: "Some CPU".into(),
            cpus: 2,
            isa: "AVX-512".into(),
            commit: "abc1234".into(),
            threads: 2,
            load_before: "0.1".into(),
            load_after: "1.9".into(),
            max_kv_bytes: 235_929_600,
            info: vec![("openai".into(), "2.0.0".into())],
        }
    }

    fn line(dtype: &str, hot: usize, agents: usize, next: (&str, &str)) -> String {
        let mut v = serde_json::json!({
            "dtype": dtype, "agents": agents, "hot": hot, "kv_bytes": hot * 1000,
            "budget_bytes": 1, "tokens_min": 2040, "tokens_max": 2060, "lru_order": 1,
            "oldest_hot_next_turn": next.0, "exit": 0,
        });
        if hot < agents {
            v["last_evicted_next_turn"] = next.1.into();
        }
        v.to_string()
    }

    #[test]
    fn options() {
        let o = parse(&[]).expect("defaults");
        assert_eq!((o.agents, o.history_tokens), (10, 1750));
        let o = parse(&args("--agents 12 --history-tokens 500")).expect("valid");
        assert_eq!((o.agents, o.history_tokens), (12, 500));
        assert!(parse(&args("--agents 1")).is_err());
        assert!(parse(&args("--agents")).is_err());
        assert!(parse(&args("--users 3")).is_err());
    }

    #[test]
    fn targets_are_judged_on_the_counts_against_f32() {
        let budget = crate::bench::Row::from([("budget_agents".to_owned(), 2.5)]);
        let report_of = |q8_next: (&str, &str)| {
            let hot: Vec<Hot> = [
                line("f32", 2, 10, ("hot", "disk")),
                line("f16", 4, 10, ("hot", "disk")),
                line("q8_0", 6, 10, q8_next),
            ]
            .iter()
            .map(|l| Hot::parse(l).expect("valid"))
            .collect();
            report(&run(), &budget, &hot).expect("report")
        };
        let text = report_of(("hot", "disk"));
        assert!(text.contains("| f16 | 10 | 4 | 2.0x |"), "{text}");
        assert!(text.contains("f16 keeps >= 2x as many agents hot as f32: 4 against 2, met"));
        assert!(
            text.contains("q8_0 keeps >= 3.5x as many agents hot as f32: 6 against 2, not met"),
            "{text}"
        );
        assert!(!text.contains("contradict"), "{text}");
        // An evicted agent whose next turn found its cache in memory: the count is not trusted.
        let text = report_of(("hot", "hot"));
        assert!(
            text.contains("6 against 2, unsettled (the next turns contradict"),
            "{text}"
        );
        assert!(
            text.contains("q8_0: the next turns contradict the listing"),
            "{text}"
        );
        assert!(!text.contains("f16: the next turns contradict"), "{text}");
    }

    #[test]
    fn a_dtype_that_fits_every_agent_is_unsettled_and_a_missing_one_an_error() {
        let budget = crate::bench::Row::new();
        let all: Vec<Hot> = [
            line("f32", 2, 9, ("hot", "disk")),
            line("f16", 4, 9, ("hot", "disk")),
            line("q8_0", 9, 9, ("hot", "")),
        ]
        .iter()
        .map(|l| Hot::parse(l).expect("valid"))
        .collect();
        let text = report(&run(), &budget, &all).expect("report");
        assert!(text.contains("9 against 2, unsettled"), "{text}");
        assert!(report(&run(), &budget, &all[..2]).is_err());
        assert!(Hot::parse(r#"{"agents": 3}"#).is_err());
    }
}
