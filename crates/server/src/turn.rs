//! Running a turn for a request: admission, the agent's arrival-order lock, the pool call on a
//! blocking thread, and its text streamed back over a channel.
//!
//! The handler's side of the channel is the only link to the client: when the client goes
//! away, the receiver (or the handler holding it) is dropped, the next piece of text finds no
//! one to take it, and the generation is cancelled before another token is computed. A
//! cancelled turn commits nothing.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use agent_pool::{Continue, PoolError, Reply, Reused};
use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use engine::{GenerateOptions, Message};
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::error::ApiError;
use crate::{Pool, Shared};

/// Where a request's turn goes.
pub(crate) enum Target {
    /// An agent, created on first use with `system` as its system prompt.
    Agent {
        id: String,
        at: Continue,
        system: String,
    },
    /// An existing agent created at `created_ms`, continued after `at` (a Responses
    /// `previous_response_id`): a missing agent or turn is a 404, never a new agent.
    Continue {
        id: String,
        created_ms: u64,
        at: agent_pool::Parent,
    },
    /// No agent: nothing is written.
    Detached,
    /// Continued from a point of an existing agent created at `created_ms` (a Responses
    /// `previous_response_id` with `store: false`), written nowhere: the messages follow the
    /// conversation up to `at` and are answered detached. A leading system message is the
    /// turn's instructions, opening the conversation, as [`Continue::At`] treats it.
    DetachedFrom {
        id: String,
        created_ms: u64,
        at: agent_pool::Parent,
    },
}

impl Target {
    /// The agent the turn is written to, if any.
    pub(crate) fn agent(&self) -> Option<&str> {
        match self {
            Target::Agent { id, .. } | Target::Continue { id, .. } => Some(id),
            Target::Detached | Target::DetachedFrom { .. } => None,
        }
    }
}

/// Where the K/V of the prompt came from: the `x-agentkv-cache` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheState {
    /// The agent's cache was in memory.
    Hot,
    /// The agent's cache was read from disk (or a new agent adopted a saved system prompt).
    Disk,
    /// The agent's cache was computed again from its transcript.
    Rebuilt,
    /// Nothing was reused.
    Miss,
}

impl CacheState {
    pub(crate) fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheState::Hot => "hot",
            CacheState::Disk => "disk",
            CacheState::Rebuilt => "rebuilt",
            CacheState::Miss => "miss",
        })
    }
}

/// What the blocking side tells the handler.
pub(crate) enum Event {
    /// The prompt's cache is ready and generation starts.
    Started(CacheState),
    /// A piece of the reply.
    Text(String),
    /// The turn is durable (or failed, committing nothing). Boxed: it is large and sent once.
    Done(Result<Box<Outcome>, ApiError>),
}

/// A finished turn.
pub(crate) struct Outcome {
    pub reply: Reply,
    /// The agent the turn was written to.
    pub agent: Option<String>,
    /// When that agent was created (part of durable response ids).
    pub created_ms: Option<u64>,
}

/// Sets the cancel flag when dropped, unless disarmed: held by whatever serves the client.
pub(crate) struct CancelOnDrop {
    flag: Arc<AtomicBool>,
    armed: bool,
}

impl CancelOnDrop {
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.flag.store(true, Ordering::Relaxed);
        }
    }
}

/// A turn in progress.
pub(crate) struct Running {
    pub events: UnboundedReceiver<Event>,
    pub cancel: CancelOnDrop,
}

/// Admits the request (429 past the queue), waits for its agent's earlier requests, and starts
/// the turn on a blocking thread.
pub(crate) async fn start(
    state: &Shared,
    target: Target,
    messages: Vec<Message>,
    options: GenerateOptions,
    cancel: Arc<AtomicBool>,
) -> Result<Running, ApiError> {
    let permit = Arc::clone(&state.queue)
        .try_acquire_owned()
        .map_err(|_| ApiError::busy(state.config.max_queue))?;
    let guard = CancelOnDrop {
        flag: Arc::clone(&cancel),
        armed: true,
    };
    let agent_turn = match &target {
        Target::Agent { id, .. } | Target::Continue { id, .. } => {
            Some(state.agent_lock(id).lock_owned().await)
        }
        Target::Detached | Target::DetachedFrom { .. } => None,
    };
    let (tx, events) = unbounded_channel();
    let pool = Arc::clone(&state.pool);
    let after_turn = state.config.after_turn;
    tokio::task::spawn_blocking(move || {
        let result = run(&pool, target, messages, &options, &tx, &cancel);
        let _ = tx.send(Event::Done(result.map(Box::new)));
        drop((permit, agent_turn));
        if let Some(f) = after_turn {
            f();
        }
    });
    Ok(Running {
        events,
        cancel: guard,
    })
}

