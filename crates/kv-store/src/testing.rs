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
