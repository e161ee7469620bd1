//! An agent's cache against the store: starting one from the system prompt (adopting the
//! segment another agent saved for the same prompt), loading it, or rebuilding it from the
//! transcript when it cannot be loaded, and saving it. What stays in memory is `memory`'s
//! business, not this module's.

use engine::Message;
use kv_extract::KvCache;
use kv_store::{SaveReport, SegmentId};

use super::{Agent, AgentPool, Rebuild, RebuildReason, lock};
use crate::backend::Backend;
use crate::error::{PoolError, Result};
use crate::files::AgentInfo;
use crate::transcript::Transcript;

fn classify(e: &kv_extract::Error) -> RebuildReason {
    use kv_store::Error as S;
    match e {
        kv_extract::Error::Store(S::NotFound { .. }) => RebuildReason::Missing,
        kv_extract::Error::Store(S::FingerprintMismatch {
            field: "kv dtype", ..
        }) => RebuildReason::OtherDtype,
        kv_extract::Error::Store(S::FingerprintMismatch { .. })
        | kv_extract::Error::ShapeMismatch { .. }
        | kv_extract::Error::UnsupportedDtype { .. } => RebuildReason::OtherModel,
        kv_extract::Error::Store(
            S::ChecksumMismatch { .. }
            | S::BadMetadata { .. }
            | S::BadSafetensors { .. }
            | S::SegmentMissing { .. }
            | S::BrokenChain { .. },
        ) => RebuildReason::Damaged,
        _ => RebuildReason::Unreadable,
    }
}

impl<B: Backend + ?Sized> AgentPool<B> {
    /// Saves a hot agent's cache if it changed, counting the outcome.
    pub(super) fn save_locked(&self, id: &str, agent: &mut Agent) -> Result<Option<SaveReport>> {
        let Some(cache) = agent.cache.as_ref().filter(|_| agent.dirty) else {
            return Ok(None);
        };
        let result = cache.save(&self.store, id, &self.meta);
        let mut st = lock(&self.state);
        match result {
            Ok(report) => {
                st.counters.saves += 1;
                drop(st);
                agent.dirty = false;
                Ok(Some(report))
            }
            Err(source) => {
                st.counters.save_errors += 1;
                Err(PoolError::Cache {
                    id: id.to_owned(),
                    source: Box::new(source),
                })
            }
        }
    }

    /// The rendered system message, if it is a token prefix of every conversation the agent
    /// can have (the chat template starts with it), so it can be the cache's first segment.
    fn system_prefix(&self, id: &str, info: &AgentInfo) -> Result<Option<Vec<u32>>> {
        let system = [Message::system(info.system_prompt.clone())];
        let sys = self
            .backend
            .chat_tokens(&system, false)
            .map_err(|e| PoolError::engine(id, e))?;
        let probe = [system[0].clone(), Message::user("x")];
        let full = self
            .backend
            .chat_tokens(&probe, true)
            .map_err(|e| PoolError::engine(id, e))?;
        Ok((!sys.is_empty() && full.starts_with(&sys)).then_some(sys))
    }

    /// A cache holding the system prefix: adopted from the segment another agent saved for
    /// the same system prompt if there is one (then `id`'s manifest already points at it),
    /// else computed. Returns the cache, the prefix length and whether it was adopted.
    pub(super) fn start_cache(&self, id: &str, info: &AgentInfo) -> Result<(KvCache, usize, bool)> {
        let mut cache = KvCache::new(self.shape, self.meta.dtype);
        let Some(sys) = self.system_prefix(id, info)? else {
            return Ok((cache, 0, false));
        };
        let seg = SegmentId::compute(&self.meta, None, &sys);
        if let Some(shared) = &self.config.shared
            && !self.store.segment_path(&seg).exists()
        {
            // Another host may have computed it. Best effort: absent or unreachable, it is
            // computed here.
            let _ = shared.remote.fetch_segment(&self.store, &seg);
        }
        if self.store.segment_path(&seg).exists() {
            let adopted = self
                .store
                .adopt(id, &self.meta, std::slice::from_ref(&seg))
                .map_err(kv_extract::Error::from)
                .and_then(|loaded| KvCache::import(&loaded, &self.meta, self.shape));
            match adopted {
                Ok(c) if c.tokens() == sys.as_slice() => return Ok((c, sys.len(), true)),
                Ok(_) => {}
                Err(e) => {
                    if classify(&e) == RebuildReason::Damaged {
                        // Best effort: a damaged file left in place would be deduplicated onto.
                        let _ = self
                            .store
                            .remove_damaged_segments(std::slice::from_ref(&seg));
                    }
                }
            }
        }
        self.backend
            .sync(&mut cache, &sys)
            .map_err(|e| PoolError::engine(id, e))?;
        Ok((cache, sys.len(), false))
    }

    /// Loads the agent's cache from disk (into `spare`'s memory if given) or, failing that,
    /// rebuilds it from the transcript.
    pub(super) fn load_or_rebuild(
        &self,
        id: &str,
        info: &AgentInfo,
        transcript: &Transcript,
        spare: Option<KvCache>,
    ) -> Result<(KvCache, Option<Rebuild>)> {
        let loaded = match spare {
            Some(mut cache) => cache.load_into(&self.store, id, &self.meta).map(|()| cache),
            None => KvCache::load(&self.store, id, &self.meta, self.shape),
        };
        let err = match loaded {
            Ok(cache) => return Ok((cache, None)),
            Err(e) => e,
        };
        let reason = classify(&err);
        if reason == RebuildReason::Damaged
            && let Ok(Some(m)) = self.store.manifest(id)
        {
            let ids: Vec<SegmentId> = m.segments.into_iter().map(|s| s.id).collect();
            // Best effort: if this fails the save after the rebuild may keep a damaged file,
            // and the next load rebuilds again; nothing is lost.
            let _ = self.store.remove_damaged_segments(&ids);
        }
        let tokens = self
            .backend
            .chat_tokens(
                &Self::conversation(info, transcript, transcript.head(), None),
                false,
            )
            .map_err(|e| PoolError::engine(id, e))?;
        let (mut cache, _, _) = self.start_cache(id, info)?;
        self.backend
            .sync(&mut cache, &tokens)
            .map_err(|e| PoolError::engine(id, e))?;
        Ok((
            cache,
            Some(Rebuild {
                reason,
                detail: crate::error::with_causes(&err),
                tokens: tokens.len(),
            }),
        ))
    }
}
