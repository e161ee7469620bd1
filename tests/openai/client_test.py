#!/usr/bin/env python3
"""The official `openai` Python package against real `agentkv serve` processes.

Server A is killed with SIGKILL twice (between two chat turns, and between a response and its
follow-up) and restarted on the same home; server B runs the same conversations without
interruption. With `--kv-dtype f32` and greedy sampling, A's replies after each restart must be
B's, bit for bit, resumed from disk with the same number of cached tokens. A third server shows
that `--api-key` is enforced. With `--garage`, two more servers, D and E, share their agents
through a Garage cluster (`--store`): a conversation goes back and forth between them, each
turn answered bit for bit as uninterrupted B answers it, from the cache the other computed.

    python client_test.py --agentkv target/debug/agentkv --model path/to/MODEL.gguf \
        [--garage "$(JSON line printed by kv-remote's garage_cluster example)"]

Prints `N passed, 0 failed` (N checks) and exits 0; on the first failure prints its traceback
and `N passed, 1 failed` and exits 1. Servers it started are stopped either way.
"""

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import traceback

import openai

# Greedy and short: the model is SmolLM2-135M on CPU.
MAX_TOKENS = 24
# Seconds a server may take to load the model and print its URL.
STARTUP_TIMEOUT = 120
# Seconds a server may take to exit after SIGTERM.
SHUTDOWN_TIMEOUT = 60
READY = re.compile(r"^agentkv serve: listening on (http://127\.0\.0\.1:(\d+)/v1) \(model (.+)\)$")

SYSTEM = "You are a terse assistant. Answer in one short sentence."
TURNS = [
    "Name three colors of the rainbow.",
    "Which of them is the warmest?",
    "And which one is the coldest?",
]
INSTRUCTIONS = "You answer in one sentence."
FIRST_INPUT = "What is the largest planet?"
# Only answerable with the first exchange in context.
FOLLOW_UP = "And the smallest?"


class Checks:
    """Counts the checks that held; the first that does not raises AssertionError."""

    def __init__(self):
        self.passed = 0

    def __call__(self, condition, message):
        # Not a bare `assert`: `python -O` would skip it, and a skipped check must not pass.
        if not condition:
            raise AssertionError(message)
        self.passed += 1

    def equal(self, got, expected, what):
        self(got == expected, f"{what}: got {got!r}, expected {expected!r}")

    def raises(self, error, call, what):
        """The `error` that `call()` raises; any other exception propagates as it is."""
        try:
            call()
        except error as e:
            self.passed += 1
            return e
        raise AssertionError(f"{what} did not raise openai.{error.__name__}")


check = Checks()


def log(message):
    print(f"client_test: {message}", file=sys.stderr, flush=True)


# Every server started, so that a failure can kill those still running.
STARTED = []


class Server:
    """One `agentkv serve` process on a free port of 127.0.0.1."""

    def __init__(self, name, agentkv, model, home, api_key=None, store=None):
        """`store`: (url, host, environment) to share agents through."""
        self.name = name
        # Kept for a restart on the same home.
        self.agentkv, self.model, self.home, self.api_key = agentkv, model, home, api_key
        args = [agentkv, "--home", home, "--model", model, "--quiet"]
        env = None
        if store is not None:
            url, host, env = store
            args += ["--store", url, "--store-host", host]
        args += ["serve", "--port", "0", "--kv-dtype", "f32"]
        if api_key is not None:
            args += ["--api-key", api_key]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
        )
        STARTED.append(self)
        self.url = None
        self.model_id = None

    def restart(self, name):
        """A new server on the same home (and a new port)."""
        return Server(name, self.agentkv, self.model, self.home, self.api_key).wait_ready()

    def wait_ready(self):
        """Reads the one line the server prints once it listens."""
        lines = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            raise AssertionError(
                f"server {self.name} printed nothing within {STARTUP_TIMEOUT}s"
            ) from None
        match = READY.match(line.rstrip("\n"))
        check(
            match is not None,
            f"server {self.name}'s first stdout line is not the ready line: {line!r} "
            f"(exit code {self.proc.poll()})",
        )
        self.url, self.model_id = match.group(1), match.group(3)
        # Anything printed later must not fill the pipe and block the server.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        log(f"server {self.name} listening on {self.url}")
        return self

    def client(self, api_key="agentkv-test"):
        # No retries: a retried 500 or dropped connection would hide a server bug.
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=120)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
        check.equal(code, -signal.SIGKILL, f"server {self.name}'s exit status after SIGKILL")
        log(f"server {self.name} killed with SIGKILL")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"server {self.name} still runs {SHUTDOWN_TIMEOUT}s after SIGTERM"
            ) from None
        check.equal(code, 0, f"server {self.name}'s exit code after SIGTERM")


