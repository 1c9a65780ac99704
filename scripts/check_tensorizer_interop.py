#!/usr/bin/env python3
"""Checks that the reference reader (Python tensorizer) reads files written by `tensorstream convert`.

For every fixture in SHARED/fixtures: convert it to .tensors with tensorstream (plain, and for one
file also encrypted by key and by password), read the result with tensorizer's TensorDeserializer
(verify_hash=True, decryption params where encrypted) and compare every tensor's SHA-256 with
manifest.json. Needs: tensorizer (2.12) + torch in this Python; the tensorstream binary.

Usage: python3 scripts/check_tensorizer_interop.py [TENSORSTREAM_BIN] [SHARED_DIR]
  e.g. python3 -m venv /tmp/tz && /tmp/tz/bin/pip install tensorizer==2.12.1 torch &&
       /tmp/tz/bin/python scripts/check_tensorizer_interop.py target/release/tensorstream ../shared
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch
from tensorizer import TensorDeserializer

try:
    from tensorizer.encryption import DecryptionParams
except ImportError:  # older layout
    from tensorizer import DecryptionParams  # type: ignore

TS = sys.argv[1] if len(sys.argv) > 1 else "target/release/tensorstream"
SHARED = sys.argv[2] if len(sys.argv) > 2 else "../shared"
FIX = os.path.join(SHARED, "fixtures")
manifest = json.load(open(os.path.join(FIX, "manifest.json")))["files"]


def sha(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def flatten(obj, path=()):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif hasattr(obj, "items"):
        for k, v in obj.items():
            yield from flatten(v, path + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, path + (i,))


def secret_args(entry, d):
    enc = entry.get("encryption") or {}
    if enc.get("key_hex"):
        p = os.path.join(d, "in.key")
        open(p, "w").write(enc["key_hex"])
        return ["--key-file", p]
    if enc.get("password"):
        p = os.path.join(d, "in.pw")
        open(p, "w").write(enc["password"])
        return ["--password-file", p]
    return []


def check(path, entry, decryption=None):
    want = {}
    for t in entry["tensors"]:
        want[t["name"]] = t["sha256"]
    got = {}
    with TensorDeserializer(path, device="cpu", verify_hash=True, encryption=decryption) as d:
        if "nested" in path or any(n.startswith("[") for n in want):
            d = d.tree() if hasattr(d, "tree") else d
        for p, t in flatten(dict(d.items()) if hasattr(d, "items") else d):
            key = p[0] if len(p) == 1 else json.dumps(list(p), separators=(",", ":"))
            got[key] = sha(t)
    bad = [n for n in want if got.get(n) != want[n]]
    return bad, len(want), len(got)


rows, failed = [], 0
with tempfile.TemporaryDirectory() as d:
    for fname, entry in sorted(manifest.items()):
        src = os.path.join(FIX, fname)
        variants = [("plain", [], None)]
        if fname == "mixed.safetensors":
            key = os.path.join(d, "out.key")
            open(key, "w").write("11" * 32)
            pw = os.path.join(d, "out.pw")
            open(pw, "w").write("interop check password")
            variants += [
                ("key", ["--encrypt-key-file", key], DecryptionParams.from_key(bytes.fromhex("11" * 32))),
                ("password", ["--encrypt-password-file", pw], DecryptionParams.from_string("interop check password")),
            ]
        for label, extra, dec in variants:
            out = os.path.join(d, f"{fname}.{label}.tensors")
            cmd = [TS, "convert", src, out, "--quiet"] + secret_args(entry, d) + extra
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                rows.append((fname, label, "convert failed: " + r.stderr.strip()))
                failed += 1
                continue
            try:
                bad, n_want, n_got = check(out, entry, dec)
            except Exception as e:  # noqa: BLE001 - report any reader failure
                rows.append((fname, label, f"tensorizer failed: {type(e).__name__}: {e}"))
                failed += 1
                continue
            if bad:
                failed += 1
                rows.append((fname, label, f"MISMATCH {bad} ({n_got} read, {n_want} expected)"))
            else:
                rows.append((fname, label, f"ok: {n_want} tensors, hashes verified, SHA-256 match"))

import tensorizer  # noqa: E402

print(f"tensorizer {tensorizer.__version__}, torch {torch.__version__}")
for f, l, s in rows:
    print(f"{f:34} {l:9} {s}")
print(f"{len(rows) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
