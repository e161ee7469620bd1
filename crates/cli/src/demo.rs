//! The two-session demo: three agents answer in one process and are saved; a second process
//! resumes them from disk and measures that against re-prefilling the same history from
//! scratch, in the same run. Every figure printed is measured, none estimated.

use std::time::{Duration, Instant};

use agent_pool::{AgentPool, RebuildReason};
use anyhow::{Context, Result, bail};
use clap::Args;
use engine::{Engine, GenerateOptions, Message};
use serde::Deserialize;

use crate::Env;
use crate::ui::{self, Table};

/// Arguments of `agentkv demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// 1: create the agents, answer, save; 2 (a new process): resume and compare.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    session: u8,
    /// Most tokens per reply (short replies keep the demo to a couple of minutes).
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
}

/// The demo's conversations, shared with `cargo xtask bench --only kv-quality`, which measures
/// the KV dtypes on them (the file's `about` says how its fields make the conversations).
const CONVERSATIONS: &str = include_str!("demo_conversations.json");

/// The conversations file: one bug report given to every agent, two user turns each.
#[derive(Deserialize)]
struct Conversations {
    /// The bug report: the start of each agent's first message.
    shared_context: String,
    conversations: Vec<Role>,
}

/// One agent of the demo.
#[derive(Deserialize)]
struct Role {
    /// The agent's id.
    name: String,
    agent_type: String,
    system: String,
    /// The task (after the bug report) in session 1, the follow-up in session 2.
    turns: [String; 2],
}

impl Role {
    fn task(&self) -> &str {
        &self.turns[0]
    }

    fn follow_up(&self) -> &str {
        &self.turns[1]
    }
}

impl Conversations {
    /// The built-in file, parsed (a unit test checks that it parses).
    fn demo() -> Result<Conversations> {
        serde_json::from_str(CONVERSATIONS).context("internal: the demo's conversations file")
    }

    /// The first message of `role`: the bug report, a blank line, then the task.
    fn task_message(&self, role: &Role) -> String {
        format!("{}\n\n{}", self.shared_context, role.task())
    }
}

/// Runs session 1 or 2.
pub fn run(env: &Env, args: &DemoArgs) -> Result<()> {
    let root = env.home.join("demo");
    let demo = Conversations::demo()?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        ..GenerateOptions::default()
    };
    if args.session == 1 {
        let engine = env.chat_engine()?;
        if root.exists() {
            std::fs::remove_dir_all(&root)
                .with_context(|| format!("resetting the demo directory {}", root.display()))?;
        }
        let pool = env.local_pool(&root, engine)?;
        session1(env, &demo, &pool, &options)
    } else {
        if !root.join("agents").exists() {
            bail!(
                "no saved demo in {}: run `agentkv demo --session 1` first (or `cargo xtask demo`, \
                 which runs both sessions)",
                root.display()
            );
        }
        let engine = env.chat_engine()?;
        let pool = env.local_pool(&root, std::sync::Arc::clone(&engine))?;
        session2(env, &demo, &engine, &pool, &options)
    }
}