fn run(
    pool: &Pool,
    target: Target,
    messages: Vec<Message>,
    options: &GenerateOptions,
    tx: &UnboundedSender<Event>,
    cancel: &AtomicBool,
) -> Result<Outcome, ApiError> {
    let mut on_text = |piece: &str| {
        if tx.send(Event::Text(piece.to_owned())).is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
    };
    match target {
        Target::Agent { id, at, system } => {
            let creating = std::time::Instant::now();
            let created = match pool.info(&id) {
                Ok(_) => None,
                Err(PoolError::UnknownAgent { .. }) => {
                    Some(pool.create_agent(&id, "openai", &system)?)
                }
                Err(e) => return Err(e.into()),
            };
            let creation = creating.elapsed();
            let load = pool.load_agent(&id)?;
            let cache = match (&created, &load) {
                (Some(c), _) if c.adopted => CacheState::Disk,
                (Some(_), _) => CacheState::Miss,
                (None, l) if l.rebuilt.is_some() => CacheState::Rebuilt,
                (None, l) if l.resumed_from_disk => CacheState::Disk,
                (None, _) => CacheState::Hot,
            };
            let _ = tx.send(Event::Started(cache));
            // A system prompt computed by create_agent just now is not counted as reused (the
            // pool sees to that); its time is this request's prefill.
            let mut reply = pool.respond(&id, at, messages, options, &mut on_text)?;
            if created.is_some_and(|c| !c.adopted) {
                reply.timings.prefill += creation;
            }
            Ok(Outcome {
                reply,
                created_ms: Some(pool.info(&id)?.created_unix_ms),
                agent: Some(id),
            })
        }
        Target::Continue { id, created_ms, at } => {
            still_there(pool, &id, created_ms)?;
            let load = pool.load_agent(&id)?;
            let cache = match &load {
                l if l.rebuilt.is_some() => CacheState::Rebuilt,
                l if l.resumed_from_disk => CacheState::Disk,
                _ => CacheState::Hot,
            };
            let _ = tx.send(Event::Started(cache));
            let reply = pool.respond(&id, Continue::At(at), messages, options, &mut on_text)?;
            Ok(Outcome {
                reply,
                created_ms: Some(created_ms),
                agent: Some(id),
            })
        }
        Target::DetachedFrom { id, created_ms, at } => {
            still_there(pool, &id, created_ms)?;
            let conversation = pool.conversation_at(&id, at, messages)?;
            detached(pool, &conversation, options, tx, &mut on_text)
        }
        Target::Detached => detached(pool, &messages, options, tx, &mut on_text),
    }
}

/// Checks that the agent a response id names is the one that made it (not deleted, nor
/// deleted and created again).
fn still_there(pool: &Pool, id: &str, created_ms: u64) -> Result<(), ApiError> {
    let gone = || {
        ApiError::not_found(format!(
            "the conversation this response id continues is gone: agent {id:?} was deleted \
             (or re-created); start a new conversation"
        ))
    };
    let info = pool.info(id).map_err(|e| match e {
        PoolError::UnknownAgent { .. } => gone(),
        e => e.into(),
    })?;
    if info.created_unix_ms != created_ms {
        return Err(gone());
    }
    Ok(())
}

/// Answers `messages` without an agent.
fn detached(
    pool: &Pool,
    messages: &[Message],
    options: &GenerateOptions,
    tx: &UnboundedSender<Event>,
    on_text: &mut dyn FnMut(&str),
) -> Result<Outcome, ApiError> {
    let reply = pool.respond_detached(
        messages,
        options,
        &mut |reused| {
            let cache = match reused {
                Reused { tokens: 0, .. } => CacheState::Miss,
                Reused {
                    from_disk: true, ..
                } => CacheState::Disk,
                Reused { .. } => CacheState::Hot,
            };
            let _ = tx.send(Event::Started(cache));
        },
        on_text,
    )?;
    Ok(Outcome {
        reply,
        agent: None,
        created_ms: None,
    })
}

/// Waits for the turn to start: the cache state for the reply's header, or the error that
/// ended it before any text.
pub(crate) async fn started(running: &mut Running) -> Result<CacheState, ApiError> {
    match running.events.recv().await {
        Some(Event::Started(state)) => Ok(state),
        Some(Event::Done(Err(e))) => Err(e),
        Some(Event::Text(_) | Event::Done(Ok(_))) | None => Err(ApiError::internal(
            "the turn ended without starting: this is a bug in agentkv serve",
        )),
    }
}

