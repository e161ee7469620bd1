//! Shared agents: each change to an agent created on a shared store is committed there before
//! it is acknowledged, and the changes other hosts committed are applied here before the agent
//! is used.
//!
//! A shared agent's history is a sequence of *changes*, each the next generation of its head on
//! the store (kv-remote's heads, decided once across hosts): its creation, then one per line of
//! its transcript (a turn, or a deleted turn), and its deletion. A change's record carries the
//! change itself and the cache chain holding the agent's K/V after it; the chain's segments
//! are pushed before the record is proposed, so a record never names a segment the store
//! lacks. The local copy is at generation `shared_generation + transcript lines`: applying the
//! next decided record appends its line (verified by its own checksum, exactly as a local read
//! verifies it) and adopts its chain, fetched and verified as a local load verifies it.
//! docs/format.md, "Shared agents", has the record format.

use std::sync::Arc;

use kv_extract::KvCache;
use kv_remote::Decision;
use kv_store::SegmentId;
use serde::{Deserialize, Serialize};

use super::{Agent, AgentPool, Slot, lock};
use crate::backend::Backend;
use crate::error::{PoolError, Result};
use crate::files::AgentInfo;
use crate::transcript::{self, Entry, TRANSCRIPT_FILE, Transcript};

const RECORD_FORMAT: &str = "agentkv.change";
/// Version of the change records this build writes, and the newest it reads.
const RECORD_VERSION: u64 = 1;

/// One change of a shared agent, as its head's generation holds it.
#[derive(Serialize, Deserialize)]
pub(super) struct Record {
    format: String,
    version: u64,
    /// The host that proposed it.
    host: String,
    /// Tells two proposals of one host apart.
    nonce: String,
    change: Change,
    /// The agent's cache chain after the change, in token order; empty when it has none.
    #[serde(default)]
    segments: Vec<SegmentId>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Change {
    /// The agent was created (as `agent.json` describes it).
    Create(AgentInfo),
    /// A transcript line (a turn, or a deleted turn), exactly as written, without its newline.
    Line(String),
    /// The agent was deleted.
    Delete,
}

/// One agent on the shared store, as [`AgentPool::verify_shared`] found it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedCheck {
    /// The agent.
    pub id: String,
    /// Changes committed to it (its head's newest generation).
    pub changes: u64,
    /// Its last change deleted it.
    pub deleted: bool,
    /// Transcript lines since its creation.
    pub turns: usize,
    /// Segments of its newest cache chain, each downloaded and verified.
    pub segments: usize,
    /// Their bytes.
    pub bytes: u64,
    /// What is wrong, if anything.
    pub problem: Option<String>,
}

/// A shared agent's state on the store, from its last creation on.
pub(super) struct Walked {
    /// The generation of the last change.
    pub last: u64,
    /// The agent as created, with the generation of its creation, and the records after it;
    /// `None` when it does not exist (never created, or deleted last).
    pub agent: Option<(AgentInfo, Vec<Record>)>,
}

fn nonce() -> String {
    use std::hash::{BuildHasher, RandomState};
    format!(
        "{:016x}",
        RandomState::new().hash_one(std::time::SystemTime::now())
    )
}

impl<B: Backend + ?Sized> AgentPool<B> {
    /// The generation the local copy of a shared agent has reached (`None`: not shared).
    pub(super) fn local_generation(info: &AgentInfo, transcript: &Transcript) -> Option<u64> {
        let lines = transcript.turns.len() + transcript.deleted.len();
        Some(info.shared_generation? + lines as u64)
    }

    fn decode_record(id: &str, generation: u64, value: &str) -> Result<Record> {
        let bad = |detail: String| PoolError::SharedRecord {
            id: id.to_owned(),
            generation,
            detail,
        };
        let record: Record =
            serde_json::from_str(value).map_err(|e| bad(format!("not a change record ({e})")))?;
        if record.format != RECORD_FORMAT {
            return Err(bad(format!("its format is {:?}", record.format)));
        }
        if record.version > RECORD_VERSION {
            return Err(bad(format!(
                "it is version {}, from a newer agentkv (this build reads up to {RECORD_VERSION}): \
                 upgrade this host",
                record.version
            )));
        }
        Ok(record)
    }

