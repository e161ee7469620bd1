//! The round trip between a [`KvCache`] and kv-store: a cache is saved in the dtype it holds
//! its values in, and loaded by copying them back, so nothing is converted either way.

use std::ops::Range;

use kv_store::{
    CacheMeta, CacheReader, KvKind, KvSource, LoadedCache, Part, SaveReport, Segment,
    SegmentReader, Store,
};
use rayon::prelude::*;

use crate::cache::SlidingWindow;
use crate::{Error, KvCache, KvShape, Result};

/// Spare room given to an imported cache, in tokens, so the next turn does not regrow it.
const IMPORT_HEADROOM: usize = 256;

/// A [`KvSource`] view of a cache: its rows as they are in memory.
struct Export<'a> {
    cache: &'a KvCache,
}

impl KvSource for Export<'_> {
    fn tokens(&self) -> &[u32] {
        self.cache.tokens()
    }

    fn write_kv(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        for h in 0..self.cache.shape().n_kv_heads {
            let rows = match kind {
                KvKind::K => self.cache.k_head(layer, h, range.clone()),
                KvKind::V => self.cache.v_head(layer, h, range.clone()),
            };
            out.extend_from_slice(rows.bytes());
        }
    }
}

impl KvCache {
    /// Saves the cache as `name`. Only tokens not already in the saved chain are written (see
    /// [`Store::save`]). `meta.dtype` must be the cache's own: the bytes are written as they
    /// are, so the file holds exactly what memory held.
    pub fn save(&self, store: &Store, name: &str, meta: &CacheMeta) -> Result<SaveReport> {
        check_shape(self.shape(), meta)?;
        if meta.dtype != self.dtype() {
            return Err(Error::DtypeMismatch {
                cache: self.dtype().to_string(),
                requested: meta.dtype.to_string(),
            });
        }
        Ok(store.save(name, meta, &Export { cache: self })?)
    }

    /// Loads the cache `name`, which must have been made under `expected` (same model,
    /// tokenizer, template and dtype), into a new cache of shape `shape` in that dtype.
    pub fn load(
        store: &Store,
        name: &str,
        expected: &CacheMeta,
        shape: KvShape,
    ) -> Result<KvCache> {
        let reader = store.open_reader(name, expected)?;
        check_shape_and_dtype(shape, reader.meta())?;
        let mut cache = KvCache::new(shape, reader.meta().dtype);
        cache.fill(reader.tokens(), reader.segments(), |l| reader.kv_from(l))?;
        Ok(cache)
    }

    /// Builds a cache from one loaded from disk, copying each segment's bytes straight into
    /// place: the only copy between the page cache and the engine's buffers.
    ///
    /// The new buffers are fresh memory, and touching it costs page faults (about 1 ms per
    /// MB on the machines we measured, more than the copy). A long-running process that
    /// resumes one cache after another can reuse an old cache's buffers with
    /// [`KvCache::import_into`].
    pub fn import(loaded: &LoadedCache, expected: &CacheMeta, shape: KvShape) -> Result<KvCache> {
        check_loaded(loaded, expected, shape)?;
        let mut cache = KvCache::new(shape, loaded.meta().dtype);
        cache.fill(loaded.tokens(), loaded.segments(), |l| loaded.kv_from(l))?;
        Ok(cache)
    }

    /// [`KvCache::import`] into this cache's buffers, which are reused when they have room and
    /// the dtype is the same (new ones otherwise): whatever the cache held is replaced, and
    /// the cache takes the loaded dtype. The shape stays this cache's.
    ///
    /// On error the cache is left empty, its buffers kept.
    pub fn import_into(&mut self, loaded: &LoadedCache, expected: &CacheMeta) -> Result<()> {
        self.clear();
        check_loaded(loaded, expected, self.shape())?;
        self.fill_into(loaded.meta(), loaded.tokens(), loaded.segments(), |l| {
            loaded.kv_from(l)
        })
    }