fn session1(
    env: &Env,
    demo: &Conversations,
    pool: &AgentPool<Engine>,
    options: &GenerateOptions,
) -> Result<()> {
    let mut table = Table::new(
        &[
            "agent",
            "system tok",
            "create ms",
            "prompt tok",
            "prefill ms",
            "gen tok",
            "decode tok/s",
            "cache tok",
            "on disk",
            "save ms",
        ],
        1,
    );
    if !env.quiet {
        println!(
            "The bug all three agents are given:\n\n{}",
            demo.shared_context
        );
    }
    for role in &demo.conversations {
        let started = Instant::now();
        let spinner = ui::spinner(
            env.quiet,
            format!("{}: prefilling the system prompt", role.name),
        );
        let created = pool
            .create_agent(&role.name, &role.agent_type, &role.system)
            .with_context(|| format!("creating agent {}", role.name))?;
        spinner.finish_and_clear();
        let create = started.elapsed();

        if !env.quiet {
            println!(
                "\n== {} ({}) ==\nuser: [the bug report] {}\n",
                role.name,
                role.agent_type,
                role.task()
            );
        }
        let reply = turn(env, pool, &role.name, &demo.task_message(role), options)?;

        let started = Instant::now();
        pool.save_agent(&role.name)
            .with_context(|| format!("saving agent {}", role.name))?;
        let save = started.elapsed();
        let manifest = pool.store().manifest(&role.name)?;
        let cache_tokens = manifest.as_ref().map_or(0, |m| m.n_tokens);
        let on_disk = pool.store().disk_bytes(&role.name)?;
        table.row(vec![
            role.name.clone(),
            created.system_tokens.to_string(),
            ui::ms(create),
            reply.prompt_tokens.to_string(),
            ui::ms(reply.timings.prefill),
            reply.tokens.len().to_string(),
            tok_per_s(reply.tokens.len(), reply.timings.decode),
            cache_tokens.to_string(),
            ui::bytes(on_disk),
            ui::ms(save),
        ]);
    }
    if !env.quiet {
        println!(
            "\nsession 1: three agents answered and were saved to {}\n",
            pool.root().display()
        );
    }
    // The table is the demo's result: printed even with --quiet.
    table.print();
    if !env.quiet {
        println!(
            "\ncreate ms: prefilling the system prompt and saving it as the cache's first segment.\n\
             prefill ms: the task's tokens only (the system prompt's K/V were reused).\n\
             Next: `agentkv demo --session 2` resumes these agents in a new process."
        );
    }
    Ok(())
}

