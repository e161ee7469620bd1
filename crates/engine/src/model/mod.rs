//! A model loaded from a GGUF file (the llama, Gemma 3 and Qwen2 architectures), and its
//! forward pass over our own [`KvCache`].
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

pub use config::{Architecture, ModelConfig, SUPPORTED_ARCHITECTURES};
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
    /// Their biases, stacked the same way (zeros for a projection without one), when the
    /// file has any (Qwen2 has all three).
    qkv_bias: Option<Vec<f32>>,
    attn_output: Weight,
    ffn_norm: Vec<f32>,
    /// Gate and up projections stacked row-wise.
    gate_up: Weight,
    ffn_down: Weight,
    /// Gemma 3's extra norms; `None` for llama.
    gemma: Option<GemmaNorms>,
    /// Positions a query sees in this layer, itself included, when it has a sliding window.
    window: Option<usize>,
}

/// The RMSNorm weights a Gemma 3 layer has beyond llama's.
struct GemmaNorms {
    /// Of each query head and each key head (`head_dim` values), before RoPE.
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    /// Of the attention output and of the MLP output, before each residual add.
    post_attn_norm: Vec<f32>,
    post_ffn_norm: Vec<f32>,
}

/// A loaded model.
pub struct Model {
    config: ModelConfig,
    weights_hash: String,
    token_embd: Weight,
    /// `None` when the LM head is tied to `token_embd` (no `output.weight` in the file).
    output: Option<Weight>,
    /// The LM head's bias (`output.bias`, which llama.cpp's qwen2 graph adds when present).
    output_bias: Option<Vec<f32>>,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// Llama 3's RoPE frequency factors (`rope_freqs.weight`), already divided into
    /// `rope_inv_freq`; kept for the cache fingerprint.
    rope_freq_factors: Option<Vec<f32>>,
    rope_inv_freq: Vec<f64>,
    /// Of the sliding-window layers, when their base differs (Gemma 3).
    rope_inv_freq_swa: Vec<f64>,
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
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// xxh3-128 (32 lower-case hex digits) of every tensor's name, type, shape and raw bytes,
    /// in name order: with the configuration, the model's identity in saved caches' metadata.
    pub fn weights_hash(&self) -> &str {
        &self.weights_hash
    }

    /// Llama 3's RoPE frequency factors (`rope_freqs.weight`, one per rotated pair), which
    /// divide each pair's frequency; `None` when the file has none (every factor 1).
    pub fn rope_freq_factors(&self) -> Option<&[f32]> {
        self.rope_freq_factors.as_deref()
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
    /// would be if memory held every tensor as the file does. (It holds quantized tensors as
    /// the file's bytes, the 32-value kinds rearranged, and F16 and BF16 tensors as f32.)
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
                    + l.qkv_bias
                        .as_ref()
                        .map_or(0, |b| b.len() * size_of::<f32>())
                    + l.attn_output.bytes()
                    + l.gate_up.bytes()
                    + l.ffn_down.bytes()
                    + (l.attn_norm.len() + l.ffn_norm.len()) * size_of::<f32>()
                    + l.gemma.as_ref().map_or(0, |g| {
                        (g.q_norm.len()
                            + g.k_norm.len()
                            + g.post_attn_norm.len()
                            + g.post_ffn_norm.len())
                            * size_of::<f32>()
                    })
            })
            .sum();
        layers
            + self.token_embd.bytes()
            + self.output.as_ref().map_or(0, Weight::bytes)
            + self.output_bias.as_ref().map_or(0, Vec::len) * size_of::<f32>()
            + self.rope_freq_factors.as_ref().map_or(0, Vec::len) * size_of::<f32>()
            + self.output_norm.len() * size_of::<f32>()
    }
}
