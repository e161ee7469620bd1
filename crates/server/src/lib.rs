#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod admin;
mod api;
mod chat;
mod error;
mod responses;
mod turn;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use agent_pool::{AgentPool, Backend};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use error::ApiError;

/// The pool a server runs: any backend (the real engine, or the test fake).
pub type Pool = AgentPool<dyn Backend>;

/// What a server needs besides its pool.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The id clients name the base model by (`GET /v1/models`, `model`); any other `model`
    /// value names an agent.
    pub model_id: String,
    /// When set, every request but `GET /health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Requests admitted at once, running or waiting for their agent; more get 429.
    pub max_queue: usize,
    /// Largest request body accepted, in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// The chat template has tool-call syntax (`tools` in a request is refused otherwise).
    pub template_has_tools: bool,
    /// Called on the turn's worker thread after every turn, once its reply is sent and the
    /// agent is free for the next request (`agentkv serve` returns freed memory to the
    /// system there).
    pub after_turn: Option<fn()>,
}

impl ServerConfig {
    /// A configuration with the defaults: no key, 64 requests in the queue, 4 MiB bodies.
    pub fn new(model_id: impl Into<String>) -> ServerConfig {
        ServerConfig {
            model_id: model_id.into(),
            api_key: None,
            max_queue: 64,
            max_body_bytes: 4 << 20,
            template_has_tools: false,
            after_turn: None,
        }
    }
}

/// State shared by every handler.
pub(crate) struct AppState {
    pub pool: Arc<Pool>,
    pub config: ServerConfig,
    /// Admission: one permit per request running or waiting.
    pub queue: Arc<Semaphore>,
    /// One FIFO lock per agent, so that its requests run in arrival order (tokio's mutex
    /// queues waiters fairly; the pool's own per-agent mutex does not promise an order).
    agent_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When the server started, for `created` fields.
    pub started_unix: u64,
}

impl AppState {
    pub(crate) fn agent_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.agent_locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(id.to_owned()).or_default())
    }
}

pub(crate) type Shared = Arc<AppState>;

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The HTTP routes over `pool`: the OpenAI endpoints, `/health` and `/agentkv/agents`.
pub fn router(pool: Arc<Pool>, config: ServerConfig) -> Router {
    let state: Shared = Arc::new(AppState {
        pool,
        queue: Arc::new(Semaphore::new(config.max_queue.max(1))),
        config,
        agent_locks: Mutex::new(HashMap::new()),
        started_unix: unix_now(),
    });
    let api = Router::new()
        .route("/v1/models", get(admin::models))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/agentkv/agents", get(admin::list_agents))
        .route(
            "/agentkv/agents/{id}",
            get(admin::show_agent).delete(admin::delete_agent),
        )
        .route("/agentkv/agents/{id}/verify", post(admin::verify_agent))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ));
    Router::new()
        .route("/health", get(admin::health))
        .merge(api)
        .fallback(admin::not_found)
        .with_state(state)
}

/// Refuses a request without the configured key (compared in constant time).
async fn authorize(
    State(state): State<Shared>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &state.config.api_key {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return Err(ApiError::unauthorized());
        }
    }
    Ok(next.run(request).await)
}

/// Equality whose time depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, &y) in b.iter().enumerate() {
        // Compare against `b` in full even when `a` is shorter.
        let x = a.get(i).copied().unwrap_or(!y);
        diff |= x ^ y;
    }
    diff == 0
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting, lets the
/// requests in flight finish (a streaming client that is gone cancels its own), and returns.
/// The caller then drops the pool, which saves the caches that changed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        for (a, b) in [
            ("", ""),
            ("k", "k"),
            ("key", "kex"),
            ("key", "ke"),
            ("ke", "key"),
            ("", "key"),
            ("key", ""),
        ] {
            assert_eq!(
                constant_time_eq(a.as_bytes(), b.as_bytes()),
                a == b,
                "{a:?} {b:?}"
            );
        }
    }
}
