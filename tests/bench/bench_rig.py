#!/usr/bin/env python3
"""The rig's figures (for the README): how long a virtual board takes to start, flash and
provision; the HAN round trip of a voucher submit (median); the wall time of the
credit-integrity suite; and how many power cuts the model-based run survives per minute.

    .venv/bin/python tests/bench/bench_rig.py [--json] [--submits N] [--skip-suites]

The suites run as pytest subprocesses (tests/hil/test_integrity.py; tests/hil/test_model.py,
which writes its figures to TOPUP_MODEL_STATS). Everything runs on the virtual board.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


class NonBlocking:
    """A HAN stream that returns what has arrived at once (hil.han_client.HanClient.open's
    pyserial port waits out its 20 ms read timeout unless 256 bytes arrive): the round trip
    the link and the meter allow."""

    def __init__(self, port):
        import serial
        self.port = serial.Serial(port, timeout=0)

    def read(self, n):
        waiting = self.port.in_waiting
        return self.port.read(min(n, waiting)) if waiting else b""

    def write(self, data):
        return self.port.write(data)

    def close(self):
        self.port.close()


def board_figures(submits):
    from hil.pytest_plugin import DEFAULT_METER, Issuer, _LIMIT_KEYS
    from hil.transport import VirtualTransport
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-rig-") as tmp:
        iss = Issuer(Path(tmp) / "supplier.db", max_voucher=DEFAULT_METER["max_voucher"],
                     max_credit=10 ** 9)
        t = VirtualTransport(Path(tmp) / "vb")
        t0 = time.monotonic()
        t.start()
        out["start_s"] = time.monotonic() - t0
        try:
            t0 = time.monotonic()
            summary = t.flash()
            out["flash_s"] = time.monotonic() - t0
            out["flash_files"], out["flash_bytes"] = summary["files"], summary["bytes"]
            limits = {_LIMIT_KEYS[k]: v for k, v in DEFAULT_METER.items() if k in _LIMIT_KEYS}
            limits[6] = 10 ** 8
            t0 = time.monotonic()
            t.provision(iss.device, iss.trust(), limits, 0, factory_reset=True)
            out["provision_s"] = time.monotonic() - t0      # until the meter answers on the HAN
            vouchers = iss.issue(1, count=submits)
            times = []
            with t.han() as h:
                h.status()
                for raw in vouchers:
                    t0 = time.monotonic()
                    h.submit(raw)
                    times.append(time.monotonic() - t0)
                t0 = time.monotonic()
                for _ in range(20):
                    h.status()
                out["status_ms"] = (time.monotonic() - t0) / 20 * 1000
                dup = []
                for raw in vouchers[-10:]:
                    t0 = time.monotonic()
                    h.submit(raw)
                    dup.append(time.monotonic() - t0)
            from hil.han_client import HanClient
            fast = iss.issue(1, count=submits)
            ftimes = []
            with HanClient(NonBlocking(t.han_port)) as h:
                h.status()
                for raw in fast:
                    t0 = time.monotonic()
                    h.submit(raw)
                    ftimes.append(time.monotonic() - t0)
                t0 = time.monotonic()
                for _ in range(20):
                    h.status()
                out["status_ms_nonblocking"] = (time.monotonic() - t0) / 20 * 1000
            out["submit_ms_median_nonblocking"] = statistics.median(ftimes) * 1000
            out["submit_ms_median"] = statistics.median(times) * 1000
            out["submit_ms_p90"] = sorted(times)[int(len(times) * 0.9) - 1] * 1000
            out["resubmit_ms_median"] = statistics.median(dup) * 1000
            out["submits"] = len(times)
            t0 = time.monotonic()
            t.power_cut_kill()
            out["kill_restart_s"] = time.monotonic() - t0
        finally:
            t.close()
            iss.close()
    return out


def run_pytest(*args, env=None):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    took = time.monotonic() - t0
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr.strip()[-200:]
    if r.returncode:
        raise SystemExit("pytest %s failed:\n%s" % (" ".join(args), r.stdout[-3000:]))
    return took, tail


def suite_figures():
    out = {}
    took, tail = run_pytest("tests/hil/test_integrity.py")
    out["integrity_suite_s"] = took
    out["integrity_suite_result"] = tail
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = os.path.join(tmp, "stats.json")
        took, tail = run_pytest("tests/hil/test_model.py", env={"TOPUP_MODEL_STATS": stats_path})
        with open(stats_path) as f:
            stats = json.load(f)
    out["model_run_s"] = took
    out["model"] = stats
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--submits", type=int, default=50, help="voucher submits for the round trip")
    ap.add_argument("--skip-suites", action="store_true", help="board figures only (no pytest runs)")
    a = ap.parse_args(argv)
    figures = board_figures(a.submits)
    if not a.skip_suites:
        figures.update(suite_figures())
    if a.json:
        print(json.dumps(figures, indent=2))
        return 0
    rows = [
        ("virtual board: start (Node + VM to REPL)", "%.2f s" % figures["start_s"]),
        ("flash (topup flash path: mpy-cross, copy, SHA-256 check; %d files, %d B)"
         % (figures["flash_files"], figures["flash_bytes"]), "%.2f s" % figures["flash_s"]),
        ("provision (factory reset + provision, until the meter answers)", "%.2f s" % figures["provision_s"]),
        ("HAN round trip: voucher submit, median (p90) of %d" % figures["submits"],
         "%.1f ms (%.1f ms)" % (figures["submit_ms_median"], figures["submit_ms_p90"])),
        ("HAN round trip: resubmission (original receipt), median", "%.1f ms" % figures["resubmit_ms_median"]),
        ("HAN round trip: status", "%.1f ms" % figures["status_ms"]),
        ("  the same with non-blocking reads: submit median / status",
         "%.1f ms / %.1f ms" % (figures["submit_ms_median_nonblocking"], figures["status_ms_nonblocking"])),
        ("power cut by kill → meter answering again", "%.2f s" % figures["kill_restart_s"]),
    ]
    if "integrity_suite_s" in figures:
        m = figures["model"]
        rows += [
            ("credit-integrity suite, wall time (pytest, incl. flashing once)",
             "%.1f s  (%s)" % (figures["integrity_suite_s"], figures["integrity_suite_result"])),
            ("model-based run: examples × steps, wall time (pytest)",
             "%d × %.0f steps (mean): %.1f s" % (m["examples"], m["steps"] / max(1, m["examples"]), figures["model_run_s"])),
            ("model-based run: power cuts survived (kill + flash cut)",
             "%d (%d + %d), %d landed / %d lost" % (m["power_cuts"], m["kill"], m["flash_cut"],
                                                   m["landed"], m["lost"])),
            ("model-based run: power cuts survived per minute", "%.1f" % m["cuts_per_minute"]),
        ]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print("%-*s  %s" % (w, k, v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
