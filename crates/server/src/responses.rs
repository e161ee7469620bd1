//! `/v1/responses`: a response id names one turn of one agent, `resp_<agent>.<created>.<turn>`
//! (the agent's creation time in hex, so that an id never reaches a later agent of the same
//! name). The transcript holds the turn, so ids survive restarts; continuing from an older id
//! forks the conversation there.

use agent_pool::{Continue, Parent, Reply, Usage};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::Event as SseEvent;
use engine::Message;
use serde_json::{Value, json};

use crate::api::{self, ResponsesRequest, Sampling};
use crate::error::ApiError;
use crate::turn::{self, Answer, Target, blocking};
use crate::{Shared, unix_now};

/// A durable response id's parts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ResponseId {
    pub agent: String,
    pub created_ms: u64,
    pub turn: u64,
}

impl ResponseId {
    pub(crate) fn format(&self) -> String {
        format!("resp_{}.{:x}.{}", self.agent, self.created_ms, self.turn)
    }

    /// Parses an id; anything else is a 404, as for an id that never existed.
    pub(crate) fn parse(id: &str) -> Result<ResponseId, ApiError> {
        let unknown = || {
            ApiError::not_found(format!(
                "no response {id:?}: it was deleted, never stored (store: false), or belongs \
                 to another server"
            ))
        };
        let rest = id.strip_prefix("resp_").ok_or_else(unknown)?;
        let mut parts = rest.rsplitn(3, '.');
        let turn = parts.next().and_then(|t| t.parse().ok());
        let created = parts.next().and_then(|c| u64::from_str_radix(c, 16).ok());
        let agent = parts.next().filter(|a| kv_store::validate_name(a).is_ok());
        match (agent, created, turn) {
            (Some(agent), Some(created_ms), Some(turn)) => Ok(ResponseId {
                agent: agent.to_owned(),
                created_ms,
                turn,
            }),
            _ => Err(unknown()),
        }
    }
}

/// Request fields echoed in the response object.
struct Echo {
    model: String,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    store: bool,
    temperature: f32,
    top_p: f32,
    max_output_tokens: Option<u32>,
}

fn usage(usage: &Usage) -> Value {
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.reused_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
    })
}

fn output_message(item_id: &str, text: &str, status: &str) -> Value {
    let content = if status == "completed" {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    } else {
        json!([])
    };
    json!({
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    })
}

fn response_object(
    id: &str,
    created_at: u64,
    echo: &Echo,
    status: &str,
    output: Vec<Value>,
    reply: Option<&Reply>,
    counts: Option<Usage>,
) -> Value {
    json!({
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": null,
        "incomplete_details": match reply.map(|r| r.stop) {
            Some(engine::StopReason::MaxTokens) => json!({"reason": "max_output_tokens"}),
            _ => Value::Null,
        },
        "instructions": echo.instructions,
        "max_output_tokens": echo.max_output_tokens,
        "model": echo.model,
        "output": output,
        "parallel_tool_calls": false,
        "previous_response_id": echo.previous_response_id,
        "reasoning": {"effort": null, "summary": null},
        "store": echo.store,
        "temperature": echo.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
        "top_p": echo.top_p,
        "truncation": "disabled",
        "usage": counts.as_ref().map(usage),
        "metadata": {},
        "timings": reply.map(turn::timings),
    })
}

