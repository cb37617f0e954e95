# Shared fixtures for the host tests: a scratch database per test, driven through the
# real CLI (click's CliRunner around host.cli.cli, whose main() maps errors to exit codes).
#
# The storage tests run on both backends: a test that uses `db_target` (directly, or through
# `run`, `store`, ...) runs once on an SQLite file and once on a fresh PostgreSQL database
# (tests/conftest.py's `postgres_url`), unless it is marked `sqlite_only` (it looks at the
# file itself: bytes, WAL, permissions, damage).
import hashlib
import os
import sqlite3

import pytest
from click.testing import CliRunner

from host.cli import cli

PASSPHRASE = "correct horse battery staple"
DEVICE = "00-11-22-33-44-55-66-77"
DEVICE_BYTES = bytes.fromhex("0011223344556677")
OTHER = "AA-BB-CC-DD-EE-FF-00-11"


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch):
    """Keys made in tests use argon2id's minimum limits (TOPUP_INSECURE_FAST_KDF=1, which
    subprocesses inherit: they neither seal at MODERATE nor re-seal what the tests made).
    test_db_keystore checks the real default (MODERATE) and the re-sealing."""
    monkeypatch.setenv("TOPUP_INSECURE_FAST_KDF", "1")


class Run:
    def __init__(self, db_path):
        self.db_path = str(db_path)
        self.env = {"TOPUP_DB": self.db_path, "TOPUP_PASSPHRASE": PASSPHRASE}

    def __call__(self, *args, env=None, input=None):
        e = dict(self.env)
        if env:
            e.update(env)
        runner = CliRunner()
        return runner.invoke(cli, [str(a) for a in args], env=e, input=input,
                             catch_exceptions=False)

    def ok(self, *args, **kw):
        r = self(*args, **kw)
        assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
        return r


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        backends = ["sqlite"]
        if metafunc.definition.get_closest_marker("sqlite_only") is None:
            backends.append("postgres")
        metafunc.parametrize("backend", backends)


@pytest.fixture
def backend():
    return "sqlite"


@pytest.fixture
def db_target(backend, tmp_path, request):
    """Where the test's database goes: an SQLite path (not yet created), or the URL of an
    empty PostgreSQL database."""
    if backend == "postgres":
        return request.getfixturevalue("postgres_url")
    return str(tmp_path / "topup.db")


@pytest.fixture
def run(db_target):
    return Run(db_target)


def _make_store(run):
    run.ok("init")
    run.ok("key", "new", env={"TOPUP_INSECURE_FAST_KDF": "1"})
    run.ok("device", "add", DEVICE, "--max-voucher", "100", "--max-credit", "500")
    return run


@pytest.fixture(scope="session")
def pg_store_template(postgres_server):
    """On PostgreSQL, `store`'s content is made once and copied for each test."""
    import psycopg
    with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE store_template STRATEGY FILE_COPY")
    _make_store(Run(postgres_server.url("store_template")))
    return "store_template"


@pytest.fixture
def store(run, backend, request):
    """An initialised database with one active key and one registered device."""
    if backend == "postgres":
        server = request.getfixturevalue("postgres_server")
        name = server.copy_of(request.getfixturevalue("pg_store_template"))
        request.addfinalizer(lambda: server.drop(name))
        run.db_path = run.env["TOPUP_DB"] = server.url(name)
        return run
    return _make_store(run)


def snapshot(db_path):
    """The database as bytes (main file and WAL, if any) and as rows, for 'nothing changed'."""
    db_path = str(db_path)
    if db_path.startswith("postgresql://"):
        return None, pg_rows(db_path)
    files = {}
    for suffix in ("", "-wal"):
        p = db_path + suffix
        if os.path.exists(p) and os.path.getsize(p):
            with open(p, "rb") as f:
                files[suffix] = hashlib.sha256(f.read()).hexdigest()
    conn = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True)
    try:
        rows = list(conn.iterdump())
    finally:
        conn.close()
    return files, rows


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def one_line_error(result, code=2):
    """A user error: the given exit code, one line on stderr, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("topup: error: "), lines
    assert "Traceback" not in result.output
    return lines[0][len("topup: error: "):]


def pg_rows(url):
    """Every row of every table of a PostgreSQL database, sorted, for 'nothing changed'."""
    import psycopg
    out = []
    with psycopg.connect(url) as conn:
        tables = [t for (t,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_type = 'BASE TABLE' ORDER BY 1")]
        for t in tables:
            rows = conn.execute('SELECT * FROM "%s"' % t).fetchall()
            out.append((t, sorted(rows, key=repr)))
    return out
