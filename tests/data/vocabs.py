"""Vocabulary-only GGUFs, one per pre-tokenizer family the engine implements, whose merges
tell the families' ways of splitting text apart (tests/tokenizer_pre.rs holds the engine's
token ids to llama.cpp's on them).

Writes, beside this script, vocab-<pre>.gguf for each `tokenizer.ggml.pre` name in PRES: a
`llama` header of the tiny models' shapes without tensors, and a byte-level BPE vocabulary
(`gpt2`): three control tokens, the 256 GPT-2 byte symbols, one token per merge, and `Ġhe`,
which no merge makes (a word that is a token is taken whole where merges are ignored, as
Llama 3's are). No `tokenizer.ggml.add_bos_token`: the family's default decides. Each merge
joins across a place where some family splits and another does not:

- `3 4`, `1 2`: digits alone (qwen2, smollm), in threes (llama-bpe, default) or in runs
  (gpt-2);
- `' S`: contractions in upper case (llama-bpe and qwen2 only);
- `$ x`, `- t`: a symbol before letters (llama-bpe and qwen2 keep it with them);
- `. Ċ`, `Ġ Ċ`, `Ċ Ċ`: newlines after symbols and spaces.

The files are byte-for-byte reproducible:

    python3 -m venv target/gguf-venv && target/gguf-venv/bin/pip install gguf numpy
    target/gguf-venv/bin/python tests/data/vocabs.py

Then tests/data/vocabs_reference.py records llama.cpp's token ids on them.
"""

import os

import gguf

from tiny_models import SPECIAL, add_shape, byte_to_unicode

HERE = os.path.dirname(os.path.abspath(__file__))

PRES = ["gpt-2", "smollm", "default", "llama-bpe", "qwen2"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "e r", "Ġ i", "Ġi s",
          "3 4", "1 2", "' S", "$ x", "- t", ". Ċ", "Ġ Ċ", "Ċ Ċ"]
WHOLE = ["Ġhe"]


def write(pre):
    path = os.path.join(HERE, f"vocab-{pre}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"vocabulary only, pre-tokenizer {pre}")
    add_shape(w)
    w.add_layer_norm_rms_eps(1e-5)
    tokens = SPECIAL + byte_to_unicode() + [m.replace(" ", "") for m in MERGES] + WHOLE
    types = [gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIAL)
    )
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    for pre in PRES:
        write(pre)
