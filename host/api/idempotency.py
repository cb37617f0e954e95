# Idempotency-Key (the IETF httpapi draft's header): a payment channel that retries a
# request after a timeout gets the answer of the first one, byte for byte, and never a
# second voucher.
#
# Keys live in one namespace for the whole supplier (every node, every token): a retry
# carrying a different token — a channel that rotated its token between two attempts —
# still finds its answer, and the audit log keeps the token that first asked. A key names
# one request: method, path and the request's values after parsing (the device's 8 bytes,
# the amount in pence, ...), so `"amount": 1050` and `"amount": "£10.50"` are the same
# request and anything else under a used key is 409.
#
# The answer is stored in the transaction that stores the vouchers (host/issuer.py's
# `also` hook), so after a crash or kill -9 a retry either finds the stored answer or finds
# nothing issued and issues once. Two requests with one key at once: both may sign, but
# the second to take the write lock finds the first's row under the lock and rolls its
# own vouchers back (and the key's primary key refuses a second row in any case).
# Only successful answers (201) are stored: a refusal changed nothing, and a retry is
# judged afresh.
import hashlib
import json
import re
import time

from starlette.responses import Response

from .problems import Problem

HEADER = "Idempotency-Key"
_KEY = re.compile(r"[\x21-\x7e]{1,255}\Z")  # printable ASCII, no spaces


class Replayed(Exception):
    """Raised inside the issuing transaction when the key was stored meanwhile: the
    transaction rolls back and the stored answer is returned instead."""


def check_key(value, required=True):
    """The key from the header value, or Problem 400."""
    if value is None or value == "":
        if required:
            raise Problem(400, "this request needs an %s header (a unique value per payment, "
                          "e.g. a UUID, sent again unchanged when the request is retried)"
                          % HEADER)
        return None
    value = value.strip().strip('"')  # the draft's sf-string form "…" too
    if not _KEY.match(value):
        raise Problem(400, "%s must be 1 to 255 printable ASCII characters without spaces"
                      % HEADER)
    return value


def fingerprint(method, path, values):
    """SHA-256 over the method, path and the request's parsed values (JSON-able)."""
    doc = json.dumps([method.upper(), path, values], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).digest()


def lookup(conn, key):
    """(request fingerprint, status, response bytes) stored for `key`, or None."""
    r = conn.execute("SELECT request, status, response FROM idempotency WHERE key = ?",
                     (key,)).fetchone()
    return None if r is None else (bytes(r[0]), r[1], bytes(r[2]))


def answer(stored, fp, key):
    """The stored answer as a Response, or Problem 409 if it answered another request."""
    request, status, body = stored
    if request != fp:
        raise Problem(409, "%s %r was already used for a different request; use a new key "
                      "for a new payment" % (HEADER, key), type="/problems/idempotency-conflict",
                      title="Idempotency key reused")
    return Response(body, status_code=status, media_type="application/json",
                    headers={"Idempotent-Replayed": "true"})


def store(conn, key, token, fp, status, body, now=None):
    """Store the answer (inside the caller's transaction): Replayed if the key is taken."""
    if conn.execute("SELECT 1 FROM idempotency WHERE key = ?", (key,)).fetchone():
        raise Replayed(key)
    conn.execute("INSERT INTO idempotency (key, token, request, status, response, created) "
                 "VALUES (?, ?, ?, ?, ?, ?)",
                 (key, token, fp, status, body, int(time.time()) if now is None else int(now)))


def store_many(conn, rows):
    """Store answers [(key, token, fingerprint, status, body, created)] inside the caller's
    transaction (group commit: the caller checked under the write lock that no key is
    taken)."""
    conn.executemany("INSERT INTO idempotency (key, token, request, status, response, "
                     "created) VALUES (?, ?, ?, ?, ?, ?)", rows)