    /// [`KvCache::load`] into this cache's buffers; see [`KvCache::import_into`].
    ///
    /// On error the cache is left empty, its buffers kept.
    pub fn load_into(&mut self, store: &Store, name: &str, expected: &CacheMeta) -> Result<()> {
        self.clear();
        let reader: CacheReader = store.open_reader(name, expected)?;
        check_shape_and_dtype(self.shape(), reader.meta())?;
        self.fill_into(reader.meta(), reader.tokens(), reader.segments(), |l| {
            reader.kv_from(l)
        })
    }

    /// [`KvCache::fill`] into this cache's buffers, which take the cache's dtype (new ones if
    /// it differs); on error the cache is left empty.
    fn fill_into<S: KvSegment>(
        &mut self,
        meta: &CacheMeta,
        tokens: &[u32],
        segments: &[S],
        kv_from: impl Fn(usize) -> usize,
    ) -> Result<()> {
        if meta.dtype != self.dtype() {
            *self = KvCache::new(self.shape(), meta.dtype);
        }
        self.fill(tokens, segments, kv_from)
            .inspect_err(|_| self.clear())
    }

    /// Copies every segment of a loaded cache (`tokens`, `segments`, each layer's first
    /// position a continuation attends to by `kv_from`) into the cache, which has its dtype:
    /// into buffers with room for it (reused when large enough), each layer from `kv_from`.
    /// kv-store checked each tensor's length against the metadata and that every segment
    /// holds those positions. Each head's rows are read straight into place (`pread`, for a
    /// mapped segment: its pages are never mapped in), and a reader's segment verifies each
    /// tensor's checksum over the bytes as they arrive.
    fn fill<S: KvSegment>(
        &mut self,
        tokens: &[u32],
        segments: &[S],
        kv_from: impl Fn(usize) -> usize,
    ) -> Result<()> {
        let n = tokens.len();
        debug_assert!((0..self.shape().n_layers).all(|l| kv_from(l) <= n));
        self.prepare_import(n, IMPORT_HEADROOM);
        let shape = self.shape();
        let row = self.dtype().row_bytes(shape.head_dim).unwrap_or(0);
        for seg in segments {
            let end = seg.start() + seg.len();
            // Per layer: the positions copied, and where each head's go.
            let plans: Vec<(Range<usize>, Vec<Range<usize>>)> = (0..shape.n_layers)
                .map(|layer| {
                    let from = seg.start().max(self.held_from(layer)).min(end);
                    let heads = (0..shape.n_kv_heads)
                        .filter(|_| from < end)
                        .map(|h| self.row_range(layer, h, from..end))
                        .collect();
                    (from..end, heads)
                })
                .collect();
            // Layers copy in parallel: one core copies at well under the speed memory allows.
            self.layers_mut()
                .par_iter_mut()
                .zip(&plans)
                .enumerate()
                .try_for_each(|(layer, (l, (positions, heads)))| {
                    if heads.is_empty() {
                        // Nothing of this layer is read (nor, from a reader, verified: none of
                        // its bytes enter the cache).
                        return Ok(());
                    }
                    let skip = (positions.start - seg.kv_from(layer)) * row;
                    for kind in [KvKind::K, KvKind::V] {
                        let dst = match kind {
                            KvKind::K => l.k_mut(),
                            KvKind::V => l.v_mut(),
                        };
                        // Each head: the rows before `positions` (read only to be verified),
                        // then its rows into place. Heads lie in order in the buffer.
                        let mut parts = Vec::with_capacity(2 * heads.len());
                        let (mut rest, mut at) = (dst, 0);
                        for to in heads {
                            let (_, tail) = std::mem::take(&mut rest).split_at_mut(to.start - at);
                            let (mine, tail) = tail.split_at_mut(to.len());
                            parts.push(Part::Skip(skip));
                            parts.push(Part::Into(mine));
                            (rest, at) = (tail, to.end);
                        }
                        seg.read(layer, kind, &mut parts)?;
                    }
                    Ok::<(), kv_store::Error>(())
                })?;
        }
        self.set_imported_tokens(tokens);
        Ok(())
    }
}

