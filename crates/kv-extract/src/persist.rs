//! The round trip between a [`KvCache`] and kv-store: export converts f32 to the store's dtype
//! on the way out, import converts back straight into the cache's buffers (one copy).

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use kv_store::{CacheMeta, KvDtype, KvKind, KvSource, LoadedCache, SaveReport, Store};
use rayon::prelude::*;

use crate::{Error, KvCache, KvShape, Result};

/// Spare room given to an imported cache, in tokens, so the next turn does not regrow it.
const IMPORT_HEADROOM: usize = 256;

/// A [`KvSource`] view of a cache that converts to `dtype` while writing.
struct Export<'a> {
    cache: &'a KvCache,
    dtype: KvDtype,
}

impl KvSource for Export<'_> {
    fn tokens(&self) -> &[u32] {
        self.cache.tokens()
    }

    fn write_kv(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
        for h in 0..self.cache.shape().n_kv_heads {
            let src = match kind {
                KvKind::K => self.cache.k_head(layer, h, range.clone()),
                KvKind::V => self.cache.v_head(layer, h, range.clone()),
            };
            encode(src, self.dtype, out);
        }
    }
}

/// Values converted per batch by the f16 paths: `half` converts whole slices with F16C
/// instructions when the CPU has them (detected at run time), 8 values per instruction, where
/// `f16::to_f32` / `from_f32` on one value at a time cost several times more. Both round the
/// same way (to nearest, ties to even); the conversion to f32 is exact.
const F16_BATCH: usize = 1024;

fn encode(src: &[f32], dtype: KvDtype, out: &mut Vec<u8>) {
    match dtype {
        KvDtype::F32 => out.extend(src.iter().flat_map(|x| x.to_le_bytes())),
        KvDtype::F16 => {
            let mut buf = [f16::ZERO; F16_BATCH];
            out.reserve(src.len() * 2);
            for s in src.chunks(F16_BATCH) {
                let b = &mut buf[..s.len()];
                b.convert_from_f32_slice(s);
                out.extend(b.iter().flat_map(|h| h.to_le_bytes()));
            }
        }
        KvDtype::Bf16 => out.extend(src.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes())),
        // `KvCache::save` refuses any other dtype before it gets here.
        _ => {}
    }
}

fn decode(src: &[u8], dtype: KvDtype, dst: &mut [f32]) -> Result<()> {
    match dtype {
        KvDtype::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        KvDtype::F16 => {
            // Stored halves are little-endian: on a little-endian CPU, bytes at an even
            // address (segment tensors are 8-byte aligned in the file, and the map is
            // page-aligned) are the halves themselves, converted with no copy.
            #[cfg(target_endian = "little")]
            if let Ok(halves) = bytemuck::try_cast_slice::<u8, f16>(src) {
                let n = dst.len().min(halves.len());
                halves[..n].convert_to_f32_slice(&mut dst[..n]);
                return Ok(());
            }
            let mut buf = [f16::ZERO; F16_BATCH];
            for (s, d) in src.chunks(2 * F16_BATCH).zip(dst.chunks_mut(F16_BATCH)) {
                let n = d.len().min(s.len() / 2);
                for (h, c) in buf[..n].iter_mut().zip(s.chunks_exact(2)) {
                    *h = f16::from_le_bytes([c[0], c[1]]);
                }
                buf[..n].convert_to_f32_slice(&mut d[..n]);
            }
        }
        KvDtype::Bf16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        other => {
            return Err(Error::UnsupportedDtype {
                dtype: other.to_string(),
            });
        }
    }
    Ok(())
}

impl KvCache {
    /// Saves the cache as `name`, converting K/V to `meta.dtype`. Only tokens not already in
    /// the saved chain are written (see [`Store::save`]).
    pub fn save(&self, store: &Store, name: &str, meta: &CacheMeta) -> Result<SaveReport> {
        check_shape(self.shape(), meta)?;
        if !matches!(meta.dtype, KvDtype::F32 | KvDtype::F16 | KvDtype::Bf16) {
            return Err(Error::UnsupportedDtype {
                dtype: meta.dtype.to_string(),
            });
        }
        Ok(store.save(
            name,
            meta,
            &Export {
                cache: self,
                dtype: meta.dtype,
            },
        )?)
    }

    /// Loads the cache `name`, which must have been made under `expected` (same model,
    /// tokenizer, template and dtype), into a new cache of shape `shape`.
    pub fn load(
        store: &Store,
        name: &str,
        expected: &CacheMeta,
        shape: KvShape,
    ) -> Result<KvCache> {
        let loaded = store.load(name, expected)?;
        KvCache::import(&loaded, expected, shape)
    }

