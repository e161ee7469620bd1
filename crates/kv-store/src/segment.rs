//! One segment file: the K/V of tokens `[start, start + n)` for every layer, as a safetensors
//! file whose `__metadata__` carries the agentkv header. Writing and validating reading.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use serde::{Deserialize, Serialize};

use crate::meta::{CacheMeta, SegmentId, checksum, checksum_file, kept_from};
use crate::reader::Part;
use crate::{Error, Result};
use rayon::prelude::*;

/// The segment format version this build writes, and the newest it reads.
///
/// Version 2 added `kv_from`, the first position each layer's tensors hold (a sliding-window
/// layer keeps only what a continuation can still attend to). Version 3 computes the segment
/// id over a canonical encoding of the metadata instead of serde_json's, and always has
/// `kv_from`. Versions 1 and 2 still load.
pub const SEGMENT_VERSION: u32 = 3;
/// The `__metadata__` key holding the agentkv header.
pub(crate) const METADATA_KEY: &str = "agentkv";
const FORMAT_NAME: &str = "agentkv.segment";

/// Which half of attention's cache a tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvKind {
    /// Keys.
    K,
    /// Values.
    V,
}

/// Where a save gets its data from: the cache in memory, in whatever layout it keeps.
pub trait KvSource {
    /// All token ids of the cache, in order.
    fn tokens(&self) -> &[u32];
    /// Appends to `out` the K or V of `layer` for token positions `range`, as little-endian
    /// values of the save's [`crate::KvDtype`], in the shape `[n_kv_heads, range.len(), head_dim]`.
    ///
    /// A sliding-window layer is asked only for the positions a continuation of the cache can
    /// still attend to (from [`crate::kept_from`] of its window and the cache's length on).
    fn write_kv(&self, layer: usize, kind: KvKind, range: Range<usize>, out: &mut Vec<u8>);
}

/// The agentkv header of a segment (JSON, under `__metadata__["agentkv"]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SegmentHeader {
    pub format: String,
    pub version: u32,
    pub id: SegmentId,
    pub parent: Option<SegmentId>,
    pub start: u64,
    pub n_tokens: u64,
    pub meta: CacheMeta,
    /// Versions 2 and 3: per layer, the first position its tensors hold (the rest of the
    /// segment's positions, up to its end). Absent in version 1, where every layer holds all
    /// of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_from: Option<Vec<u64>>,
    pub checksums: BTreeMap<String, String>,
}

impl SegmentHeader {
    /// The first position layer `layer`'s tensors hold.
    fn layer_from(&self, layer: usize) -> u64 {
        self.kv_from
            .as_ref()
            .and_then(|f| f.get(layer).copied())
            .unwrap_or(self.start)
    }

    /// Positions each layer's tensors hold.
    fn held(&self) -> Vec<usize> {
        let end = self.start + self.n_tokens;
        (0..self.meta.model.n_layers as usize)
            .map(|l| (end - self.layer_from(l)) as usize)
            .collect()
    }
}

/// Per layer, the first position a segment of `range` stores: its start, or for a
/// sliding-window layer the first position a continuation from the segment's end can attend to
/// when that is later.
fn stored_from(meta: &CacheMeta, range: &Range<usize>) -> Result<Vec<u64>> {
    let windows = meta.layer_windows().map_err(|detail| Error::InvalidInput {
        detail: format!("the cache's sliding windows: {detail}"),
    })?;
    Ok(windows
        .into_iter()
        .map(|w| first_needed(w, range.start as u64, range.end as u64))
        .collect())
}

/// The first position of a segment `[start, end)` that a layer with `window` must hold: its
/// start, or the first one a continuation from its end attends to when that is later.
fn first_needed(window: Option<usize>, start: u64, end: u64) -> u64 {
    start.max(kept_from(window, end as usize) as u64)
}

/// Where K or V of `layer` is among a segment's tensors (token ids first, then K and V of each
/// layer).
fn tensor_index(layer: usize, kind: KvKind) -> usize {
    1 + 2 * layer + usize::from(kind == KvKind::V)
}

