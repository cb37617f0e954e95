# The PostgreSQL backend (TOPUP_DB=postgresql://...), against a real server started for the
# session (tests/conftest.py): every command that writes, through the installed `topup`
# executable; several issuing processes on one database; a run killed with SIGKILL; the
# schema (the same tables and columns as SQLite's, and a v6 database upgraded in place);
# a server that is not there or goes away. The host storage tests (tests/host) also run
# on PostgreSQL: see tests/host/conftest.py.
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from host import db, keystore, pg, receipts_io
from host.errors import DatabaseUnavailable, TopupError
from host.verify import nacl_verify
from protocol import voucher as pv

from tests.host.conftest import Run
from tests.host.test_reconcile_data import Meter

TOPUP = str(Path(sys.executable).parent / "topup")
PASSPHRASE = "correct horse battery staple"
DEVICE = "70-B3-D5-F0-00-00-00-A1"
DEVICE_BYTES = bytes.fromhex("70b3d5f0000000a1")


def env_for(url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPUP_")}
    env.update(TOPUP_DB=url, TOPUP_PASSPHRASE=PASSPHRASE, TOPUP_INSECURE_FAST_KDF="1")
    return env


def topup(url, *args, check=True, cwd=None):
    r = subprocess.run([TOPUP, *[str(a) for a in args]], env=env_for(url), cwd=cwd,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    if check:
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    return r


def popen(url, *args):
    return subprocess.Popen([TOPUP, *[str(a) for a in args]], env=env_for(url),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def stored(url):
    """{sequence: cose bytes} of DEVICE's vouchers, and its next_sequence."""
    conn = db.open_db(url)
    try:
        rows = dict((s, bytes(c)) for s, c in conn.execute(
            "SELECT sequence, cose FROM vouchers WHERE device = ?", (DEVICE_BYTES,)))
        nxt = conn.execute("SELECT next_sequence FROM devices WHERE device = ?",
                           (DEVICE_BYTES,)).fetchone()[0]
        trusted = keystore.trusted(conn)
    finally:
        conn.close()
    for seq, raw in rows.items():
        assert pv.verify(raw, trusted, device=DEVICE_BYTES, verify_sig=nacl_verify).sequence == seq
    return rows, nxt


@pytest.fixture
def supplier(postgres_url):
    """A database with a key and DEVICE (made in-process: quicker than three `topup` runs;
    test_every_writing_command_... runs those)."""
    run = Run(postgres_url)
    fast = {"TOPUP_INSECURE_FAST_KDF": "1"}
    run.ok("init")
    run.ok("key", "new", env=fast)
    run.ok("device", "add", DEVICE, "--max-voucher", "100", "--max-credit", "500")
    return postgres_url


# --- every command that writes -------------------------------------------------------------

def test_every_writing_command_works_on_a_postgresql_url(postgres_url, tmp_path):
    url = postgres_url
    r = topup(url, "init")
    assert "created topup database" in r.stdout and "t_" in r.stdout
    topup(url, "key", "new")
    meter = Meter(DEVICE_BYTES, 0xA1)
    from protocol import x25519
    ka = x25519.public_key(bytes(range(100, 132)))
    topup(url, "device", "add", DEVICE, "--max-voucher", "50", "--max-credit", "500",
          "--public-key", meter.public.hex(), "--ka-key", ka.hex(), "--label", "1 Mill Lane")
    lines = topup(url, "issue", DEVICE, "5", "-n", "3", "-f", "json").stdout.splitlines()
    vouchers = [json.loads(ln) for ln in lines]
    assert [v["sequence"] for v in vouchers] == [1, 2, 3]
    code = topup(url, "code", DEVICE, "2").stdout
    assert sum(ch.isdigit() for ch in code) == 20
    topup(url, "vouchers", "void", "--device", DEVICE, "--seq", "3", "--yes")
    # the meter applies vouchers 1 and 2; its receipts come back and are reconciled
    t = 1_800_000_000
    raws = [meter.apply(pv.from_text(vouchers[0]["text"]), t),
            meter.apply(pv.from_text(vouchers[1]["text"]), t + 60)]
    path = tmp_path / "r.cbor"
    receipts_io.write_receipts(path, raws)
    topup(url, "receipts", "import", path)
    topup(url, "receipts", "import", path)  # again: nothing new, no second import batch
    r = topup(url, "reconcile", check=False)
    assert r.returncode == 0 and "no anomalies" in r.stdout, (r.stdout, r.stderr)
    conn = db.open_db(url)
    try:
        st = dict(conn.execute("SELECT sequence, status FROM voucher_status"))
        assert st == {1: "redeemed", 2: "redeemed", 3: "void", 4: "outstanding"}
        assert conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM imports").fetchone()[0] == 1  # 2nd: nothing new
    finally:
        conn.close()
    # and the commands that read
    assert "redeemed" in topup(url, "vouchers", "list").stdout
    assert "next sequence        5" in topup(url, "device", "show", DEVICE).stdout
    topup(url, "report")


def test_db_option_takes_a_url_too(postgres_url, tmp_path):
    r = subprocess.run([TOPUP, "--db", postgres_url, "init"], capture_output=True, text=True,
                       env={**env_for(str(tmp_path / "unused.db"))}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "unused.db").exists()
    assert db.open_db(postgres_url).execute("SELECT count(*) FROM keys").fetchone()[0] == 0


# --- concurrency and kill -9 ---------------------------------------------------------------

def test_concurrent_issuers_never_reuse_a_sequence_and_store_all_they_print(supplier):
    n, procs = 150, 4
    ps = [popen(supplier, "issue", DEVICE, "1", "-n", n, "--batch-size", "10", "-f", "json")
          for _ in range(procs)]
    printed = []
    for p in ps:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        printed.append([json.loads(ln) for ln in out.decode().splitlines()])
    seqs = [v["sequence"] for run in printed for v in run]
    assert len(seqs) == len(set(seqs)) == n * procs
    assert set(seqs) == set(range(1, n * procs + 1))
    rows, nxt = stored(supplier)
    assert nxt == n * procs + 1
    for v in (v for run in printed for v in run):
        assert rows[v["sequence"]] == pv.from_text(v["text"])


def test_issue_killed_with_sigkill_leaves_a_consistent_database(supplier):
    p = popen(supplier, "issue", DEVICE, "1", "-n", "1000000", "--batch-size", "50",
              "-f", "json")
    printed = []
    deadline = time.monotonic() + 60
    while len(printed) < 300:  # several batches out, more on the way
        line = p.stdout.readline()
        assert line, p.stderr.read().decode()
        printed.append(json.loads(line))
        assert time.monotonic() < deadline
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    rows, nxt = stored(supplier)
    assert sorted(rows) == list(range(1, len(rows) + 1))  # batches commit whole, in order
    assert nxt == len(rows) + 1
    for v in printed:  # stored before printed
        assert rows[v["sequence"]] == pv.from_text(v["text"])
    # the server let go of the killed client's lock: the next run goes on at once
    r = topup(supplier, "issue", DEVICE, "1", "-n", "2", "-f", "json")
    assert [json.loads(ln)["sequence"] for ln in r.stdout.splitlines()] == [nxt, nxt + 1]


# --- schema ---------------------------------------------------------------------------------

def _sqlite_columns(path):
    conn = sqlite3.connect(path)
    try:
        names = [n for (n,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {n: [(r[1], r[2].upper(), bool(r[3]), r[5] > 0)
                    for r in conn.execute("PRAGMA table_info(%s)" % n)] for n in names}
    finally:
        conn.close()


def _pg_columns(url):
    pk = {}
    with psycopg.connect(url) as conn:
        for table, col in conn.execute(
                "SELECT tc.table_name, k.column_name FROM information_schema.table_constraints tc "
                "JOIN information_schema.key_column_usage k ON k.constraint_name = "
                "tc.constraint_name AND k.table_name = tc.table_name "
                "WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = 'public'"):
            pk.setdefault(table, set()).add(col)
        out = {}
        for table, col, typ, nullable in conn.execute(
                "SELECT table_name, column_name, data_type, is_nullable FROM "
                "information_schema.columns WHERE table_schema = 'public' "
                "ORDER BY table_name, ordinal_position"):
            out.setdefault(table, []).append((col, typ, nullable == "NO",
                                              col in pk.get(table, ())))
    out.pop(pg.META)
    return out


SQLITE_TO_PG = {"INTEGER": "bigint", "BLOB": "bytea", "TEXT": "text", "": None}


def test_created_schema_has_the_same_tables_and_columns_as_sqlite(postgres_url, tmp_path):
    path = str(tmp_path / "s.db")
    db.create(path).close()
    db.create(postgres_url).close()
    lite, post = _sqlite_columns(path), _pg_columns(postgres_url)
    assert sorted(lite) == sorted(post)
    for table, cols in lite.items():
        assert [c[0] for c in cols] == [c[0] for c in post[table]], table
        for (name, typ, notnull, key), (_, ptyp, pnotnull, pkey) in zip(cols, post[table]):
            if SQLITE_TO_PG[typ] is not None:  # a view's columns have no declared type
                assert ptyp == SQLITE_TO_PG[typ], (table, name)
            assert key == pkey, (table, name)
            assert notnull == pnotnull or key, (table, name)  # PG: a key is NOT NULL


def test_a_v6_database_is_upgraded_in_place(postgres_url):
    conn = pg.connect(postgres_url)
    with db.transaction(conn):  # what a version-6 `topup init` made
        for stmt in db._statements(db.SCHEMA):
            conn.execute(stmt)
        for version in range(1, 6):
            db._run_migration(conn, version)
        pg.init_meta(conn, db.APPLICATION_ID, 6)
    conn.close()
    topup(postgres_url, "key", "new")  # opens it: upgraded to the current version first
    conn = db.open_db(postgres_url)
    try:
        assert pg.read_meta(conn) == (db.APPLICATION_ID, db.SCHEMA_VERSION)
        assert db.has_table(conn, "api_tokens")
        assert conn.execute("SELECT count(*) FROM keys").fetchone()[0] == 1
    finally:
        conn.close()


# --- refusals and a server that is not there --------------------------------------------------

def test_init_refuses_a_topup_database_and_a_foreign_one(postgres_url, postgres_server):
    topup(postgres_url, "init")
    r = topup(postgres_url, "init", check=False)
    assert r.returncode == 2 and "already a topup database" in r.stderr
    other = postgres_server.url("postgres")
    with psycopg.connect(other, autocommit=True) as c:
        c.execute("CREATE DATABASE foreign_app STRATEGY FILE_COPY")
    foreign = postgres_server.url("foreign_app")
    with psycopg.connect(foreign, autocommit=True) as c:
        c.execute("CREATE TABLE customers (id int)")
    for cmd in (("init",), ("key", "list")):
        r = topup(foreign, *cmd, check=False)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert "not" in r.stderr and "topup database" in r.stderr
    with psycopg.connect(foreign) as c:  # left as it was
        assert c.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                         ).fetchone()[0] == 1


def test_an_empty_database_says_run_init(postgres_url):
    r = topup(postgres_url, "key", "list", check=False)
    assert r.returncode == 2 and "run `topup init`" in r.stderr


def test_a_server_that_is_not_reachable_is_one_clear_line(postgres_url):
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    url = "postgresql://topup:secret@127.0.0.1:%d/x" % port
    r = topup(url, "issue", DEVICE, "1", check=False)
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()
    assert line.startswith("topup: error: database server postgresql://127.0.0.1:%d/x is not "
                           "reachable" % port)
    assert "secret" not in line
    with pytest.raises(DatabaseUnavailable):
        db.open_db(url)


def _terminate_others(url):
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE datname = current_database() AND pid <> pg_backend_pid()")


def test_a_server_that_goes_away_mid_transaction_leaves_nothing_half_written(supplier):
    conn = db.open_db(supplier)
    with pytest.raises(DatabaseUnavailable, match="not reachable"):
        with db.transaction(conn):
            conn.execute("UPDATE devices SET label = 'half' WHERE device = ?", (DEVICE_BYTES,))
            _terminate_others(supplier)
            conn.execute("UPDATE devices SET max_credit = 1 WHERE device = ?", (DEVICE_BYTES,))
    conn.close()
    conn = db.open_db(supplier)
    assert conn.execute("SELECT label, max_credit FROM devices").fetchone() == (None, 50000)
    conn.close()


def test_the_pool_lends_working_connections_after_the_server_dropped_them(supplier):
    pool = db.ConnectionPool(supplier, size=2)
    try:
        with pool.connection() as conn:
            assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 1
        _terminate_others(supplier)  # every pooled connection is now dead
        with pool.connection() as conn:  # checked when lent: a fresh one
            with db.transaction(conn):
                conn.execute("UPDATE devices SET label = 'x'")
        with pytest.raises(TopupError):
            with pool.connection() as conn:
                with db.transaction(conn):
                    conn.execute("UPDATE devices SET label = 'y'")
                    raise TopupError("refused")  # rolled back, connection returned clean
        with pool.connection() as conn:
            assert conn.execute("SELECT label FROM devices").fetchone() == ("x",)
            assert not conn.in_transaction
    finally:
        pool.close()
