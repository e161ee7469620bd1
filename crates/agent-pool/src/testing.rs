//! A deterministic fake engine for tests of the pool: no model, instant, and it checks what
//! the pool hands it.
//!
//! - Tokens: `<|im_start|>` is 1, `<|im_end|>` is 2, every byte `b` of text is `3 + b`; the
//!   "template" is ChatML, so a conversation's tokens start with its system message's.
//! - K/V: the value of every element at position `p` is a hash of (model, tokens `0..=p`,
//!   layer, K or V, element), a multiple of 1/8 below 8 in magnitude (f16 and bf16 store it
//!   exactly, `q8_0` quantizes it; the oracle compares with what the cache's dtype stores).
//! - A reply is a function of the whole prompt: its length and letters come from its hash.
//! - Oracle: before using a cache, `sync` and `generate` recompute every reused position and
//!   **panic** if one differs: a pool that hands over K/V that do not belong to the cache's
//!   tokens is a bug that must fail the test, not be papered over.

use std::time::{Duration, Instant};

use engine::{EngineError, GenerateOptions, Generation, Message, StopReason};
use kv_extract::{KvCache, KvShape};
use kv_store::{CacheMeta, KvDtype, ModelFingerprint};

use crate::{AgentInfo, Backend, Result, Turn};

const IM_START: u32 = 1;
const IM_END: u32 = 2;
const BYTE_BASE: u32 = 3;
/// The longest conversation the fake "model" accepts, in tokens.
pub const FAKE_CONTEXT: usize = 1 << 16;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz ,.";

/// The fake engine; see the module documentation.
#[derive(Clone, Debug)]
pub struct FakeBackend {
    shape: KvShape,
    seed: u64,
    token_delay: Duration,
}

