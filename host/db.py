# The supplier database: one SQLite file in WAL mode, synchronous=FULL, schema versioned
# with PRAGMA user_version and marked as ours with PRAGMA application_id.
#
# `create(path)` is the only way a database comes into being (`topup init`); `open_db`
# refuses a missing file, a file that is not SQLite, or an SQLite file that is not ours,
# and never writes to such a file. A database that cannot be written (a read-only mount,
# no write permission) is said to be so: commands that only read open it read-only
# (`open_db(path, write=False)`), and commands that must write refuse in one clear line.
import contextlib
import os
import queue
import sqlite3
import urllib.parse

from protocol.cose import kid_for

from . import pg
from .errors import DatabaseUnavailable, TopupError

APPLICATION_ID = 0x4F545531  # "OTU1"
SCHEMA_VERSION = 7
BUSY_TIMEOUT_S = 60.0  # a concurrent issuer waits this long for the write lock
_SQLITE_MAGIC = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE keys (
    kid         BLOB PRIMARY KEY CHECK (length(kid) = 8),
    public_key  BLOB NOT NULL UNIQUE CHECK (length(public_key) = 32),
    salt        BLOB NOT NULL,
    sealed_seed BLOB NOT NULL,                -- SecretBox(nonce || ciphertext) of the seed
    opslimit    INTEGER NOT NULL,
    memlimit    INTEGER NOT NULL,
    created     INTEGER NOT NULL,
    active      INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
    revoked     INTEGER,                      -- Unix time of revocation; vouchers become void
    CHECK (NOT (active = 1 AND revoked IS NOT NULL))
);
CREATE UNIQUE INDEX keys_one_active ON keys (active) WHERE active = 1;

CREATE TABLE devices (
    device        BLOB PRIMARY KEY CHECK (length(device) = 8),
    public_key    BLOB CHECK (public_key IS NULL OR length(public_key) = 32),
    max_voucher   INTEGER NOT NULL CHECK (max_voucher BETWEEN 1 AND 1000000),
    max_credit    INTEGER NOT NULL CHECK (max_credit >= max_voucher),
    next_sequence INTEGER NOT NULL DEFAULT 1 CHECK (next_sequence BETWEEN 1 AND 4294967296),
    label         TEXT,
    created       INTEGER NOT NULL
);

CREATE TABLE vouchers (
    device   BLOB NOT NULL REFERENCES devices (device),
    sequence INTEGER NOT NULL CHECK (sequence BETWEEN 1 AND 4294967295),
    kid      BLOB NOT NULL REFERENCES keys (kid),
    amount   INTEGER NOT NULL CHECK (amount BETWEEN 1 AND 1000000),
    issued   INTEGER NOT NULL,
    expires  INTEGER,
    ref      BLOB NOT NULL,                   -- unique by construction: a hash over device+sequence
    cose     BLOB NOT NULL,
    PRIMARY KEY (device, sequence)
) WITHOUT ROWID;
"""

# Version 2: receipts back from meters and the stored result of reconciliation
# (host/reconcile.py). A version-1 database is upgraded in place when it is opened.
SCHEMA_V2 = """
CREATE TABLE imports (
    batch    INTEGER PRIMARY KEY,
    at       INTEGER NOT NULL,            -- Unix time of the import
    source   TEXT NOT NULL,               -- file name, or the channel (HAN read-out, head end)
    receipts INTEGER NOT NULL,            -- receipts in the source
    new      INTEGER NOT NULL             -- of which stored by this import
);

