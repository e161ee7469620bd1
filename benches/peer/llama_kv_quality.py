"""llama.cpp side of `cargo xtask bench --only kv-quality`: what a q8_0 KV cache costs against
llama.cpp's default f16 one, on the same GGUF, input and thread count as the engine's side.

Two kinds of input:

- TEXT: the first --tokens tokens of a text (tokenized by the model's tokenizer, BOS as its
  metadata asks), cut k of --cuts N at floor(tokens * k / N);
- --ids FILE: the token ids the engine's example wrote with --ids-out (the demo's
  conversations rendered through the chat template with the model's replies), `{"inputs":
  [{"name": ..., "ids": [...], "cuts": [...]}]}`, each run from an empty cache.

Each input runs through two contexts that differ only in the KV cache type, f16 and q8_0, in
batches of at most 512 that also end at each cut, with the logits of every position. Both run
with flash attention on: llama.cpp refuses a quantized V cache without it. Figures, for q8_0
against f16:

- mean_kl, max_kl: over positions, KL(p_f16 || p_q8_0) of the next-token distributions
  (softmax of the logits in float64);
- top1_agree: the share of positions whose argmax agrees;
- greedy_agree, greedy_first_diff: at each cut c the f16 context greedy-decodes
  --continuation tokens after the first c tokens, uninterrupted; the q8_0 context saves its
  first c tokens' sequence (llama_state_seq_save_file), clears its memory, loads the file back
  and greedy-decodes as many. The first continuation token comes from the logits at c - 1 (a
  saved sequence holds K/V and tokens, not logits); every later one is decoded on the loaded
  cache. greedy_agree is the share of continuation tokens equal position by position over all
  cuts; greedy_first_diff the index of the first difference per cut (--continuation when
  none).

After a cut's continuations both contexts drop the positions from c on
(llama_memory_seq_rm), which leaves the K/V of the first c tokens as they were, and the pass
over the input goes on. That the loaded q8_0 cache decodes exactly as the one saved is checked
too (stderr, and an INFO line).

Prints one JSON object on stdout prefixed by `PEERQ `, and the build, flags and input as
`INFO key: value` lines; everything else (per-cut detail, timings) goes to stderr.

usage: python llama_kv_quality.py MODEL.gguf (TEXT | --ids FILE) [--tokens 4096]
       [--threads 2] [--continuation 64] [--cuts 4] [--workdir DIR]
"""

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time

import numpy as np

import llama_cpp

BATCH = 512


class Context:
    """One llama.cpp context with its own KV cache type, fed through a batch of our own so that
    every position's logits can be asked for."""

    def __init__(self, model, kv_type, n_ctx, threads):
        self.llm = llama_cpp.Llama(
            model_path=model,
            n_ctx=n_ctx,
            n_batch=BATCH,
            n_ubatch=BATCH,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=True,
            type_k=kv_type,
            type_v=kv_type,
            verbose=False,
        )
        self.ctx = self.llm.ctx
        self.n_vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self.n_past = 0

    def clear(self):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def decode(self, tokens, outputs):
        """Appends `tokens` (at most BATCH) to sequence 0; returns as float64 rows the logits of
        every token (`outputs` "all") or of the last one ("last")."""
        b = self.batch
        n = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = outputs == "all" or i == n - 1
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise SystemExit(f"llama_decode failed ({rc}) at position {self.n_past}")
        self.n_past += n
        rows = n if outputs == "all" else 1
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))
        return logits.astype(np.float64)

    def truncate(self, n):
        """Drops every position from `n` on."""
        if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), 0, n, -1):
            raise SystemExit(f"llama_memory_seq_rm refused to drop the positions from {n} on")
        self.n_past = n

    def greedy(self, first_logits, count):
        """`count` tokens greedily: the first from `first_logits`, each later one from decoding
        the one before."""
        out = [int(np.argmax(first_logits))]
        while len(out) < count:
            out.append(int(np.argmax(self.decode([out[-1]], "last")[0])))
        return out

    def save(self, path, tokens):
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        written = llama_cpp.llama_state_seq_save_file(self.ctx, path.encode(), 0, arr, len(tokens))
        if not written:
            raise SystemExit(f"llama_state_seq_save_file wrote nothing for {len(tokens)} tokens")
        return os.path.getsize(path)

    def load(self, path, tokens):
        out = (llama_cpp.llama_token * len(tokens))()
        count = ctypes.c_size_t(0)
        got = llama_cpp.llama_state_seq_load_file(
            self.ctx, path.encode(), 0, out, len(tokens), ctypes.byref(count)
        )
        if not got or count.value != len(tokens) or list(out) != list(tokens):
            raise SystemExit(f"llama_state_seq_load_file failed ({got}, {count.value} tokens)")
        self.n_past = len(tokens)


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_rows(p_logits, q_logits):
    """KL(p || q) of each row's softmax, in float64."""
    lp = log_softmax(p_logits)
    lq = log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


class Tally:
    """What the q8_0 context's runs add up, over every input."""

    def __init__(self):
        self.kls = []
        self.top1_same = 0
        self.greedy_same = 0
        self.greedy_total = 0
        self.first_diffs = []
        self.cuts = []
        self.changed = []
        self.identical_rows = 0


