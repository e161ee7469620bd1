//! Agent heads: which state is the newest of each agent, decided across hosts without
//! conditional writes.
//!
//! Every advance of a named agent is a *generation* (1, 2, ...), and each generation is
//! decided once, by single-decree Disk Paxos (Gafni and Lamport, 2003) over the bucket: each
//! host owns one object per (agent, generation), `heads/<name>/<generation>/<host>`, which
//! only it writes, and reads the others' by listing that prefix. A host proposing a value
//! writes its ballot, reads every other block, adopts the value of the highest accepted ballot
//! it saw (or keeps its own), writes it as accepted, reads every block again, and has decided
//! when no block showed a higher ballot at either read. It then writes the decision to
//! `heads/<name>/<generation>/decided` (every decider writes the same bytes) so that readers
//! need one GET. docs/format.md, "Agent heads", gives the argument that two hosts never
//! decide different values: it needs only that a completed PUT is seen by every later GET and
//! LIST (AWS S3, and Garage's default consistent mode with its quorums), not conditional
//! writes, which Garage 2.5 ignores.

use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Error, Remote, Result};

/// A ballot: a round number, then the host that owns it (which makes ballots of different
/// hosts different). Compared round first, then host name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Ballot(u64, String);

/// A host's block for one (agent, generation).
#[derive(Serialize, Deserialize)]
struct Block {
    /// The highest ballot this host has started.
    mbal: Ballot,
    /// The ballot of the value it last accepted, if any.
    bal: Option<Ballot>,
    /// That value.
    value: Option<Box<RawValue>>,
}

/// How a proposal ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// This host's value is the generation's.
    Won,
    /// Another value is: the generation was advanced by another host (or by an earlier
    /// attempt of this one whose value differed).
    Lost {
        /// The value that was decided.
        winner: String,
    },
}

/// The most attempts a proposal makes against other hosts' higher ballots before giving up
/// with [`Error::Contended`].
const MAX_ATTEMPTS: u32 = 30;

impl Remote {
    fn generation_dir(&self, name: &str, generation: u64) -> ObjectPath {
        self.key(&format!("heads/{name}/{generation:020}"))
    }

    fn put_json(&self, key: &ObjectPath, bytes: Vec<u8>) -> Result<()> {
        self.run(self.store.put(key, PutPayload::from(bytes)))
            .map(drop)
            .map_err(|e| self.failed("write", key, e))
    }

    fn get_opt(&self, key: &ObjectPath) -> Result<Option<Vec<u8>>> {
        self.run(self.fetch_opt(key))
            .map_err(|e| self.failed("read", key, e))
    }

