//! The remote tier against a real Garage cluster (three `garage` processes on loopback
//! ports, replication factor 3): segments pushed through one node are fetched through
//! another, byte for byte and verified; a shared prefix is stored once; a damaged object, a
//! stopped node and a stopped cluster give clear errors and leave the local store as it was.
// Test code: a failed unwrap is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use kv_remote::testing::{Garage, garage_binary};
use kv_remote::{Error, Transfer};
use kv_store::testing::meta;
use kv_store::{CacheMeta, KvDtype, KvKind, KvSource, SegmentId, Store};

/// A cache whose K/V bytes follow from (layer, kind, head, position, token).
struct Source {
    meta: CacheMeta,
    tokens: Vec<u32>,
}

impl KvSource for Source {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn write_kv(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        let row = self.meta.row_bytes();
        for head in 0..self.meta.model.n_kv_heads as usize {
            for pos in range.clone() {
                let seed = self.tokens[pos] as usize * 131 + pos * 31 + layer * 7 + head * 3;
                let seed = seed + usize::from(kind == KvKind::V);
                out.extend((0..row).map(|i| (seed + i * 17) as u8));
            }
        }
    }
}

fn small_meta() -> CacheMeta {
    meta(2, 2, 32, KvDtype::F16)
}

/// Saves `name` in `store` as the chain of saves at the given lengths; returns its chain.
fn save_in_steps(store: &Store, name: &str, tokens: &[u32], steps: &[usize]) -> Vec<SegmentId> {
    let meta = small_meta();
    for &n in steps {
        let source = Source {
            meta: meta.clone(),
            tokens: tokens[..n].to_vec(),
        };
        store.save(name, &meta, &source).unwrap();
    }
    let manifest = store.manifest(name).unwrap().unwrap();
    manifest.segments.into_iter().map(|s| s.id).collect()
}

fn cluster(dir: &Path) -> Option<Garage> {
    let binary = garage_binary()?;
    Some(Garage::start(&binary, &dir.join("garage"), 3))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn segments_pushed_through_one_node_are_fetched_through_another_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(garage) = cluster(dir.path()) else {
        return;
    };
    let host_a = Store::open(&dir.path().join("a")).unwrap();
    let host_b = Store::open(&dir.path().join("b")).unwrap();
    let remote_a = garage.remote(0, "team/one");
    let remote_b = garage.remote(2, "team/one");

    // Two agents whose first segment (a shared system prompt) is the same.
    let system: Vec<u32> = (1..=40).collect();
    let mut alice = system.clone();
    alice.extend(100..160);
    let mut bob = system.clone();
    bob.extend(500..530);
    let alice_chain = save_in_steps(&host_a, "alice", &alice, &[40, 70, 100]);
    let bob_chain = save_in_steps(&host_a, "bob", &bob, &[40, 70]);
    assert_eq!(alice_chain[0], bob_chain[0]);

    let mut uploaded = 0;
    for id in &alice_chain {
        let t = remote_a.push_segment(&host_a, id).unwrap();
        assert!(!t.already_there && t.bytes > 0);
        uploaded += t.bytes;
    }
    let t = remote_a.push_segment(&host_a, &bob_chain[0]).unwrap();
    assert_eq!(
        t,
        Transfer {
            bytes: 0,
            already_there: true
        }
    );
    remote_a.push_segment(&host_a, &bob_chain[1]).unwrap();
    let mut listed = remote_b.list_segments().unwrap();
    listed.sort();
    let mut expected: Vec<SegmentId> = alice_chain.iter().chain(&bob_chain[1..]).cloned().collect();
    expected.sort();
    assert_eq!(listed, expected, "the shared segment is stored once");

    // Host B fetches alice through another node: the same bytes, and the cache loads.
    let mut downloaded = 0;
    for id in &alice_chain {
        let t = remote_b.fetch_segment(&host_b, id).unwrap();
        assert!(!t.already_there);
        downloaded += t.bytes;
        assert_eq!(
            std::fs::read(host_b.segment_path(id)).unwrap(),
            std::fs::read(host_a.segment_path(id)).unwrap()
        );
    }
    assert_eq!(downloaded, uploaded);
    let meta = small_meta();
    let on_b = host_b.adopt("alice", &meta, &alice_chain).unwrap();
    let on_a = host_a.load("alice", &meta).unwrap();
    assert_eq!(on_b.tokens(), on_a.tokens());
    for layer in 0..2 {
        assert_eq!(&*on_b.kv(layer, KvKind::V), &*on_a.kv(layer, KvKind::V));
    }
    let t = remote_b.fetch_segment(&host_b, &alice_chain[0]).unwrap();
    assert_eq!(
        t,
        Transfer {
            bytes: 0,
            already_there: true
        }
    );
}

