//! A llama-architecture model loaded from a GGUF file, and its forward pass over our own
//! [`KvCache`].
//!
//! Quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K) stay quantized in memory
//! (F32, F16 and BF16 ones are read as f32) and are multiplied with the batch-invariant
//! kernels of [`crate::kernels`] and `kernels::quant`, so a token's K/V and logits are
//! bitwise the same whether it was prefilled in a batch of any size or decoded alone, and
//! whatever the cache's capacity.

mod config;
mod forward;
mod load;
#[cfg(test)]
mod tests;

use kv_extract::{KvCache, KvDtype, KvShape};

use crate::error::{EngineError, Result};
use crate::kernels::{Isa, Weight};

pub use config::LlamaConfig;
pub use forward::PREFILL_CHUNK;
#[cfg(test)]
pub(crate) use load::WeightForm;

/// Which logits [`Model::forward`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// The last token's (`vocab_size` floats): what sampling the next token needs.
    Last,
    /// Every new token's, token-major (`n * vocab_size` floats).
    All,
    /// None: only fill the cache (the LM head is skipped).
    None,
}

/// One transformer block's weights.
struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V projections stacked row-wise: one matmul per layer instead of three.
    qkv: Weight,
    attn_output: Weight,
    ffn_norm: Vec<f32>,
    /// Gate and up projections stacked row-wise.
    gate_up: Weight,
    ffn_down: Weight,
}

/// A loaded llama-architecture model.
pub struct Model {
    config: LlamaConfig,
    weights_hash: String,
    token_embd: Weight,
    /// `None` when the LM head is tied to `token_embd` (no `output.weight` in the file).
    output: Option<Weight>,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    rope_inv_freq: Vec<f64>,
    /// The instruction-set level every kernel call runs at.
    isa: Isa,
    /// Bytes the tensors the model uses take in the GGUF file.
    file_tensor_bytes: usize,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("weights_hash", &self.weights_hash)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// The instruction-set level the forward pass runs at: the best this CPU has, or the one
    /// `AGENTKV_SIMD` named when the model was loaded.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Runs the forward pass at `isa` from now on (every level gives the same bits).
    pub fn set_isa(&mut self, isa: Isa) {
        self.isa = isa;
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// xxh3-128 (32 lower-case hex digits) of every tensor's name, type, shape and raw bytes,
    /// in name order: with the configuration, the model's identity in saved caches' metadata.
    pub fn weights_hash(&self) -> &str {
        &self.weights_hash
    }

    /// The shape a KV cache for this model must have.
    pub fn kv_shape(&self) -> KvShape {
        self.config.kv_shape()
    }

    /// An empty KV cache for this model holding K and V in `dtype`.
    pub fn new_cache(&self, dtype: KvDtype) -> Result<KvCache> {
        let shape = self.kv_shape();
        if !shape.supports(dtype) {
            return Err(EngineError::UnsupportedKvDtype {
                dtype,
                head_dim: shape.head_dim,
            });
        }
        Ok(KvCache::new(shape, dtype))
    }

    /// Bytes the tensors the model uses take in its GGUF file: what [`Model::weight_bytes`]
    /// would be if memory held every tensor as the file does. (It holds Q4_1 and Q8_0 with
    /// their scales widened to f32, 24 and 36 bytes a block where the file has 20 and 34, and
    /// F16 and BF16 tensors as f32.)
    pub fn file_tensor_bytes(&self) -> usize {
        self.file_tensor_bytes
    }

    /// Bytes of memory the weights take.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.bytes()
                    + l.attn_output.bytes()
                    + l.gate_up.bytes()
                    + l.ffn_down.bytes()
                    + (l.attn_norm.len() + l.ffn_norm.len()) * size_of::<f32>()
            })
            .sum();
        layers
            + self.token_embd.bytes()
            + self.output.as_ref().map_or(0, Weight::bytes)
            + self.output_norm.len() * size_of::<f32>()
    }
}
