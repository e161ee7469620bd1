//! `cargo xtask bench --only kv-quality`: what storing the attention KV cache at a lower
//! precision costs a conversation's quality. The engine's `kv_quality` example measures f16 and
//! q8_0 caches against f32, the peer script `benches/peer/llama_kv_quality.py` llama.cpp's q8_0
//! against its default f16, on the same GGUF, input and thread count; both print KL divergence
//! and top-1 agreement of every position's next-token distribution, and greedy agreement of
//! continuations decoded from a cache saved and loaded back. They run on two inputs: a held-out
//! text, and the demo's conversations (`crates/cli/src/demo_conversations.json`), which the
//! example renders with the model's replies and writes out as token ids for the peer. This
//! module runs both sides on both, writes the tables to `target/bench/kv-quality.md` with the
//! target's verdicts, and returns it for `report.md`.
//!
//! The example is given `--model`, `--text` or `--chat`, `--tokens --continuation --cuts` and
//! `--ids-out`, and prints an `INFO isa: LEVEL` line and one `KVQ {...}` line per precision,
//! with the fields of [`Quality`]; its cuts must be the peer's, or the verdict says the two are
//! not comparable.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Program, loadavg, peer_python, run_for_output};
use crate::project_root;
use crate::report::Machine;

/// The held-out text when `--text` is not given.
pub(super) const DEFAULT_TEXT: &str = "/usr/share/common-licenses/GPL-3";
/// Tokens of the text both sides read.
const TOKENS: usize = 4096;
/// Tokens greedily decoded after each cut.
const CONTINUATION: usize = 64;
/// Cut points, spread over the text.
const CUTS: usize = 4;
/// The demo's conversations, from the project root: the conversations measured when
/// `--chat` is not given.
pub(super) const DEMO_CONVERSATIONS: &str = "crates/cli/src/demo_conversations.json";

/// One `KVQ {...}` / `PEERQ {...}` line: a cache precision against a baseline.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Quality {
    /// The precision measured (`f16`, `q8_0`).
    pub kv: String,
    /// The precision it is measured against (`f32`, `f16`).
    pub baseline: String,
    /// Positions compared.
    pub tokens: u64,
    /// KL(baseline || kv) of the next-token distributions, mean over positions, in nats.
    pub mean_kl: f64,
    /// The same, max over positions.
    pub max_kl: f64,
    /// Share of positions whose argmax agrees.
    pub top1_agree: f64,
    /// Share of continuation tokens equal position by position, over all cuts.
    pub greedy_agree: f64,
    /// Per cut, the index of the first continuation token that differs (the continuation's
    /// length when none does).
    pub greedy_first_diff: Vec<u64>,
    /// The cut points, in tokens.
    pub cuts: Vec<u64>,
}

/// Parses the JSON object of one line.
pub(super) fn parse_quality(json: &str) -> Result<Quality> {
    let v: Value =
        serde_json::from_str(json.trim()).with_context(|| format!("not a JSON object: {json}"))?;
    let field = |k: &str| v.get(k).with_context(|| format!("no {k:?} in {json}"));
    let text = |k: &str| -> Result<String> {
        field(k)?
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{k:?} is not a string in {json}"))
    };
    let number = |k: &str| -> Result<f64> {
        field(k)?
            .as_f64()
            .with_context(|| format!("{k:?} is not a number in {json}"))
    };
    let share = |k: &str| -> Result<f64> {
        let x = number(k)?;
        if !(0.0..=1.0).contains(&x) {
            bail!("{k:?} is {x}, not a share between 0 and 1, in {json}");
        }
        Ok(x)
    };
    let counts = |k: &str| -> Result<Vec<u64>> {
        field(k)?
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .with_context(|| format!("{k:?} is not an array of counts in {json}"))
    };
    let q = Quality {
        kv: text("kv")?,
        baseline: text("baseline")?,
        tokens: field("tokens")?
            .as_u64()
            .with_context(|| format!("\"tokens\" is not a count in {json}"))?,
        mean_kl: number("mean_kl")?,
        max_kl: number("max_kl")?,
        top1_agree: share("top1_agree")?,
        greedy_agree: share("greedy_agree")?,
        greedy_first_diff: counts("greedy_first_diff")?,
        cuts: counts("cuts")?,
    };
    if q.greedy_first_diff.len() != q.cuts.len() {
        bail!(
            "{} first differences for {} cuts in {json}",
            q.greedy_first_diff.len(),
            q.cuts.len()
        );
    }
    Ok(q)
}