#[test]
fn damaged_objects_and_unreachable_nodes_are_errors_that_change_nothing_locally() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut garage) = cluster(dir.path()) else {
        return;
    };
    let host_a = Store::open(&dir.path().join("a")).unwrap();
    let host_b = Store::open(&dir.path().join("b")).unwrap();
    let remote_a = garage.remote(0, "");
    let tokens: Vec<u32> = (1..=90).collect();
    let chain = save_in_steps(&host_a, "alice", &tokens, &[30, 60, 90]);
    for id in &chain {
        remote_a.push_segment(&host_a, id).unwrap();
    }
    let good = std::fs::read(host_a.segment_path(&chain[1])).unwrap();
    let segments_b = host_b.root().join("segments");

    // A truncated object, an altered byte, another segment's bytes under this id: each is
    // Damaged, and host B keeps no file (nor any temporary one).
    let mut altered = good.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let other = std::fs::read(host_a.segment_path(&chain[2])).unwrap();
    let name = format!("segments/{}.safetensors", chain[1]);
    for bad in [good[..good.len() / 2].to_vec(), altered, other] {
        remote_a.put_raw(&name, bad).unwrap();
        let err = garage
            .remote(1, "")
            .fetch_segment(&host_b, &chain[1])
            .unwrap_err();
        assert!(matches!(err, Error::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("push the segment again"), "{err}");
        assert!(
            files_in(&segments_b).is_empty(),
            "{:?}",
            files_in(&segments_b)
        );
    }
    remote_a.put_raw(&name, good.clone()).unwrap();

    // One node down: the node it was talking to fails fast and clearly; the other two still
    // serve everything (replication factor 3, quorum 2).
    garage.stop_node(2);
    let through_stopped = garage.remote(2, "");
    let started = Instant::now();
    let err = through_stopped
        .fetch_segment(&host_b, &chain[0])
        .unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err}");
    assert!(err.to_string().contains("AWS_ENDPOINT_URL"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(files_in(&segments_b).is_empty());
    let remote_b = garage.remote(1, "");
    for id in &chain {
        remote_b.fetch_segment(&host_b, id).unwrap();
    }
    assert!(host_b.adopt("alice", &small_meta(), &chain).is_ok());
    garage.start_node(2);

    // The whole cluster down: pushes and fetches are errors; local stores work as before.
    for i in 0..3 {
        garage.stop_node(i);
    }
    let host_c = Store::open(&dir.path().join("c")).unwrap();
    let err = remote_b.fetch_segment(&host_c, &chain[0]).unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err}");
    let more: Vec<u32> = (1..=120).collect();
    let longer = save_in_steps(&host_a, "alice", &more, &[120]);
    let err = remote_a.push_segment(&host_a, &longer[3]).unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err}");
    assert_eq!(
        host_a.load("alice", &small_meta()).unwrap().tokens(),
        more.as_slice()
    );
}