/// Collects a whole reply (the non-streaming APIs).
pub(crate) async fn finish(mut running: Running) -> Result<Outcome, ApiError> {
    while let Some(event) = running.events.recv().await {
        if let Event::Done(result) = event {
            running.cancel.disarm();
            return result.map(|outcome| *outcome);
        }
    }
    Err(ApiError::internal(
        "the turn stopped without a result: this is a bug in agentkv serve",
    ))
}

/// What one API makes of a turn's events: its SSE events.
pub(crate) trait Frames: Send + 'static {
    /// Sent before any text.
    fn start(&mut self) -> Vec<SseEvent>;
    /// A piece of the reply.
    fn text(&mut self, piece: &str) -> Vec<SseEvent>;
    /// The turn is durable: the last events.
    fn done(&mut self, outcome: &Outcome) -> Vec<SseEvent>;
    /// The turn failed after the stream started.
    fn error(&mut self, error: &ApiError) -> Vec<SseEvent>;
}

struct SseState<F> {
    frames: F,
    running: Running,
    pending: VecDeque<SseEvent>,
    ended: bool,
}

/// The turn as a stream of SSE events. Dropping the stream (the client went away) drops the
/// channel's receiver and the cancel guard: the generation stops.
pub(crate) fn sse<F: Frames>(
    running: Running,
    mut frames: F,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let state = SseState {
        pending: frames.start().into(),
        frames,
        running,
        ended: false,
    };
    Sse::new(futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(e), st));
            }
            if st.ended {
                return None;
            }
            let more = match st.running.events.recv().await {
                Some(Event::Text(t)) => st.frames.text(&t),
                Some(Event::Started(_)) => Vec::new(),
                Some(Event::Done(result)) => {
                    st.running.cancel.disarm();
                    st.ended = true;
                    match result {
                        Ok(outcome) => st.frames.done(&outcome),
                        Err(e) => st.frames.error(&e),
                    }
                }
                None => {
                    st.ended = true;
                    Vec::new()
                }
            };
            st.pending.extend(more);
        }
    }))
}

/// How a turn is answered: as a stream of frames, or in one JSON body made of its outcome once
/// the turn is durable.
pub(crate) enum Answer<F, B> {
    Stream(F),
    Complete(B),
}

/// The HTTP response to a turn: streamed or complete, named by the agent (and, complete, the
/// turn) it was written to, with the `x-agentkv-cache` header.
pub(crate) async fn respond<F, B>(
    running: Running,
    cache: CacheState,
    agent: Option<String>,
    answer: Answer<F, B>,
) -> Result<Response, ApiError>
where
    F: Frames,
    B: FnOnce(&Outcome) -> Value,
{
    let mut response = match answer {
        Answer::Stream(frames) => {
            let mut r = sse(running, frames).into_response();
            // The turn's number is not known before the end.
            if let Some(agent) = agent.as_deref().and_then(|a| a.parse().ok()) {
                r.headers_mut().insert("x-agentkv-agent", agent);
            }
            r
        }
        Answer::Complete(body) => {
            let outcome = finish(running).await?;
            let mut r = axum::Json(body(&outcome)).into_response();
            let headers = r.headers_mut();
            if let Some(agent) = outcome.agent.as_deref().and_then(|a| a.parse().ok()) {
                headers.insert("x-agentkv-agent", agent);
            }
            if let Some(turn) = outcome.reply.turn {
                headers.insert("x-agentkv-turn", HeaderValue::from(turn));
            }
            r
        }
    };
    response
        .headers_mut()
        .insert("x-agentkv-cache", cache.header());
    Ok(response)
}

/// Why generation stopped, as OpenAI names it.
pub(crate) fn finish_reason(reply: &Reply) -> &'static str {
    match reply.stop {
        engine::StopReason::MaxTokens => "length",
        _ => "stop",
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// llama.cpp's `timings` object: tokens reused, prefilled and generated, and their times.
pub(crate) fn timings(reply: &Reply) -> Value {
    let prompt_n = reply.prompt_tokens - reply.reused_tokens;
    let predicted_n = reply.tokens.len();
    let per_second = |n: usize, d: std::time::Duration| {
        if d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    };
    json!({
        "cache_n": reply.reused_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": ms(reply.timings.prefill),
        "prompt_per_second": per_second(prompt_n, reply.timings.prefill),
        "predicted_n": predicted_n,
        "predicted_ms": ms(reply.timings.decode),
        "predicted_per_second": per_second(predicted_n, reply.timings.decode),
        "load_ms": ms(reply.timings.load),
        "commit_ms": ms(reply.timings.commit),
    })
}

/// Runs pool calls on a blocking thread: they take file and agent locks.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a worker thread failed: {e}")))?
}

/// A fresh random id with `prefix` (for ids that need not be durable).
pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}{:024x}", rand::random::<u128>() >> 32)
}