    /// Reads the changes of agent `id` on the shared store, from generation 1 on.
    pub(super) fn walk_shared(&self, id: &str) -> Result<Walked> {
        let Some(shared) = &self.config.shared else {
            return Ok(Walked {
                last: 0,
                agent: None,
            });
        };
        let mut walked = Walked {
            last: 0,
            agent: None,
        };
        // Read in batches (concurrently inside each): an agent's history is one object per
        // change.
        const BATCH: usize = 64;
        let mut pending = std::collections::VecDeque::new();
        let mut ended = false;
        loop {
            let generation = walked.last + 1;
            if pending.is_empty() && !ended {
                let batch = shared
                    .remote
                    .decided_from(id, generation, BATCH)
                    .map_err(|e| PoolError::Shared {
                        id: id.to_owned(),
                        what: "reading the agent",
                        source: Box::new(e),
                    })?;
                ended = batch.len() < BATCH;
                pending.extend(batch);
            }
            let Some(value) = pending.pop_front() else {
                return Ok(walked);
            };
            let record = Self::decode_record(id, generation, &value)?;
            walked.last = generation;
            match (&record.change, &mut walked.agent) {
                (Change::Create(info), _) => {
                    let mut info = info.clone();
                    if info.id != id {
                        return Err(PoolError::SharedRecord {
                            id: id.to_owned(),
                            generation,
                            detail: format!("it creates agent {:?}", info.id),
                        });
                    }
                    info.shared_generation = Some(generation);
                    walked.agent = Some((info, vec![record]));
                }
                (Change::Delete, _) => walked.agent = None,
                (Change::Line(_), Some((_, records))) => records.push(record),
                (Change::Line(_), None) => {
                    return Err(PoolError::SharedRecord {
                        id: id.to_owned(),
                        generation,
                        detail: "a transcript line of an agent that does not exist".into(),
                    });
                }
            }
        }
    }

    /// Commits `change` as generation `generation` of shared agent `id`, with `segments` its
    /// cache chain after it: pushes the segments not in `known` (the chain of the agent's
    /// previous change, which the store keeps), each a no-op where the store has it, then
    /// proposes. `what` names the change in errors. [`PoolError::Conflict`] when another
    /// host's change is the generation's.
    fn commit_shared(
        &self,
        id: &str,
        generation: u64,
        change: Change,
        segments: &[SegmentId],
        known: &[SegmentId],
        what: &'static str,
    ) -> Result<()> {
        let Some(shared) = &self.config.shared else {
            return Ok(());
        };
        let failed = |e: kv_remote::Error| PoolError::Shared {
            id: id.to_owned(),
            what,
            source: Box::new(e),
        };
        for seg in segments.iter().filter(|s| !known.contains(s)) {
            shared
                .remote
                .push_segment(&self.store, seg)
                .map_err(failed)?;
        }
        let record = Record {
            format: RECORD_FORMAT.to_owned(),
            version: RECORD_VERSION,
            host: shared.host.clone(),
            nonce: nonce(),
            change,
            segments: segments.to_vec(),
        };
        let value = serde_json::to_string(&record).map_err(|e| PoolError::SharedRecord {
            id: id.to_owned(),
            generation,
            detail: format!("cannot encode it ({e})"),
        })?;
        match shared
            .remote
            .propose(id, generation, &shared.host, &value)
            .map_err(failed)?
        {
            Decision::Won => Ok(()),
            Decision::Lost { winner } => {
                let host = Self::decode_record(id, generation, &winner)
                    .map_or_else(|_| "?".to_owned(), |r| r.host);
                Err(PoolError::Conflict {
                    id: id.to_owned(),
                    what,
                    generation,
                    host,
                })
            }
        }
    }

    /// The chain of agent `id`'s saved cache (empty when it has none).
    fn saved_chain(&self, id: &str) -> Result<Vec<SegmentId>> {
        let manifest = self.store.manifest(id).map_err(|source| PoolError::Cache {
            id: id.to_owned(),
            source: Box::new(source.into()),
        })?;
        Ok(manifest
            .map(|m| m.segments.into_iter().map(|s| s.id).collect())
            .unwrap_or_default())
    }

