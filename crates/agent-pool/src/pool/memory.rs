//! The hot set: which agents' caches are in memory, counted exactly against `max_hot` and
//! the byte budget, evicted least-recently-used first (busy agents are pinned); making an
//! agent hot; and the public calls that load, evict, save and account for caches.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_extract::KvCache;
use kv_store::SaveReport;

use super::{
    Agent, AgentPool, HotAgent, HotEntry, LoadReport, PoolStats, RebuildEvent, Slot, lock, try_lock,
};
use crate::backend::Backend;
use crate::error::{PoolError, Result};
use crate::files::AgentInfo;
use crate::transcript::Transcript;

/// How many rebuilds [`PoolStats::recent_rebuilds`] remembers.
const REBUILD_LOG_LEN: usize = 32;

/// Resident set size of this process, from `/proc/self/status` (Linux only).
fn rss_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl<B: Backend + ?Sized> AgentPool<B> {
    /// Records (or updates) a hot agent's bytes, marking it most recently used.
    pub(super) fn record(&self, slot: &Arc<Slot>, agent: &Agent) {
        let Some(cache) = &agent.cache else { return };
        let (bytes, tokens, dirty) = (cache.bytes_allocated(), cache.len(), agent.dirty);
        let mut st = lock(&self.state);
        let old = st.hot.put(
            slot.id.clone(),
            HotEntry {
                slot: Arc::clone(slot),
                bytes,
                tokens,
                dirty,
            },
        );
        st.kv_bytes = st.kv_bytes - old.map_or(0, |o| o.bytes) + bytes;
    }

    pub(super) fn unrecord(&self, id: &str) {
        let mut st = lock(&self.state);
        if let Some(old) = st.hot.pop(id) {
            st.kv_bytes -= old.bytes;
        }
    }

    /// Drops a hot agent's cache from memory, saving it first if it changed. With `force`, a
    /// failed save is counted and the cache dropped anyway (the transcript can rebuild it);
    /// without, the error is returned and the cache stays.
    fn evict_locked(&self, slot: &Arc<Slot>, agent: &mut Agent, force: bool) -> Result<bool> {
        Ok(self.evict_take(slot, agent, force)?.is_some())
    }

    /// [`AgentPool::evict_locked`], handing back the evicted cache (its memory can be reused).
    fn evict_take(
        &self,
        slot: &Arc<Slot>,
        agent: &mut Agent,
        force: bool,
    ) -> Result<Option<KvCache>> {
        if agent.cache.is_none() {
            return Ok(None);
        }
        match self.save_locked(&slot.id, agent) {
            Ok(_) => {}
            Err(_) if force => {}
            Err(e) => return Err(e),
        }
        let cache = agent.cache.take();
        agent.fresh_system = None;
        agent.dirty = false;
        self.unrecord(&slot.id);
        lock(&self.state).counters.evictions += 1;
        Ok(cache)
    }

    /// When the pool is at `max_hot`, so that making `id` hot will evict the least recently
    /// used agent anyway, evicts it now and returns its cache, whose memory the load can reuse:
    /// new memory costs a page fault per 4 KiB on first touch, more than reading the cache.
    /// Pinned agents are skipped, as [`AgentPool::enforce`] skips them.
    fn evict_for(&self, id: &str) -> Option<KvCache> {
        let candidates: Vec<Arc<Slot>> = {
            let st = lock(&self.state);
            if st.hot.len() < self.config.max_hot {
                return None;
            }
            st.hot
                .iter()
                .rev()
                .filter(|(k, _)| k.as_str() != id)
                .map(|(_, e)| Arc::clone(&e.slot))
                .collect()
        };
        candidates.iter().find_map(|slot| {
            let mut agent = try_lock(&slot.state)?;
            self.evict_take(slot, &mut agent, true).ok().flatten()
        })
    }

    /// Evicts least-recently-used agents until the hot count and bytes are within limits,
    /// skipping any agent whose mutex is held (it is generating, or being worked on: pinned).
    /// When only pinned agents remain the pool stays over its limits until they finish; the
    /// call that finishes enforces them again.
    pub(super) fn enforce(&self) {
        loop {
            let candidates: Vec<Arc<Slot>> = {
                let st = lock(&self.state);
                if st.hot.len() <= self.config.max_hot && st.kv_bytes <= self.config.kv_budget_bytes
                {
                    return;
                }
                st.hot
                    .iter()
                    .rev()
                    .map(|(_, e)| Arc::clone(&e.slot))
                    .collect()
            };
            let evicted = candidates.iter().any(|slot| {
                try_lock(&slot.state).is_some_and(|mut agent| {
                    matches!(self.evict_locked(slot, &mut agent, true), Ok(true))
                })
            });
            if !evicted {
                return;
            }
        }
    }

    /// Makes the locked agent hot (does not enforce the limits).
    pub(super) fn activate(
        &self,
        slot: &Arc<Slot>,
        info: &AgentInfo,
        agent: &mut Agent,
    ) -> Result<LoadReport> {
        let started = Instant::now();
        let transcript_repair = self.ensure_transcript(&slot.id, agent)?;
        let mut report = LoadReport {
            already_hot: agent.cache.is_some(),
            resumed_from_disk: false,
            rebuilt: None,
            transcript_repair,
            tokens: 0,
            bytes: 0,
            reused_memory: false,
            elapsed: Duration::ZERO,
        };
        if agent.cache.is_none() {
            let empty = Transcript::default();
            let transcript = agent.transcript.as_ref().unwrap_or(&empty);
            let spare = self.evict_for(&slot.id);
            let had_spare = spare.is_some();
            let (cache, rebuilt) = self.load_or_rebuild(&slot.id, info, transcript, spare)?;
            report.reused_memory = had_spare && rebuilt.is_none();
            agent.dirty = rebuilt.is_some();
            agent.cache = Some(cache);
            let mut st = lock(&self.state);
            match &rebuilt {
                None => st.counters.loads += 1,
                Some(r) => {
                    st.counters.rebuilds += 1;
                    if st.rebuilds.len() == REBUILD_LOG_LEN {
                        st.rebuilds.pop_front();
                    }
                    st.rebuilds.push_back(RebuildEvent {
                        id: slot.id.clone(),
                        rebuild: r.clone(),
                    });
                }
            }
            report.resumed_from_disk = rebuilt.is_none();
            report.rebuilt = rebuilt;
        }
        self.record(slot, agent);
        if let Some(c) = &agent.cache {
            report.tokens = c.len();
            report.bytes = c.bytes_allocated();
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Makes agent `id` hot: loads its cache from disk, or rebuilds it from the transcript
    /// (the report says which, and why). Other agents may be evicted to make room; a cache
    /// larger than the whole budget is [`PoolError::OverBudget`] (and is not kept).
    pub fn load_agent(&self, id: &str) -> Result<LoadReport> {
        let slot = self.slot(id)?;
        let report = {
            let (mut agent, info) = self.lock_agent(&slot)?;
            let report = self.activate(&slot, info, &mut agent)?;
            if report.bytes > self.config.kv_budget_bytes {
                self.evict_locked(&slot, &mut agent, true)?;
                return Err(PoolError::OverBudget {
                    id: id.to_owned(),
                    bytes: report.bytes,
                    budget: self.config.kv_budget_bytes,
                });
            }
            report
        };
        self.enforce();
        Ok(report)
    }

    /// Saves agent `id`'s cache if it changed and drops it from memory. Returns whether it
    /// was hot. If the save fails the cache stays in memory and the error is returned.
    pub fn evict(&self, id: &str) -> Result<bool> {
        let slot = self.slot(id)?;
        let (mut agent, _) = self.lock_agent(&slot)?;
        self.evict_locked(&slot, &mut agent, false)
    }

    /// Saves agent `id`'s cache if it is hot and changed since its last save; returns what
    /// the save did, or `None` when there was nothing to save.
    pub fn save_agent(&self, id: &str) -> Result<Option<SaveReport>> {
        let slot = self.slot(id)?;
        let (mut agent, _) = self.lock_agent(&slot)?;
        let report = self.save_locked(id, &mut agent)?;
        self.record(&slot, &agent);
        Ok(report)
    }

    /// Saves every hot cache that changed. Returns how many were saved; on failures, tries
    /// them all and returns the first error.
    pub fn flush(&self) -> Result<usize> {
        let slots: Vec<Arc<Slot>> = lock(&self.state)
            .hot
            .iter()
            .map(|(_, e)| Arc::clone(&e.slot))
            .collect();
        let mut saved = 0;
        let mut first_err = None;
        for slot in slots {
            let mut agent = lock(&slot.state);
            match self.save_locked(&slot.id, &mut agent) {
                Ok(Some(_)) => saved += 1,
                Ok(None) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
            self.record(&slot, &agent);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(saved),
        }
    }

    /// Memory and activity: the figures are the pool's own accounting, which equals the sum of
    /// [`KvCache::bytes_allocated`] over the hot caches whenever no call is in progress.
    pub fn stats(&self) -> PoolStats {
        let agents = lock(&self.registry).agents.len();
        let st = lock(&self.state);
        PoolStats {
            hot: st
                .hot
                .iter()
                .map(|(id, e)| HotAgent {
                    id: id.clone(),
                    bytes: e.bytes,
                    tokens: e.tokens,
                    dirty: e.dirty,
                })
                .collect(),
            kv_bytes: st.kv_bytes,
            kv_budget_bytes: self.config.kv_budget_bytes,
            max_hot: self.config.max_hot,
            weight_bytes: self.backend.weight_bytes(),
            rss_bytes: rss_bytes(),
            agents,
            counters: st.counters,
            recent_rebuilds: st.rebuilds.iter().cloned().collect(),
        }
    }

    /// Measures the hot caches directly (locking each agent) and returns (number of agents
    /// holding a cache, the sum of their [`KvCache::bytes_allocated`]): what tests compare
    /// with [`AgentPool::stats`].
    #[doc(hidden)]
    pub fn audit(&self) -> (usize, usize) {
        let slots: Vec<Arc<Slot>> = lock(&self.registry).agents.values().cloned().collect();
        let mut count = 0;
        let mut bytes = 0;
        for s in slots {
            if let Some(c) = &lock(&s.state).cache {
                count += 1;
                bytes += c.bytes_allocated();
            }
        }
        (count, bytes)
    }
}

impl<B: Backend + ?Sized> AgentPool<B> {
    /// Closes the pool without saving any cache, as a crash would leave it (for tests: the
    /// next open must rebuild or extend stale caches from the transcripts).
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.flush_on_drop = false;
    }
}

impl<B: Backend + ?Sized> Drop for AgentPool<B> {
    /// Saves the hot caches that changed (best effort: a failure only costs a rebuild later).
    fn drop(&mut self) {
        if self.flush_on_drop {
            let _ = self.flush();
        }
    }
}
