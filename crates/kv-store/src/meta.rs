//! What a cache is compatible with: model, tokenizer and template fingerprints, the KV dtype,
//! and the content-derived segment ids built from them.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hasher as _;

use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_128 as Xxh3_128;

/// Element type of the K and V tensors, on disk and in memory alike.
///
/// A file naming a dtype this build does not know is rejected, not misread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum KvDtype {
    /// IEEE 754 single precision, 4 bytes.
    F32,
    /// IEEE 754 half precision, 2 bytes.
    F16,
    /// bfloat16, 2 bytes.
    Bf16,
    /// 8-bit blocks as llama.cpp's `q8_0`: each run of [`Q8_0_BLOCK`] values of a row is one
    /// f16 scale `d` (little-endian) and 32 signed bytes `q`, the value being `d * q`;
    /// [`Q8_0_BLOCK_BYTES`] bytes per block. A row's width must be a multiple of 32.
    #[serde(rename = "q8_0")]
    Q8_0,
}

/// Values per `q8_0` block.
pub const Q8_0_BLOCK: usize = 32;
/// Bytes per `q8_0` block: the f16 scale, then 32 signed bytes.
pub const Q8_0_BLOCK_BYTES: usize = 34;

impl KvDtype {
    /// Bytes of a row of `width` values, or `None` when this dtype cannot hold such a row
    /// (`q8_0` needs a multiple of [`Q8_0_BLOCK`]).
    pub fn row_bytes(self, width: usize) -> Option<usize> {
        match self {
            KvDtype::F32 => width.checked_mul(4),
            KvDtype::F16 | KvDtype::Bf16 => width.checked_mul(2),
            KvDtype::Q8_0 => width
                .is_multiple_of(Q8_0_BLOCK)
                .then(|| width / Q8_0_BLOCK * Q8_0_BLOCK_BYTES),
        }
    }

