# A real PostgreSQL server for the tests that need one: started once per test session from
# Debian's binaries (/usr/lib/postgresql/*/bin; `make postgres` installs them) with initdb
# and pg_ctl in a temporary directory, listening on 127.0.0.1 on a free port (its unix
# socket in that directory too), stopped when the session ends — also after failures or
# an interrupt. Each test that asks for `postgres_url` gets a fresh, empty database.
#
# No binaries, or a server that will not start: the test is skipped on a developer's
# machine, and FAILS when CI=true (the PostgreSQL tests never skip in CI).
import atexit
import os
import queue
import secrets
import subprocess
import threading

import pytest

from tests import pg_server
from tests.pg_server import PgServer


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: a storage test about the SQLite file "
                            "itself; not repeated on PostgreSQL (tests/host/conftest.py)")


def _unavailable(why):
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail("PostgreSQL is needed in CI and %s" % why, pytrace=False)
    pytest.skip("no PostgreSQL server: %s (run `make postgres`)" % why)


class _Server(PgServer):
    """The session's server (tests/pg_server.py), with databases made ahead of the tests."""

    def start(self):
        super().start()
        self._start_maker()
        return self

    def stop(self):
        if self.started:
            self._jobs.put(("stop", None))
            self._thread.join(timeout=30)
        super().stop()

    # Databases are made and dropped by one background thread, ahead of and after the
    # tests that use them: the server does that work while a test runs.

    def _start_maker(self):
        self._jobs, self._ready = queue.Queue(), queue.Queue()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()
        self._jobs.put(("make", None))

    def _work(self):
        import psycopg
        conn = None
        while True:
            job, arg = self._jobs.get()
            if job == "stop":
                break
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url(), autocommit=True)
                if job == "make":
                    name = "t_" + secrets.token_hex(6)
                    conn.execute("CREATE DATABASE %s STRATEGY FILE_COPY" % name)
                    self._ready.put(name)
                else:
                    conn.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % arg)
            except Exception as e:  # handed to the test that waits for a database
                if job == "make":
                    self._ready.put(e)
        if conn is not None:
            conn.close()

    def new_database(self):
        """The name of a fresh, empty database (one more is made for the next test)."""
        self._jobs.put(("make", None))
        got = self._ready.get(timeout=300)
        if isinstance(got, Exception):
            raise got
        return got

    def drop(self, name):
        self._jobs.put(("drop", name))

    def copy_of(self, template):
        """The name of a new database copied from database `template` (quicker than
        building the same content again; the template must have no connections)."""
        return self.create_database("t_" + secrets.token_hex(6), template)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (started on first use), or skip/fail."""
    bin_dir = pg_server.bindir()
    if bin_dir is None:
        _unavailable("no initdb under /usr/lib/postgresql/*/bin")
    server = _Server(bin_dir)
    atexit.register(server.stop)  # also when the session dies before the fixture ends
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        server.stop()
        _unavailable("the server did not start (%s)" % e)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's server: postgresql://topup@127.0.0.1:PORT/t_…"""
    name = postgres_server.new_database()
    yield postgres_server.url(name)
    postgres_server.drop(name)
