//! kv-store end to end: round trips over random shapes and segment splits, crash safety at
//! every step of a save, and bad bytes of every kind.
// Test code: a failed unwrap is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

use std::ops::Range;
use std::path::{Path, PathBuf};

use kv_store::testing::{edit_segment_header, meta};
use kv_store::{
    CacheMeta, Error, KvDtype, KvKind, KvSource, Manifest, ReadMode, Segment, Step, Store,
};
use proptest::prelude::*;

/// A cache whose K/V bytes are a pure function of (layer, kind, head, salt of the position,
/// byte index), so the expected content of any load can be recomputed.
#[derive(Clone, Debug)]
struct Fake {
    meta: CacheMeta,
    tokens: Vec<u32>,
    salts: Vec<u64>,
}

fn byte(layer: usize, kind: KvKind, head: usize, salt: u64, i: usize) -> u8 {
    let x = (layer as u64 * 1_000_003)
        ^ ((kind == KvKind::V) as u64 * 7919)
        ^ (head as u64 * 104_729)
        ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64 * 31);
    (x ^ (x >> 29)) as u8
}

impl Fake {
    fn new(meta: CacheMeta) -> Fake {
        Fake {
            meta,
            tokens: Vec::new(),
            salts: Vec::new(),
        }
    }

    fn push(&mut self, n: usize, salt_base: u64) {
        for i in 0..n {
            let pos = self.tokens.len() as u64;
            let salt = salt_base
                .wrapping_mul(1_000_003)
                .wrapping_add(pos * 1_000 + i as u64);
            // As in a real model, the K/V of a position follow from the tokens: the token id is
            // derived from the same salt, so different content always means different tokens.
            self.tokens
                .push((salt.wrapping_mul(2_654_435_761) >> 7) as u32 % 50_000);
            self.salts.push(salt);
        }
    }

    fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.salts.truncate(n);
    }

    fn expected(&self, layer: usize, kind: KvKind) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_kv(layer, kind, 0..self.tokens.len(), &mut out);
        out
    }
}

impl KvSource for Fake {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn write_kv(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        let row = self.meta.row_bytes();
        for h in 0..self.meta.model.n_kv_heads as usize {
            for p in range.clone() {
                out.extend((0..row).map(|i| byte(layer, kind, h, self.salts[p], i)));
            }
        }
    }
}

fn small_meta() -> CacheMeta {
    meta(2, 2, 4, KvDtype::F16)
}

fn assert_loads(store: &Store, name: &str, fake: &Fake) {
    let loaded = store.load(name, &fake.meta).expect("load");
    assert_eq!(loaded.tokens(), fake.tokens.as_slice());
    for layer in 0..fake.meta.model.n_layers as usize {
        for kind in [KvKind::K, KvKind::V] {
            assert_eq!(
                &*loaded.kv(layer, kind),
                fake.expected(layer, kind).as_slice(),
                "layer {layer} {kind:?}"
            );
        }
    }
}