impl Default for FakeBackend {
    fn default() -> Self {
        FakeBackend::new("fake")
    }
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finalizer: cheap, and every input bit reaches every output bit.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl FakeBackend {
    /// A fake model named `model` (two models with different names make incompatible caches)
    /// with a tiny cache shape: 2 layers, 2 KV heads of width 4.
    pub fn new(model: &str) -> FakeBackend {
        FakeBackend {
            shape: KvShape {
                n_layers: 2,
                n_kv_heads: 2,
                head_dim: 4,
                window: None,
            },
            seed: xxhash_rust::xxh3::xxh3_64(model.as_bytes()),
            token_delay: Duration::ZERO,
        }
    }

    /// The same model with another cache shape (bigger caches make saves take real time).
    pub fn with_shape(mut self, shape: KvShape) -> FakeBackend {
        self.shape = shape;
        self
    }

    /// Sleeps this long per generated token, so that concurrent calls really overlap.
    pub fn with_token_delay(mut self, delay: Duration) -> FakeBackend {
        self.token_delay = delay;
        self
    }

    /// Tokens of `text`.
    pub fn encode(text: &str) -> Vec<u32> {
        text.bytes().map(|b| BYTE_BASE + u32::from(b)).collect()
    }

    fn prefix_hash(&self, prev: u64, token: u32) -> u64 {
        mix(prev ^ u64::from(token).wrapping_mul(0x100_0000_01b3))
    }

    /// Hash of the tokens `0..n`; `self.seed` for none.
    fn hash_of(&self, tokens: &[u32]) -> u64 {
        tokens
            .iter()
            .fold(self.seed, |h, &t| self.prefix_hash(h, t))
    }

    fn value(h: u64, layer: usize, v: bool, element: usize) -> f32 {
        let x = mix(h ^ ((layer as u64) << 40) ^ (u64::from(v) << 39) ^ element as u64);
        ((x % 128) as i32 - 64) as f32 / 8.0
    }

    /// Appends `tokens` after the cache's last one, with their K/V.
    fn append(&self, cache: &mut KvCache, tokens: &[u32]) {
        if tokens.is_empty() {
            return;
        }
        let s = self.shape;
        let row = s.row_len();
        let start = cache.len();
        let mut h = self.hash_of(cache.tokens());
        let hashes: Vec<u64> = tokens
            .iter()
            .map(|&t| {
                h = self.prefix_hash(h, t);
                h
            })
            .collect();
        cache.reserve(tokens.len());
        for layer in 0..s.n_layers {
            let rows = |v: bool| -> Vec<f32> {
                hashes
                    .iter()
                    .flat_map(|&h| (0..row).map(move |e| Self::value(h, layer, v, e)))
                    .collect()
            };
            cache.write_rows(layer, start, &rows(false), &rows(true));
        }
        cache.push_tokens(tokens);
    }

    /// The oracle: every position below `n` that the cache holds (a sliding-window layer's
    /// from [`KvCache::held_from`]) must hold the values its tokens imply, as the cache's
    /// dtype stores them.
    fn verify(&self, cache: &KvCache, n: usize) {
        let s = self.shape;
        let row = s.row_len();
        let mut h = self.seed;
        let mut want = KvCache::with_capacity(s, cache.dtype(), 1);
        for (p, &t) in cache.tokens()[..n].iter().enumerate() {
            h = self.prefix_hash(h, t);
            for layer in (0..s.n_layers).filter(|&l| p >= cache.held_from(l)) {
                let rows = |v: bool| -> Vec<f32> {
                    (0..row).map(|e| Self::value(h, layer, v, e)).collect()
                };
                want.write_rows(layer, 0, &rows(false), &rows(true));
                for head in 0..s.n_kv_heads {
                    assert!(
                        cache.k_head(layer, head, p..p + 1).bytes()
                            == want.k_head(layer, head, 0..1).bytes()
                            && cache.v_head(layer, head, p..p + 1).bytes()
                                == want.v_head(layer, head, 0..1).bytes(),
                        "fake backend: the cache handed over holds wrong K/V at position {p} \
                         (layer {layer}, head {head}): it does not belong to its tokens"
                    );
                }
            }
        }
    }

    /// The reply the fake gives to `conversation` (rendered with the generation prompt), computed
    /// without any pool or cache: what a pool must answer for it.
    pub fn reply_to_conversation(&self, conversation: &[Message], max_tokens: usize) -> String {
        let prompt = self
            .chat_tokens(conversation, true)
            .expect("the fake renders every conversation");
        self.reply_to(&prompt, max_tokens)
    }

    /// The reply the fake gives to `user` after the system prompt `system` and the earlier
    /// (user, reply) `turns`, computed without any pool or cache.
    pub fn expected_reply(
        &self,
        system: &str,
        turns: &[(String, String)],
        user: &str,
        max_tokens: usize,
    ) -> String {
        let mut conversation = vec![Message::system(system)];
        for (u, a) in turns {
            conversation.push(Message::user(u.clone()));
            conversation.push(Message::assistant(a.clone()));
        }
        conversation.push(Message::user(user));
        self.reply_to_conversation(&conversation, max_tokens)
    }

    /// The reply the fake gives to `prompt` when allowed `max_tokens` tokens.
    pub fn reply_to(&self, prompt: &[u32], max_tokens: usize) -> String {
        let h = self.hash_of(prompt);
        let n = (1 + (h % 12) as usize).min(max_tokens);
        (0..n)
            .map(|i| char::from(ALPHABET[(mix(h ^ i as u64) % ALPHABET.len() as u64) as usize]))
            .collect()
    }
}

impl Backend for FakeBackend {
    fn cache_meta(&self, dtype: KvDtype) -> CacheMeta {
        let s = self.shape;
        // A sliding window is part of what the K/V mean, recorded as the engine records it.
        let mut extra = std::collections::BTreeMap::new();
        if let Some(w) = s.window {
            extra.insert(
                kv_store::EXTRA_SLIDING_WINDOW.to_owned(),
                w.size.to_string(),
            );
            let letters = (0..s.n_layers)
                .map(|l| {
                    if s.layer_window(l).is_some() {
                        'S'
                    } else {
                        'G'
                    }
                })
                .collect();
            extra.insert(kv_store::EXTRA_SLIDING_LAYERS.to_owned(), letters);
        }
        CacheMeta {
            model: ModelFingerprint {
                architecture: "fake".into(),
                n_layers: s.n_layers as u32,
                n_heads: s.n_kv_heads as u32,
                n_kv_heads: s.n_kv_heads as u32,
                head_dim: s.head_dim as u32,
                rope_theta: 10_000.0,
                rope_dim: s.head_dim as u32,
                weights_hash: format!("{:016x}", self.seed),
                extra,
            },
            tokenizer: "fake-bytes-v1".into(),
            chat_template: "fake-chatml-v1".into(),
            dtype,
        }
    }

