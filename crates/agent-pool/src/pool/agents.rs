//! Agents as a whole: creating one (computed first, then its directory renamed into place),
//! deleting one, listing them.

use std::fs;
use std::sync::{Arc, Mutex};

use kv_store::durable_fs;

use super::{Agent, AgentPool, AgentSummary, CreateReport, Slot, lock};
use crate::backend::Backend;
use crate::error::{PoolError, Result, validate_id};
use crate::files::{self, AgentInfo};
use crate::transcript::{self, TRANSCRIPT_FILE, Transcript};

impl<B: Backend + ?Sized> AgentPool<B> {
    /// Creates agent `id` with a type label and a system prompt, durably, and makes it hot.
    ///
    /// The rendered system message becomes the first segment of the agent's cache, saved at
    /// once: agents created later with the same system prompt (under the same model and
    /// dtype) find it on disk and start from it instead of computing it
    /// ([`CreateReport::adopted`]). The agent exists once its directory is renamed into
    /// place; a crash before that leaves nothing (litter removed at the next open).
    pub fn create_agent(
        &self,
        id: &str,
        agent_type: &str,
        system_prompt: &str,
    ) -> Result<CreateReport> {
        validate_id(id)?;
        {
            let mut reg = lock(&self.registry);
            if reg.agents.contains_key(id)
                || reg.creating.contains(id)
                || self.agent_dir(id).exists()
            {
                return Err(PoolError::AlreadyExists {
                    id: id.to_owned(),
                    root: self.root.clone(),
                });
            }
            reg.creating.insert(id.to_owned());
        }
        let result = self.create_reserved(id, agent_type, system_prompt);
        let mut reg = lock(&self.registry);
        reg.creating.remove(id);
        self.created.notify_all();
        let (slot, report) = result?;
        reg.agents.insert(id.to_owned(), Arc::clone(&slot));
        drop(reg);
        {
            let agent = lock(&slot.state);
            self.record(&slot, &agent);
        }
        self.enforce();
        Ok(report)
    }

    fn create_reserved(
        &self,
        id: &str,
        agent_type: &str,
        system_prompt: &str,
    ) -> Result<(Arc<Slot>, CreateReport)> {
        let mut info = AgentInfo {
            id: id.to_owned(),
            agent_type: agent_type.to_owned(),
            system_prompt: system_prompt.to_owned(),
            created_unix_ms: files::now_unix_ms(),
            shared_generation: None,
        };
        if self.config.shared.is_some() {
            // The id must be free on the shared store too; the creation is its next change.
            let walked = self.walk_shared(id)?;
            if walked.agent.is_some() {
                return Err(PoolError::AlreadyExists {
                    id: id.to_owned(),
                    root: self.root.clone(),
                });
            }
            info.shared_generation = Some(walked.last + 1);
        }
        // Compute first: an engine failure must not leave a half-made agent behind.
        let (cache, system_tokens, adopted) = self.start_cache(id, &info)?;
        let mut cache_saved = adopted;
        let mut shared_chain = None;
        let save = |cache_saved: &mut bool| {
            if !adopted && !cache.is_empty() {
                // Memory holds the bits the file holds: agents that adopt this system prompt
                // start from the same values as this one.
                match cache.save(&self.store, id, &self.meta) {
                    Ok(_) => *cache_saved = true,
                    Err(_) => lock(&self.state).counters.save_errors += 1,
                }
            }
        };
        if let Some(generation) = info.shared_generation {
            // Shared: the cache is saved (so its segments can be pushed) and the creation
            // committed on the store before the agent exists here.
            save(&mut cache_saved);
            let committed = self.commit_create(&info, generation).and_then(|chain| {
                self.write_agent_dir(&info, &[])?;
                Ok(chain)
            });
            match committed {
                Ok(chain) => shared_chain = Some(chain),
                Err(e) => {
                    let _ = self.store.delete(id);
                    return Err(e);
                }
            }
        } else {
            if let Err(e) = self.write_agent_dir(&info, &[]) {
                if adopted {
                    // The adoption wrote a manifest for an agent that does not exist.
                    let _ = self.store.delete(id);
                }
                return Err(e);
            }
            save(&mut cache_saved);
        }
        {
            let mut st = lock(&self.state);
            if cache_saved && !adopted {
                st.counters.saves += 1;
            }
            if adopted {
                st.counters.adoptions += 1;
            }
        }
        let agent = Agent {
            transcript: Some(Transcript::default()),
            dirty: !cache_saved,
            cache: Some(cache),
            deleted: false,
            shared_chain,
            fresh_system: (!adopted).then_some(system_tokens),
        };
        let slot = Arc::new(Slot {
            id: id.to_owned(),
            info: Ok(info),
            state: Mutex::new(agent),
        });
        Ok((
            slot,
            CreateReport {
                system_tokens,
                adopted,
                cache_saved,
            },
        ))
    }