    /// The lower-case name used in metadata and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::Q8_0 => "q8_0",
        }
    }

    /// The dtype called `name` (`f32`, `f16`, `bf16`, `q8_0`).
    pub fn from_name(name: &str) -> Option<KvDtype> {
        [KvDtype::F32, KvDtype::F16, KvDtype::Bf16, KvDtype::Q8_0]
            .into_iter()
            .find(|d| d.name() == name)
    }

    /// The safetensors dtype its tensors are stored as: `U8` rows of blocks for `q8_0`.
    pub(crate) fn safetensors(self) -> safetensors::Dtype {
        match self {
            KvDtype::F32 => safetensors::Dtype::F32,
            KvDtype::F16 => safetensors::Dtype::F16,
            KvDtype::Bf16 => safetensors::Dtype::BF16,
            KvDtype::Q8_0 => safetensors::Dtype::U8,
        }
    }

    /// Elements of the stored tensor per row of `width` values: `width`, or the row's bytes
    /// for `q8_0`.
    pub(crate) fn stored_width(self, width: usize) -> Option<usize> {
        match self {
            KvDtype::Q8_0 => self.row_bytes(width),
            _ => Some(width),
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything about a model that decides the values in its KV cache.
///
/// Two caches are interchangeable only if their fingerprints are equal. `weights_hash` alone
/// would do, but the named shape fields let an error say *what* differs.
///
/// Its fields are a closed set (the segment id covers each of them): a file with another field
/// here is damaged. What else changes K/V goes into `extra`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFingerprint {
    /// Architecture name, as in GGUF's `general.architecture` (e.g. `llama`).
    pub architecture: String,
    /// Number of transformer layers.
    pub n_layers: u32,
    /// Number of query heads.
    pub n_heads: u32,
    /// Number of key/value heads.
    pub n_kv_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Number of rotated dimensions per head.
    pub rope_dim: u32,
    /// Hash of the weights' bytes (any stable hash, as a hex string).
    pub weights_hash: String,
    /// Architecture-specific parameters that change the KV values (a sliding window, RoPE
    /// scaling...), as name to value. Empty for plain llama.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

/// The full compatibility key of a saved cache.
///
/// A closed set of fields, as [`ModelFingerprint`]'s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheMeta {
    /// The model the cache was computed with.
    pub model: ModelFingerprint,
    /// Hash of the tokenizer (vocabulary, merges, pre-tokenizer).
    pub tokenizer: String,
    /// Hash of the chat template.
    pub chat_template: String,
    /// Element type of K and V on disk.
    pub dtype: KvDtype,
}

impl CacheMeta {
    /// Shape of one layer's K (or V) tensor as stored for `n_tokens` tokens:
    /// `[n_kv_heads, n_tokens, head_dim]`, the last dimension in bytes for `q8_0`
    /// (`head_dim / 32 * 34`).
    pub fn kv_shape(&self, n_tokens: usize) -> [usize; 3] {
        let width = self.model.head_dim as usize;
        [
            self.model.n_kv_heads as usize,
            n_tokens,
            self.dtype.stored_width(width).unwrap_or(width),
        ]
    }

    /// Bytes of one row (one head, one token) of K or V.
    pub fn row_bytes(&self) -> usize {
        self.dtype
            .row_bytes(self.model.head_dim as usize)
            .unwrap_or(0)
    }

    /// Bytes of one layer's K (or V) for `n_tokens` tokens.
    pub fn kv_bytes(&self, n_tokens: usize) -> usize {
        self.model.n_kv_heads as usize * n_tokens * self.row_bytes()
    }

    /// Checks that the dtype can hold this model's rows (`q8_0` needs a head width that is a
    /// multiple of 32).
    pub fn check_dtype(&self) -> crate::Result<()> {
        match self.dtype.row_bytes(self.model.head_dim as usize) {
            Some(_) => Ok(()),
            None => Err(crate::Error::InvalidInput {
                detail: format!(
                    "kv dtype {} needs a head width that is a multiple of {Q8_0_BLOCK}, not {}: use f16 or f32",
                    self.dtype, self.model.head_dim
                ),
            }),
        }
    }

    /// The first field that differs from `found`, as (field, expected, found), or `None`.
    pub fn first_difference(&self, found: &CacheMeta) -> Option<(&'static str, String, String)> {
        let (e, f) = (&self.model, &found.model);
        let fields: [(&'static str, String, String); 12] = [
            (
                "architecture",
                e.architecture.clone(),
                f.architecture.clone(),
            ),
            (
                "layer count",
                e.n_layers.to_string(),
                f.n_layers.to_string(),
            ),
            ("head count", e.n_heads.to_string(), f.n_heads.to_string()),
            (
                "kv head count",
                e.n_kv_heads.to_string(),
                f.n_kv_heads.to_string(),
            ),
            ("head dim", e.head_dim.to_string(), f.head_dim.to_string()),
            (
                "rope theta",
                e.rope_theta.to_string(),
                f.rope_theta.to_string(),
            ),
            ("rope dim", e.rope_dim.to_string(), f.rope_dim.to_string()),
            // Before the parameters, which an engine may derive from the dtype (agentkv's
            // records how attention read the history): a cache of another dtype is named
            // as that.
            ("kv dtype", self.dtype.to_string(), found.dtype.to_string()),
            (
                "model parameters",
                format!("{:?}", e.extra),
                format!("{:?}", f.extra),
            ),
            (
                "model weights",
                e.weights_hash.clone(),
                f.weights_hash.clone(),
            ),
            ("tokenizer", self.tokenizer.clone(), found.tokenizer.clone()),
            (
                "chat template",
                self.chat_template.clone(),
                found.chat_template.clone(),
            ),
        ];
        fields.into_iter().find(|(_, a, b)| a != b)
    }
}

/// `model.extra` key of the sliding window: a query at position `p` of a sliding layer sees
/// positions `p + 1 - window ..= p`.
pub const EXTRA_SLIDING_WINDOW: &str = "sliding_window";
/// `model.extra` key saying which layers slide: one letter per layer, `S` sliding, `G`
/// global. Without it, every layer slides.
pub const EXTRA_SLIDING_LAYERS: &str = "sliding_window_layers";

impl CacheMeta {
    /// The sliding window of each layer (`None`: the layer attends to every earlier
    /// position), from `model.extra`'s [`EXTRA_SLIDING_WINDOW`] and [`EXTRA_SLIDING_LAYERS`].
    /// Malformed entries are an error describing them.
    pub fn layer_windows(&self) -> std::result::Result<Vec<Option<usize>>, String> {
        let n_layers = self.model.n_layers as usize;
        let extra = &self.model.extra;
        let Some(window) = extra.get(EXTRA_SLIDING_WINDOW) else {
            if extra.contains_key(EXTRA_SLIDING_LAYERS) {
                return Err(format!(
                    "{EXTRA_SLIDING_LAYERS} is given without {EXTRA_SLIDING_WINDOW}"
                ));
            }
            return Ok(vec![None; n_layers]);
        };
        let window = window
            .parse::<usize>()
            .ok()
            .filter(|&w| w > 0)
            .ok_or_else(|| format!("{EXTRA_SLIDING_WINDOW} {window:?} is not a positive count"))?;
        let Some(letters) = extra.get(EXTRA_SLIDING_LAYERS) else {
            return Ok(vec![Some(window); n_layers]);
        };
        if letters.len() != n_layers {
            return Err(format!(
                "{EXTRA_SLIDING_LAYERS} has {} letters for {n_layers} layers",
                letters.len()
            ));
        }
        letters
            .bytes()
            .map(|b| match b {
                b'S' => Ok(Some(window)),
                b'G' => Ok(None),
                _ => Err(format!(
                    "{EXTRA_SLIDING_LAYERS} {letters:?} holds a letter other than S and G"
                )),
            })
            .collect()
    }
}

/// The first position a layer with `window` must hold for a cache of `n` tokens to be
/// continued: the next token, at position `n`, sees `n + 1 - window ..= n`. Every position
/// (0) for a layer without a window.
pub fn kept_from(window: Option<usize>, n: usize) -> usize {
    window.map_or(0, |w| (n + 1).saturating_sub(w))
}

/// Content address of a segment: a hash of (cache meta, parent segment id, token ids).
///
/// Two segments with the same id hold the K/V of the same tokens after the same history under
/// the same model, so they are interchangeable: this is what deduplicates shared prefixes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SegmentId(String);

impl SegmentId {
    /// Computes the id of the segment holding `tokens` after `parent` under `meta`: the
    /// xxh3-128 of their canonical encoding (docs/format.md, "Segment ids"), which any
    /// language can reproduce from the fields alone.
    pub fn compute(meta: &CacheMeta, parent: Option<&SegmentId>, tokens: &[u32]) -> SegmentId {
        let mut hasher = Xxh3_128::new();
        hasher.write(b"agentkv.segment.v3\0");
        let mut buf = Vec::with_capacity(512);
        canonical_meta(meta, &mut buf);
        hasher.write(&buf);
        SegmentId::finish(hasher, parent, tokens)
    }

    /// The id as segment format versions 1 and 2 computed it: over serde_json's compact
    /// encoding of `meta` (fields in declaration order). Only for reading those files.
    pub(crate) fn compute_v1(
        meta: &CacheMeta,
        parent: Option<&SegmentId>,
        tokens: &[u32],
    ) -> SegmentId {
        let mut hasher = Xxh3_128::new();
        let meta_json = serde_json::to_vec(meta).unwrap_or_default();
        hasher.write(b"agentkv.segment.v1\0");
        hasher.write(&(meta_json.len() as u64).to_le_bytes());
        hasher.write(&meta_json);
        SegmentId::finish(hasher, parent, tokens)
    }

    fn finish(mut hasher: Xxh3_128, parent: Option<&SegmentId>, tokens: &[u32]) -> SegmentId {
        match parent {
            Some(p) => {
                hasher.write(&[1]);
                hasher.write(p.0.as_bytes());
            }
            None => hasher.write(&[0]),
        }
        hasher.write(&(tokens.len() as u64).to_le_bytes());
        for t in tokens {
            hasher.write(&t.to_le_bytes());
        }
        SegmentId(format!("{:032x}", hasher.finish_128()))
    }

    /// Parses an id read from a file, accepting only 32 lower-case hex digits (so an id can
    /// never smuggle a path into a file name).
    pub fn parse(s: &str) -> Option<SegmentId> {
        let ok = s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| SegmentId(s.to_owned()))
    }

    /// The id as 32 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a cache name: 1 to 64 characters of `[a-z0-9_-]`, so it is always a plain file name.
pub fn validate_name(name: &str) -> crate::Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 64 {
        Some("it is longer than 64 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        Some("use only lower-case letters, digits, '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(crate::Error::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Appends the canonical encoding of `meta` (docs/format.md, "Segment ids"): every field in a
/// fixed order, integers little-endian, `rope_theta` as its IEEE 754 bits, strings as a u64
/// byte length then their UTF-8, `extra` as its entry count then key and value of each entry
/// in ascending byte order of the keys.
fn canonical_meta(meta: &CacheMeta, out: &mut Vec<u8>) {
    fn text(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let m = &meta.model;
    text(out, &m.architecture);
    for n in [m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim] {
        out.extend(n.to_le_bytes());
    }
    out.extend(m.rope_theta.to_bits().to_le_bytes());
    out.extend(m.rope_dim.to_le_bytes());
    text(out, &m.weights_hash);
    out.extend((m.extra.len() as u64).to_le_bytes());
    // A BTreeMap of Strings iterates in ascending byte order of its keys.
    for (key, value) in &m.extra {
        text(out, key);
        text(out, value);
    }
    text(out, &meta.tokenizer);
    text(out, &meta.chat_template);
    text(out, meta.dtype.name());
}

pub(crate) fn checksum(bytes: &[u8]) -> String {
    checksum_text(twox_hash::XxHash3_64::oneshot(bytes))
}

/// A tensor's xxh3-64 as the manifest records it: 16 lower-case hex digits.
pub(crate) fn checksum_text(sum: u64) -> String {
    format!("{sum:016x}")
}

/// Bytes read from a file and hashed at a time: small enough to still be in L2 when hashed.
pub(crate) const PIECE: usize = 256 << 10;

/// [`checksum`] of the bytes at `range` of `file`, read with `pread` a piece at a time into a
/// buffer the thread keeps (the same digest: xxh3's streaming form equals its one-shot one).
///
/// Hashing a mapped segment through its mapping faults every page in and then has to unmap
/// them again (each unmapping interrupts the other cores to flush their TLBs): a third of
/// loading a 2,048-token cache. Read into a buffer that stays in L2, the bytes are hashed
/// where they arrive and the mapping is not touched.
pub(crate) fn checksum_file(
    file: &std::fs::File,
    range: std::ops::Range<u64>,
) -> std::io::Result<String> {
    use std::cell::RefCell;
    use std::os::unix::fs::FileExt;
    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        buf.resize(PIECE, 0);
        let mut hasher = twox_hash::XxHash3_64::new();
        let mut at = range.start;
        while at < range.end {
            let n = PIECE.min(usize::try_from(range.end - at).unwrap_or(PIECE));
            file.read_exact_at(&mut buf[..n], at)?;
            hasher.write(&buf[..n]);
            at += n as u64;
        }
        Ok(checksum_text(hasher.finish()))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small model's metadata: 2 layers, 2 KV heads of width 4.
    pub(crate) fn meta(dtype: KvDtype) -> CacheMeta {
        crate::testing::meta(2, 2, 4, dtype)
    }

    #[test]
    fn a_file_range_hashes_as_its_bytes() {
        use std::io::Write;
        let bytes: Vec<u8> = (0..700_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let piece = 256 << 10;
        for range in [0..0, 0..1, 5..piece - 1, 0..piece, 1..piece + 1, 3..700_000] {
            let sum = checksum_file(&file, range.start as u64..range.end as u64).unwrap();
            assert_eq!(sum, checksum(&bytes[range.clone()]), "{range:?}");
        }
        // Past the end of the file is an error, not a short hash.
        assert!(checksum_file(&file, 699_999..700_001).is_err());
    }

    #[test]
    fn hashes_are_xxh3s() {
        // Against xxhash-rust, the implementation files were written with before: every
        // length class of xxh3 (up to 16, 128 and 240 bytes, then stripes, blocks and a
        // partial last stripe), whole and fed in pieces.
        let bytes: Vec<u8> = (0..40_000u32).map(|i| (i * 31 + i / 97) as u8).collect();
        for len in [
            0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 1025, 16_411, 40_000,
        ] {
            let b = &bytes[..len];
            let want = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b));
            let want128 = xxhash_rust::xxh3::xxh3_128(b);
            assert_eq!(checksum(b), want, "len {len}");
            for piece in [1, 63, 64, 1000] {
                let mut h = twox_hash::XxHash3_64::new();
                b.chunks(piece).for_each(|p| h.write(p));
                assert_eq!(
                    format!("{:016x}", h.finish()),
                    want,
                    "len {len} in {piece}s"
                );
                let mut h = Xxh3_128::new();
                b.chunks(piece).for_each(|p| h.write(p));
                assert_eq!(h.finish_128(), want128, "len {len} in {piece}s");
            }
        }
    }

    #[test]
    fn ids_depend_on_everything() {
        let m = meta(KvDtype::F16);
        let a = SegmentId::compute(&m, None, &[1, 2, 3]);
        assert_eq!(a, SegmentId::compute(&m, None, &[1, 2, 3]));
        assert_ne!(a, SegmentId::compute(&m, None, &[1, 2, 4]));
        assert_ne!(a, SegmentId::compute(&m, Some(&a), &[1, 2, 3]));
        assert_ne!(a, SegmentId::compute(&meta(KvDtype::F32), None, &[1, 2, 3]));
        let changed = [
            |m: &mut CacheMeta| m.model.architecture.push('x'),
            |m: &mut CacheMeta| m.model.n_layers += 1,
            |m: &mut CacheMeta| m.model.n_heads += 1,
            |m: &mut CacheMeta| m.model.n_kv_heads += 1,
            |m: &mut CacheMeta| m.model.head_dim += 1,
            |m: &mut CacheMeta| {
                m.model.rope_theta = f64::from_bits(m.model.rope_theta.to_bits() + 1)
            },
            |m: &mut CacheMeta| m.model.rope_dim += 1,
            |m: &mut CacheMeta| m.model.weights_hash.push('x'),
            |m: &mut CacheMeta| {
                m.model.extra.insert("k".into(), String::new());
            },
            |m: &mut CacheMeta| m.tokenizer.push('x'),
            |m: &mut CacheMeta| m.chat_template.push('x'),
        ];
        for (i, change) in changed.into_iter().enumerate() {
            let mut other = m.clone();
            change(&mut other);
            assert_ne!(a, SegmentId::compute(&other, None, &[1, 2, 3]), "field {i}");
        }
        // Lengths are part of the encoding: moving bytes from one string to the next changes it.
        let (mut x, mut y) = (m.clone(), m.clone());
        (x.tokenizer, x.chat_template) = ("ab".into(), "c".into());
        (y.tokenizer, y.chat_template) = ("a".into(), "bc".into());
        assert_ne!(
            SegmentId::compute(&x, None, &[1]),
            SegmentId::compute(&y, None, &[1])
        );
        assert!(SegmentId::parse(a.as_str()).is_some());
        assert!(SegmentId::parse("../../etc/passwd").is_none());
    }

    #[test]
    fn ids_are_the_documented_canonical_encodings_hash() {
        // Computed by tests/format/python_store.py's `segment_id` (Python's `xxhash` package
        // over docs/format.md's encoding), not by this crate: a change to the encoding that
        // the format does not describe fails here.
        let mut m = meta(KvDtype::F16);
        let first = SegmentId::compute(&m, None, &[1, 2, 3]);
        assert_eq!(first.as_str(), "e2e37629a3580ed8e613f30d9b868770");
        m.model
            .extra
            .insert(EXTRA_SLIDING_WINDOW.into(), "512".into());
        m.model
            .extra
            .insert(EXTRA_SLIDING_LAYERS.into(), "SG".into());
        let second = SegmentId::compute(&m, Some(&first), &[4, 5]);
        assert_eq!(second.as_str(), "b6d9ed1f9ce862608ff9c92c9b834aa0");
    }

    #[test]
    fn names() {
        assert!(validate_name("agent-1_x").is_ok());
        for bad in ["", "A", "a/b", "..", "a.b", &"x".repeat(65)] {
            assert!(
                matches!(validate_name(bad), Err(crate::Error::InvalidName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn first_difference_names_the_field() {
        let a = meta(KvDtype::F16);
        let mut b = a.clone();
        assert_eq!(a.first_difference(&b), None);
        b.model.weights_hash = "w2".into();
        assert_eq!(
            a.first_difference(&b),
            Some(("model weights", a.model.weights_hash.clone(), "w2".into()))
        );
        // Another dtype whose engine also records something of it in `extra`: named as the
        // dtype.
        let mut c = a.clone();
        c.dtype = KvDtype::F32;
        c.model.extra.insert("kv_history".into(), "x".into());
        assert_eq!(
            a.first_difference(&c),
            Some(("kv dtype", "f16".into(), "f32".into()))
        );
    }
}
