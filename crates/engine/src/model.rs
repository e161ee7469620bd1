//! A llama-architecture model loaded from a GGUF file, and its forward pass over our own
//! [`KvCache`].
//!
//! Q4_1 and Q8_0 weights stay quantized in memory (other types are dequantized to f32 at load
//! time) and are multiplied with the batch-invariant kernels of [`crate::kernels`] and
//! `kernels::quant`, so a token's K/V and logits are bitwise the same whether it was
//! prefilled in a batch of any size or decoded alone, and whatever the cache's capacity.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Content;
use kv_extract::{KvCache, KvShape};

use crate::error::{EngineError, Result};
use crate::gguf_meta::{self, MetadataError};
use crate::kernels::quant::{QKind, QMatrix};
use crate::kernels::{self, Isa, RopeTable, Weight};

/// Upper bounds on metadata values, so a hostile file cannot make shape arithmetic overflow
/// or ask for absurd allocations before any tensor byte is checked.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 4096;
const MAX_VOCAB: usize = 1 << 24;
const MAX_CONTEXT: usize = 1 << 24;

/// The hyper-parameters of a llama-architecture model, from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
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
    /// RoPE base frequency (`{arch}.rope.freq_base`, default 10000).
    pub rope_base: f32,
    /// RMSNorm epsilon (`{arch}.attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// Longest sequence the model was trained for (`{arch}.context_length`).
    pub context_length: usize,
    /// Vocabulary size (rows of `token_embd.weight`).
    pub vocab_size: usize,
}

impl LlamaConfig {
    /// Reads and validates the configuration from GGUF metadata. The vocabulary size is taken
    /// from the `token_embd.weight` tensor's shape.
    pub fn from_gguf(content: &Content) -> Result<LlamaConfig> {
        let md = &content.metadata;
        let arch = gguf_meta::string(md, "general.architecture")?;
        if arch != "llama" {
            return Err(EngineError::UnsupportedArchitecture {
                name: arch.to_owned(),
            });
        }
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
        let embd =
            content
                .tensor_infos
                .get(TOKEN_EMBD)
                .ok_or_else(|| EngineError::MissingTensor {
                    name: TOKEN_EMBD.to_owned(),
                })?;
        let vocab_size = match embd.shape.dims() {
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
        Ok(LlamaConfig {
            n_layers,
            dim,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_base,
            rms_eps,
            context_length,
            vocab_size,
        })
    }

    /// The shape of a KV cache for this model.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

fn bad(key: &str, reason: String) -> EngineError {
    MetadataError::invalid(key, reason).into()
}

const TOKEN_EMBD: &str = "token_embd.weight";
const OUTPUT: &str = "output.weight";
const OUTPUT_NORM: &str = "output_norm.weight";

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
    /// Loads a GGUF model file.
    pub fn load(path: &Path) -> Result<Model> {
        Self::load_with_content(path).map(|(model, _)| model)
    }

    /// Loads a GGUF model file and also returns its parsed header (metadata such as the
    /// tokenizer and chat template), so the file is parsed once.
    pub fn load_with_content(path: &Path) -> Result<(Model, Content)> {
        let file = File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => EngineError::ModelNotFound {
                path: path.to_owned(),
            },
            _ => EngineError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|source| EngineError::Gguf {
            path: path.to_owned(),
            source,
        })?;
        let model = Self::from_content(&content, &mut reader)?;
        Ok((model, content))
    }

    /// Builds the model from a parsed header and the reader it came from.
    fn from_content<R: Read + Seek>(content: &Content, reader: &mut R) -> Result<Model> {
        let config = LlamaConfig::from_gguf(content)?;
        let expected = expected_shapes(&config, content.tensor_infos.contains_key(OUTPUT));
        for (name, shape) in &expected {
            let info = content
                .tensor_infos
                .get(name)
                .ok_or_else(|| EngineError::MissingTensor { name: name.clone() })?;
            if info.shape.dims() != shape.as_slice() {
                return Err(EngineError::TensorShape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: info.shape.dims().to_vec(),
                });
            }
        }

