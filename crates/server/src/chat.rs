//! `POST /v1/chat/completions`: the client resends the whole conversation every turn; the
//! agent's transcript tree says how much of it is already computed.

use agent_pool::{Continue, Reply};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::Event as SseEvent;
use engine::Role;
use serde_json::{Value, json};

use crate::api::{self, ChatRequest, Sampling};
use crate::error::ApiError;
use crate::turn::{self, Answer, Outcome, Target};
use crate::{Shared, unix_now};

pub(crate) async fn completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = api::read_body(body, state.config.max_body_bytes).await?;
    let req: ChatRequest = api::parse(&bytes)?;
    if let Some(n) = req.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid_param(
            "n",
            format!("n = {n} is not supported: ask for one choice per request"),
        ));
    }
    api::check_tools(req.tools.as_ref(), state.config.template_has_tools)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages is empty: send at least one user message",
        ));
    }
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| m.to_message(i))
        .collect::<Result<Vec<_>, _>>()?;
    let (options, cancel) = Sampling {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop,
    }
    .options()?;
    let agent = req.routing.agent(&headers, &state.config.model_id)?;
    let target = match agent {
        Some((id, _)) => Target::Agent {
            id,
            at: Continue::Match,
            system: messages
                .first()
                .filter(|m| m.role == Role::System)
                .map(|m| m.content.clone())
                .unwrap_or_default(),
        },
        None => Target::Detached,
    };
    let model = req.routing.model_or(&state.config.model_id);
    let agent = target.agent().map(str::to_owned);
    let mut running = turn::start(&state, target, messages, options, cancel).await?;
    let cache = turn::started(&mut running).await?;
    let reply = Chunks {
        id: turn::random_id("chatcmpl-"),
        created: unix_now(),
        model,
    };
    let answer = if req.stream.unwrap_or(false) {
        let include_usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Answer::Stream(ChatFrames {
            chunks: reply,
            include_usage,
        })
    } else {
        Answer::Complete(move |outcome: &Outcome| reply.completion(&outcome.reply))
    };
    turn::respond(running, cache, agent, answer).await
}

/// `usage` of a chat completion.
fn usage(reply: &Reply) -> Value {
    let completion = reply.tokens.len();
    json!({
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": reply.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": reply.reused_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        },
    })
}

/// The fields every object of one completion shares.
struct Chunks {
    id: String,
    created: u64,
    model: String,
}

impl Chunks {
    fn completion(&self, reply: &Reply) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "refusal": null},
                "logprobs": null,
                "finish_reason": turn::finish_reason(reply),
            }],
            "usage": usage(reply),
            "timings": turn::timings(reply),
        })
    }

    fn chunk(&self, choices: Value, usage: Option<Value>, include_usage: bool) -> SseEvent {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        SseEvent::default().data(chunk.to_string())
    }

    fn delta(&self, delta: Value, finish: Option<&str>, include_usage: bool) -> SseEvent {
        self.chunk(
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]),
            None,
            include_usage,
        )
    }
}

/// The SSE stream: a role chunk, content chunks, a finish chunk sent only once the turn is
/// durable, the usage chunk if asked for, and `data: [DONE]`.
struct ChatFrames {
    chunks: Chunks,
    include_usage: bool,
}

impl turn::Frames for ChatFrames {
    fn start(&mut self) -> Vec<SseEvent> {
        let role = json!({"role": "assistant", "content": ""});
        vec![self.chunks.delta(role, None, self.include_usage)]
    }

    fn text(&mut self, piece: &str) -> Vec<SseEvent> {
        vec![
            self.chunks
                .delta(json!({"content": piece}), None, self.include_usage),
        ]
    }

    fn done(&mut self, outcome: &Outcome) -> Vec<SseEvent> {
        let reason = turn::finish_reason(&outcome.reply);
        let mut out = vec![
            self.chunks
                .delta(json!({}), Some(reason), self.include_usage),
        ];
        if self.include_usage {
            let mut u = usage(&outcome.reply);
            u["timings"] = turn::timings(&outcome.reply);
            out.push(self.chunks.chunk(json!([]), Some(u), true));
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }

    fn error(&mut self, error: &ApiError) -> Vec<SseEvent> {
        vec![SseEvent::default().data(error.body().to_string())]
    }
}
