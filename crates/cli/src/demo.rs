//! The two-session demo: three agents answer in one process and are saved; a second process
//! resumes them from disk and measures that against re-prefilling the same history from
//! scratch, in the same run. Every figure printed is measured, none estimated.

use std::time::{Duration, Instant};

use agent_pool::{AgentPool, RebuildReason};
use anyhow::{Context, Result, bail};
use clap::Args;
use engine::{Engine, GenerateOptions, Message};

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

/// The bug all three agents look at.
const BUG: &str = "Bug report #4821: `GET /v2/orders?cursor=…` returns the same page twice \
when an order is created while a client is paginating. Clients that page through all orders \
(the nightly export, the mobile app's order history) show duplicates, and one customer \
reports a missing order. Endpoint: orders-service 2.14, PostgreSQL 15, cursor = \
base64(created_at). Started after the 2.14 release, which switched the sort key from id to \
created_at.";

struct Role {
    id: &'static str,
    agent_type: &'static str,
    system: &'static str,
    task: &'static str,
    follow_up: &'static str,
}

const ROLES: [Role; 3] = [
    Role {
        id: "specialist",
        agent_type: "engineer",
        system: "You are a senior backend engineer on the orders service of an e-commerce \
company. You know HTTP APIs, PostgreSQL, and pagination schemes well: offset pagination, \
keyset (cursor) pagination, and their failure modes under concurrent writes. When you look at \
a bug you first state the most likely root cause in one sentence, then the evidence that \
would confirm it, then the smallest safe fix. You prefer keyset pagination on a unique, \
immutable, indexed sort key; you know that timestamps are not unique and that a cursor must \
encode a total order, for example (created_at, id). You care about backwards compatibility: \
existing cursors held by clients must keep working or fail clearly with a 400 and a message, \
never silently return wrong data. You write SQL and Rust or Go snippets when they make the \
point faster than prose. You never guess about production data: you say which query or log \
line would settle a question. Keep answers short and concrete, in plain sentences, without \
headings. If the report lacks something you need, say exactly what.",
        task: "Here is the bug. What is the most likely root cause, and what is the fix?",
        follow_up: "The product manager asks whether old cursors can keep working after the \
fix. Can they, and how?",
    },
    Role {
        id: "product",
        agent_type: "product-manager",
        system: "You are the product manager for the public orders API of an e-commerce \
platform used by about four hundred merchant integrations, a mobile app and an internal \
nightly export to the finance data warehouse. You own the API's roadmap, its changelog and \
its deprecation policy: breaking changes need ninety days' notice, a migration guide and a \
versioned endpoint. You think about who is affected by a bug, how badly, and how to \
communicate it: which customers to contact, what the status page says, what goes in the \
changelog. You weigh the cost of a quick patch against a proper fix and you ask engineering \
for an estimate and a risk assessment before committing to a date. You do not write code, \
but you understand enough about cursors, pagination and database ordering to ask the right \
questions. You answer in short paragraphs with a clear decision or recommendation first, \
then the reasons, then the open questions and who should answer them. You are careful not \
to promise dates you do not control, and you always consider the finance export, because \
missing orders there become accounting errors.",
        task: "Here is the bug. Who is affected, how urgent is it, and what do we tell \
customers today?",
        follow_up: "Engineering says the fix changes the cursor format. Does that count as a \
breaking change under our policy?",
    },
    Role {
        id: "qa",
        agent_type: "qa-reviewer",
        system: "You are a QA engineer who reviews fixes to the public orders API before they \
ship. You design tests that would have caught the bug and that prove the fix, with a bias \
towards tests that are deterministic and fast: no sleeps, no reliance on wall-clock \
ordering, explicit fixtures with rows that share the same timestamp. You know pagination \
bugs well: duplicates and gaps when rows are inserted or deleted between page requests, \
unstable sort orders, cursors that do not encode a tie-breaker, and off-by-one errors at page \
boundaries. For every fix you ask for a regression test at the API level and a property test \
where it fits, for example: paging through all rows while concurrent inserts happen must \
return every row that existed at the start exactly once. You also check the unhappy paths: \
malformed cursors, cursors from the old format, and empty pages. You answer with a short \
numbered list of test cases, each one line, most important first, and you say which of them \
must block the release.",
        task: "Here is the bug. Which tests would have caught it, and which must pass before \
the fix ships?",
        follow_up: "The fix adds the order id to the cursor. What exactly do you test for old \
cursors?",
    },
];