pub(crate) fn tensor_name(layer: usize, kind: KvKind) -> String {
    match kind {
        KvKind::K => format!("layers.{layer}.k"),
        KvKind::V => format!("layers.{layer}.v"),
    }
}

/// Names, dtypes and shapes of a segment's tensors, in file order, for `n_tokens` tokens
/// of which layer `i` holds the last `held[i]`.
fn layout(
    meta: &CacheMeta,
    n_tokens: usize,
    held: &[usize],
) -> Vec<(String, safetensors::Dtype, Vec<usize>)> {
    let mut out = vec![("tokens".to_owned(), safetensors::Dtype::U32, vec![n_tokens])];
    for (layer, &rows) in held.iter().enumerate() {
        for kind in [KvKind::K, KvKind::V] {
            out.push((
                tensor_name(layer, kind),
                meta.dtype.safetensors(),
                meta.kv_shape(rows).to_vec(),
            ));
        }
    }
    out
}

fn encode_header(
    header: &SegmentHeader,
    layout: &[(String, safetensors::Dtype, Vec<usize>)],
) -> Result<Vec<u8>> {
    let invalid = |detail: String| Error::InvalidInput { detail };
    let json =
        serde_json::to_string(header).map_err(|e| invalid(format!("segment header: {e}")))?;
    let mut offset = 0;
    let mut infos = Vec::with_capacity(layout.len());
    for (name, dtype, shape) in layout {
        let bytes = shape
            .iter()
            .try_fold(dtype.bitsize() / 8, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid(format!("tensor {name} is too large")))?;
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: *dtype,
                shape: shape.clone(),
                data_offsets: (offset, offset + bytes),
            },
        ));
        offset += bytes;
    }
    let metadata = Metadata::new(
        Some(HashMap::from([(METADATA_KEY.to_owned(), json)])),
        infos,
    )
    .map_err(|e| invalid(format!("segment layout: {e}")))?;
    let mut buf =
        serde_json::to_vec(&metadata).map_err(|e| invalid(format!("segment header: {e}")))?;
    buf.resize(buf.len().next_multiple_of(8), b' ');
    Ok(buf)
}

/// Writes the segment holding `range` of `source` into `file` (positioned at 0).
///
/// Streams one tensor at a time: the header goes first with placeholder checksums of the same
/// width, then each tensor is produced, hashed and written, then the header is rewritten in
/// place with the real checksums. Memory use is one tensor, not the whole segment.
pub(crate) fn write_segment(
    file: &mut File,
    path: &Path,
    meta: &CacheMeta,
    id: &SegmentId,
    parent: Option<&SegmentId>,
    source: &dyn KvSource,
    range: Range<usize>,
) -> Result<u64> {
    let from = stored_from(meta, &range)?;
    let version = SEGMENT_VERSION;
    write_segment_holding(file, path, meta, id, parent, source, range, from, version)
}