    /// Commits a new agent's creation (its cache saved as `id`, when it has one); returns
    /// the chain committed.
    pub(super) fn commit_create(
        &self,
        info: &AgentInfo,
        generation: u64,
    ) -> Result<Vec<SegmentId>> {
        let chain = self.saved_chain(&info.id)?;
        self.commit_shared(
            &info.id,
            generation,
            Change::Create(info.clone()),
            &chain,
            &[],
            "committing the creation",
        )?;
        Ok(chain)
    }

    /// Commits a transcript line of a shared agent, saving its cache first so that the record
    /// carries the K/V of the line's turn. A no-op for an agent that is not shared.
    pub(super) fn commit_line(
        &self,
        id: &str,
        info: &AgentInfo,
        agent: &mut Agent,
        entry: &Entry,
        what: &'static str,
    ) -> Result<()> {
        let empty = Transcript::default();
        let transcript = agent.transcript.as_ref().unwrap_or(&empty);
        let Some(generation) = Self::local_generation(info, transcript).map(|g| g + 1) else {
            return Ok(());
        };
        if self.config.shared.is_none() {
            return Ok(());
        }
        self.save_locked(id, agent)?;
        let chain = self.saved_chain(id)?;
        let mut line = transcript::encode_line(entry)?;
        line.pop();
        let line = String::from_utf8(line).map_err(|_| PoolError::SharedRecord {
            id: id.to_owned(),
            generation,
            detail: "a transcript line is not UTF-8".into(),
        })?;
        let known = agent.shared_chain.clone().unwrap_or_default();
        let result = self.commit_shared(id, generation, Change::Line(line), &chain, &known, what);
        if result.is_ok() {
            agent.shared_chain = Some(chain);
        }
        if matches!(result, Err(PoolError::Conflict { .. })) {
            // Bring this host up to date with the change that won, so the caller's next
            // request continues from it. Its own error, if any, is less useful than the
            // conflict's.
            let _ = self.pull_locked(id, info, agent);
        }
        result
    }

    /// Commits the deletion of shared agent `id`.
    pub(super) fn commit_delete(&self, id: &str, info: &AgentInfo, agent: &Agent) -> Result<()> {
        let empty = Transcript::default();
        let transcript = agent.transcript.as_ref().unwrap_or(&empty);
        let Some(generation) = Self::local_generation(info, transcript).map(|g| g + 1) else {
            return Ok(());
        };
        self.commit_shared(
            id,
            generation,
            Change::Delete,
            &[],
            &[],
            "committing the deletion",
        )
    }

    /// Applies to shared agent `id` the changes other hosts committed after its local copy.
    /// Returns `false` when one of them deleted it (the caller deletes the local copy). A
    /// store that cannot be reached leaves the local copy as it is (counted).
    pub(super) fn pull_locked(
        &self,
        id: &str,
        info: &AgentInfo,
        agent: &mut Agent,
    ) -> Result<bool> {
        let Some(shared) = &self.config.shared else {
            return Ok(true);
        };
        self.ensure_transcript(id, agent)?;
        let path = self.agent_dir(id).join(TRANSCRIPT_FILE);
        let mut adopt = None;
        let mut exists = true;
        loop {
            let transcript = agent.transcript.get_or_insert_with(Transcript::default);
            let Some(generation) = Self::local_generation(info, transcript).map(|g| g + 1) else {
                return Ok(true);
            };
            let value = match shared.remote.decided(id, generation) {
                Ok(Some(value)) => value,
                Ok(None) => break,
                Err(_) => {
                    lock(&self.state).counters.shared_unreachable += 1;
                    break;
                }
            };
            let record = Self::decode_record(id, generation, &value)?;
            let line = match &record.change {
                Change::Line(line) => line,
                Change::Delete => {
                    exists = false;
                    break;
                }
                Change::Create(_) => {
                    return Err(PoolError::SharedRecord {
                        id: id.to_owned(),
                        generation,
                        detail: "it creates an agent that exists".into(),
                    });
                }
            };
            let entry = transcript::decode_line(
                &path,
                transcript.turns.len() + transcript.deleted.len() + 1,
                line.as_bytes(),
                transcript.turns.len() as u64,
            )
            .map_err(|e| PoolError::SharedRecord {
                id: id.to_owned(),
                generation,
                detail: e.with_causes(),
            })?;
            if let Entry::Deleted(index) = entry
                && transcript.deleted.contains(&index)
            {
                return Err(PoolError::SharedRecord {
                    id: id.to_owned(),
                    generation,
                    detail: format!("it deletes turn {index}, which is deleted already"),
                });
            }
            transcript.append(&path, entry)?;
            lock(&self.state).counters.shared_changes += 1;
            if !record.segments.is_empty() {
                agent.shared_chain = Some(record.segments.clone());
                adopt = Some(record.segments);
            }
        }
        if let Some(chain) = adopt {
            self.adopt_shared(id, agent, &chain);
        }
        Ok(exists)
    }