fn dtype_strategy() -> impl Strategy<Value = KvDtype> {
    prop_oneof![Just(KvDtype::F32), Just(KvDtype::F16), Just(KvDtype::Bf16)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the shapes and however the tokens were split into saves, a load returns the
    /// concatenation of what was saved, in both read modes.
    #[test]
    fn round_trip(
        n_layers in 1u32..4,
        n_kv_heads in 1u32..4,
        head_dim in prop_oneof![Just(1u32), Just(2), Just(8), Just(64)],
        dtype in dtype_strategy(),
        chunks in proptest::collection::vec(1usize..40, 1..6),
        mmap in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mode = if mmap { ReadMode::Mmap } else { ReadMode::Buffered };
        let store = Store::open(dir.path()).unwrap().with_read_mode(mode);
        let mut fake = Fake::new(meta(n_layers, n_kv_heads, head_dim, dtype));
        for (i, &n) in chunks.iter().enumerate() {
            let before = fake.tokens.len();
            fake.push(n, i as u64);
            let report = store.save("a", &fake.meta.clone(), &fake).unwrap();
            prop_assert_eq!(report.reused_tokens, before);
            prop_assert_eq!(report.new_tokens, n);
        }
        let loaded = store.load("a", &fake.meta).unwrap();
        prop_assert_eq!(loaded.segments().len(), chunks.len());
        assert_loads(&store, "a", &fake);

        // Compaction keeps the content and leaves one segment.
        store.compact("a").unwrap();
        prop_assert_eq!(store.load("a", &fake.meta).unwrap().segments().len(), 1);
        assert_loads(&store, "a", &fake);
    }

    /// Arbitrary bytes never panic the segment or manifest parsers.
    #[test]
    fn parsers_survive_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Segment::from_bytes(Path::new("fuzz"), bytes.clone());
        let _ = Manifest::decode(Path::new("fuzz"), &bytes);
    }

    /// A valid segment with a few bytes overwritten either fails to load or loads exactly what
    /// was saved: corruption is never silently accepted.
    #[test]
    fn mutated_segments_never_load_wrong_data(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let (_dir, store, fake, path) = one_segment_store();
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        std::fs::write(&path, &bytes).unwrap();
        if store.load("a", &fake.meta).is_ok() {
            assert_loads(&store, "a", &fake);
        }
    }
}

/// A store holding cache "a" as one segment of 5 tokens; returns the segment's path.
fn one_segment_store() -> (tempfile::TempDir, Store, Fake, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut fake = Fake::new(small_meta());
    fake.push(5, 0);
    store.save("a", &fake.meta, &fake).unwrap();
    let id = store.manifest("a").unwrap().unwrap().segments[0].id.clone();
    let path = store.segment_path(&id);
    (dir, store, fake, path)
}

#[test]
fn truncated_cache_keeps_matching_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut fake = Fake::new(small_meta());
    for i in 0..3 {
        fake.push(10, i);
        store.save("a", &fake.meta, &fake).unwrap();
    }
    // Roll back into the second segment and take another turn: the first segment survives.
    fake.truncate(15);
    fake.push(7, 99);
    let report = store.save("a", &fake.meta, &fake).unwrap();
    assert_eq!((report.reused_tokens, report.new_tokens), (10, 12));
    assert_loads(&store, "a", &fake);
    // Saving again with nothing new writes nothing.
    let again = store.save("a", &fake.meta, &fake).unwrap();
    assert_eq!(
        (again.new_tokens, again.bytes_written, again.generation),
        (0, 0, report.generation)
    );
}

#[test]
fn shared_prefix_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut a = Fake::new(small_meta());
    a.push(20, 0);
    let first = store.save("a", &a.meta, &a).unwrap();
    assert!(first.bytes_written > 0 && !first.deduplicated);
    let mut b = a.clone();
    let shared = store.save("b", &b.meta, &b).unwrap();
    assert!(shared.deduplicated);
    assert_eq!(shared.bytes_written, 0);
    // The two caches diverge after the shared prefix.
    a.push(3, 1);
    b.push(4, 2);
    store.save("a", &a.meta, &a).unwrap();
    store.save("b", &b.meta, &b).unwrap();
    assert_loads(&store, "a", &a);
    assert_loads(&store, "b", &b);
    let segments = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .count();
    assert_eq!(segments, 3);

    // Deleting "a" and collecting frees only its own tail.
    assert!(store.delete("a").unwrap());
    let gc = store.gc().unwrap();
    assert_eq!(gc.segments_removed, 1);
    assert!(gc.bytes_freed > 0);
    assert_loads(&store, "b", &b);
    assert!(matches!(
        store.load("a", &a.meta),
        Err(Error::NotFound { .. })
    ));
}

/// A store where cache "a" holds 8 tokens (committed), and the same cache with 5 more
/// tokens that a test is about to save (pending).
fn committed_then_pending() -> (tempfile::TempDir, Store, Fake, Fake) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut fake = Fake::new(small_meta());
    fake.push(8, 0);
    store.save("a", &fake.meta, &fake).unwrap();
    let committed = fake.clone();
    fake.push(5, 1);
    (dir, store, committed, fake)
}