/// [`write_segment`] with each layer holding the positions from `from[layer]` on, as format
/// `version` (the tests write older versions; the caller computes `id` as that version does,
/// and for version 1 every layer must hold every position).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_segment_holding(
    file: &mut File,
    path: &Path,
    meta: &CacheMeta,
    id: &SegmentId,
    parent: Option<&SegmentId>,
    source: &dyn KvSource,
    range: Range<usize>,
    from: Vec<u64>,
    version: u32,
) -> Result<u64> {
    meta.check_dtype()?;
    let n = range.len();
    let tokens = source
        .tokens()
        .get(range.clone())
        .ok_or_else(|| Error::InvalidInput {
            detail: format!(
                "range {range:?} is past the {} tokens of the source",
                source.tokens().len()
            ),
        })?;
    let mut header = SegmentHeader {
        format: FORMAT_NAME.to_owned(),
        version,
        id: id.clone(),
        parent: parent.cloned(),
        start: range.start as u64,
        n_tokens: n as u64,
        meta: meta.clone(),
        kv_from: (version > 1).then_some(from),
        checksums: BTreeMap::new(),
    };
    let layout = layout(meta, n, &header.held());
    header.checksums = layout
        .iter()
        .map(|(name, _, _)| (name.clone(), "0".repeat(16)))
        .collect();
    let placeholder = encode_header(&header, &layout)?;
    let io = |op, e| Error::io(op, path, e);
    file.write_all(&(placeholder.len() as u64).to_le_bytes())
        .map_err(|e| io("write", e))?;
    file.write_all(&placeholder).map_err(|e| io("write", e))?;

    let mut buf: Vec<u8> = Vec::with_capacity(meta.kv_bytes(n).max(n * 4));
    buf.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    let mut written = (8 + placeholder.len() + buf.len()) as u64;
    header.checksums.insert("tokens".to_owned(), checksum(&buf));
    file.write_all(&buf).map_err(|e| io("write", e))?;
    for layer in 0..meta.model.n_layers as usize {
        let held = header.layer_from(layer) as usize..range.end;
        for kind in [KvKind::K, KvKind::V] {
            buf.clear();
            source.write_kv(layer, kind, held.clone(), &mut buf);
            if buf.len() != meta.kv_bytes(held.len()) {
                return Err(Error::InvalidInput {
                    detail: format!(
                        "the source gave {} bytes for {}, the metadata implies {}",
                        buf.len(),
                        tensor_name(layer, kind),
                        meta.kv_bytes(held.len())
                    ),
                });
            }
            header
                .checksums
                .insert(tensor_name(layer, kind), checksum(&buf));
            file.write_all(&buf).map_err(|e| io("write", e))?;
            written += buf.len() as u64;
        }
    }
    let real = encode_header(&header, &layout)?;
    if real.len() != placeholder.len() {
        return Err(Error::InvalidInput {
            detail: "segment header changed size while writing".into(),
        });
    }
    file.seek(SeekFrom::Start(8)).map_err(|e| io("seek", e))?;
    file.write_all(&real).map_err(|e| io("write", e))?;
    Ok(written)
}

/// How a segment's bytes are brought into memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadMode {
    /// Map the file (no copy; the page cache is the buffer).
    #[default]
    Mmap,
    /// Read the file into an owned buffer (one copy; no `unsafe` involved).
    Buffered,
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }

    /// Lets a mapped range's pages go from memory (see [`crate::map::release`]).
    fn release(&self, range: Range<usize>) {
        if let Bytes::Mapped(m) = self {
            crate::map::release(m, range);
        }
    }
}

/// A validated segment in memory.
pub struct Segment {
    path: PathBuf,
    bytes: Bytes,
    /// The file a mapped segment maps, for [`Segment::read_kv`].
    file: Option<File>,
    header: SegmentHeader,
    /// Byte ranges into `bytes` of tokens, then K and V of each layer.
    ranges: Vec<Range<usize>>,
    /// The checksum the header records for each of `ranges`.
    sums: Vec<String>,
    /// Whether every tensor's checksum was verified when the segment was opened (else each is
    /// verified as it is read: see [`SegmentReader`](crate::SegmentReader)).
    hashed: bool,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("id", &self.header.id)
            .finish()
    }
}

impl Segment {
    /// Opens and fully validates a segment file: safetensors structure, agentkv header and version,
    /// tensor names, dtypes and shapes, checksums, and that its id matches its content.
    pub fn open(path: &Path, mode: ReadMode) -> Result<Segment> {
        Segment::open_hashing(path, mode, true)
    }

    /// [`Segment::open`], hashing the tensors now or (`hash == false`, mapped segments only)
    /// leaving each to be verified as a [`SegmentReader`](crate::SegmentReader) reads it.
    pub(crate) fn open_hashing(path: &Path, mode: ReadMode, hash: bool) -> Result<Segment> {
        let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        match mode {
            ReadMode::Mmap => {
                let map = crate::map::map_segment(&file).map_err(|e| Error::io("map", path, e))?;
                // Tensors are hashed from the file, not through the mapping (see
                // `checksum_file`).
                let hash_from = hash.then_some(&file);
                let mut segment = Segment::validate(path, Bytes::Mapped(map), hash_from)?;
                segment.file = Some(file);
                Ok(segment)
            }
            ReadMode::Buffered => {
                let mut v = Vec::new();
                file.read_to_end(&mut v)
                    .map_err(|e| Error::io("read", path, e))?;
                Segment::validate(path, Bytes::Owned(v), None)
            }
        }
    }

