//! Test support, compiled only for tests (the `testing` feature, which the workspace's test
//! crates enable): the metadata of a made-up model.

use std::collections::BTreeMap;

use crate::{CacheMeta, KvDtype, ModelFingerprint};

/// Metadata of caches in `dtype` for a made-up llama model of `n_layers` layers and
/// `n_kv_heads` KV heads of width `head_dim`, with three query heads per KV head (as in
/// SmolLM2). Its weights hash is `0123456789abcdef`, its tokenizer `tok-1`, its template
/// `tpl-1`: change one to make another model's metadata.
pub fn meta(n_layers: u32, n_kv_heads: u32, head_dim: u32, dtype: KvDtype) -> CacheMeta {
    CacheMeta {
        model: ModelFingerprint {
            architecture: "llama".into(),
            n_layers,
            n_heads: n_kv_heads * 3,
            n_kv_heads,
            head_dim,
            rope_theta: 100_000.0,
            rope_dim: head_dim,
            weights_hash: "0123456789abcdef".into(),
            extra: BTreeMap::new(),
        },
        tokenizer: "tok-1".into(),
        chat_template: "tpl-1".into(),
        dtype,
    }
}

/// Rewrites the agentkv header of the segment file at `path` with `edit` applied to its JSON,
/// keeping the tensors' bytes: what a writer that adds fields to the header produces.
///
/// # Panics
/// If the file cannot be read or written or is not a segment.
#[allow(clippy::unwrap_used)]
pub fn edit_segment_header(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut st: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let key = crate::segment::METADATA_KEY;
    let mut header: serde_json::Value =
        serde_json::from_str(st["__metadata__"][key].as_str().unwrap()).unwrap();
    edit(&mut header);
    st["__metadata__"][key] = serde_json::Value::String(header.to_string());
    let mut st = serde_json::to_vec(&st).unwrap();
    st.resize(st.len().next_multiple_of(8), b' ');
    let mut out = (st.len() as u64).to_le_bytes().to_vec();
    out.extend(st);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}
