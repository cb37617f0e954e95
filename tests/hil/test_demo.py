# `make demo` keeps telling the whole story: tools/demo.py, end to end, on a virtual board.
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ)
    env.pop("TOPUP_DB", None)
    env.pop("TOPUP_PASSPHRASE", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--out", str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for words in ("flashed ", "all verified", "provisioned 70-B3-D5-F0-00-00-00-A1",
                  "APPLIED: receipt 0, sequence 1, £10.50 added, balance £2.00 → £12.50",
                  "ALREADY APPLIED (original receipt)", "meter refused: BAD_SIGNATURE",
                  "1 push(es)", "no anomalies", "report.html",
                  # the customer's path: a code read out, typed on the PPMID, armed, confirmed
                  "issued 1 code of £15.00", "Typo – check the", "£15.00 added", "Supply armed",
                  "Press B to", "relay: closed, the supply is on", "£15.00 (code)"):
        assert words in out, words
    assert "Traceback" not in out
    assert (tmp_path / "out" / "report.html").stat().st_size > 1000
