"""Multi-round conversations against `agentkv serve` and llama.cpp's server, restart included.

The workload follows LMCache's multi-round QA benchmark: U users share a system prompt and each
has a history of their own; in every round each user (one after the other) asks a new question
and gets a streamed answer of at most --answer-tokens tokens, greedy. Between round
--restart-after and the next, each server is killed with SIGKILL and started again: agentkv on
the same home (its agents resume from disk), llama.cpp with an empty RAM cache. A third run, an
agentkv server that is never interrupted (fresh home), gives the replies the interrupted one
must reproduce (both store f32 caches, so equality is meaningful).

    python multi_round.py --agentkv target/release/agentkv --model MODEL.gguf --workdir DIR
        [--users 4] [--rounds 4] [--system-tokens 1000] [--history-tokens 2000]
        [--answer-tokens 100] [--threads 2] [--max-hot 2] [--max-kv-bytes BYTES]

Runs in the llama.cpp peer's virtualenv (llama-cpp-python with its [server] extra, openai).
Prints on stdout, for `cargo xtask bench --only serve`:
  ROUND {json}   one flat object of numbers per round (absent figures are left out)
  MEMORY {json}  peak RSS of each server, the KV budget and the model file's size
  INFO key: value  the versions and command lines
Progress goes to stderr.
"""

import argparse
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import llama_cpp
import openai

# Seconds a server may take to load the model and listen.
STARTUP_TIMEOUT = 180
# Seconds one request may take (a cold 3,000-token prompt takes ~20 s on two cores).
REQUEST_TIMEOUT = 900
AGENTKV_READY = re.compile(
    r"^agentkv serve: listening on (http://127\.0\.0\.1:\d+/v1) \(model (.+)\)$"
)

# Every process started, so that a failure stops them all.
STARTED = []


def log(message):
    print(f"multi_round: {message}", file=sys.stderr, flush=True)


def info(key, value):
    print(f"INFO {key}: {value}", flush=True)


# ---------------------------------------------------------------------------------------------
# The workload: deterministic text, sized with the model's own tokenizer.

PEOPLE = ["Amara", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun"]
PLACES = ["Lisbon", "Gdansk", "Valencia", "Rotterdam", "Tallinn", "Genoa", "Porto", "Hamburg",
          "Antwerp", "Marseille", "Riga", "Bilbao"]
GOODS = ["copper wire", "olive oil", "ceramic tiles", "bicycle frames", "coffee beans",
         "wool blankets", "solar panels", "glass bottles", "rubber seals", "paper rolls"]
CAUSES = ["a late ferry", "a customs inspection", "a broken forklift", "heavy rain",
          "a labelling error", "a strike at the port", "a missing invoice", "a power cut"]
TEMPLATES = [
    "On day {d}, {p} shipped {n} crates of {g} from {a} to {b}.",
    "The {a} warehouse reported that {n} units of {g} were damaged because of {c}.",
    "{p} asked the {a} office to hold the order of {g} until week {w}.",
    "A truck carrying {g} for {b} arrived {h} hours late after {c}.",
    "The customer in {b} paid {n} euros for the {g} delivered on day {d}.",
    "{p} counted {n} pallets of {g} in {a} and found {m} of them unlabelled.",
    "Because of {c}, the {g} bound for {b} was moved to the {a} depot.",
    "{p} promised the client in {b} a refund of {m} percent on the {g}.",
]


def sentence(rng):
    return rng.choice(TEMPLATES).format(
        p=rng.choice(PEOPLE), a=rng.choice(PLACES), b=rng.choice(PLACES), g=rng.choice(GOODS),
        c=rng.choice(CAUSES), n=rng.randrange(10, 900), m=rng.randrange(2, 40),
        d=rng.randrange(1, 30), w=rng.randrange(1, 52), h=rng.randrange(2, 30),
    )


class Text:
    """Seeded sentences up to a token count of the model's tokenizer."""

    def __init__(self, model):
        self.vocab = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)

    def tokens(self, text):
        return len(self.vocab.tokenize(text.encode(), add_bos=False, special=False))

    def sentences(self, rng, budget):
        """Sentences whose tokens add up to about `budget` (counted one sentence at a time,
        each with its leading space, which is how they tokenize inside the paragraph)."""
        out, used = [], 0
        while used < budget:
            s = sentence(rng)
            used += self.tokens(" " + s)
            out.append(s)
        return " ".join(out)


