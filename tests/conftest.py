# A real PostgreSQL server for the tests that need one: started once per test session from
# Debian's binaries (/usr/lib/postgresql/*/bin; `make postgres` installs them) with initdb
# and pg_ctl in a temporary directory, listening on 127.0.0.1 on a free port (its unix
# socket in that directory too), stopped when the session ends — also after failures or
# an interrupt. Each test that asks for `postgres_url` gets a fresh, empty database.
#
# No binaries, or a server that will not start: the test is skipped on a developer's
# machine, and FAILS when CI=true (the PostgreSQL tests never skip in CI).
import atexit
import glob
import os
import pwd
import queue
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading

import pytest

PG_USER = "topup"


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: a storage test about the SQLite file "
                            "itself; not repeated on PostgreSQL (tests/host/conftest.py)")


def _pg_bin():
    """The newest PostgreSQL server's bin directory, or None."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        version = os.path.basename(os.path.dirname(os.path.dirname(initdb)))
        try:
            found.append((float(version), os.path.dirname(initdb)))
        except ValueError:
            continue
    return max(found)[1] if found else None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(why):
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail("PostgreSQL is needed in CI and %s" % why, pytrace=False)
    pytest.skip("no PostgreSQL server: %s (run `make postgres`)" % why)


class _Server:
    def __init__(self, bindir):
        self.bindir = bindir
        self.root = tempfile.mkdtemp(prefix="topup-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.port = None
        self.started = False
        # initdb and the server refuse to run as root: run them as the `postgres` system
        # user (the package creates it) when we are root.
        self.user = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            self.user = pw.pw_uid, pw.pw_gid
            os.chown(self.root, *self.user)
        os.chmod(self.root, 0o755)

    def _run(self, *args):
        kw = {}
        if self.user is not None:
            kw = dict(user=self.user[0], group=self.user[1], extra_groups=[])
        return subprocess.run([os.path.join(self.bindir, args[0]), *args[1:]],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120, **kw)

    def start(self):
        r = self._run("initdb", "-D", self.data, "-U", PG_USER, "--auth=trust",
                      "--encoding=UTF8", "--locale=C", "--no-sync")
        if r.returncode:
            raise RuntimeError("initdb failed: %s" % r.stdout.strip()[-2000:])
        for _ in range(5):
            self.port = _free_port()
            # Durability of the server's own files does not matter to a throw-away cluster
            # (the tests kill clients, never the server): fsync off, minimal WAL and no
            # autovacuum keep it fast on a small machine.
            opts = ("-c listen_addresses=127.0.0.1 -c port=%d -c unix_socket_directories=%s "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                    "-c wal_level=minimal -c max_wal_senders=0 -c autovacuum=off "
                    "-c max_connections=200" % (self.port, self.root))
            r = self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w",
                          "-t", "60", "start")
            if r.returncode == 0:
                self.started = True
                self._start_maker()
                return
        try:
            with open(self.log) as f:
                tail = f.read()[-2000:]
        except OSError:
            tail = ""
        raise RuntimeError("pg_ctl start failed: %s %s" % (r.stdout.strip()[-1000:], tail))

    def stop(self):
        if self.started:
            self.started = False
            self._jobs.put(("stop", None))
            self._thread.join(timeout=30)
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname="postgres"):
        return "postgresql://%s@127.0.0.1:%d/%s" % (PG_USER, self.port, dbname)

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
        import psycopg
        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE %s TEMPLATE %s STRATEGY FILE_COPY" % (name, template))
        return name


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (started on first use), or skip/fail."""
    bindir = _pg_bin()
    if bindir is None:
        _unavailable("no initdb under /usr/lib/postgresql/*/bin")
    server = _Server(bindir)
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
