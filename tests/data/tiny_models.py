"""Tiny random-weight GGUF models for the architectures the engine has no real model of here
(tests/engine_tiny_models.rs holds their logits to llama.cpp's on the same files).

Writes, beside this script:
- tiny-llama-rope-freqs.gguf: `llama` with a `rope_freqs.weight` tensor (Llama 3.1's RoPE
  frequency factors, computed as llama.cpp's converter does, with the original context scaled
  down to 64 positions so that the smooth part of the curve falls on pairs that turn within
  the test's 40 tokens), f32 weights, LM head tied to the embeddings.
- tiny-qwen2.gguf: `qwen2` with non-zero q/k/v biases and an untied `output.weight`, f32.
- tiny-qwen2-q8_0.gguf: the same shapes with other weights, its projections, embeddings and
  LM head in Q8_0 (norms and biases stay f32, as llama.cpp's quantizer leaves 1-D tensors).

Every file has the shapes of a small model (dim 64, 2 layers, 4 query heads and 2 KV heads of
16, MLP 128) and a vocabulary of 268 tokens: three control tokens, the 256 GPT-2 byte symbols
and 9 merges, `engine::testing::tiny_vocab`'s, which llama.cpp loads as a `gpt2` vocabulary.
Weights are seeded normals of a realistic scale; the files are byte-for-byte reproducible:

    python3 -m venv target/gguf-venv && target/gguf-venv/bin/pip install gguf numpy
    target/gguf-venv/bin/python tests/data/tiny_models.py

Then tests/data/tiny_models_reference.py records llama.cpp's logits on them.
"""

import math
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

HERE = os.path.dirname(os.path.abspath(__file__))

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM, FFN = 64, 2, 4, 2, 16, 128
CONTEXT = 256

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "e r", "Ġ i", "Ġi s"]


def byte_to_unicode():
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    out, extra = [], 0
    for b in range(256):
        if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            out.append(chr(b))
        else:
            extra += 1
            out.append(chr(255 + extra))
    return out


def vocab():
    tokens = SPECIAL + byte_to_unicode() + [m.replace(" ", "") for m in MERGES]
    types = [gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIAL)
    )
    return tokens, [int(t) for t in types]


def llama3_rope_factors(base, dim, factor=8.0, low=1.0, high=4.0, old_context=64):
    """llama.cpp's converter (conversion/llama.py, `rope_type == "llama3"`), verbatim but for
    `old_context` (Llama 3.1: 8192)."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def add_shape(w):
    """The small model's shape into the header `w` writes."""
    w.add_context_length(CONTEXT)
    w.add_embedding_length(DIM)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)


def write(name, arch, pre, seed, *, rope_freqs=False, biases=False, untied=False, qtype=Q.F32,
          rms_eps=1e-5, rope_base=10000.0):
    rng = np.random.default_rng(seed)
    normal = lambda shape, std: (rng.standard_normal(shape) * std).astype(np.float32)
    path = os.path.join(HERE, name)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny random {arch}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == Q.Q8_0 else gguf.LlamaFileType.ALL_F32)
    add_shape(w)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(rms_eps)
    tokens, types = vocab()
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def matrix(tname, rows, cols, std):
        data = normal((rows, cols), std)
        if qtype == Q.F32:
            w.add_tensor(tname, data)
        else:
            w.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def vector(tname, n, center, std):
        w.add_tensor(tname, (center + normal((n,), std)).astype(np.float32))

    n_vocab = len(tokens)
    q_rows, kv_rows = N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM
    proj = 1.0 / math.sqrt(DIM)
    # Embeddings of unit scale (RMSNorm follows); tied, they make logits of a few units.
    matrix("token_embd.weight", n_vocab, DIM, 0.5)
    vector("output_norm.weight", DIM, 1.0, 0.1)
    if untied:
        matrix("output.weight", n_vocab, DIM, 2.0 * proj)
    if rope_freqs:
        factors = llama3_rope_factors(rope_base, HEAD_DIM)
        print(f"{name}: rope_freqs {factors.tolist()}")
        w.add_tensor("rope_freqs.weight", factors)
    for i in range(N_LAYERS):
        b = f"blk.{i}."
        vector(b + "attn_norm.weight", DIM, 1.0, 0.1)
        # Query and key weights twice the usual scale: attention far from uniform, so that
        # how positions turn shows in the logits.
        matrix(b + "attn_q.weight", q_rows, DIM, 2.0 * proj)
        matrix(b + "attn_k.weight", kv_rows, DIM, 2.0 * proj)
        matrix(b + "attn_v.weight", kv_rows, DIM, proj)
        if biases:
            # Qwen2's key biases are large (its 0.5B has entries in the tens); these are of
            # the order of the projections themselves.
            vector(b + "attn_q.bias", q_rows, 0.0, 0.5)
            vector(b + "attn_k.bias", kv_rows, 0.0, 1.0)
            vector(b + "attn_v.bias", kv_rows, 0.0, 0.2)
        matrix(b + "attn_output.weight", DIM, q_rows, proj)
        vector(b + "ffn_norm.weight", DIM, 1.0, 0.1)
        matrix(b + "ffn_gate.weight", FFN, DIM, proj)
        matrix(b + "ffn_up.weight", FFN, DIM, proj)
        matrix(b + "ffn_down.weight", DIM, FFN, 1.0 / math.sqrt(FFN))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    write("tiny-llama-rope-freqs.gguf", "llama", "smollm", 1, rope_freqs=True)
    write("tiny-qwen2.gguf", "qwen2", "qwen2", 2, biases=True, untied=True, rms_eps=1e-6,
          rope_base=1000000.0)
    write("tiny-qwen2-q8_0.gguf", "qwen2", "qwen2", 3, biases=True, untied=True,
          qtype=Q.Q8_0, rms_eps=1e-6, rope_base=1000000.0)


if __name__ == "__main__":
    main()
