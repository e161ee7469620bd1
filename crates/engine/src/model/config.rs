//! [`ModelConfig`]: the architecture and its hyper-parameters, read from GGUF metadata and
//! checked before any tensor is.

use kv_extract::{KvShape, SlidingWindow};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::gguf::meta::{self as gguf_meta, MetadataError};

/// Upper bounds on metadata values, so a hostile file cannot make shape arithmetic overflow
/// or ask for absurd allocations before any tensor byte is checked.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 4096;
const MAX_VOCAB: usize = 1 << 24;
const MAX_CONTEXT: usize = 1 << 24;

/// The architectures the engine runs (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Architecture {
    /// `llama`: RMSNorm, SiLU-gated MLP, interleaved RoPE (SmolLM2, Llama), with Llama 3's
    /// per-pair frequency factors when the file has them (`rope_freqs.weight`).
    Llama,
    /// `gemma3`: scaled embeddings, norms before and after attention and the MLP, per-head
    /// q/k norms, GELU-gated MLP, NeoX RoPE with one base for sliding-window layers and
    /// another for global ones.
    Gemma3,
    /// `qwen2`: llama with biases on the query, key and value projections, NeoX RoPE, and
    /// usually an LM head of its own (Qwen2, Qwen2.5).
    Qwen2,
}

impl Architecture {
    /// The name GGUF files give it.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Gemma3 => "gemma3",
            Architecture::Qwen2 => "qwen2",
        }
    }

    fn from_name(name: &str) -> Option<Architecture> {
        match name {
            "llama" => Some(Architecture::Llama),
            "gemma3" => Some(Architecture::Gemma3),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }
}

/// The architectures [`ModelConfig::from_gguf`] accepts, for error messages.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, gemma3, qwen2";

/// A model's hyper-parameters, from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Which forward pass the weights are for.
    pub arch: Architecture,
    /// Transformer layers (`{arch}.block_count`).
    pub n_layers: usize,
    /// Width of the residual stream (`{arch}.embedding_length`).
    pub dim: usize,
    /// Hidden width of the MLP (`{arch}.feed_forward_length`).
    pub ffn_dim: usize,
    /// Query heads (`{arch}.attention.head_count`).
    pub n_heads: usize,
    /// Key/value heads (`{arch}.attention.head_count_kv`, default `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head (`{arch}.attention.key_length`, default `dim / n_heads`).
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (`{arch}.rope.dimension_count`,
    /// default `head_dim`).
    pub rope_dim: usize,
    /// RoPE base frequency (`{arch}.rope.freq_base`, default 10000): of every layer, or of
    /// the global layers when some have a sliding window.
    pub rope_base: f32,
    /// RoPE base of the sliding-window layers (`{arch}.rope.freq_base_swa`, default 10000, as
    /// llama.cpp has it); `rope_base` when no layer has a window.
    pub rope_base_swa: f32,
    /// Positions each query of a sliding-window layer sees, itself included
    /// (`{arch}.attention.sliding_window`): query `p` sees keys `p - window + 1 ..= p`.
    pub sliding_window: Option<usize>,
    /// Which layers have the sliding window (`{arch}.attention.sliding_window_pattern`: for
    /// Gemma 3 by default every layer but each sixth); empty when none has.
    pub swa_layers: Vec<bool>,
    /// Attention's score scale: `1 / sqrt(head_dim)` (Gemma 3 27B: `1 / sqrt(dim / n_heads)`,
    /// as llama.cpp has it).
    pub attn_scale: f32,
    /// RMSNorm epsilon (`{arch}.attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// Longest sequence the model was trained for (`{arch}.context_length`).
    pub context_length: usize,
    /// Vocabulary size (rows of `token_embd.weight`).
    pub vocab_size: usize,
}