    /// Builds a cache from one loaded from disk, converting each segment's bytes straight into
    /// place: the only copy between the page cache and the engine's buffers.
    ///
    /// The new buffers are fresh memory, and touching it costs page faults (about 1 ms per
    /// MB on the machines we measured, more than the conversion). A long-running process that
    /// resumes one cache after another can reuse an old cache's buffers with
    /// [`KvCache::import_into`].
    pub fn import(loaded: &LoadedCache, expected: &CacheMeta, shape: KvShape) -> Result<KvCache> {
        check_loaded(loaded, expected, shape)?;
        let mut cache = KvCache::with_capacity(shape, loaded.len() + IMPORT_HEADROOM);
        cache.fill(loaded)?;
        Ok(cache)
    }

    /// [`KvCache::import`] into this cache's buffers, which are reused when they have room
    /// (grown otherwise): whatever the cache held is replaced. The shape stays this cache's.
    ///
    /// On error the cache is left empty, its buffers kept.
    pub fn import_into(&mut self, loaded: &LoadedCache, expected: &CacheMeta) -> Result<()> {
        self.clear();
        check_loaded(loaded, expected, self.shape())?;
        if self.capacity() < loaded.len() {
            self.reserve(loaded.len() + IMPORT_HEADROOM);
        }
        let filled = self.fill(loaded);
        if filled.is_err() {
            self.clear();
        }
        filled
    }

    /// [`KvCache::load`] into this cache's buffers; see [`KvCache::import_into`].
    pub fn load_into(&mut self, store: &Store, name: &str, expected: &CacheMeta) -> Result<()> {
        self.clear();
        let loaded = store.load(name, expected)?;
        self.import_into(&loaded, expected)
    }

