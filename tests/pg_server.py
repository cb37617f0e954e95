"""A throw-away PostgreSQL cluster for the tests (tests/conftest.py) and the service
benchmark (tests/bench/bench_serve.py): initdb and pg_ctl from Debian's package
(/usr/lib/postgresql/*/bin; `make postgres` installs it) in a temporary directory,
listening on 127.0.0.1 on a free port with its unix socket in that directory, run as the
`postgres` system user when we are root (initdb and the server refuse root).

durable=False (the tests): fsync, synchronous commit and full-page writes off -- the
tests kill clients, never the server, so its own durability does not matter and a small
machine runs them faster. durable=True (the benchmark): as a supplier would run it.
"""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

USER = "topup"


def bindir():
    """The newest PostgreSQL server's bin directory, or None."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        version = os.path.basename(os.path.dirname(os.path.dirname(initdb)))
        try:
            found.append((float(version), os.path.dirname(initdb)))
        except ValueError:
            continue
    return max(found)[1] if found else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, bin_dir, durable=False, prefix="topup-pg-"):
        self.bindir = bin_dir
        self.durable = durable
        self.root = tempfile.mkdtemp(prefix=prefix)
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.port = None
        self.started = False
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
        """initdb, then pg_ctl start (a few ports tried: another process may take the free
        one first). RuntimeError with the server's words if it does not start."""
        r = self._run("initdb", "-D", self.data, "-U", USER, "--auth=trust",
                      "--encoding=UTF8", "--locale=C", "--no-sync")
        if r.returncode:
            raise RuntimeError("initdb failed: %s" % r.stdout.strip()[-2000:])
        opts = ("-c listen_addresses=127.0.0.1 -c port=%%d -c unix_socket_directories=%s "
                "-c max_connections=300" % self.root)
        if not self.durable:
            opts += (" -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                     "-c wal_level=minimal -c max_wal_senders=0 -c autovacuum=off")
        for _ in range(5):
            self.port = free_port()
            r = self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts % self.port,
                          "-w", "-t", "60", "start")
            if r.returncode == 0:
                self.started = True
                return self
        try:
            with open(self.log) as f:
                tail = f.read()[-2000:]
        except OSError:
            tail = ""
        raise RuntimeError("pg_ctl start failed: %s %s" % (r.stdout.strip()[-1000:], tail))

    def stop(self):
        if self.started:
            self.started = False
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname="postgres"):
        return "postgresql://%s@127.0.0.1:%d/%s" % (USER, self.port, dbname)

    def create_database(self, name, template=None):
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE %s%s STRATEGY FILE_COPY"
                         % (name, " TEMPLATE %s" % template if template else ""))
        return name
