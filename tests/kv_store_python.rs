//! The format as docs/format.md spells it, written and checked by another implementation:
//! `tests/format/python_store.py` (the `safetensors`, `numpy` and `xxhash` packages and the
//! documented canonical encoding) writes a cache that kv-store loads, and checks one that
//! kv-store saved.
// Test code: a failed unwrap is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use kv_store::{CacheMeta, KvDtype, KvKind, KvSource, Store};

/// The Python that runs the script: `cargo xtask ci` makes target/format-venv and names it here.
const PYTHON_ENV: &str = "AGENTKV_FORMAT_PYTHON";

/// The Python to run, or `None` (with a warning on the terminal) when none is given outside
/// CI; under `AGENTKV_REQUIRE_MODEL` (set by `cargo xtask ci`) a missing one fails the test.
fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(PYTHON_ENV) {
        return Some(PathBuf::from(p));
    }
    let fix = format!(
        "set {PYTHON_ENV} to a Python with safetensors, numpy and xxhash \
         (`cargo xtask ci` makes one in target/format-venv)"
    );
    assert!(
        std::env::var_os(engine::testing::REQUIRE_MODEL_ENV).is_none(),
        "{PYTHON_ENV} is not set; {fix}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "warning: the Python interoperability test did not run: {fix}"
    );
    None
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("format/python_store.py")
}

/// The value the script writes at (layer, kind, head, position, dim): a multiple of 1/8 that
/// f16 holds exactly.
fn value(layer: usize, kind: KvKind, head: usize, pos: usize, d: usize) -> f32 {
    let kind = usize::from(kind == KvKind::V);
    ((layer * 7 + kind * 3 + head * 5 + pos * 11 + d) % 97) as f32 / 8.0 - 6.0
}

/// A 3-layer model whose first and last layers slide over a window of 4, with an `extra`
/// entry whose key is not ASCII (its place in the canonical order is by bytes).
fn windowed_meta() -> CacheMeta {
    let mut meta = kv_store::testing::meta(3, 2, 32, KvDtype::F16);
    let extra = &mut meta.model.extra;
    extra.insert("sliding_window".into(), "4".into());
    extra.insert("sliding_window_layers".into(), "SGS".into());
    extra.insert("ünïcode key".into(), "value \"quoted\"".into());
    meta.model.rope_theta = 10_000.5;
    meta
}

/// A cache of the script's values.
struct Values {
    meta: CacheMeta,
    tokens: Vec<u32>,
}

impl KvSource for Values {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn write_kv(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        let width = self.meta.model.head_dim as usize;
        for head in 0..self.meta.model.n_kv_heads as usize {
            for pos in range.clone() {
                for d in 0..width {
                    let v = half::f16::from_f32(value(layer, kind, head, pos, d));
                    out.extend(v.to_le_bytes());
                }
            }
        }
    }
}

fn run(python: &Path, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg(script())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python_store.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_cache_written_in_python_loads_and_python_checks_ours() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let meta = windowed_meta();
    let meta_path = dir.path().join("meta.json");
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();

    run(
        &python,
        &["write", root.to_str().unwrap(), meta_path.to_str().unwrap()],
    );
    let store = Store::open(&root).unwrap();
    let loaded = store.load("py", &meta).unwrap();
    let tokens: Vec<u32> = (0..10u32).map(|i| (i * 7919 + 13) % 50_000).collect();
    assert_eq!(loaded.tokens(), tokens.as_slice());
    let source = Values {
        meta: meta.clone(),
        tokens: tokens.clone(),
    };
    // Sliding layers hold the last 3 positions (the window less the next token's own).
    for (layer, from) in [(0, 7), (1, 0), (2, 7)] {
        assert_eq!(loaded.kv_from(layer), from, "layer {layer}");
        for kind in [KvKind::K, KvKind::V] {
            let mut expected = Vec::new();
            source.write_kv(layer, kind, from..10, &mut expected);
            assert_eq!(
                &*loaded.kv(layer, kind),
                expected.as_slice(),
                "{layer} {kind:?}"
            );
        }
    }
    let manifest = store.manifest("py").unwrap().unwrap();
    assert_eq!(manifest.unknown["written_by"], "python");
    // The ids kv-store computes for those tokens are the script's: a save of the same cache
    // keeps both segments.
    let report = store.save("py", &meta, &source).unwrap();
    assert_eq!((report.reused_tokens, report.new_tokens), (10, 0));

    // The other way: a cache kv-store saved in three steps, checked by the script.
    let mut ours = Values {
        meta: meta.clone(),
        tokens: Vec::new(),
    };
    for n in [5, 6, 17] {
        ours.tokens = (0..n).map(|i| 1000 + i).collect();
        store.save("rs", &meta, &ours).unwrap();
    }
    let out = run(&python, &["check", root.to_str().unwrap(), "rs"]);
    let checked: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(checked["tokens"], serde_json::json!(ours.tokens));
    let ids: Vec<String> = store
        .manifest("rs")
        .unwrap()
        .unwrap()
        .segments
        .iter()
        .map(|s| s.id.to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(checked["ids"], serde_json::json!(ids));
    // And the script's own cache, after kv-store's save left it in place.
    let out = run(&python, &["check", root.to_str().unwrap(), "py"]);
    let checked: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(checked["tokens"], serde_json::json!(tokens));
}
