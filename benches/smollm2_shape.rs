//! The cache shape the store benchmarks use: SmolLM2-135M's (30 layers, 3 KV heads, head
//! dim 64), f16. Included by `kv_store.rs` and `remote.rs`.

use std::collections::BTreeMap;

use kv_store::{CacheMeta, KvDtype, ModelFingerprint};

pub const LAYERS: usize = 30;
pub const KV_HEADS: usize = 3;
pub const HEAD_DIM: usize = 64;

pub fn meta() -> CacheMeta {
    CacheMeta {
        model: ModelFingerprint {
            architecture: "llama".into(),
            n_layers: LAYERS as u32,
            n_heads: 9,
            n_kv_heads: KV_HEADS as u32,
            head_dim: HEAD_DIM as u32,
            rope_theta: 100_000.0,
            rope_dim: HEAD_DIM as u32,
            weights_hash: "bench".into(),
            extra: BTreeMap::new(),
        },
        tokenizer: "bench".into(),
        chat_template: "bench".into(),
        dtype: KvDtype::F16,
    }
}