pub(crate) async fn create(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = api::read_body(body, state.config.max_body_bytes).await?;
    let req: ResponsesRequest = api::parse(&bytes)?;
    api::check_tools(req.tools.as_ref(), state.config.template_has_tools)?;
    let mut messages = req.input.messages()?;
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "input",
            "input is empty: send at least one message",
        ));
    }
    let store = req.store.unwrap_or(true);
    let echo = Echo {
        model: req.routing.model_or(&state.config.model_id),
        instructions: req.instructions.clone(),
        previous_response_id: req.previous_response_id.clone(),
        store,
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        max_output_tokens: req.max_output_tokens,
    };
    let (options, cancel) = Sampling {
        max_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: None,
        stop: None,
    }
    .options()?;
    let named = req.routing.agent(&headers, &state.config.model_id)?;
    if let Some(instructions) = &req.instructions {
        messages.insert(0, Message::system(instructions.clone()));
    }
    let target = match (&req.previous_response_id, named) {
        (Some(previous), named) => {
            let previous = ResponseId::parse(previous)?;
            if let Some((other, field)) = named.filter(|(a, _)| *a != previous.agent) {
                return Err(ApiError::invalid_param(
                    "previous_response_id",
                    format!(
                        "previous_response_id belongs to agent {:?}, but {field} names agent \
                         {other:?}: send one of them",
                        previous.agent
                    ),
                ));
            }
            let (id, created_ms, at) = (
                previous.agent,
                previous.created_ms,
                Parent::Turn(previous.turn),
            );
            if store {
                Target::Continue { id, created_ms, at }
            } else {
                // Not stored: answered from the conversation so far, written nowhere.
                Target::DetachedFrom { id, created_ms, at }
            }
        }
        (None, Some((id, _))) if store => Target::Agent {
            id,
            at: Continue::Match,
            system: req.instructions.clone().unwrap_or_default(),
        },
        (None, None) if store => Target::Agent {
            // A stored conversation needs an agent: each gets its own.
            id: turn::random_id("resp-")[..21].to_owned(),
            at: Continue::Match,
            system: req.instructions.clone().unwrap_or_default(),
        },
        (None, _) => Target::Detached,
    };
    let agent = target.agent().map(str::to_owned);
    let mut running = turn::start(&state, target, messages, options, cancel).await?;
    let cache = turn::started(&mut running).await?;
    let created_at = unix_now();
    let answer = if req.stream.unwrap_or(false) {
        Answer::Stream(ResponseFrames {
            echo,
            created_at,
            item_id: turn::random_id("msg_"),
            sequence: 0,
        })
    } else {
        Answer::Complete(move |outcome: &turn::Outcome| {
            let item = turn::random_id("msg_");
            response_object(
                &response_id(outcome),
                created_at,
                &echo,
                "completed",
                vec![output_message(&item, &outcome.reply.text, "completed")],
                Some(&outcome.reply),
                Some(outcome.reply.usage()),
            )
        })
    };
    turn::respond(running, cache, agent, answer).await
}

/// The durable id of a stored turn, or a random one for a detached reply.
fn response_id(outcome: &turn::Outcome) -> String {
    match (&outcome.agent, outcome.reply.turn, outcome.created_ms) {
        (Some(agent), Some(turn), Some(created_ms)) => ResponseId {
            agent: agent.clone(),
            created_ms,
            turn,
        }
        .format(),
        _ => turn::random_id("resp_detached_"),
    }
}

/// The typed Responses events. The response id is only known once the turn is written, so
/// `response.created` carries a provisional id and `response.completed` the durable one.
struct ResponseFrames {
    echo: Echo,
    created_at: u64,
    item_id: String,
    sequence: u64,
}

impl ResponseFrames {
    fn event(&mut self, kind: &str, mut body: Value) -> SseEvent {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        SseEvent::default().event(kind).data(body.to_string())
    }

    fn part(&self, extra: Value) -> Value {
        let mut v = json!({"item_id": self.item_id, "output_index": 0, "content_index": 0});
        if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        v
    }
}

impl turn::Frames for ResponseFrames {
    fn start(&mut self) -> Vec<SseEvent> {
        let pending_id = turn::random_id("resp_pending_");
        let r = response_object(
            &pending_id,
            self.created_at,
            &self.echo,
            "in_progress",
            vec![],
            None,
            None,
        );
        let item = output_message(&self.item_id, "", "in_progress");
        let part = json!({"type": "output_text", "text": "", "annotations": []});
        let added = self.part(json!({"part": part}));
        vec![
            self.event("response.created", json!({"response": r})),
            self.event("response.in_progress", json!({"response": r})),
            self.event(
                "response.output_item.added",
                json!({"output_index": 0, "item": item}),
            ),
            self.event("response.content_part.added", added),
        ]
    }