impl ModelConfig {
    /// Reads and validates the configuration from GGUF metadata. The vocabulary size is taken
    /// from the `token_embd.weight` tensor's shape.
    pub(crate) fn from_gguf(file: &GgufFile) -> Result<ModelConfig> {
        let md = file.metadata();
        let arch = gguf_meta::string(md, "general.architecture")?;
        let kind =
            Architecture::from_name(arch).ok_or_else(|| EngineError::UnsupportedArchitecture {
                name: arch.to_owned(),
            })?;
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = gguf_meta::count(md, &key("block_count"), MAX_LAYERS)?;
        let dim = gguf_meta::count(md, &key("embedding_length"), MAX_DIM)?;
        let ffn_dim = gguf_meta::count(md, &key("feed_forward_length"), MAX_DIM)?;
        let n_heads_key = key("attention.head_count");
        let n_heads = gguf_meta::count(md, &n_heads_key, MAX_DIM)?;
        let n_kv_key = key("attention.head_count_kv");
        let n_kv_heads = gguf_meta::opt_count(md, &n_kv_key, MAX_DIM)?.unwrap_or(n_heads);
        if n_heads % n_kv_heads != 0 {
            return Err(bad(
                &n_kv_key,
                format!("{n_heads} query heads are not a multiple of {n_kv_heads}"),
            ));
        }
        let kl_key = key("attention.key_length");
        let head_dim = match gguf_meta::opt_count(md, &kl_key, MAX_DIM)? {
            Some(d) => d,
            None if dim % n_heads == 0 => dim / n_heads,
            None => {
                return Err(bad(
                    &n_heads_key,
                    format!("{dim} is not divisible by {n_heads} heads"),
                ));
            }
        };
        let vl_key = key("attention.value_length");
        if let Some(vl) = gguf_meta::opt_count(md, &vl_key, MAX_DIM)?
            && vl != head_dim
        {
            return Err(bad(
                &vl_key,
                format!("value length {vl} differs from key length {head_dim}"),
            ));
        }
        if n_heads * head_dim > MAX_DIM {
            return Err(bad(
                &n_heads_key,
                format!("{n_heads} heads of {head_dim} is too wide"),
            ));
        }
        let rope_key = key("rope.dimension_count");
        let rope_dim = gguf_meta::opt_count(md, &rope_key, MAX_DIM)?.unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(bad(
                &rope_key,
                format!("{rope_dim} must be even and at most the head width {head_dim}"),
            ));
        }
        let base_key = key("rope.freq_base");
        let rope_base = gguf_meta::opt_f32(md, &base_key)?.unwrap_or(10000.0);
        if !(rope_base.is_finite() && rope_base > 0.0) {
            return Err(bad(
                &base_key,
                format!("{rope_base} is not a positive number"),
            ));
        }
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let rms_eps = gguf_meta::opt_f32(md, &eps_key)?.ok_or_else(|| MetadataError::Missing {
            key: eps_key.clone(),
        })?;
        if !(rms_eps.is_finite() && rms_eps >= 0.0) {
            return Err(bad(
                &eps_key,
                format!("{rms_eps} is not a non-negative number"),
            ));
        }
        let context_length = gguf_meta::count(md, &key("context_length"), MAX_CONTEXT)?;
        if let Some(scaling) = gguf_meta::opt_string(md, &key("rope.scaling.type"))?
            && scaling != "none"
        {
            // Gemma 3's larger models scale global layers' positions linearly; the engine does
            // not implement it yet, and running without it would give other logits silently.
            return Err(bad(
                &key("rope.scaling.type"),
                format!("rope scaling `{scaling}` is not supported (only unscaled rope is)"),
            ));
        }
        let mut sliding_window = None;
        let mut swa_layers = Vec::new();
        let mut rope_base_swa = rope_base;
        if kind == Architecture::Gemma3 {
            let window_key = key("attention.sliding_window");
            sliding_window = gguf_meta::opt_count(md, &window_key, MAX_CONTEXT)?.filter(|&w| w > 0);
            if sliding_window.is_some() {
                let pattern_key = key("attention.sliding_window_pattern");
                let pattern = gguf_meta::opt_count(md, &pattern_key, MAX_LAYERS)?.unwrap_or(6);
                // llama.cpp's `set_swa_pattern`: within each run of `pattern` layers, all but
                // the last have the window (0: every layer has it).
                swa_layers = (0..n_layers)
                    .map(|il| pattern == 0 || il % pattern < pattern - 1)
                    .collect();
                // The cache's shape names its sliding layers in 128 bits.
                if swa_layers.iter().skip(128).any(|&s| s) {
                    return Err(bad(
                        &window_key,
                        format!(
                            "{n_layers} layers with a sliding window: at most 128 are supported"
                        ),
                    ));
                }
                rope_base_swa =
                    gguf_meta::opt_f32(md, &key("rope.freq_base_swa"))?.unwrap_or(10000.0);
                if !(rope_base_swa.is_finite() && rope_base_swa > 0.0) {
                    return Err(bad(
                        &key("rope.freq_base_swa"),
                        format!("{rope_base_swa} is not a positive number"),
                    ));
                }
            }
            if let Some(cap) = gguf_meta::opt_f32(md, &key("final_logit_softcapping"))?
                && cap != 0.0
            {
                return Err(bad(
                    &key("final_logit_softcapping"),
                    format!("logit soft-capping ({cap}) is not supported"),
                ));
            }
        }
        let attn_scale = match (kind, n_layers) {
            // gemma_pytorch's query_pre_attn_scalar for the 27B model, as llama.cpp picks it.
            (Architecture::Gemma3, 62) => 1.0 / ((dim / n_heads) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        let embd = file
            .tensor_dims(TOKEN_EMBD)
            .ok_or_else(|| EngineError::MissingTensor {
                name: TOKEN_EMBD.to_owned(),
            })?;
        let vocab_size = match embd {
            &[v, d] if d == dim && (1..=MAX_VOCAB).contains(&v) => v,
            found => {
                return Err(EngineError::TensorShape {
                    name: TOKEN_EMBD.to_owned(),
                    expected: vec![
                        gguf_meta::opt_count(md, &key("vocab_size"), MAX_VOCAB)?.unwrap_or(0),
                        dim,
                    ],
                    found: found.to_vec(),
                });
            }
        };
        Ok(ModelConfig {
            arch: kind,
            n_layers,
            dim,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_base,
            rope_base_swa,
            sliding_window,
            swa_layers,
            attn_scale,
            rms_eps,
            context_length,
            vocab_size,
        })
    }

    /// The sliding window of layer `layer`, if it has one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match self.swa_layers.get(layer) {
            Some(true) => self.sliding_window,
            _ => None,
        }
    }

    /// The shape of a KV cache for this model.
    pub fn kv_shape(&self) -> KvShape {
        let window = self.sliding_window.map(|size| SlidingWindow {
            size,
            layers: (0..self.n_layers)
                .filter(|&l| self.layer_window(l).is_some())
                .fold(0u128, |m, l| m | 1 << l),
        });
        KvShape {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            window,
        }
    }
}

pub(super) fn bad(key: &str, reason: String) -> EngineError {
    MetadataError::invalid(key, reason).into()
}

/// Tensor names the loader and the configuration read.
pub(super) const TOKEN_EMBD: &str = "token_embd.weight";
pub(super) const OUTPUT: &str = "output.weight";
pub(super) const OUTPUT_NORM: &str = "output_norm.weight";
pub(super) const OUTPUT_BIAS: &str = "output.bias";
pub(super) const ROPE_FREQS: &str = "rope_freqs.weight";
