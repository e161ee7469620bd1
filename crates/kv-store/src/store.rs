//! A store directory: named caches (manifests) over content-addressed segments, with save,
//! load, compaction and garbage collection under a store-wide file lock.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::durable::{Step, commit_file};
use crate::durable_fs::{self, TMP_PREFIX};
use crate::loaded::LoadedCache;
use crate::manifest::{Manifest, SegmentRef};
use crate::meta::{CacheMeta, SegmentId, validate_name};
use crate::reader::CacheReader;
use crate::segment::{KvSource, ReadMode, Segment, write_segment};
use crate::{Error, Result};

const SEGMENT_EXT: &str = "safetensors";

/// A directory holding saved caches.
///
/// Layout: `segments/<id>.safetensors`, `manifests/<name>.json`, and a `lock` file. Any number
/// of `Store` values, in any number of processes, may use one directory: every save, delete,
/// compaction and collection takes an exclusive lock on `lock`, every load a shared one.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    read_mode: ReadMode,
}

/// What a save did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveReport {
    /// Tokens already on disk in the cache's chain, kept as they were.
    pub reused_tokens: usize,
    /// Tokens in the new segment (0 when there was nothing new).
    pub new_tokens: usize,
    /// Bytes written for the new segment (0 when it already existed or nothing was new).
    pub bytes_written: u64,
    /// The new segment was already on disk (another cache shares it), so nothing was written.
    pub deduplicated: bool,
    /// The manifest's generation after the save.
    pub generation: u64,
}

