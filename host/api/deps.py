# What a route needs: `lend(request, scope)`, a context manager that takes a pooled
# database connection, checks the caller's token against it (401/403) and gives the
# connection back, all inside the ONE thread call that does the route's work:
#
#     @router.get("/things/{id}")
#     def thing(id: str, request: Request):          # a sync route: one thread-pool call
#         with lend(request, "read") as (conn, caller):
#             ...
#
# Never FastAPI's Depends() for the connection: a dependency runs in one thread-pool call
# and the endpoint in another, so between the two a request would hold a pooled
# connection while it waits for a thread; with more requests in flight than the pool
# lends (PostgreSQL's pool is bounded), every thread then waits for a connection that a
# request queued for a thread holds — a deadlock until the pool's timeout (then 503s).
# An async route that must await between database steps calls `run_in_threadpool` on a
# function that uses `lend` inside it (host/api/receipts.py).
#
# A database that cannot be reached is a 503 problem, never a 500 or a hang: the pool
# could not lend a connection (the file is gone, the server is down), or the connection
# broke mid-request (then its transaction rolled back: nothing half-written).
import contextlib
import os
import sqlite3
import threading
import time

from fastapi import Request
from fastapi.exceptions import HTTPException, RequestValidationError

from .. import db
from ..errors import TopupError
from .auth import Caller, authenticate
from .problems import Problem

__all__ = ["Caller", "lend", "authorise", "GuardedPool", "unavailable", "DB_ERRORS",
           "is_db_unavailable"]


def _db_errors():
    errors = [sqlite3.OperationalError, sqlite3.InterfaceError, sqlite3.DatabaseError]
    try:
        import psycopg
        errors += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:  # pragma: no cover - psycopg is a dependency
        pass
    try:
        import psycopg_pool
        errors += [psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed]
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return tuple(errors)


DB_ERRORS = _db_errors()
try:  # host/pg.py's: the server cannot be reached or went away (a TopupError)
    from ..errors import DatabaseUnavailable as _DatabaseUnavailable
except ImportError:  # pragma: no cover
    class _DatabaseUnavailable(Exception):
        pass
_NOT_UNAVAILABLE = (sqlite3.IntegrityError, sqlite3.ProgrammingError)


def is_db_unavailable(exc):
    """True for an exception that means the database cannot be used right now (gone,
    locked past the busy timeout, disk I/O error, server down): a 503, not a bug."""
    if isinstance(exc, TopupError):
        return (isinstance(exc, _DatabaseUnavailable) or
                exc.message.startswith(("database is busy", "database is unavailable")))
    return isinstance(exc, DB_ERRORS) and not isinstance(exc, _NOT_UNAVAILABLE)


def unavailable(exc):
    detail = "the database is unavailable (%s); nothing was changed, retry later" % (
        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return Problem(503, detail, headers={"Retry-After": "1"})


class GuardedPool:
    """host.db.ConnectionPool, for an SQLite file also checking, each time it lends a
    connection, that the path still names the file the service opened: a database file
    removed or replaced under a running service is answered 503 (its open connections
    would go on writing to an unlinked file, and every voucher stored there would be lost
    with the process). PostgreSQL targets pass straight through."""

    def __init__(self, target, size=8):
        self.target = target
        self.pool = db.ConnectionPool(target, size)
        self._identity = self._stat() if self._is_file() else None

    def _is_file(self):
        return not str(self.target).startswith(("postgresql:", "postgres:"))

    def _stat(self):
        st = os.stat(self.target)
        return st.st_dev, st.st_ino

    def check(self):
        if self._identity is None:
            return
        try:
            same = self._stat() == self._identity
        except OSError as e:
            raise TopupError("database is unavailable: %s: %s"
                             % (self.target, e.strerror or e)) from None
        if not same:
            raise TopupError("database is unavailable: %s was replaced by another file; "
                             "restart the service to use it" % self.target)

    def connection(self):
        self.check()
        return self.pool.connection()

    def close(self):
        self.pool.close()


# Exceptions that are answers, not failures of the connection: it goes back to the pool.
_REFUSALS = (Problem, TopupError, HTTPException, RequestValidationError)


@contextlib.contextmanager
def lend(request: Request, scope=None):
    """`with lend(request, scope) as (conn, caller):` a pooled connection for this request
    and, with `scope`, the Caller whose token has it (else None). The connection goes back
    to the pool when the block ends: call it inside the thread that does the work."""
    try:
        cm = request.app.state.pool.connection()
        conn = cm.__enter__()
    except TopupError as e:  # the pool could not open the database
        raise unavailable(e) from None
    except DB_ERRORS as e:
        raise unavailable(e) from None
    try:
        caller = None if scope is None else authorise(request, conn, scope)
        yield conn, caller
    except _REFUSALS:
        if conn_in_transaction(conn):  # never lend a connection inside a transaction
            cm.__exit__(RuntimeError, RuntimeError("left in a transaction"), None)
        else:
            cm.__exit__(None, None, None)
        raise
    except BaseException as e:
        cm.__exit__(type(e), e, e.__traceback__)  # closed, not reused
        raise
    else:
        cm.__exit__(None, None, None)


def conn_in_transaction(conn):
    return bool(getattr(conn, "in_transaction", False))


# Verified tokens are remembered for TOKEN_CACHE_S seconds per process (a lookup less per
# request): a revoked token is refused by every node at most TOKEN_CACHE_S after
# `topup token revoke` (a wrong, unknown or revoked token is never remembered).
TOKEN_CACHE_S = 2.0
_tokens = {}  # the Authorization header value -> (Caller, verified at, monotonic)
_tokens_lock = threading.Lock()


def authorise(request, conn, scope):
    """The Caller whose token has `scope`; Problem 401 for a missing, unknown or revoked
    token, 403 for a token without the scope. `conn` None: only from the cache (None if
    the token was not verified in the last TOKEN_CACHE_S)."""
    header = request.headers.get("authorization")
    now = time.monotonic()
    hit = _tokens.get(header) if header else None
    if hit is not None and now - hit[1] < TOKEN_CACHE_S:
        who = hit[0]
    elif conn is None:
        return None
    else:
        who = authenticate(conn, header)
        with _tokens_lock:
            if len(_tokens) > 10000:
                _tokens.clear()
            _tokens[header] = (who, now)
    if scope not in who.scopes:
        raise Problem(403, "API token %s has scopes %s; this needs %r (make a token with "
                      "`topup token new --scope %s`)"
                      % (who.token_id, " ".join(sorted(who.scopes)) or "(none)", scope,
                         scope))
    request.state.caller = who
    return who


def forget_tokens():
    """Drop the verified-token cache (tests; a node told of a revocation)."""
    with _tokens_lock:
        _tokens.clear()
