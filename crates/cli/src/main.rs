//! `agentkv`: persistent attention-KV-cache memory for local LLM agents, from the shell.
//!
//! Glue only: arguments, terminal output and error messages. Agents, transcripts and caches
//! are agent-pool's business; the model is the engine's.

#![deny(unsafe_code)]

mod agents;
mod chat;
mod demo;
mod memory;
mod serve;
mod ui;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use agent_pool::{AgentPool, PoolConfig, SharedStore};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use engine::Engine;
use kv_store::KvDtype;

/// Persistent KV-cache memory for local LLM agents.
#[derive(Parser)]
#[command(name = "agentkv", version)]
struct Cli {
    /// Print only replies and results: no progress, tables or notes.
    #[arg(long, global = true)]
    quiet: bool,
    /// A GGUF of a llama (Llama 2 or 3), Gemma 3 or Qwen2 model (default: the model `cargo
    /// xtask fetch-model` installs).
    #[arg(long, global = true, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Data directory (default: $AGENTKV_HOME, else $XDG_DATA_HOME/agentkv, else
    /// ~/.local/share/agentkv).
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Element type agents' KV caches are held in, in memory and on disk: f16 (half of f32's
    /// bytes), q8_0 (llama.cpp's 8-bit blocks, about a quarter) or f32. A conversation resumed
    /// from disk gives bit for bit the replies of one that stayed in memory, in each. Caches
    /// saved in another dtype are rebuilt from their transcripts, with a note.
    #[arg(long, global = true, default_value = "f16", value_name = "DTYPE", value_parser = parse_kv_dtype)]
    kv_dtype: KvDtype,
    /// Share agents with other hosts through an S3-compatible object store
    /// (`s3://bucket/prefix`; endpoint and credentials from AWS_ENDPOINT_URL,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION). Each change to an agent is
    /// committed there before it is acknowledged; the local directory is a cache in front of
    /// it. Default: agents live in the local directory alone.
    #[arg(long, global = true, value_name = "URL")]
    store: Option<String>,
    /// This process's name among the hosts sharing `--store` (default: the machine's host
    /// name and the process id); 1 to 64 characters of [a-z0-9_-].
    #[arg(long, global = true, value_name = "NAME", requires = "store")]
    store_host: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Three agents in two processes: session 1 answers and saves, session 2 resumes from disk
    /// and compares with re-prefilling the same history.
    Demo(demo::DemoArgs),
    /// Talk to an agent interactively; its memory persists between runs.
    Chat(chat::ChatArgs),
    /// One turn of an agent, for scripts.
    Run(chat::RunArgs),
    /// Serve the OpenAI API (Chat Completions and Responses) with conversations as durable
    /// agents.
    Serve(serve::ServeArgs),
    /// Manage the agents on disk.
    Agents {
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
}

/// What every command needs: where things live and how loud to be.
pub struct Env {
    /// The data directory.
    pub home: PathBuf,
    /// The model file (not checked yet).
    pub model: PathBuf,
    /// No progress bars, tables or notes.
    pub quiet: bool,
    /// The dtype agents' caches are held in.
    pub kv_dtype: KvDtype,
    /// The store shared with other hosts (`--store`), if any.
    pub shared: Option<SharedStore>,
}

impl Env {
    /// Loads the engine, with a spinner; a missing file says how to get the model.
    pub fn engine(&self) -> Result<Arc<Engine>> {
        if !self.model.exists() {
            // The engine's own error for it (before the spinner), which says how to get a model.
            let path = self.model.clone();
            return Err(engine::EngineError::ModelNotFound { path }.into());
        }
        let spinner = ui::spinner(self.quiet, format!("loading {}", self.model.display()));
        let engine = Engine::load(&self.model)
            .with_context(|| format!("loading the model {}", self.model.display()))?;
        spinner.finish_and_clear();
        Ok(Arc::new(engine))
    }

    /// [`Env::engine`] for a command that talks with agents: the model must carry a chat
    /// template. A base model (Gemma 3 270M's GGUF, say) loads, and `agents list` works on it,
    /// but every turn would fail; say so before anything starts rather than at each turn (or,
    /// in the server, at each request).
    pub fn chat_engine(&self) -> Result<Arc<Engine>> {
        let engine = self.engine()?;
        if engine.template().is_none() {
            bail!(
                "{} has no chat template (no `tokenizer.chat_template` in its metadata: a base \
                 model): agents talk through one; pass --model PATH to a chat (instruct) GGUF, \
                 such as SmolLM2-135M-Instruct, which `cargo xtask fetch-model` installs",
                self.model.display()
            );
        }
        Ok(engine)
    }

    /// Opens the pool at `root` on `engine`.
    pub fn pool(&self, root: &Path, engine: Arc<Engine>) -> Result<AgentPool<Engine>> {
        AgentPool::open(root, engine, self.pool_config())
            .with_context(|| format!("opening the agent pool in {}", root.display()))
    }

    /// Opens the pool at `root` on `engine`, local whatever `--store` says (the demo's own
    /// agents are not shared).
    pub fn local_pool(&self, root: &Path, engine: Arc<Engine>) -> Result<AgentPool<Engine>> {
        let config = PoolConfig {
            shared: None,
            ..self.pool_config()
        };
        AgentPool::open(root, engine, config)
            .with_context(|| format!("opening the agent pool in {}", root.display()))
    }

    /// The pool configuration every command but `serve` uses: defaults, `--kv-dtype` and
    /// `--store`.
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            kv_dtype: self.kv_dtype,
            shared: self.shared.clone(),
            ..PoolConfig::default()
        }
    }

    /// The everyday pool: `<home>/pool`.
    pub fn pool_root(&self) -> PathBuf {
        self.home.join("pool")
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let home = match cli.home {
        Some(h) => h,
        None => engine::agentkv_home().context(
            "cannot tell where agentkv keeps its data: set AGENTKV_HOME or pass --home DIR",
        )?,
    };
    let model = match cli.model {
        Some(m) => m,
        None => home.join("models").join(engine::DEFAULT_MODEL_FILE),
    };
    let shared = match &cli.store {
        None => None,
        Some(url) => {
            let remote = kv_remote::Remote::open(url, &[])?;
            let host = cli.store_host.unwrap_or_else(SharedStore::default_host);
            kv_store::validate_name(&host)
                .with_context(|| format!("--store-host {host:?} cannot name this host"))?;
            Some(SharedStore {
                remote: Arc::new(remote),
                host,
            })
        }
    };
    let cx = Env {
        home,
        model,
        quiet: cli.quiet,
        kv_dtype: cli.kv_dtype,
        shared,
    };
    match cli.command {
        Command::Demo(args) => demo::run(&cx, &args),
        Command::Chat(args) => chat::chat(&cx, &args),
        Command::Run(args) => chat::run(&cx, &args),
        Command::Serve(args) => serve::run(&cx, &args),
        Command::Agents { command } => agents::run(&cx, &command),
    }
}

/// `--kv-dtype NAME`.
fn parse_kv_dtype(name: &str) -> std::result::Result<KvDtype, String> {
    match KvDtype::from_name(name) {
        Some(d @ (KvDtype::F32 | KvDtype::F16 | KvDtype::Q8_0)) => Ok(d),
        _ => Err(format!("unknown KV dtype {name:?}: use f16, q8_0 or f32")),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
