//! Loading a model: the GGUF header and tensors read through `GgufFile`, every tensor's
//! shape checked against the configuration, the weights hashed, quantized weights kept
//! quantized (F32, F16 and BF16 ones read as f32).
//! The tensors are llama's, for Gemma 3 four more norms per layer, and those llama.cpp takes
//! when present: q/k/v biases (Qwen2 has them), Llama 3's RoPE frequency factors, Qwen2's LM
//! head bias. A bias or RoPE tensor that the architecture does not take is an error rather
//! than ignored: it would change the logits.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::config::Architecture;
use super::config::{OUTPUT, OUTPUT_BIAS, OUTPUT_NORM, ROPE_FREQS, TOKEN_EMBD};
use super::{GemmaNorms, Layer, Model, ModelConfig};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kernels::quant::{QKind, QMatrix};
use crate::kernels::{Isa, RopeTable, Weight};

/// How a loaded model holds its quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WeightForm {
    /// As the file stores them: the kernels multiply the blocks.
    Quantized,
    /// Every weight dequantized to f32 by candle at load: the reference the quantized kernels
    /// are tested against.
    #[cfg(test)]
    F32,
}

impl Model {
    /// Loads a GGUF model file.
    pub fn load(path: &Path) -> Result<Model> {
        Self::from_file(&mut GgufFile::open(path)?)
    }

    /// Builds the model from an open GGUF file (whose metadata also holds the tokenizer and
    /// chat template, so the file is parsed once).
    pub(crate) fn from_file(file: &mut GgufFile) -> Result<Model> {
        Self::from_file_as(file, WeightForm::Quantized)
    }

    /// [`Model::from_file`], holding the weights in `form`.
    pub(crate) fn from_file_as(file: &mut GgufFile, form: WeightForm) -> Result<Model> {
        let config = ModelConfig::from_gguf(file)?;
        let expected = expected_shapes(&config, |name| file.tensor_dims(name).is_some());
        for (name, shape) in &expected {
            let dims = file
                .tensor_dims(name)
                .ok_or_else(|| EngineError::MissingTensor { name: name.clone() })?;
            if dims != shape.as_slice() {
                return Err(EngineError::TensorShape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: dims.to_vec(),
                });
            }
        }

        // Read every tensor once, in name order: hash its raw bytes, keep the ones we use.
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        let mut values: HashMap<String, Tensor> = HashMap::new();
        let mut file_tensor_bytes = 0;
        for name in file.tensor_names() {
            let dims = file.tensor_dims(&name).unwrap_or_default().to_vec();
            if !expected.contains_key(&name) {
                if changes_the_output(&name) {
                    return Err(EngineError::UnsupportedTensor {
                        name,
                        arch: config.arch.name(),
                    });
                }
                if !shape_is_sane(&dims) {
                    return Err(EngineError::TensorShape {
                        name,
                        expected: vec![],
                        found: dims,
                    });
                }
            }
            let tensor = file.tensor(&name)?;
            let data = tensor.raw()?;
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(tensor.dtype_name().as_bytes());
            hasher.update(&(dims.len() as u64).to_le_bytes());
            for d in &dims {
                hasher.update(&(*d as u64).to_le_bytes());
            }
            hasher.update(&(data.len() as u64).to_le_bytes());
            hasher.update(&data);
            let Some(shape) = expected.get(&name) else {
                continue;
            };
            file_tensor_bytes += data.len();
            // Quantized weights stay quantized (their rows whole blocks, as GGUF requires);
            // F32, F16 and BF16 ones are read as f32.
            let quantized = match tensor.quant_kind()? {
                Some(kind) => Some(quantized(&name, kind, shape, &data)?),
                None => None,
            };
            drop(data);
            let value = match (quantized, form) {
                (Some(q), WeightForm::Quantized) => Tensor::Quant(q),
                _ => Tensor::F32(tensor.to_f32()?),
            };
            values.insert(name, value);
        }
        let weights_hash = format!("{:032x}", hasher.digest128());