    /// Converts every segment of `loaded` into the (empty) cache, which has room for it.
    fn fill(&mut self, loaded: &LoadedCache) -> Result<()> {
        let shape = self.shape();
        let cap = self.capacity();
        let d = shape.head_dim;
        let dtype = loaded.meta().dtype;
        let row_bytes = d * dtype.size();
        // Layers convert in parallel: one core converts f16 at about half the speed the
        // memory can take it.
        for seg in loaded.segments() {
            let (start, len) = (seg.start(), seg.len());
            self.layers_mut()
                .par_iter_mut()
                .enumerate()
                .try_for_each(|(layer, l)| {
                    for (kind, dst) in [(KvKind::K, &mut l.k), (KvKind::V, &mut l.v)] {
                        let src = seg.kv(layer, kind);
                        for h in 0..shape.n_kv_heads {
                            let from = &src[h * len * row_bytes..(h + 1) * len * row_bytes];
                            let to = &mut dst[(h * cap + start) * d..(h * cap + start + len) * d];
                            decode(from, dtype, to)?;
                        }
                        seg.release_kv(layer, kind);
                    }
                    Ok::<(), Error>(())
                })?;
        }
        self.push_tokens(loaded.tokens());
        Ok(())
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
    check_shape(shape, loaded.meta())
}

fn check_shape(shape: KvShape, meta: &CacheMeta) -> Result<()> {
    let m = &meta.model;
    let found = KvShape {
        n_layers: m.n_layers as usize,
        n_kv_heads: m.n_kv_heads as usize,
        head_dim: m.head_dim as usize,
    };
    if found != shape {
        return Err(Error::ShapeMismatch {
            expected: shape,
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            n_layers: 3,
            n_kv_heads: 2,
            head_dim: 8,
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

    fn all(cache: &KvCache) -> Vec<f32> {
        let s = cache.shape();
        let mut out = Vec::new();
        for layer in 0..s.n_layers {
            for h in 0..s.n_kv_heads {
                out.extend_from_slice(cache.k_head(layer, h, 0..cache.len()));
                out.extend_from_slice(cache.v_head(layer, h, 0..cache.len()));
            }
        }
        out
    }

    #[test]
    fn f32_round_trip_is_bitwise_over_several_saves() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = meta(KvDtype::F32);
        let mut cache = KvCache::new(shape());
        for turn in 0..4u32 {
            let toks: Vec<u32> = (0..(turn * 7 + 3)).map(|i| turn * 100 + i).collect();
            append(&mut cache, &toks, turn as f32);
            cache.save(&store, "a", &meta).unwrap();
        }
        let back = KvCache::load(&store, "a", &meta, shape()).unwrap();
        assert_eq!(back.tokens(), cache.tokens());
        let (a, b) = (all(&cache), all(&back));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn half_round_trips_within_rounding() {
        for (dtype, rel) in [(KvDtype::F16, 1.0 / 2048.0), (KvDtype::Bf16, 1.0 / 256.0)] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let meta = meta(dtype);
            let mut cache = KvCache::new(shape());
            append(&mut cache, &[1, 2, 3, 4, 5], 1.0);
            cache.save(&store, "a", &meta).unwrap();
            let back = KvCache::load(&store, "a", &meta, shape()).unwrap();
            for (x, y) in all(&cache).iter().zip(all(&back)) {
                // Round to nearest: half an ulp of the format, relative.
                assert!((x - y).abs() <= x.abs() * rel, "{dtype}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn another_model_or_shape_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = meta(KvDtype::F16);
        let mut cache = KvCache::new(shape());
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
    fn f16_decodes_the_same_at_any_alignment() {
        let values: Vec<f32> = (0..3000).map(|i| (i as f32 - 1500.0) * 0.37).collect();
        let mut bytes = Vec::new();
        encode(&values, KvDtype::F16, &mut bytes);
        // The same bytes one past an even address: bytemuck refuses them, the copy path runs.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let (mut aligned, mut odd) = (vec![0.0f32; 3000], vec![0.0f32; 3000]);
        decode(&bytes, KvDtype::F16, &mut aligned).unwrap();
        decode(&shifted[1..], KvDtype::F16, &mut odd).unwrap();
        assert_eq!(aligned, odd);
        for (got, want) in aligned.iter().zip(&values) {
            assert_eq!(*got, f16::from_f32(*want).to_f32());
        }
    }

    #[test]
    fn import_into_reuses_buffers_and_equals_import() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = meta(KvDtype::F16);
        let mut a = KvCache::new(shape());
        append(&mut a, &[1, 2, 3, 4, 5, 6, 7], 1.0);
        a.save(&store, "a", &meta).unwrap();
        let mut b = KvCache::new(shape());
        append(&mut b, &[9; 40], 2.0);
        b.save(&store, "b", &meta).unwrap();
        let fresh_a = KvCache::load(&store, "a", &meta, shape()).unwrap();
        let fresh_b = KvCache::load(&store, "b", &meta, shape()).unwrap();

        // A used cache with room: same buffers, same contents as a fresh import.
        let mut reused = KvCache::with_capacity(shape(), 100);
        append(&mut reused, &[5; 60], 3.0);
        let (ptr, cap) = (reused.k(0).as_ptr(), reused.capacity());
        reused.load_into(&store, "a", &meta).unwrap();
        assert_eq!((reused.k(0).as_ptr(), reused.capacity()), (ptr, cap));
        assert_eq!(reused.tokens(), fresh_a.tokens());
        assert_eq!(all(&reused), all(&fresh_a));
        reused.load_into(&store, "b", &meta).unwrap();
        assert_eq!(reused.k(0).as_ptr(), ptr);
        assert_eq!(all(&reused), all(&fresh_b));

        // Too small: grown, same contents.
        let mut small = KvCache::with_capacity(shape(), 4);
        small.load_into(&store, "b", &meta).unwrap();
        assert!(small.capacity() >= 40);
        assert_eq!(all(&small), all(&fresh_b));

        // Another model's cache: an error, and the cache is empty, buffers kept.
        let mut other = meta.clone();
        other.tokenizer = "t2".into();
        let err = reused.load_into(&store, "a", &other).unwrap_err();
        assert!(matches!(err, Error::Store(_)), "{err}");
        assert!(reused.is_empty());
        assert_eq!(reused.k(0).as_ptr(), ptr);
        let mut wrong = KvCache::new(KvShape {
            n_layers: 2,
            ..shape()
        });
        let loaded = store.load("a", &meta).unwrap();
        let err = wrong.import_into(&loaded, &meta).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    }

    #[test]
    fn truncated_then_continued_cache_saves_incrementally() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = meta(KvDtype::F32);
        let mut cache = KvCache::new(shape());
        append(&mut cache, &[1, 2, 3], 0.0);
        cache.save(&store, "a", &meta).unwrap();
        append(&mut cache, &[4, 5, 6], 1.0);
        cache.save(&store, "a", &meta).unwrap();
        cache.truncate(3);
        append(&mut cache, &[7, 8], 2.0);
        let report = cache.save(&store, "a", &meta).unwrap();
        assert_eq!((report.reused_tokens, report.new_tokens), (3, 2));
        let back = KvCache::load(&store, "a", &meta, shape()).unwrap();
        assert_eq!(back.tokens(), &[1, 2, 3, 7, 8]);
        assert_eq!(all(&back), all(&cache));
    }
}