#[test]
fn bad_urls_are_clear_errors() {
    for (url, says) in [
        ("http://bucket/x", "s3://bucket"),
        ("s3://", "bucket name is empty"),
        ("s3://b/../x", "not a plain path"),
        ("s3://b/x//y", "not a plain path"),
    ] {
        let err = kv_remote::Remote::open(url, &[]).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{url}: {err}");
        assert!(err.to_string().contains(says), "{url}: {err}");
    }
    let err = kv_remote::Remote::open("s3://b", &[("no_such_option", "1")]).unwrap_err();
    assert!(err.to_string().contains("no_such_option"), "{err}");
}

fn value(host: &str, n: u64) -> String {
    format!(r#"{{"host":"{host}","nonce":{n},"turn":"the turn {host} added at {n}"}}"#)
}

#[test]
fn two_hosts_advancing_one_agent_at_once_never_both_win() {
    let dir = tempfile::tempdir().unwrap();
    let Some(garage) = cluster(dir.path()) else {
        return;
    };
    let (a, b) = (garage.remote(0, "shared"), garage.remote(2, "shared"));
    let reader = garage.remote(1, "shared");
    let mut wins = [0, 0];
    for generation in 1..=20u64 {
        // Both start the same generation at the same moment, through different nodes.
        let barrier = std::sync::Barrier::new(2);
        let (da, db) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                barrier.wait();
                a.propose("agent", generation, "host-a", &value("a", generation))
            });
            let tb = s.spawn(|| {
                barrier.wait();
                b.propose("agent", generation, "host-b", &value("b", generation))
            });
            (ta.join().unwrap().unwrap(), tb.join().unwrap().unwrap())
        });
        let decided = reader.decided("agent", generation).unwrap().unwrap();
        match (&da, &db) {
            (kv_remote::Decision::Won, kv_remote::Decision::Lost { winner }) => {
                assert_eq!(*winner, value("a", generation));
                assert_eq!(decided, value("a", generation));
                wins[0] += 1;
            }
            (kv_remote::Decision::Lost { winner }, kv_remote::Decision::Won) => {
                assert_eq!(*winner, value("b", generation));
                assert_eq!(decided, value("b", generation));
                wins[1] += 1;
            }
            other => panic!("generation {generation}: {other:?}"),
        }
    }
    eprintln!("wins of host a and host b over 20 races: {wins:?}");
    assert_eq!(reader.latest("agent", 0).unwrap().map(|(g, _)| g), Some(20));
    // A host behind the others learns the newer value instead of overwriting it.
    let late = a.propose("agent", 7, "host-c", &value("c", 7)).unwrap();
    let seventh = reader.decided("agent", 7).unwrap().unwrap();
    assert_eq!(late, kv_remote::Decision::Lost { winner: seventh });
}