    /// Validates a segment held in memory, exactly as [`Segment::open`] validates a file
    /// (`path` only names it in errors). This is the entry point of the fuzz target.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Segment> {
        Segment::validate(path, Bytes::Owned(bytes), None)
    }

    /// Validates `bytes`. A mapped segment's tensors are hashed from `file` (the file the
    /// mapping maps) when it is given and left unhashed when not; owned bytes are always
    /// hashed.
    fn validate(path: &Path, bytes: Bytes, file: Option<&File>) -> Result<Segment> {
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(bytes.as_slice())
            .map_err(|source| Error::BadSafetensors {
                path: path.to_owned(),
                source,
            })?;
        let data_start = 8 + header_len;
        let header = parse_header(path, &metadata)?;
        let n = usize::try_from(header.n_tokens)
            .map_err(|_| Error::bad_metadata(path, "token count overflows"))?;
        if header.meta.check_dtype().is_err() {
            return Err(Error::bad_metadata(
                path,
                format!(
                    "kv dtype {} cannot hold rows of head width {}",
                    header.meta.dtype, header.meta.model.head_dim
                ),
            ));
        }
        check_held(path, &header)?;
        let expected = layout(&header.meta, n, &header.held());
        if metadata.tensors().len() != expected.len() {
            return Err(Error::bad_metadata(
                path,
                format!(
                    "{} tensors, expected {}",
                    metadata.tensors().len(),
                    expected.len()
                ),
            ));
        }
        let mut ranges = Vec::with_capacity(expected.len());
        let mut sums = Vec::with_capacity(expected.len());
        for (name, dtype, shape) in &expected {
            let info = metadata
                .info(name)
                .ok_or_else(|| Error::bad_metadata(path, format!("tensor {name} is missing")))?;
            if info.dtype != *dtype || info.shape != *shape {
                return Err(Error::bad_metadata(
                    path,
                    format!(
                        "tensor {name} is {:?} {:?}, expected {dtype:?} {shape:?}",
                        info.dtype, info.shape
                    ),
                ));
            }
            let (s, e) = info.data_offsets;
            let range = data_start.checked_add(s).zip(data_start.checked_add(e));
            let range = range.filter(|(s, e)| s <= e && *e <= bytes.as_slice().len());
            let (s, e) = range.ok_or_else(|| {
                Error::bad_metadata(path, format!("tensor {name} is out of bounds"))
            })?;
            let recorded = header
                .checksums
                .get(name)
                .ok_or_else(|| Error::bad_metadata(path, format!("no checksum for {name}")))?;
            ranges.push(s..e);
            sums.push((name, recorded));
        }
        // Hashing every byte is most of a load; tensors hash in parallel (the first damaged
        // one in file order is reported, as is the first that could not be read).
        let hash = file.is_some() || matches!(bytes, Bytes::Owned(_));
        let hashed: Vec<std::io::Result<bool>> = match hash {
            false => Vec::new(),
            true => ranges
                .par_iter()
                .zip(&sums)
                .map(|(r, (_, recorded))| {
                    let sum = match file {
                        Some(f) => checksum_file(f, r.start as u64..r.end as u64)?,
                        None => checksum(&bytes.as_slice()[r.clone()]),
                    };
                    Ok(**recorded == sum)
                })
                .collect(),
        };
        for (ok, (name, _)) in hashed.into_iter().zip(&sums) {
            if !ok.map_err(|e| Error::io("read", path, e))? {
                return Err(Error::ChecksumMismatch {
                    path: path.to_owned(),
                    tensor: name.to_string(),
                });
            }
        }
        let sums = sums.into_iter().map(|(_, sum)| sum.clone()).collect();
        let segment = Segment {
            path: path.to_owned(),
            bytes,
            file: None,
            header,
            ranges,
            sums,
            hashed: hash,
        };
        let h = &segment.header;
        let compute = match h.version {
            1 | 2 => SegmentId::compute_v1,
            _ => SegmentId::compute,
        };
        let id = compute(&h.meta, h.parent.as_ref(), &segment.tokens());
        if id != segment.header.id {
            return Err(Error::bad_metadata(
                path,
                format!(
                    "content hashes to segment id {id}, header says {}",
                    segment.header.id
                ),
            ));
        }
        Ok(segment)
    }

    /// The whole file's bytes, once validated (a mapped segment is copied).
    pub fn into_bytes(self) -> Vec<u8> {
        match self.bytes {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m.to_vec(),
        }
    }

    pub(crate) fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// The file this segment was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The segment's content id.
    pub fn id(&self) -> &SegmentId {
        &self.header.id
    }

    /// Position of the segment's first token in the cache.
    pub fn start(&self) -> usize {
        self.header.start as usize
    }

    /// Number of tokens in the segment.
    pub fn len(&self) -> usize {
        self.header.n_tokens as usize
    }

    /// True for a segment of no tokens.
    pub fn is_empty(&self) -> bool {
        self.header.n_tokens == 0
    }

    /// The segment's token ids.
    pub fn tokens(&self) -> Vec<u32> {
        let bytes = &self.bytes.as_slice()[self.ranges[0].clone()];
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The first position whose K/V layer `layer` holds: [`Segment::start`], or later for a
    /// sliding-window layer (format version 2).
    pub fn kv_from(&self, layer: usize) -> usize {
        self.header.layer_from(layer) as usize
    }

    /// Raw little-endian bytes of K or V of `layer`, shape `[n_kv_heads, held, head_dim]` for
    /// the `held` positions from [`Segment::kv_from`] to the segment's end.
    ///
    /// # Panics
    /// If `layer` is not below the model's layer count.
    pub fn kv(&self, layer: usize, kind: KvKind) -> &[u8] {
        let i = tensor_index(layer, kind);
        &self.bytes.as_slice()[self.ranges[i].clone()]
    }

    /// Copies bytes `range` of [`Segment::kv`]`(layer, kind)` into `out` (as long as the
    /// range). A mapped segment reads them from its file (`pread`: the kernel copies from the
    /// page cache into `out`), so the mapping's pages are never faulted in, nor unmapped
    /// afterwards; a buffered one copies from memory.
    ///
    /// Copied out of the mapping instead, with non-temporal stores (so that `out`'s lines are not
    /// read before being written; each 256 KB piece hashed through the mapping first, with or
    /// without populating it), a resume of SmolLM2 after 2,048 tokens took the same time on an
    /// Intel Xeon in December 2026 (39.95 against 40.03 ms and 40.97 against 40.94, medians of 200
    /// each, alternately), though a C test of the copy alone, whose threads had exited before
    /// unmapping, saved 0.6-0.9 ms of 4-6.
    ///
    /// # Panics
    /// If `layer` is not below the model's layer count, `range` is not within the tensor or
    /// `out` is not as long as `range`.
    pub fn read_kv(
        &self,
        layer: usize,
        kind: KvKind,
        range: Range<usize>,
        out: &mut [u8],
    ) -> Result<()> {
        let i = tensor_index(layer, kind);
        let tensor = self.ranges[i].clone();
        assert!(
            range.end <= tensor.len(),
            "bytes {range:?} of a tensor of {}",
            tensor.len()
        );
        match &self.file {
            Some(file) => {
                use std::os::unix::fs::FileExt;
                file.read_exact_at(out, (tensor.start + range.start) as u64)
                    .map_err(|e| Error::io("read", &self.path, e))
            }
            None => {
                out.copy_from_slice(&self.bytes.as_slice()[tensor][range]);
                Ok(())
            }
        }
    }

    /// Reads the whole of [`Segment::kv`]`(layer, kind)` into `parts`, in order, as
    /// [`Segment::read_kv`] reads a range (the segment was verified when it was opened).
    ///
    /// # Panics
    /// As [`Segment::read_kv`], and if the parts run past the tensor.
    pub fn read_parts(&self, layer: usize, kind: KvKind, parts: &mut [Part<'_>]) -> Result<()> {
        let mut at = 0;
        for part in parts.iter_mut() {
            if let Part::Into(buf) = part {
                self.read_kv(layer, kind, at..at + buf.len(), buf)?;
            }
            at += part.len();
        }
        Ok(())
    }

    /// The length in bytes of [`Segment::kv`]`(layer, kind)`.
    pub(crate) fn kv_len(&self, layer: usize, kind: KvKind) -> usize {
        self.ranges[tensor_index(layer, kind)].len()
    }

    /// The checksum the header records for [`Segment::kv`]`(layer, kind)`.
    pub(crate) fn recorded_sum(&self, layer: usize, kind: KvKind) -> &str {
        &self.sums[tensor_index(layer, kind)]
    }

    /// Whether every tensor was verified when the segment was opened.
    pub(crate) fn is_hashed(&self) -> bool {
        self.hashed
    }

    /// Lets the pages of [`Segment::kv`]`(layer, kind)` go from memory once they have been
    /// read: a mapped segment's bytes are mapped in as they are touched and stay until
    /// released, so a reader that releases each tensor after use holds only the tensors it is
    /// reading. Reading them again afterwards works (they are mapped in again). Does nothing
    /// for a buffered segment.
    ///
    /// # Panics
    /// If `layer` is not below the model's layer count.
    pub fn release_kv(&self, layer: usize, kind: KvKind) {
        let i = tensor_index(layer, kind);
        self.bytes.release(self.ranges[i].clone());
    }
}

fn parse_header(path: &Path, metadata: &Metadata) -> Result<SegmentHeader> {
    let json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| Error::bad_metadata(path, "no agentkv header in __metadata__"))?;
    // Read the version before the rest, so a newer file says so instead of failing to parse.
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| Error::bad_metadata(path, e.to_string()))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
        return Err(Error::bad_metadata(path, "not an agentkv segment"));
    }
    let version = value
        .get("version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::bad_metadata(path, "no version"))?;
    if version == 0 || version > u64::from(SEGMENT_VERSION) {
        return Err(Error::UnsupportedVersion {
            path: path.to_owned(),
            kind: "segment",
            found: u32::try_from(version).unwrap_or(u32::MAX),
            supported: SEGMENT_VERSION,
        });
    }
    serde_json::from_value(value).map_err(|e| Error::bad_metadata(path, e.to_string()))
}