-- One row per distinct receipt (by its bytes). Clustered by (device, index): a meter's
-- chain is one range, in order, and receipts arrive mostly in that order. Two different
-- receipts at one index (a fork) are two rows. Import time and source: imports.batch.
CREATE TABLE receipts (
    device         BLOB NOT NULL,         -- not a foreign key: unknown meters are kept
    idx            INTEGER NOT NULL,      -- receipt index
    hash           BLOB NOT NULL,         -- SHA-256 of raw: what the next receipt's prev holds
    kind           INTEGER NOT NULL,      -- 1 top-up, 2 emergency credit, 3 rejections, 4 faults
    prev           BLOB NOT NULL,
    meter_time     INTEGER NOT NULL,
    balance_before INTEGER NOT NULL,      -- milli-pence
    balance_after  INTEGER NOT NULL,      -- milli-pence
    sequence       INTEGER,               -- kind 1
    voucher_ref    BLOB,                  -- kind 1
    amount         INTEGER,               -- pence; kinds 1 and 2
    rejections     TEXT,                  -- kind 3: JSON {reason code: count}
    raw            BLOB NOT NULL,         -- the COSE_Sign1 bytes as received
    batch          INTEGER NOT NULL,      -- imports.batch
    checked_kid    BLOB,                  -- kid of the device key the signature was checked
                                          -- with (v3: the key whose span holds idx)
    sig_ok         INTEGER,               -- 1 valid, 0 not; NULL not checked (no key for it)
    PRIMARY KEY (device, idx, hash)
) WITHOUT ROWID;

CREATE VIEW receipt_log AS
    SELECT r.device, r.idx, r.hash, r.kind, r.prev, r.meter_time, r.balance_before,
           r.balance_after, r.sequence, r.voucher_ref, r.amount, r.rejections, r.raw,
           i.at AS imported, i.source, r.sig_ok
    FROM receipts r JOIN imports i ON i.batch = r.batch;

CREATE TABLE voucher_status (
    device        BLOB NOT NULL,
    sequence      INTEGER NOT NULL,
    status        TEXT NOT NULL
                  CHECK (status IN ('outstanding', 'redeemed', 'stale', 'expired', 'void')),
    amount        INTEGER NOT NULL,  -- the voucher's amount in pence (copied for the totals)
    closed_at     INTEGER,      -- when it stopped being a liability (redeemed, stale, expiry, revocation)
    receipt       BLOB,         -- redeemed: hash of the receipt
    receipt_index INTEGER,      -- redeemed: its index
    balance_after INTEGER,      -- redeemed: the meter's balance after it, milli-pence
    PRIMARY KEY (device, sequence)
) WITHOUT ROWID;