def extra(obj, field):
    """A field the OpenAI types do not declare (e.g. llama.cpp's `timings`), or None."""
    return (obj.model_extra or {}).get(field)


def check_timings(timings, prompt_tokens, cached_tokens, completion_tokens, where):
    check(isinstance(timings, dict), f"{where}: no llama.cpp-style `timings` object: {timings!r}")
    for field in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "cache_n"):
        check(field in timings, f"{where}: `timings` has no {field}: {timings!r}")
    check.equal(
        timings["predicted_n"],
        completion_tokens,
        f"{where}: timings.predicted_n (= completion tokens)",
    )
    check.equal(timings["cache_n"], cached_tokens, f"{where}: timings.cache_n (= cached tokens)")
    check.equal(
        timings["prompt_n"] + timings["cache_n"],
        prompt_tokens,
        f"{where}: timings.prompt_n + cache_n (= prompt tokens)",
    )


def chat_once(server, messages, where, agent="alice"):
    """A non-streaming turn of an agent: (text, usage, x-agentkv-cache)."""
    raw = server.client().chat.completions.with_raw_response.create(
        model=agent, messages=messages, max_tokens=MAX_TOKENS, temperature=0, seed=7
    )
    completion = raw.parse()
    check.equal(len(completion.choices), 1, f"{where}: number of choices")
    choice = completion.choices[0]
    check(choice.message.content, f"{where}: empty reply")
    check(
        choice.finish_reason in ("stop", "length"),
        f"{where}: finish_reason {choice.finish_reason!r}",
    )
    usage = completion.usage
    check(
        0 < usage.completion_tokens <= MAX_TOKENS,
        f"{where}: completion_tokens {usage.completion_tokens}",
    )
    check(usage.prompt_tokens_details is not None, f"{where}: usage has no prompt_tokens_details")
    check_timings(
        extra(completion, "timings"),
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens,
        usage.completion_tokens,
        where,
    )
    return choice.message.content, usage, raw.headers.get("x-agentkv-cache")


