"""Benchmark protocol.x25519 (what a meter runs at provisioning to take keypad codes,
SPEC.md §8: its key-agreement public key, then the shared secret with the supplier's code
key) on three VMs in one run: the MicroPython wasm VM, the MicroPython unix port and
CPython, with PyNaCl's crypto_scalarmult as the reference.  Not a test.  Usage:

    .venv/bin/python tests/bench/bench_x25519.py [--json] [--n N]

Figures: median over N batches of 5 calls, ms per call (the wasm VM's clock ticks in
whole milliseconds, hence batches).  Provisioning does one of each.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import unix_port  # noqa: E402

# Runs unchanged on every VM: prints one JSON line.
SCRIPT = r"""
import sys, json
sys.path.insert(0, %(root)r)
try:
    from time import ticks_ms, ticks_diff
except ImportError:
    from time import perf_counter
    ticks_ms = lambda: perf_counter() * 1000.0
    ticks_diff = lambda a, b: a - b
from protocol import x25519
a = bytes(range(1, 33))
b = bytes(range(101, 133))
pb = x25519.public_key(b)
def batches(fn, n):
    out = []
    for _ in range(n):
        t0 = ticks_ms()
        for _ in range(5):
            fn()
        out.append(ticks_diff(ticks_ms(), t0) / 5)
    out.sort()
    return out[len(out) // 2]
print(json.dumps({"public_key_ms": batches(lambda: x25519.public_key(a), %(n)d),
                  "shared_ms": batches(lambda: x25519.x25519(a, pb), %(n)d)}))
"""


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_nacl(n):
    from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
    a, b = bytes(range(1, 33)), bytes(range(101, 133))
    pb = crypto_scalarmult_base(b)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(5):
            crypto_scalarmult(a, pb)
        times.append((time.perf_counter() - t0) * 1000 / 5)
    times.sort()
    return {"shared_ms": times[len(times) // 2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "x25519_bench.py")
        with open(script, "w") as f:
            f.write(SCRIPT % {"root": ROOT, "n": args.n})
        result = {
            "micropython_unix": run([unix_port.micropython(), "-X", "heapsize=1M", script]),
            "micropython_wasm": run(["node", "tools/mpy_run.mjs", script]),
            "cpython": run([sys.executable, script]),
            "pynacl": bench_nacl(args.n),
        }
    if args.json:
        print(json.dumps(result))
        return
    print("X25519 (ms per call, median of %d batches of 5): public key / shared secret" % args.n)
    for vm, r in result.items():
        print("  %-18s %s / %s" % (vm, "%.2f" % r["public_key_ms"] if "public_key_ms" in r else "-",
                                   "%.3f" % r["shared_ms"]))


if __name__ == "__main__":
    main()