/// What garbage collection removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Segment files no manifest referenced.
    pub segments_removed: usize,
    /// Temporary files left by interrupted saves.
    pub temp_files_removed: usize,
    /// Bytes freed in all.
    pub bytes_freed: u64,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        for dir in [
            root.to_owned(),
            root.join("segments"),
            root.join("manifests"),
        ] {
            fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", dir, e))?;
        }
        Ok(Store {
            root: root.to_owned(),
            read_mode: ReadMode::default(),
        })
    }

    /// Chooses how loads bring segments into memory.
    pub fn with_read_mode(mut self, mode: ReadMode) -> Store {
        self.read_mode = mode;
        self
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn segments_dir(&self) -> PathBuf {
        self.root.join("segments")
    }

    fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    /// The file of a segment.
    pub fn segment_path(&self, id: &SegmentId) -> PathBuf {
        self.segments_dir().join(format!("{id}.{SEGMENT_EXT}"))
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.manifests_dir().join(format!("{name}.json"))
    }

    fn lock(&self, exclusive: bool) -> Result<File> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open lock file", &path, e))?;
        let locked = if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        };
        locked.map_err(|e| Error::io("lock", &path, e))?;
        Ok(file)
    }

    /// Reads the manifest of `name`, or `None` if there is none.
    pub fn manifest(&self, name: &str) -> Result<Option<Manifest>> {
        validate_name(name)?;
        let path = self.manifest_path(name);
        match fs::read(&path) {
            Ok(bytes) => Manifest::decode(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    /// Names of all saved caches, sorted.
    pub fn list(&self) -> Result<Vec<String>> {
        let dir = self.manifests_dir();
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if validate_name(name).is_ok() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Saves `source` as the cache `name`.
    ///
    /// Segments of the existing chain that still match the source's tokens are kept; the rest
    /// of the tokens go into one new segment, so saving after a turn costs O(new tokens). When
    /// the cache was rolled back (truncated) or forked, the chain is cut at the last segment
    /// that still matches. A segment whose id is already on disk is not written again.
    pub fn save(&self, name: &str, meta: &CacheMeta, source: &dyn KvSource) -> Result<SaveReport> {
        validate_name(name)?;
        let _lock = self.lock(true)?;
        self.save_locked(name, meta, source, true)
    }

    /// Saves under the lock; `reuse_chain` false writes the whole cache as one new segment.
    fn save_locked(
        &self,
        name: &str,
        meta: &CacheMeta,
        source: &dyn KvSource,
        reuse_chain: bool,
    ) -> Result<SaveReport> {
        let old = match self.manifest(name) {
            Ok(m) => m,
            // Whatever a damaged manifest described is unreadable already; replacing it loses
            // nothing. A newer format is left alone: that would lose a newer build's data.
            Err(Error::BadMetadata { .. }) => None,
            Err(e) => return Err(e),
        };
        let tokens = source.tokens();
        let mut chain: Vec<SegmentRef> = Vec::new();
        let mut at = 0usize;
        if let Some(old) = old.as_ref().filter(|m| reuse_chain && m.meta == *meta) {
            for s in &old.segments {
                let end = at + s.n_tokens as usize;
                let Some(seg_tokens) = tokens.get(at..end) else {
                    break;
                };
                let id = SegmentId::compute(meta, chain.last().map(|s| &s.id), seg_tokens);
                if id != s.id || !self.segment_path(&id).exists() {
                    break;
                }
                chain.push(s.clone());
                at = end;
            }
        }
        let mut report = SaveReport {
            reused_tokens: at,
            new_tokens: tokens.len() - at,
            bytes_written: 0,
            deduplicated: false,
            generation: old.as_ref().map_or(0, |m| m.generation) + 1,
        };
        if at < tokens.len() {
            let parent = chain.last().map(|s| s.id.clone());
            let id = SegmentId::compute(meta, parent.as_ref(), &tokens[at..]);
            let path = self.segment_path(&id);
            if path.exists() {
                report.deduplicated = true;
            } else {
                let steps = [
                    Step::SegmentWritten,
                    Step::SegmentSynced,
                    Step::SegmentRenamed,
                ];
                commit_file(&path, steps, |file, tmp| {
                    report.bytes_written = write_segment(
                        file,
                        tmp,
                        meta,
                        &id,
                        parent.as_ref(),
                        source,
                        at..tokens.len(),
                    )?;
                    Ok(())
                })?;
            }
            chain.push(SegmentRef {
                id,
                start: at as u64,
                n_tokens: (tokens.len() - at) as u64,
            });
        }
        if let Some(old) = &old
            && old.meta == *meta
            && old.segments == chain
        {
            report.generation = old.generation;
            return Ok(report);
        }
        let manifest = Manifest {
            name: name.to_owned(),
            meta: meta.clone(),
            n_tokens: tokens.len() as u64,
            segments: chain,
            generation: report.generation,
            // A newer build's fields of this name's manifest stay.
            unknown: old.map(|m| m.unknown).unwrap_or_default(),
        };
        self.write_manifest(&manifest)?;
        Ok(report)
    }

    fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        let bytes = manifest.encode()?;
        let steps = [
            Step::ManifestWritten,
            Step::ManifestSynced,
            Step::ManifestRenamed,
        ];
        commit_file(&self.manifest_path(&manifest.name), steps, |file, tmp| {
            file.write_all(&bytes)
                .map_err(|e| Error::io("write", tmp, e))
        })
    }

    /// Loads the cache `name`, checking that it was made under `expected` (model, tokenizer,
    /// template and dtype); a difference is [`Error::FingerprintMismatch`] naming both sides.
    pub fn load(&self, name: &str, expected: &CacheMeta) -> Result<LoadedCache> {
        validate_name(name)?;
        let _lock = self.lock(false)?;
        let manifest = self.manifest(name)?.ok_or_else(|| self.not_found(name))?;
        if let Some((field, expected, found)) = expected.first_difference(&manifest.meta) {
            return Err(Error::FingerprintMismatch {
                name: name.to_owned(),
                field,
                expected,
                found,
            });
        }
        self.load_chain(manifest, true)
    }

    /// Opens the cache `name`, made under `expected`, to be read into the caller's buffers:
    /// every check [`Store::load`] makes, except that each tensor's checksum is verified as
    /// [`SegmentReader::read_kv`](crate::SegmentReader::read_kv) reads it (with
    /// [`ReadMode::Buffered`], when it is opened). The bytes are then read from the page
    /// cache once, not once to hash and once to copy.
    pub fn open_reader(&self, name: &str, expected: &CacheMeta) -> Result<CacheReader> {
        validate_name(name)?;
        let _lock = self.lock(false)?;
        let manifest = self.manifest(name)?.ok_or_else(|| self.not_found(name))?;
        if let Some((field, expected, found)) = expected.first_difference(&manifest.meta) {
            return Err(Error::FingerprintMismatch {
                name: name.to_owned(),
                field,
                expected,
                found,
            });
        }
        // The segments stay open (mapped, with their files): a collection that unlinks them
        // after the lock is released leaves them readable.
        self.load_chain(manifest, false).map(CacheReader::new)
    }

    /// Loads and fully verifies the cache `name` under whatever model made it (for
    /// inspection and `verify`; a resume should use [`Store::load`] or [`Store::open_reader`]).
    pub fn load_any(&self, name: &str) -> Result<LoadedCache> {
        validate_name(name)?;
        let _lock = self.lock(false)?;
        let manifest = self.manifest(name)?.ok_or_else(|| self.not_found(name))?;
        self.load_chain(manifest, true)
    }

    fn not_found(&self, name: &str) -> Error {
        Error::NotFound {
            name: name.to_owned(),
            root: self.root.clone(),
        }
    }

    /// The chain of `manifest`, each segment validated, its tensors hashed only if `hash`.
    fn load_chain(&self, manifest: Manifest, hash: bool) -> Result<LoadedCache> {
        let name = &manifest.name;
        let mut segments = Vec::with_capacity(manifest.segments.len());
        let mut tokens = Vec::with_capacity(manifest.n_tokens as usize);
        let mut parent: Option<&SegmentId> = None;
        for s in &manifest.segments {
            let path = self.segment_path(&s.id);
            if !path.exists() {
                return Err(Error::SegmentMissing {
                    name: name.clone(),
                    id: s.id.to_string(),
                    dir: self.segments_dir(),
                });
            }
            let seg = Segment::open_hashing(&path, self.read_mode, hash)?;
            let h = seg.header();
            let broken = |detail: String| Error::BrokenChain {
                name: name.clone(),
                id: s.id.to_string(),
                detail,
            };
            if let Some((field, expected, found)) = manifest.meta.first_difference(&h.meta) {
                return Err(Error::FingerprintMismatch {
                    name: s.id.to_string(),
                    field,
                    expected,
                    found,
                });
            }
            if h.id != s.id || h.start != s.start || h.n_tokens != s.n_tokens {
                return Err(broken(format!(
                    "file holds segment {} at {}+{}, manifest expects {} at {}+{}",
                    h.id, h.start, h.n_tokens, s.id, s.start, s.n_tokens
                )));
            }
            if h.parent.as_ref() != parent {
                return Err(broken("its parent is not the previous segment".into()));
            }
            tokens.extend(seg.tokens());
            segments.push(seg);
            parent = Some(&s.id);
        }
        let windows = manifest
            .meta
            .layer_windows()
            .map_err(|e| Error::bad_metadata(self.manifest_path(name), e))?;
        Ok(LoadedCache {
            manifest,
            segments,
            tokens,
            windows,
        })
    }

    /// Makes `chain`, segments already on disk, the whole of the cache `name`, and returns it
    /// loaded: how a new cache starts from a prefix another cache saved (a shared system
    /// prompt) without computing or writing its K/V again.
    ///
    /// Every segment is fully verified first (as [`Store::load`] does), must have been made
    /// under `meta`, and must follow the previous one (the first has no parent); only then is
    /// the manifest of `name` replaced, by the same atomic commit as a save. An empty chain is
    /// [`Error::InvalidInput`]; a segment not on disk is [`Error::SegmentMissing`].
    pub fn adopt(&self, name: &str, meta: &CacheMeta, chain: &[SegmentId]) -> Result<LoadedCache> {
        validate_name(name)?;
        let _lock = self.lock(true)?;
        let mut loaded = self.open_chain(name, meta, chain)?;
        let generation = match self.manifest(name) {
            Ok(old) => old.map_or(0, |m| m.generation) + 1,
            // As in a save: a damaged manifest describes nothing readable; a newer one is kept.
            Err(Error::BadMetadata { .. }) => 1,
            Err(e) => return Err(e),
        };
        loaded.manifest.name = name.to_owned();
        loaded.manifest.generation = generation;
        self.write_manifest(&loaded.manifest)?;
        Ok(loaded)
    }

    /// Loads `chain`, segments already on disk, verified as [`Store::adopt`] verifies them,
    /// and writes nothing: how a reader that must not write (an anonymous request) starts from
    /// a prefix some cache saved. The result belongs to no cache: its manifest's name is empty
    /// and it is never written.
    pub fn read_chain(&self, meta: &CacheMeta, chain: &[SegmentId]) -> Result<LoadedCache> {
        let _lock = self.lock(false)?;
        self.open_chain("", meta, chain)
    }

    /// Opens and verifies `chain` in order (`name` only names it in errors).
    fn open_chain(&self, name: &str, meta: &CacheMeta, chain: &[SegmentId]) -> Result<LoadedCache> {
        if chain.is_empty() {
            return Err(Error::InvalidInput {
                detail: format!("an empty chain of segments for {name:?}"),
            });
        }
        let mut segments = Vec::with_capacity(chain.len());
        let mut refs = Vec::with_capacity(chain.len());
        let mut tokens = Vec::new();
        for id in chain {
            let path = self.segment_path(id);
            if !path.exists() {
                return Err(Error::SegmentMissing {
                    name: name.to_owned(),
                    id: id.to_string(),
                    dir: self.segments_dir(),
                });
            }
            let seg = Segment::open(&path, self.read_mode)?;
            let h = seg.header();
            if let Some((field, expected, found)) = meta.first_difference(&h.meta) {
                return Err(Error::FingerprintMismatch {
                    name: id.to_string(),
                    field,
                    expected,
                    found,
                });
            }
            let parent = refs.last().map(|r: &SegmentRef| &r.id);
            if h.id != *id || h.parent.as_ref() != parent || h.start != tokens.len() as u64 {
                return Err(Error::BrokenChain {
                    name: name.to_owned(),
                    id: id.to_string(),
                    detail: format!(
                        "segment {} starts at {} after {:?}, the chain needs it at {} after {:?}",
                        h.id,
                        h.start,
                        h.parent,
                        tokens.len(),
                        parent
                    ),
                });
            }
            refs.push(SegmentRef {
                id: id.clone(),
                start: h.start,
                n_tokens: h.n_tokens,
            });
            tokens.extend(seg.tokens());
            segments.push(seg);
        }
        let manifest = Manifest {
            name: name.to_owned(),
            meta: meta.clone(),
            n_tokens: tokens.len() as u64,
            segments: refs,
            generation: 0,
            unknown: Default::default(),
        };
        let windows = meta.layer_windows().map_err(|e| Error::InvalidInput {
            detail: format!("the cache's sliding windows: {e}"),
        })?;
        Ok(LoadedCache {
            manifest,
            segments,
            tokens,
            windows,
        })
    }

    /// Deletes those of `ids` whose segment file is damaged (fails the checks of a load:
    /// structure, checksums, id), so that the next save writes them again instead of
    /// deduplicating onto the damaged file. Returns the ids removed.
    ///
    /// A save keeps an existing segment file whose id matches without reading it; after a
    /// load failed with [`Error::ChecksumMismatch`] (or another sign of damage), call this
    /// with the cache's chain before saving the rebuilt cache. Files that are merely
    /// unreadable (permissions) or of a newer format version are left alone.
    pub fn remove_damaged_segments(&self, ids: &[SegmentId]) -> Result<Vec<SegmentId>> {
        let _lock = self.lock(true)?;
        let mut removed = Vec::new();
        for id in ids {
            let path = self.segment_path(id);
            if !path.exists() {
                continue;
            }
            match Segment::open(&path, ReadMode::Buffered) {
                Ok(seg) if seg.id() == id => continue,
                Ok(_)
                | Err(
                    Error::BadSafetensors { .. }
                    | Error::BadMetadata { .. }
                    | Error::ChecksumMismatch { .. },
                ) => {}
                Err(_) => continue,
            }
            fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
            removed.push(id.clone());
        }
        if !removed.is_empty() {
            durable_fs::sync_dir(&self.segments_dir())?;
        }
        Ok(removed)
    }

    /// The bytes of segment `id`'s file, verified as a load verifies them (structure,
    /// checksums, id): what another store can [`Store::import_segment_from`].
    pub fn segment_bytes(&self, id: &SegmentId) -> Result<Vec<u8>> {
        let path = self.segment_path(id);
        let _lock = self.lock(false)?;
        let bytes = fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        let seg = Segment::from_bytes(&path, bytes)?;
        if seg.id() != id {
            return Err(Error::bad_metadata(
                &path,
                format!("its header says segment {}", seg.id()),
            ));
        }
        Ok(seg.into_bytes())
    }

    /// Stores segment `id` from the bytes `fill` writes into a temporary file in the
    /// segments directory (a download streamed to disk as it arrives), verified from that
    /// file as a load verifies a segment before it is fsynced and renamed into place. Returns
    /// whether a file was written (`false`: the segment was already here, and `fill` did not
    /// run). An error from `fill`, or bytes that fail, leave nothing behind.
    pub fn import_segment_from(
        &self,
        id: &SegmentId,
        fill: &mut dyn FnMut(&mut File) -> std::io::Result<()>,
    ) -> Result<bool> {
        let path = self.segment_path(id);
        let _lock = self.lock(true)?;
        if path.exists() {
            return Ok(false);
        }
        let steps = [
            Step::SegmentWritten,
            Step::SegmentSynced,
            Step::SegmentRenamed,
        ];
        commit_file(&path, steps, |file, tmp| {
            fill(file).map_err(|e| Error::io("write", tmp, e))?;
            file.flush().map_err(|e| Error::io("write", tmp, e))?;
            let seg = Segment::open(tmp, ReadMode::Mmap)?;
            if seg.id() != id {
                return Err(Error::bad_metadata(
                    tmp,
                    format!("its content is segment {}, not {id}", seg.id()),
                ));
            }
            Ok(())
        })?;
        Ok(true)
    }

    /// Removes the cache `name` (its manifest). Its segments stay until [`Store::gc`], since
    /// other caches may share them. Returns whether the cache existed.
    pub fn delete(&self, name: &str) -> Result<bool> {
        validate_name(name)?;
        let _lock = self.lock(true)?;
        let path = self.manifest_path(name);
        match fs::remove_file(&path) {
            Ok(()) => {
                durable_fs::sync_dir(&self.manifests_dir())?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", path, e)),
        }
    }

    /// Rewrites the chain of `name` as a single segment (fewer files and maps per load; the
    /// old segments become garbage unless shared).
    pub fn compact(&self, name: &str) -> Result<SaveReport> {
        validate_name(name)?;
        let _lock = self.lock(true)?;
        let manifest = self.manifest(name)?.ok_or_else(|| self.not_found(name))?;
        if manifest.segments.len() <= 1 {
            return Ok(SaveReport {
                reused_tokens: manifest.n_tokens as usize,
                new_tokens: 0,
                bytes_written: 0,
                deduplicated: false,
                generation: manifest.generation,
            });
        }
        let meta = manifest.meta.clone();
        let loaded = self.load_chain(manifest, true)?;
        // The old manifest stays in force until the single segment is durable.
        self.save_locked(name, &meta, &loaded, false)
    }

    /// Deletes segments no manifest references and temporary files of interrupted saves.
    ///
    /// Refuses (with the error) if any manifest cannot be read: a segment that only a damaged
    /// manifest references might still be wanted.
    pub fn gc(&self) -> Result<GcReport> {
        let _lock = self.lock(true)?;
        let mut live = HashSet::new();
        for name in self.list()? {
            if let Some(m) = self.manifest(&name)? {
                live.extend(m.segments.into_iter().map(|s| s.id));
            }
        }
        let mut report = GcReport::default();
        for dir in [self.segments_dir(), self.manifests_dir()] {
            for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
                let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
                let file_name = entry.file_name();
                let Some(file_name) = file_name.to_str() else {
                    continue;
                };
                let is_temp = file_name.starts_with(TMP_PREFIX);
                let dead_segment = dir == self.segments_dir()
                    && file_name
                        .strip_suffix(".safetensors")
                        .and_then(SegmentId::parse)
                        .is_some_and(|id| !live.contains(&id));
                if !is_temp && !dead_segment {
                    continue;
                }
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path()).map_err(|e| Error::io("remove", entry.path(), e))?;
                report.bytes_freed += len;
                if is_temp {
                    report.temp_files_removed += 1;
                } else {
                    report.segments_removed += 1;
                }
            }
            durable_fs::sync_dir(&dir)?;
        }
        Ok(report)
    }

    /// Bytes on disk of the segments of `name` (shared segments counted in full).
    pub fn disk_bytes(&self, name: &str) -> Result<u64> {
        let manifest = self.manifest(name)?.ok_or_else(|| self.not_found(name))?;
        let mut total = 0;
        for s in &manifest.segments {
            let path = self.segment_path(&s.id);
            total += fs::metadata(&path)
                .map_err(|e| Error::io("stat", path, e))?
                .len();
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::KvDtype;
    use crate::SEGMENT_VERSION;
    use crate::meta::tests::meta;
    use crate::segment::{KvKind, SegmentHeader};

    /// A cache whose every K/V byte is its token id's low byte.
    struct Toy(Vec<u32>);

    impl KvSource for Toy {
        fn tokens(&self) -> &[u32] {
            &self.0
        }

        fn write_kv(&self, _layer: usize, _kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
            let m = meta(KvDtype::F16);
            let per_token = m.kv_bytes(1);
            for _head in 0..m.model.n_kv_heads {
                for t in &self.0[range.clone()] {
                    out.extend(std::iter::repeat_n(
                        *t as u8,
                        per_token / m.model.n_kv_heads as usize,
                    ));
                }
            }
        }
    }

    /// A `q8_0` cache of 64-wide heads whose every byte is its token id's low byte.
    struct Blocks(Vec<u32>, CacheMeta);

    impl KvSource for Blocks {
        fn tokens(&self) -> &[u32] {
            &self.0
        }

        fn write_kv(&self, _layer: usize, _kind: KvKind, range: Range<usize>, out: &mut Vec<u8>) {
            for _head in 0..self.1.model.n_kv_heads {
                for t in &self.0[range.clone()] {
                    out.extend(std::iter::repeat_n(*t as u8, self.1.row_bytes()));
                }
            }
        }
    }

    #[test]
    fn q8_0_rows_are_blocks_of_34_bytes_and_need_a_width_of_32() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = crate::testing::meta(2, 2, 64, KvDtype::Q8_0);
        assert_eq!((m.row_bytes(), m.kv_shape(3)), (68, [2, 3, 68]));
        store
            .save("a", &m, &Blocks(vec![1, 2, 3], m.clone()))
            .unwrap();
        let loaded = store.load("a", &m).unwrap();
        assert_eq!(loaded.tokens(), &[1, 2, 3]);
        let k = loaded.kv(1, KvKind::K);
        assert_eq!(k.len(), 2 * 3 * 68);
        assert!(k[68..136].iter().all(|&b| b == 2));
        // The manifest names the dtype as the format spells it.
        let manifest = std::fs::read_to_string(dir.path().join("manifests/a.json")).unwrap();
        assert!(manifest.contains(r#""dtype":"q8_0""#), "{manifest}");

        // 40-wide heads cannot be cut into blocks of 32: refused before anything is written.
        let narrow = crate::testing::meta(2, 2, 40, KvDtype::Q8_0);
        let err = store
            .save("b", &narrow, &Blocks(vec![1], narrow.clone()))
            .unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
        assert!(matches!(store.load_any("b"), Err(Error::NotFound { .. })));
    }

    /// The test meta with a sliding window of `window` positions on layer 0 of its 2.
    fn windowed(window: usize) -> CacheMeta {
        let mut m = meta(KvDtype::F16);
        let extra = &mut m.model.extra;
        extra.insert(crate::EXTRA_SLIDING_WINDOW.into(), window.to_string());
        extra.insert(crate::EXTRA_SLIDING_LAYERS.into(), "SG".into());
        m
    }

    /// What a [`Toy`] cache of `tokens` holds for `layer`'s positions `range`: each row's bytes
    /// are its token's low byte.
    fn toy_rows(tokens: &[u32], range: Range<usize>) -> Vec<u8> {
        let row = meta(KvDtype::F16).row_bytes();
        let mut out = Vec::new();
        for _head in 0..2 {
            for t in &tokens[range.clone()] {
                out.extend(std::iter::repeat_n(*t as u8, row));
            }
        }
        out
    }

    #[test]
    fn sliding_layers_store_only_what_a_continuation_attends_to() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = windowed(8);
        let tokens: Vec<u32> = (1..=40).collect();
        let segment = |name: &str| {
            let chain = store.manifest(name).unwrap().unwrap().segments;
            Segment::open(
                &store.segment_path(&chain.last().unwrap().id),
                ReadMode::Buffered,
            )
            .unwrap()
        };
        // Shorter than the window less one: every position.
        store.save("a", &m, &Toy(tokens[..5].to_vec())).unwrap();
        let first = segment("a");
        assert_eq!(first.header().version, SEGMENT_VERSION);
        assert_eq!((first.kv_from(0), first.kv_from(1)), (0, 0));
        // Then 5..20: the sliding layer keeps 13..20, the 7 positions the token at 20 sees
        // besides itself; the global layer all 15.
        store.save("a", &m, &Toy(tokens[..20].to_vec())).unwrap();
        let second = segment("a");
        assert_eq!(second.header().version, SEGMENT_VERSION);
        assert_eq!((second.kv_from(0), second.kv_from(1)), (13, 5));
        assert_eq!(second.kv(0, KvKind::K), toy_rows(&tokens, 13..20));
        assert_eq!(second.kv(1, KvKind::V), toy_rows(&tokens, 5..20));
        let loaded = store.load("a", &m).unwrap();
        assert_eq!((loaded.kv_from(0), loaded.kv_from(1)), (13, 0));
        assert_eq!(&*loaded.kv(0, KvKind::V), toy_rows(&tokens, 13..20));
        assert_eq!(&*loaded.kv(1, KvKind::K), toy_rows(&tokens, 0..20));

        // Two more saves: the chain's earlier segments still hold the window's start.
        store.save("a", &m, &Toy(tokens[..22].to_vec())).unwrap();
        store.save("a", &m, &Toy(tokens[..40].to_vec())).unwrap();
        assert_eq!(segment("a").kv_from(0), 33);
        store.save("a", &m, &Toy(tokens[..22].to_vec())).unwrap();
        let loaded = store.load("a", &m).unwrap();
        assert_eq!(loaded.kv_from(0), 15);
        assert_eq!(&*loaded.kv(0, KvKind::K), toy_rows(&tokens, 15..22));

        // Compaction writes one segment holding exactly what a continuation needs.
        store.save("a", &m, &Toy(tokens[..40].to_vec())).unwrap();
        store.compact("a").unwrap();
        let one = segment("a");
        assert_eq!((one.start(), one.kv_from(0), one.kv_from(1)), (0, 33, 0));
        assert_eq!(one.kv(0, KvKind::K), toy_rows(&tokens, 33..40));
        assert_eq!(one.kv(1, KvKind::K), toy_rows(&tokens, 0..40));
        let loaded = store.load("a", &m).unwrap();
        assert_eq!(&*loaded.kv(0, KvKind::V), toy_rows(&tokens, 33..40));
        // 7 of 40 positions for the sliding layer: the file is 47/80 of a full one, plus
        // tokens and header.
        let kv: usize = (0..2).map(|l| one.kv(l, KvKind::K).len() * 2).sum();
        assert_eq!(kv, 47 * 2 * m.row_bytes() * 2);
    }

    /// Writes the segment of `tokens[range]` after `parent` as format `version` (ids as that
    /// version computes them), each layer holding the positions from `from[layer]` on.
    fn write_old_segment(
        store: &Store,
        m: &CacheMeta,
        version: u32,
        parent: Option<&SegmentId>,
        tokens: &[u32],
        range: Range<usize>,
        from: Vec<u64>,
    ) -> SegmentId {
        let compute = if version < 3 {
            SegmentId::compute_v1
        } else {
            SegmentId::compute
        };
        let id = compute(m, parent, &tokens[range.clone()]);
        commit_file(
            &store.segment_path(&id),
            [Step::SegmentWritten; 3],
            |file, tmp| {
                let source = Toy(tokens.to_vec());
                crate::segment::write_segment_holding(
                    file, tmp, m, &id, parent, &source, range, from, version,
                )
                .map(drop)
            },
        )
        .unwrap();
        id
    }

    #[test]
    fn older_segment_versions_load_and_the_next_save_writes_the_current_one() {
        // Version 1, as builds before sliding-window persistence wrote for every model (every
        // position in every layer), then a version 2 segment after it: both with version 1's
        // ids.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = windowed(8);
        let tokens: Vec<u32> = (1..=30).collect();
        let first = write_old_segment(&store, &m, 1, None, &tokens, 0..20, vec![0, 0]);
        let second = write_old_segment(&store, &m, 2, Some(&first), &tokens, 20..30, vec![23, 20]);
        assert_ne!(first, SegmentId::compute(&m, None, &tokens[..20]));
        let loaded = store.adopt("old", &m, &[first.clone(), second]).unwrap();
        let versions: Vec<u32> = loaded
            .segments()
            .iter()
            .map(|s| s.header().version)
            .collect();
        assert_eq!(versions, [1, 2]);
        assert_eq!(loaded.kv_from(0), 23);
        assert_eq!(&*loaded.kv(0, KvKind::K), toy_rows(&tokens, 23..30));
        assert_eq!(&*loaded.kv(1, KvKind::K), toy_rows(&tokens, 0..30));

        // A save recomputes ids the current way, so it finds no segment to keep and writes
        // the cache as a version 3 segment; the old files stay until gc.
        let report = store.save("old", &m, &Toy(tokens.clone())).unwrap();
        assert_eq!((report.reused_tokens, report.new_tokens), (0, 30));
        let loaded = store.load("old", &m).unwrap();
        assert_eq!(loaded.segments()[0].header().version, SEGMENT_VERSION);
        assert_eq!(&*loaded.kv(0, KvKind::K), toy_rows(&tokens, 23..30));
        assert!(store.segment_path(&first).exists());
        assert_eq!(store.gc().unwrap().segments_removed, 2);

        // A current segment holding more than a continuation needs (every position) loads.
        let full = write_old_segment(&store, &m, 3, None, &tokens, 0..20, vec![0, 0]);
        let loaded = store.adopt("full", &m, &[full]).unwrap();
        assert_eq!(loaded.kv_from(0), 13);
        assert_eq!(&*loaded.kv(0, KvKind::K), toy_rows(&tokens, 13..20));
    }

    #[test]
    fn a_segment_holding_less_than_a_continuation_needs_is_damage() {
        let m = windowed(8);
        let header = |version: u32, kv_from: Option<Vec<u64>>| SegmentHeader {
            format: "agentkv.segment".into(),
            version,
            id: SegmentId::compute(&m, None, &[1]),
            parent: None,
            start: 10,
            n_tokens: 10,
            meta: m.clone(),
            kv_from,
            checksums: Default::default(),
        };
        let check = |h: SegmentHeader| crate::segment::check_held(Path::new("s"), &h);
        assert!(check(header(1, None)).is_ok());
        assert!(check(header(2, Some(vec![13, 10]))).is_ok());
        // Holding more than needed is fine (an older writer's choice).
        assert!(check(header(2, Some(vec![11, 10]))).is_ok());
        for (version, from) in [
            (2, Some(vec![14, 10])),
            (2, Some(vec![13, 11])),
            (2, Some(vec![9, 10])),
            (2, Some(vec![13])),
            (2, None),
            (3, None),
            (3, Some(vec![14, 10])),
            (1, Some(vec![10, 10])),
        ] {
            let err = check(header(version, from.clone())).unwrap_err();
            assert!(matches!(err, Error::BadMetadata { .. }), "{from:?}: {err}");
        }
        let mut bad = header(2, Some(vec![13, 10]));
        bad.meta
            .model
            .extra
            .insert(crate::EXTRA_SLIDING_LAYERS.into(), "SX".into());
        assert!(check(bad).is_err());
    }

    #[test]
    fn adopt_starts_a_cache_from_a_shared_segment() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = meta(KvDtype::F16);
        store.save("a", &m, &Toy(vec![1, 2, 3])).unwrap();
        store.save("a", &m, &Toy(vec![1, 2, 3, 4, 5])).unwrap();
        let first = SegmentId::compute(&m, None, &[1, 2, 3]);
        let second = SegmentId::compute(&m, Some(&first), &[4, 5]);

        let loaded = store.adopt("b", &m, std::slice::from_ref(&first)).unwrap();
        assert_eq!(loaded.tokens(), &[1, 2, 3]);
        assert_eq!(store.load("b", &m).unwrap().tokens(), &[1, 2, 3]);
        // The adopted cache continues like any other, keeping the shared segment.
        let report = store.save("b", &m, &Toy(vec![1, 2, 3, 9])).unwrap();
        assert_eq!((report.reused_tokens, report.new_tokens), (3, 1));

        let both = store
            .adopt("c", &m, &[first.clone(), second.clone()])
            .unwrap();
        assert_eq!(both.tokens(), &[1, 2, 3, 4, 5]);

        // Read without adopting: the same checks, no manifest written.
        let read = store
            .read_chain(&m, &[first.clone(), second.clone()])
            .unwrap();
        assert_eq!(read.tokens(), &[1, 2, 3, 4, 5]);
        assert_eq!(read.manifest().name, "");
        let err = store
            .read_chain(&m, std::slice::from_ref(&second))
            .unwrap_err();
        assert!(matches!(err, Error::BrokenChain { .. }), "{err}");
        assert_eq!(store.list().unwrap().len(), 3);

        // Out of order, another model, missing, empty: refused, nothing written.
        let err = store
            .adopt("d", &m, std::slice::from_ref(&second))
            .unwrap_err();
        assert!(matches!(err, Error::BrokenChain { .. }), "{err}");
        let err = store
            .adopt("d", &meta(KvDtype::F32), std::slice::from_ref(&first))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::FingerprintMismatch {
                    field: "kv dtype",
                    ..
                }
            ),
            "{err}"
        );
        let absent = SegmentId::compute(&m, None, &[7]);
        let err = store.adopt("d", &m, &[absent]).unwrap_err();
        assert!(matches!(err, Error::SegmentMissing { .. }), "{err}");
        assert!(matches!(
            store.adopt("d", &m, &[]),
            Err(Error::InvalidInput { .. })
        ));
        assert!(store.manifest("d").unwrap().is_none());
    }

    /// Resident bytes of the mapping that holds `addr`, from /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn resident(addr: *const u8) -> usize {
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let addr = addr as usize;
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let Some((range, _)) = line.split_once(' ') else {
                continue;
            };
            let Some((lo, hi)) = range.split_once('-') else {
                continue;
            };
            let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            else {
                continue;
            };
            if (lo..hi).contains(&addr) {
                let rss = lines.find(|l| l.starts_with("Rss:")).unwrap();
                let kb: usize = rss.split_whitespace().nth(1).unwrap().parse().unwrap();
                return kb * 1024;
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_mapped_segment_keeps_in_memory_only_what_is_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = meta(KvDtype::F16);
        // Four tensors (2 layers, K and V) of 8 MB each, and 2 MB of token ids.
        let n = 500_000;
        store.save("a", &m, &Toy((0..n).collect())).unwrap();
        let loaded = store.load("a", &m).unwrap();
        let seg = &loaded.segments()[0];
        let tensor = seg.kv(0, KvKind::K);
        assert_eq!(tensor.len(), 8_000_000);
        let slack = 1 << 20;
        let tokens = 4 * n as usize;
        // Every byte was read to be checksummed; only the token ids (read again for the
        // segment id) are still mapped in.
        let after_load = resident(tensor.as_ptr());
        assert!(
            after_load <= tokens + slack,
            "{after_load} bytes resident after load"
        );

        let sum: u64 = tensor.iter().map(|&b| u64::from(b)).sum();
        let reading = resident(tensor.as_ptr());
        assert!(
            reading >= tensor.len(),
            "{reading} bytes resident while reading"
        );
        seg.release_kv(0, KvKind::K);
        let released = resident(tensor.as_ptr());
        assert!(
            released <= tokens + slack,
            "{released} bytes resident after release"
        );
        // Released bytes read back the same.
        assert_eq!(tensor.iter().map(|&b| u64::from(b)).sum::<u64>(), sum);
        assert_eq!(&tensor[..4], &[0, 0, 0, 0]);
        assert_eq!(tensor[tensor.len() - 1], (n - 1) as u8);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn read_kv_copies_the_tensor_bytes_without_mapping_them_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = meta(KvDtype::F16);
        // Four tensors of 800 KB: pieces cross what `checksum_file` reads at a time.
        let n = 50_000;
        store.save("a", &m, &Toy((0..n).collect())).unwrap();
        let loaded = store.load("a", &m).unwrap();
        let mapped = &loaded.segments()[0];
        let buffered = Segment::open(mapped.path(), ReadMode::Buffered).unwrap();
        let len = mapped.kv(1, KvKind::V).len();
        let at = mapped.kv(1, KvKind::V).as_ptr();
        for range in [0..0, 0..len, 3..4, 1000..300_000, len - 7..len] {
            let want = buffered.kv(1, KvKind::V)[range.clone()].to_vec();
            for seg in [mapped, &buffered] {
                let mut got = vec![0xAA; range.len()];
                seg.read_kv(1, KvKind::V, range.clone(), &mut got).unwrap();
                assert_eq!(got, want, "{range:?}");
            }
        }
        // Neither the checksums at load nor the reads touched the mapping.
        let tokens = 4 * n as usize;
        assert!(
            resident(at) <= tokens + (1 << 20),
            "{} resident",
            resident(at)
        );
    }

    #[test]
    fn a_reader_reads_what_load_holds_and_refuses_a_damaged_tensor() {
        use crate::reader::Part;
        for mode in [ReadMode::Mmap, ReadMode::Buffered] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap().with_read_mode(mode);
            let m = meta(KvDtype::F16);
            // Tensors of 800 KB: several pieces each.
            let n = 50_000;
            store.save("a", &m, &Toy((0..n).collect())).unwrap();
            let reader = store.open_reader("a", &m).unwrap();
            let loaded = store.load("a", &m).unwrap();
            assert_eq!(reader.tokens(), loaded.tokens());
            assert_eq!(reader.meta(), loaded.meta());
            let (seg, full) = (&reader.segments()[0], &loaded.segments()[0]);
            let len = full.kv(1, KvKind::K).len();
            for range in [0..len, 0..5, 7..len, 300_000..300_001] {
                let got = seg.read_all(1, KvKind::K, range.clone()).unwrap();
                assert_eq!(
                    got,
                    full.kv(1, KvKind::K)[range.clone()],
                    "{mode:?} {range:?}"
                );
            }
            // Parts that do not add up to the tensor are a caller's bug.
            let short = std::panic::catch_unwind(|| {
                let mut buf = [0u8; 3];
                let _ = seg.read_kv(1, KvKind::K, &mut [Part::Into(&mut buf)]);
            });
            assert!(short.is_err());

            // One byte of layer 1's V changed on disk after the reader opened the file.
            let bytes = fs::read(full.path()).unwrap();
            let (header_len, tensors) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let start = 8 + header_len + tensors.info("layers.1.v").unwrap().data_offsets.0;
            let mut damaged = bytes.clone();
            damaged[start + 12_345] ^= 0xFF;
            fs::write(full.path(), &damaged).unwrap();
            if mode == ReadMode::Mmap {
                // That tensor's read fails, naming it, even when the damaged byte is only
                // skipped; the other tensors still read.
                for range in [0..len, 0..10] {
                    let err = seg.read_all(1, KvKind::V, range).unwrap_err();
                    assert!(
                        matches!(&err, Error::ChecksumMismatch { tensor, .. } if tensor == "layers.1.v"),
                        "{err}"
                    );
                }
                assert!(seg.read_all(1, KvKind::K, 0..len).is_ok());
                // A reader opened now opens (it has not read the tensor yet).
                assert!(store.open_reader("a", &m).is_ok());
            } else {
                // A buffered reader hashes every tensor when it opens.
                assert!(matches!(
                    store.open_reader("a", &m).unwrap_err(),
                    Error::ChecksumMismatch { .. }
                ));
            }
            assert!(matches!(
                store.load("a", &m).unwrap_err(),
                Error::ChecksumMismatch { .. }
            ));
        }
    }

    #[test]
    fn damaged_segments_are_removed_and_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = meta(KvDtype::F16);
        store.save("a", &m, &Toy(vec![1, 2, 3])).unwrap();
        store.save("a", &m, &Toy(vec![1, 2, 3, 4])).unwrap();
        let ids: Vec<SegmentId> = store
            .manifest("a")
            .unwrap()
            .unwrap()
            .segments
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert!(
            store.remove_damaged_segments(&ids).unwrap().is_empty(),
            "healthy segments stay"
        );

        let path = store.segment_path(&ids[0]);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            store.load("a", &m),
            Err(Error::ChecksumMismatch { .. })
        ));
        // A save alone would keep the damaged file: its id still matches the tokens.
        assert_eq!(
            store.remove_damaged_segments(&ids).unwrap(),
            vec![ids[0].clone()]
        );
        let report = store.save("a", &m, &Toy(vec![1, 2, 3, 4])).unwrap();
        assert_eq!(report.reused_tokens, 0);
        assert_eq!(store.load("a", &m).unwrap().tokens(), &[1, 2, 3, 4]);
    }
}