/// The `{prefix}{json}` lines of a program's stdout; none is an error.
pub(super) fn qualities(stdout: &str, prefix: &str, program: &str) -> Result<Vec<Quality>> {
    let found: Vec<Quality> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(parse_quality)
        .collect::<Result<_>>()
        .with_context(|| format!("reading a {prefix:?} line of {program}"))?;
    if found.is_empty() {
        bail!("{program} printed no {prefix:?} line; its output:\n{stdout}");
    }
    Ok(found)
}

/// The line measuring `kv` against `baseline`.
fn pick(found: &[Quality], kv: &str, baseline: &str, program: &str) -> Result<Quality> {
    found
        .iter()
        .find(|q| q.kv == kv && q.baseline == baseline)
        .cloned()
        .with_context(|| format!("{program} printed no line for {kv} against {baseline}"))
}

/// Checks kv-quality's inputs before anything runs: the held-out text, and the conversations
/// when the model can render them.
pub(super) fn check_inputs(text: &Path, chat: Option<&Path>) -> Result<()> {
    if !text.is_file() {
        bail!(
            "the held-out text {} is not a file: pass a plain-text file of at least {TOKENS} \
             tokens with --text PATH",
            text.display()
        );
    }
    if let Some(chat) = chat.filter(|c| !c.is_file()) {
        bail!(
            "the conversations {} are not a file: pass a JSON file of the form of {} with \
             --chat PATH",
            chat.display(),
            DEMO_CONVERSATIONS
        );
    }
    Ok(())
}

/// Runs the engine's example and the peer script on the text and on the conversations (none
/// for a model without a chat template), writes `kv-quality.md`; returns its text.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    text: &Path,
    chat: Option<&Path>,
    model: &Path,
    threads: usize,
    kv_quality: &Program,
    load_before: &str,
    built_from: &str,
    dir: &Path,
) -> Result<String> {
    check_inputs(text, chat)?;
    // First, so that a missing llama.cpp build is installed (or fails) before the engine runs.
    let python = peer_python()?;
    let script = project_root().join("benches/peer/llama_kv_quality.py");
    let peer_program = format!("the llama.cpp peer ({})", script.display());
    let program = "the engine's kv_quality example (cargo run -p engine --example kv_quality)";
    let common = [
        "--tokens".to_owned(),
        TOKENS.to_string(),
        "--continuation".to_owned(),
        CONTINUATION.to_string(),
        "--cuts".to_owned(),
        CUTS.to_string(),
    ];
    let ids = dir.join("kv-quality-conversations.json");
    let mut inputs = Vec::new();
    let runs = std::iter::once(Input::Text).chain(chat.map(|_| Input::Conversations));
    for input in runs {
        eprintln!(
            "==> KV cache quality on {}, agentkv (f16 and q8_0 against f32)",
            input.name()
        );
        let mut cmd = kv_quality.command();
        cmd.arg("--model").arg(model);
        match input {
            Input::Text => cmd.arg("--text").arg(text),
            Input::Conversations => cmd.arg("--chat").args(chat).arg("--ids-out").arg(&ids),
        };
        cmd.args(&common)
            .env("RAYON_NUM_THREADS", threads.to_string());
        let stdout = run_for_output(&mut cmd, program)?;
        let found = qualities(&stdout, "KVQ ", program)?;
        let ours = Sides {
            f16: pick(&found, "f16", "f32", program)?,
            q8_0: pick(&found, "q8_0", "f32", program)?,
            info: super::infos(&stdout),
        };

        eprintln!(
            "==> KV cache quality on {}, llama.cpp (q8_0 against f16)",
            input.name()
        );
        let mut cmd = Command::new(&python);
        cmd.arg(&script).arg(model);
        match input {
            Input::Text => cmd.arg(text),
            Input::Conversations => cmd.arg("--ids").arg(&ids),
        };
        cmd.args(&common)
            .args(["--threads", &threads.to_string()])
            .arg("--workdir")
            .arg(dir);
        let stdout = run_for_output(&mut cmd, &peer_program)?;
        let peer = Peer {
            q8_0: pick(
                &qualities(&stdout, "PEERQ ", &peer_program)?,
                "q8_0",
                "f16",
                &peer_program,
            )?,
            info: super::infos(&stdout),
        };
        inputs.push(Measured { input, ours, peer });
    }

    let machine = Machine::current(threads, load_before.to_owned(), loadavg(), built_from);
    let table = report(&machine, text, chat, &inputs);
    let path = dir.join("kv-quality.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(table)
}

/// What the two sides read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Input {
    /// The first [`TOKENS`] tokens of the held-out text.
    Text,
    /// The demo's conversations with the model's replies.
    Conversations,
}