    /// Writes `agents/<id>/` (its transcript holding `lines`) under a temporary name and
    /// renames it into place.
    pub(super) fn write_agent_dir(&self, info: &AgentInfo, lines: &[&str]) -> Result<()> {
        let agents = self.root.join("agents");
        let tmp = durable_fs::temp_path(&agents, &format!("create-{}", info.id));
        let result = (|| {
            fs::create_dir(&tmp).map_err(|e| PoolError::io("create directory", &tmp, e))?;
            let agent_file = tmp.join(files::AGENT_FILE);
            durable_fs::write_new(&agent_file, &files::encode_agent(info)?)
                .map_err(PoolError::fs)?;
            transcript::create(&tmp.join(TRANSCRIPT_FILE), lines)?;
            durable_fs::sync_dir(&tmp).map_err(PoolError::fs)?;
            let dest = self.agent_dir(&info.id);
            fs::rename(&tmp, &dest).map_err(|e| PoolError::io("rename into place", &dest, e))?;
            durable_fs::sync_dir(&agents)
                .map_err(PoolError::fs)
                .inspect_err(|_| {
                    // Not durable, so not created: undo, so memory and disk agree.
                    let _ = fs::rename(&dest, &tmp);
                })
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Deletes agent `id`: its directory (transcript included), its cache's manifest, and the
    /// segments no other agent shares. Waits for a generation in progress on it to finish.
    pub fn delete(&self, id: &str) -> Result<()> {
        let slot = self.slot(id)?;
        let (mut agent, info) = match self.lock_agent(&slot) {
            Ok(locked) => locked,
            // A damaged agent.json: the agent can still be deleted here.
            Err(PoolError::CorruptAgentFile { .. }) => {
                let mut agent = lock(&slot.state);
                return self.remove_local(id, &mut agent);
            }
            Err(e) => return Err(e),
        };
        // Shared: committed on the store first (lock_agent read the transcript); every host
        // then deletes its copy.
        self.commit_delete(id, info, &agent)?;
        self.remove_local(id, &mut agent)
    }

    /// Deletes agent `id`'s local copy: directory, manifest, and the segments no other agent
    /// shares.
    pub(super) fn remove_local(&self, id: &str, agent: &mut Agent) -> Result<()> {
        if agent.deleted {
            return Err(self.unknown(id));
        }
        // The rename is the commit point: a crash after it leaves litter that open removes.
        let agents = self.root.join("agents");
        let dir = self.agent_dir(id);
        let doomed = durable_fs::temp_path(&agents, &format!("delete-{id}"));
        fs::rename(&dir, &doomed).map_err(|e| PoolError::io("rename", &dir, e))?;
        let synced = durable_fs::sync_dir(&agents).map_err(PoolError::fs);
        agent.deleted = true;
        agent.cache = None;
        agent.transcript = None;
        self.unrecord(id);
        lock(&self.registry).agents.remove(id);
        let _ = fs::remove_dir_all(&doomed);
        // Best effort: a leftover manifest or segment is only disk space (gc reclaims it), and
        // an agent created later under this id overwrites the manifest.
        let _ = self.store.delete(id);
        let _ = self.store.gc();
        synced
    }

    /// Every agent, sorted by id.
    pub fn list(&self) -> Vec<AgentSummary> {
        let slots: Vec<Arc<Slot>> = lock(&self.registry).agents.values().cloned().collect();
        let st = lock(&self.state);
        slots
            .iter()
            .map(|s| AgentSummary {
                id: s.id.clone(),
                info: s.info.as_ref().ok().cloned(),
                damage: s.info.as_ref().err().cloned(),
                hot: st.hot.contains(&s.id),
            })
            .collect()
    }

    /// Agent `id`'s system prompt, type and creation time.
    pub fn info(&self, id: &str) -> Result<AgentInfo> {
        let slot = self.slot(id)?;
        let (_guard, info) = self.lock_agent(&slot)?;
        Ok(info.clone())
    }
}
