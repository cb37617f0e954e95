# API tokens (schema v7, table api_tokens). A token is `tk_<16 hex>.<43 base64url>`: the
# part before the dot is its id (public: shown by `topup token list`, written in the audit
# log), the whole string is the secret, shown once by `topup token new` and stored only as
# its SHA-256 (the secret part carries 256 random bits, so a plain hash is enough: there is
# nothing to guess). A request sends it as `Authorization: Bearer <token>`.
#
# Scopes: issue (vouchers, codes, void), read (look vouchers and devices up), ingest
# (receipts), admin (register devices). Each route asks for exactly one; no scope implies
# another. A revoked token is refused within 2 s on every node (host/api/deps.py's
# TOKEN_CACHE_S: a verified token is remembered that long per process).
import base64
import hashlib
import hmac
import re
import secrets
import time
from typing import NamedTuple

from ..db import transaction
from ..errors import TopupError

SCOPES = ("issue", "read", "ingest", "admin")
_TOKEN = re.compile(r"(tk_[0-9a-f]{16})\.([A-Za-z0-9_-]{43})\Z")
_ID = re.compile(r"tk_[0-9a-f]{16}\Z")


class Caller(NamedTuple):
    """Who asked: the token's id and its scopes (a frozenset)."""
    token_id: str
    scopes: frozenset


class Token(NamedTuple):
    id: str
    scopes: tuple
    label: str
    created: int
    revoked: int


def token_hash(token):
    return hashlib.sha256(token.encode("ascii")).digest()


def check_scopes(scopes):
    scopes = [s.strip().lower() for s in scopes if s.strip()]
    if not scopes:
        raise TopupError("a token needs at least one scope (%s)" % ", ".join(SCOPES))
    for s in scopes:
        if s not in SCOPES:
            raise TopupError("unknown scope %r (scopes: %s)" % (s, ", ".join(SCOPES)))
    return tuple(s for s in SCOPES if s in scopes)


def new_token(conn, scopes, label=None, now=None, by="cli"):
    """Make a token: (its id, the secret token to hand over — shown once, never stored)."""
    scopes = check_scopes(scopes)
    created = int(time.time()) if now is None else int(now)
    token_id = "tk_" + secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    token = "%s.%s" % (token_id, secret)
    with transaction(conn):
        conn.execute("INSERT INTO api_tokens (id, hash, scopes, label, created, revoked) "
                     "VALUES (?, ?, ?, ?, ?, NULL)",
                     (token_id, token_hash(token), " ".join(scopes), label, created))
        audit(conn, by, "token", detail="new %s (%s)" % (token_id, " ".join(scopes)), at=created)
    return token_id, token


def list_tokens(conn):
    return [Token(r[0], tuple(r[1].split()), r[2], r[3], r[4]) for r in conn.execute(
        "SELECT id, scopes, label, created, revoked FROM api_tokens ORDER BY created, id")]


def revoke_token(conn, token_id, now=None, by="cli"):
    """Revoke a token: every request carrying it is refused (401) from now on."""
    token_id = token_id.strip()
    if "." in token_id:  # the whole secret pasted: its id is the part before the dot
        token_id = token_id.split(".", 1)[0]
    if not _ID.match(token_id):
        raise TopupError("%r is not a token id (tk_ and 16 hex digits; `topup token list`)"
                         % token_id)
    when = int(time.time()) if now is None else int(now)
    with transaction(conn):
        r = conn.execute("SELECT revoked FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
        if r is None:
            raise TopupError("no token %s in this database" % token_id)
        if r[0] is not None:
            raise TopupError("token %s is already revoked (%s)" % (
                token_id, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r[0]))))
        conn.execute("UPDATE api_tokens SET revoked = ? WHERE id = ?", (when, token_id))
        audit(conn, by, "token", detail="revoke %s" % token_id, at=when)
    return when


def audit(conn, token, action, device=None, first_seq=None, last_seq=None, amount=None,
          detail=None, at=None):
    """One audit row, inside the caller's transaction."""
    conn.execute("INSERT INTO audit (at, token, action, device, first_seq, last_seq, amount, "
                 "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (int(time.time()) if at is None else int(at), token, action,
                  None if device is None else bytes(device), first_seq, last_seq, amount,
                  detail))


def audit_many(conn, rows):
    """Audit rows [(at, token, action, device, first_seq, last_seq, amount, detail)],
    inside the caller's transaction."""
    conn.executemany("INSERT INTO audit (at, token, action, device, first_seq, last_seq, "
                     "amount, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     [(int(r[0]), r[1], r[2], None if r[3] is None else bytes(r[3]))
                      + tuple(r[4:]) for r in rows])


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="topup"'}


def authenticate(conn, authorization):
    """The Caller for an `Authorization` header value, or Problem 401."""
    from .problems import Problem  # the web stack, only for the service (not the CLI)
    if not authorization:
        raise Problem(401, "no API token: send `Authorization: Bearer <token>` (make one "
                      "with `topup token new`)", headers=_CHALLENGE)
    scheme, _, value = authorization.strip().partition(" ")
    m = _TOKEN.match(value.strip()) if scheme.lower() == "bearer" else None
    if m is None:
        raise Problem(401, "the Authorization header is not `Bearer <token>` with a topup "
                      "API token (tk_…)", headers=_CHALLENGE)
    r = conn.execute("SELECT hash, scopes, revoked FROM api_tokens WHERE id = ?",
                     (m.group(1),)).fetchone()
    if r is None or not hmac.compare_digest(bytes(r[0]), token_hash(m.group(0))):
        raise Problem(401, "unknown API token", headers=_CHALLENGE)
    if r[2] is not None:
        raise Problem(401, "API token %s was revoked" % m.group(1), headers=_CHALLENGE)
    return Caller(m.group(1), frozenset(r[1].split()))