impl Input {
    fn name(self) -> &'static str {
        match self {
            Input::Text => "the held-out text",
            Input::Conversations => "the demo's conversations",
        }
    }
}

/// Both sides on one input.
pub(super) struct Measured {
    pub input: Input,
    pub ours: Sides,
    pub peer: Peer,
}

/// What the engine's example printed.
pub(super) struct Sides {
    pub f16: Quality,
    pub q8_0: Quality,
    /// Its `INFO key: value` lines.
    pub info: BTreeMap<String, String>,
}

/// What the peer script printed.
pub(super) struct Peer {
    pub q8_0: Quality,
    /// Its `INFO key: value` lines.
    pub info: BTreeMap<String, String>,
}

/// The target: agentkv's q8_0 against f32 is no worse than llama.cpp's q8_0 against its f16,
/// in mean KL and in top-1 disagreement. Measured, not timed: the figures are deterministic,
/// so they are compared as they are, with no noise band.
pub(super) fn verdict(ours: &Quality, peer: &Quality) -> String {
    if ours.tokens != peer.tokens || ours.cuts != peer.cuts {
        return format!(
            "not comparable: agentkv measured {} tokens with cuts at {:?}, llama.cpp {} with \
             cuts at {:?}",
            ours.tokens, ours.cuts, peer.tokens, peer.cuts
        );
    }
    let (our_miss, peer_miss) = (1.0 - ours.top1_agree, 1.0 - peer.top1_agree);
    let kl_ok = ours.mean_kl <= peer.mean_kl;
    let top1_ok = our_miss <= peer_miss;
    format!(
        "{} (mean KL {} {} {}, top-1 disagreement {} {} {})",
        if kl_ok && top1_ok {
            "holds"
        } else {
            "does not hold"
        },
        kl(ours.mean_kl),
        if kl_ok { "<=" } else { ">" },
        kl(peer.mean_kl),
        percent(our_miss),
        if top1_ok { "<=" } else { ">" },
        percent(peer_miss),
    )
}

fn kl(x: f64) -> String {
    format!("{x:.2e}")
}

fn percent(share: f64) -> String {
    format!("{:.2}%", share * 100.0)
}