CREATE TABLE anomalies (
    id            TEXT PRIMARY KEY,  -- stable across runs: a hash of what the anomaly is about
    kind          TEXT NOT NULL,
    device        BLOB,
    receipt_index INTEGER,
    receipt       BLOB,              -- hash of the receipt concerned, if one
    sequence      INTEGER,
    detail        TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE reconciliations (
    run            INTEGER PRIMARY KEY,
    at             INTEGER NOT NULL,  -- wall-clock time of the run
    as_of          INTEGER NOT NULL,  -- the time expiry was judged at
    expired_policy TEXT NOT NULL CHECK (expired_policy IN ('refund', 'void')),
    receipts       INTEGER NOT NULL,
    last_batch     INTEGER NOT NULL,  -- the last imports.batch it saw (0: none)
    vouchers       INTEGER NOT NULL,
    anomalies      INTEGER NOT NULL
);
"""

# Version 3: every meter key a device has had, each with the span of receipt indices it
# signs (SPEC.md §4 "Epochs") and the sequence floor the meter took at that provisioning
# (§2.2); kind-4 receipts' fault counts. devices.public_key stays: the current key.
SCHEMA_V3 = """
CREATE TABLE device_keys (
    device      BLOB NOT NULL REFERENCES devices (device),
    epoch       INTEGER NOT NULL CHECK (epoch >= 1),  -- 1, 2, ... per device, in registration order
    public_key  BLOB NOT NULL CHECK (length(public_key) = 32),
    kid         BLOB NOT NULL CHECK (length(kid) = 8),  -- first 8 bytes of SHA-256 of public_key
    first_index INTEGER NOT NULL CHECK (first_index BETWEEN 0 AND 4294967295),
                                          -- its first receipt; its span ends at the next key's
    floor       INTEGER NOT NULL CHECK (floor BETWEEN 0 AND 4294967295),
                                          -- the meter refuses every sequence <= floor (STALE)
    provisioned INTEGER NOT NULL,         -- Unix time the key was registered
    PRIMARY KEY (device, epoch),
    UNIQUE (device, public_key)
) WITHOUT ROWID;

ALTER TABLE receipts ADD COLUMN faults TEXT;  -- kind 4: JSON {fault code: count}

ALTER TABLE voucher_status ADD COLUMN note TEXT;  -- stale: why the meter refuses it

DROP VIEW receipt_log;
CREATE VIEW receipt_log AS
    SELECT r.device, r.idx, r.hash, r.kind, r.prev, r.meter_time, r.balance_before,
           r.balance_after, r.sequence, r.voucher_ref, r.amount, r.rejections, r.faults,
           r.raw, i.at AS imported, i.source, r.sig_ok, r.checked_kid
    FROM receipts r JOIN imports i ON i.batch = r.batch;
"""


def _v3(conn):
    for stmt in _statements(SCHEMA_V3):
        conn.execute(stmt)
    # Every existing key becomes its device's first epoch: receipts from index 0, no floor
    # (a version-2 database's meters never carried anything across a reset).
    rows = conn.execute("SELECT device, public_key, created FROM devices "
                        "WHERE public_key IS NOT NULL").fetchall()
    conn.executemany("INSERT INTO device_keys (device, epoch, public_key, kid, first_index, "
                     "floor, provisioned) VALUES (?, 1, ?, ?, 0, 0, ?)",
                     [(d, p, kid_for(p), created) for d, p, created in rows])


# Version 4: what was written where. Every `topup issue` (or program call of the issuer)
# is an issue batch; each voucher names its batch. A delivery is a run of one device's
# consecutive sequences written whole to a destination (an output file, a folder, stdout)
# or handed to a program: recorded only after the write has completed (after the rename of
# an output file), so a voucher without a delivery was never confirmed written anywhere
# and `topup vouchers list --undelivered` finds it even after a kill -9. Re-delivering a
# voucher that did get out is harmless (a meter applies one voucher once). A single
# voucher can be cancelled (voided): reconciliation counts it void, and names a meter that
# applies it anyway (`void_redeemed`).
SCHEMA_V4 = """
CREATE TABLE issue_batches (
    batch       INTEGER PRIMARY KEY,
    device      BLOB NOT NULL,
    amount      INTEGER NOT NULL,          -- pence, each voucher
    requested   INTEGER NOT NULL,          -- vouchers asked for
    created     INTEGER NOT NULL,          -- Unix time of its first commit
    format      TEXT,                      -- text, json, cbor, qr, png, svg; NULL: a program
    destination TEXT                       -- absolute path, folder/, '-' (stdout); NULL: a program
);

CREATE TABLE deliveries (
    id          INTEGER PRIMARY KEY,
    device      BLOB NOT NULL,
    first       INTEGER NOT NULL,          -- sequences first..last, all of them written
    last        INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    batch       INTEGER,                   -- the issue batch that wrote them; NULL: an export
    format      TEXT,
    destination TEXT                       -- as issue_batches.destination
);
CREATE INDEX deliveries_by_range ON deliveries (device, first);

ALTER TABLE vouchers ADD COLUMN batch INTEGER;    -- issue_batches.batch; NULL: issued before v4
ALTER TABLE vouchers ADD COLUMN voided INTEGER;   -- Unix time it was cancelled (topup vouchers void)
ALTER TABLE vouchers ADD COLUMN void_note TEXT;
"""


# Version 5: keypad codes (SPEC.md §8). The supplier's code keys (X25519 key pairs, sealed
# like the issuer keys; one active: the one provisioning installs on meters; rotation keeps
# the others for the meters that have them). Each meter key epoch records the meter's
# key-agreement public key its provisioning printed (NULL: firmware without codes) and the
# supplier code key installed with it: a code for that meter is derived from exactly that
# pair. Codes are stored beside vouchers, in the same per-device sequence space (one table:
# statuses, deliveries, void and reconciliation treat both alike): `form` 1 a voucher
# (COSE bytes, issuer key), 2 a keypad code (its 20 digits, the code key; no expiry, at most
# 65,535 p). The vouchers table is rebuilt for that (kid and cose become NULL for a code).
# Receipts keep their form (field 13) and the supply state after them (field 14).
SCHEMA_V5 = """
CREATE TABLE code_keys (
    kid           BLOB PRIMARY KEY CHECK (length(kid) = 8),  -- first 8 bytes of SHA-256 of public_key
    public_key    BLOB NOT NULL UNIQUE CHECK (length(public_key) = 32),  -- X25519
    salt          BLOB NOT NULL,
    sealed_secret BLOB NOT NULL,              -- SecretBox(nonce || ciphertext) of the X25519 secret
    opslimit      INTEGER NOT NULL,
    memlimit      INTEGER NOT NULL,
    created       INTEGER NOT NULL,
    active        INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
    revoked       INTEGER,
    CHECK (NOT (active = 1 AND revoked IS NOT NULL))
);
CREATE UNIQUE INDEX code_keys_one_active ON code_keys (active) WHERE active = 1;

ALTER TABLE device_keys ADD COLUMN ka_public BLOB CHECK (ka_public IS NULL OR length(ka_public) = 32);
ALTER TABLE device_keys ADD COLUMN code_kid BLOB REFERENCES code_keys (kid);

CREATE TABLE vouchers_v5 (
    device    BLOB NOT NULL REFERENCES devices (device),
    sequence  INTEGER NOT NULL CHECK (sequence BETWEEN 1 AND 4294967295),
    kid       BLOB REFERENCES keys (kid),     -- a voucher's issuer key; NULL for a code
    amount    INTEGER NOT NULL CHECK (amount BETWEEN 1 AND 1000000),
    issued    INTEGER NOT NULL,
    expires   INTEGER,
    ref       BLOB NOT NULL,                  -- a voucher's or a code's reference (SPEC §2.2, §8)
    cose      BLOB,                           -- a voucher's COSE_Sign1 bytes; NULL for a code
    batch     INTEGER,
    voided    INTEGER,
    void_note TEXT,
    form      INTEGER NOT NULL DEFAULT 1 CHECK (form IN (1, 2)),  -- 1 voucher, 2 keypad code
    code      TEXT,                           -- a code's 20 digits
    code_kid  BLOB REFERENCES code_keys (kid),  -- the code key it was derived with
    CHECK ((form = 1 AND kid IS NOT NULL AND cose IS NOT NULL AND code IS NULL
            AND code_kid IS NULL)
        OR (form = 2 AND kid IS NULL AND cose IS NULL AND length(code) = 20
            AND code_kid IS NOT NULL AND expires IS NULL AND amount <= 65535)),
    PRIMARY KEY (device, sequence)
) WITHOUT ROWID;
INSERT INTO vouchers_v5 (device, sequence, kid, amount, issued, expires, ref, cose, batch,
                         voided, void_note)
    SELECT device, sequence, kid, amount, issued, expires, ref, cose, batch, voided, void_note
    FROM vouchers;
DROP TABLE vouchers;
ALTER TABLE vouchers_v5 RENAME TO vouchers;

ALTER TABLE receipts ADD COLUMN form INTEGER;    -- kind 1: field 13 (NULL: absent, a voucher)
ALTER TABLE receipts ADD COLUMN supply INTEGER;  -- kinds 1, 2: field 14 (NULL: absent)

DROP VIEW receipt_log;
CREATE VIEW receipt_log AS
    SELECT r.device, r.idx, r.hash, r.kind, r.prev, r.meter_time, r.balance_before,
           r.balance_after, r.sequence, r.voucher_ref, r.amount, r.rejections, r.faults,
           r.raw, i.at AS imported, i.source, r.sig_ok, r.checked_kid, r.form, r.supply
    FROM receipts r JOIN imports i ON i.batch = r.batch;
"""


# Version 6: signed commands (SPEC.md §10). The supplier's command keys (Ed25519, sealed
# like the issuer keys; the active one is installed on meters at provisioning as their root
# of trust). Each meter key epoch records the command key its provisioning installed (NULL:
# none, or firmware older than commands: the meter takes no commands) and the issuer keys
# it was given (device_trust). A command is numbered per meter and per key epoch (a
# provisioning starts the meter's numbering again); the number is allocated in the same
# transaction that stores the signed command, so it is never reused. Status: pending
# (made, not yet confirmed by a receipt), applied (a command receipt names it), refused
# (the meter answered a reason code), superseded (a later provisioning replaced what it
# would have changed; never sent).
SCHEMA_V6 = """
CREATE TABLE command_keys (
    kid         BLOB PRIMARY KEY CHECK (length(kid) = 8),
    public_key  BLOB NOT NULL UNIQUE CHECK (length(public_key) = 32),
    salt        BLOB NOT NULL,
    sealed_seed BLOB NOT NULL,
    opslimit    INTEGER NOT NULL,
    memlimit    INTEGER NOT NULL,
    created     INTEGER NOT NULL,
    active      INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1))
);
CREATE UNIQUE INDEX command_keys_one_active ON command_keys (active) WHERE active = 1;

