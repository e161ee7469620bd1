//! `agentkv serve`: the OpenAI-compatible server over the everyday pool, until SIGINT or
//! SIGTERM; then in-flight turns finish, the caches that changed are saved, and it exits 0.

use std::io::Write;
use std::sync::Arc;

use agent_pool::{AgentPool, Backend, PoolConfig};
use anyhow::{Context, Result, bail};
use clap::Args;
use server::ServerConfig;

use crate::Env;

/// Arguments of `agentkv serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: the API has no TLS).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the URL printed says which).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (default: $AGENTKV_API_KEY, else no key).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Most agents whose KV cache stays in memory; the rest resume from disk.
    #[arg(long, default_value_t = 3)]
    max_hot: usize,
    /// Most bytes of KV caches in memory (e.g. 512MiB, 2GiB, 1000000).
    #[arg(long, default_value = "1GiB", value_name = "SIZE", value_parser = parse_size)]
    max_kv_bytes: usize,
    /// Requests admitted at once (running or waiting for their agent); more get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
}

/// Parses `123`, `512KiB`, `64MiB`, `2GiB` (also `KB`/`MB`/`GB` and `K`/`M`/`G`, as powers of
/// 1024).
fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write e.g. 512MiB or 2GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit {other:?}: use KiB, MiB or GiB")),
    };
    n.checked_mul(1 << shift)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a usable size"))
}

/// Runs the server until a signal.
pub fn run(env: &Env, args: &ServeArgs) -> Result<()> {
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("AGENTKV_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let engine = env.chat_engine()?;
    let model_id = env
        .model
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".gguf").unwrap_or(n).to_owned())
        .context("the model path has no file name")?;
    let template_has_tools = engine
        .template()
        .is_some_and(|t| t.source().contains("tools"));
    let backend: Arc<dyn Backend> = engine;
    let root = env.pool_root();
    let config = PoolConfig {
        max_hot: args.max_hot,
        kv_budget_bytes: args.max_kv_bytes,
        kv_dtype: env.kv_dtype,
        // A reply is acknowledged with its cache on disk, so that after a crash or kill -9
        // every acknowledged conversation resumes from disk rather than by re-prefill.
        save_every_turn: true,
        shared: env.shared.clone(),
    };
    let pool = match AgentPool::open(&root, backend, config) {
        Ok(p) => Arc::new(p),
        Err(e @ agent_pool::PoolError::Locked { .. }) => {
            bail!("{e} (is another `agentkv serve` or `agentkv chat` running on this home?)")
        }
        Err(e) => {
            return Err(e).with_context(|| format!("opening the agent pool in {}", root.display()));
        }
    };
    let mut server_config = ServerConfig::new(model_id.clone());
    server_config.api_key = api_key;
    server_config.max_queue = args.max_queue;
    server_config.template_has_tools = template_has_tools;
    server_config.after_turn = Some(crate::memory::release_freed);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| {
                format!(
                    "listening on {}:{}: pick another --port (0 picks a free one)",
                    args.host, args.port
                )
            })?;
        let addr = listener.local_addr().context("reading the bound address")?;
        println!("agentkv serve: listening on http://{addr}/v1 (model {model_id})");
        let _ = std::io::stdout().flush();
        if !env.quiet {
            eprintln!("pool: {}; stop with Ctrl-C", root.display());
        }
        let app = server::router(Arc::clone(&pool), server_config);
        server::serve(listener, app, shutdown())
            .await
            .context("serving HTTP")
    })?;
    // Turns still running on blocking threads finish before the runtime is gone.
    drop(runtime);
    let saved = pool.flush().context("saving the caches that changed")?;
    if !env.quiet {
        eprintln!("agentkv serve: stopped; saved {saved} caches");
    }
    Ok(())
}

/// Completes at SIGINT or SIGTERM.
async fn shutdown() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        for bad in ["", "GiB", "0", "12XB", "-1", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