    fn kv_shape(&self) -> KvShape {
        self.shape
    }

    fn chat_tokens(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> engine::Result<Vec<u32>> {
        let mut out = Vec::new();
        for m in messages {
            out.push(IM_START);
            out.extend(Self::encode(&format!("{}\n", m.role)));
            match &m.tokens {
                Some(tokens) => out.extend(tokens),
                None => out.extend(Self::encode(&m.content)),
            }
            out.push(IM_END);
            out.extend(Self::encode("\n"));
        }
        if add_generation_prompt {
            out.push(IM_START);
            out.extend(Self::encode("assistant\n"));
        }
        Ok(out)
    }

    fn sync(&self, cache: &mut KvCache, tokens: &[u32]) -> engine::Result<usize> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if tokens.len() > FAKE_CONTEXT {
            return Err(EngineError::ContextOverflow {
                needed: tokens.len(),
                max: FAKE_CONTEXT,
            });
        }
        let mut reuse = cache.common_prefix_len(&tokens[..tokens.len() - 1]);
        if cache.truncate(reuse).is_err() {
            cache.clear();
            reuse = 0;
        }
        self.verify(cache, reuse);
        self.append(cache, &tokens[reuse..]);
        Ok(reuse)
    }

    fn generate(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> engine::Result<Generation> {
        let started = Instant::now();
        let reused = self.sync(cache, prompt)?;
        let prefill = started.elapsed();
        let decode_started = Instant::now();
        let text = self.reply_to(prompt, options.max_tokens);
        let tokens = Self::encode(&text);
        for c in text.chars() {
            if !self.token_delay.is_zero() {
                std::thread::sleep(self.token_delay);
            }
            on_text(c.encode_utf8(&mut [0; 4]));
        }
        // As the engine: the cache holds every generated token but the last.
        self.append(cache, &tokens[..tokens.len().saturating_sub(1)]);
        let h = self.hash_of(prompt);
        Ok(Generation {
            stop: if tokens.len() < options.max_tokens {
                StopReason::EndOfTurn
            } else {
                StopReason::MaxTokens
            },
            first_logits: (0..8).map(|i| (mix(h ^ i) >> 40) as f32).collect(),
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            tokens,
            text,
            prefill,
            decode: decode_started.elapsed(),
        })
    }

    fn weight_bytes(&self) -> usize {
        1 << 20
    }

    fn context_len(&self) -> usize {
        FAKE_CONTEXT
    }
}

/// Parses transcript bytes as the pool does when it reads `agents/<id>/transcript.jsonl`:
/// the verified turns and the length of the bytes holding them (what follows is a torn tail).
/// For parser tests and fuzzing: it must never panic, whatever the bytes.
pub fn parse_transcript(bytes: &[u8]) -> Result<(Vec<Turn>, usize)> {
    crate::transcript::parse(std::path::Path::new("transcript.jsonl"), bytes)
        .map(|(turns, _deleted, len)| (turns, len))
}

/// Encodes one transcript line, newline included, as an append writes it.
pub fn transcript_line(turn: &Turn) -> Vec<u8> {
    crate::transcript::encode_line(&crate::transcript::Entry::Turn(turn.clone()))
        .unwrap_or_default()
}

/// Parses the bytes of an `agent.json` that must describe agent `id`, as the pool does at
/// open. For parser tests and fuzzing: it must never panic, whatever the bytes.
pub fn parse_agent_file(bytes: &[u8], id: &str) -> Result<AgentInfo> {
    crate::files::parse_agent(std::path::Path::new("agent.json"), bytes, id)
}