def workload(text, users, system_tokens, history_tokens, rounds):
    """The shared system prompt, each user's opening history (messages), and each user's
    question for each round."""
    rng = random.Random(20251201)
    system = (
        "You are the support assistant of a freight company. Answer questions about shipments "
        "from the company log below and the notes in the conversation. Be specific and give "
        "details. Company log: "
    )
    system += text.sentences(rng, max(0, system_tokens - text.tokens(system)))
    histories, questions = [], []
    for u in range(users):
        rng = random.Random(1000 + u)
        exchanges = max(1, round(history_tokens / 500))
        share = history_tokens / exchanges
        messages = [{"role": "system", "content": system}]
        for part in range(1, exchanges + 1):
            head = f"Shipment notes, part {part}: "
            body = text.sentences(rng, share * 0.9 - text.tokens(head))
            messages.append({"role": "user", "content": head + body})
            messages.append({"role": "assistant",
                             "content": f"Noted, part {part} is recorded. "
                                        + text.sentences(rng, share * 0.1)})
        histories.append(messages)
        questions.append([
            f"Question {r}: what do the notes say about the {rng.choice(GOODS)} sent to "
            f"{rng.choice(PLACES)}, and what should {rng.choice(PEOPLE)} do next? "
            "Explain in detail."
            for r in range(1, rounds + 1)
        ])
    return histories, questions


# ---------------------------------------------------------------------------------------------
# Servers.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid):
    """VmHWM and VmRSS of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Process:
    def __init__(self, name, args, env=None, stderr=None):
        self.name = name
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=stderr, text=True, env=env)
        STARTED.append(self)

    def client(self):
        """One client per server, so that its connection is reused from turn to turn. No
        retries: a retried failure would hide a server bug."""
        if getattr(self, "_client", None) is None:
            self._client = openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0,
                                         timeout=REQUEST_TIMEOUT)
        return self._client

    def peak_rss(self):
        return memory(self.proc.pid)["VmHWM"]

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        log(f"{self.name}: killed with SIGKILL")

    def stop(self):
        """SIGTERM; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "timeout"


class Agentkv(Process):
    def __init__(self, name, opts, home, kv_dtype="f32"):
        args = [opts.agentkv, "--home", home, "--model", opts.model, "--quiet", "serve",
                "--port", "0", "--max-hot", str(opts.max_hot), "--max-kv-bytes",
                str(opts.max_kv_bytes), "--kv-dtype", kv_dtype]
        # As the report shows it: placeholders for the paths.
        shown = ["agentkv", "--home", "HOME", "--model", "MODEL"] + args[5:]
        self.command = " ".join(shown)
        env = dict(os.environ, RAYON_NUM_THREADS=str(opts.threads))
        super().__init__(name, args, env)
        lines = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            raise RuntimeError(f"{name} printed nothing within {STARTUP_TIMEOUT}s") from None
        match = AGENTKV_READY.match(line.rstrip("\n"))
        if match is None:
            raise RuntimeError(f"{name}'s first line is not the ready line: {line!r} "
                               f"(exit code {self.proc.poll()})")
        self.url, self.model_id = match.group(1), match.group(2)
        # Anything printed later must not fill the pipe and block the server.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        log(f"{name}: listening on {self.url}")

    def model_for(self, user):
        return f"user-{user}"


# llama-cpp-python's log line for the tokens of a prompt it did not compute again (after
# loading the longest matching state from its RAM cache).
PREFIX_MATCH = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens")
# llama.cpp's count of the prompt tokens it computed.
PROMPT_EVAL = re.compile(r"prompt eval time =.*/\s*(\d+) tokens")


