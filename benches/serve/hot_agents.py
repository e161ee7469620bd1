"""How many agents `agentkv serve` keeps hot under one --max-kv-bytes, in each KV dtype.

The budget is two and a half f32 agents, measured: a server holding one agent of about
--history-tokens tokens in f32 reports the bytes of its cache (/health's kv_bytes). Then for
each of f32, f16 and q8_0 a new server on an empty home (--kv-dtype DTYPE, --max-kv-bytes
BUDGET, --max-hot above what any dtype fits) takes --agents agents one after the other, each
one turn: its own conversation of about --history-tokens tokens (the multi-round workload's
histories, each agent with its own system prompt, so that no two share a prefix) and an answer
of --answer-tokens tokens, greedy. /agentkv/agents then says which agents are hot and how many
tokens each has saved, /health the bytes the hot caches hold. Two more turns check the listing
against what the server does: the least recently used hot agent's next turn must find its cache
in memory (`x-agentkv-cache: hot`), and the agent evicted last must load its cache from disk
(`disk`).

    python hot_agents.py --agentkv target/release/agentkv --model MODEL.gguf --workdir DIR
        [--agents 10] [--history-tokens 1750] [--answer-tokens 8] [--threads 2]

Runs in the llama.cpp peer's virtualenv (llama-cpp-python for the tokenizer, openai).
Prints on stdout, for `cargo xtask bench --only hot-agents`:
  BUDGET {json}  the f32 agent the budget is measured on, and the budget
  HOT {json}     one object per dtype
  INFO key: value  the versions and command lines
Progress goes to stderr.
"""

import argparse
import json
import os
import shutil
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import multi_round as mr  # noqa: E402

DTYPES = ["f32", "f16", "q8_0"]
# Agents a server may hold hot by count: above what any dtype fits in the budget, so that the
# bytes decide.
MAX_HOT = 64
# The budget: this many f32 agents' caches, as the pool's own test of it takes.
BUDGET_AGENTS = 2.5


def log(message):
    print(f"hot_agents: {message}", file=sys.stderr, flush=True)


def get(server, path):
    """A JSON GET on the server (its URL ends in /v1)."""
    base = server.url[: -len("/v1")]
    with urllib.request.urlopen(base + path, timeout=60) as r:
        return json.load(r)


def conversations(text, agents, history_tokens):
    """Each agent's first request: its own system prompt, its history and a question."""
    histories, questions = mr.workload(text, agents, 60, history_tokens, 1)
    out = []
    for a, messages in enumerate(histories):
        messages = [dict(m) for m in messages]
        messages[0]["content"] = f"You are desk agent number {a}. " + messages[0]["content"]
        messages.append({"role": "user", "content": questions[a][0]})
        out.append(messages)
    return out


class Options:
    def __init__(self, args, budget):
        self.agentkv, self.model, self.threads = args.agentkv, args.model, args.threads
        self.max_hot, self.max_kv_bytes = MAX_HOT, budget


def serve(args, home, dtype, budget):
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    return mr.Agentkv(f"agentkv ({dtype})", Options(args, budget), home, kv_dtype=dtype)


def turn(server, agent, messages, answer_tokens):
    t = mr.ask(server, agent, messages, answer_tokens)
    log(f"{server.name} agent {agent}: prompt {t['prompt']}, cached {t['cached']}, "
        f"cache {t['cache']}, TTFT {t['ttft'] * 1e3:.0f} ms")
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agentkv", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--history-tokens", type=int, default=1750)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.agents < 2:
        ap.error("need at least two agents")

    text = mr.Text(args.model)
    convs = conversations(text, args.agents, args.history_tokens)
    info = lambda k, v: print(f"INFO {k}: {v}", flush=True)  # noqa: E731
    info("llama-cpp-python", getattr(mr.llama_cpp, "__version__", "?"))
    info("openai", mr.openai.__version__)
    homes = os.path.join(args.workdir, "homes")
    shutil.rmtree(homes, ignore_errors=True)
    os.makedirs(homes)

    try:
        # The budget, from one f32 agent's cache under no budget to speak of.
        server = serve(args, os.path.join(homes, "budget"), "f32", 1 << 40)
        turn(server, 0, convs[0], args.answer_tokens)
        health = get(server, "/health")
        listing = get(server, "/agentkv/agents")["data"]
        server.stop()
        if health["hot"] != 1:
            raise RuntimeError(f"one agent made, {health['hot']} hot")
        one = health["kv_bytes"]
        budget = int(one * BUDGET_AGENTS)
        print("BUDGET " + json.dumps({
            "f32_agent_bytes": one, "f32_agent_tokens": listing[0]["cached_tokens"],
            "budget_bytes": budget, "budget_agents": BUDGET_AGENTS,
        }), flush=True)
        shown = server.command.replace(str(1 << 40), "BUDGET")
        info("agentkv command", shown.replace("--kv-dtype f32", "--kv-dtype DTYPE"))

        for dtype in DTYPES:
            server = serve(args, os.path.join(homes, dtype), dtype, budget)
            answers = [turn(server, a, convs[a], args.answer_tokens)["text"]
                       for a in range(args.agents)]
            health = get(server, "/health")
            listing = {a["id"]: a for a in get(server, "/agentkv/agents")["data"]}
            hot = [a for a in range(args.agents) if listing[f"user-{a}"]["hot"]]
            cold = [a for a in range(args.agents) if a not in hot]
            if len(hot) != health["hot"]:
                raise RuntimeError(f"/health says {health['hot']} hot, the listing {len(hot)}")
            tokens = [listing[f"user-{a}"]["cached_tokens"] for a in hot]
            row = {
                "dtype": dtype, "agents": args.agents, "hot": len(hot),
                "kv_bytes": health["kv_bytes"], "budget_bytes": health["kv_budget_bytes"],
                "tokens_min": min(tokens, default=0), "tokens_max": max(tokens, default=0),
                # The hot ones are the most recently used: agents cold..hot in order.
                "lru_order": int(hot == list(range(args.agents - len(hot), args.agents))),
            }
            # What the listing says, checked by the server's own account of the next turn.
            def next_turn(a):
                messages = convs[a] + [
                    {"role": "assistant", "content": answers[a]},
                    {"role": "user", "content": "Which shipment in your notes came last?"},
                ]
                return turn(server, a, messages, args.answer_tokens)["cache"]

            if hot:
                row["oldest_hot_next_turn"] = next_turn(hot[0])
            if cold:
                row["last_evicted_next_turn"] = next_turn(cold[-1])
            code = server.stop()
            row["exit"] = code if isinstance(code, int) else -1000
            print("HOT " + json.dumps(row), flush=True)
    finally:
        for p in mr.STARTED:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


if __name__ == "__main__":
    main()
