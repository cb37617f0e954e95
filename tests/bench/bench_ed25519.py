"""Benchmark protocol.ed25519 sign and verify on CPython (vs PyNaCl) and inside the
MicroPython wasm VM (node tools/mpy_run.mjs).  Not a test.  Usage:

    .venv/bin/python tests/bench/bench_ed25519.py [--json] [--n N]

MicroPython figures: median over N batches of 5 calls of the ms per verify / per sign of
a 100-byte message (this VM's microsecond clock ticks in whole milliseconds).  Verify:
key cached (the same issuer key every time) and cold (three keys rotating, so the
two-entry per-key table cache always misses).  Sign: the same seed every time (its expanded key and public
key are cached) and cold (two seeds alternating).  Also bytes allocated per call
(gc.mem_alloc() delta with the collector disabled), gc.mem_free() delta over one verify,
and bytes held after import (the module with its fixed-base tables and sha512) / after
the first verify / after the first sign too (measured across separate runPython calls by
tests/bench/mpy_heap.mjs, because this VM collects only between calls).  Timings are
wall-clock: on a loaded machine compare variants within one run, not across runs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from nacl.signing import SigningKey  # noqa: E402

from protocol import ed25519  # noqa: E402

SEED1 = bytes(range(32))
SEED2 = bytes(range(100, 132))
SEED3 = bytes(range(200, 232))
MSG = bytes((i * 7) & 0xFF for i in range(100))


def bench_cpython(n):
    sk = SigningKey(SEED1)
    pk = bytes(sk.verify_key)
    sig = sk.sign(MSG).signature
    vk = sk.verify_key
    assert ed25519.verify(pk, MSG, sig)
    assert ed25519.sign(SEED1, MSG) == sig

    def per_call(fn, reps):
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e6)
        return statistics.median(samples)

    ours = per_call(lambda: ed25519.verify(pk, MSG, sig), n)
    nacl = per_call(lambda: vk.verify(MSG, sig), max(n, 200))
    ours_s = per_call(lambda: ed25519.sign(SEED1, MSG), n)
    nacl_s = per_call(lambda: sk.sign(MSG), max(n, 200))
    return {"cpython_us_per_verify": round(ours, 1), "pynacl_us_per_verify": round(nacl, 2),
            "ratio_vs_pynacl": round(ours / nacl, 1),
            "cpython_us_per_sign": round(ours_s, 1), "pynacl_us_per_sign": round(nacl_s, 2),
            "sign_ratio_vs_pynacl": round(ours_s / nacl_s, 1)}


MPY_SCRIPT = r"""
import gc, time, json, binascii
from protocol import ed25519
pk1 = binascii.unhexlify('%(pk1)s'); sig1 = binascii.unhexlify('%(sig1)s')
pk2 = binascii.unhexlify('%(pk2)s'); sig2 = binascii.unhexlify('%(sig2)s')
pk3 = binascii.unhexlify('%(pk3)s'); sig3 = binascii.unhexlify('%(sig3)s')
keys = ((pk1, sig1), (pk2, sig2), (pk3, sig3))
seed1 = binascii.unhexlify('%(seed1)s'); seed2 = binascii.unhexlify('%(seed2)s')
msg = binascii.unhexlify('%(msg)s')
N = %(n)d
assert ed25519.verify(pk1, msg, sig1) and ed25519.verify(pk2, msg, sig2)
assert not ed25519.verify(pk1, msg, sig2)
assert ed25519.sign(seed1, msg) == sig1 and ed25519.sign(seed2, msg) == sig2
def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]
# this VM's ticks_us() advances in whole milliseconds: time batches of B verifies
B = 5
warm = []
for i in range(N):
    t = time.ticks_ms()
    for j in range(B):
        ed25519.verify(pk1, msg, sig1)
    warm.append(time.ticks_diff(time.ticks_ms(), t) / B)
cold = []
c = 0
for i in range(N):
    t = time.ticks_ms()
    for j in range(B):
        pk, sig = keys[c %% 3]
        c += 1
        ed25519.verify(pk, msg, sig)
    cold.append(time.ticks_diff(time.ticks_ms(), t) / B)
swarm = []
for i in range(N):
    t = time.ticks_ms()
    for j in range(B):
        ed25519.sign(seed1, msg)
    swarm.append(time.ticks_diff(time.ticks_ms(), t) / B)
scold = []
for i in range(N):
    t = time.ticks_ms()
    for j in range(B):
        ed25519.sign(seed1 if j & 1 else seed2, msg)
    scold.append(time.ticks_diff(time.ticks_ms(), t) / B)
