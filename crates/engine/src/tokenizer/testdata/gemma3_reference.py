"""Records llama.cpp's token ids for Gemma 3's SentencePiece vocabulary, for the tokenizer
tests (`gemma3_reference.json`, next to this script).

For every string below: the ids of llama.cpp's `llama_tokenize` with add_special on (BOS
added, as the file asks) and parse_special off and on, and `llama_detokenize` of those ids
with special tokens rendered and nothing removed (what our `Tokenizer::decode` does).

usage: target/peer-venv/bin/python crates/engine/src/tokenizer/testdata/gemma3_reference.py \
           [MODEL.gguf]
(default model: $AGENTKV_HOME/models/gemma-3-270m-Q4_K_M.gguf, else ~/.local/share/agentkv/...;
target/peer-venv is the llama-cpp-python that `cargo xtask bench --peer llama.cpp` installs)
"""

import ctypes
import json
import os
import sys
from importlib import metadata

import llama_cpp

MODEL_FILE = "gemma-3-270m-Q4_K_M.gguf"

PARAGRAPH = (
    "The history of computing is a story of layers. At the bottom sit transistors, "
    "switching billions of times per second; above them, logic gates, adders and "
    "registers; then instruction sets, operating systems, compilers, and finally the "
    "programs people actually use. Each layer hides the one below it, and each was "
    "built by people who rarely had to think about the others. That is the point: an "
    "abstraction lets you forget. But abstractions leak. A cache miss costs a hundred "
    "cycles; a page fault, a hundred thousand. A network call that usually takes two "
    "milliseconds sometimes takes two seconds, and the program that assumed otherwise "
    "falls over.\n\n"
    "Good engineers keep two pictures in their heads at once - the clean one the "
    "abstraction promises, and the messy one underneath - and they know when to switch "
    "between them. They measure before they optimise (\"premature optimisation is the "
    "root of all evil\", as Knuth wrote in 1974), they read error messages to the end, "
    "and they write down what they learned so the next person does not have to learn it "
    "again. In 2023, roughly 28.7 million developers worked worldwide; by 2030 the "
    "figure may exceed 45,000,000.\n\n"
    "Consider a key-value cache for a language model. Each token of a prompt produces a "
    "key and a value vector per layer and per head: for a model with 18 layers, 1 "
    "key-value head and 256 dimensions per head, that is 18 x 2 x 256 = 9,216 numbers "
    "per token, or 36,864 bytes in f32. A conversation of 4,096 tokens therefore holds "
    "about 151 MB of state - small enough to keep on disk, large enough that recomputing "
    "it costs real time. Saving it and loading it back is the whole trick: résumé, "
    "café, naïve, Ångström; 日本語, 中文, 한국어; emoji 🦀🎉 and symbols ∑∫√∞ all travel "
    "through the same pipeline.\n\n"
    "A tokenizer sits at the very front of all this. It turns text into integers, and the "
    "model never sees anything else: not letters, not words, only ids. Two tokenizers that "
    "disagree on a single id for the same text give the model two different prompts, and "
    "a cache computed for one is useless for the other. That is why the ids must match the "
    "reference implementation exactly - every space, every newline, every byte of every "
    "emoji. SentencePiece writes a space as U+2581, merges the pair of pieces with the best "
    "score first, and falls back to single bytes (<0x00> to <0xFF>) for characters it has "
    "never seen, such as \U0001d518 or \U00020000.\n\n"
    "Numbers are another trap: 3.14159, 2,718,281 and 0x7fffffff are split differently by "
    "different vocabularies, and so are dates like 2024-06-30 or times like 23:59:59. Code "
    "is worse still: `for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }` mixes "
    "punctuation, identifiers and whitespace in ways no natural language does, and Python "
    "cares about indentation:\n\n"
    "    def mean(xs):\n        return sum(xs) / len(xs)\n\n"
    "\tIndented with a tab, followed by    four spaces, a trailing space \n"
    "and a last line without a newline at the end, which is fine too."
)

