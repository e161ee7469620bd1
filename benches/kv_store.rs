//! kv-store against plain file I/O of the same bytes, side by side in one run.
//!
//! A cache shaped like SmolLM2-135M (30 layers, 3 KV heads, head dim 64, f16) at 1K, 4K and
//! 16K tokens:
//! - `save/agentkv` (segment + manifest, fsyncs, rename) vs `save/write_all+sync_all`;
//! - `load/agentkv` (map, validate, checksum, K/V ready) vs `load/fs::read`;
//! - `incremental/64-token turn on 4K` vs `incremental/full rewrite of 4K+64`.

use std::hint::black_box;
use std::io::Write;
use std::ops::Range;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kv_store::{KvKind, KvSource, Store};

#[path = "smollm2_shape.rs"]
mod shape;

use shape::{HEAD_DIM, KV_HEADS, LAYERS, meta};

/// A cache held as one f16 byte buffer per layer and kind, `[KV_HEADS, capacity, HEAD_DIM]`.
struct Blob {
    tokens: Vec<u32>,
    capacity: usize,
    data: Vec<Vec<u8>>,
}

impl Blob {
    fn new(n: usize, salt: u32) -> Blob {
        let bytes = KV_HEADS * n * HEAD_DIM * 2;
        let data = (0..2 * LAYERS)
            .map(|l| {
                (0..bytes)
                    .map(|i| (i as u32 ^ (l as u32 * 7919) ^ salt) as u8)
                    .collect()
            })
            .collect();
        Blob {
            tokens: (0..n as u32)
                .map(|t| t.wrapping_add(salt) % 49_152)
                .collect(),
            capacity: n,
            data,
        }
    }

    fn total_bytes(&self) -> usize {
        self.data.iter().map(Vec::len).sum()
    }
}

impl KvSource for Blob {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn write_kv(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        let buf = &self.data[2 * layer + usize::from(kind == KvKind::V)];
        let row = HEAD_DIM * 2;
        for h in 0..KV_HEADS {
            let head = &buf[h * self.capacity * row..];
            out.extend_from_slice(&head[range.start * row..range.end * row]);
        }
    }
}

fn bench_dir() -> tempfile::TempDir {
    // Under target/, on the project's disk: /tmp may be a RAM disk, which would flatter fsync.
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp");
    std::fs::create_dir_all(&base).expect("create bench dir");
    tempfile::tempdir_in(base).expect("tempdir")
}

/// An empty store in a fresh directory (the directory lives as long as the `TempDir`).
fn fresh_store() -> (tempfile::TempDir, Store) {
    let dir = bench_dir();
    let store = Store::open(dir.path()).expect("open");
    (dir, store)
}

fn save_and_load(c: &mut Criterion) {
    let meta = meta();
    for n in [1024, 4096, 16384] {
        let blob = Blob::new(n, 1);
        let plain = vec![7u8; blob.total_bytes()];
        let label = format!("{}K", n / 1024);

        let mut g = c.benchmark_group(format!("save/{label}"));
        g.throughput(Throughput::Bytes(blob.total_bytes() as u64));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(if n > 4096 { 20 } else { 8 }));
        g.bench_function("agentkv", |b| {
            b.iter_batched(
                fresh_store,
                |(dir, store)| {
                    store.save("bench", &meta, &blob).expect("save");
                    dir
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("write_all+sync_all", |b| {
            b.iter_batched(
                bench_dir,
                |dir| {
                    let mut f = std::fs::File::create(dir.path().join("plain")).expect("create");
                    f.write_all(&plain).expect("write");
                    f.sync_all().expect("sync");
                    dir
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();

        let (_dir, store) = fresh_store();
        store.save("bench", &meta, &blob).expect("save");
        let id = store
            .manifest("bench")
            .expect("manifest")
            .expect("saved")
            .segments[0]
            .id
            .clone();
        let seg_path = store.segment_path(&id);
        let mut g = c.benchmark_group(format!("load/{label}"));
        g.throughput(Throughput::Bytes(blob.total_bytes() as u64));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(if n > 4096 { 15 } else { 5 }));
        g.bench_function("agentkv", |b| {
            b.iter(|| {
                let loaded = store.load("bench", &meta).expect("load");
                let mut touched = 0;
                for layer in 0..LAYERS {
                    touched +=
                        loaded.kv(layer, KvKind::K).len() + loaded.kv(layer, KvKind::V).len();
                }
                black_box((loaded, touched))
            })
        });
        g.bench_function("fs::read", |b| {
            b.iter(|| black_box(std::fs::read(&seg_path).expect("read")))
        });
        g.finish();
    }
}

fn incremental(c: &mut Criterion) {
    let meta = meta();
    let base = Blob::new(4096 + 64, 2);
    let mut history = Blob::new(4096 + 64, 2);
    history.tokens.truncate(4096);
    let mut g = c.benchmark_group("incremental/4K");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("64-token turn", |b| {
        b.iter_batched(
            || {
                let (dir, store) = fresh_store();
                store.save("bench", &meta, &history).expect("save history");
                (dir, store)
            },
            |(dir, store)| {
                let report = store.save("bench", &meta, &base).expect("save turn");
                assert_eq!(report.new_tokens, 64);
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("full rewrite of 4K+64", |b| {
        b.iter_batched(
            fresh_store,
            |(dir, store)| {
                store.save("bench", &meta, &base).expect("save");
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, save_and_load, incremental);
criterion_main!(benches);
