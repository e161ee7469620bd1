"""Requantizes a GGUF with llama.cpp's own quantizer, for `cargo xtask bench --requantize`.

usage: requantize.py SRC DST TYPE

TYPE is a llama.cpp file type (q4_k_m, q4_k_s, q5_k_m, q6_k, q8_0, q4_0, q4_1, q5_0, q5_1).
The source's weights are dequantized and quantized again (llama_model_quantize with
allow_requantize), as llama.cpp's `llama-quantize --allow-requantize` does; tensors whose rows
are not whole K-quant blocks get llama.cpp's fallback types. Writes DST.tmp, then renames it.
"""

import ctypes
import os
import sys

import llama_cpp

FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in FTYPES:
        raise SystemExit(f"usage: requantize.py SRC DST TYPE, TYPE one of {', '.join(FTYPES)}")
    src, dst, kind = sys.argv[1:]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = dst + ".tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0 or not os.path.exists(tmp):
        raise SystemExit(f"llama_model_quantize({src} -> {kind}) failed with {rc}")
    os.replace(tmp, dst)


if __name__ == "__main__":
    main()