/// Temporary files left in the store's directories.
fn temp_files(root: &Path) -> usize {
    ["segments", "manifests"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".tmp")
        })
        .count()
}

#[test]
fn crash_at_every_step_keeps_last_commit() {
    for step in Step::ALL {
        let (dir, store, committed, fake) = committed_then_pending();
        kv_store::crash_after(Some(step));
        let err = store.save("a", &fake.meta, &fake).unwrap_err();
        assert!(
            matches!(err, Error::SimulatedCrash(s) if s == step),
            "{step:?}: {err}"
        );

        // Reopen as a new process would. Before the manifest rename the old state is in force;
        // after it, the new one is (rename is the commit point).
        let store = Store::open(dir.path()).unwrap();
        let expect = if step == Step::ManifestRenamed {
            &fake
        } else {
            &committed
        };
        assert_loads(&store, "a", expect);

        // Garbage collection removes the litter and nothing that is needed.
        store.gc().unwrap();
        let litter = temp_files(dir.path());
        assert_eq!(litter, 0, "{step:?}");
        assert_loads(&store, "a", expect);

        // And the interrupted save can simply be done again.
        store.save("a", &fake.meta, &fake).unwrap();
        assert_loads(&store, "a", &fake);
    }
}

#[test]
fn truncated_segment_is_an_error() {
    let (_dir, store, fake, path) = one_segment_store();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = store.load("a", &fake.meta).unwrap_err();
        assert!(
            matches!(
                err,
                Error::BadSafetensors { .. } | Error::BadMetadata { .. }
            ),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn every_header_byte_flip_is_caught() {
    let (_dir, store, fake, path) = one_segment_store();
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for i in 0..8 + header_len {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        match store.load("a", &fake.meta) {
            Err(_) => {}
            // A flip that keeps the file meaning the same thing (there is none we know of) must
            // at least load the right data.
            Ok(_) => assert_loads(&store, "a", &fake),
        }
    }
}

#[test]
fn flipped_data_byte_is_a_checksum_error() {
    let (_dir, store, fake, path) = one_segment_store();
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for i in (8 + header_len..bytes.len()).step_by(7) {
        let mut bad = bytes.clone();
        bad[i] ^= 0x80;
        std::fs::write(&path, &bad).unwrap();
        let err = store.load("a", &fake.meta).unwrap_err();
        assert!(
            matches!(err, Error::ChecksumMismatch { .. }),
            "byte {i}: {err}"
        );
    }
}

#[test]
fn newer_versions_are_refused_by_name() {
    let (_dir, store, fake, path) = one_segment_store();
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = br#"\"version\":3,"#;
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("version field");
    bytes[at + needle.len() - 2] = b'7';
    std::fs::write(&path, &bytes).unwrap();
    let err = store.load("a", &fake.meta).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                kind: "segment",
                found: 7,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");

    let manifest = store.root().join("manifests/a.json");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace(r#""version":2,"#, r#""version":3,"#);
    std::fs::write(&manifest, text).unwrap();
    let err = store.load("a", &fake.meta).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                kind: "manifest",
                found: 3,
                ..
            }
        ),
        "{err}"
    );
    // A save must not overwrite what a newer build wrote.
    assert!(matches!(
        store.save("a", &fake.meta, &fake),
        Err(Error::UnsupportedVersion { .. })
    ));
}

/// Writes a version 2 manifest at `path` whose body is `body`'s bytes as given, with the
/// envelope members `extra` (JSON text, each followed by a comma) before the checksum.
fn write_manifest(path: &Path, extra: &str, body: &str, checksum: u64) {
    let text = format!(
        r#"{{"format":"agentkv.manifest","version":2,{extra}"checksum":"{checksum:016x}","body":{body}}}"#
    );
    std::fs::write(path, text).unwrap();
}