    /// The object at `key`, or `None` if there is none.
    async fn fetch_opt(&self, key: &ObjectPath) -> object_store::Result<Option<Vec<u8>>> {
        match self.store.get(key).await {
            Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A decided value read from `key`, as text.
    fn decided_text(key: &ObjectPath, bytes: Vec<u8>) -> Result<String> {
        String::from_utf8(bytes).map_err(|_| Error::Head {
            key: key.to_string(),
            detail: "the decided value is not UTF-8 text".into(),
        })
    }

    /// Every block of (name, generation) but `host`'s.
    fn other_blocks(&self, dir: &ObjectPath, host: &str) -> Result<Vec<Block>> {
        let listed: Vec<object_store::ObjectMeta> = self
            .run(self.store.list(Some(dir)).try_collect())
            .map_err(|e| self.failed("list", dir, e))?;
        let mut blocks = Vec::new();
        for meta in listed {
            let Some(file) = meta.location.filename() else {
                continue;
            };
            if file == host || file == "decided" {
                continue;
            }
            let Some(bytes) = self.get_opt(&meta.location)? else {
                continue;
            };
            let block: Block = serde_json::from_slice(&bytes).map_err(|e| Error::Head {
                key: meta.location.to_string(),
                detail: format!("a host's block does not parse ({e})"),
            })?;
            blocks.push(block);
        }
        Ok(blocks)
    }

    /// The value decided for generation `generation` of agent `name`, if the decision has
    /// been recorded.
    pub fn decided(&self, name: &str, generation: u64) -> Result<Option<String>> {
        kv_store::validate_name(name)?;
        let key = self.generation_dir(name, generation).join("decided");
        self.get_opt(&key)?
            .map(|bytes| Self::decided_text(&key, bytes))
            .transpose()
    }

    /// The decided values of generations `from`, `from + 1`, ... of agent `name`, up to the
    /// first without a recorded decision and at most `max` of them, read up to 16 at a time
    /// concurrently (an agent's history is one object per change).
    pub fn decided_from(&self, name: &str, from: u64, max: usize) -> Result<Vec<String>> {
        kv_store::validate_name(name)?;
        let mut out = Vec::new();
        let mut next = from.max(1);
        while out.len() < max {
            let batch = (max - out.len()).min(16) as u64;
            let keys: Vec<ObjectPath> = (next..next + batch)
                .map(|g| self.generation_dir(name, g).join("decided"))
                .collect();
            let values = self.run(futures_util::future::join_all(
                keys.iter().map(|key| self.fetch_opt(key)),
            ));
            for (key, value) in keys.iter().zip(values) {
                let value = value.map_err(|e| self.failed("read", key, e))?;
                let Some(bytes) = value else {
                    return Ok(out);
                };
                out.push(Self::decided_text(key, bytes)?);
            }
            next += batch;
        }
        Ok(out)
    }

    /// The newest generation of agent `name` whose decision is recorded, with its value,
    /// starting the search at `from` (a generation known to be decided, or 0): the first
    /// generation after it without a recorded decision ends the search.
    pub fn latest(&self, name: &str, from: u64) -> Result<Option<(u64, String)>> {
        let mut found = None;
        let mut g = from.max(1);
        while let Some(value) = self.decided(name, g)? {
            found = Some((g, value));
            g += 1;
        }
        Ok(found)
    }

    /// Proposes `value` (JSON text) as generation `generation` of agent `name`, on behalf of
    /// `host` (1 to 64 characters of `[a-z0-9_-]`, unique among the hosts sharing the store).
    ///
    /// Returns [`Decision::Won`] when `value` is the generation's decided value, and
    /// [`Decision::Lost`] with the decided value otherwise: two hosts proposing one generation
    /// at once never both win. A value must tell its writer apart (include the host and a
    /// nonce), or two hosts proposing equal bytes would both be told they won.
    pub fn propose(
        &self,
        name: &str,
        generation: u64,
        host: &str,
        value: &str,
    ) -> Result<Decision> {
        kv_store::validate_name(name)?;
        kv_store::validate_name(host).map_err(|e| Error::Config {
            url: self.url.clone(),
            detail: format!("host name: {e}"),
        })?;
        let value = RawValue::from_string(value.to_owned()).map_err(|e| Error::Config {
            url: self.url.clone(),
            detail: format!("a head value must be JSON: {e}"),
        })?;
        let dir = self.generation_dir(name, generation);
        let mine = dir.clone().join(host);
        let decided_key = dir.clone().join("decided");
        let outcome = |decided: &str| {
            if decided == value.get() {
                Decision::Won
            } else {
                Decision::Lost {
                    winner: decided.to_owned(),
                }
            }
        };
        if let Some(decided) = self.decided(name, generation)? {
            return Ok(outcome(&decided));
        }
        // What this host wrote before (a retry after a crash keeps its accepted value).
        let mut own: Block = match self.get_opt(&mine)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Head {
                key: mine.to_string(),
                detail: format!("this host's block does not parse ({e})"),
            })?,
            None => Block {
                mbal: Ballot(0, host.to_owned()),
                bal: None,
                value: None,
            },
        };
        // Writes this host's block, then reads the others': `Err(round)` when one of them
        // started a higher ballot, and this attempt must give way.
        let exchange = |own: &Block| -> Result<std::result::Result<Vec<Block>, u64>> {
            self.put_json(&mine, encode(own)?)?;
            let others = self.other_blocks(&dir, host)?;
            Ok(match highest_above(&others, &own.mbal) {
                Some(round) => Err(round),
                None => Ok(others),
            })
        };
        let mut round = own.mbal.0 + 1;
        for attempt in 0..MAX_ATTEMPTS {
            let ballot = Ballot(round, host.to_owned());
            // Phase 1: announce the ballot, learn what others accepted.
            own.mbal = ballot.clone();
            let others = match exchange(&own)? {
                Ok(others) => others,
                Err(higher) => {
                    round = higher + 1;
                    backoff(attempt);
                    continue;
                }
            };
            let adopted = std::iter::once(&own)
                .chain(&others)
                .filter_map(|b| Some((b.bal.as_ref()?, b.value.as_ref()?)))
                .max_by(|a, b| a.0.cmp(b.0))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| value.clone());
            // Phase 2: accept it, and check that no higher ballot started meanwhile.
            own.bal = Some(ballot);
            own.value = Some(adopted.clone());
            if let Err(higher) = exchange(&own)? {
                round = higher + 1;
                backoff(attempt);
                continue;
            }
            // Decided. Every decider of this generation writes these same bytes.
            self.put_json(&decided_key, adopted.get().as_bytes().to_vec())?;
            return Ok(outcome(adopted.get()));
        }
        Err(Error::Contended {
            name: name.to_owned(),
            generation,
            attempts: MAX_ATTEMPTS,
        })
    }
}

/// The round of the highest ballot in `blocks` above `ballot`, if any: another host started a
/// later ballot, and this one must give way.
fn highest_above(blocks: &[Block], ballot: &Ballot) -> Option<u64> {
    blocks
        .iter()
        .map(|b| &b.mbal)
        .filter(|m| *m > ballot)
        .max()
        .map(|m| m.0)
}

fn encode(block: &Block) -> Result<Vec<u8>> {
    serde_json::to_vec(block).map_err(|e| Error::Head {
        key: String::new(),
        detail: format!("cannot encode a block ({e})"),
    })
}

/// Waits before the next attempt: random, growing with the attempt, so that two hosts that
/// keep interrupting each other stop doing so.
fn backoff(attempt: u32) {
    use std::hash::{BuildHasher, RandomState};
    let jitter = RandomState::new().hash_one(attempt) % 20;
    let ms = (5 + jitter) * u64::from(attempt.min(10) + 1);
    std::thread::sleep(Duration::from_millis(ms));
}
