"""llama.cpp's reference for the Gemma 3 270M tests (tests/engine_gemma3.rs).

Writes tests/data/gemma3_reference.json from the Q4_K_M GGUF that
`cargo xtask fetch-model gemma3-270m` installs, with llama.cpp's Python binding from the
benchmark's peer environment (`cargo xtask bench --peer llama.cpp` builds it):

    target/peer-venv/bin/python tests/data/gemma3_reference.py [MODEL.gguf]

Two references:
- `logits`: llama.cpp's logits on the same weights dequantized to f32 (llama.cpp's own
  `llama_model_quantize` to ALL_F32 from the Q4_K_M file: the values agentkv computes with),
  K/V in f32, no flash attention, at positions before, at and well past the 512-token sliding
  window of a 1,500-token text; the 32 largest logits of each position.
- `greedy`: llama.cpp's greedy continuations on the Q4_K_M GGUF itself, as users run it
  (default settings), with each step's margin between its first and second choice. llama.cpp
  multiplies quantized weights by activations rounded to 8 bits, so at a near-tie the two
  engines may rightly choose differently; the test compares the steps with a clear margin.
"""

import json
import os
import sys
import tempfile
import ctypes

import numpy as np
import llama_cpp
from llama_cpp import Llama

HOME = os.environ.get("AGENTKV_HOME") or os.path.join(
    os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "agentkv"
)
MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HOME, "models", "gemma-3-270m-Q4_K_M.gguf")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemma3_reference.json")

# A text that ships with the machine would do; the ids are recorded, so the test does not
# need the text. Here: the first paragraphs of the GNU GPL v3 (Debian's common-licenses).
TEXT_FILE = "/usr/share/common-licenses/GPL-3"
LOGIT_LEN = 1500
LOGIT_POSITIONS = [0, 100, 300, 510, 511, 512, 513, 767, 1023, 1400, 1499]
TOP = 32
GREEDY_STEPS = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


def top(scores, k):
    order = np.argsort(-scores, kind="stable")[:k]
    return [[int(i), float(scores[i])] for i in order]


def main():
    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "f32.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = 0  # LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(MODEL.encode(), f32.encode(), ctypes.byref(params))
        assert rc == 0, "llama_model_quantize failed"
        m = Llama(f32, n_ctx=2048, n_threads=2, verbose=False, logits_all=True,
                  type_k=0, type_v=0, flash_attn=False, n_batch=512)
        text = open(TEXT_FILE, encoding="utf-8").read()
        ids = m.tokenize(text.encode(), add_bos=True, special=False)[:LOGIT_LEN]
        m.eval(ids)
        logits = {
            "ids": ids,
            "positions": [{"position": p, "top": top(np.array(m.scores[p]), TOP)}
                          for p in LOGIT_POSITIONS],
        }
        del m

    m = Llama(MODEL, n_ctx=2048, n_threads=2, verbose=False, logits_all=True)
    prompts = [m.tokenize(p.encode(), add_bos=True, special=False) for p in PROMPTS]
    # One prompt longer than the window: the text's first 600 tokens.
    prompts.append(ids[:600])
    greedy = []
    for prompt in prompts:
        m.reset()
        m.eval(prompt)
        tokens, margins = [], []
        for _ in range(GREEDY_STEPS):
            s = np.array(m.scores[m.n_tokens - 1])
            (a, sa), (_, sb) = top(s, 2)
            tokens.append(a)
            margins.append(sa - sb)
            m.eval([a])
        greedy.append({"prompt": prompt, "tokens": tokens, "margins": margins})

    ref = {
        "model_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "llama_cpp_python": llama_cpp.__version__,
        "logits": logits,
        "greedy": greedy,
    }
    with open(OUT, "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
