//! Talking to one agent: the `chat` REPL and one-shot `run`. Both create the agent on first
//! use and resume its memory (transcript and KV cache) after that.

use std::io::BufRead;
use std::path::PathBuf;

use agent_pool::{AgentPool, PoolError, Reply};
use anyhow::{Context, Result};
use clap::Args;
use engine::{Engine, GenerateOptions};

use crate::Env;
use crate::ui;

const DEFAULT_SYSTEM: &str = "You are a helpful, concise assistant.";

/// The agent and its system prompt, shared by `chat` and `run`.
#[derive(Args)]
pub struct AgentArgs {
    /// The agent's id: 1 to 64 characters of [a-z0-9_-].
    #[arg(long)]
    agent: String,
    /// System prompt for a new agent (ignored, with a note, when the agent exists).
    #[arg(long, conflicts_with = "system_file")]
    system: Option<String>,
    /// Read the system prompt for a new agent from a file.
    #[arg(long, value_name = "PATH")]
    system_file: Option<PathBuf>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
}

/// Arguments of `agentkv chat`.
#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    agent: AgentArgs,
}

/// Arguments of `agentkv run`.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// Print one JSON object (reply, token counts, timings) instead of the streamed text.
    #[arg(long)]
    json: bool,
    /// The user's message.
    prompt: String,
}

/// Opens the everyday pool and makes sure the agent exists.
fn open(env: &Env, args: &AgentArgs) -> Result<(std::sync::Arc<Engine>, AgentPool<Engine>)> {
    let system = match (&args.system, &args.system_file) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(path)) => Some(std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading the system prompt file {} (--system-file): pass a readable \
                         file, or the prompt itself with --system",
                path.display()
            )
        })?),
        (None, None) => None,
    };
    let engine = env.chat_engine()?;
    let pool = env.pool(&env.pool_root(), std::sync::Arc::clone(&engine))?;
    match pool.info(&args.agent) {
        Ok(info) => {
            if system.as_ref().is_some_and(|s| *s != info.system_prompt) && !env.quiet {
                eprintln!(
                    "note: agent {} exists; keeping its system prompt (`agentkv agents rm {}` to start over)",
                    args.agent, args.agent
                );
            }
        }
        Err(PoolError::UnknownAgent { .. }) => {
            let system = system.unwrap_or_else(|| DEFAULT_SYSTEM.to_owned());
            let spinner = ui::spinner(env.quiet, format!("creating agent {}", args.agent));
            pool.create_agent(&args.agent, "chat", &system)
                .with_context(|| format!("creating agent {}", args.agent))?;
            spinner.finish_and_clear();
            if !env.quiet {
                eprintln!("created agent {} in {}", args.agent, pool.root().display());
            }
        }
        Err(e) => return Err(e).with_context(|| format!("opening agent {}", args.agent)),
    }
    Ok((engine, pool))
}

/// One turn, streaming the reply to stdout when `stream`, with a spinner until the first
/// piece of text (that wait is loading the cache and prefilling the prompt).
pub fn turn(
    env: &Env,
    pool: &AgentPool<Engine>,
    id: &str,
    input: &str,
    options: &GenerateOptions,
    stream: bool,
) -> Result<Reply> {
    let spinner = ui::spinner(env.quiet || !stream, "thinking".to_owned());
    let mut first = true;
    let reply = pool
        .generate(id, input, options, &mut |piece| {
            if first {
                spinner.finish_and_clear();
                first = false;
            }
            if stream {
                ui::stream(piece);
            }
        })
        .with_context(|| format!("running a turn of agent {id}"));
    spinner.finish_and_clear();
    let reply = reply?;
    if stream {
        println!();
    }
    Ok(reply)
}

/// `agentkv run`.
pub fn run(env: &Env, args: &RunArgs) -> Result<()> {
    let (_engine, pool) = open(env, &args.agent)?;
    let options = GenerateOptions {
        max_tokens: args.agent.max_tokens,
        ..GenerateOptions::default()
    };
    let reply = turn(
        env,
        &pool,
        &args.agent.agent,
        &args.prompt,
        &options,
        !args.json,
    )?;
    pool.flush().context("saving the agent's cache")?;
    if args.json {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let out = serde_json::json!({
            "agent": args.agent.agent,
            "turn": reply.turn,
            "reply": reply.text,
            "prompt_tokens": reply.prompt_tokens,
            "reused_tokens": reply.reused_tokens,
            "generated_tokens": reply.tokens.len(),
            "resumed_from_disk": reply.resumed_from_disk,
            "rebuilt": reply.rebuilt.as_ref().map(|r| r.detail.clone()),
            "timings_ms": {
                "load": ms(reply.timings.load),
                "prefill": ms(reply.timings.prefill),
                "decode": ms(reply.timings.decode),
                "commit": ms(reply.timings.commit),
            },
        });
        println!("{out}");
    } else if !env.quiet {
        note_reply(&reply);
    }
    Ok(())
}

