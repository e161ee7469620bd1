//! `--only store`: the remote tier against plain object_store calls on a real Garage cluster
//! (the `remote` bench of agentkv-benches prints `REMOTE` and `SHARED` lines), and a turn on a
//! second host against re-prefill there (`SECOND` lines).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::{Row, rows, run_for_output};
use crate::cargo;

/// Runs the remote bench at `histories` with `repeats` alternated runs per figure; returns
/// the report's section and writes it to `dir/store.md`.
pub fn run(histories: &str, repeats: usize, dir: &Path) -> Result<String> {
    eprintln!("==> remote store vs plain object_store (Garage, 3 nodes)");
    let garage = crate::garage()?;
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "agentkv-benches", "--bench", "remote", "--"])
        .args(["--histories", histories, "--repeats", &repeats.to_string()])
        .env("AGENTKV_GARAGE", garage);
    let out = run_for_output(&mut cmd, "the remote store benchmark")?;
    let remote = rows(&out, "REMOTE ")?;
    let shared = rows(&out, "SHARED ")?;
    let shared = shared.first().map(|r| {
        let get = |k: &str| r.get(k).copied().unwrap_or(f64::NAN);
        (get("stored_bytes"), get("ideal_bytes"))
    });
    let second = rows(&out, "SECOND ")?;
    let mut text = table(&remote, shared);
    text.push_str(&second_host_table(&second));
    let path = dir.join("store.md");
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    Ok(text)
}

/// The section: one row per history, speed ratios (plain time / ours) against the 0.8x target.
pub fn table(rows: &[Row], shared: Option<(f64, f64)>) -> String {
    let mut s =
        String::from("## Remote store (Garage, 3 nodes, replication 3) vs plain object_store\n\n");
    s.push_str(
        "| history | segment MB | push ms | plain PUT ms | save ratio | fetch ms | plain GET ms | load ratio |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let get = |r: &Row, k: &str| r.get(k).copied().unwrap_or(f64::NAN);
    for r in rows {
        let figure = |name: &str| {
            let (m, lo, hi) = (
                get(r, &format!("{name}_ms")),
                get(r, &format!("{name}_min_ms")),
                get(r, &format!("{name}_max_ms")),
            );
            (m, format!("{m:.1} ({lo:.0}-{hi:.0})"))
        };
        let (os, os_text) = figure("ours_save");
        let (bs, bs_text) = figure("base_save");
        let (ol, ol_text) = figure("ours_load");
        let (bl, bl_text) = figure("base_load");
        let verdict = |ratio: f64| if ratio >= 0.8 { "met" } else { "not met" };
        let _ = writeln!(
            s,
            "| {} | {:.1} | {os_text} | {bs_text} | {:.2}x ({}) | {ol_text} | {bl_text} | {:.2}x ({}) |",
            get(r, "history"),
            get(r, "bytes") / 1e6,
            bs / os,
            verdict(bs / os),
            bl / ol,
            verdict(bl / ol),
        );
    }
    s.push_str(
        "\nMedians (min-max) of alternated runs. push: HEAD, read and verify the local segment, PUT; \
         fetch: GET, verify every checksum and the id, temp file, fsync, rename into an empty \
         local store. Ratio: plain time / ours (speed relative to plain object_store; target \
         >= 0.8x).\n",
    );
    if let Some((stored, ideal)) = shared {
        let _ = writeln!(
            s,
            "\n20 agents sharing a 512-token system prompt (256 tokens each of their own): the \
             bucket holds {:.1} MB for an ideal {:.1} MB, {:.3}x (target <= 1.1x).",
            stored / 1e6,
            ideal / 1e6,
            stored / ideal
        );
    }
    s
}

/// The second host's turn against re-prefill there, one row per history.
pub fn second_host_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "\n## An agent's next turn on a second host vs re-prefill there (SmolLM2-135M, f16 KV)\n\n\
         | history | tokens | second host: time to first token ms | re-prefill ms | time ratio | commit of the turn ms |\n\
         |---|---|---|---|---|---|\n",
    );
    let get = |r: &Row, k: &str| r.get(k).copied().unwrap_or(f64::NAN);
    for r in rows {
        if let Some(context) = r.get("context") {
            let _ = writeln!(
                s,
                "| {} | - | - | - | longer than the model's context ({context}) | - |",
                get(r, "history")
            );
            continue;
        }
        let (ours, base) = (get(r, "ours_ms"), get(r, "base_ms"));
        let commit = match r.get("commit_ms") {
            Some(c) => format!("{c:.1}"),
            None => "-".to_owned(),
        };
        let raw = if r.contains_key("raw_gemma") {
            " (Gemma 3 270M, raw text, engine and stores without a pool)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "| {}{raw} | {} | {ours:.1} | {base:.1} | {:.2}x | {commit} |",
            get(r, "history"),
            get(r, "tokens"),
            ours / base,
        );
    }
    s.push_str(
        "\nMedians of alternated runs. Second host: a new pool with an empty directory answers \
         the turn, fetching the agent's changes and cache from the cluster (through another \
         node than the host that computed it). Re-prefill: a pool with the same transcript and \
         no cache. Both give the same token. Time ratio: second host / re-prefill. Commit: the \
         second host's turn made durable on the store (its cache saved, the new segment \
         pushed, the agent's head decided), after the reply.\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_gives_speed_ratios_and_verdicts() {
        let row: Row = [
            ("history", 1024.0),
            ("bytes", 23_600_000.0),
            ("ours_save_ms", 100.0),
            ("ours_save_min_ms", 95.0),
            ("ours_save_max_ms", 120.0),
            ("base_save_ms", 90.0),
            ("base_save_min_ms", 80.0),
            ("base_save_max_ms", 99.0),
            ("ours_load_ms", 100.0),
            ("base_load_ms", 50.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let text = table(&[row], Some((105.0e6, 100.0e6)));
        assert!(
            text.contains("| 1024 | 23.6 | 100.0 (95-120) | 90.0 (80-99) | 0.90x (met) |"),
            "{text}"
        );
        assert!(text.contains("| 0.50x (not met) |"), "{text}");
        assert!(
            text.contains("105.0 MB for an ideal 100.0 MB, 1.050x"),
            "{text}"
        );
        let rows: Vec<Row> = [
            vec![
                ("history", 1024.0),
                ("tokens", 1050.0),
                ("ours_ms", 150.0),
                ("base_ms", 1500.0),
                ("commit_ms", 42.0),
            ],
            vec![("history", 16384.0), ("context", 8192.0)],
            vec![
                ("history", 16384.0),
                ("tokens", 16384.0),
                ("raw_gemma", 1.0),
                ("ours_ms", 1000.0),
                ("base_ms", 50000.0),
            ],
        ]
        .into_iter()
        .map(|r| r.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        .collect();
        let text = second_host_table(&rows);
        assert!(
            text.contains("| 1024 | 1050 | 150.0 | 1500.0 | 0.10x | 42.0 |"),
            "{text}"
        );
        assert!(
            text.contains("| 16384 | - | - | - | longer than the model's context (8192) | - |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| 16384 (Gemma 3 270M, raw text, engine and stores without a pool) | 16384 | \
                 1000.0 | 50000.0 | 0.02x | - |"
            ),
            "{text}"
        );
    }
}