class LlamaCpp(Process):
    def __init__(self, name, opts, log_path):
        port = free_port()
        self.flags = ["--n_threads", str(opts.threads), "--n_threads_batch", str(opts.threads),
                      "--n_ctx", str(opts.peer_ctx), "--cache", "true", "--cache_type", "ram"]
        args = [sys.executable, "-m", "llama_cpp.server", "--model", opts.model, *self.flags,
                "--host", "127.0.0.1", "--port", str(port)]
        # Its (verbose) log is where it says how much of each prompt it reused.
        self.log_path = log_path
        with open(log_path, "w") as log_file:
            super().__init__(name, args, stderr=log_file)
        self.log_offset = 0
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode} while starting")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as r:
                    self.model_id = json.load(r)["data"][0]["id"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer within {STARTUP_TIMEOUT}s") from None
                time.sleep(0.5)
        log(f"{name}: listening on {self.url}")

    def model_for(self, user):
        # llama.cpp serves one model and keys its cache on tokens, not names.
        return self.model_id

    def last_prompt(self):
        """(cached, prompt) tokens of the request just answered, from the log written since
        the previous call; cached is 0 when no prefix matched."""
        with open(self.log_path, errors="replace") as f:
            f.seek(self.log_offset)
            text = f.read()
            self.log_offset = f.tell()
        matches = PREFIX_MATCH.findall(text)
        if matches:
            hit, rest = map(int, matches[-1])
            return hit, hit + rest
        evals = PROMPT_EVAL.findall(text)
        return 0, (int(evals[-1]) if evals else None)


# ---------------------------------------------------------------------------------------------
# The conversations.


def ask(server, user, messages, answer_tokens):
    """One streamed turn: TTFT (to the first chunk with text), the text, usage, cache header."""
    started = time.perf_counter()
    raw = server.client().chat.completions.with_raw_response.create(
        model=server.model_for(user), messages=messages, max_tokens=answer_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    ttft, pieces, usage = None, [], None
    for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - started
                pieces.append(choice.delta.content)
    if ttft is None:
        ttft = time.perf_counter() - started
    turn = {"ttft": ttft, "text": "".join(pieces), "cache": raw.headers.get("x-agentkv-cache")}
    if not isinstance(server, LlamaCpp):
        details = getattr(usage, "prompt_tokens_details", None)
        turn.update(prompt=getattr(usage, "prompt_tokens", None),
                    answer=getattr(usage, "completion_tokens", None),
                    cached=getattr(details, "cached_tokens", None))
    else:
        # llama.cpp's server streams no usage: its log has the prompt, and it sends one chunk
        # per token.
        turn["cached"], turn["prompt"] = server.last_prompt()
        turn["answer"] = len(pieces)
    return turn


def conversations(start, opts, histories, questions, restart):
    """All rounds against servers made by `start(name)`; with `restart`, the server is killed
    after round --restart-after and a new one started. Returns per-round lists of turns and the
    servers' peak RSS."""
    convs = [list(h) for h in histories]
    server = start("first")
    peaks, results = [], []
    for r in range(1, opts.rounds + 1):
        if restart and r == opts.restart_after + 1:
            peaks.append(server.peak_rss())
            server.kill9()
            server = start("restarted")
        turns = []
        for u in range(opts.users):
            convs[u].append({"role": "user", "content": questions[u][r - 1]})
            turn = ask(server, u, convs[u], opts.answer_tokens)
            convs[u].append({"role": "assistant", "content": turn["text"]})
            log(f"{server.name} round {r} user {u}: TTFT {turn['ttft'] * 1e3:.0f} ms, "
                f"prompt {turn['prompt']}, cached {turn['cached']}, cache {turn['cache']}, "
                f"{turn['answer']} answer tokens")
            turns.append(turn)
        results.append(turns)
    peaks.append(server.peak_rss())
    code = server.stop()
    if isinstance(server, Agentkv) and code != 0:
        log(f"{server.name}: exit code {code} after SIGTERM (expected 0)")
    return results, max(peaks), code


def percentile(xs, q):
    """Linear interpolation between order statistics (numpy's default)."""
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def figures(prefix, turns):
    """The round's figures of one server, keys prefixed."""
    ttfts = [t["ttft"] * 1e3 for t in turns]
    out = {f"{prefix}_ttft_p50_ms": percentile(ttfts, 0.5),
           f"{prefix}_ttft_p90_ms": percentile(ttfts, 0.9)}
    # A figure some turn lacks is left out rather than summed short.
    for key, name, total in (("prompt", "prompt_tokens", sum), ("cached", "cached_tokens", sum),
                             ("answer", "answer_tokens", lambda xs: sum(xs) / len(xs))):
        values = [t.get(key) for t in turns]
        if all(v is not None for v in values):
            out[f"{prefix}_{name}"] = total(values)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agentkv", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--restart-after", type=int, default=2)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--history-tokens", type=int, default=2000)
    ap.add_argument("--answer-tokens", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-hot", type=int, default=2)
    ap.add_argument("--max-kv-bytes", default=str(512 << 20))
    ap.add_argument("--peer-ctx", type=int, default=8192)
    opts = ap.parse_args()
    if opts.users < 1 or not 1 <= opts.restart_after < opts.rounds:
        ap.error("need at least one user, and a round after --restart-after")

    text = Text(opts.model)
    histories, questions = workload(text, opts.users, opts.system_tokens, opts.history_tokens,
                                    opts.rounds)
    system_tokens = text.tokens(histories[0][0]["content"])
    history = [sum(text.tokens(m["content"]) for m in h[1:]) for h in histories]
    log(f"{opts.users} users, system prompt {system_tokens} tokens, histories {history} tokens "
        "(message text, before the chat template)")
    info("llama-cpp-python", getattr(llama_cpp, "__version__", "?"))
    info("llama.cpp system info", llama_cpp.llama_print_system_info().decode().strip())
    info("openai", openai.__version__)

    # A run's homes hold GBs of f32 caches: the previous run's are removed, the last kept.
    homes = os.path.join(opts.workdir, "homes")
    shutil.rmtree(homes, ignore_errors=True)
    os.makedirs(homes)
    interrupted_home = os.path.join(homes, "interrupted")
    uninterrupted_home = os.path.join(homes, "uninterrupted")

    try:
        log("agentkv serve, killed and restarted after round "
            f"{opts.restart_after}")
        first = []

        def agentkv(home):
            def start(name):
                server = Agentkv(f"agentkv ({name})", opts, home)
                first.append(server)
                return server
            return start

        ours, ours_peak, ours_exit = conversations(
            agentkv(interrupted_home), opts, histories, questions, restart=True)
        info("agentkv command", first[0].command)
        info("agentkv model id", first[0].model_id)
        log("agentkv serve, uninterrupted")
        plain, plain_peak, _ = conversations(
            agentkv(uninterrupted_home), opts, histories, questions, restart=False)
        log("llama.cpp server, killed and restarted after round "
            f"{opts.restart_after}")
        peers = []

        def llama(name):
            log_path = os.path.join(opts.workdir, f"llama-server-{name}.log")
            server = LlamaCpp(f"llama.cpp ({name})", opts, log_path)
            peers.append(server)
            return server

        theirs, theirs_peak, _ = conversations(llama, opts, histories, questions, restart=True)
        info("llama.cpp command", "python -m llama_cpp.server --model MODEL "
             + " ".join(peers[0].flags))
    finally:
        for p in STARTED:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()

    for r in range(opts.rounds):
        row = {"round": r + 1, "users": opts.users,
               "restarted_before": int(r == opts.restart_after)}
        row.update(figures("agentkv", ours[r]))
        row.update(figures("uninterrupted", plain[r]))
        row.update(figures("llama", theirs[r]))
        row["differing"] = sum(a["text"] != b["text"] for a, b in zip(ours[r], plain[r]))
        for state in ("hot", "disk", "rebuilt", "miss"):
            row[f"agentkv_{state}"] = sum(t["cache"] == state for t in ours[r])
        print("ROUND " + json.dumps(row), flush=True)
        for u, (a, b) in enumerate(zip(ours[r], plain[r])):
            if a["text"] != b["text"]:
                log(f"round {r + 1} user {u} differs:\n  interrupted:   {a['text']!r}\n"
                    f"  uninterrupted: {b['text']!r}")
    print("MEMORY " + json.dumps({
        "agentkv_peak_rss": ours_peak,
        "uninterrupted_peak_rss": plain_peak,
        "llama_peak_rss": theirs_peak,
        "model_bytes": os.path.getsize(opts.model),
        "system_tokens": system_tokens,
        "history_tokens_mean": sum(history) / len(history),
        "agentkv_exit": ours_exit if isinstance(ours_exit, int) else -1000,
    }), flush=True)


if __name__ == "__main__":
    main()
