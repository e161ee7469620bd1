//! Test support, compiled only for tests (the `testing` feature, which the workspace's test
//! crates enable): a tiny random-weight llama, qwen2 or gemma3 GGUF (with a minimal GPT-2 style
//! tokenizer and the ChatML template) that tests anywhere in the workspace can write to a temp
//! dir, the one place tests find the real model, and comparisons of logits.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gguf::GgufFile;
use crate::kernels::quant::{QKind, QMatrix};
use crate::kernels::{Isa, Weight, matmul};
use crate::{Engine, GenerateOptions};

/// The ChatML template SmolLM2 uses (without its default system prompt).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Special tokens, at ids 0, 1, 2 as in SmolLM2.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// BPE merges of the tiny tokenizer, in priority order; each adds one token.
pub const MERGES: [&str; 9] = [
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "e r", "Ġ i", "Ġi s",
];

/// Set to make a missing real model fail the tests that need it (`cargo xtask ci` sets it).
pub const REQUIRE_MODEL_ENV: &str = "AGENTKV_REQUIRE_MODEL";

/// The real model for the tests that need it: the file `cargo xtask fetch-model` installs, at
/// [`crate::default_model_path`] (so `AGENTKV_HOME` moves it). Every test that runs the real
/// model finds it here.
///
/// When the file is absent this panics if [`REQUIRE_MODEL_ENV`] is set, and otherwise warns
/// on the terminal that the calling test did not run and returns `None`, for the test to
/// return early.
pub fn real_model_path() -> Option<PathBuf> {
    fetched_model_path(crate::DEFAULT_MODEL_FILE, "cargo xtask fetch-model")
}

/// Gemma 3 270M for the tests that need a model with sliding-window layers and K-quants,
/// found and missed as [`real_model_path`] finds and misses the default one.
pub fn real_gemma_path() -> Option<PathBuf> {
    fetched_model_path(
        crate::GEMMA3_270M_FILE,
        "cargo xtask fetch-model gemma3-270m",
    )
}

fn fetched_model_path(file_name: &str, fetch: &str) -> Option<PathBuf> {
    let path = crate::model_path(file_name);
    if let Some(path) = path.as_ref().filter(|p| p.exists()) {
        return Some(path.clone());
    }
    let missing = match &path {
        Some(p) => format!("a real model is missing: no file {}", p.display()),
        None => "the real models are missing: neither AGENTKV_HOME nor HOME is set".to_owned(),
    };
    let fix = format!("run `{fetch}` (it honours AGENTKV_HOME)");
    assert!(
        std::env::var_os(REQUIRE_MODEL_ENV).is_none(),
        "{missing}; {fix}, or unset {REQUIRE_MODEL_ENV} to skip the tests that need it"
    );
    // Straight to the terminal: the test harness captures `eprintln!` of passing tests, and
    // a test that did not run must not pass in silence.
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "warning: {test} did not run: {missing}; {fix} \
         (with {REQUIRE_MODEL_ENV}=1, as in `cargo xtask ci`, this is a failure)"
    );
    None
}

/// The real model loaded once per test binary, shared by its tests; `None` (after the
/// warning) where [`real_model_path`] gives none.
pub fn real_engine() -> Option<Arc<Engine>> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    let path = real_model_path()?;
    let engine =
        ENGINE.get_or_init(|| Arc::new(Engine::load(&path).expect("loading the real model")));
    Some(Arc::clone(engine))
}

/// The real model's GGUF header (metadata and tensor index), read once per test binary;
/// `None` (after the warning) where [`real_model_path`] gives none.
pub fn real_model_content() -> Option<&'static GgufFile> {
    static CONTENT: OnceLock<GgufFile> = OnceLock::new();
    let path = real_model_path()?;
    Some(
        CONTENT
            .get_or_init(|| GgufFile::open(&path).expect("reading the real model's gguf header")),
    )
}

/// Gemma 3 270M's GGUF header, read once per test binary; `None` (after the warning) where
/// [`real_gemma_path`] gives none.
pub fn real_gemma_content() -> Option<&'static GgufFile> {
    static CONTENT: OnceLock<GgufFile> = OnceLock::new();
    let path = real_gemma_path()?;
    Some(CONTENT.get_or_init(|| GgufFile::open(&path).expect("reading gemma 3's gguf header")))
}

