//! `agentkv serve`'s router on an ephemeral loopback port with the real SmolLM2-135M-Instruct,
//! driven over HTTP: both APIs, streaming and not, every reuse path, concurrency with more
//! agents than hot slots, cancellation on disconnect, and bad input.
//!
//! These tests need the model (`cargo xtask fetch-model`); see
//! `engine::testing::real_model_path` for what happens without it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_pool::{AgentPool, Backend, PoolConfig};
use engine::Engine;
use engine::testing::real_engine;
use futures_util::StreamExt;
use kv_store::KvDtype;
use reqwest::StatusCode;
use serde_json::{Value, json};
use server::{Pool, ServerConfig};

const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";

fn open_pool(engine: &Arc<Engine>, root: &Path, config: PoolConfig) -> Arc<Pool> {
    let backend: Arc<dyn Backend> = engine.clone();
    Arc::new(AgentPool::open(root, backend, config).expect("pool"))
}

/// Serves `pool` on an ephemeral loopback port: its URL, the shutdown trigger, the task.
async fn spawn(
    pool: Arc<Pool>,
    config: ServerConfig,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = server::router(pool, config);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server::serve(listener, app, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    (url, tx, task)
}

struct TestServer {
    url: String,
    pool: Arc<Pool>,
    client: reqwest::Client,
    _home: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    async fn start(
        engine: &Arc<Engine>,
        pool_config: PoolConfig,
        config: ServerConfig,
    ) -> TestServer {
        let home = tempfile::tempdir().expect("temp dir");
        let pool = open_pool(engine, &home.path().join("pool"), pool_config);
        let (url, tx, task) = spawn(Arc::clone(&pool), config).await;
        TestServer {
            url,
            pool,
            client: reqwest::Client::new(),
            _home: home,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    async fn default(engine: &Arc<Engine>) -> TestServer {
        Self::start(engine, pool_config(), ServerConfig::new(MODEL_ID)).await
    }

    async fn post(
        &self,
        path: &str,
        body: &Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.post_with(path, body, &[]).await
    }

    async fn post_with(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let r = self.send(path, body, headers).await;
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.json().await.expect("a JSON body");
        (status, headers, body)
    }

    /// POSTs `body` with `headers` and hands back the response unread (a stream, say).
    async fn send(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.client.post(format!("{}{path}", self.url)).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request")
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("request");
        (r.status(), r.json().await.expect("a JSON body"))
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

fn pool_config() -> PoolConfig {
    PoolConfig {
        kv_dtype: KvDtype::F32,
        save_every_turn: true,
        ..PoolConfig::default()
    }
}

const SYSTEM: &str = "You are a geography teacher. Answer in one short sentence.";

fn chat(model: &str, messages: &Value, max_tokens: u32) -> Value {
    json!({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
}

fn content(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned()
}

fn cached(body: &Value) -> u64 {
    body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens")
}

fn prompt(body: &Value) -> u64 {
    body["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt_tokens")
}

fn completion(body: &Value) -> u64 {
    body["usage"]["completion_tokens"]
        .as_u64()
        .expect("completion_tokens")
}

fn header<'h>(h: &'h reqwest::header::HeaderMap, name: &str) -> &'h str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn assert_openai_error(status: StatusCode, body: &Value, want: StatusCode) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_history_is_reused_and_a_divergent_history_forks() {
    let Some(engine) = real_engine() else { return };
    let s = TestServer::default(&engine).await;
    let mut messages = json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France?"}
    ]);
    let (status, h, first) = s
        .post("/v1/chat/completions", &chat("geo", &messages, 12))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(header(&h, "x-agentkv-cache"), "miss");
    assert_eq!(cached(&first), 0, "a new agent reuses nothing: {first}");
    assert_eq!(first["timings"]["prompt_n"].as_u64(), Some(prompt(&first)));
    let a1 = content(&first);
    messages.as_array_mut().expect("array").extend([
        json!({"role": "assistant", "content": a1}),
        json!({"role": "user", "content": "And of Italy?"}),
    ]);
    let (_, h, second) = s
        .post("/v1/chat/completions", &chat("geo", &messages, 12))
        .await;
    assert_eq!(header(&h, "x-agentkv-cache"), "hot");
    // Everything but the first reply's last token and the template's end of turn is reused.
    assert!(
        cached(&second) >= prompt(&first) + completion(&first) - 1,
        "{second} after {first}"
    );
    assert_eq!(
        second["timings"]["cache_n"],
        second["usage"]["prompt_tokens_details"]["cached_tokens"]
    );

    // The same second question again, answered again: the agent follows the client back to
    // the first turn and forks there.
    let mut other = messages.clone();
    other[3]["content"] = json!("And of Spain?");
    let (_, _, forked) = s
        .post("/v1/chat/completions", &chat("geo", &other, 12))
        .await;
    assert!(
        cached(&forked) >= prompt(&first) + completion(&first) - 1,
        "{forked}"
    );
    assert!(cached(&forked) < prompt(&forked));
    let (_, agent) = s.get("/agentkv/agents/geo").await;
    let parents: Vec<&Value> = agent["turns"]
        .as_array()
        .expect("turns")
        .iter()
        .map(|t| &t["parent"])
        .collect();
    assert_eq!(
        parents,
        [&json!("system"), &json!({"turn": 0}), &json!({"turn": 0})]
    );

    // Back on the first branch: its third question reuses its whole history.
    messages.as_array_mut().expect("array").extend([
        json!({"role": "assistant", "content": content(&second)}),
        json!({"role": "user", "content": "And of Germany?"}),
    ]);
    let (_, _, third) = s
        .post("/v1/chat/completions", &chat("geo", &messages, 12))
        .await;
    let (_, agent) = s.get("/agentkv/agents/geo").await;
    assert_eq!(agent["turns"][3]["parent"], json!({"turn": 1}), "{agent}");
    assert!(cached(&third) > prompt(&first), "{third}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_conversation_equals_an_uninterrupted_one_across_a_restart() {
    let Some(engine) = real_engine() else { return };
    // Server A is stopped and a new server opens its pool; B never stops.
    let home = tempfile::tempdir().expect("temp dir");
    let root = home.path().join("pool");
    let turns = [
        "Name a large river.",
        "Where does it flow?",
        "How long is it?",
    ];
    let client = reqwest::Client::new();
    let ask = |url: String, messages: Value| {
        let client = client.clone();
        async move {
            let r = client
                .post(format!("{url}/v1/chat/completions"))
                .header("x-agentkv-agent", "river")
                .json(&chat(MODEL_ID, &messages, 16))
                .send()
                .await
                .expect("request");
            let cache = header(r.headers(), "x-agentkv-cache").to_owned();
            (cache, r.json::<Value>().await.expect("json"))
        }
    };
    let reference = TestServer::default(&engine).await;
    let mut history = vec![json!({"role": "system", "content": SYSTEM})];
    let mut pool_a = Some(open_pool(&engine, &root, pool_config()));
    for (i, question) in turns.iter().enumerate() {
        history.push(json!({"role": "user", "content": question}));
        let pool = pool_a.take().expect("pool");
        let weak = Arc::downgrade(&pool);
        let (url, tx, task) = spawn(pool, ServerConfig::new(MODEL_ID)).await;
        let (cache_a, a) = ask(url, json!(history)).await;
        let (_, b) = ask(reference.url.clone(), json!(history)).await;
        assert_eq!(content(&a), content(&b), "turn {i}");
        assert_eq!(cached(&a), cached(&b), "turn {i}");
        if i > 0 {
            assert_eq!(cache_a, "disk", "turn {i} resumed from disk");
        }
        history.push(json!({"role": "assistant", "content": content(&a)}));
        let _ = tx.send(());
        task.await.expect("server task");
        // The pool is dropped with the server (its connection and blocking tasks let go of
        // it a moment after the server stops; until then it holds the directory's lock): a
        // new one opens the same directory.
        dropped(&weak).await;
        pool_a = Some(open_pool(&engine, &root, pool_config()));
    }
    reference.stop().await;
}

/// Waits until the last handle on a pool is gone; fails after ten seconds.
async fn dropped(pool: &std::sync::Weak<Pool>) {
    for _ in 0..1000 {
        if pool.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the stopped server still holds its pool after ten seconds");
}

/// Parses an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chat_sends_chunks_usage_and_done() {
    let Some(engine) = real_engine() else { return };
    let s = TestServer::default(&engine).await;
    let messages = json!([{"role": "user", "content": "Say hello to the sea."}]);
    let mut body = chat("stream-a", &messages, 16);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.send("/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(header(r.headers(), "content-type").starts_with("text/event-stream"));
    assert_eq!(header(r.headers(), "x-agentkv-agent"), "stream-a");
    let text = r.text().await.expect("body");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finish = &chunks[chunks.len() - 2];
    assert!(
        finish["choices"][0]["finish_reason"].is_string(),
        "{finish}"
    );
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64() > Some(0));

    // The same request without streaming, to another agent: the same text.
    let (_, _, whole) = s
        .post("/v1/chat/completions", &chat("stream-b", &messages, 16))
        .await;
    assert_eq!(streamed, content(&whole));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_durable_ids_that_continue_fork_and_delete() {
    let Some(engine) = real_engine() else { return };
    let s = TestServer::default(&engine).await;
    let first_req = json!({
        "model": MODEL_ID, "input": "Name a planet.", "instructions": SYSTEM,
        "max_output_tokens": 12, "temperature": 0
    });
    let (status, _, first) = s.post("/v1/responses", &first_req).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["object"], "response");
    assert_eq!(first["status"], "completed");
    let id = first["id"].as_str().expect("id").to_owned();
    let text = first["output"][0]["content"][0]["text"]
        .as_str()
        .expect("text")
        .to_owned();
    let follow = |input: &str| {
        json!({"model": MODEL_ID, "input": input, "previous_response_id": id,
               "max_output_tokens": 12, "temperature": 0})
    };
    let (_, h, second) = s.post("/v1/responses", &follow("Is it large?")).await;
    assert_eq!(header(&h, "x-agentkv-cache"), "hot");
    let first_total = first["usage"]["input_tokens"].as_u64().expect("n")
        + first["usage"]["output_tokens"].as_u64().expect("n");
    let cached_second = second["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached");
    assert!(cached_second >= first_total - 1, "{second}");
    assert_eq!(second["previous_response_id"], json!(id));
    // A fork from the first response again reuses its history too.
    let (_, _, fork) = s.post("/v1/responses", &follow("Is it hot?")).await;
    let cached_fork = fork["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached");
    assert!(cached_fork >= first_total - 1, "{fork}");
    assert_ne!(fork["id"], second["id"]);
    // store: false continues without writing anything: the reply a stored continuation gives,
    // from the agent's cache, under an id that is not kept.
    let agent = id
        .strip_prefix("resp_")
        .and_then(|rest| rest.split('.').next())
        .expect("agent in id")
        .to_owned();
    let (_, before) = s.get(&format!("/agentkv/agents/{agent}")).await;
    let mut unstored = follow("Is it large?");
    unstored["store"] = json!(false);
    let (status, _, loose) = s.post("/v1/responses", &unstored).await;
    assert_eq!(status, StatusCode::OK, "{loose}");
    assert_eq!(loose["store"], json!(false));
    assert_eq!(
        loose["output"][0]["content"][0]["text"],
        second["output"][0]["content"][0]["text"]
    );
    let cached_loose = loose["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached");
    assert!(cached_loose >= first_total - 1, "{loose}");
    let (_, after) = s.get(&format!("/agentkv/agents/{agent}")).await;
    assert_eq!(after["turns"], before["turns"]);
    let loose_id = loose["id"].as_str().expect("id");
    let (status, _) = s.get(&format!("/v1/responses/{loose_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, got) = s.get(&format!("/v1/responses/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["output"][0]["content"][0]["text"], json!(text));
    assert_eq!(got["usage"], first["usage"]);
    assert_eq!(got["instructions"], json!(SYSTEM));

    let r = s
        .client
        .delete(format!("{}/v1/responses/{id}", s.url))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::OK);
    let (status, gone) = s.get(&format!("/v1/responses/{id}")).await;
    assert_openai_error(status, &gone, StatusCode::NOT_FOUND);
    let (status, _, cont) = s.post("/v1/responses", &follow("Again?")).await;
    assert_openai_error(status, &cont, StatusCode::NOT_FOUND);
    // The responses after the deleted one live on.
    let second_id = second["id"].as_str().expect("id");
    let (status, _) = s.get(&format!("/v1/responses/{second_id}")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, none) = s.get("/v1/responses/resp_nobody.1.0").await;
    assert_openai_error(status, &none, StatusCode::NOT_FOUND);

    // Streaming: the typed events, ending with response.completed carrying the durable id.
    let mut req = first_req.clone();
    req["stream"] = json!(true);
    let r = s.send("/v1/responses", &req, &[]).await;
    // A stored conversation without a name gets an agent of its own, named before the end.
    let agent = header(r.headers(), "x-agentkv-agent").to_owned();
    assert!(agent.starts_with("resp-"), "{agent:?}");
    let text = r.text().await.expect("body");
    let events: Vec<Value> = sse_data(&text)
        .iter()
        .map(|d| serde_json::from_str(d).expect("event JSON"))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"));
    assert!(kinds.contains(&"response.output_text.delta"));
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    let done = &events[events.len() - 1]["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], json!(deltas));
    let stream_id = done["id"].as_str().expect("id");
    assert!(
        stream_id.starts_with(&format!("resp_{agent}.")),
        "{stream_id}"
    );
    let (status, _) = s.get(&format!("/v1/responses/{stream_id}")).await;
    assert_eq!(status, StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instructions_apply_to_their_response_alone_and_a_retrieved_one_keeps_its_usage() {
    let Some(engine) = real_engine() else { return };
    let s = TestServer::default(&engine).await;
    let ask = |input: &str, previous: &Value, instructions: Option<&str>| {
        json!({"model": MODEL_ID, "input": input, "previous_response_id": previous["id"],
               "instructions": instructions, "max_output_tokens": 8, "temperature": 0})
    };
    let input = |r: &Value| r["usage"]["input_tokens"].as_u64().expect("input_tokens");
    let output = |r: &Value| r["usage"]["output_tokens"].as_u64().expect("output_tokens");
    let reused = |r: &Value| {
        r["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens")
    };
    let (status, _, first) = s
        .post(
            "/v1/responses",
            &ask("Name a planet.", &Value::Null, Some(SYSTEM)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    // The conversation's own instructions resent, as agent SDKs do: the whole cache.
    let (_, h, same) = s
        .post("/v1/responses", &ask("Is it large?", &first, Some(SYSTEM)))
        .await;
    assert_eq!(header(&h, "x-agentkv-cache"), "hot");
    assert!(
        reused(&same) >= input(&first) + output(&first) - 1,
        "{same}"
    );
    // Other instructions: this response's alone, in the system prompt's place.
    let pirate = "Talk like a pirate.";
    let (status, _, other) = s
        .post("/v1/responses", &ask("Is it large?", &first, Some(pirate)))
        .await;
    assert_eq!(status, StatusCode::OK, "{other}");
    assert_eq!(other["instructions"], json!(pirate));
    assert!(reused(&other) < input(&first) / 2, "{other}");
    // The response after it opens with the conversation's system prompt again.
    let (status, _, after) = s
        .post("/v1/responses", &ask("Is it hot?", &other, None))
        .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["instructions"], Value::Null);
    for (posted, instructions) in [(&first, SYSTEM), (&other, pirate), (&after, SYSTEM)] {
        let id = posted["id"].as_str().expect("id");
        let (status, got) = s.get(&format!("/v1/responses/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{got}");
        assert_eq!(got["usage"], posted["usage"], "{id}");
        assert_eq!(got["instructions"], json!(instructions), "{id}");
    }
    let agent = header(&h, "x-agentkv-agent");
    let turns = s.pool.transcript(agent).expect("transcript");
    let kept: Vec<Option<&str>> = turns.iter().map(|t| t.instructions.as_deref()).collect();
    assert_eq!(kept, [None, None, Some(pirate), None]);
    assert!(turns.iter().all(|t| t.input.len() == 1), "{turns:?}");
    s.stop().await;
}

static AFTER_TURN_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_after_turn() {
    AFTER_TURN_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_after_turn_hook_runs_once_per_turn() {
    let Some(engine) = real_engine() else { return };
    let mut config = ServerConfig::new(MODEL_ID);
    config.after_turn = Some(count_after_turn);
    let s = TestServer::start(&engine, pool_config(), config).await;
    let messages = json!([{"role": "user", "content": "Count to three."}]);
    for agent in ["counter", MODEL_ID] {
        let (status, _, body) = s
            .post("/v1/chat/completions", &chat(agent, &messages, 4))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // The hook runs after the reply is sent: wait for it, a bounded while.
    let calls = || AFTER_TURN_CALLS.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..100 {
        if calls() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(calls(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_request_reuses_a_shared_prefix_and_writes_nothing() {
    let Some(engine) = real_engine() else { return };
    let s = TestServer::default(&engine).await;
    // A saved system prompt is read from disk when no agent holding it is hot.
    let library = format!("Answer as a librarian. {}", "Name the shelf. ".repeat(30));
    let ask = |question: &str| {
        json!([
            {"role": "system", "content": library},
            {"role": "user", "content": question}
        ])
    };
    let (status, _, saved) = s
        .post(
            "/v1/chat/completions",
            &chat("librarian", &ask("Where are atlases?"), 4),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    assert!(
        s.pool.evict("librarian").expect("evict"),
        "the agent was hot"
    );
    let (status, h, anon) = s
        .post(
            "/v1/chat/completions",
            &chat(MODEL_ID, &ask("Where are novels?"), 4),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{anon}");
    assert_eq!(header(&h, "x-agentkv-cache"), "disk");
    assert!(
        cached(&anon) > 100 && cached(&anon) < prompt(&anon),
        "{anon} {saved}"
    );
    let (_, agent) = s.get("/agentkv/agents/librarian").await;
    assert_eq!(agent["turns"].as_array().map(Vec::len), Some(1));

    // A hot agent's cache is copied.
    let long_system = format!(
        "{SYSTEM} {}",
        "Keep every answer precise and kind. ".repeat(20)
    );
    let messages = json!([
        {"role": "system", "content": long_system},
        {"role": "user", "content": "What is the capital of Peru?"}
    ]);
    let (_, _, named) = s
        .post("/v1/chat/completions", &chat("teacher", &messages, 8))
        .await;
    let (_, models_before) = s.get("/v1/models").await;
    let other = json!([
        {"role": "system", "content": long_system},
        {"role": "user", "content": "What is the capital of Chile?"}
    ]);
    let (status, h, anon) = s
        .post("/v1/chat/completions", &chat(MODEL_ID, &other, 8))
        .await;
    assert_eq!(status, StatusCode::OK, "{anon}");
    assert_eq!(header(&h, "x-agentkv-cache"), "hot");
    // At least the system prompt came from the named agent's cache.
    assert!(
        cached(&anon) > 100 && cached(&anon) < prompt(&anon),
        "{anon} {named}"
    );
    let (_, models_after) = s.get("/v1/models").await;
    assert_eq!(
        models_before, models_after,
        "an anonymous request creates no agent"
    );
    let (_, agent) = s.get("/agentkv/agents/teacher").await;
    assert_eq!(agent["turns"].as_array().map(Vec::len), Some(1));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_agents_than_hot_slots_come_back_from_disk_concurrently() {
    let Some(engine) = real_engine() else { return };
    let s = TestServer::start(
        &engine,
        PoolConfig {
            max_hot: 1,
            ..pool_config()
        },
        ServerConfig::new(MODEL_ID),
    )
    .await;
    let names = ["one", "two", "three"];
    let ask = |name: &'static str, history: Vec<Value>| {
        let client = s.client.clone();
        let url = s.url.clone();
        async move {
            let r = client
                .post(format!("{url}/v1/chat/completions"))
                .json(&chat(name, &json!(history), 8))
                .send()
                .await
                .expect("request");
            let cache = header(r.headers(), "x-agentkv-cache").to_owned();
            (name, history, cache, r.json::<Value>().await.expect("json"))
        }
    };
    let first: Vec<_> = futures_util::future::join_all(names.iter().map(|&n| {
        ask(
            n,
            vec![json!({"role": "user", "content": format!("Say the word {n}.")})],
        )
    }))
    .await;
    let second =
        futures_util::future::join_all(first.into_iter().map(|(n, mut history, _, body)| {
            history.push(json!({"role": "assistant", "content": content(&body)}));
            history.push(json!({"role": "user", "content": "Again."}));
            ask(n, history)
        }))
        .await;
    let mut from_disk = 0;
    for (name, _, cache, body) in &second {
        assert_ne!(cache, "rebuilt", "{name} was re-prefilled");
        assert!(cached(body) > 0, "{name}: {body}");
        from_disk += usize::from(cache == "disk");
    }
    // One slot for three agents: at least two came back from disk.
    assert!(from_disk >= 2, "{second:?}");
    assert!(s.pool.stats().hot.len() <= 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_cancels_and_commits_nothing() {
    let Some(engine) = real_engine() else { return };
    let s = TestServer::default(&engine).await;
    let messages = json!([{"role": "user", "content": "Write a long story about a ship."}]);
    let mut body = chat("quitter", &messages, 2000);
    body["stream"] = json!(true);
    let r = s.send("/v1/chat/completions", &body, &[]).await;
    let mut stream = r.bytes_stream();
    // Read a few chunks, then hang up.
    for _ in 0..3 {
        stream.next().await.expect("a chunk").expect("bytes");
    }
    drop(stream);
    // The generation stops within a few tokens: the agent is free again long before 2000
    // tokens (about 30 s) could be generated, and nothing was written.
    let started = std::time::Instant::now();
    let (status, _, after) = s
        .post("/v1/chat/completions", &chat("quitter", &messages, 4))
        .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let (_, agent) = s.get("/agentkv/agents/quitter").await;
    assert_eq!(agent["turns"].as_array().map(Vec::len), Some(1), "{agent}");
    assert_eq!(agent["turns"][0]["reply"], json!(content(&after)));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_and_the_server_keeps_serving() {
    let Some(engine) = real_engine() else { return };
    let mut config = ServerConfig::new(MODEL_ID);
    config.max_body_bytes = 64 << 10;
    let s = TestServer::start(&engine, pool_config(), config).await;
    let user = json!([{"role": "user", "content": "Hi"}]);
    let raw = |body: &'static str| {
        let client = s.client.clone();
        let url = s.url.clone();
        async move {
            let r = client
                .post(format!("{url}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("request");
            (r.status(), r.json::<Value>().await.expect("json"))
        }
    };
    let (st, b) = raw("{not json").await;
    assert_openai_error(st, &b, StatusCode::BAD_REQUEST);
    let (st, b) = raw(r#"{"messages": "hello"}"#).await;
    assert_openai_error(st, &b, StatusCode::BAD_REQUEST);
    let (st, b) =
        raw(r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}"#).await;
    assert_openai_error(st, &b, StatusCode::BAD_REQUEST);
    let (st, b) = raw(r#"{"messages": [{"role": "wizard", "content": "x"}]}"#).await;
    assert_openai_error(st, &b, StatusCode::BAD_REQUEST);
    let (st, _, b) = s
        .post("/v1/chat/completions", &chat("Bad/Name", &user, 4))
        .await;
    assert_openai_error(st, &b, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["code"], "invalid_agent");
    let (st, _, b) = s
        .post_with(
            "/v1/chat/completions",
            &chat(MODEL_ID, &user, 4),
            &[("x-agentkv-agent", "..")],
        )
        .await;
    assert_openai_error(st, &b, StatusCode::BAD_REQUEST);
    let mut n2 = chat(MODEL_ID, &user, 4);
    n2["n"] = json!(2);
    let (st, _, b) = s.post("/v1/chat/completions", &n2).await;
    assert_openai_error(st, &b, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["param"], "n");
    let mut tools = chat(MODEL_ID, &user, 4);
    tools["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
    let (st, _, b) = s.post("/v1/chat/completions", &tools).await;
    assert_openai_error(st, &b, StatusCode::BAD_REQUEST);
    // Longer than the model's 8192-token context, shorter than the body limit.
    let long = "word ".repeat(9000);
    let (st, _, b) = s
        .post(
            "/v1/chat/completions",
            &chat(MODEL_ID, &json!([{"role": "user", "content": long}]), 4),
        )
        .await;
    assert_openai_error(st, &b, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let huge = "x".repeat(100 << 10);
    let (st, _, b) = s
        .post(
            "/v1/chat/completions",
            &chat(MODEL_ID, &json!([{"role": "user", "content": huge}]), 4),
        )
        .await;
    assert_openai_error(st, &b, StatusCode::PAYLOAD_TOO_LARGE);
    let (st, b) = s.get("/v1/nothing-here").await;
    assert_openai_error(st, &b, StatusCode::NOT_FOUND);
    // Still serving.
    let (st, _, b) = s
        .post("/v1/chat/completions", &chat(MODEL_ID, &user, 4))
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_required_when_set_and_a_full_queue_says_retry() {
    let Some(engine) = real_engine() else { return };
    let mut config = ServerConfig::new(MODEL_ID);
    config.api_key = Some("sesame".into());
    config.max_queue = 1;
    let s = TestServer::start(&engine, pool_config(), config).await;
    let user = json!([{"role": "user", "content": "Tell me a long story."}]);
    let (st, _, b) = s
        .post("/v1/chat/completions", &chat(MODEL_ID, &user, 4))
        .await;
    assert_openai_error(st, &b, StatusCode::UNAUTHORIZED);
    let (st, _, b) = s
        .post_with(
            "/v1/chat/completions",
            &chat(MODEL_ID, &user, 4),
            &[("authorization", "Bearer sesame2")],
        )
        .await;
    assert_openai_error(st, &b, StatusCode::UNAUTHORIZED);
    let (st, _) = s.get("/health").await;
    assert_eq!(st, StatusCode::OK, "health needs no key");

    // One long streaming request holds the only place in the queue.
    let mut long = chat("teller", &user, 400);
    long["stream"] = json!(true);
    let r = s
        .send(
            "/v1/chat/completions",
            &long,
            &[("authorization", "Bearer sesame")],
        )
        .await;
    let mut stream = r.bytes_stream();
    stream.next().await.expect("a chunk").expect("bytes");
    let r = s
        .send(
            "/v1/chat/completions",
            &chat("other", &user, 4),
            &[("authorization", "Bearer sesame")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("retry-after").is_some());
    drop(stream);
    s.stop().await;
}