/// `kv-quality.md`: the conditions, then per input one row per comparison, the target and its
/// verdict.
pub(super) fn report(
    machine: &Machine,
    text: &Path,
    chat: Option<&Path>,
    inputs: &[Measured],
) -> String {
    let mut s = String::from("# KV cache precision and quality\n\n");
    let info = |map: &BTreeMap<String, String>, key: &str| {
        map.get(key).cloned().unwrap_or_else(|| "?".into())
    };
    let Some(first) = inputs.first() else {
        s.push_str("Nothing was measured.\n");
        return s;
    };
    let _ = writeln!(
        s,
        "{}; {}, {} logical CPUs; built from {}; engine kernels: {}, {} threads; load average \
         before {}, after {}.\n",
        machine.date,
        machine.cpu,
        machine.cpus,
        machine.built_from,
        info(&first.ours.info, "isa"),
        machine.threads,
        machine.load_before,
        machine.load_after,
    );
    let _ = writeln!(
        s,
        "llama.cpp: {}; {}; flags {}.\n",
        info(&first.peer.info, "version"),
        info(&first.peer.info, "system"),
        info(&first.peer.info, "flags"),
    );
    let _ = writeln!(
        s,
        "Each row runs an input with the KV cache stored at a lower precision and at a baseline \
         one, and compares the next-token distributions at every position: KL(baseline || \
         lower) in nats, mean and max over positions; top-1 agreement = share of positions \
         whose most likely token is the same. Greedy: at each cut c the baseline decodes \
         {CONTINUATION} tokens greedily after the first c tokens, uninterrupted, and the lower \
         precision does the same from its cache saved and loaded back; agreement = share of \
         those tokens equal position by position, first difference = per cut, the index of the \
         first that differs ({CONTINUATION} = none). llama.cpp's baseline is its default f16 \
         cache.\n",
    );
    for m in inputs {
        let cuts = join(&m.ours.q8_0.cuts);
        match m.input {
            Input::Text => {
                let _ = writeln!(
                    s,
                    "## A held-out text\n\nThe first {} tokens of {}; cuts at {cuts} \
                     tokens.\n",
                    m.ours.q8_0.tokens,
                    text.display(),
                );
            }
            Input::Conversations => {
                let path = chat.map_or_else(|| "?".to_owned(), |p| p.display().to_string());
                let (title, what) = if path.ends_with(DEMO_CONVERSATIONS) {
                    (
                        "The demo's conversations",
                        format!("The conversations of `agentkv demo` ({DEMO_CONVERSATIONS})"),
                    )
                } else {
                    ("Conversations", format!("The conversations of {path}"))
                };
                let _ = writeln!(
                    s,
                    "## {title}\n\n{what}, each user turn rendered through the model's chat \
                     template and answered by the f32 cache's greedy reply of at most \
                     {CONTINUATION} tokens, {} tokens in all, each conversation from an empty \
                     cache; a cut where each reply starts ({cuts} tokens into its \
                     conversation). Both sides read the same token ids.\n",
                    m.ours.q8_0.tokens,
                );
            }
        }
        let _ = writeln!(
            s,
            "| KV cache | mean KL | max KL | top-1 agreement | greedy agreement | first difference per cut |\n\
             |---|---:|---:|---:|---:|---|"
        );
        for (label, q) in [
            ("agentkv f16 vs f32", &m.ours.f16),
            ("agentkv q8_0 vs f32", &m.ours.q8_0),
            ("llama.cpp q8_0 vs f16", &m.peer.q8_0),
        ] {
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} | {} | {} |",
                kl(q.mean_kl),
                kl(q.max_kl),
                percent(q.top1_agree),
                percent(q.greedy_agree),
                join(&q.greedy_first_diff),
            );
        }
        let _ = writeln!(
            s,
            "\nTarget: agentkv q8_0's mean KL and top-1 disagreement against f32 are no worse \
             than llama.cpp's q8_0 against its f16: {}.\n",
            verdict(&m.ours.q8_0, &m.peer.q8_0)
        );
    }
    if chat.is_none() {
        s.push_str(
            "No conversations: the model has no chat template to render them with (a base \
             model).\n",
        );
    }
    s
}

