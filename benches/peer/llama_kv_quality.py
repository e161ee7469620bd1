"""llama.cpp side of `cargo xtask bench --only kv-quality`: what a q8_0 KV cache costs against
llama.cpp's default f16 one, on the same GGUF, text and thread count as the engine's side.

The first --tokens tokens of TEXT (tokenized by the model's tokenizer, BOS as its metadata
asks) are run through two contexts that differ only in the KV cache type, f16 and q8_0, in
batches of 512 with the logits of every position. Both run with flash attention on: llama.cpp
refuses a quantized V cache without it. Figures, for q8_0 against f16:

- mean_kl, max_kl: over positions, KL(p_f16 || p_q8_0) of the next-token distributions
  (softmax of the logits in float64);
- top1_agree: the share of positions whose argmax agrees;
- greedy_agree, greedy_first_diff: at each of --cuts cut points c (cut k of N at
  floor(tokens * k / N)), the f16 context greedy-decodes --continuation tokens after the first
  c tokens, uninterrupted; the q8_0 context saves its first c tokens' sequence
  (llama_state_seq_save_file), clears its memory, loads the file back and greedy-decodes as
  many. The first continuation token comes from the logits at c - 1 (a saved sequence holds
  K/V and tokens, not logits); every later one is decoded on the loaded cache.
  greedy_agree is the share of continuation tokens equal position by position over all cuts;
  greedy_first_diff the index of the first difference per cut (--continuation when none).

The first c tokens are not prefilled again for each cut: the pass over the text already
computed them, and attention is causal, so dropping the positions from c on
(llama_memory_seq_rm) leaves in the cache what a prefill of just those c tokens computes (bit
for bit when c is a multiple of the batch of 512, as the default cuts are). Cuts run from the
last back, each continuation written over positions the next cut drops. Prefilling q8_0 again
would take minutes: llama.cpp's CPU flash attention reads a q8_0 cache row by row, several
times slower than f16. That the loaded cache decodes exactly as the one saved is checked too
(stderr).

Prints one JSON object on stdout prefixed by `PEERQ `, and the build, flags and text as
`INFO key: value` lines; everything else (per-cut detail, timings) goes to stderr.

usage: python llama_kv_quality.py MODEL.gguf TEXT [--tokens 4096] [--threads 2]
       [--continuation 64] [--cuts 4] [--workdir DIR]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--cuts", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.tokens < 2 or args.continuation < 1 or not 1 <= args.cuts <= args.tokens:
        raise SystemExit("--tokens must be at least 2, --continuation at least 1, --cuts in 1..tokens")

    started = time.perf_counter()
    n_ctx = args.tokens + args.continuation
    f16 = Context(args.model, llama_cpp.GGML_TYPE_F16, n_ctx, args.threads)
    q8 = Context(args.model, llama_cpp.GGML_TYPE_Q8_0, n_ctx, args.threads)

    vocab = llama_cpp.llama_model_get_vocab(f16.llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    with open(args.text, "rb") as f:
        text = f.read()
    all_tokens = f16.llm.tokenize(text, add_bos=add_bos, special=False)
    if len(all_tokens) < args.tokens:
        raise SystemExit(f"{args.text} has {len(all_tokens)} tokens, fewer than --tokens {args.tokens}")
    tokens = all_tokens[: args.tokens]

    system = llama_cpp.llama_print_system_info().decode().strip()
    print(f"INFO version: llama-cpp-python {getattr(llama_cpp, '__version__', '?')}", flush=True)
    print(f"INFO system: {system}", flush=True)
    print(
        f"INFO flags: n_threads={args.threads} n_threads_batch={args.threads} n_batch={BATCH} "
        f"n_ubatch={BATCH} n_ctx={n_ctx} flash_attn=on for both f16 and q8_0 (llama.cpp refuses "
        "a quantized V cache without it)",
        flush=True,
    )
    print(
        f"INFO text: {args.text}, {len(all_tokens)} tokens (BOS {'added' if add_bos else 'not added'}, "
        "as the model's metadata asks); the first "
        f"{args.tokens} used",
        flush=True,
    )

    cuts = [args.tokens * k // args.cuts for k in range(1, args.cuts + 1)]
    # Every position's next-token distribution, batch by batch on both contexts; the rows at
    # c - 1 start the continuations.
    f16.clear()
    q8.clear()
    kls = []
    agree = 0
    identical_rows = 0
    at_cut = {}
    t = time.perf_counter()
    for i in range(0, len(tokens), BATCH):
        chunk = tokens[i : i + BATCH]
        p = f16.decode(chunk, "all")
        q = q8.decode(chunk, "all")
        kls.append(kl_rows(p, q))
        agree += int((p.argmax(axis=1) == q.argmax(axis=1)).sum())
        identical_rows += int((p == q).all(axis=1).sum())
        for c in cuts:
            if i < c <= i + len(chunk):
                at_cut[c] = (p[c - 1 - i].copy(), q[c - 1 - i].copy())
    kl = np.concatenate(kls)
    print(
        f"logits of {len(tokens)} positions on both contexts: {time.perf_counter() - t:.1f} s; "
        f"{identical_rows} positions with bitwise identical logits",
        file=sys.stderr,
        flush=True,
    )

    first_diffs = {}
    same = 0
    changed = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for c in reversed(cuts):
            t = time.perf_counter()
            history = tokens[:c]
            p, q = at_cut[c]
            f16.truncate(c)
            baseline = f16.greedy(p, args.continuation)

            q8.truncate(c)
            uninterrupted = q8.greedy(q, args.continuation)
            q8.truncate(c)
            path = os.path.join(work, f"q8_0-{c}.bin")
            size = q8.save(path, history)
            q8.clear()
            q8.load(path, history)
            resumed = q8.greedy(q, args.continuation)
            os.remove(path)

            equal = [a == b for a, b in zip(baseline, resumed)]
            same += sum(equal)
            first_diffs[c] = equal.index(False) if False in equal else args.continuation
            print(
                f"cut {c}: {sum(equal)}/{args.continuation} continuation tokens equal, first "
                f"difference at {first_diffs[c]}; q8_0 state file {size} bytes, its continuation "
                f"{'the same as' if resumed == uninterrupted else 'NOT the same as'} without the "
                f"save and load; {time.perf_counter() - t:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            if resumed != uninterrupted:
                changed.append(c)

    print(
        "INFO resume: the q8_0 continuations after the save and load "
        + (
            f"differ from those without at cuts {sorted(changed)}"
            if changed
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
                "tokens": len(tokens),
                "mean_kl": float(kl.mean()),
                "max_kl": float(kl.max()),
                "top1_agree": agree / len(tokens),
                "greedy_agree": same / (len(cuts) * args.continuation),
                "greedy_first_diff": [first_diffs[c] for c in cuts],
                "cuts": cuts,
            },
            allow_nan=False,
        ),
        flush=True,
    )
    print(f"total {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