/// The sliding window `meta` records (see [`CacheMeta::layer_windows`]).
fn sliding_window(meta: &CacheMeta) -> Result<Option<SlidingWindow>> {
    let invalid = |detail: String| {
        Error::Store(kv_store::Error::InvalidInput {
            detail: format!("the cache's sliding windows: {detail}"),
        })
    };
    let windows = meta.layer_windows().map_err(invalid)?;
    let mut found: Option<SlidingWindow> = None;
    for (layer, w) in windows.iter().enumerate() {
        let Some(size) = *w else { continue };
        if layer >= 128 {
            return Err(invalid(format!(
                "layer {layer} slides; at most 128 layers can"
            )));
        }
        let w = found.get_or_insert(SlidingWindow { size, layers: 0 });
        w.layers |= 1 << layer;
    }
    Ok(found)
}

/// A segment as [`KvCache::fill`] reads it: one of a [`LoadedCache`] (verified when it was
/// loaded) or of a [`CacheReader`] (verified as it is read).
trait KvSegment: Sync {
    fn start(&self) -> usize;
    fn len(&self) -> usize;
    fn kv_from(&self, layer: usize) -> usize;
    /// Reads the whole of K or V of `layer` into `parts`, in order.
    fn read(&self, layer: usize, kind: KvKind, parts: &mut [Part<'_>]) -> kv_store::Result<()>;
}

impl KvSegment for Segment {
    fn start(&self) -> usize {
        Segment::start(self)
    }
    fn len(&self) -> usize {
        Segment::len(self)
    }
    fn kv_from(&self, layer: usize) -> usize {
        Segment::kv_from(self, layer)
    }
    fn read(&self, layer: usize, kind: KvKind, parts: &mut [Part<'_>]) -> kv_store::Result<()> {
        self.read_parts(layer, kind, parts)
    }
}

impl KvSegment for SegmentReader {
    fn start(&self) -> usize {
        SegmentReader::start(self)
    }
    fn len(&self) -> usize {
        SegmentReader::len(self)
    }
    fn kv_from(&self, layer: usize) -> usize {
        SegmentReader::kv_from(self, layer)
    }
    fn read(&self, layer: usize, kind: KvKind, parts: &mut [Part<'_>]) -> kv_store::Result<()> {
        self.read_kv(layer, kind, parts)
    }
}

/// Checks that `loaded` was made under `expected` and has `shape`.
fn check_loaded(loaded: &LoadedCache, expected: &CacheMeta, shape: KvShape) -> Result<()> {
    if let Some((field, expected, found)) = expected.first_difference(loaded.meta()) {
        let name = loaded.manifest().name.clone();
        return Err(kv_store::Error::FingerprintMismatch {
            name,
            field,
            expected,
            found,
        }
        .into());
    }
    check_shape_and_dtype(shape, loaded.meta())
}

/// Checks that a cache saved under `meta` has `shape` and a dtype this shape can hold.
fn check_shape_and_dtype(shape: KvShape, meta: &CacheMeta) -> Result<()> {
    check_shape(shape, meta)?;
    let dtype = meta.dtype;
    if !shape.supports(dtype) {
        return Err(Error::UnsupportedDtype {
            dtype: format!("{dtype} with heads of width {}", shape.head_dim),
        });
    }
    Ok(())
}

fn check_shape(shape: KvShape, meta: &CacheMeta) -> Result<()> {
    let m = &meta.model;
    let found = KvShape {
        n_layers: m.n_layers as usize,
        n_kv_heads: m.n_kv_heads as usize,
        head_dim: m.head_dim as usize,
        window: sliding_window(meta)?,
    };
    if found != shape {
        return Err(Error::ShapeMismatch {
            expected: Box::new(shape),
            found: Box::new(found),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kv_store::KvDtype;

    use super::*;
    use crate::SlidingWindow;

    fn shape() -> KvShape {
        KvShape {
            n_layers: 3,
            n_kv_heads: 2,
            head_dim: 32,
            window: None,
        }
    }

    fn meta(dtype: KvDtype) -> CacheMeta {
        let s = shape();
        kv_store::testing::meta(
            s.n_layers as u32,
            s.n_kv_heads as u32,
            s.head_dim as u32,
            dtype,
        )
    }

    fn append(cache: &mut KvCache, tokens: &[u32], seed: f32) {
        let s = cache.shape();
        cache.reserve(tokens.len());
        let start = cache.len();
        for layer in 0..s.n_layers {
            let rows = tokens.len() * s.row_len();
            let k: Vec<f32> = (0..rows)
                .map(|i| ((i as f32 + seed) * 0.37 + layer as f32).sin() * 3.0)
                .collect();
            let v: Vec<f32> = (0..rows)
                .map(|i| ((i as f32 - seed) * 0.11).cos() - layer as f32)
                .collect();
            cache.write_rows(layer, start, &k, &v);
        }
        cache.push_tokens(tokens);
    }

    /// Every byte of K and V the cache holds for its tokens.
    fn all(cache: &KvCache) -> Vec<u8> {
        let s = cache.shape();
        let mut out = Vec::new();
        for layer in 0..s.n_layers {
            for h in 0..s.n_kv_heads {
                out.extend_from_slice(cache.k_head(layer, h, 0..cache.len()).bytes());
                out.extend_from_slice(cache.v_head(layer, h, 0..cache.len()).bytes());
            }
        }
        out
    }

    #[test]
    fn every_dtype_round_trips_bitwise_over_several_saves() {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16, KvDtype::Q8_0] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let meta = meta(dtype);
            let mut cache = KvCache::new(shape(), dtype);
            for turn in 0..4u32 {
                let toks: Vec<u32> = (0..(turn * 7 + 3)).map(|i| turn * 100 + i).collect();
                append(&mut cache, &toks, turn as f32);
                cache.save(&store, "a", &meta).unwrap();
            }
            let back = KvCache::load(&store, "a", &meta, shape()).unwrap();
            assert_eq!(back.dtype(), dtype);
            assert_eq!(back.tokens(), cache.tokens());
            assert_eq!(all(&back), all(&cache), "{dtype}");
            // The file holds the bytes memory held: as many as the cache uses.
            let loaded = store.load("a", &meta).unwrap();
            let on_disk: usize = (0..3)
                .map(|l| loaded.kv(l, KvKind::K).len() + loaded.kv(l, KvKind::V).len())
                .sum();
            assert_eq!(on_disk, cache.bytes_used(), "{dtype}");
        }
    }

    #[test]
    fn a_save_in_another_dtype_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut cache = KvCache::new(shape(), KvDtype::F32);
        append(&mut cache, &[1, 2, 3], 0.0);
        let err = cache.save(&store, "a", &meta(KvDtype::F16)).unwrap_err();
        assert!(matches!(err, Error::DtypeMismatch { .. }), "{err}");
        assert!(err.to_string().contains("convert"), "{err}");
        assert!(store.load_any("a").is_err(), "nothing was written");
        // Converted explicitly, it saves.
        cache
            .convert(KvDtype::F16)
            .save(&store, "a", &meta(KvDtype::F16))
            .unwrap();
    }

    #[test]
    fn another_model_or_shape_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = meta(KvDtype::F16);
        let mut cache = KvCache::new(shape(), KvDtype::F16);
        append(&mut cache, &[1, 2], 0.0);
        cache.save(&store, "a", &meta).unwrap();

        let mut other = meta.clone();
        other.tokenizer = "t2".into();
        let err = KvCache::load(&store, "a", &other, shape()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Store(kv_store::Error::FingerprintMismatch {
                    field: "tokenizer",
                    ..
                })
            ),
            "{err}"
        );

        let wrong = KvShape {
            n_layers: 2,
            ..shape()
        };
        let err = KvCache::load(&store, "a", &meta, wrong).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        let err = cache.save(&store, "b", &{
            let mut m = meta.clone();
            m.model.head_dim = 4;
            m
        });
        assert!(matches!(err, Err(Error::ShapeMismatch { .. })));
    }

    #[test]
    fn a_damaged_tensor_fails_the_load_and_leaves_the_cache_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = meta(KvDtype::F16);
        let mut cache = KvCache::new(shape(), KvDtype::F16);
        append(&mut cache, &(0..40).collect::<Vec<u32>>(), 0.5);
        cache.save(&store, "a", &meta).unwrap();
        let loaded = store.load("a", &meta).unwrap();
        let seg = &loaded.segments()[0];
        let tensor = seg.kv(2, KvKind::V).to_vec();
        let path = seg.path().to_owned();
        drop(loaded);
        // One byte in the middle of layer 2's V, found by its bytes in the file.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes
            .windows(tensor.len())
            .position(|w| w == tensor)
            .expect("the tensor's bytes are in its file");
        bytes[at + tensor.len() / 2] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();

        let mut reused = KvCache::new(shape(), KvDtype::F16);
        append(&mut reused, &[7, 8, 9], 1.0);
        for err in [
            reused.load_into(&store, "a", &meta).unwrap_err(),
            KvCache::load(&store, "a", &meta, shape()).unwrap_err(),
        ] {
            assert!(
                matches!(
                    &err,
                    Error::Store(kv_store::Error::ChecksumMismatch { tensor, .. })
                        if tensor == "layers.2.v"
                ),
                "{err}"
            );
        }
        assert_eq!(reused.len(), 0, "a failed load leaves the cache empty");
    }

    #[test]
    fn import_into_reuses_buffers_and_equals_import() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = meta(KvDtype::F16);
        let mut a = KvCache::new(shape(), KvDtype::F16);
        append(&mut a, &[1, 2, 3, 4, 5, 6, 7], 1.0);
        a.save(&store, "a", &meta).unwrap();
        let mut b = KvCache::new(shape(), KvDtype::F16);
        append(&mut b, &[9; 40], 2.0);
        b.save(&store, "b", &meta).unwrap();
        let fresh_a = KvCache::load(&store, "a", &meta, shape()).unwrap();
        let fresh_b = KvCache::load(&store, "b", &meta, shape()).unwrap();

        // A used cache with room: same buffers, same contents as a fresh import.
        let mut reused = KvCache::with_capacity(shape(), KvDtype::F16, 100);
        append(&mut reused, &[5; 60], 3.0);
        let (ptr, cap) = (reused.k_bytes(0).as_ptr(), reused.capacity());
        reused.load_into(&store, "a", &meta).unwrap();
        assert_eq!((reused.k_bytes(0).as_ptr(), reused.capacity()), (ptr, cap));
        assert_eq!(reused.tokens(), fresh_a.tokens());
        assert_eq!(all(&reused), all(&fresh_a));
        reused.load_into(&store, "b", &meta).unwrap();
        assert_eq!(reused.k_bytes(0).as_ptr(), ptr);
        assert_eq!(all(&reused), all(&fresh_b));

        // Too small: grown, same contents.
        let mut small = KvCache::with_capacity(shape(), KvDtype::F16, 4);
        small.load_into(&store, "b", &meta).unwrap();
        assert!(small.capacity() >= 40);
        assert_eq!(all(&small), all(&fresh_b));

        // Another model's cache: an error, and the cache is empty, buffers kept.
        let mut other = meta.clone();
        other.tokenizer = "t2".into();
        let err = reused.load_into(&store, "a", &other).unwrap_err();
        assert!(matches!(err, Error::Store(_)), "{err}");
        assert!(reused.is_empty());
        assert_eq!(reused.k_bytes(0).as_ptr(), ptr);
        let mut wrong = KvCache::new(
            KvShape {
                n_layers: 2,
                ..shape()
            },
            KvDtype::F16,
        );
        let loaded = store.load("a", &meta).unwrap();
        let err = wrong.import_into(&loaded, &meta).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");

        // A cache in another dtype takes the loaded one's.
        let mut q8 = KvCache::with_capacity(shape(), KvDtype::Q8_0, 100);
        q8.import_into(&loaded, &meta).unwrap();
        assert_eq!(q8.dtype(), KvDtype::F16);
        assert_eq!(all(&q8), all(&fresh_a));
    }

