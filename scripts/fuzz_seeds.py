#!/usr/bin/env python3
"""Writes small, valid seed inputs for the fuzz targets (scripts/fuzz.sh calls it).

usage: fuzz_seeds.py model PATH            writes a small safetensors file (6 dtypes, a scalar,
                                           an empty tensor) for fuzz.sh to convert
       fuzz_seeds.py seeds MODELS_DIR ENGINE_CORPUS BACKENDS_CORPUS

Each model file in MODELS_DIR becomes a seed of every engine target, in the byte
layout that target's `arbitrary` input reads (a mode byte, an object size, then the file).
The NFS seeds are well-formed replies to a LOOKUP (of a path, and of the export's root, as a
stat's) and a READ.
"""
import json
import os
import struct
import sys


def safetensors(path):
    tensors = [
        ("a.weight", "F32", [2, 3]),
        ("b", "BF16", [4]),
        ("scalar", "I64", []),
        ("empty", "U8", [0, 5]),
        ("layers.0.bias", "F16", [3]),
        ("mask", "BOOL", [5]),
    ]
    size = {"F32": 4, "BF16": 2, "I64": 8, "U8": 1, "F16": 2, "BOOL": 1}
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for i, (name, dtype, shape) in enumerate(tensors):
        n = size[dtype]
        for d in shape:
            n *= d
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + n],
        }
        data += bytes((i * 37 + k) % 251 for k in range(n))
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def engine_seeds(models, corpus):
    for name in sorted(os.listdir(models)):
        with open(os.path.join(models, name), "rb") as f:
            b = f.read()
        stem = name.replace(".", "_")
        seeds = {
            "safetensors_header": struct.pack("<Q", 0) + b,
            "load": [bytes([m]) + b for m in (0, 1, 2, 3, 5, 9)],
            "convert": [bytes([m]) + b for m in (0, 1, 4, 6, 10)],
        }
        if b.startswith(b"|TZR|"):
            seeds["tensorizer_index"] = [bytes([m]) + struct.pack("<Q", 0) + b[5:] for m in (0, 1, 3)]
            del seeds["safetensors_header"]
        for target, items in seeds.items():
            if isinstance(items, bytes):
                items = [items]
            d = os.path.join(corpus, target)
            os.makedirs(d, exist_ok=True)
            for k, item in enumerate(items):
                with open(os.path.join(d, f"seed_{stem}_{k}"), "wb") as f:
                    f.write(item)


def xdr_opaque(b):
    return struct.pack(">I", len(b)) + b + b"\0" * (-len(b) % 4)


def fattr(attrs):
    """attrs: [(number, encoded value)] in increasing order."""
    words = [0, 0]
    vals = b""
    for num, v in attrs:
        words[num // 32] |= 1 << (num % 32)
        vals += v
    return struct.pack(">III", 2, *words) + xdr_opaque(vals)


def record(body, split=False):
    """One RPC record: xid + accepted reply header + body (in two fragments if split)."""
    # xid, REPLY, MSG_ACCEPTED, verifier AUTH_NONE (empty), SUCCESS
    msg = struct.pack(">IIIIII", 7, 1, 0, 0, 0, 0) + body
    if not split:
        return struct.pack(">I", 0x80000000 | len(msg)) + msg
    cut = len(msg) // 2
    return (struct.pack(">I", cut) + msg[:cut]
            + struct.pack(">I", 0x80000000 | (len(msg) - cut)) + msg[cut:])


def nfs_seeds(corpus):
    change, size = struct.pack(">Q", 42), struct.pack(">Q", 4096)
    stat_attrs = fattr([
        (1, struct.pack(">I", 1)), (3, change), (4, size), (30, struct.pack(">Q", 1 << 20)),
        (53, struct.pack(">QI", 1700000000, 5)),
    ])
    compound = lambda n: struct.pack(">I", 0) + xdr_opaque(b"") + struct.pack(">I", n)
    op = lambda code, st=0: struct.pack(">II", code, st)
    comps = 2
    resolve = compound(comps + 3) + op(24)
    for _ in range(comps):
        resolve += op(15)
    resolve += op(10) + xdr_opaque(b"\1\2\3\4\5\6\7\x08") + op(9) + stat_attrs
    # A stat walks the path as the opening does; mode 1 decodes a walk of the export's root.
    stat = compound(3) + op(24) + op(10) + xdr_opaque(b"\1\2\3\4\5\6\7\x08") + op(9) + stat_attrs
    data = bytes(range(100))
    read = (compound(3) + op(22) + op(25) + struct.pack(">I", 0) + xdr_opaque(data)
            + op(9) + fattr([(3, change), (4, size)]))
    failed = compound(1) + op(24, 10006)
    d = os.path.join(corpus, "nfs_replies")
    os.makedirs(d, exist_ok=True)
    # Input layout: mode (u8), read_len (u16), then the records.
    seeds = {
        "resolve": (comps + 0, record(resolve)),
        "stat": (4, record(stat) + record(stat, split=True)),
        "read": (8, record(read) + record(read, split=True)),
        "failed": (4, record(failed)),
    }
    for name, (mode, recs) in seeds.items():
        with open(os.path.join(d, f"seed_{name}"), "wb") as f:
            f.write(bytes([mode]) + struct.pack("<H", 100) + recs)


def main():
    if sys.argv[1:2] == ["model"] and len(sys.argv) == 3:
        safetensors(sys.argv[2])
    elif sys.argv[1:2] == ["seeds"] and len(sys.argv) == 5:
        models, engine, backends = sys.argv[2:5]
        engine_seeds(models, engine)
        nfs_seeds(backends)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