        let c = &config;
        let (q_rows, kv_rows) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let mut w =
            |name: &str, rows: usize, cols: usize| take_weight(&mut values, name, rows, cols);
        let token_embd = w(TOKEN_EMBD, c.vocab_size, c.dim)?;
        let output = match expected.contains_key(OUTPUT) {
            true => Some(w(OUTPUT, c.vocab_size, c.dim)?),
            false => None,
        };
        let output_bias = match expected.contains_key(OUTPUT_BIAS) {
            true => Some(w(OUTPUT_BIAS, 1, c.vocab_size)?.into_f32()),
            false => None,
        };
        let output_norm = w(OUTPUT_NORM, 1, c.dim)?.into_f32();
        let rope_freq_factors = match expected.contains_key(ROPE_FREQS) {
            true => Some(rope_factors(w(ROPE_FREQS, 1, c.rope_dim / 2)?.into_f32())?),
            false => None,
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |t: &str| format!("blk.{i}.{t}.weight");
            let b = |t: &str| format!("blk.{i}.{t}.bias");
            let stack = |name: &str, parts| {
                Weight::concat_rows(parts).ok_or_else(|| EngineError::TensorShape {
                    name: name.to_owned(),
                    expected: vec![],
                    found: vec![],
                })
            };
            let qkv = vec![
                w(&n("attn_q"), q_rows, c.dim)?,
                w(&n("attn_k"), kv_rows, c.dim)?,
                w(&n("attn_v"), kv_rows, c.dim)?,
            ];
            let gate_up = vec![
                w(&n("ffn_gate"), c.ffn_dim, c.dim)?,
                w(&n("ffn_up"), c.ffn_dim, c.dim)?,
            ];
            // llama.cpp adds each projection's bias when the file has it (`build_qkv`), for
            // every architecture here; stacked, a missing one is zeros.
            let qkv_bias = match ["attn_q", "attn_k", "attn_v"]
                .iter()
                .any(|t| expected.contains_key(&b(t)))
            {
                true => {
                    let mut stacked = Vec::with_capacity(q_rows + 2 * kv_rows);
                    for (t, rows) in [("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)]
                    {
                        match expected.contains_key(&b(t)) {
                            true => stacked.extend(w(&b(t), 1, rows)?.into_f32()),
                            false => stacked.resize(stacked.len() + rows, 0.0),
                        }
                    }
                    Some(stacked)
                }
                false => None,
            };
            let gemma = match c.arch {
                Architecture::Llama | Architecture::Qwen2 => None,
                Architecture::Gemma3 => Some(GemmaNorms {
                    q_norm: w(&n("attn_q_norm"), 1, c.head_dim)?.into_f32(),
                    k_norm: w(&n("attn_k_norm"), 1, c.head_dim)?.into_f32(),
                    post_attn_norm: w(&n("post_attention_norm"), 1, c.dim)?.into_f32(),
                    post_ffn_norm: w(&n("post_ffw_norm"), 1, c.dim)?.into_f32(),
                }),
            };
            layers.push(Layer {
                attn_norm: w(&n("attn_norm"), 1, c.dim)?.into_f32(),
                qkv: stack(&n("attn_q"), qkv)?,
                qkv_bias,
                attn_output: w(&n("attn_output"), c.dim, q_rows)?,
                ffn_norm: w(&n("ffn_norm"), 1, c.dim)?.into_f32(),
                gate_up: stack(&n("ffn_gate"), gate_up)?,
                ffn_down: w(&n("ffn_down"), c.dim, c.ffn_dim)?,
                gemma,
                window: c.layer_window(i),
            });
        }
        let rope_inv_freq = RopeTable::inv_freq(
            config.rope_base,
            config.rope_dim,
            rope_freq_factors.as_deref(),
        );
        // Only llama takes the factors, and it has no sliding-window layers.
        let rope_inv_freq_swa = RopeTable::inv_freq(config.rope_base_swa, config.rope_dim, None);
        Ok(Model {
            config,
            weights_hash,
            token_embd,
            output,
            output_bias,
            output_norm,
            layers,
            rope_freq_factors,
            rope_inv_freq,
            rope_inv_freq_swa,
            isa: Isa::from_env()?,
            file_tensor_bytes,
        })
    }
}

/// Every tensor the model uses, with its shape as candle reports it (`[rows, cols]`,
/// the reverse of GGUF's dimension order): the required ones, and the optional ones the
/// architecture takes that `has` says the file holds.
fn expected_shapes(c: &ModelConfig, has: impl Fn(&str) -> bool) -> BTreeMap<String, Vec<usize>> {
    let (q_rows, kv_rows) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let mut m = BTreeMap::new();
    let optional = |m: &mut BTreeMap<String, Vec<usize>>, name: String, shape: Vec<usize>| {
        if has(&name) {
            m.insert(name, shape);
        }
    };
    m.insert(TOKEN_EMBD.to_owned(), vec![c.vocab_size, c.dim]);
    m.insert(OUTPUT_NORM.to_owned(), vec![c.dim]);
    optional(&mut m, OUTPUT.to_owned(), vec![c.vocab_size, c.dim]);
    if c.arch == Architecture::Qwen2 {
        optional(&mut m, OUTPUT_BIAS.to_owned(), vec![c.vocab_size]);
    }
    if c.arch == Architecture::Llama {
        // One factor per rotated pair, shared by every layer (llama.cpp: `{n_rot / 2}`).
        optional(&mut m, ROPE_FREQS.to_owned(), vec![c.rope_dim / 2]);
    }
    for i in 0..c.n_layers {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        let b = |t: &str| format!("blk.{i}.{t}.bias");
        optional(&mut m, b("attn_q"), vec![q_rows]);
        optional(&mut m, b("attn_k"), vec![kv_rows]);
        optional(&mut m, b("attn_v"), vec![kv_rows]);
        m.insert(n("attn_norm"), vec![c.dim]);
        m.insert(n("ffn_norm"), vec![c.dim]);
        m.insert(n("attn_q"), vec![q_rows, c.dim]);
        m.insert(n("attn_k"), vec![kv_rows, c.dim]);
        m.insert(n("attn_v"), vec![kv_rows, c.dim]);
        m.insert(n("attn_output"), vec![c.dim, q_rows]);
        m.insert(n("ffn_gate"), vec![c.ffn_dim, c.dim]);
        m.insert(n("ffn_up"), vec![c.ffn_dim, c.dim]);
        m.insert(n("ffn_down"), vec![c.dim, c.ffn_dim]);
        if c.arch == Architecture::Gemma3 {
            m.insert(n("attn_q_norm"), vec![c.head_dim]);
            m.insert(n("attn_k_norm"), vec![c.head_dim]);
            m.insert(n("post_attention_norm"), vec![c.dim]);
            m.insert(n("post_ffw_norm"), vec![c.dim]);
        }
    }
    m
}

/// Whether a tensor the model does not use would change its output in llama.cpp: a bias
/// (of the LM head, or of the attention output or MLP projections, which llama.cpp's llama
/// graph adds and this engine does not) or RoPE frequency factors (Llama 3's, on another
/// architecture; LongRoPE's). Other unused tensors (none in the files we know) are ignored.
fn changes_the_output(name: &str) -> bool {
    name.ends_with(".bias") || name.starts_with("rope_")
}

/// Llama 3's RoPE frequency factors, checked: each divides a frequency, so it must be a
/// positive finite number (a hostile zero would make every angle infinite).
fn rope_factors(factors: Vec<f32>) -> Result<Vec<f32>> {
    match factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
        Some(bad) => Err(EngineError::InvalidTensor {
            name: ROPE_FREQS.to_owned(),
            reason: format!("frequency factor {bad} is not a positive number"),
        }),
        None => Ok(factors),
    }
}