/// A GGUF header with `metadata` and no tensors, for tokenizer and chat-template tests.
pub fn gguf_content(metadata: HashMap<String, Value>) -> GgufFile {
    GgufFile::from_metadata(metadata)
}

/// Greedy generation of at most `max_tokens` tokens.
pub fn options(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    }
}

/// Whether `a` and `b` hold the same values bit for bit (so `-0.0 != 0.0`, and a NaN equals
/// only the same NaN).
pub fn bitwise_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The largest `|a[i] - b[i]|`, for a message or a bound. Slices of different lengths panic
/// (zipping would compare a prefix and hide the rest), and a NaN on either side gives NaN, so
/// that `max_abs_diff(a, b) <= bound` fails (`f32::max` would drop the NaN and report 0).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "comparing slices of different lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |max, d| if d.is_nan() || d > max { d } else { max })
}

/// xorshift64 states from `seed` spread by `mix`: the generator behind every test's
/// pseudo-random data.
pub fn xorshift(seed: u64, mix: u64) -> impl Iterator<Item = u64> {
    let mut s = seed.wrapping_mul(mix) | 1;
    std::iter::repeat_with(move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    })
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift), for kernel tests.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    xorshift(seed, 0x9E37_79B9_7F4A_7C15)
        .take(n)
        .map(|s| ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        .collect()
}

/// Shape and contents of a tiny model.
#[derive(Clone, Debug)]
pub struct TinyConfig {
    /// `general.architecture`: "llama", or "qwen2" for the same tensors read as Qwen2 (with
    /// biases from `extra_tensors`), or "gemma3" for them and Gemma 3's four norms a layer
    /// (with its metadata: key and value lengths, a global and a sliding-window RoPE base), or
    /// a name the loader must reject.
    pub architecture: String,
    /// Transformer layers.
    pub n_layers: usize,
    /// Residual width (a multiple of 32, the quantization block).
    pub dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// MLP width (a multiple of 32).
    pub ffn_dim: usize,
    /// `{arch}.context_length`.
    pub context_length: usize,
    /// Type of the projection weights.
    pub weight_dtype: GgmlDType,
    /// Type of `token_embd.weight`.
    pub embed_dtype: GgmlDType,
    /// Write a separate `output.weight` instead of tying the LM head to the embeddings (Gemma
    /// 3's files tie it; the loader takes either, for every architecture).
    pub separate_output: bool,
    /// `{arch}.attention.sliding_window`, which only "gemma3" reads: its layers then follow
    /// llama.cpp's pattern, five with the window and a sixth without.
    pub sliding_window: Option<usize>,
    /// A tensor to leave out (to test the missing-tensor error).
    pub omit_tensor: Option<String>,
    /// One-dimensional f32 tensors written as given (biases, `rope_freqs.weight`).
    pub extra_tensors: Vec<(String, Vec<f32>)>,
    /// Write `tokenizer.chat_template` (ChatML); `false` for a base model's file.
    pub chat_template: bool,
}

impl Default for TinyConfig {
    fn default() -> Self {
        TinyConfig {
            architecture: "llama".to_owned(),
            n_layers: 2,
            dim: 32,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 64,
            context_length: 512,
            weight_dtype: GgmlDType::Q4_1,
            embed_dtype: GgmlDType::Q8_0,
            separate_output: false,
            sliding_window: None,
            omit_tensor: None,
            extra_tensors: Vec::new(),
            chat_template: true,
        }
    }
}

/// GPT-2's byte-level alphabet: the printable character standing for each byte value.
pub fn byte_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\u{FFFD}')
        };
    }
    map
}

/// The tiny vocabulary: the three specials, the 256 byte symbols (by byte value), then one
/// token per merge. Returns (tokens, token types).
pub fn tiny_vocab() -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; tokens.len()];
    tokens.extend(byte_to_unicode().iter().map(|c| c.to_string()));
    tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    types.resize(tokens.len(), 1);
    (tokens, types)
}

