"""llama.cpp's logits on the tiny models tests/data/tiny_models.py writes, for
tests/engine_tiny_models.rs.

Writes tests/data/tiny_models_reference.json with llama.cpp's Python binding from the
benchmark's peer environment (`cargo xtask bench --peer llama.cpp` builds it):

    target/peer-venv/bin/python tests/data/tiny_models_reference.py

For each model: llama.cpp's logits at every position of one fixed 40-token sequence, run in
one batch with K/V in f32 and no flash attention. A file with Q8_0 weights is first converted
by llama.cpp's own `llama_model_quantize` to ALL_F32 (the values agentkv multiplies by):
run on Q8_0 weights, llama.cpp would round the activations to 8 bits too, which is not the
engine's definition. Logits are written with 8 significant digits (relative error 5e-9, far
below what the test compares).
"""

import ctypes
import json
import os
import tempfile

import numpy as np
import llama_cpp
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "tiny_models_reference.json")
MODELS = ["tiny-llama-rope-freqs.gguf", "tiny-qwen2.gguf", "tiny-qwen2-q8_0.gguf"]
VOCAB = 268
N_TOKENS = 40


def as_f32(path, tmp):
    out = os.path.join(tmp, os.path.basename(path) + ".f32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 0  # LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(path.encode(), out.encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed on {path}"
    return out


def logits(path, ids):
    m = Llama(path, n_ctx=64, n_batch=64, n_threads=2, verbose=False, logits_all=True,
              type_k=0, type_v=0, flash_attn=False)
    assert m.n_vocab() == VOCAB, m.n_vocab()
    m.eval(ids)
    rows = [[float(f"{x:.8g}") for x in np.array(m.scores[i], dtype=np.float32)]
            for i in range(len(ids))]
    del m
    return rows


def main():
    # Every id of the vocabulary is a valid input; the control tokens are avoided only
    # because nothing depends on them.
    rng = np.random.default_rng(40)
    ids = [int(t) for t in rng.integers(3, VOCAB, N_TOKENS)]
    ref = {"llama_cpp_python": llama_cpp.__version__, "ids": ids, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            path = os.path.join(HERE, name)
            run = as_f32(path, tmp) if "q8_0" in name else path
            ref["models"][name] = logits(run, ids)
            print(f"{name}: {len(ids)} positions")
    with open(OUT, "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