ALTER TABLE device_keys ADD COLUMN command_kid BLOB REFERENCES command_keys (kid);
-- The `prev` of the epoch's first receipt: NULL for zeros (a provisioning starts a chain);
-- a change of supplier hands over a chain that goes on (the hash of its command receipt).
ALTER TABLE device_keys ADD COLUMN first_prev BLOB CHECK (first_prev IS NULL OR length(first_prev) = 32);

CREATE TABLE device_trust (
    device BLOB NOT NULL,
    epoch  INTEGER NOT NULL,
    kid    BLOB NOT NULL CHECK (length(kid) = 8),   -- an issuer key the provisioning installed
    PRIMARY KEY (device, epoch, kid)                 -- (device, epoch): a device_keys row
) WITHOUT ROWID;

CREATE TABLE commands (
    id            INTEGER PRIMARY KEY,
    device        BLOB NOT NULL REFERENCES devices (device),
    epoch         INTEGER NOT NULL,             -- the meter key epoch it is numbered in
    number        INTEGER NOT NULL CHECK (number BETWEEN 1 AND 4294967295),
    kind          INTEGER NOT NULL CHECK (kind BETWEEN 1 AND 6),
    args          TEXT NOT NULL,                -- JSON: what it changes (keys as hex)
    raw           BLOB NOT NULL,                -- the COSE_Sign1 bytes
    ref           BLOB NOT NULL CHECK (length(ref) = 16),  -- sha256(raw)[:16]
    command_kid   BLOB NOT NULL,                -- the command key that signed it
    created       INTEGER NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'applied', 'refused', 'superseded')),
    receipt_index INTEGER,                      -- applied: its receipt's index
    receipt       BLOB,                         -- applied: its receipt's hash
    reason        INTEGER,                      -- refused: the meter's reason code
    settled       INTEGER                       -- when the status last changed
);
CREATE UNIQUE INDEX commands_numbered ON commands (device, epoch, number)
    WHERE status IN ('pending', 'applied');
