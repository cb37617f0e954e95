# Reservation durability, against real processes: a bulk run killed with SIGKILL leaves a
# database where every stored voucher verifies and no sequence is ever issued twice, and
# two bulk runs at once never share a (device, sequence) pair.
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import nacl.signing

from host import db, keystore
from host.verify import nacl_verify
from protocol import voucher as pv

from .conftest import DEVICE, DEVICE_BYTES, PASSPHRASE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def topup(run, *args, **kw):
    env = dict(os.environ, TOPUP_DB=run.db_path, TOPUP_PASSPHRASE=PASSPHRASE,
               PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "host.cli"] + [str(a) for a in args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kw)


def stored_count(path):
    if path.startswith("postgresql://"):
        c = db.open_db(path)
    else:
        c = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    try:
        return c.execute("SELECT count(*) FROM vouchers").fetchone()[0]
    finally:
        c.close()


def check_database(path):
    """Every stored voucher verifies and matches its row; next_sequence is past them all."""
    conn = db.open_db(path)
    try:
        if not path.startswith("postgresql://"):
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        trusted = keystore.trusted(conn)
        rows = conn.execute("SELECT device, sequence, amount, issued, expires, kid, ref, cose "
                            "FROM vouchers ORDER BY sequence").fetchall()
        for device, seq, amount, issued, expires, kid, ref, raw in rows:
            v = pv.verify(raw, trusted, device=device, verify_sig=nacl_verify)
            assert (v.sequence, v.amount, v.issued, v.expires, v.kid, v.ref) == (
                seq, amount, issued, expires, kid, ref)
        seqs = [r[1] for r in rows]
        nxt = conn.execute("SELECT next_sequence FROM devices WHERE device = ?",
                           (DEVICE_BYTES,)).fetchone()[0]
        assert seqs == list(range(1, len(seqs) + 1))  # batches commit whole, in order
        assert nxt == len(seqs) + 1
        return seqs, nxt
    finally:
        conn.close()


def test_kill_9_mid_bulk_issue_never_reuses_a_sequence(store, tmp_path):
    out = tmp_path / "released.txt"
    p = topup(store, "issue", DEVICE, "1", "--count", "1000000", "--batch-size", "500",
              "--out", out)
    deadline = time.monotonic() + 30
    while stored_count(store.db_path) < 2000:  # a few batches committed, more on the way
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL

    seqs, nxt = check_database(store.db_path)
    assert 2000 <= len(seqs) < 1000000
    # The output file appears only whole: a kill -9 leaves none (at most a temporary file
    # beside it), and the database says that nothing of the batch was written anywhere.
    assert not out.exists()
    r = store.ok("vouchers", "list", "--undelivered")
    listed = [int(ln.split()[1]) for ln in r.stdout.splitlines()[1:-1]]
    assert listed == seqs and "NOT WRITTEN" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("%d vouchers, " % len(seqs))
    # and one command writes exactly those
    rest = tmp_path / "rest.txt"
    store.ok("vouchers", "export", "--batch", "1", "--undelivered", "-o", rest)
    assert [pv.parse(pv.from_text(t)).sequence for t in rest.read_text().splitlines()] == seqs
    assert store.ok("vouchers", "list", "--undelivered").stderr.startswith("no vouchers match")

    # The next issuance, after the crash, continues past everything stored.
    r = store.ok("issue", DEVICE, "1", "-n", "3")
    new = [pv.parse(pv.from_text(t)).sequence for t in r.stdout.splitlines()]
    assert new == [nxt, nxt + 1, nxt + 2]
    assert min(new) > max(seqs)
    check_database(store.db_path)


def test_concurrent_bulk_runs_never_share_a_sequence(store, tmp_path):
    n = 3000
    procs = [topup(store, "issue", DEVICE, "1", "-n", n, "--batch-size", "100",
                   "-f", "json") for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr.decode()
        outs.append([json.loads(line)["sequence"] for line in stdout.decode().splitlines()])
    a, b = set(outs[0]), set(outs[1])
    assert len(a) == len(b) == n
    assert not a & b
    assert a | b == set(range(1, 2 * n + 1))
    seqs, nxt = check_database(store.db_path)
    assert len(seqs) == 2 * n and nxt == 2 * n + 1


def test_a_second_issuer_waits_for_the_lock_instead_of_failing(store):
    # Hold the write lock from outside for a moment: the CLI waits, then issues.
    conn = db.open_db(store.db_path)
    conn.execute("BEGIN IMMEDIATE")
    p = topup(store, "issue", DEVICE, "1")
    time.sleep(1.0)
    assert p.poll() is None  # still waiting on the lock
    conn.execute("COMMIT")
    conn.close()
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 0, stderr.decode()
    assert pv.parse(pv.from_text(stdout.decode().strip())).sequence == 1