        // Read every tensor once, in name order: hash its raw bytes, keep the ones we use.
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        let mut values: HashMap<String, Tensor> = HashMap::new();
        for name in names {
            let tensor_err = |source| EngineError::TensorData {
                name: name.clone(),
                source,
            };
            let info = &content.tensor_infos[name];
            if !expected.contains_key(name) && !shape_is_sane(info.shape.dims()) {
                return Err(EngineError::TensorShape {
                    name: name.clone(),
                    expected: vec![],
                    found: info.shape.dims().to_vec(),
                });
            }
            let qt = content
                .tensor(reader, name, &Device::Cpu)
                .map_err(tensor_err)?;
            let data = qt.data().map_err(tensor_err)?;
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(format!("{:?}", qt.dtype()).as_bytes());
            hasher.update(&(info.shape.dims().len() as u64).to_le_bytes());
            for d in info.shape.dims() {
                hasher.update(&(*d as u64).to_le_bytes());
            }
            hasher.update(&(data.len() as u64).to_le_bytes());
            hasher.update(&data);
            let Some(shape) = expected.get(name) else {
                continue;
            };
            // Projections and embeddings in Q4_1 / Q8_0 stay quantized; anything else is
            // dequantized to f32.
            let kind = match qt.dtype() {
                GgmlDType::Q4_1 => Some(QKind::Q4_1),
                GgmlDType::Q8_0 => Some(QKind::Q8_0),
                _ => None,
            };
            let quantized = match (kind, shape.as_slice()) {
                (Some(kind), &[rows, cols]) => {
                    QMatrix::from_gguf_blocks(kind, rows, cols, &data).map(Tensor::Quant)
                }
                _ => None,
            };
            drop(data);
            let tensor = match quantized {
                Some(q) => q,
                None => Tensor::F32(
                    qt.dequantize(&Device::Cpu)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(tensor_err)?,
                ),
            };
            values.insert(name.clone(), tensor);
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
        let output_norm = w(OUTPUT_NORM, 1, c.dim)?.into_f32();
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |t: &str| format!("blk.{i}.{t}.weight");
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
            layers.push(Layer {
                attn_norm: w(&n("attn_norm"), 1, c.dim)?.into_f32(),
                qkv: stack(&n("attn_q"), qkv)?,
                attn_output: w(&n("attn_output"), c.dim, q_rows)?,
                ffn_norm: w(&n("ffn_norm"), 1, c.dim)?.into_f32(),
                gate_up: stack(&n("ffn_gate"), gate_up)?,
                ffn_down: w(&n("ffn_down"), c.dim, c.ffn_dim)?,
            });
        }
        let rope_inv_freq = RopeTable::inv_freq(config.rope_base, config.rope_dim);
        Ok(Model {
            config,
            weights_hash,
            token_embd,
            output,
            output_norm,
            layers,
            rope_inv_freq,
            isa: Isa::from_env()?,
        })
    }

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

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.kv_shape())
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

    /// Runs `tokens` at positions `cache.len()..`, appends their K/V (and ids) to `cache`, and
    /// returns the logits asked for.
    ///
    /// One call can prefill many tokens or decode one; the results for a token are bitwise the
    /// same either way. On error the cache is left unchanged.
    ///
    /// A long prompt runs in chunks of [`PREFILL_CHUNK`] tokens, so the activations a pass
    /// allocates stay the same size however long the prompt is.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, want: Logits) -> Result<Vec<f32>> {
        self.forward_chunked(tokens, cache, want, PREFILL_CHUNK)
    }

    fn forward_chunked(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        want: Logits,
        chunk: usize,
    ) -> Result<Vec<f32>> {
        self.check_input(tokens, cache)?;
        let (start, n) = (cache.len(), tokens.len());
        let c = &self.config;
        if cache.capacity() < start + n {
            let room = (n + GROWTH_HEADROOM).min(c.context_length - start);
            cache.reserve(room);
        }
        let mut logits = Vec::new();
        let mut parts = tokens.chunks(chunk.max(1)).peekable();
        while let Some(part) = parts.next() {
            let last = parts.peek().is_none();
            let part_want = match want {
                Logits::All => Logits::All,
                Logits::Last if last => Logits::Last,
                _ => Logits::None,
            };
            // The whole pass runs on a rayon worker: a decode step has about 200 parallel
            // regions, and from a thread outside the pool each one is a hand-off to the pool
            // and back (two wake-ups). From a worker, the other worker often is still spinning
            // when the next region starts. Measured: decode about 10% faster at 512 tokens.
            logits.extend(rayon::scope(|_| {
                self.forward_on_worker(part, cache, part_want)
            }));
        }
        Ok(logits)
    }

    /// Checks what [`Model::forward`] is given, before anything is computed (so that on error
    /// the cache is left unchanged).
    fn check_input(&self, tokens: &[u32], cache: &KvCache) -> Result<()> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::TokenOutOfVocab {
                token,
                vocab: c.vocab_size,
            });
        }
        if cache.shape() != self.kv_shape() {
            return Err(EngineError::CacheShapeMismatch {
                expected: self.kv_shape(),
                found: cache.shape(),
            });
        }
        let needed = cache.len() + tokens.len();
        if needed > c.context_length {
            return Err(EngineError::ContextOverflow {
                needed,
                max: c.context_length,
            });
        }
        Ok(())
    }

    /// One pass over `tokens` (checked, and with room in the cache).
    fn forward_on_worker(&self, tokens: &[u32], cache: &mut KvCache, want: Logits) -> Vec<f32> {
        let c = &self.config;
        let (start, n) = (cache.len(), tokens.len());
        let (dim, hd) = (c.dim, c.head_dim);
        let (q_w, kv_w) = (c.n_heads * hd, c.n_kv_heads * hd);
        let rope = RopeTable::new(&self.rope_inv_freq, start, n);
        let isa = self.isa;

        let mut x = vec![0.0f32; n * dim];
        for (row, &t) in x.chunks_exact_mut(dim).zip(tokens) {
            self.token_embd.row_into(t as usize, row);
        }
        let mut h = vec![0.0f32; n * dim];
        for (li, layer) in self.layers.iter().enumerate() {
            kernels::rms_norm(isa, &x, &layer.attn_norm, c.rms_eps, &mut h);
            let qkv = kernels::matmul(isa, &h, n, &layer.qkv);
            let mut q = Vec::with_capacity(n * q_w);
            let mut k = Vec::with_capacity(n * kv_w);
            let mut v = Vec::with_capacity(n * kv_w);
            for row in qkv.chunks_exact(q_w + 2 * kv_w) {
                q.extend_from_slice(&row[..q_w]);
                k.extend_from_slice(&row[q_w..q_w + kv_w]);
                v.extend_from_slice(&row[q_w + kv_w..]);
            }
            rope.apply(&mut q, c.n_heads, hd);
            rope.apply(&mut k, c.n_kv_heads, hd);
            cache.write_rows(li, start, &k, &v);
            let attn = kernels::attention(isa, &q, n, start, c.n_heads, cache, li);
            let o = kernels::matmul(isa, &attn, n, &layer.attn_output);
            kernels::add_in_place(&mut x, &o);

            kernels::rms_norm(isa, &x, &layer.ffn_norm, c.rms_eps, &mut h);
            let gate_up = kernels::matmul(isa, &h, n, &layer.gate_up);
            let act = kernels::silu_mul_rows(&gate_up, c.ffn_dim);
            let down = kernels::matmul(isa, &act, n, &layer.ffn_down);
            kernels::add_in_place(&mut x, &down);
        }
        cache.push_tokens(tokens);

        let rows = match want {
            Logits::None => return Vec::new(),
            Logits::Last => &x[(n - 1) * dim..],
            Logits::All => &x[..],
        };
        let m = rows.len() / dim;
        let mut normed = vec![0.0f32; rows.len()];
        kernels::rms_norm(self.isa, rows, &self.output_norm, c.rms_eps, &mut normed);
        let head = self.output.as_ref().unwrap_or(&self.token_embd);
        kernels::matmul(self.isa, &normed, m, head)
    }
}