/// Writes a tiny llama (or qwen2, or gemma3: see [`TinyConfig::architecture`]) GGUF with
/// random weights drawn from `seed` to `path`.
pub fn write_tiny_llama_gguf(path: &Path, cfg: &TinyConfig, seed: u64) -> std::io::Result<()> {
    let (tokens, types) = tiny_vocab();
    let vocab = tokens.len();
    let arch = cfg.architecture.as_str();
    let gemma = arch == "gemma3";
    let head_dim = cfg.dim / cfg.n_heads;
    let u32v = |v: usize| Value::U32(v as u32);

    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String("tiny random llama".into()),
        ),
        (format!("{arch}.block_count"), u32v(cfg.n_layers)),
        (format!("{arch}.context_length"), u32v(cfg.context_length)),
        (format!("{arch}.embedding_length"), u32v(cfg.dim)),
        (format!("{arch}.feed_forward_length"), u32v(cfg.ffn_dim)),
        (format!("{arch}.attention.head_count"), u32v(cfg.n_heads)),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(cfg.n_kv_heads),
        ),
        // Gemma 3's global layers turn with a base of a million (its sliding ones with 10000,
        // below): a forward pass that mixed the two tables up would show.
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(if gemma { 1_000_000.0 } else { 10000.0 }),
        ),
        (format!("{arch}.rope.dimension_count"), u32v(head_dim)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{arch}.vocab_size"), u32v(vocab)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                MERGES
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    if cfg.chat_template {
        meta.push((
            "tokenizer.chat_template".into(),
            Value::String(CHATML_TEMPLATE.into()),
        ));
    }
    meta.push(("general.file_type".into(), Value::U32(3)));
    if gemma {
        meta.extend([
            (format!("{arch}.attention.key_length"), u32v(head_dim)),
            (format!("{arch}.attention.value_length"), u32v(head_dim)),
            (format!("{arch}.rope.freq_base_swa"), Value::F32(10000.0)),
        ]);
    }
    if let Some(window) = cfg.sliding_window {
        meta.push((format!("{arch}.attention.sliding_window"), u32v(window)));
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, dims: &[usize], dtype: GgmlDType, center: f32, spread: f32| {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| center + spread * rng.random_range(-1.0f32..1.0))
            .collect();
        let t = Tensor::from_vec(data, dims, &Device::Cpu)
            .and_then(|t| QTensor::quantize(&t, dtype))
            .map_err(std::io::Error::other)?;
        tensors.push((name, t));
        std::io::Result::Ok(())
    };
    let (d, f, q_rows, kv_rows) = (
        cfg.dim,
        cfg.ffn_dim,
        cfg.n_heads * head_dim,
        cfg.n_kv_heads * head_dim,
    );
    let proj = 1.0 / (d as f32).sqrt();
    add(
        "token_embd.weight".into(),
        &[vocab, d],
        cfg.embed_dtype,
        0.0,
        1.0,
    )?;
    add("output_norm.weight".into(), &[d], GgmlDType::F32, 1.0, 0.1)?;
    if cfg.separate_output {
        add(
            "output.weight".into(),
            &[vocab, d],
            cfg.weight_dtype,
            0.0,
            proj,
        )?;
    }
    for i in 0..cfg.n_layers {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        add(n("attn_norm"), &[d], GgmlDType::F32, 1.0, 0.1)?;
        add(n("ffn_norm"), &[d], GgmlDType::F32, 1.0, 0.1)?;
        add(n("attn_q"), &[q_rows, d], cfg.weight_dtype, 0.0, proj)?;
        add(n("attn_k"), &[kv_rows, d], cfg.weight_dtype, 0.0, proj)?;
        add(n("attn_v"), &[kv_rows, d], cfg.weight_dtype, 0.0, proj)?;
        add(n("attn_output"), &[d, q_rows], cfg.weight_dtype, 0.0, proj)?;
        add(n("ffn_gate"), &[f, d], cfg.weight_dtype, 0.0, proj)?;
        add(n("ffn_up"), &[f, d], cfg.weight_dtype, 0.0, proj)?;
        add(
            n("ffn_down"),
            &[d, f],
            cfg.weight_dtype,
            0.0,
            1.0 / (f as f32).sqrt(),
        )?;
        // Drawn after a layer's llama tensors, so that llama's and qwen2's weights stay the
        // ones they were. Near 1, as the converter stores Gemma's norms (with the 1 added).
        if gemma {
            add(n("attn_q_norm"), &[head_dim], GgmlDType::F32, 1.0, 0.1)?;
            add(n("attn_k_norm"), &[head_dim], GgmlDType::F32, 1.0, 0.1)?;
            add(n("post_attention_norm"), &[d], GgmlDType::F32, 1.0, 0.1)?;
            add(n("post_ffw_norm"), &[d], GgmlDType::F32, 1.0, 0.1)?;
        }
    }
    for (name, data) in &cfg.extra_tensors {
        let t = Tensor::from_vec(data.clone(), data.len(), &Device::Cpu)
            .and_then(|t| QTensor::quantize(&t, GgmlDType::F32))
            .map_err(std::io::Error::other)?;
        tensors.push((name.clone(), t));
    }
    if let Some(omit) = &cfg.omit_tensor {
        tensors.retain(|(name, _)| name != omit);
    }

    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut w = BufWriter::new(File::create(path)?);
    gguf_file::write(&mut w, &meta_refs, &tensor_refs).map_err(std::io::Error::other)?;
    std::io::Write::flush(&mut w)?;
    w.get_ref().sync_all()
}