CREATE INDEX commands_by_ref ON commands (ref);

ALTER TABLE receipts ADD COLUMN command_kind INTEGER;  -- kind 5: field 15
ALTER TABLE receipts ADD COLUMN tariff TEXT;           -- kind 5, SET_TARIFF: field 16 as JSON
"""


def _v6(conn):
    for stmt in _statements(SCHEMA_V6):
        conn.execute(stmt)
    # What each existing key epoch was given: the issuer keys that existed and were not
    # revoked when it was provisioned (what `topup provision` installs).
    conn.execute("INSERT INTO device_trust (device, epoch, kid) SELECT d.device, d.epoch, k.kid "
                 "FROM device_keys d JOIN keys k ON k.created <= d.provisioned AND "
                 "(k.revoked IS NULL OR k.revoked > d.provisioned)")


# Version 7: the HTTP service (`topup serve`, host/api/). API tokens (stored as the
# SHA-256 of the secret token, shown once), the stored answers to Idempotency-Keys (written
# in the same transaction as the vouchers they answer for: after a crash a retry finds the
# answer or finds nothing issued) and an audit log of who asked for what. Portable SQL:
# the same script runs on PostgreSQL (host/pg.py).
SCHEMA_V7 = """
CREATE TABLE api_tokens (
    id      TEXT PRIMARY KEY,             -- public part: tk_ and 16 hex digits
    hash    BLOB NOT NULL,                -- SHA-256 of the whole secret token
    scopes  TEXT NOT NULL,                -- space-separated: issue read ingest admin
    label   TEXT,
    created INTEGER NOT NULL,
    revoked INTEGER                       -- Unix time, NULL while valid
);
CREATE TABLE idempotency (
    key      TEXT PRIMARY KEY,            -- the Idempotency-Key header (one namespace)
    token    TEXT NOT NULL,               -- the token whose request stored the answer
    request  BLOB NOT NULL,               -- SHA-256 of method, path and the request's values
    status   INTEGER NOT NULL,            -- HTTP status of the stored answer
    response BLOB NOT NULL,               -- the JSON answer, byte for byte
    created  INTEGER NOT NULL
);
CREATE TABLE audit (
    at        INTEGER NOT NULL,
    token     TEXT NOT NULL,              -- api_tokens.id, or 'cli'
    action    TEXT NOT NULL,              -- issue, code, void, device, ingest, token
    device    BLOB,
    first_seq INTEGER,
    last_seq  INTEGER,
    amount    INTEGER,
    detail    TEXT
);
CREATE INDEX audit_by_time ON audit (at);
CREATE INDEX vouchers_by_ref ON vouchers (ref);
"""


# From version n to n + 1: an SQL script, or a function of the connection.
MIGRATIONS = {1: SCHEMA_V2, 2: _v3, 3: SCHEMA_V4, 4: SCHEMA_V5, 5: _v6, 6: SCHEMA_V7}


def _run_migration(conn, version):
    step = MIGRATIONS[version]
    if callable(step):
        step(conn)
    else:
        for stmt in _statements(step):
            conn.execute(stmt)


def _uri(path, mode):
    return "file:%s?mode=%s" % (urllib.parse.quote(os.path.abspath(path)), mode)


def _configure(conn):
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _connect(path, mode):
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    # check_same_thread=False: a service's pool hands one connection to one thread at a
    # time (ConnectionPool), never to two at once.
    return sqlite3.connect(_uri(path, mode), uri=True, timeout=BUSY_TIMEOUT_S,
                           isolation_level=None, check_same_thread=False)


def create(path):
    """Create a new, empty database at `path`. Refuses to touch an existing file.

    `path` may be a postgresql:// URL: the schema is created in that database, which
    must be empty."""
    if pg.is_url(path):
        return _create_pg(path)
    if os.path.lexists(path):
        raise TopupError("%s already exists; refusing to overwrite it" % path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise TopupError("cannot create %s: no directory %s" % (path, parent))
    try:
        conn = _connect(path, "rwc")
    except sqlite3.Error as e:
        raise TopupError("cannot create %s: %s" % (path, e)) from None
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        _configure(conn)
        conn.execute("BEGIN IMMEDIATE")
        for stmt in _statements(SCHEMA):
            conn.execute(stmt)
        for version in sorted(MIGRATIONS):
            _run_migration(conn, version)
        conn.execute("PRAGMA application_id = %d" % APPLICATION_ID)
        conn.execute("PRAGMA user_version = %d" % SCHEMA_VERSION)
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.remove(path + suffix)
            except OSError:
                pass
        raise
    return conn


def _statements(script):
    stmts, buf = [], []
    for line in script.splitlines():
        line = line.split("--", 1)[0].rstrip()
        if not line:
            continue
        buf.append(line)
        if line.endswith(";") and sqlite3.complete_statement("\n".join(buf)):
            stmts.append("\n".join(buf))
            buf = []
    return stmts


# Files this process has seen to be SQLite, by (device, inode). Closing ANY descriptor of a
# file drops every POSIX lock this process holds on it — SQLite's locks of connections
# already open included ("How To Corrupt An SQLite Database File", §2.2) — after which
# another process may checkpoint and delete the WAL under them (stale reads, "disk I/O
# error", lost commits). So the header is read by open/close only the first time; a
# service's pool opening more connections to a file it holds never does it again.
_VERIFIED = set()


def _check_file(path):
    if not os.path.lexists(path):
        raise TopupError("no database at %s (run `topup init`)" % path)
    if os.path.isdir(path):
        raise TopupError("%s is a directory, not a topup database" % path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise TopupError("cannot read %s: %s" % (path, e.strerror or e)) from None
    if (st.st_dev, st.st_ino) in _VERIFIED:
        return
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as e:
        raise TopupError("cannot read %s: %s" % (path, e.strerror or e)) from None
    if head != _SQLITE_MAGIC:
        raise TopupError("%s is not a topup database (not an SQLite file)" % path)
    _VERIFIED.add((st.st_dev, st.st_ino))


def _read_only_why(path):
    """Why `path` (an existing database) cannot be written, or None if it can."""
    if pg.is_url(path):
        return None
    parent = os.path.dirname(os.path.abspath(path))
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except OSError:
        pass
    if not os.access(path, os.W_OK):
        return "this user may not write to it"
    if not os.access(parent, os.W_OK):
        return "this user may not write to its directory %s (SQLite keeps its journal " \
               "there)" % parent
    return None


def _open_read_only(path):
    """A read-only connection to a database that cannot be written."""
    try:
        conn = _connect(path, "ro")
        conn.execute("PRAGMA schema_version").fetchone()  # opening is lazy: read once
        return conn
    except sqlite3.OperationalError:
        pass
    # In WAL mode even a reader needs the -shm index, which it cannot create here. With no
    # write-ahead log holding anything, the main file is the whole database: read it as
    # immutable. A log with content needs a writer to recover it first.
    wal = path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        raise TopupError("cannot read %s here: its write-ahead log %s holds changes that only "
                         "a writer can recover; open it once where it can be written"
                         % (path, wal))
    try:
        conn = sqlite3.connect(_uri(path, "ro") + "&immutable=1", uri=True,
                               timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute("PRAGMA schema_version").fetchone()
        return conn
    except sqlite3.Error as e:
        raise TopupError("cannot open %s read-only: %s" % (path, e)) from None


def open_db(path, write=True):
    """Open an existing topup database, or raise TopupError.

    write=False: the caller only reads; a database that cannot be written (read-only
    mount, permissions) is opened read-only. write=True: such a database is refused, in
    words that say why. `path` may be a postgresql:// URL.
    """
    if pg.is_url(path):
        return _open_pg(path)
    _check_file(path)
    why = _read_only_why(path)
    if why is not None and write:
        raise TopupError("%s is read-only (%s); this command writes to the database. "
                         "Commands that only read (key list, device list|show, vouchers list, "
                         "verify, report, receipts export) work on it" % (path, why))
    try:
        conn = _connect(path, "rw") if why is None else _open_read_only(path)
    except sqlite3.Error as e:
        raise TopupError("cannot open %s: %s" % (path, e)) from None
    try:
        # Read-only checks first: nothing is written before we know the file is ours.
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as e:
        conn.close()
        if why is None and "readonly" in str(e).lower():
            raise TopupError("%s is read-only (%s)" % (path, e)) from None
        raise TopupError("%s is not a topup database, or is damaged (%s)" % (path, e)) from None
    if app_id != APPLICATION_ID:
        conn.close()
        raise TopupError("%s is an SQLite database but not a topup database" % path)
    if version > SCHEMA_VERSION:
        conn.close()
        raise TopupError("%s has schema version %d; this topup understands up to %d"
                         % (path, version, SCHEMA_VERSION))
    if version < 1:
        conn.close()
        raise TopupError("%s is an unfinished topup database (schema version %d)" % (path, version))
    if why is not None:
        if version < SCHEMA_VERSION:
            conn.close()
            raise TopupError("%s has schema version %d and is read-only (%s): open it once "
                             "where it can be written to upgrade it to version %d"
                             % (path, version, why, SCHEMA_VERSION))
        conn.execute("PRAGMA query_only = ON")
        return conn
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            conn.close()
            raise TopupError("%s is not in WAL mode (journal_mode=%s)" % (path, mode))
        _configure(conn)
        if version < SCHEMA_VERSION:
            _migrate(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise TopupError("%s is damaged (%s)" % (path, e)) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn):
    """Upgrade an older schema in place, one transaction per step (all or nothing).

    The version is read again under the write lock, so two processes opening an old
    database at once upgrade it once.
    """
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                conn.execute("COMMIT")
                return
            _run_migration(conn, version)
            conn.execute("PRAGMA user_version = %d" % (version + 1))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def has_table(conn, name):
    """Whether the database has table `name` (an older schema being upgraded may not)."""
    if isinstance(conn, pg.Connection):
        return conn.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is not None
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


class transaction:
    """`with transaction(conn):` BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception.

    BEGIN IMMEDIATE takes the write lock up front, so a concurrent writer waits (busy
    timeout) instead of failing half-way; reads inside see a state no one else can change.
    """

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise TopupError("database is busy (%s); another topup holds the lock" % e) from None
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
        return False


class ConnectionPool:
    """Connections for a long-running service (`topup serve`): `with pool.connection() as
    conn:` lends one open, migrated connection to one thread at a time and takes it back.

    A connection that raised while lent is closed rather than reused, so a broken one
    (a half-finished transaction, a server gone away) never reaches the next request.
    """

    def __init__(self, target, size=8):
        self.target = target
        self.size = size
        open_db(target).close()  # refuse a missing or foreign database now, not per request
        self._idle = queue.LifoQueue()
        self._pg = _pg_pool(target, size) if pg.is_url(target) else None

    @contextlib.contextmanager
    def connection(self):
        if self._pg is not None:
            with _pg_lend(self._pg, self.target) as conn:
                yield conn
            return
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = open_db(self.target)
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        if self._idle.qsize() < self.size:
            self._idle.put(conn)
        else:
            conn.close()

    def close(self):
        if self._pg is not None:
            self._pg.close()
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


# --- PostgreSQL (host/pg.py translates the SQL) ---------------------------------------

def _create_pg(url):
    conn = pg.connect(url)
    try:
        pg.check_empty(conn, url)
        with transaction(conn):  # DDL is transactional: all of it, or nothing
            pg.check_empty(conn, url)
            for stmt in _statements(SCHEMA):
                conn.execute(stmt)
            for version in sorted(MIGRATIONS):
                _run_migration(conn, version)
            pg.init_meta(conn, APPLICATION_ID, SCHEMA_VERSION)
    except BaseException:
        conn.close()
        raise
    return conn


def _open_pg(url):
    where = pg.describe(url)
    conn = pg.connect(url)
    try:
        meta = pg.read_meta(conn)
        if meta is None:
            if pg.user_tables(conn):
                raise TopupError("%s is not a topup database (no topup_meta table)" % where)
            raise TopupError("%s is an empty database (run `topup init`)" % where)
        app_id, version = meta
        if app_id != APPLICATION_ID:
            raise TopupError("%s is not a topup database (application id %r)" % (where, app_id))
        if version > SCHEMA_VERSION:
            raise TopupError("%s has schema version %d; this topup understands up to %d"
                             % (where, version, SCHEMA_VERSION))
        if version < 1:
            raise TopupError("%s is an unfinished topup database (schema version %d)"
                             % (where, version))
        if version < SCHEMA_VERSION:
            _migrate_pg(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate_pg(conn):
    """As _migrate: one transaction per step, the version read again under the write lock."""
    while True:
        with transaction(conn):
            version = pg.read_meta(conn)[1]
            if version >= SCHEMA_VERSION:
                return
            _run_migration(conn, version)
            pg.set_version(conn, version + 1)


def _pg_pool(url, size):
    from psycopg_pool import ConnectionPool as Pool
    p = Pool(url, min_size=1, max_size=size, open=False, configure=pg.configure,
             check=Pool.check_connection, timeout=pg.CONNECT_TIMEOUT_S,
             kwargs={"autocommit": True, "connect_timeout": pg.CONNECT_TIMEOUT_S,
                     "options": "-c lock_timeout=%d" % pg.LOCK_TIMEOUT_MS})
    p.open(wait=False)
    return p


@contextlib.contextmanager
def _pg_lend(pool, url):
    """One pooled connection, wrapped; the pool discards it if it broke, and rolls back
    a transaction left open."""
    import psycopg
    from psycopg_pool import PoolTimeout
    cm = pool.connection()
    try:
        raw = cm.__enter__()
    except (PoolTimeout, psycopg.Error) as e:
        raise DatabaseUnavailable("database server %s is not reachable (%s)"
                                  % (pg.describe(url), pg.first_line(e))) from None
    try:
        yield pg.Connection(raw, url, owned=False)
    except BaseException as e:
        cm.__exit__(type(e), e, e.__traceback__)
        raise
    cm.__exit__(None, None, None)