    /// Makes `chain`, fetched from the shared store, agent `id`'s cache: its manifest, and
    /// its hot cache if it is hot. Best effort: when a segment cannot be fetched or the chain
    /// was made by another model or dtype, the agent keeps the cache it had (a turn computes
    /// what it lacks, or the cache is rebuilt from the transcript).
    pub(super) fn adopt_shared(&self, id: &str, agent: &mut Agent, chain: &[SegmentId]) -> bool {
        let Some(shared) = &self.config.shared else {
            return false;
        };
        for seg in chain {
            if shared.remote.fetch_segment(&self.store, seg).is_err() {
                lock(&self.state).counters.shared_unreachable += 1;
                return false;
            }
        }
        let Ok(loaded) = self.store.adopt(id, &self.meta, chain) else {
            return false;
        };
        lock(&self.state).counters.shared_adoptions += 1;
        if agent.cache.is_some() {
            // The adopted chain holds more of the conversation than the hot cache.
            match KvCache::import(&loaded, &self.meta, self.shape) {
                Ok(cache) => {
                    agent.cache = Some(cache);
                    agent.dirty = false;
                }
                Err(_) => {
                    agent.cache = None;
                    self.unrecord(id);
                }
            }
        }
        true
    }

    /// The transcript lines of `records` (a creation, then lines), each verified as a read of
    /// the transcript verifies it.
    fn checked_lines<'r>(
        &self,
        id: &str,
        info: &AgentInfo,
        records: &'r [Record],
    ) -> Result<Vec<&'r str>> {
        let generation = info.shared_generation.unwrap_or(0);
        let mut lines = Vec::new();
        let mut transcript = Transcript::default();
        let path = self.agent_dir(id).join(TRANSCRIPT_FILE);
        for (n, record) in records.iter().enumerate().skip(1) {
            let bad = |detail: String| PoolError::SharedRecord {
                id: id.to_owned(),
                generation: generation + n as u64,
                detail,
            };
            let Change::Line(line) = &record.change else {
                return Err(bad("not a transcript line".into()));
            };
            let entry =
                transcript::decode_line(&path, n, line.as_bytes(), transcript.turns.len() as u64)
                    .map_err(|e| bad(e.with_causes()))?;
            match entry {
                Entry::Turn(t) => transcript.turns.push(t),
                Entry::Deleted(index) => {
                    if !transcript.deleted.insert(index) {
                        return Err(bad(format!("it deletes turn {index} again")));
                    }
                }
            }
            lines.push(line.as_str());
        }
        Ok(lines)
    }

    /// Checks every agent on the shared store: that its changes parse and its transcript
    /// lines verify, and that each segment of its newest cache chain downloads whole and is
    /// the segment its name says. Changes nothing; an agent's problem is reported with it.
    pub fn verify_shared(&self) -> Result<Vec<SharedCheck>> {
        let Some(shared) = &self.config.shared else {
            return Ok(Vec::new());
        };
        let failed = |id: &str, e| PoolError::Shared {
            id: id.to_owned(),
            what: "verifying the store",
            source: Box::new(e),
        };
        let mut out = Vec::new();
        for id in shared.remote.list_heads().map_err(|e| failed("", e))? {
            let mut check = SharedCheck {
                id: id.clone(),
                ..SharedCheck::default()
            };
            let checked = (|| -> Result<()> {
                let walked = self.walk_shared(&id)?;
                check.changes = walked.last;
                let Some((info, records)) = walked.agent else {
                    check.deleted = true;
                    return Ok(());
                };
                check.turns = self.checked_lines(&id, &info, &records)?.len();
                let chain = records
                    .iter()
                    .rev()
                    .map(|r| &r.segments)
                    .find(|s| !s.is_empty());
                for seg in chain.into_iter().flatten() {
                    check.bytes += shared
                        .remote
                        .check_segment(seg)
                        .map_err(|e| failed(&id, e))?;
                    check.segments += 1;
                }
                Ok(())
            })();
            check.problem = checked.err().map(|e| e.with_causes());
            out.push(check);
        }
        Ok(out)
    }

    /// Deletes the segments on the shared store that no change of any existing agent names
    /// (a deleted agent's, or pushed for a change that lost), once they are older than
    /// `grace`: a change being committed pushes its segments before it is decided, and they
    /// must outlive that. Refuses, deleting nothing, when any agent's changes cannot be read.
    pub fn gc_shared(&self, grace: std::time::Duration) -> Result<kv_remote::RemoteGc> {
        let Some(shared) = &self.config.shared else {
            return Ok(kv_remote::RemoteGc::default());
        };
        let failed = |e| PoolError::Shared {
            id: String::new(),
            what: "collecting the store's segments",
            source: Box::new(e),
        };
        let mut keep = std::collections::HashSet::new();
        for id in shared.remote.list_heads().map_err(failed)? {
            if let Some((_, records)) = self.walk_shared(&id)?.agent {
                keep.extend(records.into_iter().flat_map(|r| r.segments));
            }
        }
        shared.remote.remove_segments(&keep, grace).map_err(failed)
    }

    /// Brings shared agent `id`, unknown here, from the shared store: its directory (its
    /// transcript as the store's changes hold it) and its cache, adopted from the last chain.
    pub(super) fn fetch_agent(&self, id: &str) -> Result<Arc<Slot>> {
        if self.config.shared.is_none() {
            return Err(self.unknown(id));
        }
        // Another call may be creating or fetching this id: wait for it to finish, then use
        // what it made (a bounded wait: a fetch is a few requests).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut reg = lock(&self.registry);
        loop {
            if let Some(slot) = reg.agents.get(id) {
                return Ok(Arc::clone(slot));
            }
            if reg.creating.insert(id.to_owned()) {
                break;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(self.unknown(id));
            }
            reg = self
                .created
                .wait_timeout(reg, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(reg);
        let result = self.fetch_reserved(id);
        let mut reg = lock(&self.registry);
        reg.creating.remove(id);
        self.created.notify_all();
        let slot = result?;
        reg.agents.insert(id.to_owned(), Arc::clone(&slot));
        Ok(slot)
    }

    fn fetch_reserved(&self, id: &str) -> Result<Arc<Slot>> {
        let walked = self.walk_shared(id)?;
        let Some((info, records)) = walked.agent else {
            return Err(self.unknown(id));
        };
        if self.agent_dir(id).exists() {
            // A local agent that is not shared, under the same id.
            return Err(PoolError::AlreadyExists {
                id: id.to_owned(),
                root: self.root.clone(),
            });
        }
        let lines = self.checked_lines(id, &info, &records)?;
        self.write_agent_dir(&info, &lines)?;
        let mut agent = Agent::default();
        if let Some(chain) = records
            .iter()
            .rev()
            .map(|r| &r.segments)
            .find(|s| !s.is_empty())
        {
            agent.shared_chain = Some(chain.clone());
            self.adopt_shared(id, &mut agent, chain);
        }
        lock(&self.state).counters.shared_changes += records.len() as u64;
        Ok(Arc::new(Slot {
            id: id.to_owned(),
            info: Ok(info),
            state: std::sync::Mutex::new(agent),
        }))
    }
}
