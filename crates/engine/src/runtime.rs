//! The engine as its users see it: one GGUF file gives a model, its tokenizer and its chat
//! template; a conversation is brought up to date on a [`KvCache`] (reusing whatever prefix
//! the cache already holds) and continued by generation, streamed as text.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kv_extract::KvCache;
use kv_store::{CacheMeta, KvDtype};

use crate::chat::{ChatTemplate, Message};
use crate::error::{EngineError, Result};
use crate::model::{Logits, Model};
use crate::sample::{Sampler, SamplingConfig};
use crate::tokenizer::{TokenStream, Tokenizer};

/// File name of the model agentkv is built and tested against.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// agentkv's data directory: `$AGENTKV_HOME`, else `$XDG_DATA_HOME/agentkv`, else
/// `~/.local/share/agentkv`. (xtask resolves the same directory; keep the two in step.)
pub fn agentkv_home() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("AGENTKV_HOME")
        .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("agentkv")))
        .or_else(|| var("HOME").map(|h| h.join(".local/share/agentkv")))
}

/// Where `cargo xtask fetch-model` puts the default model.
pub fn default_model_path() -> Option<PathBuf> {
    agentkv_home().map(|h| h.join("models").join(DEFAULT_MODEL_FILE))
}

/// How to continue a conversation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Stop after this many new tokens.
    pub max_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingConfig,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingConfig::greedy(),
        }
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-turn token (`<|im_end|>`, eos).
    EndOfTurn,
    /// `max_tokens` were generated.
    MaxTokens,
}

/// What a call to [`Engine::generate`] did, with its timings.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The generated token ids, without the stop token.
    pub tokens: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Logits of the first generated position (after the prompt): what exactness tests compare.
    pub first_logits: Vec<f32>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V the cache already held.
    pub reused_tokens: usize,
    /// Time to bring the cache up to the prompt (prefill of the tokens not reused).
    pub prefill: Duration,
    /// Time spent generating after the first token's logits.
    pub decode: Duration,
    /// Why it stopped.
    pub stop: StopReason,
}

/// A model with its tokenizer and chat template, loaded from one GGUF file.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    path: PathBuf,
}

impl Engine {
    /// Loads the model, tokenizer and chat template from a GGUF file.
    pub fn load(path: &Path) -> Result<Engine> {
        let (model, content) = Model::load_with_content(path)?;
        let tokenizer = Tokenizer::from_gguf(&content)?;
        let template = ChatTemplate::from_gguf(&content)?;
        Ok(Engine {
            model,
            tokenizer,
            template,
            path: path.to_owned(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The GGUF file the engine was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An empty cache shaped for this model.
    pub fn new_cache(&self) -> KvCache {
        self.model.new_cache()
    }

    /// The compatibility key of caches this engine makes, stored as `dtype`.
    pub fn cache_meta(&self, dtype: KvDtype) -> CacheMeta {
        let c = self.model.config();
        CacheMeta {
            model: kv_store::ModelFingerprint {
                // LlamaConfig::from_gguf accepts nothing else.
                architecture: "llama".to_owned(),
                n_layers: c.n_layers as u32,
                n_heads: c.n_heads as u32,
                n_kv_heads: c.n_kv_heads as u32,
                head_dim: c.head_dim as u32,
                rope_theta: f64::from(c.rope_base),
                rope_dim: c.rope_dim as u32,
                weights_hash: self.model.weights_hash().to_owned(),
                extra: Default::default(),
            },
            tokenizer: self.tokenizer.fingerprint().to_owned(),
            chat_template: self.template.fingerprint().to_owned(),
            dtype,
        }
    }

    /// Token ids of a conversation rendered through the chat template.
    pub fn chat_tokens(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.template.render(messages, add_generation_prompt)?;
        Ok(self.tokenizer.encode(&text)?)
    }

    /// Brings `cache` to hold exactly `tokens` and returns the logits after the last one.
    ///
    /// The cache keeps its longest common prefix with `tokens` (at least one token is always
    /// recomputed, since the logits of a cached position are not stored) and the rest is
    /// prefilled. Returns the logits and how many tokens were reused.
    pub fn sync(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<(Vec<f32>, usize)> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let reuse = cache.common_prefix_len(tokens).min(tokens.len() - 1);
        cache.truncate(reuse);
        let logits = self.model.forward(&tokens[reuse..], cache, Logits::Last)?;
        Ok((logits, reuse))
    }

    /// Continues the conversation whose rendered prompt is `prompt`, on `cache`, streaming
    /// each piece of text to `on_text` as soon as it forms whole characters.
    ///
    /// On return the cache holds the prompt and every generated token but the last (whose K/V
    /// the next turn computes when it prefills its prompt).
    pub fn generate(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let mut sampler = Sampler::new(options.sampling)?;
        let stop_ids = self.tokenizer.stop_ids();
        let started = Instant::now();
        let (mut logits, reused) = self.sync(cache, prompt)?;
        let prefill = started.elapsed();
        let first_logits = logits.clone();
        let decode_started = Instant::now();
        let mut stream = TokenStream::new();
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut stop = StopReason::MaxTokens;
        while tokens.len() < options.max_tokens {
            let next = sampler.sample(&logits)?;
            if stop_ids.contains(&next) {
                stop = StopReason::EndOfTurn;
                break;
            }
            tokens.push(next);
            let piece = stream.push(&self.tokenizer, next)?;
            if !piece.is_empty() {
                on_text(&piece);
                text.push_str(&piece);
            }
            if tokens.len() == options.max_tokens {
                break;
            }
            logits = self.model.forward(&[next], cache, Logits::Last)?;
        }
        let rest = stream.finish();
        if !rest.is_empty() {
            on_text(&rest);
            text.push_str(&rest);
        }
        Ok(Generation {
            tokens,
            text,
            first_logits,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            prefill,
            decode: decode_started.elapsed(),
            stop,
        })
    }
}
