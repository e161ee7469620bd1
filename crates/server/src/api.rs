//! The request bodies of the OpenAI API as clients send them, and their translation into the
//! pool's terms. Unknown fields are ignored: clients send many this server has no use for.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use engine::{GenerateOptions, Message, Role, SamplingConfig};
use serde::Deserialize;

use crate::error::ApiError;

/// Most stop sequences a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;
/// Reply length when a request gives none; the context's room caps it in any case.
const DEFAULT_MAX_TOKENS: usize = 2048;
/// Seed of the sampler when a request gives none, so equal requests give equal replies.
const DEFAULT_SEED: u64 = 0;

/// Reads the whole body, refusing one over `limit` bytes with 413.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))
}

/// Parses a JSON body, turning every syntax or type error into a 400 that quotes serde.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(format!(
            "could not parse the request body as JSON of the expected shape: {e}"
        ))
    })
}

/// Message content: a string, or an array of parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl Content {
    /// The text, with parts joined; a non-text part is refused.
    pub(crate) fn text(&self, param: &str) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text" | "input_text" | "output_text", Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid_param(
                                param,
                                format!(
                                    "content part of type {kind:?} is not supported: this model \
                                     reads text only"
                                ),
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// A stop parameter: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Result<Vec<String>, ApiError> {
        let v = match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if v.len() > MAX_STOP {
            return Err(ApiError::invalid_param(
                "stop",
                format!("at most {MAX_STOP} stop sequences are allowed"),
            ));
        }
        if v.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "stop",
                "a stop sequence must not be empty",
            ));
        }
        Ok(v)
    }
}

/// The sampling and length fields both APIs share.
pub(crate) struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
}

impl Sampling {
    /// Generation options, with a cancel flag the server sets when the client goes away.
    pub(crate) fn options(self) -> Result<(GenerateOptions, Arc<AtomicBool>), ApiError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature {temperature} is not in [0, 2]"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("top_p {top_p} is not in (0, 1]"),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let options = GenerateOptions {
            max_tokens: self.max_tokens.map_or(DEFAULT_MAX_TOKENS, |n| n as usize),
            sampling: SamplingConfig {
                temperature,
                top_k: None,
                top_p: (top_p < 1.0).then_some(top_p),
                seed: self.seed.unwrap_or(DEFAULT_SEED),
            },
            stop: self
                .stop
                .map(Stop::into_vec)
                .transpose()?
                .unwrap_or_default(),
            cancel: Some(Arc::clone(&cancel)),
        };
        Ok((options, cancel))
    }
}

/// The fields of a request that can name its agent.
#[derive(Debug, Deserialize)]
pub(crate) struct Routing {
    pub model: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub user: Option<String>,
}

impl Routing {
    /// Which agent the request names, from the header, `model` (unless it is `base_model`),
    /// `prompt_cache_key` or `user`, in that order, with the field it came from; `None` for an
    /// anonymous request. A name the pool cannot use is a 400 saying which field it came from.
    pub(crate) fn agent(
        &self,
        headers: &HeaderMap,
        base_model: &str,
    ) -> Result<Option<(String, &'static str)>, ApiError> {
        if let Some(v) = headers.get("x-agentkv-agent") {
            let v = v.to_str().map_err(|_| {
                ApiError::invalid_param("x-agentkv-agent", "the agent header is not visible ASCII")
            })?;
            check_agent_name(v, "the x-agentkv-agent header")?;
            return Ok(Some((v.to_owned(), "the x-agentkv-agent header")));
        }
        let named = [
            (self.model.as_deref().filter(|m| *m != base_model), "model"),
            (self.prompt_cache_key.as_deref(), "prompt_cache_key"),
            (self.user.as_deref(), "user"),
        ];
        let found = named
            .into_iter()
            .find_map(|(v, field)| v.filter(|v| !v.is_empty()).map(|v| (v.to_owned(), field)));
        if let Some((id, field)) = &found {
            check_agent_name(id, field)?;
        }
        Ok(found)
    }

