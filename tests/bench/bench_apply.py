"""Voucher apply end to end (verify + replay window + signed receipt + power-safe
commit) on the MicroPython wasm VM, with CPython beside it.

    .venv/bin/python tests/bench/bench_apply.py [--count 30] [--json]

Heap figures on the wasm VM (its collector runs only between runPython calls):
  held after boot    bytes live once the meter is provisioned and its modules imported;
  allocated / apply  bytes allocated by one apply (nothing is freed inside a call, so
                     this is the whole churn of one top-up — an upper bound on its peak);
  held after apply   bytes live after each apply, once collected (growth = a leak).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import nacl.signing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "firmware")]

from protocol import cose, voucher  # noqa: E402

DEVICE = bytes.fromhex("70b3d5f0000000a1")
T0 = 1790000000
ISSUER = nacl.signing.SigningKey(bytes(range(1, 33)))
ISSUER_PUB = bytes(ISSUER.verify_key)

SETUP = """
from boards.nor import NorFlash
from meter.store import Store
from meter.ledger import Ledger
from meter import provisioning

class _Board:
    def time(self):
        return %(t0)d
    def random(self, n):
        return bytes((i * 29 + 7) & 0xFF for i in range(n))

_store = Store(NorFlash(blocks=16))
_store.mount()
provisioning.provision(_store, _Board(), %(device)r, [%(issuer)r], {5: 1000000, 6: 100000000}, 0, %(t0)d)
LEDGER = Ledger(_store, lambda: %(t0)d)
VOUCHERS = %(vouchers)r
"""


def vouchers(count):
    kid = cose.kid_for(ISSUER_PUB)
    return [voucher.encode(kid, lambda m: ISSUER.sign(m).signature, DEVICE, seq, 1000 + seq, T0 - 60)
            for seq in range(1, count + 1)]


def cpython(vs):
    from boards.nor import NorFlash
    from meter import provisioning
    from meter.ledger import Ledger
    from meter.store import Store

    class Board:
        def time(self):
            return T0

        def random(self, n):
            return bytes((i * 29 + 7) & 0xFF for i in range(n))

    store = Store(NorFlash(blocks=16))
    store.mount()
    provisioning.provision(store, Board(), DEVICE, [ISSUER_PUB], {5: 1000000, 6: 100000000}, 0, T0)
    ledger = Ledger(store, lambda: T0)
    times = []
    for v in vs:
        t0 = time.perf_counter()
        ledger.submit(v)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    vs = vouchers(args.count)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(SETUP % {"t0": T0, "device": DEVICE, "issuer": ISSUER_PUB, "vouchers": vs})
        setup = f.name
    try:
        out = subprocess.run(["node", os.path.join(ROOT, "tests", "bench", "mpy_apply.mjs"), setup,
                              str(args.count)], cwd=ROOT, check=True, capture_output=True, text=True)
    finally:
        os.unlink(setup)
    mpy = json.loads(out.stdout.strip().splitlines()[-1])
    assert mpy["receipts"] == args.count, mpy
    cp = cpython(vs)
    result = {
        "count": args.count,
        "mpy_median_ms": round(statistics.median(mpy["times_ms"]), 2),
        "mpy_p90_ms": round(sorted(mpy["times_ms"])[int(0.9 * args.count)], 2),
        "mpy_held_after_boot_bytes": mpy["held_boot"],
        "mpy_allocated_per_apply_bytes_median": int(statistics.median(mpy["allocated"])),
        "mpy_held_after_apply_bytes_max": max(mpy["held_after"]),
        "cpython_median_ms": round(statistics.median(cp), 3),
    }
    if args.json:
        print(json.dumps(result))
        return
    print("voucher apply end to end (verify + window + signed receipt + commit), %d top-ups" % args.count)
    for k, v in result.items():
        print("  %-40s %s" % (k, v))


if __name__ == "__main__":
    main()