fn note_reply(reply: &Reply) {
    if let Some(r) = &reply.rebuilt {
        eprintln!("note: cache rebuilt from the transcript ({})", r.detail);
    }
    eprintln!(
        "[{} prompt tokens, {} reused; load {} ms, prefill {} ms, {} tokens in {} ms]",
        reply.prompt_tokens,
        reply.reused_tokens,
        ui::ms(reply.timings.load),
        ui::ms(reply.timings.prefill),
        reply.tokens.len(),
        ui::ms(reply.timings.decode)
    );
}

const HELP: &str =
    "commands: /stats  /save  /reset (drop the cache, keep the transcript)  /history  /quit";

/// `agentkv chat`.
pub fn chat(env: &Env, args: &ChatArgs) -> Result<()> {
    let (_engine, pool) = open(env, &args.agent)?;
    let id = args.agent.agent.as_str();
    let options = GenerateOptions {
        max_tokens: args.agent.max_tokens,
        ..GenerateOptions::default()
    };
    if !env.quiet {
        let turns = pool.transcript(id)?.len();
        eprintln!("agent {id}: {turns} turns so far. {HELP}");
    }
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.context("reading stdin")?;
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/help" => println!("{HELP}"),
            "/stats" => stats(&pool, id)?,
            "/save" => match pool.save_agent(id)? {
                Some(r) => println!(
                    "saved: {} new tokens ({} bytes written), {} already on disk",
                    r.new_tokens, r.bytes_written, r.reused_tokens
                ),
                None => println!("nothing to save"),
            },
            "/reset" => {
                // Evicting saves the cache; deleting its manifest then makes the next turn
                // rebuild it from the transcript, which stays as it is.
                pool.evict(id)?;
                pool.store()
                    .delete(id)
                    .with_context(|| format!("dropping the cache of {id}"))?;
                println!("cache dropped; the next turn rebuilds it from the transcript");
            }
            "/history" => {
                for t in pool.transcript(id)? {
                    println!(
                        "[{}] user: {}\n[{}] {id}: {}",
                        t.index,
                        t.user(),
                        t.index,
                        t.reply
                    );
                }
            }
            cmd if cmd.starts_with('/') => println!("unknown command {cmd}. {HELP}"),
            input => {
                let reply = turn(env, &pool, id, input, &options, true)?;
                if !env.quiet {
                    note_reply(&reply);
                }
            }
        }
    }
    pool.flush().context("saving the agent's cache")?;
    Ok(())
}

fn stats(pool: &AgentPool<Engine>, id: &str) -> Result<()> {
    let stats = pool.stats();
    let turns = pool.transcript(id)?.len();
    let hot = stats.hot.iter().find(|h| h.id == id);
    println!(
        "agent {id}: {turns} turns; cache {}",
        match hot {
            Some(h) => format!(
                "in memory: {} tokens, {}{}",
                h.tokens,
                ui::bytes(h.bytes as u64),
                if h.dirty { ", not saved yet" } else { "" }
            ),
            None => "on disk only".to_owned(),
        }
    );
    if let Ok(bytes) = pool.store().disk_bytes(id) {
        println!("on disk: {}", ui::bytes(bytes));
    }
    println!(
        "pool: {} agents, {} hot of at most {}, KV {} of {}, weights {}{}",
        stats.agents,
        stats.hot.len(),
        stats.max_hot,
        ui::bytes(stats.kv_bytes as u64),
        ui::bytes(stats.kv_budget_bytes as u64),
        ui::bytes(stats.weight_bytes as u64),
        stats
            .rss_bytes
            .map(|r| format!(", RSS {}", ui::bytes(r)))
            .unwrap_or_default()
    );
    let c = stats.counters;
    println!(
        "counters: {} turns, {} loads, {} rebuilds, {} saves, {} evictions",
        c.turns, c.loads, c.rebuilds, c.saves, c.evictions
    );
    Ok(())
}