/// A GGUF model's metadata and its first layers' tensors as f32 (dequantized by candle), to be
/// written again with other types: real weights in every block type without downloading
/// more.
pub struct GgufSource {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Tensor)>,
}

impl GgufSource {
    /// Reads the model at `path`, keeping the tensors outside the blocks and those of blocks
    /// `0..layers`, and setting `{arch}.block_count` to `layers`.
    pub fn read(path: &Path, layers: usize) -> candle_core::Result<GgufSource> {
        let mut reader = std::io::BufReader::new(File::open(path)?);
        let content = gguf_file::Content::read(&mut reader)?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let block_count = format!("{arch}.block_count");
        let mut metadata: Vec<(String, Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| match k == &block_count {
                true => (k.clone(), Value::U32(layers as u32)),
                false => (k.clone(), v.clone()),
            })
            .collect();
        metadata.sort_by(|a, b| a.0.cmp(&b.0));
        let keep = |name: &str| match name.strip_prefix("blk.") {
            None => true,
            Some(rest) => rest
                .split('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i < layers),
        };
        let mut names: Vec<&String> = content.tensor_infos.keys().filter(|n| keep(n)).collect();
        names.sort();
        let mut tensors = Vec::with_capacity(names.len());
        for name in names {
            let t = content.tensor(&mut reader, name, &Device::Cpu)?;
            tensors.push((name.clone(), t.dequantize(&Device::Cpu)?));
        }
        Ok(GgufSource { metadata, tensors })
    }

    /// Writes the model to `path` with each tensor in `dtype(name, dims)` (candle's
    /// quantizers, llama.cpp's reference quantization).
    pub fn write(
        &self,
        path: &Path,
        dtype: impl Fn(&str, &[usize]) -> GgmlDType,
    ) -> candle_core::Result<()> {
        let mut quantized = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            quantized.push((name.as_str(), QTensor::quantize(t, dtype(name, t.dims()))?));
        }
        let meta: Vec<(&str, &Value)> =
            self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, t)| (*k, t)).collect();
        let mut w = BufWriter::new(File::create(path)?);
        gguf_file::write(&mut w, &meta, &tensors)?;
        w.flush()?;
        Ok(())
    }
}

/// A `[rows, cols]` weight in one block type (or f32), from random values quantized by
/// candle (llama.cpp's reference quantizers), for the kernels' benchmarks.
pub struct BenchWeight {
    weight: Weight,
    /// The blocks again, for [`BenchWeight::dequantize_rows`]; `None` for f32.
    blocks: Option<QMatrix>,
    cols: usize,
}

