"""A kv-store writer and checker in Python, from docs/format.md alone.

    python_store.py write STORE META_JSON   writes the cache "py" into the store directory:
                                            two segments and a manifest, with fields agentkv
                                            does not know in each
    python_store.py check STORE NAME        verifies cache NAME as the format says a reader
                                            must, and prints its token ids and segment ids as
                                            JSON

Needs the `safetensors`, `numpy` and `xxhash` packages (`cargo xtask ci` installs them into
target/format-venv). The K/V values written are `value(layer, kind, head, pos, d)` below; the
Rust side (tests/kv_store_python.rs) checks a load returns exactly them.
"""

import json
import os
import struct
import sys

import numpy as np
import xxhash
from safetensors.numpy import save_file


def value(layer, kind, head, pos, d):
    """A K/V value that f16 holds exactly (a multiple of 1/8 in [-6, 6])."""
    return ((layer * 7 + kind * 3 + head * 5 + pos * 11 + d) % 97) / 8.0 - 6.0


def tokens():
    """The token ids of the cache "py"."""
    return [(i * 7919 + 13) % 50000 for i in range(10)]


def text(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def canonical_meta(meta):
    m = meta["model"]
    out = text(m["architecture"])
    for key in ("n_layers", "n_heads", "n_kv_heads", "head_dim"):
        out += struct.pack("<I", m[key])
    out += struct.pack("<d", float(m["rope_theta"]))
    out += struct.pack("<I", m["rope_dim"])
    out += text(m["weights_hash"])
    extra = m.get("extra", {})
    out += struct.pack("<Q", len(extra))
    for key in sorted(extra, key=lambda k: k.encode("utf-8")):
        out += text(key) + text(extra[key])
    out += text(meta["tokenizer"]) + text(meta["chat_template"]) + text(meta["dtype"])
    return out


def segment_id(meta, parent, toks):
    data = b"agentkv.segment.v3\0" + canonical_meta(meta)
    data += b"\0" if parent is None else b"\1" + parent.encode("ascii")
    data += struct.pack("<Q", len(toks)) + struct.pack(f"<{len(toks)}I", *toks)
    return xxhash.xxh3_128_hexdigest(data)


def checksum(b):
    return xxhash.xxh3_64_hexdigest(b)


def windows(meta):
    extra = meta["model"].get("extra", {})
    n = meta["model"]["n_layers"]
    if "sliding_window" not in extra:
        return [None] * n
    w = int(extra["sliding_window"])
    letters = extra.get("sliding_window_layers", "S" * n)
    return [w if c == "S" else None for c in letters]


def kv_from(meta, start, end):
    """Per layer, the first position a segment [start, end) stores."""
    return [start if w is None else max(start, end + 1 - w) for w in windows(meta)]


def write_segment(store, meta, parent, toks, start):
    end = start + len(toks)
    seg_id = segment_id(meta, parent, toks)
    m = meta["model"]
    assert meta["dtype"] == "f16", "this writer writes f16 caches"
    tensors = {"tokens": np.array(toks, dtype="<u4")}
    first = kv_from(meta, start, end)
    for layer in range(m["n_layers"]):
        for kind, name in ((0, "k"), (1, "v")):
            a = np.empty((m["n_kv_heads"], end - first[layer], m["head_dim"]), dtype="<f2")
            for h in range(m["n_kv_heads"]):
                for p in range(first[layer], end):
                    for d in range(m["head_dim"]):
                        a[h, p - first[layer], d] = value(layer, kind, h, p, d)
            tensors[f"layers.{layer}.{name}"] = a
    header = {
        "format": "agentkv.segment",
        "version": 3,
        "id": seg_id,
        "parent": parent,
        "start": start,
        "n_tokens": len(toks),
        "kv_from": first,
        "meta": meta,
        "checksums": {k: checksum(np.ascontiguousarray(t).tobytes()) for k, t in tensors.items()},
        "written_by": "tests/format/python_store.py",
    }
    os.makedirs(os.path.join(store, "segments"), exist_ok=True)
    save_file(
        tensors,
        os.path.join(store, "segments", seg_id + ".safetensors"),
        metadata={"agentkv": json.dumps(header)},
    )
    return {"id": seg_id, "start": start, "n_tokens": len(toks)}


def write(store, meta_path):
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    toks = tokens()
    first = write_segment(store, meta, None, toks[:6], 0)
    second = write_segment(store, meta, first["id"], toks[6:], 6)
    body = {
        "name": "py",
        "meta": meta,
        "n_tokens": len(toks),
        "segments": [first, second],
        "generation": 1,
        "written_by": "python",
    }
    # Indented, with a space after each separator: the checksum covers the bytes as stored.
    body = json.dumps(body, indent=1, ensure_ascii=False).encode("utf-8")
    envelope = b'{"format": "agentkv.manifest", "version": 2, "checksum": "%s", "body": %s}' % (
        checksum(body).encode("ascii"),
        body,
    )
    os.makedirs(os.path.join(store, "manifests"), exist_ok=True)
    with open(os.path.join(store, "manifests", "py.json"), "wb") as f:
        f.write(envelope)


def member_spans(data):
    """The byte span of each member's value in the JSON object `data` (bytes), by name."""
    s = data.decode("utf-8")
    dec = json.JSONDecoder()
    ws = " \t\n\r"

    def skip(i):
        while s[i] in ws:
            i += 1
        return i

    spans = {}
    i = skip(0)
    assert s[i] == "{", "not a JSON object"
    i = skip(i + 1)
    while s[i] != "}":
        key, i = dec.raw_decode(s, i)
        i = skip(i)
        assert s[i] == ":"
        i = skip(i + 1)
        _, end = dec.raw_decode(s, i)
        spans[key] = (len(s[:i].encode("utf-8")), len(s[:end].encode("utf-8")))
        i = skip(end)
        if s[i] == ",":
            i = skip(i + 1)
    return spans


def check(store, name):
    with open(os.path.join(store, "manifests", name + ".json"), "rb") as f:
        data = f.read()
    envelope = json.loads(data)
    assert envelope["format"] == "agentkv.manifest" and envelope["version"] == 2, envelope
    start, end = member_spans(data)["body"]
    assert checksum(data[start:end]) == envelope["checksum"], "manifest checksum"
    body = envelope["body"]
    meta = body["meta"]
    toks, ids, parent, at = [], [], None, 0
    for ref in body["segments"]:
        path = os.path.join(store, "segments", ref["id"] + ".safetensors")
        with open(path, "rb") as f:
            raw = f.read()
        (n,) = struct.unpack("<Q", raw[:8])
        st = json.loads(raw[8 : 8 + n])
        header = json.loads(st["__metadata__"]["agentkv"])
        assert header["version"] == 3 and header["meta"] == meta, header
        assert (header["start"], header["n_tokens"], header["parent"]) == (
            at,
            ref["n_tokens"],
            parent,
        ), header
        seg_end = at + ref["n_tokens"]
        assert header["kv_from"] == kv_from(meta, at, seg_end), header["kv_from"]
        data_start = 8 + n
        for tensor, info in st.items():
            if tensor == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            got = checksum(raw[data_start + lo : data_start + hi])
            assert got == header["checksums"][tensor], tensor
        lo, hi = st["tokens"]["data_offsets"]
        seg_toks = list(struct.unpack(f"<{ref['n_tokens']}I", raw[data_start + lo : data_start + hi]))
        assert segment_id(meta, parent, seg_toks) == header["id"] == ref["id"], "segment id"
        toks += seg_toks
        ids.append(ref["id"])
        parent, at = ref["id"], seg_end
    assert at == body["n_tokens"]
    print(json.dumps({"tokens": toks, "ids": ids}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
