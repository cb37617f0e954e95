# The `topup` executable as a user runs it: the console script `make setup` installs in
# the venv (the same one `. .venv/bin/activate` puts on PATH), in a subprocess, with its
# own database and passphrase. Keys use argon2id's minimum limits here
# (TOPUP_INSECURE_FAST_KDF=1, tests only) so that each run unlocks in milliseconds.
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The venv's console script; TOPUP_TEST_EXECUTABLE runs these tests against another build.
TOPUP = os.environ.get("TOPUP_TEST_EXECUTABLE") or str(Path(sys.executable).parent / "topup")
PASSPHRASE = "correct horse battery staple"
DEVICE = "70-B3-D5-F0-00-00-00-A1"
DEVICE_BYTES = bytes.fromhex("70b3d5f0000000a1")


def base_env(db_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPUP_")}
    env.update(TOPUP_DB=str(db_path), TOPUP_PASSPHRASE=PASSPHRASE, TOPUP_INSECURE_FAST_KDF="1")
    return env


class Topup:
    """Runs the real `topup` in `cwd` against one database."""

    def __init__(self, tmp_path):
        self.cwd = tmp_path
        self.db_path = str(tmp_path / "supplier.db")
        self.env = base_env(self.db_path)

    def __call__(self, *args, env=None, input=None, stdin=None, stdout=None, timeout=120):
        e = dict(self.env)
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        kw = {}
        if stdout is not None:
            kw["stdout"] = stdout
        else:
            kw["stdout"] = subprocess.PIPE
        if input is None and stdin is None:
            stdin = subprocess.DEVNULL
        return subprocess.run([TOPUP, *[str(a) for a in args]], cwd=str(self.cwd), env=e,
                              input=input, stdin=stdin, stderr=subprocess.PIPE, text=True,
                              timeout=timeout, **kw)

    def ok(self, *args, **kw):
        r = self(*args, **kw)
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in (r.stderr or "")
        return r

    def popen(self, *args, **kw):
        return subprocess.Popen([TOPUP, *[str(a) for a in args]], cwd=str(self.cwd),
                                env=self.env, stdin=subprocess.DEVNULL, **kw)

    def conn(self):
        return sqlite3.connect("file:%s?mode=ro" % self.db_path, uri=True, timeout=30)

    def count(self, sql, args=()):
        c = self.conn()
        try:
            return c.execute(sql, args).fetchone()[0]
        finally:
            c.close()


def one_line_error(r, code=2):
    """A clear refusal: exit code `code`, exactly one line on stderr, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("topup: error: "), r.stderr
    return lines[0][len("topup: error: "):]


@pytest.fixture
def topup(tmp_path):
    return Topup(tmp_path)


@pytest.fixture
def store(topup):
    """A database with an active issuer key and one registered meter."""
    topup.ok("init")
    topup.ok("key", "new")
    topup.ok("device", "add", DEVICE, "--max-voucher", "100", "--max-credit", "500")
    return topup
