//! The forward pass: a long prompt in chunks of [`PREFILL_CHUNK`] tokens, each layer through
//! the batch-invariant kernels at the model's instruction-set level.

use kv_extract::KvCache;

use super::config::Architecture;
use super::{Logits, Model};
use crate::error::{EngineError, Result};
use crate::kernels::{self, AttentionSpec, MatmulScratch, RopeStyle, RopeTable};

impl Model {
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

    pub(super) fn forward_chunked(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        want: Logits,
        chunk: usize,
    ) -> Result<Vec<f32>> {
        self.check_input(tokens, cache)?;
        let c = &self.config;
        let mut logits = Vec::new();
        let mut left = tokens.len();
        let mut parts = tokens.chunks(chunk.max(1)).peekable();
        while let Some(part) = parts.next() {
            // Room for this part; a cache that has to grow gets room for the rest of the
            // prompt and a reply (its sliding-window layers only for a window more).
            if !cache.has_room(part.len()) {
                let ahead = (left + GROWTH_HEADROOM).min(c.context_length - cache.len());
                cache.reserve_pass(part.len(), ahead);
            }
            left -= part.len();
            let last = parts.peek().is_none();
            let part_want = match want {
                Logits::All => Logits::All,
                Logits::Last if last => Logits::Last,
                _ => Logits::None,
            };
            // The whole pass runs on a rayon worker with the pool's other workers as its team
            // (`team`): a decode step has about 150 parallel regions, and the team's helpers
            // spin between them where rayon's workers would fall asleep and have to be woken.
            logits.extend(kernels::team::with_team(|| {
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
                expected: Box::new(self.kv_shape()),
                found: Box::new(cache.shape()),
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
        let gemma = c.arch == Architecture::Gemma3;
        // As llama.cpp's `llama_model_rope_type`: NORM (adjacent pairs) for llama, NEOX for
        // gemma3 and qwen2.
        let style = match c.arch {
            Architecture::Llama => RopeStyle::Interleaved,
            Architecture::Gemma3 | Architecture::Qwen2 => RopeStyle::NeoX,
        };
        let rope = RopeTable::new(&self.rope_inv_freq, start, n);
        let rope_swa = c
            .sliding_window
            .map(|_| RopeTable::new(&self.rope_inv_freq_swa, start, n));
        let isa = self.isa;

        let mut x = vec![0.0f32; n * dim];
        for (row, &t) in x.chunks_exact_mut(dim).zip(tokens) {
            self.token_embd.row_into(t as usize, row);
        }
        if gemma {
            // Gemma scales the embeddings by sqrt(dim) (llama.cpp: `ggml_scale`, in f32).
            let s = (dim as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= s);
        }
        let mut h = vec![0.0f32; n * dim];
        // Buffers every layer reuses (a new allocation per matmul output faults in its pages
        // every time: about a tenth of a 512-token prefill).
        let mut scratch = MatmulScratch::default();
        let (mut qkv, mut o, mut gate_up, mut act, mut down) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut q = Vec::with_capacity(n * q_w);
        let mut k = Vec::with_capacity(n * kv_w);
        let mut v = Vec::with_capacity(n * kv_w);
        let mut unnormed = Vec::new();
        // Rows still computed: all of them until the last layer, whose outputs only feed the
        // logits. There the rows whose logits are not wanted stop once their K and V are
        // written (llama.cpp's `inp_out_ids`): a turn or a prompt chunk skips most of a layer.
        // Every row's values are its own whatever the batch, so the rows kept are the same
        // bits.
        let mut m = n;
        let last_layer = self.layers.len().saturating_sub(1);
        for (li, layer) in self.layers.iter().enumerate() {
            kernels::rms_norm(isa, &x, &layer.attn_norm, c.rms_eps, &mut h);
            kernels::matmul_into(isa, &h, n, &layer.qkv, &mut qkv, &mut scratch);
            if let Some(bias) = &layer.qkv_bias {
                // After the matmul, in f32, as llama.cpp's `ggml_add` (one rounding per
                // element, so still batch-invariant).
                kernels::add_bias_rows(&mut qkv, bias);
            }
            q.clear();
            k.clear();
            v.clear();
            for row in qkv.chunks_exact(q_w + 2 * kv_w) {
                q.extend_from_slice(&row[..q_w]);
                k.extend_from_slice(&row[q_w..q_w + kv_w]);
                v.extend_from_slice(&row[q_w + kv_w..]);
            }
            if let Some(g) = &layer.gemma {
                // Each head's query and key RMS-normed on its own, before RoPE.
                for (rows, norm) in [(&mut q, &g.q_norm), (&mut k, &g.k_norm)] {
                    unnormed.clone_from(rows);
                    kernels::rms_norm(isa, &unnormed, norm, c.rms_eps, rows);
                }
            }
            let table = match (layer.window, &rope_swa) {
                (Some(_), Some(swa)) => swa,
                _ => &rope,
            };
            table.apply(style, &mut q, c.n_heads, hd);
            table.apply(style, &mut k, c.n_kv_heads, hd);
            cache.write_rows(li, start, &k, &v);
            if li == last_layer {
                m = match want {
                    Logits::None => break,
                    Logits::Last => 1,
                    Logits::All => n,
                };
                x.drain(..(n - m) * dim);
                h.truncate(m * dim);
            }
            let spec = AttentionSpec {
                n_heads: c.n_heads,
                scale: c.attn_scale,
                window: layer.window,
            };
            let (q, first) = (&q[(n - m) * q_w..], start + n - m);
            let attn = kernels::attention(isa, q, m, first, spec, cache, li);
            kernels::matmul_into(isa, &attn, m, &layer.attn_output, &mut o, &mut scratch);
            match &layer.gemma {
                // Normed into `h`, free until the MLP's norm overwrites it.
                Some(g) => {
                    kernels::rms_norm(isa, &o, &g.post_attn_norm, c.rms_eps, &mut h);
                    kernels::add_in_place(&mut x, &h);
                }
                None => kernels::add_in_place(&mut x, &o),
            }

            kernels::rms_norm(isa, &x, &layer.ffn_norm, c.rms_eps, &mut h);
            kernels::matmul_into(isa, &h, m, &layer.gate_up, &mut gate_up, &mut scratch);
            match gemma {
                true => kernels::gelu_mul_rows(isa, &gate_up, c.ffn_dim, &mut act),
                false => kernels::silu_mul_rows(isa, &gate_up, c.ffn_dim, &mut act),
            }
            kernels::matmul_into(isa, &act, m, &layer.ffn_down, &mut down, &mut scratch);
            match &layer.gemma {
                Some(g) => {
                    kernels::rms_norm(isa, &down, &g.post_ffn_norm, c.rms_eps, &mut h);
                    kernels::add_in_place(&mut x, &h);
                }
                None => kernels::add_in_place(&mut x, &down),
            }
        }
        cache.push_tokens(tokens);

        let rows = match want {
            Logits::None => return Vec::new(),
            Logits::Last => &x[(m - 1) * dim..],
            Logits::All => &x[..],
        };
        let m = rows.len() / dim;
        let mut normed = vec![0.0f32; rows.len()];
        kernels::rms_norm(self.isa, rows, &self.output_norm, c.rms_eps, &mut normed);
        let head = self.output.as_ref().unwrap_or(&self.token_embd);
        let mut logits = kernels::matmul(self.isa, &normed, m, head);
        if let Some(bias) = &self.output_bias {
            kernels::add_bias_rows(&mut logits, bias);
        }
        logits
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
