//! `agentkv agents`: list, show, remove, verify and garbage-collect the agents on disk.

use std::sync::Arc;

use agent_pool::{AgentInfo, AgentPool, AgentSummary, PoolError, PoolView, Turn};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use engine::Engine;

use crate::Env;
use crate::ui::{self, Table};

/// What to do with the agents.
#[derive(Subcommand)]
pub enum AgentsCommand {
    /// Every agent with its turns, cached tokens, bytes on disk and last use.
    List,
    /// An agent's system prompt and transcript.
    Show {
        /// The agent's id.
        agent: String,
    },
    /// Delete an agent: transcript, cache, and the segments no other agent shares.
    Rm {
        /// The agent's id.
        agent: String,
    },
    /// Read every agent's cache and check every segment's checksums and fingerprints; with
    /// --store, also every agent on the shared store (its changes, and each segment of its
    /// newest cache, downloaded).
    Verify,
    /// Delete segments no cache references, and leftovers of interrupted saves; with --store,
    /// also the segments on the shared store no existing agent's changes name.
    Gc {
        /// With --store: keep unreferenced shared segments younger than this many seconds
        /// (a change being committed by another host pushes its segments before it is
        /// decided).
        #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
        grace_secs: u64,
    },
}

/// Runs an `agents` subcommand on the everyday pool.
pub fn run(env: &Env, command: &AgentsCommand) -> Result<()> {
    let root = env.pool_root();
    if let AgentsCommand::Gc { grace_secs } = command {
        // Straight to the store, without the model or the pool: opening a pool collects
        // garbage itself, which would leave nothing to report.
        let kv = root.join("kv");
        let store = kv_store::Store::open(&kv)
            .with_context(|| format!("opening the cache store {}", kv.display()))?;
        let report = store.gc().context("collecting unreferenced segments")?;
        println!(
            "freed {} ({} segments, {} temporary files)",
            ui::bytes(report.bytes_freed),
            report.segments_removed,
            report.temp_files_removed
        );
        if env.shared.is_some() {
            let engine = env.engine()?;
            let pool = env.pool(&root, engine)?;
            let report = pool
                .gc_shared(std::time::Duration::from_secs(*grace_secs))
                .context("collecting unreferenced segments on the shared store")?;
            println!(
                "shared store: freed {} ({} segments; kept {} referenced, {} unreferenced but \
                 younger than {grace_secs} s)",
                ui::bytes(report.bytes_freed),
                report.removed,
                report.kept,
                report.recent
            );
        }
        return Ok(());
    }
    let engine = env.engine()?;
    let meta = engine.cache_meta(env.kv_dtype);
    let pool = match AgentPool::open(&root, Arc::clone(&engine), env.pool_config()) {
        Ok(pool) => Pool::Open(Box::new(pool)),
        // A server (or a chat) holds the pool: read its files instead, changing nothing.
        Err(PoolError::Locked { .. }) if !matches!(command, AgentsCommand::Rm { .. }) => {
            Pool::View(
                PoolView::open(&root)
                    .with_context(|| format!("reading the agent pool in {}", root.display()))?,
            )
        }
        Err(e @ PoolError::Locked { .. }) => {
            return Err(e).context(
                "a running `agentkv serve` holds the pool: delete through it \
                 (DELETE /agentkv/agents/NAME), or stop it first",
            );
        }
        Err(e) => {
            return Err(e).with_context(|| format!("opening the agent pool in {}", root.display()));
        }
    };
    match command {
        AgentsCommand::List => {
            let agents = pool.list()?;
            if agents.is_empty() {
                println!(
                    "no agents in {}: `agentkv chat --agent NAME` creates one",
                    root.display()
                );
                return Ok(());
            }
            let mut table = Table::new(
                &[
                    "agent",
                    "type",
                    "turns",
                    "cached tok",
                    "kv",
                    "on disk",
                    "last use",
                ],
                2,
            );
            for a in agents {
                let Some(info) = a.info else {
                    table.row(vec![
                        a.id,
                        format!("damaged: {}", a.damage.unwrap_or_default()),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                    ]);
                    continue;
                };
                let (turns, last) = match pool.transcript(&a.id) {
                    Ok(t) => (
                        t.len().to_string(),
                        t.last().map_or(info.created_unix_ms, |t| t.unix_ms),
                    ),
                    Err(_) => ("damaged".to_owned(), info.created_unix_ms),
                };
                let manifest = pool.store().manifest(&a.id).ok().flatten();
                let (tokens, dtype) = manifest.map_or(("-".to_owned(), "-".to_owned()), |m| {
                    (m.n_tokens.to_string(), m.meta.dtype.to_string())
                });
                let transcript_bytes =
                    std::fs::metadata(root.join("agents").join(&a.id).join("transcript.jsonl"))
                        .map_or(0, |m| m.len());
                let cache_bytes = pool.store().disk_bytes(&a.id).unwrap_or(0);
                table.row(vec![
                    a.id,
                    info.agent_type,
                    turns,
                    tokens,
                    dtype,
                    ui::bytes(cache_bytes + transcript_bytes),
                    ui::ago(last),
                ]);
            }
            table.print();
            if !env.quiet {
                println!("(on disk: cache segments, shared ones counted in full, plus transcript)");
            }
        }
        AgentsCommand::Show { agent } => {
            let info = pool.info(agent)?;
            let turns = pool.transcript(agent)?;
            println!(
                "agent {} ({})\nsystem: {}\n",
                info.id, info.agent_type, info.system_prompt
            );
            for t in turns {
                println!(
                    "[{}] user: {}\n[{}] {}: {}\n",
                    t.index,
                    t.user(),
                    t.index,
                    info.id,
                    t.reply
                );
            }
        }
        AgentsCommand::Rm { agent } => {
            let Pool::Open(pool) = &pool else {
                bail!("the pool is in use by another process: stop it first");
            };
            pool.delete(agent)?;
            println!("removed agent {agent}");
        }
        AgentsCommand::Verify => {
            let mut bad = 0;
            for a in pool.list()? {
                let verdict = match pool.store().load_any(&a.id) {
                    Err(kv_store::Error::NotFound { .. }) => {
                        "no cache saved (rebuilt from the transcript on next use)".to_owned()
                    }
                    Err(e) => {
                        bad += 1;
                        format!("DAMAGED: {:#}", anyhow::Error::new(e))
                    }
                    Ok(loaded) => match meta.first_difference(loaded.meta()) {
                        None => format!(
                            "ok: {} tokens in {} segments, checksums verified",
                            loaded.len(),
                            loaded.segments().len()
                        ),
                        Some((field, want, found)) => format!(
                            "ok but made by another model ({field}: {found}, this model: {want}): \
                             rebuilt from the transcript on next use"
                        ),
                    },
                };
                let transcript = match pool.transcript(&a.id) {
                    Ok(t) => format!("transcript ok ({} turns)", t.len()),
                    Err(e) => {
                        bad += 1;
                        format!("transcript DAMAGED: {}", e.with_causes())
                    }
                };
                println!("{}: {verdict}; {transcript}", a.id);
            }
            if env.shared.is_some() {
                let Pool::Open(pool) = &pool else {
                    bail!(
                        "the pool is in use by another process: stop it to verify the shared store"
                    );
                };
                for check in pool.verify_shared()? {
                    let verdict = match &check.problem {
                        Some(problem) => {
                            bad += 1;
                            format!("DAMAGED: {problem}")
                        }
                        None if check.deleted => format!("deleted ({} changes)", check.changes),
                        None => format!(
                            "ok: {} changes, {} transcript lines, {} segments ({}) downloaded and \
                             verified",
                            check.changes,
                            check.turns,
                            check.segments,
                            ui::bytes(check.bytes)
                        ),
                    };
                    println!("shared {}: {verdict}", check.id);
                }
            }
            if bad > 0 {
                bail!("{bad} problems found: `agentkv agents rm NAME` removes a damaged agent");
            }
        }
        AgentsCommand::Gc { .. } => {} // handled above
    }
    Ok(())
}

/// The pool, opened, or only read while another process holds it.
enum Pool {
    Open(Box<AgentPool<Engine>>),
    View(PoolView),
}

impl Pool {
    fn list(&self) -> Result<Vec<AgentSummary>> {
        match self {
            Pool::Open(p) => Ok(p.list()),
            Pool::View(v) => Ok(v.list()?),
        }
    }

    fn info(&self, id: &str) -> agent_pool::Result<AgentInfo> {
        match self {
            Pool::Open(p) => p.info(id),
            Pool::View(v) => v.info(id),
        }
    }

    fn transcript(&self, id: &str) -> agent_pool::Result<Vec<Turn>> {
        match self {
            Pool::Open(p) => p.transcript(id),
            Pool::View(v) => v.transcript(id),
        }
    }

    fn store(&self) -> &kv_store::Store {
        match self {
            Pool::Open(p) => p.store(),
            Pool::View(v) => v.store(),
        }
    }
}