impl BenchWeight {
    /// The type names [`BenchWeight::random`] takes: `F32` and the block types the kernels
    /// hold, in GGML's order.
    pub fn types() -> Vec<&'static str> {
        std::iter::once("F32")
            .chain(QKind::ALL.into_iter().map(QKind::name))
            .collect()
    }

    /// Values uniform in ±1/sqrt(cols) (a projection's scale) as type `dtype` (GGML's name:
    /// `Q4_K`, ...); `None` for a name not in [`BenchWeight::types`] or rows that are not whole
    /// blocks of it.
    pub fn random(dtype: &str, rows: usize, cols: usize, seed: u64) -> Option<BenchWeight> {
        let mut rng = StdRng::seed_from_u64(seed);
        let spread = 1.0 / (cols as f32).sqrt();
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| spread * rng.random_range(-1.0f32..1.0))
            .collect();
        if dtype == "F32" {
            let weight = Weight::from_f32(rows, cols, data)?;
            return Some(BenchWeight {
                weight,
                blocks: None,
                cols,
            });
        }
        let kind = QKind::ALL.into_iter().find(|k| k.name() == dtype)?;
        if !cols.is_multiple_of(kind.block_values()) {
            return None;
        }
        let ggml = crate::gguf::ggml_dtype(kind);
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).ok()?;
        let q = QTensor::quantize(&t, ggml).ok()?;
        let blocks = QMatrix::from_gguf_blocks(kind, rows, cols, &q.data().ok()?)?;
        Some(BenchWeight {
            weight: Weight::from_quant(blocks.clone()),
            blocks: Some(blocks),
            cols,
        })
    }

    /// Bytes of memory the weight takes.
    pub fn bytes(&self) -> usize {
        self.weight.bytes()
    }

    /// `x · Wᵀ` for the `m` rows of `x` at `isa`, as the forward pass computes it.
    pub fn matmul(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        matmul(isa, x, m, &self.weight)
    }

    /// Dequantizes rows `r0..r0 + out.len() / cols` into `out` at `isa`, as the matmul does
    /// into its buffer (f32 weights are copied).
    pub fn dequantize_rows(&self, isa: Isa, r0: usize, out: &mut [f32]) {
        let rows = out.len() / self.cols;
        match &self.blocks {
            Some(q) => crate::kernels::dequant::dequantize_rows(isa, q, r0, rows, out),
            None => {
                for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
                    self.weight.row_into(r0 + r, row);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let m = byte_to_unicode();
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[b'a' as usize], 'a');
        let distinct: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn logit_comparisons_see_every_difference() {
        assert!(bitwise_equal(&[1.0, f32::NAN], &[1.0, f32::NAN]));
        assert!(!bitwise_equal(&[0.0], &[-0.0]));
        assert!(!bitwise_equal(&[1.0], &[1.0, 2.0]));
        assert_eq!(max_abs_diff(&[1.0, -2.0, 3.0], &[1.5, -2.0, 1.0]), 2.0);
        assert!(max_abs_diff(&[f32::NAN, 1.0], &[0.0, 5.0]).is_nan());
        assert!(max_abs_diff(&[1.0, 0.0], &[5.0, f32::NAN]).is_nan());
        let lengths = std::panic::catch_unwind(|| max_abs_diff(&[1.0], &[1.0, 9.0]));
        assert!(
            lengths.is_err(),
            "different lengths must not compare a prefix"
        );
    }

    #[test]
    fn tiny_gguf_round_trips_through_candle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama_gguf(&path, &TinyConfig::default(), 1).expect("write");
        let mut f = File::open(&path).expect("open");
        let content = gguf_file::Content::read(&mut f).expect("parse");
        let (tokens, _) = tiny_vocab();
        assert_eq!(tokens.len(), 3 + 256 + MERGES.len());
        let embd = &content.tensor_infos["token_embd.weight"];
        assert_eq!(embd.shape.dims(), &[tokens.len(), 32]);
        assert_eq!(embd.ggml_dtype, GgmlDType::Q8_0);
    }

    #[test]
    fn tiny_gguf_loads_in_the_tokenizer_and_chat_template() {
        use crate::chat::{ChatTemplate, Message};
        use crate::tokenizer::Tokenizer;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama_gguf(&path, &TinyConfig::default(), 1).expect("write");
        let content = GgufFile::open(&path).expect("parse");
        let tok = Tokenizer::from_gguf(&content).expect("tokenizer");
        assert_eq!(tok.vocab_size(), 3 + 256 + MERGES.len());
        // " the" merges to "Ġthe", the third merge: id 3 + 256 + 2.
        assert_eq!(
            tok.encode("a the").expect("encode"),
            vec![3 + b'a' as u32, 261]
        );
        let text = "<|im_start|>user\nhi there<|im_end|>";
        let ids = tok.encode(text).expect("encode");
        assert_eq!((ids[0], ids[ids.len() - 1]), (1, 2));
        assert_eq!(tok.decode(&ids).expect("decode"), text);

        let template = ChatTemplate::from_gguf(&content).expect("template");
        let prompt = template
            .render(&[Message::user("hi")], true)
            .expect("render");
        assert_eq!(
            prompt,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