fn session2(
    env: &Env,
    demo: &Conversations,
    engine: &Engine,
    pool: &AgentPool<Engine>,
    options: &GenerateOptions,
) -> Result<()> {
    let known: Vec<String> = pool.list().into_iter().map(|a| a.id).collect();
    let missing: Vec<&str> = demo
        .conversations
        .iter()
        .map(|r| r.name.as_str())
        .filter(|id| !known.iter().any(|k| k == id))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the demo in {} has no agent {}: run `agentkv demo --session 1` first",
            pool.root().display(),
            missing.join(", ")
        );
    }
    let mut table = Table::new(
        &[
            "agent",
            "history tok",
            "load ms",
            "resume TTFT ms",
            "re-prefill TTFT ms",
            "speedup",
            "gen tok",
        ],
        1,
    );
    let mut rebuilt_any = false;
    for role in &demo.conversations {
        let spinner = ui::spinner(env.quiet, format!("{}: loading its cache", role.name));
        let load = pool
            .load_agent(&role.name)
            .with_context(|| format!("loading agent {}", role.name))?;
        spinner.finish_and_clear();
        if let Some(rebuild) = &load.rebuilt {
            rebuilt_any = true;
            let why = match rebuild.reason {
                RebuildReason::Missing => "no cache was saved (session 1 did not finish)",
                RebuildReason::Damaged => "the saved cache is damaged",
                RebuildReason::OtherModel => {
                    "the saved cache was made by another model, tokenizer or template"
                }
                RebuildReason::OtherDtype => "the saved cache holds another KV dtype",
                RebuildReason::Unreadable => "the saved cache could not be read",
                _ => "the saved cache could not be used",
            };
            eprintln!(
                "note: {}: {why} ({}); its {} tokens were prefilled again from the transcript in {} ms, \
                 so its load ms below is a rebuild, not a resume. Run `agentkv demo --session 1` \
                 then `--session 2` again to measure a resume.",
                role.name,
                rebuild.detail,
                rebuild.tokens,
                ui::ms(load.elapsed)
            );
        }

        if !env.quiet {
            println!(
                "\n== {} ({}) ==\nuser: {}\n",
                role.name,
                role.agent_type,
                role.follow_up()
            );
        }
        let reply = turn(env, pool, &role.name, role.follow_up(), options)?;
        // Time to first token from a cold agent: reading its cache plus prefilling the new
        // turn (the rest of the prompt was reused).
        let resume = load.elapsed + reply.timings.prefill;

        // The same prompt, prefilled from nothing: the history as the pool rendered it (the
        // transcript now ends with this turn, which the prompt does not include).
        let info = pool.info(&role.name)?;
        let turns = pool.transcript(&role.name)?;
        let history = turns.get(..turns.len().saturating_sub(1)).unwrap_or(&[]);
        let mut messages = vec![Message::system(info.system_prompt)];
        for t in history {
            messages.extend(t.input.iter().cloned());
            messages.push(t.reply_message());
        }
        messages.push(Message::user(role.follow_up()));
        let prompt = engine.chat_tokens(&messages, true)?;
        if prompt.len() != reply.prompt_tokens {
            bail!(
                "internal: the re-rendered prompt of {} has {} tokens, the pool's had {}",
                role.name,
                prompt.len(),
                reply.prompt_tokens
            );
        }
        let spinner = ui::spinner(
            env.quiet,
            format!(
                "{}: re-prefilling {} tokens from scratch",
                role.name,
                prompt.len()
            ),
        );
        let started = Instant::now();
        let mut scratch = engine.new_cache(env.kv_dtype)?;
        engine.sync(&mut scratch, &prompt)?;
        let scratch_ttft = started.elapsed();
        spinner.finish_and_clear();

        table.row(vec![
            role.name.clone(),
            prompt.len().to_string(),
            ui::ms(load.elapsed),
            ui::ms(resume),
            ui::ms(scratch_ttft),
            format!(
                "{:.1}x",
                scratch_ttft.as_secs_f64() / resume.as_secs_f64().max(1e-9)
            ),
            reply.tokens.len().to_string(),
        ]);
    }
    pool.flush().context("saving the agents")?;
    if !env.quiet {
        let stats = pool.stats();
        println!(
            "\nsession 2: resumed {} agents from {} (at most {} hot; {} in memory now, {} of KV)\n",
            demo.conversations.len(),
            pool.root().display(),
            stats.max_hot,
            stats.hot.len(),
            ui::bytes(stats.kv_bytes as u64)
        );
    }
    table.print();
    if !env.quiet {
        println!(
            "\nresume TTFT = load ms + prefilling the follow-up's new tokens on the loaded cache.\n\
             re-prefill TTFT = prefilling the whole prompt on an empty cache, measured just now \
             in this process."
        );
        if rebuilt_any {
            println!("Some caches were rebuilt rather than resumed: see the notes above.");
        }
    }
    Ok(())
}

/// One streamed turn, with a spinner until the first token.
fn turn(
    env: &Env,
    pool: &AgentPool<Engine>,
    id: &str,
    input: &str,
    options: &GenerateOptions,
) -> Result<agent_pool::Reply> {
    crate::chat::turn(env, pool, id, input, options, true)
}

fn tok_per_s(tokens: usize, d: Duration) -> String {
    if d.is_zero() {
        return "-".to_owned();
    }
    format!("{:.1}", tokens as f64 / d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conversations_file_gives_three_agents_their_first_message() {
        let demo = Conversations::demo().expect("the built-in file parses");
        let names: Vec<&str> = demo.conversations.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["specialist", "product", "qa"]);
        let first = demo.task_message(&demo.conversations[0]);
        assert!(first.starts_with("Bug report #4821: `GET /v2/orders?cursor=…`"));
        assert!(first.ends_with(
            "created_at.\n\nHere is the bug. What is the most likely root cause, and what is the fix?"
        ));
        assert!(
            demo.conversations[2]
                .follow_up()
                .starts_with("The fix adds the order id")
        );
    }
}