/// Whether an unused tensor's element count can be computed without overflow (it is read to
/// be hashed).
fn shape_is_sane(dims: &[usize]) -> bool {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_some_and(|n| n <= 1 << 40)
}

/// The blocks of tensor `name` (of `shape`: `[rows, cols]`, or `[cols]` for one row) as a
/// matrix; an error if its rows are not whole blocks (which `GgufFile::tensor` already
/// refuses: this keeps the matrix from depending on it).
fn quantized(name: &str, kind: QKind, shape: &[usize], data: &[u8]) -> Result<QMatrix> {
    let (rows, cols) = match *shape {
        [rows, cols] => (rows, cols),
        [cols] => (1, cols),
        _ => (1, shape.iter().product()),
    };
    if !cols.is_multiple_of(kind.block_values()) {
        return Err(EngineError::PartialBlocks {
            name: name.to_owned(),
            dtype: kind.name().to_owned(),
            cols,
            block: kind.block_values(),
        });
    }
    // The reader sized the data from the shape, so this only fails on a reader's bug.
    QMatrix::from_gguf_blocks(kind, rows, cols, data).ok_or_else(|| EngineError::TensorShape {
        name: name.to_owned(),
        expected: shape.to_vec(),
        found: vec![data.len() / kind.block_bytes() * kind.block_values()],
    })
}

/// A tensor's values as loaded: quantized blocks kept as they are, or f32.
enum Tensor {
    Quant(QMatrix),
    F32(Vec<f32>),
}

/// Removes a tensor from `values` as a `[rows, cols]` weight.
fn take_weight(
    values: &mut HashMap<String, Tensor>,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Weight> {
    let data = match values.remove(name) {
        None => {
            return Err(EngineError::MissingTensor {
                name: name.to_owned(),
            });
        }
        Some(Tensor::Quant(q)) if q.rows() == rows && q.cols() == cols => {
            return Ok(Weight::from_quant(q));
        }
        Some(Tensor::Quant(q)) => q.to_f32(),
        Some(Tensor::F32(v)) => v,
    };
    let found = vec![data.len()];
    Weight::from_f32(rows, cols, data).ok_or_else(|| EngineError::TensorShape {
        name: name.to_owned(),
        expected: vec![rows, cols],
        found,
    })
}
