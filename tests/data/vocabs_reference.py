"""llama.cpp's token ids on the vocabularies tests/data/vocabs.py writes, for
tests/tokenizer_pre.rs.

Writes tests/data/vocabs_reference.json with llama.cpp's Python binding from the benchmark's
peer environment (`cargo xtask bench --peer llama.cpp` builds it):

    target/peer-venv/bin/python tests/data/vocabs_reference.py

For each vocab-*.gguf beside it: its `tokenizer.ggml.pre` (read from the file), whether
llama.cpp adds BOS by default, and the ids of each text of TEXTS tokenized as data (no BOS,
control-token text not parsed).
"""

import glob
import json
import os

from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "vocabs_reference.json")
TEXTS = [
    "IT'S 12345 $x-the.\n\nend  \n x",
    "I'm 2024's DON'T STOP'LL we'Ve",
    "he said: he\r\nis he",
    "  leading and trailing  ",
    "tabs\tand\t\tmore\t",
    "ñandú 42 中文字 😀! ",
    "a\n\n\nb \n\n c.\n",
    "x=1+2; y = 3.14159, z=-the",
    "1234567890 12 345 6",
    "",
    " ",
    "\n",
    "he",
    " he",
]


def main():
    out = {"texts": TEXTS, "files": {}}
    for path in sorted(glob.glob(os.path.join(HERE, "vocab-*.gguf"))):
        m = Llama(path, vocab_only=True, verbose=False)
        pre = m.metadata["tokenizer.ggml.pre"]
        ids = [m.tokenize(t.encode(), add_bos=False, special=False) for t in TEXTS]
        bos = m.tokenize(b"", add_bos=True, special=False)
        out["files"][os.path.basename(path)] = {"pre": pre, "add_bos": bos == [m.token_bos()],
                                             "ids": ids}
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