    #[test]
    fn truncated_then_continued_cache_saves_incrementally() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = meta(KvDtype::F32);
        let mut cache = KvCache::new(shape(), KvDtype::F32);
        append(&mut cache, &[1, 2, 3], 0.0);
        cache.save(&store, "a", &meta).unwrap();
        append(&mut cache, &[4, 5, 6], 1.0);
        cache.save(&store, "a", &meta).unwrap();
        cache.truncate(3).unwrap();
        append(&mut cache, &[7, 8], 2.0);
        let report = cache.save(&store, "a", &meta).unwrap();
        assert_eq!((report.reused_tokens, report.new_tokens), (3, 2));
        let back = KvCache::load(&store, "a", &meta, shape()).unwrap();
        assert_eq!(back.tokens(), &[1, 2, 3, 7, 8]);
        assert_eq!(all(&back), all(&cache));
    }

    /// [`shape`] with layers 0 and 2 sliding over 20 positions, and its meta.
    fn windowed(dtype: KvDtype) -> (KvShape, CacheMeta) {
        let shape = KvShape {
            window: Some(SlidingWindow {
                size: 20,
                layers: 0b101,
            }),
            ..shape()
        };
        let mut meta = meta(dtype);
        let extra = &mut meta.model.extra;
        extra.insert(kv_store::EXTRA_SLIDING_WINDOW.into(), "20".into());
        extra.insert(kv_store::EXTRA_SLIDING_LAYERS.into(), "SGS".into());
        (shape, meta)
    }

    /// Every byte of K and V the cache holds, from each layer's first held position.
    fn held(cache: &KvCache) -> Vec<u8> {
        let s = cache.shape();
        let mut out = Vec::new();
        for layer in 0..s.n_layers {
            let range = cache.held_from(layer)..cache.len();
            for h in 0..s.n_kv_heads {
                out.extend_from_slice(cache.k_head(layer, h, range.clone()).bytes());
                out.extend_from_slice(cache.v_head(layer, h, range.clone()).bytes());
            }
        }
        out
    }

    #[test]
    fn sliding_layers_round_trip_holding_only_their_window() {
        for dtype in [KvDtype::F32, KvDtype::Q8_0] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let (shape, meta) = windowed(dtype);
            let mut cache = KvCache::new(shape, dtype);
            let mut reused = KvCache::new(shape, dtype);
            // Short turns after long ones too: the load then reads a sliding layer's first
            // positions from inside an earlier segment, past the ones it stored for its end.
            for (turn, n) in [3u32, 12, 21, 30, 4, 39, 2].into_iter().enumerate() {
                let turn = turn as u32;
                let toks: Vec<u32> = (0..n).map(|i| turn * 100 + i).collect();
                append(&mut cache, &toks, turn as f32);
                cache.save(&store, "a", &meta).unwrap();
                let back = KvCache::load(&store, "a", &meta, shape).unwrap();
                reused.load_into(&store, "a", &meta).unwrap();
                for b in [&back, &reused] {
                    assert_eq!(b.tokens(), cache.tokens());
                    for layer in 0..3 {
                        assert_eq!(b.held_from(layer), cache.held_from(layer), "{dtype}");
                    }
                    assert_eq!(held(b), held(&cache), "{dtype} after turn {turn}");
                }
                // What is on disk for a continuation is what memory holds.
                let loaded = store.load("a", &meta).unwrap();
                let on_disk: usize = (0..3)
                    .map(|l| loaded.kv(l, KvKind::K).len() + loaded.kv(l, KvKind::V).len())
                    .sum();
                assert_eq!(on_disk, cache.bytes_used(), "{dtype}");
            }
            assert_eq!(cache.held_from(0), cache.len() - 19);
            assert_eq!(cache.held_from(1), 0);
            // Continued after the load, it equals the cache that never left memory.
            let mut back = KvCache::load(&store, "a", &meta, shape).unwrap();
            append(&mut back, &[7; 30], 9.0);
            append(&mut cache, &[7; 30], 9.0);
            assert_eq!(held(&back), held(&cache), "{dtype}");

            // The window is part of the shape: a model without it cannot take the cache.
            let err = KvCache::load(&store, "a", &meta, shape_plain()).unwrap_err();
            assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        }
    }

    fn shape_plain() -> KvShape {
        shape()
    }
}