    /// The model id to echo in replies.
    pub(crate) fn model_or(&self, base_model: &str) -> String {
        self.model
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| base_model.to_owned())
    }
}

/// Refuses a name the pool cannot use, saying which field it came from.
pub(crate) fn check_agent_name(id: &str, field: &str) -> Result<(), ApiError> {
    match kv_store::validate_name(id) {
        Ok(()) => Ok(()),
        Err(e) => {
            let reason = match e {
                kv_store::Error::InvalidName { reason, .. } => reason,
                _ => "it is not a valid name",
            };
            Err(ApiError::invalid_agent(
                field,
                format!(
                    "invalid agent name {id:?} from {field}: {reason}; an agent name is 1 to 64 \
                     characters of [a-z0-9_-] (or send the base model's id as `model` and no \
                     agent, for an anonymous request)"
                ),
            ))
        }
    }
}

/// One message of a Chat Completions request.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessage {
    role: String,
    content: Option<Content>,
    tool_calls: Option<serde_json::Value>,
}

/// `role` as the chat template knows it (`developer` is OpenAI's newer name for system).
pub(crate) fn role(name: &str, param: &str) -> Result<Role, ApiError> {
    match name {
        "system" | "developer" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        other => Err(ApiError::invalid_param(
            param,
            format!("unknown role {other:?}: use system, developer, user, assistant or tool"),
        )),
    }
}

/// A message from a role name and optional content (`null` content is empty text).
fn message(role_name: &str, content: Option<&Content>, param: &str) -> Result<Message, ApiError> {
    let role = role(role_name, &format!("{param}.role"))?;
    let text = match content {
        Some(c) => c.text(&format!("{param}.content"))?,
        None => String::new(),
    };
    Ok(Message::new(role, text))
}

impl ChatMessage {
    pub(crate) fn to_message(&self, i: usize) -> Result<Message, ApiError> {
        let param = format!("messages[{i}]");
        if self.tool_calls.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::invalid_param(
                &param,
                "tool calls are not supported: this model's chat template has no tool syntax",
            ));
        }
        message(&self.role, self.content.as_ref(), &param)
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(flatten)]
    pub routing: Routing,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `POST /v1/responses`.
#[derive(Debug, Deserialize)]
pub(crate) struct ResponsesRequest {
    pub input: ResponsesInput,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
    pub store: Option<bool>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stream: Option<bool>,
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(flatten)]
    pub routing: Routing,
}

/// Responses `input`: a string (one user message) or a list of message items.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ResponsesInput {
    Text(String),
    Items(Vec<InputItem>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct InputItem {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    role: Option<String>,
    content: Option<Content>,
}

impl ResponsesInput {
    pub(crate) fn messages(&self) -> Result<Vec<Message>, ApiError> {
        match self {
            ResponsesInput::Text(t) => Ok(vec![Message::user(t.clone())]),
            ResponsesInput::Items(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let param = format!("input[{i}]");
                    if let Some(kind) = item.kind.as_deref().filter(|k| *k != "message") {
                        return Err(ApiError::invalid_param(
                            &param,
                            format!(
                                "input items of type {kind:?} are not supported: send messages"
                            ),
                        ));
                    }
                    message(
                        item.role.as_deref().unwrap_or("user"),
                        item.content.as_ref(),
                        &param,
                    )
                })
                .collect(),
        }
    }
}

/// Refuses `tools` unless the template can express them.
pub(crate) fn check_tools(
    tools: Option<&Vec<serde_json::Value>>,
    template_has_tools: bool,
) -> Result<(), ApiError> {
    match tools {
        Some(t) if !t.is_empty() => Err(ApiError::invalid_param(
            "tools",
            if template_has_tools {
                "tools are not supported by agentkv serve yet: send the request without them"
            } else {
                "tools are not supported: this model's chat template has no tool syntax; send \
                 the request without them"
            },
        )),
        _ => Ok(()),
    }
}
