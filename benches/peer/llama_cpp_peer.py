"""llama.cpp side of `cargo xtask bench --peer llama.cpp`.

Measures, on the same GGUF and thread count as our engine, for each history length:
prefill tok/s, decode tok/s at that context, resume TTFT (llama_state_seq_load_file from the
page cache + a 16-token turn; --resumes times, the median reported, as the engine's bench
does) and re-prefill TTFT (history + turn from scratch), the rest once per run (`cargo xtask
bench` runs it several times, alternating with the engine's own runs, and takes the median).
The same warm-up as the engine's bench comes first: a 64-token prefill.
Prints one JSON object per history on stdout, prefixed by `PEER `, and the build and flags as
`INFO key: value` lines; everything else goes to stderr.

usage: python llama_cpp_peer.py MODEL.gguf --threads 2 --histories 512,2048,4096
       [--decode 32] [--turn 16] [--resumes 5] [--repeats 1] [--flash-attn off|on]
       [--workdir DIR]
"""

import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import time

import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--histories", default="512,2048,4096")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--turn", type=int, default=16)
    ap.add_argument("--resumes", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--flash-attn", choices=["off", "on"], default="off")
    ap.add_argument("--workdir", default=".")
    args = ap.parse_args()
    if args.resumes < 1 or args.repeats < 1:
        ap.error("--resumes and --repeats must be positive")
    histories = [int(h) for h in args.histories.split(",")]
    n_ctx = max(histories) + args.decode + args.turn + 64

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=args.flash_attn == "on",
        # llama.cpp's own tools (llama-server, llama-cli) keep only the window of a
        # sliding-window layer (common_params.swa_full = false); the library's default context
        # keeps every position. The tools' setting: a smaller state file, less attention work.
        swa_full=False,
        verbose=False,
    )
    ctx = llm.ctx
    vocab = llm.n_vocab()
    system = llama_cpp.llama_print_system_info().decode().strip()
    print(f"INFO version: llama-cpp-python {getattr(llama_cpp, '__version__', '?')}", flush=True)
    print(f"INFO system: {system}", flush=True)
    print(
        f"INFO flags: n_threads={args.threads} n_threads_batch={args.threads} n_batch=512 "
        f"n_ctx={n_ctx} flash_attn={args.flash_attn} swa_full=false",
        flush=True,
    )
    print(f"INFO resumes: {args.resumes}", flush=True)

    def clear():
        llm.reset()
        if hasattr(llama_cpp, "llama_memory_clear"):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        else:
            llama_cpp.llama_kv_self_clear(ctx)

    def timed_eval(tokens):
        t = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - t

    rng = random.Random(1234)
    os.makedirs(args.workdir, exist_ok=True)
    # Warm up threads and buffers, as the engine's bench does.
    clear()
    llm.eval([rng.randrange(vocab) for _ in range(64)])
    for n in histories:
        history = [rng.randrange(vocab) for _ in range(n)]
        turn = [rng.randrange(vocab) for _ in range(args.turn)]

        clear()
        prefill = timed_eval(history)

        dec = []
        for i in range(args.decode):
            dec.append(timed_eval([history[i % n]]))
        decode_tps = args.decode / sum(dec)

        # Save the history's state (f16 KV, llama.cpp's default) to a file.
        clear()
        llm.eval(history)
        path = os.path.join(args.workdir, f"peer-state-{n}.bin").encode()
        toks = (llama_cpp.llama_token * n)(*history)
        saved = llama_cpp.llama_state_seq_save_file(ctx, path, 0, toks, n)
        if not saved:
            raise SystemExit(f"llama_state_seq_save_file wrote nothing for {n} tokens")
        state_bytes = os.path.getsize(path)

        resume = []
        for _ in range(args.resumes):
            clear()
            out = (llama_cpp.llama_token * (n + 16))()
            count = ctypes.c_size_t(0)
            t = time.perf_counter()
            got = llama_cpp.llama_state_seq_load_file(ctx, path, 0, out, n + 16, ctypes.byref(count))
            if not got or count.value != n:
                raise SystemExit(f"llama_state_seq_load_file failed ({got}, {count.value} tokens)")
            llm.n_tokens = n
            llm.input_ids[:n] = history
            llm.eval(turn)
            resume.append(time.perf_counter() - t)

        reprefill = []
        for _ in range(args.repeats):
            clear()
            reprefill.append(timed_eval(history + turn))

        print(
            "PEER "
            + json.dumps(
                {
                    "history": n,
                    "prefill_tok_s": n / prefill,
                    "decode_tok_s": decode_tps,
                    "resume_ttft_ms": statistics.median(resume) * 1e3,
                    "reprefill_ttft_ms": statistics.median(reprefill) * 1e3,
                    "state_bytes": state_bytes,
                    "disk_bytes_per_token": state_bytes / n,
                }
            ),
            flush=True,
        )
        os.remove(path)


if __name__ == "__main__":
    main()