def chat_streamed(server, messages, where):
    """A streaming turn of agent alice with include_usage: (text, usage, x-agentkv-cache)."""
    raw = server.client().chat.completions.with_raw_response.create(
        model="alice",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    check(chunks, f"{where}: the stream had no chunks")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    check(
        len(finishes) == 1 and finishes[0] in ("stop", "length"),
        f"{where}: finish_reasons in the stream: {finishes!r}",
    )
    with_usage = [c for c in chunks if c.usage is not None]
    check.equal(len(with_usage), 1, f"{where}: chunks carrying usage (include_usage)")
    last = chunks[-1]
    check(
        last.usage is not None and last.choices == [],
        f"{where}: the usage chunk is not the last one with empty choices: {last!r}",
    )
    usage = last.usage
    check(text, f"{where}: empty reply")
    check(
        0 < usage.completion_tokens <= MAX_TOKENS,
        f"{where}: completion_tokens {usage.completion_tokens}",
    )
    check(usage.prompt_tokens_details is not None, f"{where}: usage has no prompt_tokens_details")
    # llama.cpp puts `timings` in the last chunk; agentkv may put it in that chunk's usage.
    check_timings(
        extra(last, "timings") or extra(usage, "timings"),
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens,
        usage.completion_tokens,
        where,
    )
    return text, usage, raw.headers.get("x-agentkv-cache")


def respond(server, where, **request):
    """A non-streaming Responses call: (response, x-agentkv-cache)."""
    raw = server.client().responses.with_raw_response.create(
        model=server.model_id, max_output_tokens=MAX_TOKENS, temperature=0, **request
    )
    response = raw.parse()
    check.equal(response.status, "completed", f"{where}: status")
    check(response.output_text, f"{where}: empty output_text")
    usage = response.usage
    check(usage is not None and usage.input_tokens > 0, f"{where}: usage {usage!r}")
    check(0 < usage.output_tokens <= MAX_TOKENS, f"{where}: output_tokens {usage.output_tokens}")
    check_timings(
        extra(response, "timings"),
        usage.input_tokens,
        usage.input_tokens_details.cached_tokens,
        usage.output_tokens,
        where,
    )
    return response, raw.headers.get("x-agentkv-cache")


def chat_across_a_restart(a, b):
    """Agent alice's three turns on A and B; A is killed between turns 2 and 3. Returns the
    restarted A."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]

    text_a, usage1_a, cache_a = chat_once(a, history, "A turn 1")
    text_b, usage1_b, cache_b = chat_once(b, history, "B turn 1")
    log(f"turn 1: {text_a!r}")
    check.equal(text_a, text_b, "turn 1 reply on A vs B (same model, greedy)")
    check.equal(usage1_a.prompt_tokens, usage1_b.prompt_tokens, "turn 1 prompt_tokens on A vs B")
    for who, cache, usage in (("A", cache_a, usage1_a), ("B", cache_b, usage1_b)):
        check.equal(cache, "miss", f"{who} turn 1 x-agentkv-cache (a new agent)")
        check.equal(
            usage.prompt_tokens_details.cached_tokens,
            0,
            f"{who} turn 1 cached_tokens (a new agent)",
        )

    history += [{"role": "assistant", "content": text_a}, {"role": "user", "content": TURNS[1]}]
    text_a, usage2_a, cache_a = chat_streamed(a, history, "A turn 2")
    text_b, usage2_b, cache_b = chat_streamed(b, history, "B turn 2")
    log(f"turn 2: {text_a!r}")
    check.equal(text_a, text_b, "turn 2 reply on A vs B")
    for who, cache, usage in (("A", cache_a, usage2_a), ("B", cache_b, usage2_b)):
        check.equal(cache, "hot", f"{who} turn 2 x-agentkv-cache (alice is in memory)")
        cached = usage.prompt_tokens_details.cached_tokens
        check(
            usage1_a.prompt_tokens < cached < usage.prompt_tokens,
            f"{who} turn 2 reused the history: cached_tokens {cached} should exceed turn 1's "
            f"prompt_tokens {usage1_a.prompt_tokens} and be below turn 2's {usage.prompt_tokens}",
        )

    a.kill9()
    a = a.restart("A'")

    history += [{"role": "assistant", "content": text_a}, {"role": "user", "content": TURNS[2]}]
    text_a, usage3_a, cache_a = chat_once(a, history, "A turn 3")
    text_b, usage3_b, cache_b = chat_once(b, history, "B turn 3")
    log(f"turn 3: {text_a!r}")
    check.equal(text_a, text_b, "turn 3 reply on A after kill -9 and restart vs uninterrupted B")
    check.equal(
        usage3_a.prompt_tokens_details.cached_tokens,
        usage3_b.prompt_tokens_details.cached_tokens,
        "turn 3 cached_tokens on restarted A vs B",
    )
    check.equal(usage3_a.prompt_tokens, usage3_b.prompt_tokens, "turn 3 prompt_tokens on A vs B")
    check.equal(
        usage3_a.completion_tokens, usage3_b.completion_tokens, "turn 3 completion_tokens on A vs B"
    )
    check.equal(cache_a, "disk", "restarted A turn 3 x-agentkv-cache (alice resumed from disk)")
    check.equal(cache_b, "hot", "B turn 3 x-agentkv-cache")
    check(
        usage3_a.prompt_tokens_details.cached_tokens > usage2_a.prompt_tokens,
        f"restarted A turn 3 reused the history: cached_tokens "
        f"{usage3_a.prompt_tokens_details.cached_tokens} <= turn 2's prompt_tokens "
        f"{usage2_a.prompt_tokens}",
    )
    return a


def responses_across_a_restart(a, b):
    """A response and its follow-up on A and B; A is killed between them. Returns the restarted
    A."""
    first = dict(input=FIRST_INPUT, instructions=INSTRUCTIONS)
    r1_a, cache_a = respond(a, "A response 1", **first)
    r1_b, cache_b = respond(b, "B response 1", **first)
    log(f"response 1: {r1_a.output_text!r} ({r1_a.id})")
    check.equal(r1_a.output_text, r1_b.output_text, "response 1 output_text on A vs B")
    check(r1_a.id.startswith("resp_"), f"response id {r1_a.id!r} does not start with resp_")
    for who, cache, r in (("A", cache_a, r1_a), ("B", cache_b, r1_b)):
        check.equal(cache, "miss", f"{who} response 1 x-agentkv-cache (a new conversation)")
        check.equal(
            r.usage.input_tokens_details.cached_tokens,
            0,
            f"{who} response 1 cached_tokens (a new conversation)",
        )

    a.kill9()
    a = a.restart("A''")

    r2_a, cache_a = respond(a, "A response 2", input=FOLLOW_UP, previous_response_id=r1_a.id)
    r2_b, cache_b = respond(b, "B response 2", input=FOLLOW_UP, previous_response_id=r1_b.id)
    log(f"response 2: {r2_a.output_text!r}")
    check.equal(r2_a.output_text, r2_b.output_text, "response 2 output_text on restarted A vs B")
    cached_a = r2_a.usage.input_tokens_details.cached_tokens
    cached_b = r2_b.usage.input_tokens_details.cached_tokens
    check.equal(cached_a, cached_b, "response 2 cached_tokens on restarted A vs B")
    check.equal(
        r2_a.usage.input_tokens, r2_b.usage.input_tokens, "response 2 input_tokens on A vs B"
    )
    first_exchange = r1_a.usage.input_tokens + r1_a.usage.output_tokens
    check(
        r2_a.usage.input_tokens > first_exchange,
        f"response 2's input ({r2_a.usage.input_tokens} tokens) does not hold response 1's "
        f"input and output ({first_exchange} tokens)",
    )
    check(
        cached_a > r1_a.usage.input_tokens,
        f"response 2 reused the conversation: cached_tokens {cached_a} <= response 1's "
        f"input_tokens {r1_a.usage.input_tokens}",
    )
    check.equal(cache_a, "disk", "restarted A response 2 x-agentkv-cache (resumed from disk)")
    check.equal(cache_b, "hot", "B response 2 x-agentkv-cache")
    check.equal(r2_a.previous_response_id, r1_a.id, "response 2's previous_response_id")

    client = a.client()
    got = client.responses.retrieve(r1_a.id)
    check.equal(got.id, r1_a.id, "retrieved response id (across the restart)")
    check.equal(got.output_text, r1_a.output_text, "retrieved response 1 output_text")
    check.equal(got.instructions, INSTRUCTIONS, "retrieved response 1 instructions")
    check.equal(got.usage, r1_a.usage, "retrieved response 1 usage (as it was reported)")
    got = client.responses.retrieve(r2_a.id)
    check.equal(got.usage, r2_a.usage, "retrieved response 2 usage (as it was reported)")
    check.equal(
        got.instructions, INSTRUCTIONS, "retrieved response 2 instructions (the conversation's)"
    )
    # Agent SDKs resend the same instructions with every previous_response_id.
    r3, cache = respond(
        a, "A response 3", input=FOLLOW_UP, previous_response_id=r2_a.id, instructions=INSTRUCTIONS
    )
    check.equal(cache, "hot", "response 3 x-agentkv-cache")
    second_exchange = r2_a.usage.input_tokens + r2_a.usage.output_tokens
    check(
        r3.usage.input_tokens_details.cached_tokens >= second_exchange - 1,
        f"response 3 with the conversation's own instructions resent reused "
        f"{r3.usage.input_tokens_details.cached_tokens} tokens, less than response 2's "
        f"input and output ({second_exchange}) but the last",
    )
    client.responses.delete(r1_a.id)
    check.raises(
        openai.NotFoundError,
        lambda: client.responses.retrieve(r1_a.id),
        f"retrieving deleted response {r1_a.id}",
    )
    return a


def shared_across_servers(agentkv, model, homes, garage, b):
    """Servers D and E share agent carol through the Garage cluster: its turns alternate
    between them, each compared with uninterrupted B answering the same conversation; then a
    response made on E is continued on D."""
    cluster = json.loads(garage)
    url = f"s3://{cluster['bucket']}/openai"

    def store(node, host):
        env = dict(os.environ)
        env.update(
            AWS_ENDPOINT_URL=cluster["endpoints"][node],
            AWS_REGION=cluster["region"],
            AWS_ACCESS_KEY_ID=cluster["key_id"],
            AWS_SECRET_ACCESS_KEY=cluster["secret"],
        )
        return (url, host, env)

    d = Server("D (--store, node 1)", agentkv, model, homes[0], store=store(0, "server-d"))
    e = Server("E (--store, node 3)", agentkv, model, homes[1], store=store(2, "server-e"))
    for s in (d, e):
        s.wait_ready()

    history = [{"role": "system", "content": SYSTEM}]
    cached_before = 0
    for i, (server, question) in enumerate(zip((d, e, d), TURNS)):
        history.append({"role": "user", "content": question})
        where = f"carol turn {i + 1} on {server.name}"
        text, usage, cache = chat_once(server, history, where, agent="carol")
        text_b, usage_b, _ = chat_once(b, history, f"carol turn {i + 1} on B", agent="carol")
        log(f"{where}: {text!r} ({cache})")
        check.equal(text, text_b, f"{where} vs uninterrupted B")
        check.equal(usage.prompt_tokens, usage_b.prompt_tokens, f"{where}: prompt_tokens vs B")
        cached = usage.prompt_tokens_details.cached_tokens
        if i > 0:
            # (Not turn 1: B adopts the system prompt its agent alice saved, D computes it.)
            check.equal(
                cached,
                usage_b.prompt_tokens_details.cached_tokens,
                f"{where}: cached_tokens vs B (whose agent stayed in memory)",
            )
        # Turn 1 makes the agent; turn 2 is E's first sight of it, loaded from the cache D
        # pushed; turn 3 finds it in D's memory, which first takes in E's turn and cache.
        expected_cache = ["miss", "disk", "hot"][i]
        check.equal(cache, expected_cache, f"{where}: x-agentkv-cache")
        if i > 0:
            check(
                cached > cached_before,
                f"{where} reused the other server's history: cached_tokens {cached} <= "
                f"{cached_before}",
            )
        cached_before = usage.prompt_tokens
        history.append({"role": "assistant", "content": text})

    r1, _ = respond(e, "response 1 on E", input=FIRST_INPUT, instructions=INSTRUCTIONS)
    r2, cache = respond(d, "response 2 on D", input=FOLLOW_UP, previous_response_id=r1.id)
    check.equal(r2.previous_response_id, r1.id, "response 2 on D continues E's response")
    check(
        r2.usage.input_tokens_details.cached_tokens > r1.usage.input_tokens,
        f"response 2 on D reused E's conversation: cached_tokens "
        f"{r2.usage.input_tokens_details.cached_tokens} <= {r1.usage.input_tokens}",
    )
    got = e.client().responses.retrieve(r2.id)
    check.equal(got.output_text, r2.output_text, "D's response retrieved on E")
    for s in (d, e):
        s.stop()


def models_and_errors(server):
    client = server.client()
    ids = [m.id for m in client.models.list()]
    check(server.model_id in ids, f"models.list() has no {server.model_id!r}: {ids!r}")
    check("alice" in ids, f"models.list() has no agent 'alice': {ids!r}")
    e = check.raises(
        openai.BadRequestError,
        lambda: client.chat.completions.create(
            model=server.model_id,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            n=2,
        ),
        "a chat completion with n=2",
    )
    check.equal(e.param, "n", "`param` of the error for n=2")


def api_key(server, key):
    check.raises(
        openai.AuthenticationError,
        lambda: server.client(api_key="not-" + key).models.list(),
        "a request with a wrong key",
    )
    ids = [m.id for m in server.client(api_key=key).models.list()]
    check(
        server.model_id in ids,
        f"with the right key, models.list() has no {server.model_id!r}: {ids!r}",
    )


def scenario(agentkv, model, homes, garage):
    expected_id = os.path.basename(model).removesuffix(".gguf")
    key = "test-key-0123"
    a = Server("A", agentkv, model, homes[0])
    b = Server("B", agentkv, model, homes[1])
    c = Server("C (--api-key)", agentkv, model, homes[2], key)
    # Started together, their models load in parallel.
    for s in (a, b, c):
        s.wait_ready()
        check.equal(s.model_id, expected_id, f"server {s.name}'s model id")

    api_key(c, key)
    c.stop()
    a = chat_across_a_restart(a, b)
    a = responses_across_a_restart(a, b)
    models_and_errors(a)
    a.stop()
    if garage is not None:
        shared_across_servers(agentkv, model, homes[3:], garage, b)
    b.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agentkv", required=True, help="the agentkv binary")
    parser.add_argument("--model", required=True, help="the GGUF file the servers load")
    parser.add_argument(
        "--garage", help="the JSON line kv-remote's garage_cluster example printed"
    )
    args = parser.parse_args()
    log(f"openai {openai.__version__}, {args.agentkv}, {args.model}")
    with tempfile.TemporaryDirectory(prefix="agentkv-openai-") as tmp:
        homes = [os.path.join(tmp, name) for name in ("a", "b", "c", "d", "e")]
        try:
            scenario(args.agentkv, args.model, homes, args.garage)
        except BaseException:
            traceback.print_exc()
            for s in STARTED:
                if s.proc.poll() is None:
                    s.proc.kill()
                    s.proc.wait()
            print(f"{check.passed} passed, 1 failed", flush=True)
            return 1
    print(f"{check.passed} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