fn xxh3(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[test]
fn unknown_fields_are_not_damage_and_a_save_keeps_the_manifests() {
    let (_dir, store, mut fake, path) = one_segment_store();
    edit_segment_header(&path, |h| {
        h["written_by"] = "a newer build".into();
        h["extension"] = serde_json::json!({"nested": [1, 2.5, null]});
    });
    let manifest = store.root().join("manifests/a.json");
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let mut body = file["body"].take();
    body["replicas"] = serde_json::json!(["host-a", "host-b"]);
    body["note"] = "ünïcode \"quoted\"".into();
    // Another writer's spacing, too: the checksum covers the bytes as stored.
    let body = serde_json::to_string_pretty(&body).unwrap();
    write_manifest(&manifest, r#""tool":"x","#, &body, xxh3(body.as_bytes()));
    assert_loads(&store, "a", &fake);
    let m = store.manifest("a").unwrap().unwrap();
    assert_eq!(
        m.unknown["replicas"],
        serde_json::json!(["host-a", "host-b"])
    );

    // A save of a longer cache keeps the chain's first segment (its id does not cover the
    // unknown header fields) and the manifest's unknown fields.
    fake.push(3, 1);
    let report = store.save("a", &fake.meta, &fake).unwrap();
    assert_eq!((report.reused_tokens, report.new_tokens), (5, 3));
    assert_loads(&store, "a", &fake);
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains(r#""replicas":["host-a","host-b"]"#), "{text}");
    assert!(text.contains(r#""note":"ünïcode \"quoted\"""#), "{text}");
    assert_eq!(store.manifest("a").unwrap().unwrap().unknown.len(), 2);

    // The same body under a wrong checksum is damage.
    write_manifest(&manifest, "", &body, xxh3(body.as_bytes()) ^ 1);
    assert!(matches!(
        store.manifest("a"),
        Err(Error::BadMetadata { .. })
    ));
}

#[test]
fn meta_is_a_closed_set_of_fields() {
    // The segment id covers every field of `meta`: one more is damage, not ignored (what
    // changes K/V beyond the named fields goes into `model.extra`).
    let (_dir, store, fake, path) = one_segment_store();
    edit_segment_header(&path, |h| {
        h["meta"]["model"]["rope_scaling"] = "yarn".into()
    });
    let err = store.load("a", &fake.meta).unwrap_err();
    assert!(matches!(err, Error::BadMetadata { .. }), "{err}");
    assert!(err.to_string().contains("rope_scaling"), "{err}");
}

#[test]
fn version_1_manifests_still_load() {
    let (_dir, store, fake, _path) = one_segment_store();
    let manifest = store.root().join("manifests/a.json");
    let m = store.manifest("a").unwrap().unwrap();
    // Version 1: the checksum of serde_json's compact encoding of the body, whatever the
    // body's bytes in the file.
    let compact = serde_json::to_vec(&m).unwrap();
    let v1 = serde_json::json!({
        "format": "agentkv.manifest",
        "version": 1,
        "checksum": format!("{:016x}", xxh3(&compact)),
        "body": m,
    });
    std::fs::write(&manifest, serde_json::to_string_pretty(&v1).unwrap()).unwrap();
    assert_loads(&store, "a", &fake);
    let mut bad = v1.clone();
    bad["body"]["generation"] = 9.into();
    std::fs::write(&manifest, bad.to_string()).unwrap();
    assert!(matches!(
        store.manifest("a"),
        Err(Error::BadMetadata { .. })
    ));
}

#[test]
fn another_models_cache_is_a_typed_error() {
    let (_dir, store, fake, _path) = one_segment_store();
    let mut other = fake.meta.clone();
    other.model.weights_hash = "fedcba9876543210".into();
    match store.load("a", &other).unwrap_err() {
        Error::FingerprintMismatch {
            field,
            expected,
            found,
            ..
        } => {
            assert_eq!(field, "model weights");
            assert_eq!(expected, "fedcba9876543210");
            assert_eq!(found, "0123456789abcdef");
        }
        e => panic!("unexpected {e}"),
    }
    let mut other = fake.meta.clone();
    other.dtype = KvDtype::F32;
    assert!(matches!(
        store.load("a", &other),
        Err(Error::FingerprintMismatch {
            field: "kv dtype",
            ..
        })
    ));
}

#[test]
fn segment_from_another_model_under_the_right_name_is_caught() {
    let (_dir, store, fake, path) = one_segment_store();
    // Write the same tokens under another model, then swap its file in under the first id.
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Store::open(dir2.path()).unwrap();
    let mut other = fake.clone();
    other.meta.model.weights_hash = "ffff".into();
    store2.save("a", &other.meta, &other).unwrap();
    let id2 = store2.manifest("a").unwrap().unwrap().segments[0]
        .id
        .clone();
    std::fs::copy(store2.segment_path(&id2), &path).unwrap();
    let err = store.load("a", &fake.meta).unwrap_err();
    assert!(
        matches!(
            err,
            Error::FingerprintMismatch {
                field: "model weights",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn missing_segment_and_damaged_manifest() {
    let (_dir, store, fake, path) = one_segment_store();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        store.load("a", &fake.meta),
        Err(Error::SegmentMissing { .. })
    ));

    let manifest = store.root().join("manifests/a.json");
    let mut bytes = std::fs::read(&manifest).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x04;
    std::fs::write(&manifest, &bytes).unwrap();
    assert!(matches!(
        store.load("a", &fake.meta),
        Err(Error::BadMetadata { .. })
    ));
    // gc refuses to run while a manifest is unreadable: it might delete what that one needed.
    assert!(store.gc().is_err());
    // A save replaces the damaged manifest (it described nothing loadable any more).
    store.save("a", &fake.meta, &fake).unwrap();
    assert_loads(&store, "a", &fake);
}

#[test]
fn bad_names_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let fake = Fake::new(small_meta());
    for name in ["", "../x", "a/b", "UPPER", "dot.dot", &"x".repeat(65)] {
        assert!(
            matches!(
                store.save(name, &fake.meta, &fake),
                Err(Error::InvalidName { .. })
            ),
            "{name:?}"
        );
        assert!(
            matches!(store.load(name, &fake.meta), Err(Error::InvalidName { .. })),
            "{name:?}"
        );
    }
    assert!(matches!(
        store.load("nobody", &fake.meta),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn segment_is_plain_safetensors() {
    let (_dir, _store, fake, path) = one_segment_store();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors_names(&bytes);
    assert!(st.contains(&"tokens".to_string()));
    assert!(st.contains(&"layers.1.v".to_string()));
    assert_eq!(st.len(), 1 + 2 * fake.meta.model.n_layers as usize);
}

fn safetensors_names(bytes: &[u8]) -> Vec<String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

#[test]
fn two_stores_writing_one_directory_do_not_corrupt_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let store = Store::open(&path).unwrap();
                let mut fake = Fake::new(small_meta());
                for i in 0..10 {
                    fake.push(3, t * 100 + i);
                    store.save(&format!("w{t}"), &fake.meta, &fake).unwrap();
                    if i % 3 == 0 {
                        store.gc().unwrap();
                    }
                }
                fake
            })
        })
        .collect();
    let fakes: Vec<Fake> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let store = Store::open(&path).unwrap();
    for (t, fake) in fakes.iter().enumerate() {
        assert_loads(&store, &format!("w{t}"), fake);
    }
}

#[test]
fn full_disk_is_a_clear_error_and_loses_nothing() {
    let (dir, store, committed, fake) = committed_then_pending();

    kv_store::fail_writes(Some(std::io::ErrorKind::StorageFull));
    let err = store.save("a", &fake.meta, &fake).unwrap_err();
    kv_store::fail_writes(None);
    assert!(matches!(err, Error::DiskFull { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("free some disk space") && text.contains("intact"),
        "{text}"
    );

    // The last committed state is intact and no temp file is left behind.
    assert_loads(&store, "a", &committed);
    let temps = temp_files(dir.path());
    assert_eq!(temps, 0);
    // Once there is room again, the same save succeeds.
    store.save("a", &fake.meta, &fake).unwrap();
    assert_loads(&store, "a", &fake);
}
