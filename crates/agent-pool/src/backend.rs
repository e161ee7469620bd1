//! What the pool needs from an inference engine, as a trait: the real [`engine::Engine`]
//! implements it, and so does the deterministic fake in [`crate::testing`].

use engine::{Engine, GenerateOptions, Generation, Message};
use kv_extract::{KvCache, KvShape};
use kv_store::{CacheMeta, KvDtype};

/// An engine the pool can run agents on.
///
/// The pool owns the caches and the transcripts; the backend only computes. Calls for
/// different agents may come from several threads at once (a backend that cannot run them in
/// parallel serializes them inside).
pub trait Backend: Send + Sync {
    /// The compatibility key of the caches this backend computes, stored as `dtype`.
    fn cache_meta(&self, dtype: KvDtype) -> CacheMeta;

    /// The dimensions of this backend's caches.
    fn kv_shape(&self) -> KvShape;

    /// Token ids of a conversation rendered through the chat template; with
    /// `add_generation_prompt` they end with the opening of an assistant turn.
    fn chat_tokens(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> engine::Result<Vec<u32>>;

    /// Brings `cache` to hold exactly `tokens`, keeping its longest common prefix with them
    /// and computing the rest. Returns how many tokens were reused.
    fn sync(&self, cache: &mut KvCache, tokens: &[u32]) -> engine::Result<usize>;

    /// Continues the conversation whose rendered prompt is `prompt`, on `cache`, streaming
    /// text to `on_text`; see [`Engine::generate`] for what the cache holds afterwards.
    fn generate(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> engine::Result<Generation>;

    /// Bytes of the model's weights in memory.
    fn weight_bytes(&self) -> usize;

    /// Most tokens a conversation (prompt and reply) can hold.
    fn context_len(&self) -> usize;
}

impl Backend for Engine {
    fn cache_meta(&self, dtype: KvDtype) -> CacheMeta {
        Engine::cache_meta(self, dtype)
    }

    fn kv_shape(&self) -> KvShape {
        self.model().kv_shape()
    }

    fn chat_tokens(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> engine::Result<Vec<u32>> {
        Engine::chat_tokens(self, messages, add_generation_prompt)
    }

    fn sync(&self, cache: &mut KvCache, tokens: &[u32]) -> engine::Result<usize> {
        Engine::sync(self, cache, tokens).map(|(_logits, reused)| reused)
    }

    fn generate(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> engine::Result<Generation> {
        Engine::generate(self, cache, prompt, options, on_text)
    }

    fn weight_bytes(&self) -> usize {
        self.model().weight_bytes()
    }

    fn context_len(&self) -> usize {
        Engine::context_len(self)
    }
}
