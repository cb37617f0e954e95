# Fixtures of the HTTP service tests (tests/api/test_service.py, test_nodes.py): a prepared
# supplier database on SQLite or PostgreSQL (`target`, params "sqlite" and "postgres":
# the postgres_url fixture of tests/conftest.py), an in-process client (FastAPI's
# TestClient) and real `topup serve` processes on 127.0.0.1.
import os

import httpx
import pytest

from host import db, keystore, registry
from host.api import auth
from tests.serve_process import ServeProcess

PASSPHRASE = "api test passphrase"
DEVICE = "00-11-22-33-44-55-66-77"
DEVICE_BYTES = bytes.fromhex("0011223344556677")
OTHER = "AA-BB-CC-DD-EE-FF-00-11"           # registered, small limits
UNKNOWN = "01-02-03-04-05-06-07-08"         # never registered
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch):
    monkeypatch.setenv("TOPUP_INSECURE_FAST_KDF", "1")


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    """Where the database lives: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "topup.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def sqlite_target(tmp_path):
    return str(tmp_path / "topup.db")


class Supplier:
    """A prepared database: an issuer key, DEVICE (£100 per voucher) and OTHER (£5)."""

    def __init__(self, target):
        self.target = target
        conn = db.create(target)
        try:
            keystore.new_key(conn, PASSPHRASE)
            registry.add_device(conn, DEVICE_BYTES, 10000, 50000)
            registry.add_device(conn, registry.parse_eui64(OTHER), 500, 5000)
        finally:
            conn.close()
        self.env = dict(os.environ, TOPUP_DB=target, TOPUP_PASSPHRASE=PASSPHRASE,
                        TOPUP_INSECURE_FAST_KDF="1")

    def conn(self):
        return db.open_db(self.target)

    def query(self, sql, args=()):
        conn = self.conn()
        try:
            return [tuple(r) for r in conn.execute(sql, args).fetchall()]
        finally:
            conn.close()

    def token(self, *scopes):
        """Make a token; (its id, headers carrying it)."""
        conn = self.conn()
        try:
            token_id, secret = auth.new_token(conn, scopes or ("issue", "read"), "test")
        finally:
            conn.close()
        return token_id, {"Authorization": "Bearer " + secret}

    def cli(self, *args, check=True):
        """`topup ARGS` on this database (the real command line, in this process): an
        object with returncode, stdout and stderr."""
        from click.testing import CliRunner
        from host.cli import cli
        r = CliRunner().invoke(cli, [str(a) for a in args], env={
            "TOPUP_DB": self.target, "TOPUP_PASSPHRASE": PASSPHRASE}, catch_exceptions=False)
        r.returncode = r.exit_code
        if check:
            assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r


@pytest.fixture
def supplier(target):
    return Supplier(target)


@pytest.fixture
def client(supplier):
    from fastapi.testclient import TestClient
    from host.api.app import create_app
    with TestClient(create_app(supplier.target, PASSPHRASE)) as c:
        yield c


class Server(ServeProcess):
    """A `topup serve` process on the supplier's database (tests/serve_process.py)."""

    def __init__(self, supplier, log_path, *extra):
        super().__init__(supplier.env, log_path, *extra)


@pytest.fixture
def serve(supplier, tmp_path):
    """serve(*extra_args) -> a running Server (wait=False: started, call .ready()); all
    stopped at the end of the test."""
    started = []

    def start(*extra, wait=True):
        s = Server(supplier, tmp_path / ("serve-%d.log" % len(started)), *extra)
        started.append(s)
        return s.ready() if wait else s
    yield start
    for s in started:
        s.stop()
