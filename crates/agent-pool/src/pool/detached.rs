//! Detached replies: a conversation answered without any agent, reusing the K/V of a hot
//! agent's cache or of a saved system prompt, and writing nothing.

use std::sync::Arc;
use std::time::Duration;

use engine::{GenerateOptions, Message, Role};
use kv_extract::KvCache;
use kv_store::SegmentId;

use super::{AgentPool, Reply, Reused, Slot, Timings, lock, try_lock};
use crate::backend::Backend;
use crate::error::{PoolError, Result};
use crate::transcript::Parent;

impl<B: Backend + ?Sized> AgentPool<B> {
    /// Answers `messages` (a whole conversation) without any agent: nothing is written.
    ///
    /// The K/V of the longest token prefix the prompt shares with the previous detached reply
    /// or with a hot agent's cache (a shared system prompt, typically) is copied rather than
    /// computed; when the conversation's system message is one an agent saved as its first
    /// segment and that is longer, it is read from disk instead (read, never adopted). No
    /// agent's cache or transcript changes and no file is written. One detached reply runs at a
    /// time. `on_reuse` hears, before generation starts, how many prompt tokens are reused and
    /// from where.
    pub fn respond_detached(
        &self,
        messages: &[Message],
        options: &GenerateOptions,
        on_reuse: &mut dyn FnMut(Reused),
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        const WHO: &str = "(detached)";
        let prompt = self
            .backend
            .chat_tokens(messages, true)
            .map_err(|e| PoolError::engine(WHO, e))?;
        let options = self.fit(WHO, &prompt, options)?;
        let mut scratch = lock(&self.scratch);
        let cache = scratch.get_or_insert_with(|| KvCache::new(self.shape, self.meta.dtype));
        let own = cache.common_prefix_len(&prompt);
        let slots: Vec<Arc<Slot>> = lock(&self.state)
            .hot
            .iter()
            .map(|(_, e)| Arc::clone(&e.slot))
            .collect();
        let mut best: Option<(usize, Arc<Slot>)> = None;
        for slot in slots {
            // A busy agent is skipped, never waited for.
            let Some(agent) = try_lock(&slot.state) else {
                continue;
            };
            let n = agent
                .cache
                .as_ref()
                .map_or(0, |c| c.common_prefix_len(&prompt));
            if n > best.as_ref().map_or(own, |b| b.0) {
                drop(agent);
                best = Some((n, slot));
            }
        }
        let best_len = best.as_ref().map_or(0, |b| b.0);
        let saved = self.saved_system_prefix(messages, &prompt, best_len.max(own));
        let mut reused = Reused {
            tokens: best_len.max(own),
            from_disk: false,
        };
        if let Some(loaded) = saved {
            // On error the cache is left empty: the prompt is computed in full.
            if cache.import_into(&loaded, &self.meta).is_ok() {
                reused = Reused {
                    tokens: loaded.len(),
                    from_disk: true,
                };
            } else {
                reused.tokens = 0;
            }
        } else if let Some((_, slot)) = best
            && let Some(agent) = try_lock(&slot.state)
            && let Some(other) = &agent.cache
        {
            let n = other.common_prefix_len(&prompt);
            if n > own {
                cache.clear();
                // A prefix a sliding window has dropped is not copied: the prompt is then
                // computed in full.
                if cache.extend_from(other, 0..n).is_err() {
                    reused.tokens = 0;
                }
            }
        }
        reused.tokens = reused.tokens.min(prompt.len().saturating_sub(1));
        on_reuse(reused);
        let generation = self
            .backend
            .generate(cache, &prompt, &options, on_text)
            .map_err(|e| PoolError::engine(WHO, e))?;
        // Keep the scratch cache only while it is small next to the budget of one hot agent.
        if cache.bytes_allocated() > self.config.kv_budget_bytes / self.config.max_hot {
            *scratch = None;
        }
        Ok(Reply {
            text: generation.text,
            tokens: generation.tokens,
            first_logits: generation.first_logits,
            turn: None,
            parent: Parent::Bare,
            matched_messages: 0,
            prompt_tokens: generation.prompt_tokens,
            reused_tokens: generation.reused_tokens,
            stop: generation.stop,
            timings: Timings {
                load: Duration::ZERO,
                prefill: generation.prefill,
                decode: generation.decode,
                commit: Duration::ZERO,
            },
            resumed_from_disk: false,
            rebuilt: None,
            transcript_repair: None,
        })
    }

    /// The saved K/V of the conversation's system message, when an agent saved it as its first
    /// segment (see [`AgentPool::create_agent`]), its tokens start `prompt` and it is longer
    /// than `more_than`. Best effort: a missing or unreadable segment is `None` (the prompt is
    /// then computed), and nothing is written.
    fn saved_system_prefix(
        &self,
        messages: &[Message],
        prompt: &[u32],
        more_than: usize,
    ) -> Option<kv_store::LoadedCache> {
        let first = messages.first().filter(|m| m.role == Role::System)?;
        let sys = self
            .backend
            .chat_tokens(&[Message::system(first.content.clone())], false)
            .ok()?;
        if sys.len() <= more_than || !prompt.starts_with(&sys) {
            return None;
        }
        let seg = SegmentId::compute(&self.meta, None, &sys);
        if !self.store.segment_path(&seg).exists() {
            return None;
        }
        let loaded = self.store.read_chain(&self.meta, &[seg]).ok()?;
        (loaded.tokens() == sys.as_slice()).then_some(loaded)
    }
}