/// Most tokens one forward pass computes at once; a longer prompt runs in chunks of this
/// size, so the activations a pass allocates are bounded by it: for SmolLM2-135M, about 18 MB
/// (one layer's buffers) at 512 tokens, against 115 MB for a 3,200-token prompt in one pass.
/// llama.cpp's physical batch (`n_ubatch`) defaults to the same 512.
pub const PREFILL_CHUNK: usize = 512;

/// Spare room, in tokens, given to a cache that a forward pass has to grow anyway: a prompt is
/// followed by a reply, and without it the reply's first token would copy the whole cache
/// into a buffer twice the size (about 50 ms at 2048 tokens, on fresh memory).
const GROWTH_HEADROOM: usize = 256;

/// Every tensor the model uses, with its shape as candle reports it (`[rows, cols]`,
/// the reverse of GGUF's dimension order).
fn expected_shapes(c: &LlamaConfig, has_output: bool) -> BTreeMap<String, Vec<usize>> {
    let (q_rows, kv_rows) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let mut m = BTreeMap::new();
    m.insert(TOKEN_EMBD.to_owned(), vec![c.vocab_size, c.dim]);
    m.insert(OUTPUT_NORM.to_owned(), vec![c.dim]);
    if has_output {
        m.insert(OUTPUT.to_owned(), vec![c.vocab_size, c.dim]);
    }
    for i in 0..c.n_layers {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        m.insert(n("attn_norm"), vec![c.dim]);
        m.insert(n("ffn_norm"), vec![c.dim]);
        m.insert(n("attn_q"), vec![q_rows, c.dim]);
        m.insert(n("attn_k"), vec![kv_rows, c.dim]);
        m.insert(n("attn_v"), vec![kv_rows, c.dim]);
        m.insert(n("attn_output"), vec![c.dim, q_rows]);
        m.insert(n("ffn_gate"), vec![c.ffn_dim, c.dim]);
        m.insert(n("ffn_up"), vec![c.ffn_dim, c.dim]);
        m.insert(n("ffn_down"), vec![c.dim, c.ffn_dim]);
    }
    m
}