ed25519.verify(pk1, msg, sig1)
gc.disable()
a0 = gc.mem_alloc(); f0 = gc.mem_free()
ed25519.verify(pk1, msg, sig1)
a1 = gc.mem_alloc(); f1 = gc.mem_free()
ed25519.verify(pk2, msg, sig2)
ed25519.verify(pk3, msg, sig3)
a2 = gc.mem_alloc()
ed25519.sign(seed1, msg)
a3 = gc.mem_alloc()
ed25519.sign(seed1, msg)
a4 = gc.mem_alloc()
gc.enable()
print("BENCH " + json.dumps({"mpy_ms_per_verify_median": med(warm),
    "mpy_ms_per_verify_min": min(warm), "mpy_ms_per_verify_cold_median": med(cold),
    "mpy_ms_per_sign_median": med(swarm), "mpy_ms_per_sign_min": min(swarm),
    "mpy_ms_per_sign_cold_median": med(scold),
    "mpy_alloc_bytes_per_verify": a1 - a0, "mpy_alloc_bytes_per_verify_cold": (a2 - a1) // 2,
    "mpy_alloc_bytes_per_sign": a4 - a3,
    "mpy_mem_free_delta": f1 - f0, "n": N}))
"""


def bench_mpy(n):
    def keysig(seed):
        sk = SigningKey(seed)
        return bytes(sk.verify_key).hex(), sk.sign(MSG).signature.hex()
    pk1, sig1 = keysig(SEED1)
    pk2, sig2 = keysig(SEED2)
    pk3, sig3 = keysig(SEED3)
    script = MPY_SCRIPT % {"pk1": pk1, "sig1": sig1, "pk2": pk2, "sig2": sig2,
                           "pk3": pk3, "sig3": sig3,
                           "seed1": SEED1.hex(), "seed2": SEED2.hex(),
                           "msg": MSG.hex(), "n": n}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        out = subprocess.run(["node", "tools/mpy_run.mjs", path], cwd=ROOT, check=True,
                             capture_output=True, text=True, timeout=300).stdout
    finally:
        os.unlink(path)
    res = json.loads([ln for ln in out.splitlines() if ln.startswith("BENCH ")][0][6:])
    setup = ("import binascii\nprotocol.ed25519.verify(binascii.unhexlify('%s'), "
             "binascii.unhexlify('%s'), binascii.unhexlify('%s'))" % (pk1, MSG.hex(), sig1))
    setup_sign = ("protocol.ed25519.sign(binascii.unhexlify('%s'), binascii.unhexlify('%s'))"
                  % (SEED1.hex(), MSG.hex()))
    out = subprocess.run(["node", "tests/bench/mpy_heap.mjs", "protocol.ed25519", setup,
                          setup_sign],
                         cwd=ROOT, check=True, capture_output=True, text=True,
                         timeout=120).stdout
    heap = json.loads(out.strip().splitlines()[-1])
    res["mpy_held_after_import"] = heap["held_after_import"]
    res["mpy_held_after_first_verify"] = heap["held_after_each_setup"][0]
    res["mpy_held_after_first_verify_and_sign"] = heap["held_after_each_setup"][1]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--n", type=int, default=30, help="batches per MicroPython series")
    args = ap.parse_args()
    res = {"message_bytes": len(MSG)}
    res.update(bench_cpython(max(args.n, 100)))
    res.update(bench_mpy(args.n))
    if args.json:
        print(json.dumps(res, indent=1))
        return
    rows = [
        ("MicroPython wasm: ms/sign, median (seed cached)", res["mpy_ms_per_sign_median"]),
        ("MicroPython wasm: ms/sign, best batch", res["mpy_ms_per_sign_min"]),
        ("MicroPython wasm: ms/sign, median (two seeds alternating)",
         res["mpy_ms_per_sign_cold_median"]),
        ("MicroPython wasm: ms/verify, median (key cached)", res["mpy_ms_per_verify_median"]),
        ("MicroPython wasm: ms/verify, best batch", res["mpy_ms_per_verify_min"]),
        ("MicroPython wasm: ms/verify, median (key not cached, 3 keys rotating)",
         res["mpy_ms_per_verify_cold_median"]),
        ("MicroPython: bytes held after import", res["mpy_held_after_import"]),
        ("MicroPython: bytes held after first verify", res["mpy_held_after_first_verify"]),
        ("MicroPython: bytes held after first verify + sign",
         res["mpy_held_after_first_verify_and_sign"]),
        ("MicroPython: bytes allocated per sign (seed cached)", res["mpy_alloc_bytes_per_sign"]),
        ("MicroPython: bytes allocated per verify (cached key)",
         res["mpy_alloc_bytes_per_verify"]),
        ("MicroPython: bytes allocated per verify (new key)",
         res["mpy_alloc_bytes_per_verify_cold"]),
        ("MicroPython: gc.mem_free() delta over one verify", res["mpy_mem_free_delta"]),
        ("CPython: us/verify, median", res["cpython_us_per_verify"]),
        ("PyNaCl (libsodium): us/verify, median", res["pynacl_us_per_verify"]),
        ("CPython ours / PyNaCl (verify)", res["ratio_vs_pynacl"]),
        ("CPython: us/sign, median", res["cpython_us_per_sign"]),
        ("PyNaCl (libsodium): us/sign, median", res["pynacl_us_per_sign"]),
        ("CPython ours / PyNaCl (sign)", res["sign_ratio_vs_pynacl"]),
    ]
    w = max(len(r[0]) for r in rows)
    print("Ed25519 sign and verify, %d-byte message, n=%d" % (len(MSG), res["n"]))
    for name, val in rows:
        print("  %-*s  %s" % (w, name, val))


if __name__ == "__main__":
    main()