def measure(name, tokens, cuts, f16, q8, continuation, work, tally):
    """Runs `tokens` from empty caches on both contexts, comparing every position and
    continuing greedily at each cut."""
    f16.clear()
    q8.clear()
    ends = sorted(set(list(range(BATCH, len(tokens), BATCH)) + list(cuts) + [len(tokens)]))
    start = 0
    for end in ends:
        chunk = tokens[start:end]
        p = f16.decode(chunk, "all")
        q = q8.decode(chunk, "all")
        tally.kls.append(kl_rows(p, q))
        tally.top1_same += int((p.argmax(axis=1) == q.argmax(axis=1)).sum())
        tally.identical_rows += int((p == q).all(axis=1).sum())
        if end in cuts:
            t = time.perf_counter()
            c = end
            baseline = f16.greedy(p[-1], continuation)
            f16.truncate(c)

            uninterrupted = q8.greedy(q[-1], continuation)
            q8.truncate(c)
            path = os.path.join(work, f"q8_0-{c}.bin")
            size = q8.save(path, tokens[:c])
            q8.clear()
            q8.load(path, tokens[:c])
            resumed = q8.greedy(q[-1], continuation)
            q8.truncate(c)
            os.remove(path)

            equal = [a == b for a, b in zip(baseline, resumed)]
            tally.greedy_same += sum(equal)
            tally.greedy_total += continuation
            first = equal.index(False) if False in equal else continuation
            tally.first_diffs.append(first)
            tally.cuts.append(c)
            print(
                f"{name}, cut {c}: {sum(equal)}/{continuation} continuation tokens equal, first "
                f"difference at {first}; q8_0 state file {size} bytes, its continuation "
                f"{'the same as' if resumed == uninterrupted else 'NOT the same as'} without the "
                f"save and load; {time.perf_counter() - t:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            if resumed != uninterrupted:
                tally.changed.append(f"{name}@{c}")
        start = end


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text", nargs="?")
    ap.add_argument("--ids", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--cuts", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if (args.text is None) == (args.ids is None):
        raise SystemExit("pass a TEXT or --ids FILE (one of them)")
    if args.tokens < 2 or args.continuation < 1 or not 1 <= args.cuts <= args.tokens:
        raise SystemExit("--tokens must be at least 2, --continuation at least 1, --cuts in 1..tokens")

    started = time.perf_counter()
    if args.ids is not None:
        with open(args.ids) as f:
            inputs = [
                (i["name"], [int(t) for t in i["ids"]], [int(c) for c in i["cuts"]])
                for i in json.load(f)["inputs"]
            ]
        for name, tokens, cuts in inputs:
            if not tokens or any(not 1 <= c <= len(tokens) for c in cuts):
                raise SystemExit(
                    f"{args.ids}: input {name!r} has cuts outside its {len(tokens)} tokens"
                )
        n_ctx = max(len(t) for _, t, _ in inputs) + args.continuation
    else:
        n_ctx = args.tokens + args.continuation
    f16 = Context(args.model, llama_cpp.GGML_TYPE_F16, n_ctx, args.threads)
    q8 = Context(args.model, llama_cpp.GGML_TYPE_Q8_0, n_ctx, args.threads)

    if args.ids is None:
        vocab = llama_cpp.llama_model_get_vocab(f16.llm.model)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        with open(args.text, "rb") as f:
            text = f.read()
        all_tokens = f16.llm.tokenize(text, add_bos=add_bos, special=False)
        if len(all_tokens) < args.tokens:
            raise SystemExit(f"{args.text} has {len(all_tokens)} tokens, fewer than --tokens {args.tokens}")
        tokens = all_tokens[: args.tokens]
        cuts = [args.tokens * k // args.cuts for k in range(1, args.cuts + 1)]
        inputs = [(args.text, tokens, cuts)]
        described = (
            f"{args.text}, {len(all_tokens)} tokens (BOS {'added' if add_bos else 'not added'}, "
            f"as the model's metadata asks); the first {args.tokens} used"
        )
    else:
        described = (
            f"{args.ids}, {len(inputs)} inputs, {sum(len(t) for _, t, _ in inputs)} tokens, "
            f"{sum(len(c) for _, _, c in inputs)} cuts"
        )

    system = llama_cpp.llama_print_system_info().decode().strip()
    print(f"INFO version: llama-cpp-python {getattr(llama_cpp, '__version__', '?')}", flush=True)
    print(f"INFO system: {system}", flush=True)
    print(
        f"INFO flags: n_threads={args.threads} n_threads_batch={args.threads} n_batch={BATCH} "
        f"n_ubatch={BATCH} n_ctx={n_ctx} flash_attn=on for both f16 and q8_0 (llama.cpp refuses "
        "a quantized V cache without it)",
        flush=True,
    )
    print(f"INFO input: {described}", flush=True)

    tally = Tally()
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for name, tokens, cuts in inputs:
            t = time.perf_counter()
            measure(name, tokens, cuts, f16, q8, args.continuation, work, tally)
            print(
                f"{name}: {len(tokens)} positions, {time.perf_counter() - t:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    kl = np.concatenate(tally.kls)
    print(
        f"{len(kl)} positions, {tally.identical_rows} with bitwise identical logits",
        file=sys.stderr,
        flush=True,
    )
    print(
        "INFO resume: the q8_0 continuations after the save and load "
        + (
            f"differ from those without at cuts {tally.changed}"
            if tally.changed
            else "equal those without at every cut"
        ),
        flush=True,
    )
    print(
        "PEERQ "
        + json.dumps(
            {
                "kv": "q8_0",
                "baseline": "f16",
                "tokens": len(kl),
                "mean_kl": float(kl.mean()),
                "max_kl": float(kl.max()),
                "top1_agree": tally.top1_same / len(kl),
                "greedy_agree": tally.greedy_same / tally.greedy_total,
                "greedy_first_diff": tally.first_diffs,
                "cuts": tally.cuts,
            },
            allow_nan=False,
        ),
        flush=True,
    )
    print(f"total {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