#[test]
fn a_proposer_that_stopped_half_way_is_completed_or_overruled() {
    let dir = tempfile::tempdir().unwrap();
    let Some(garage) = cluster(dir.path()) else {
        return;
    };
    let a = garage.remote(0, "");
    let block = |generation: u64, json: &str| {
        let name = format!("heads/agent/{generation:020}/host-c");
        a.put_raw(&name, json.as_bytes().to_vec()).unwrap();
    };
    // Host c accepted its value and stopped before recording the decision: the value may
    // have been decided, so a later proposer completes it.
    let c1 = value("c", 1);
    block(
        1,
        &format!(r#"{{"mbal":[1,"host-c"],"bal":[1,"host-c"],"value":{c1}}}"#),
    );
    assert_eq!(a.decided("agent", 1).unwrap(), None);
    assert_eq!(
        a.propose("agent", 1, "host-a", &value("a", 1)).unwrap(),
        kv_remote::Decision::Lost { winner: c1.clone() }
    );
    assert_eq!(a.decided("agent", 1).unwrap(), Some(c1));
    // Host c only announced a ballot (a high one): nothing can have been decided, and a
    // proposer wins with a higher ballot.
    block(2, r#"{"mbal":[7,"host-c"],"bal":null,"value":null}"#);
    assert_eq!(
        a.propose("agent", 2, "host-a", &value("a", 2)).unwrap(),
        kv_remote::Decision::Won
    );
    assert_eq!(a.latest("agent", 0).unwrap(), Some((2, value("a", 2))));
    // A block that is not what the protocol writes is an error, not a vote to ignore.
    block(3, "{not json");
    let err = a.propose("agent", 3, "host-a", &value("a", 3)).unwrap_err();
    assert!(matches!(err, Error::Head { .. }), "{err}");
    // Bad names are refused before anything is written.
    assert!(a.propose("../x", 1, "host-a", "{}").is_err());
    assert!(a.propose("agent", 4, "Host A", "{}").is_err());
    assert!(a.propose("agent", 4, "host-a", "not json").is_err());
    assert_eq!(a.decided("agent", 4).unwrap(), None);
}

#[test]
fn a_node_stopped_mid_upload_leaves_no_object_a_fetch_would_accept() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut garage) = cluster(dir.path()) else {
        return;
    };
    // A segment large enough that its upload takes most of a second here: 8 layers of 8 KV
    // heads of 128, 3,072 tokens, f16: 100 MB.
    let meta = meta(8, 8, 128, KvDtype::F16);
    let host_a = Store::open(&dir.path().join("a")).unwrap();
    let save = |tokens: Vec<u32>| {
        let source = Source {
            meta: meta.clone(),
            tokens,
        };
        host_a.save("big", &meta, &source).unwrap();
        host_a.manifest("big").unwrap().unwrap().segments[0]
            .id
            .clone()
    };
    let big = save((0..3072).collect());

    // The node serving the upload dies half-way: the push fails clearly.
    let through_0 = garage.remote(0, "");
    let (result, was_running) = std::thread::scope(|s| {
        let push = s.spawn(|| through_0.push_segment(&host_a, &big));
        std::thread::sleep(Duration::from_millis(150));
        let was_running = !push.is_finished();
        garage.stop_node(0);
        (push.join().unwrap(), was_running)
    });
    assert!(was_running, "the upload ended before the node was stopped");
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err}");
    // Whatever the other nodes hold under that key, a fetch accepts only the whole segment.
    let through_1 = garage.remote(1, "");
    let host_b = Store::open(&dir.path().join("b")).unwrap();
    match through_1.fetch_segment(&host_b, &big) {
        Ok(t) => assert_eq!(
            std::fs::read(host_b.segment_path(&big)).unwrap().len() as u64,
            t.bytes
        ),
        Err(e) => {
            assert!(
                matches!(e, Error::Remote { .. } | Error::Damaged { .. }),
                "{e}"
            );
            assert!(files_in(&host_b.root().join("segments")).is_empty());
        }
    }
    // Pushed again through a live node, it is there for everyone.
    through_1.push_segment(&host_a, &big).unwrap();
    garage.start_node(0);
    let host_c = Store::open(&dir.path().join("c")).unwrap();
    garage.remote(0, "").fetch_segment(&host_c, &big).unwrap();
    assert_eq!(
        std::fs::read(host_c.segment_path(&big)).unwrap(),
        std::fs::read(host_a.segment_path(&big)).unwrap()
    );

    // Another node dies during an upload it does not serve: two of three replicas remain, a
    // quorum, and the upload completes.
    let other = save((10_000..13_072).collect());
    let result = std::thread::scope(|s| {
        let push = s.spawn(|| through_1.push_segment(&host_a, &other));
        std::thread::sleep(Duration::from_millis(150));
        garage.stop_node(2);
        push.join().unwrap()
    });
    assert!(!result.unwrap().already_there);
    let host_d = Store::open(&dir.path().join("d")).unwrap();
    garage.remote(0, "").fetch_segment(&host_d, &other).unwrap();
}
