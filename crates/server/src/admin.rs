//! `GET /health`, `GET /v1/models` and agent management under `/agentkv/agents`, so that the
//! pool the server holds can be inspected without a second process opening it.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::turn::blocking;
use crate::{Shared, unix_now};

pub(crate) async fn health(State(state): State<Shared>) -> Response {
    let stats = state.pool.stats();
    axum::Json(json!({
        "status": "ok",
        "model": state.config.model_id,
        "agents": stats.agents,
        "hot": stats.hot.len(),
        "kv_bytes": stats.kv_bytes,
        "kv_budget_bytes": stats.kv_budget_bytes,
        "rss_bytes": stats.rss_bytes,
        "uptime_s": unix_now().saturating_sub(state.started_unix),
    }))
    .into_response()
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such endpoint: agentkv serves /v1/models, /v1/chat/completions, /v1/responses, \
         /health and /agentkv/agents",
    )
}

pub(crate) async fn models(State(state): State<Shared>) -> Response {
    let created = state.started_unix;
    let mut data = vec![json!({
        "id": state.config.model_id,
        "object": "model",
        "created": created,
        "owned_by": "agentkv",
    })];
    for a in state.pool.list() {
        let created = a
            .info
            .as_ref()
            .map_or(created, |i| i.created_unix_ms / 1000);
        data.push(json!({
            "id": a.id,
            "object": "model",
            "created": created,
            "owned_by": "agentkv-agent",
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub(crate) async fn list_agents(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let agents: Vec<Value> = state
            .pool
            .list()
            .into_iter()
            .map(|a| {
                let manifest = state.pool.store().manifest(&a.id).ok().flatten();
                json!({
                    "id": a.id,
                    "type": a.info.as_ref().map(|i| i.agent_type.clone()),
                    "created_unix_ms": a.info.as_ref().map(|i| i.created_unix_ms),
                    "damage": a.damage,
                    "hot": a.hot,
                    "cached_tokens": manifest.map(|m| m.n_tokens),
                    "cache_bytes_on_disk": state.pool.store().disk_bytes(&a.id).ok(),
                })
            })
            .collect();
        Ok(json!({"object": "list", "data": agents}))
    })
    .await
    .map(Json)
}

pub(crate) async fn show_agent(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        crate::api::check_agent_name(&id, "the path")?;
        let info = state.pool.info(&id)?;
        let turns = state.pool.transcript(&id)?;
        Ok(json!({
            "id": info.id,
            "type": info.agent_type,
            "system_prompt": info.system_prompt,
            "created_unix_ms": info.created_unix_ms,
            "turns": turns.iter().map(|t| json!({
                "index": t.index,
                "unix_ms": t.unix_ms,
                "parent": t.parent,
                "input": t.input,
                "reply": t.reply,
            })).collect::<Vec<_>>(),
        }))
    })
    .await
    .map(Json)
}

pub(crate) async fn delete_agent(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        crate::api::check_agent_name(&id, "the path")?;
        state.pool.delete(&id)?;
        Ok(json!({"id": id, "object": "agent", "deleted": true}))
    })
    .await
    .map(Json)
}

/// Reads the agent's saved cache, checking every segment's checksums and its fingerprint
/// against this server's model, and its transcript.
pub(crate) async fn verify_agent(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        crate::api::check_agent_name(&id, "the path")?;
        let transcript = state.pool.transcript(&id)?;
        let cache = match state.pool.store().load_any(&id) {
            Err(kv_store::Error::NotFound { .. }) => {
                json!({"status": "none", "detail": "no cache saved: rebuilt from the transcript on next use"})
            }
            Err(e) => json!({"status": "damaged", "detail": e.to_string()}),
            Ok(loaded) => match state.pool.cache_meta().first_difference(loaded.meta()) {
                None => json!({
                    "status": "ok",
                    "tokens": loaded.len(),
                    "segments": loaded.segments().len(),
                }),
                Some((field, want, found)) => json!({
                    "status": "other_model",
                    "detail": format!("{field}: {found}, this model: {want}; rebuilt on next use"),
                }),
            },
        };
        Ok(json!({"id": id, "transcript_turns": transcript.len(), "cache": cache}))
    })
    .await
    .map(Json)
}