CASES = [
    # empty and spaces
    "",
    " ",
    "  ",
    "   ",
    " Hello",
    "  Hello",
    "Hello ",
    "Hello  ",
    "Hello world",
    "Hello, world! How are you today?",
    "multiple   spaces   inside    here",
    "a b  c   d    e     f",
    " " * 40,
    "x" + " " * 31 + "y",
    # tabs and newlines
    "\t",
    "\ttab first",
    "a\tb\t\tc\t\t\td",
    "\t" * 35,
    "line1\nline2",
    "a\n\nb",
    "\n",
    "\n\n\n\n",
    "\n" * 40,
    "end\n",
    "\r\n",
    "windows\r\nline\r\nends",
    "x\n \n y",
    " \n\t \t\n ",
    # digits
    "0",
    "12345",
    "3.14159265358979",
    "1,000,000",
    "9876543210987654321012345678901234567890",
    "in 2024 there were 365 days and 8760 hours",
    "٣٤٥ ١٢٣ and ５６７",
    # punctuation
    "Hello!!! What?! (yes) [no] {maybe} ... -- ---",
    "\"quoted\" 'single' `back` @#$%^&*_+=|\\/<>~",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "a.b,c;d:e!f?g",
    # accented Latin and other scripts
    "Café naïve résumé Ångström façade crème brûlée",
    "Ça va? Où êtes-vous? Ðe þorn",
    "Zürich Łódź İstanbul Ærøskøbing",
    "日本語のテキスト",
    "你好，世界！",
    "한국어 텍스트",
    "Привет, мир! Γειά σου κόσμε",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    # emoji and other 4-byte characters
    "🦀",
    "🦀🎉👍🏽🇺🇸 ❤️ and zwj 👩‍👩‍👧",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝐀𝐁𝐂",
    "𓀀𓀁 hieroglyphs",
    # likely absent from the vocabulary: byte fallback
    "𠀀𠀁𠀂",
    "\ue000\uf8ff private use",
    "\U0010fffd",
    "\x00\x01\x02\x7f",
    "a\x04b",
    "\u0378\u0379",
    "x\U000e0001y",
    # the SentencePiece space symbol itself
    "a\u2581b",
    "\u2581\u2581",
    # Gemma control tokens as text
    "<start_of_turn>user\nhi<end_of_turn>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>",
    "<bos>Hello",
    "<eos>",
    "<pad><unk><mask>",
    "text<bos>more<eos>end",
    "<unused0><unused99><unused6241>",
    "<start_of_turn",
    "<end_of_turn >",
    "<<start_of_turn>>",
    "<start_of_turn><end_of_turn>",
    " <start_of_turn> ",
    # user-defined tokens: markup, image markers, whitespace runs
    "<table><tr><td>1</td></tr></table>",
    "<h1>Title</h1><p>para</p>",
    "<start_of_image>",
    "a<start_of_image>b<end_of_image>c",
    "[multimodal]",
    "</s>",
    "a</s>b",
    "<s>x</s>",
    "<b>bold</b> <i>it</i> <code>x</code>",
    "code\n\n\n\nnext",
    "   spaced",
    "\t\tindented",
    # code
    "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
    "def f(x):\n\treturn x ** 2  # square\n",
    # repetitive, long inputs
    "a" * 2000,
    "ab" * 1000,
    "1" * 500,
    "🦀" * 200,
    "𠀀" * 100,
    PARAGRAPH,
    PARAGRAPH.upper() + "\n\n" + PARAGRAPH,
]


def detokenize(vocab, ids):
    """llama.cpp's llama_detokenize: nothing removed, special tokens rendered."""
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, True)
    if n < 0:
        raise RuntimeError(f"detokenize needs {-n} bytes")
    return buf.raw[:n]


def main():
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        home = os.environ.get("AGENTKV_HOME") or os.path.join(
            os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "agentkv"
        )
        path = os.path.join(home, "models", MODEL_FILE)
    model = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    cases = []
    for text in CASES:
        case = {"text": text}
        for special in (False, True):
            ids = model.tokenize(text.encode("utf-8"), add_bos=True, special=special)
            key = "special" if special else "plain"
            case[key] = ids
            # Every case decodes to valid UTF-8; a lossy decode would hide a difference.
            case[key + "_detokenized"] = detokenize(vocab, ids).decode("utf-8")
        cases.append(case)
    out = {
        "model": os.path.basename(path),
        "llama_cpp_python": metadata.version("llama_cpp_python"),
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "cases": cases,
    }
    target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemma3_reference.json")
    # One case a line, so a regenerated file diffs case by case.
    header = json.dumps({k: v for k, v in out.items() if k != "cases"}, ensure_ascii=True)
    lines = [json.dumps(c, ensure_ascii=True) for c in cases]
    with open(target, "w", encoding="utf-8") as f:
        f.write(header[:-1] + ', "cases": [\n' + ",\n".join(lines) + "\n]}\n")
    print(f"wrote {len(cases)} cases to {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