fn join(counts: &[u64]) -> String {
    counts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVQ_F16: &str = r#"{"kv":"f16","baseline":"f32","tokens":4096,"mean_kl":1.5e-6,"max_kl":0.0003,"top1_agree":0.9995,"greedy_agree":1.0,"greedy_first_diff":[64,64,64,64],"cuts":[1024,2048,3072,4096]}"#;
    const KVQ_Q8: &str = r#"{"kv":"q8_0","baseline":"f32","tokens":4096,"mean_kl":0.0021,"max_kl":0.05,"top1_agree":0.97,"greedy_agree":0.75,"greedy_first_diff":[12,64,30,64],"cuts":[1024,2048,3072,4096]}"#;
    /// As Python's json.dumps prints it.
    const PEERQ: &str = r#"{"kv": "q8_0", "baseline": "f16", "tokens": 4096, "mean_kl": 0.004446120946368542, "max_kl": 0.10244017523224307, "top1_agree": 0.95458984375, "greedy_agree": 0.640625, "greedy_first_diff": [8, 45, 18, 64], "cuts": [1024, 2048, 3072, 4096]}"#;

    #[test]
    fn kvq_and_peerq_lines_parse() {
        let out = format!("INFO isa: avx2\nnoise\nKVQ {KVQ_F16}\nKVQ {KVQ_Q8}\nINFO threads: 2\n");
        let found = qualities(&out, "KVQ ", "the example").expect("two lines");
        assert_eq!(found.len(), 2);
        let q8 = pick(&found, "q8_0", "f32", "the example").expect("q8_0 line");
        assert_eq!(q8.tokens, 4096);
        assert_eq!(q8.mean_kl, 0.0021);
        assert_eq!(q8.max_kl, 0.05);
        assert_eq!(q8.top1_agree, 0.97);
        assert_eq!(q8.greedy_agree, 0.75);
        assert_eq!(q8.greedy_first_diff, [12, 64, 30, 64]);
        assert_eq!(q8.cuts, [1024, 2048, 3072, 4096]);
        assert_eq!(
            pick(&found, "f16", "f32", "the example")
                .expect("f16 line")
                .mean_kl,
            1.5e-6
        );
        let err = pick(&found, "q8_0", "f16", "the example").expect_err("no such line");
        assert!(format!("{err:#}").contains("no line for q8_0 against f16"));

        let peer = qualities(&format!("PEERQ {PEERQ}\n"), "PEERQ ", "the peer").expect("one");
        assert_eq!(peer[0].kv, "q8_0");
        assert_eq!(peer[0].baseline, "f16");
        assert_eq!(peer[0].top1_agree, 0.95458984375);
        assert_eq!(peer[0].greedy_first_diff, [8, 45, 18, 64]);
    }

    #[test]
    fn bad_lines_are_errors_naming_what_is_wrong() {
        let err = qualities("INFO isa: avx2\n", "KVQ ", "the example").expect_err("none");
        assert!(
            format!("{err:#}").contains("printed no \"KVQ \" line"),
            "{err:#}"
        );
        let bad = |json: &str, says: &str| {
            let err = parse_quality(json).expect_err(json);
            assert!(format!("{err:#}").contains(says), "{json}: {err:#}");
        };
        bad("[1]", "\"kv\"");
        bad("{\"kv\":", "not a JSON object");
        bad(&KVQ_Q8.replace("\"mean_kl\":0.0021,", ""), "no \"mean_kl\"");
        bad(&KVQ_Q8.replace("\"q8_0\"", "8"), "\"kv\" is not a string");
        bad(
            &KVQ_Q8.replace("0.0021", "\"0.0021\""),
            "\"mean_kl\" is not a number",
        );
        bad(&KVQ_Q8.replace("0.97", "1.5"), "not a share");
        bad(
            &KVQ_Q8.replace("[12,64,30,64]", "[12,64.5,30,64]"),
            "not an array of counts",
        );
        bad(
            &KVQ_Q8.replace("[12,64,30,64]", "[12,64,30]"),
            "3 first differences for 4 cuts",
        );
        bad(
            &KVQ_Q8.replace("4096,\"mean", "-1,\"mean"),
            "\"tokens\" is not a count",
        );
    }

    fn with(json: &str, mean_kl: f64, top1: f64) -> Quality {
        Quality {
            mean_kl,
            top1_agree: top1,
            ..parse_quality(json).expect("valid")
        }
    }

    #[test]
    fn verdict_compares_mean_kl_and_top1_disagreement() {
        let peer = with(PEERQ, 0.004, 0.95);
        assert_eq!(
            verdict(&with(KVQ_Q8, 0.002, 0.97), &peer),
            "holds (mean KL 2.00e-3 <= 4.00e-3, top-1 disagreement 3.00% <= 5.00%)"
        );
        // Equal is no worse.
        assert!(verdict(&with(KVQ_Q8, 0.004, 0.95), &peer).starts_with("holds"));
        assert_eq!(
            verdict(&with(KVQ_Q8, 0.005, 0.97), &peer),
            "does not hold (mean KL 5.00e-3 > 4.00e-3, top-1 disagreement 3.00% <= 5.00%)"
        );
        assert_eq!(
            verdict(&with(KVQ_Q8, 0.002, 0.94), &peer),
            "does not hold (mean KL 2.00e-3 <= 4.00e-3, top-1 disagreement 6.00% > 5.00%)"
        );
        let mut other = with(KVQ_Q8, 0.001, 1.0);
        other.cuts = vec![512, 1024, 1536, 2048];
        other.tokens = 2048;
        assert!(
            verdict(&other, &peer).starts_with("not comparable: agentkv measured 2048 tokens"),
            "{}",
            verdict(&other, &peer)
        );
    }

    #[test]
    fn report_has_machine_rows_and_verdicts_per_input() {
        let machine = Machine::example();
        let info = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let measured = |input, ours_q8: &str, peer_q8: &str| Measured {
            input,
            ours: Sides {
                f16: parse_quality(KVQ_F16).expect("valid"),
                q8_0: parse_quality(ours_q8).expect("valid"),
                info: info(&[("isa", "avx2")]),
            },
            peer: Peer {
                q8_0: parse_quality(peer_q8).expect("valid"),
                info: info(&[
                    ("version", "llama-cpp-python 0.3.36"),
                    ("flags", "flash_attn=on"),
                ]),
            },
        };
        // The conversations: agentkv's q8_0 worse than llama.cpp's in mean KL.
        let chat_ours = r#"{"kv":"q8_0","baseline":"f32","tokens":1609,"mean_kl":0.005,"max_kl":0.01,"top1_agree":0.98,"greedy_agree":0.7,"greedy_first_diff":[64,64,16,64,26,32],"cuts":[377,473,380,475,368,463]}"#;
        let chat_peer = r#"{"kv":"q8_0","baseline":"f16","tokens":1609,"mean_kl":0.0043,"max_kl":0.16,"top1_agree":0.9577,"greedy_agree":0.7057,"greedy_first_diff":[51,64,38,35,50,33],"cuts":[377,473,380,475,368,463]}"#;
        let demo = Path::new("/work/crates/cli/src/demo_conversations.json");
        let r = report(
            &machine,
            Path::new("/texts/GPL-3"),
            Some(demo),
            &[
                measured(Input::Text, KVQ_Q8, PEERQ),
                measured(Input::Conversations, chat_ours, chat_peer),
            ],
        );
        assert!(
            r.contains(
                "2026-12-02 03:04 UTC; AMD EPYC, 2 logical CPUs; built from 0123abc; engine kernels: avx2, \
                 2 threads"
            ),
            "{r}"
        );
        assert!(r.contains("llama.cpp: llama-cpp-python 0.3.36; ?; flags flash_attn=on."));
        let (text, chat) = r
            .split_once("## The demo's conversations")
            .expect("both inputs");
        assert!(text.contains(
            "## A held-out text\n\nThe first 4096 tokens of /texts/GPL-3; cuts at 1024, 2048, \
             3072, 4096 tokens."
        ));
        assert!(
            text.contains(
                "| agentkv f16 vs f32 | 1.50e-6 | 3.00e-4 | 99.95% | 100.00% | 64, 64, 64, 64 |"
            ),
            "{r}"
        );
        assert!(text.contains(
            "| agentkv q8_0 vs f32 | 2.10e-3 | 5.00e-2 | 97.00% | 75.00% | 12, 64, 30, 64 |"
        ));
        assert!(text.contains(
            "| llama.cpp q8_0 vs f16 | 4.45e-3 | 1.02e-1 | 95.46% | 64.06% | 8, 45, 18, 64 |"
        ));
        assert!(text.contains(
            "against its f16: holds (mean KL 2.10e-3 <= 4.45e-3, top-1 disagreement 3.00% <= 4.54%)."
        ));
        assert!(chat.contains("1609 tokens in all"), "{chat}");
        assert!(chat.contains(
            "The conversations of `agentkv demo` (crates/cli/src/demo_conversations.json), each"
        ));
        assert!(!r.contains("No conversations"));
        assert!(chat.contains("(377, 473, 380, 475, 368, 463 tokens into its conversation)"));
        assert!(chat.contains(
            "| agentkv q8_0 vs f32 | 5.00e-3 | 1.00e-2 | 98.00% | 70.00% | 64, 64, 16, 64, 26, 32 |"
        ));
        assert!(chat.contains(
            "| llama.cpp q8_0 vs f16 | 4.30e-3 | 1.60e-1 | 95.77% | 70.57% | 51, 64, 38, 35, 50, 33 |"
        ));
        assert!(chat.contains(
            "against its f16: does not hold (mean KL 5.00e-3 > 4.30e-3, top-1 disagreement 2.00% \
             <= 4.23%)."
        ));
    }

    #[test]
    fn report_names_other_conversations_and_says_when_there_are_none() {
        let machine = Machine::example();
        let sides = || Sides {
            f16: parse_quality(KVQ_F16).expect("valid"),
            q8_0: parse_quality(KVQ_Q8).expect("valid"),
            info: BTreeMap::new(),
        };
        let peer = || Peer {
            q8_0: parse_quality(PEERQ).expect("valid"),
            info: BTreeMap::new(),
        };
        let measured = |input| Measured {
            input,
            ours: sides(),
            peer: peer(),
        };
        let text = Path::new("/texts/GPL-3");
        let mine = Path::new("/home/me/chats.json");
        let r = report(
            &machine,
            text,
            Some(mine),
            &[measured(Input::Text), measured(Input::Conversations)],
        );
        assert!(
            r.contains("## Conversations\n\nThe conversations of /home/me/chats.json, each"),
            "{r}"
        );
        assert!(!r.contains("agentkv demo"));

        // A base model: the text alone, and the report says why.
        let r = report(&machine, text, None, &[measured(Input::Text)]);
        assert!(r.contains("## A held-out text"));
        assert!(!r.contains("## Conversations") && !r.contains("conversations of"));
        assert!(r.contains("No conversations: the model has no chat template"));
    }

    #[test]
    fn a_missing_input_says_what_to_pass() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("text.txt");
        std::fs::write(&file, "some text").expect("write");
        let chats = dir.path().join("chats.json");
        std::fs::write(&chats, "{}").expect("write");

        let err = check_inputs(&dir.path().join("nope.txt"), None).expect_err("missing");
        assert!(format!("{err:#}").contains("--text PATH"), "{err:#}");
        // A directory is not a text either.
        assert!(check_inputs(dir.path(), None).is_err());
        check_inputs(&file, None).expect("a file");

        let err = check_inputs(&file, Some(&dir.path().join("nope.json"))).expect_err("missing");
        assert!(format!("{err:#}").contains("--chat PATH"), "{err:#}");
        assert!(check_inputs(&file, Some(dir.path())).is_err());
        check_inputs(&file, Some(&chats)).expect("both files");
    }
}
