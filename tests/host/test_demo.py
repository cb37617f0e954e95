# `make demo` keeps working: tools/demo.py runs the supplier side end to end.
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_runs_end_to_end():
    env = dict(os.environ)
    env.pop("TOPUP_DB", None)
    env.pop("TOPUP_PASSPHRASE", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for words in ("ACCEPTED by device 00-11-22-33-44-55-66-77", "REJECTED: BAD_SIGNATURE",
                  "REJECTED: WRONG_DEVICE", "done"):
        assert words in r.stdout, words
    assert "Traceback" not in r.stdout + r.stderr