/// Checks `kv_from` against the version and the segment: present exactly from version 2 on, one
/// entry per layer, each inside the segment and no later than the first position a
/// continuation from the segment's end attends to (a layer may hold more, as version 1
/// segments of sliding-window models do, never less).
pub(crate) fn check_held(path: &Path, h: &SegmentHeader) -> Result<()> {
    let bad = |detail: String| Error::bad_metadata(path, detail);
    let end = h
        .start
        .checked_add(h.n_tokens)
        .ok_or_else(|| bad("token range overflows".into()))?;
    let from = match (h.version, &h.kv_from) {
        (1, None) => return Ok(()),
        (1, Some(_)) => return Err(bad("kv_from in a version 1 segment".into())),
        (_, None) => {
            return Err(bad(format!(
                "no kv_from in a version {} segment",
                h.version
            )));
        }
        (_, Some(from)) => from,
    };
    let windows = h
        .meta
        .layer_windows()
        .map_err(|e| bad(format!("sliding windows: {e}")))?;
    if from.len() != windows.len() {
        return Err(bad(format!(
            "kv_from has {} entries for {} layers",
            from.len(),
            windows.len()
        )));
    }
    for (layer, (&f, &w)) in from.iter().zip(&windows).enumerate() {
        let needed = first_needed(w, h.start, end);
        if f < h.start || f > needed {
            return Err(bad(format!(
                "layer {layer} holds positions from {f}, the segment covers {}..{end} and a continuation needs them from {needed}",
                h.start
            )));
        }
    }
    Ok(())
}