    fn text(&mut self, piece: &str) -> Vec<SseEvent> {
        let delta = self.part(json!({"delta": piece, "logprobs": []}));
        vec![self.event("response.output_text.delta", delta)]
    }

    fn done(&mut self, outcome: &turn::Outcome) -> Vec<SseEvent> {
        let text = &outcome.reply.text;
        let item = output_message(&self.item_id, text, "completed");
        let part = json!({"type": "output_text", "text": text, "annotations": []});
        let r = response_object(
            &response_id(outcome),
            self.created_at,
            &self.echo,
            "completed",
            vec![item.clone()],
            Some(&outcome.reply),
            Some(outcome.reply.usage()),
        );
        let text_done = self.part(json!({"text": text, "logprobs": []}));
        let part_done = self.part(json!({"part": part}));
        vec![
            self.event("response.output_text.done", text_done),
            self.event("response.content_part.done", part_done),
            self.event(
                "response.output_item.done",
                json!({"output_index": 0, "item": item}),
            ),
            self.event("response.completed", json!({"response": r})),
        ]
    }

    fn error(&mut self, error: &ApiError) -> Vec<SseEvent> {
        let body = error.body();
        let e = &body["error"];
        let fields = json!({"code": e["code"], "message": e["message"], "param": e["param"]});
        vec![self.event("error", fields)]
    }
}

/// Checks that `id` names a live turn of the agent it names (created when the id says).
fn check(state: &Shared, id: &ResponseId, raw: &str) -> Result<agent_pool::Turn, ApiError> {
    let not_found = || {
        ApiError::not_found(format!(
            "no response {raw:?}: it was deleted, never stored (store: false), or belongs to \
             another server"
        ))
    };
    let info = state.pool.info(&id.agent).map_err(|_| not_found())?;
    if info.created_unix_ms != id.created_ms {
        return Err(not_found());
    }
    state.pool.turn(&id.agent, id.turn).map_err(|_| not_found())
}

pub(crate) async fn retrieve(
    State(state): State<Shared>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = ResponseId::parse(&raw)?;
    let st = state.clone();
    let raw2 = raw.clone();
    let (turn, id, instructions) = blocking(move || {
        let turn = check(&st, &id, &raw2)?;
        // The system prompt the reply was generated with.
        let instructions = st.pool.turn_system_prompt(&id.agent, id.turn)?;
        Ok((turn, id, instructions))
    })
    .await?;
    let previous = match turn.parent {
        Parent::Turn(p) => Some(
            ResponseId {
                agent: id.agent.clone(),
                created_ms: id.created_ms,
                turn: p,
            }
            .format(),
        ),
        _ => None,
    };
    let echo = Echo {
        model: state.config.model_id.clone(),
        instructions,
        previous_response_id: previous,
        store: true,
        temperature: 1.0,
        top_p: 1.0,
        max_output_tokens: None,
    };
    let item = format!("msg_{}", id.format());
    Ok(Json(response_object(
        &raw,
        turn.unix_ms / 1000,
        &echo,
        "completed",
        vec![output_message(&item, &turn.reply, "completed")],
        None,
        turn.usage,
    )))
}

pub(crate) async fn delete(
    State(state): State<Shared>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = ResponseId::parse(&raw)?;
    let raw2 = raw.clone();
    blocking(move || {
        check(&state, &id, &raw2)?;
        state.pool.delete_turn(&id.agent, id.turn)?;
        Ok(())
    })
    .await?;
    Ok(Json(
        json!({"id": raw, "object": "response", "deleted": true}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ids_round_trip_and_refuse_anything_else() {
        let id = ResponseId {
            agent: "a_b-c".into(),
            created_ms: 1_733_000_000_123,
            turn: 42,
        };
        assert_eq!(ResponseId::parse(&id.format()).unwrap(), id);
        for bad in [
            "",
            "resp_",
            "resp_x.1",
            "resp_x.zz.1",
            "resp_x.1.-1",
            "resp_X.1.1",
            "resp_../a.1.1",
            "chatcmpl-1",
            "resp_a.1.1.1",
        ] {
            let e = ResponseId::parse(bad).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::NOT_FOUND, "{bad}");
        }
    }
}