/// Runs session 1 or 2.
pub fn run(env: &Env, args: &DemoArgs) -> Result<()> {
    let root = env.home.join("demo");
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        ..GenerateOptions::default()
    };
    if args.session == 1 {
        let engine = env.engine()?;
        if root.exists() {
            std::fs::remove_dir_all(&root)
                .with_context(|| format!("resetting the demo directory {}", root.display()))?;
        }
        let pool = env.local_pool(&root, engine)?;
        session1(env, &pool, &options)
    } else {
        if !root.join("agents").exists() {
            bail!(
                "no saved demo in {}: run `agentkv demo --session 1` first (or `cargo xtask demo`, \
                 which runs both sessions)",
                root.display()
            );
        }
        let engine = env.engine()?;
        let pool = env.local_pool(&root, std::sync::Arc::clone(&engine))?;
        session2(env, &engine, &pool, &options)
    }
}

fn task_message(role: &Role) -> String {
    format!("{BUG}\n\n{}", role.task)
}

fn session1(env: &Env, pool: &AgentPool<Engine>, options: &GenerateOptions) -> Result<()> {
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
        println!("The bug all three agents are given:\n\n{BUG}");
    }
    for role in &ROLES {
        let started = Instant::now();
        let spinner = ui::spinner(
            env.quiet,
            format!("{}: prefilling the system prompt", role.id),
        );
        let created = pool
            .create_agent(role.id, role.agent_type, role.system)
            .with_context(|| format!("creating agent {}", role.id))?;
        spinner.finish_and_clear();
        let create = started.elapsed();

        if !env.quiet {
            println!(
                "\n== {} ({}) ==\nuser: [the bug report] {}\n",
                role.id, role.agent_type, role.task
            );
        }
        let reply = turn(env, pool, role.id, &task_message(role), options)?;

        let started = Instant::now();
        pool.save_agent(role.id)
            .with_context(|| format!("saving agent {}", role.id))?;
        let save = started.elapsed();
        let manifest = pool.store().manifest(role.id)?;
        let cache_tokens = manifest.as_ref().map_or(0, |m| m.n_tokens);
        let on_disk = pool.store().disk_bytes(role.id)?;
        table.row(vec![
            role.id.to_owned(),
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
    engine: &Engine,
    pool: &AgentPool<Engine>,
    options: &GenerateOptions,
) -> Result<()> {
    let known: Vec<String> = pool.list().into_iter().map(|a| a.id).collect();
    let missing: Vec<&str> = ROLES
        .iter()
        .map(|r| r.id)
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
    for role in &ROLES {
        let spinner = ui::spinner(env.quiet, format!("{}: loading its cache", role.id));
        let load = pool
            .load_agent(role.id)
            .with_context(|| format!("loading agent {}", role.id))?;
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
                role.id,
                rebuild.detail,
                rebuild.tokens,
                ui::ms(load.elapsed)
            );
        }

        if !env.quiet {
            println!(
                "\n== {} ({}) ==\nuser: {}\n",
                role.id, role.agent_type, role.follow_up
            );
        }
        let reply = turn(env, pool, role.id, role.follow_up, options)?;
        // Time to first token from a cold agent: reading its cache plus prefilling the new
        // turn (the rest of the prompt was reused).
        let resume = load.elapsed + reply.timings.prefill;

        // The same prompt, prefilled from nothing: the history as the pool rendered it (the
        // transcript now ends with this turn, which the prompt does not include).
        let info = pool.info(role.id)?;
        let turns = pool.transcript(role.id)?;
        let history = turns.get(..turns.len().saturating_sub(1)).unwrap_or(&[]);
        let mut messages = vec![Message::system(info.system_prompt)];
        for t in history {
            messages.extend(t.input.iter().cloned());
            messages.push(t.reply_message());
        }
        messages.push(Message::user(role.follow_up));
        let prompt = engine.chat_tokens(&messages, true)?;
        if prompt.len() != reply.prompt_tokens {
            bail!(
                "internal: the re-rendered prompt of {} has {} tokens, the pool's had {}",
                role.id,
                prompt.len(),
                reply.prompt_tokens
            );
        }
        let spinner = ui::spinner(
            env.quiet,
            format!(
                "{}: re-prefilling {} tokens from scratch",
                role.id,
                prompt.len()
            ),
        );
        let started = Instant::now();
        let mut scratch = engine.new_cache(env.kv_dtype)?;
        engine.sync(&mut scratch, &prompt)?;
        let scratch_ttft = started.elapsed();
        spinner.finish_and_clear();

        table.row(vec![
            role.id.to_owned(),
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
            ROLES.len(),
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