/// Whether an unused tensor's element count can be computed without overflow (it is read to
/// be hashed).
fn shape_is_sane(dims: &[usize]) -> bool {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_some_and(|n| n <= 1 << 40)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TinyConfig, write_tiny_llama_gguf};
    use std::path::PathBuf;

    /// Writes a tiny model to a fresh temp dir.
    fn write_tiny(cfg: &TinyConfig, seed: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama_gguf(&path, cfg, seed).expect("write tiny gguf");
        (dir, path)
    }

    fn tiny_model(cfg: &TinyConfig) -> Model {
        let (_dir, path) = write_tiny(cfg, 7);
        Model::load(&path).expect("load tiny model")
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The byte-level tokens of "a".."z" in the tiny vocabulary (bytes start at id 3).
    fn letters() -> Vec<u32> {
        (b'a'..=b'z').map(|b| 3 + b as u32).collect()
    }

    /// Every cached K and V value, layer by layer, head by head.
    fn cache_bits(cache: &KvCache) -> Vec<u32> {
        let s = cache.shape();
        let mut out = Vec::new();
        for l in 0..s.n_layers {
            for h in 0..s.n_kv_heads {
                out.extend(bits(cache.k_head(l, h, 0..cache.len())));
                out.extend(bits(cache.v_head(l, h, 0..cache.len())));
            }
        }
        out
    }

    #[test]
    fn tiny_config_is_read_from_metadata() {
        let m = tiny_model(&TinyConfig::default());
        let c = m.config();
        assert_eq!(
            (
                c.n_layers,
                c.dim,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.ffn_dim
            ),
            (2, 32, 4, 2, 8, 64)
        );
        assert_eq!((c.rope_dim, c.context_length, c.vocab_size), (8, 512, 268));
        assert_eq!(
            m.kv_shape(),
            KvShape {
                n_layers: 2,
                n_kv_heads: 2,
                head_dim: 8
            }
        );
        assert_eq!(m.weights_hash().len(), 32);
    }

    #[test]
    fn a_forward_pass_is_the_same_bits_at_every_instruction_set_level() {
        // 64-wide heads in groups of six queries (SmolLM2's width, and the AVX-512 V-sum
        // kernel's group) with quantized and f32 weights; 40 tokens make prefill tiles, then
        // decode steps.
        let configs = [
            TinyConfig::default(),
            TinyConfig {
                dim: 384,
                n_heads: 6,
                n_kv_heads: 1,
                ffn_dim: 128,
                ..TinyConfig::default()
            },
            TinyConfig {
                weight_dtype: GgmlDType::F32,
                ..TinyConfig::default()
            },
        ];
        let toks: Vec<u32> = letters().into_iter().cycle().take(40).collect();
        for cfg in configs {
            let mut m = tiny_model(&cfg);
            let run = |m: &Model| {
                let mut cache = m.new_cache();
                let mut logits = m.forward(&toks, &mut cache, Logits::All).expect("prefill");
                for &t in &toks[..3] {
                    logits.extend(m.forward(&[t], &mut cache, Logits::Last).expect("decode"));
                }
                (bits(&logits), cache_bits(&cache))
            };
            m.set_isa(Isa::PORTABLE);
            let portable = run(&m);
            crate::kernels::isa::for_each_isa(|isa| {
                m.set_isa(isa);
                assert!(run(&m) == portable, "{isa:?}, {} heads", cfg.n_heads);
            });
        }
    }

    #[test]
    fn prefill_split_prefill_and_decode_are_bitwise_equal() {
        let m = tiny_model(&TinyConfig::default());
        let toks = letters();
        let mut whole = m.new_cache();
        let all = m.forward(&toks, &mut whole, Logits::All).expect("prefill");
        assert_eq!(all.len(), toks.len() * 268);
        assert!(all.iter().all(|x| x.is_finite()));

        let mut split = m.new_cache();
        let mut split_logits = m
            .forward(&toks[..5], &mut split, Logits::All)
            .expect("first part");
        split_logits.extend(
            m.forward(&toks[5..], &mut split, Logits::All)
                .expect("second part"),
        );
        assert_eq!(bits(&all), bits(&split_logits));

        let mut decode = m.new_cache();
        let mut decode_logits = Vec::new();
        for t in &toks {
            decode_logits.extend(m.forward(&[*t], &mut decode, Logits::Last).expect("decode"));
        }
        assert_eq!(bits(&all), bits(&decode_logits));

        assert_eq!(whole.tokens(), &toks[..]);
        assert_eq!(cache_bits(&whole), cache_bits(&split));
        assert_eq!(cache_bits(&whole), cache_bits(&decode));

        // Logits::Last is the last row of Logits::All; Logits::None returns nothing.
        let mut c = m.new_cache();
        let last = m.forward(&toks, &mut c, Logits::Last).expect("last");
        assert_eq!(bits(&last), bits(&all[(toks.len() - 1) * 268..]));
        let mut c = m.new_cache();
        assert!(
            m.forward(&toks, &mut c, Logits::None)
                .expect("none")
                .is_empty()
        );
        assert_eq!(cache_bits(&c), cache_bits(&whole));
    }

    #[test]
    fn a_prompt_in_chunks_is_bitwise_the_prompt_in_one_pass() {
        let m = tiny_model(&TinyConfig::default());
        let toks = letters();
        for want in [Logits::All, Logits::Last, Logits::None] {
            let mut one = m.new_cache();
            let whole = m
                .forward_chunked(&toks, &mut one, want, usize::MAX)
                .expect("one pass");
            for chunk in [1, 3, 7, 25] {
                let mut parts = m.new_cache();
                let chunked = m
                    .forward_chunked(&toks, &mut parts, want, chunk)
                    .expect("chunks");
                assert_eq!(
                    bits(&chunked),
                    bits(&whole),
                    "{want:?} in chunks of {chunk}"
                );
                assert_eq!(cache_bits(&parts), cache_bits(&one));
                assert_eq!(parts.tokens(), &toks[..]);
            }
        }
        // A prompt that overflows the context is refused before any chunk runs.
        let mut cache = m.new_cache();
        m.forward(&toks[..4], &mut cache, Logits::None)
            .expect("start");
        let long = vec![toks[0]; 600];
        let err = m
            .forward_chunked(&long, &mut cache, Logits::Last, 7)
            .expect_err("past the context");
        assert!(matches!(err, EngineError::ContextOverflow { .. }), "{err}");
        assert_eq!(cache.tokens(), &toks[..4]);
    }

    #[test]
    fn cache_capacity_does_not_change_results() {
        let m = tiny_model(&TinyConfig::default());
        let toks = letters();
        let mut small = m.new_cache();
        let mut big = KvCache::with_capacity(m.kv_shape(), 1000);
        let a = m.forward(&toks, &mut small, Logits::All).expect("small");
        let b = m.forward(&toks, &mut big, Logits::All).expect("big");
        assert_eq!(bits(&a), bits(&b));
        assert_eq!(cache_bits(&small), cache_bits(&big));
        // Growing mid-conversation (64 -> 128 tokens) changes nothing either.
        let more: Vec<u32> = (0..80).map(|i| 3 + (i * 7 % 256) as u32).collect();
        let a = m
            .forward(&more, &mut small, Logits::All)
            .expect("grow small");
        let b = m.forward(&more, &mut big, Logits::All).expect("grow big");
        assert_eq!(bits(&a), bits(&b));
    }

    #[test]
    fn prefix_reuse_matches_prefill_from_scratch() {
        let m = tiny_model(&TinyConfig::default());
        let toks = letters();
        let mut cache = m.new_cache();
        m.forward(&toks, &mut cache, Logits::None).expect("prefill");
        let other: Vec<u32> = [&toks[..10], &[100, 101, 102, 7][..]].concat();
        let keep = cache.common_prefix_len(&other);
        assert_eq!(keep, 10);
        cache.truncate(keep);
        let resumed = m
            .forward(&other[keep..], &mut cache, Logits::All)
            .expect("continue");
        let mut fresh = m.new_cache();
        let scratch = m.forward(&other, &mut fresh, Logits::All).expect("scratch");
        assert_eq!(bits(&resumed), bits(&scratch[keep * 268..]));
        assert_eq!(cache_bits(&cache), cache_bits(&fresh));
    }

    #[test]
    fn separate_output_head_and_f32_weights() {
        let cfg = TinyConfig {
            separate_output: true,
            weight_dtype: candle_core::quantized::GgmlDType::F32,
            ..TinyConfig::default()
        };
        let m = tiny_model(&cfg);
        assert!(m.output.is_some());
        let tied = tiny_model(&TinyConfig::default());
        assert!(tied.output.is_none());
        assert_ne!(m.weights_hash(), tied.weights_hash());
        let mut c = m.new_cache();
        let logits = m
            .forward(&letters(), &mut c, Logits::Last)
            .expect("forward");
        assert_eq!(logits.len(), 268);
    }

    #[test]
    fn weights_hash_is_stable_and_content_dependent() {
        let (_d1, p1) = write_tiny(&TinyConfig::default(), 1);
        let (_d2, p2) = write_tiny(&TinyConfig::default(), 2);
        let a = Model::load(&p1).expect("load");
        let b = Model::load(&p1).expect("load again");
        let c = Model::load(&p2).expect("load other");
        assert_eq!(a.weights_hash(), b.weights_hash());
        assert_ne!(a.weights_hash(), c.weights_hash());
        assert_eq!(a.config(), b.config());
    }

    #[test]
    fn truncated_file_is_an_error() {
        let (_dir, path) = write_tiny(&TinyConfig::default(), 3);
        let bytes = std::fs::read(&path).expect("read");
        for cut in [bytes.len() / 2, bytes.len() - 1, 100, 10, 0] {
            std::fs::write(&path, &bytes[..cut]).expect("truncate");
            let err = Model::load(&path).expect_err("truncated file must not load");
            assert!(
                matches!(
                    err,
                    EngineError::Gguf { .. } | EngineError::TensorData { .. }
                ),
                "cut at {cut}: {err:?}"
            );
        }
        std::fs::write(&path, b"definitely not a gguf file at all").expect("write junk");
        assert!(matches!(Model::load(&path), Err(EngineError::Gguf { .. })));
    }

    #[test]
    fn missing_file_is_model_not_found() {
        let err = Model::load(Path::new("/nonexistent/dir/model.gguf")).expect_err("no file");
        assert!(matches!(err, EngineError::ModelNotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/dir/model.gguf"));
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let (_dir, path) = write_tiny(
            &TinyConfig {
                architecture: "gemma3".into(),
                ..TinyConfig::default()
            },
            1,
        );
        let err = Model::load(&path).expect_err("gemma3 is not supported");
        assert!(
            matches!(&err, EngineError::UnsupportedArchitecture { name } if name == "gemma3"),
            "{err:?}"
        );
        assert!(err.to_string().contains("gemma3"));
    }

    #[test]
    fn missing_tensor_is_named() {
        let cfg = TinyConfig {
            omit_tensor: Some("blk.1.ffn_up.weight".into()),
            ..TinyConfig::default()
        };
        let (_dir, path) = write_tiny(&cfg, 1);
        let err = Model::load(&path).expect_err("tensor missing");
        assert!(
            matches!(&err, EngineError::MissingTensor { name } if name == "blk.1.ffn_up.weight"),
            "{err:?}"
        );
        let cfg = TinyConfig {
            omit_tensor: Some("token_embd.weight".into()),
            ..TinyConfig::default()
        };
        let (_dir, path) = write_tiny(&cfg, 1);
        let err = Model::load(&path).expect_err("embeddings missing");
        assert!(
            matches!(&err, EngineError::MissingTensor { name } if name == "token_embd.weight"),
            "{err:?}"
        );
    }

    #[test]
    fn bad_inputs_are_errors_and_leave_the_cache_alone() {
        let m = tiny_model(&TinyConfig {
            context_length: 30,
            ..TinyConfig::default()
        });
        let mut cache = m.new_cache();
        m.forward(&[5, 6, 7], &mut cache, Logits::None)
            .expect("prefill");
        let err = m
            .forward(&[5, 268], &mut cache, Logits::Last)
            .expect_err("out of vocab");
        assert!(
            matches!(
                err,
                EngineError::TokenOutOfVocab {
                    token: 268,
                    vocab: 268
                }
            ),
            "{err:?}"
        );
        assert!(matches!(
            m.forward(&[], &mut cache, Logits::Last),
            Err(EngineError::EmptyInput)
        ));
        let err = m
            .forward(&[5; 28], &mut cache, Logits::Last)
            .expect_err("past context");
        assert!(
            matches!(
                err,
                EngineError::ContextOverflow {
                    needed: 31,
                    max: 30
                }
            ),
            "{err:?}"
        );
        assert_eq!(cache.tokens(), &[5, 6, 7]);
        let mut wrong = KvCache::new(KvShape {
            n_layers: 3,
            n_kv_heads: 2,
            head_dim: 8,
        });
        let err = m
            .forward(&[5], &mut wrong, Logits::Last)
            .expect_err("wrong shape");
        assert!(
            matches!(err, EngineError::CacheShapeMismatch { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn real_model_answers_capital_of_france() {
        use crate::chat::{ChatTemplate, Message};
        use crate::sample::{Sampler, SamplingConfig};
        use crate::tokenizer::Tokenizer;

        let Some(path) = crate::testing::real_model_path() else {
            return;
        };
        let (model, content) = Model::load_with_content(&path).expect("load real model");
        let c = model.config();
        assert_eq!(
            (
                c.n_layers,
                c.dim,
                c.ffn_dim,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim
            ),
            (30, 576, 1536, 9, 3, 64)
        );
        assert_eq!(
            (c.rope_dim, c.rope_base, c.context_length, c.vocab_size),
            (64, 100000.0, 8192, 49152)
        );
        assert!(
            model.output.is_none(),
            "smollm2 ties its lm head to the embeddings"
        );

        let tokenizer = Tokenizer::from_gguf(&content).expect("tokenizer");
        let template = ChatTemplate::from_gguf(&content).expect("chat template");
        let messages = [
            Message::system("You are a helpful assistant."),
            Message::user("What is the capital of France?"),
        ];
        let prompt = template.render(&messages, true).expect("render");
        let ids = tokenizer.encode(&prompt).expect("encode");

        // Prefill in two uneven parts, then check the last logits against a one-shot prefill.
        let mut cache = model.new_cache();
        model
            .forward(&ids[..7], &mut cache, Logits::None)
            .expect("prefill part 1");
        let mut logits = model
            .forward(&ids[7..], &mut cache, Logits::Last)
            .expect("prefill part 2");
        let mut whole = model.new_cache();
        let once = model
            .forward(&ids, &mut whole, Logits::Last)
            .expect("prefill at once");
        assert_eq!(bits(&logits), bits(&once));

        let mut sampler = Sampler::new(SamplingConfig::greedy()).expect("greedy");
        let stop = tokenizer.stop_ids();
        let mut out = Vec::new();
        for _ in 0..12 {
            let next = sampler.sample(&logits).expect("sample");
            if stop.contains(&next) {
                break;
            }
            out.push(next);
            logits = model
                .forward(&[next], &mut cache, Logits::Last)
                .expect("decode");
        }
        let text = tokenizer.decode(&out).expect("decode ids");
        assert!(
            text.starts_with("The capital of France is Paris."),
            "model said {text:?}"
        );
    }
}
