# Reconciliation: receipts back from meters, verified and matched against what was issued.
#
# Key epochs (SPEC.md §2.2, §4): a device keeps every meter key it has had
# (host/registry.py, table device_keys). A key's span is the receipt indices from its first
# index up to the next key's; each receipt is verified with the key whose span holds its
# index (the key with the largest first index <= the index). Receipts from before a
# factory reset therefore still verify, with the old key.
#
# Import (`import_files`): every file is parsed and structure-checked first (a corrupt
# file stops everything before the database is touched); the signatures of receipts not
# yet stored are checked against the key of their span; then all new receipts are
# inserted in one transaction (WAL, synchronous=FULL: all or nothing, even under kill -9).
# A receipt is identified by the SHA-256 of its bytes, so importing it again changes
# nothing. Receipts that cannot be verified (unknown device, no key for their index) are
# kept.
#
# Reconcile (`reconcile`): one write transaction that
#   1. checks the signatures of stored receipts not yet checked with the key of their span
#      (a key registered after the import);
#   2. walks each meter's receipts: gaps (indices missing from the first key's first index
#      to the highest index held), and per span one chain: its first receipt starts a new
#      chain (prev = 32 zero bytes: a new epoch, not a fork), every other follows the
#      receipt before it (prev = its hash); two signed receipts at one index are a fork;
#      balances: balance_before(n+1) <= balance_after(n) inside a span (a reset starts a
#      new ledger), kinds 2, 3 and 4 leave the balance as it was, a top-up adds exactly its
#      amount; a fault receipt (kind 4) reporting flash damage is named;
#   3. matches every verified top-up receipt to an issued voucher, and gives every issued
#      voucher a status;
#   4. replaces the stored statuses and anomalies with the new ones and logs the run.
# Everything is derived from the stored receipts, vouchers, devices and keys, in a fixed
# order, so reconciling twice gives the same statuses and the same anomalies (same ids).
#
# Statuses, first that applies:
#   redeemed    a verified receipt from the voucher's own meter applied it (when: meter
#               time; which receipt; balance after)
#   void        it was cancelled (`topup vouchers void`) or its issuer key is revoked, and it
#               was never redeemed: the supplier has withdrawn it; neither a liability nor
#               a refund counted here. A cancelled voucher that a meter applies all the
#               same is redeemed (the credit is on the meter) and named: `void_redeemed`
#   stale       the meter refuses it for ever, so a refund is due: its sequence is below the
#               replay window as evidenced by receipts (sequence < highest applied - 64,
#               SPEC.md §2.2), or at or below the sequence floor of one of the meter's key
#               epochs (a provisioning or factory reset after it was issued). closed_at: the
#               earliest of the meter time of the receipt that moved the window past it and
#               the registration time of the first key epoch whose floor covers it; note:
#               why
#   expired     past its expiry at the reconciliation time: policy "refund" (default: the
#               customer paid for credit they never got) or "void" (forfeited)
#   outstanding still redeemable: a liability
import bisect
import hashlib
import json
import time

import nacl.bindings
import nacl.exceptions

from protocol import receipt as pr
from protocol.window import SIZE as WINDOW

from . import commands, receipts_io, registry
from .db import transaction
from .money import format_pence
from .registry import format_eui64

try:  # libsodium's crypto_sign_open through PyNaCl's own cffi module, buffers reused
    from nacl._sodium import ffi as _ffi, lib as _lib
    _lib.crypto_sign_open
except (ImportError, AttributeError):  # pragma: no cover - PyNaCl without that module
    _ffi = _lib = None

STATUSES = ("outstanding", "redeemed", "stale", "expired", "void")
POLICIES = ("refund", "void")

ANOMALY_KINDS = {
    "bad_signature": "receipt signature does not verify with the meter key registered for "
                     "its index",
    "unknown_device": "receipts from a meter that is not registered (kept, not verified)",
    "no_device_key": "receipts from a meter with no public key registered for them (kept, "
                     "not verified)",
    "chain_gap": "receipts missing from a meter's chain",
    "chain_fork": "two different receipts at one index, or a receipt that does not follow "
                  "the one before it (or does not start a new key's chain)",
    "balance_rise": "credit from nowhere: the balance rose outside a top-up",
    "balance_mismatch": "a receipt's balances disagree with its kind and amount",
    "not_issued": "top-up receipt for a voucher that was never issued",
    "amount_mismatch": "top-up amount differs from the issued voucher's",
    "ref_mismatch": "issued sequence, but a different voucher was applied under it",
    "device_mismatch": "voucher issued for another meter was applied",
    "applied_twice": "one voucher applied by more than one receipt",
    "meter_fault": "the meter reported flash damage (a fault receipt, SPEC.md §4.1)",
    "void_redeemed": "a cancelled (voided) voucher was applied by its meter all the same",
    "form_mismatch": "a top-up receipt names a voucher as a keypad code, or a code as a "
                     "voucher (its field 13, SPEC.md §4)",
    "applied_after_revocation": "a voucher applied under an issuer key its meter had already "
                                "revoked (after the revocation command's receipt, SPEC.md §10)",
}

# SPEC.md §4.1: what a kind-4 receipt counts.
FAULTS = {
    1: "record repaired (one bit was wrong)",
    2: "record lost (unrepairable, not a torn write)",
    3: "configuration copy lost or repaired",
    4: "committed receipt lost",
    5: "newest state record lost (rolled forward from receipts, or back one checkpoint)",
}


def describe_faults(faults):
    """'2 × record repaired (one bit was wrong) [1], ...' for a {fault code: count} map."""
    return ", ".join("%d × %s [%d]" % (n, FAULTS.get(code, "unknown fault"), code)
                     for code, n in sorted(faults.items()) if n) or "none"


# --- signatures -----------------------------------------------------------------------

class Verifier:
    """libsodium's Ed25519 verify (crypto_sign_open: strict, as PyNaCl's VerifyKey.verify)
    called with reused buffers. `verifier(public, message, signature) -> bool`;
    `verifier.signed(public, signature + message) -> bool`."""

    _CAP = 8192

    def __init__(self):
        if _lib is not None:
            self._out = _ffi.new("unsigned char[]", self._CAP)
            self._len = _ffi.new("unsigned long long *")
            self._open = _lib.crypto_sign_open

    def __call__(self, public, msg, sig):
        return self.signed(public, sig + msg)

    def signed(self, public, sm):
        if _lib is not None and len(sm) <= self._CAP:
            return self._open(self._out, self._len, sm, len(sm), public) == 0
        try:
            nacl.bindings.crypto_sign_open(sm, public)
            return True
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
            return False


# --- import ---------------------------------------------------------------------------

class ImportResult:
    def __init__(self):
        self.files = []      # [(source, receipts in file, new)]
        self.total = 0       # receipts read
        self.new = 0         # newly stored
        self.unverified = 0  # new receipts with no device key to check them against
        self.bad = 0         # new receipts whose signature does not verify

    @property
    def duplicates(self):
        return self.total - self.new


def _existing(conn, rows):
    """Hashes already stored, among those of `rows` (one range query per device)."""
    span = {}
    for row in rows:
        device, i = row[ROW_DEVICE], row[ROW_INDEX]
        lo_hi = span.get(device)
        if lo_hi is None:
            span[device] = [i, i]
        elif i < lo_hi[0]:
            lo_hi[0] = i
        elif i > lo_hi[1]:
            lo_hi[1] = i
    found = set()
    for device, (lo, hi) in span.items():
        found.update(h for (h,) in conn.execute(
            "SELECT hash FROM receipts WHERE device = ? AND idx BETWEEN ? AND ?",
            (device, lo, hi)))
    return found


ROW_DEVICE, ROW_KID, ROW_SIGNED, ROW_HASH = (receipts_io.ROW_DEVICE, receipts_io.ROW_KID,
                                             receipts_io.ROW_SIGNED, receipts_io.ROW_HASH)
ROW_INDEX, ROW_KIND, ROW_COUNTS = receipts_io.ROW_INDEX, receipts_io.ROW_KIND, receipts_io.ROW_COUNTS
_VALUES, _VALUES_COUNTS = receipts_io.ROW_VALUES, receipts_io.ROW_VALUES_COUNTS

# Rows are inserted in groups that share device, checked key, verdict and which counts
# column they fill (kind 3: rejections, kind 4: faults): those are literals in the
# statement (sqlite3 binds fewer parameters).
_INSERT = ("INSERT OR IGNORE INTO receipts (idx, hash, kind, prev, meter_time, "
           "balance_before, balance_after, sequence, voucher_ref, amount, raw, form, supply, "
           "rejections, faults, device, checked_kid, sig_ok, batch) VALUES (?, ?, ?, ?, ?, ?, "
           "?, ?, ?, ?, ?, ?, ?, %s, %s, %s, %s, %s, %d)")


def _blob(b):
    return "NULL" if b is None else "X'%s'" % bytes(b).hex()


class _Spans:
    """Per device, the key of a receipt index: `key(index)` -> KeyEpoch or None."""

    def __init__(self, epochs):
        self.epochs = epochs
        self.firsts = [e.first_index for e in epochs]
        self.only = epochs[0] if len(epochs) == 1 else None

    def key(self, index):
        only = self.only
        if only is not None:
            return only if index >= only.first_index else None
        if not self.epochs or index < self.firsts[0]:
            return None
        return self.epochs[bisect.bisect_right(self.firsts, index) - 1]


def import_parsed(conn, batches, now=None, progress=None):
    """Store receipts already parsed: `batches` is [(source, [receipts_io.Parsed])].

    Signatures of receipts not yet stored are checked before the transaction; then one
    transaction stores everything new, with one `imports` row per source that brought
    something new. Nothing new: nothing is written at all. `progress(done, total)`
    follows the signature checks. Returns an ImportResult.
    """
    return import_rows(conn, [(source, [receipts_io.row_of(r) for r in items])
                              for source, items in batches], now=now, progress=progress)


def import_rows(conn, batches, now=None, progress=None):
    """import_parsed for `batches` of [(source, [receipts_io row])]."""
    now = int(time.time()) if now is None else int(now)
    res = ImportResult()
    seen = set()
    fresh = []  # [(source, count in source, [rows not seen before in this import])]
    for source, rows in batches:
        todo = []
        for row in rows:
            h = row[ROW_HASH]
            if h not in seen:
                seen.add(h)
                todo.append(row)
        fresh.append((source, len(rows), todo))
        res.total += len(rows)
    stored = _existing(conn, [row for _, _, todo in fresh for row in todo])
    spans = {d: _Spans(e) for d, e in registry.all_device_keys(conn).items()}
    # One pass: check the signature with the key of the receipt's span (PyNaCl's libsodium
    # calls hold the GIL, so threads would not check signatures side by side) and sort the
    # row into its group.
    signed = Verifier().signed
    total = sum(len(todo) for _, _, todo in fresh) - len(stored)
    done = 0
    work = []
    for source, count, todo in fresh:
        groups = {}  # (device, kid, sig_ok, counts column) -> [values]
        last_key = last = None
        for row in todo:
            if stored and row[ROW_HASH] in stored:
                continue
            device = row[ROW_DEVICE]
            sp = spans.get(device)
            key = sp.key(row[ROW_INDEX]) if sp is not None else None
            if key is None:
                kid = ok = None
                res.unverified += 1
            else:
                kid = key.kid
                if row[ROW_KID] == kid and signed(key.public_key, row[ROW_SIGNED]):
                    ok = 1
                else:
                    ok = 0
                    res.bad += 1
            counts = None
            if row[ROW_COUNTS] is not None:
                counts = "faults" if row[ROW_KIND] == pr.FAULT else "rejections"
            group_key = (device, kid, ok, counts)
            if group_key != last_key:
                last = groups.get(group_key)
                if last is None:
                    last = groups[group_key] = []
                last_key = group_key
            last.append(row[_VALUES_COUNTS] if counts else row[_VALUES])
            done += 1
            if progress and done % 1000 == 0:
                progress(done, total)
        work.append((source, count, groups))
    if progress:
        progress(done, done)
    new = {}
    if any(groups for _, _, groups in work):
        with transaction(conn):
            for source, count, groups in work:
                if not groups:
                    continue
                batch = conn.execute("INSERT INTO imports (at, source, receipts, new) "
                                     "VALUES (?, ?, ?, 0) RETURNING batch",
                                     (now, source, count)).fetchone()[0]
                before = conn.total_changes
                for (device, kid, ok, counts), values in groups.items():
                    conn.executemany(_INSERT % (
                        "?" if counts == "rejections" else "NULL",
                        "?" if counts == "faults" else "NULL", _blob(device), _blob(kid),
                        "NULL" if ok is None else ok, batch), values)
                n = new[source] = conn.total_changes - before
                conn.execute("UPDATE imports SET new = ? WHERE batch = ?", (n, batch))
                res.new += n
            _command_fields(conn, [row for _, _, todo in fresh for row in todo
                                   if row[ROW_KIND] == COMMAND_RECEIPT])
            commands.settle_from_receipts(conn, now)
    res.files = [(source, count, new.get(source, 0)) for source, count, _ in work]
    return res


COMMAND_RECEIPT = 5  # SPEC.md §10: a command applied (K_SEQUENCE its number, K_VOUCHER its ref)


def _command_fields(conn, rows):
    """Fill a command receipt's own columns (command kind: field 15; a tariff's args:
    field 16, as JSON) from its bytes."""
    from protocol import cbor, cose
    updates = []
    for row in rows:
        raw = bytes(row[_VALUES][10])
        try:
            fields = cbor.decode(cose.decode(raw).payload)
        except Exception:  # noqa: BLE001 - structure was checked on reading; be safe
            continue
        tariff = fields.get(16)
        updates.append((fields.get(15), None if not isinstance(tariff, dict) else
                        json.dumps({str(k): v for k, v in sorted(tariff.items())}),
                        bytes(row[ROW_DEVICE]), row[ROW_INDEX], bytes(row[ROW_HASH])))
    conn.executemany("UPDATE receipts SET command_kind = ?, tariff = ? WHERE device = ? AND "
                     "idx = ? AND hash = ?", updates)


def import_files(conn, paths, now=None, progress=None):
    """Import receipt export files (SPEC.md §6) atomically: all of them or none."""
    batches = [(str(p), receipts_io.read_rows(p)) for p in paths]
    return import_rows(conn, batches, now=now, progress=progress)


def import_raw(conn, raws, source, now=None):
    """Import receipt bytes (e.g. read over the HAN). Structure errors raise
    ReceiptFileError and nothing is stored."""
    items = []
    for n, raw in enumerate(raws, 1):
        try:
            r = receipts_io.parse(raw)
        except receipts_io.Rejected as e:
            raise receipts_io.ReceiptFileError(source, "not a valid receipt (%s)"
                                               % (e.detail or e), n) from None
        r.item, r.offset = n, None
        items.append(r)
    return import_parsed(conn, [(source, items)], now=now)


# --- reconcile ------------------------------------------------------------------------

class Anomaly:
    __slots__ = ("kind", "device", "index", "receipt", "sequence", "detail", "id")

    def __init__(self, kind, device, index, receipt, sequence, detail):
        assert kind in ANOMALY_KINDS, kind
        self.kind, self.device, self.index, self.receipt = kind, device, index, receipt
        self.sequence, self.detail = sequence, detail
        h = hashlib.sha256(repr((kind, device, index, receipt, sequence, detail)).encode())
        self.id = h.hexdigest()[:16]

    def row(self):
        return (self.id, self.kind, self.device, self.index, self.receipt, self.sequence,
                self.detail)

    def __repr__(self):
        return "Anomaly(%s, %s, index=%s, seq=%s: %s)" % (
            self.kind, format_eui64(self.device) if self.device else None, self.index,
            self.sequence, self.detail)


class Result:
    """What a reconciliation found (also what is stored)."""

    def __init__(self, as_of, policy):
        self.as_of = as_of
        self.policy = policy
        self.count = dict.fromkeys(STATUSES, 0)
        self.pence = dict.fromkeys(STATUSES, 0)
        self.anomalies = []
        self.receipts = 0
        self.vouchers = 0
        self.run = None
        self.exposure = []   # [host.commands.Exposure]

    @property
    def liability(self):
        return self.pence["outstanding"]

    @property
    def refunds_due(self):
        return self.pence["stale"] + (self.pence["expired"] if self.policy == "refund" else 0)

    def by_kind(self):
        out = {}
        for a in self.anomalies:
            out[a.kind] = out.get(a.kind, 0) + 1
        return out


class _R:
    """A stored receipt as reconciliation reads it (no raw bytes). `key`: the KeyEpoch of
    its span (None: before every key); `valid`: its signature verified with that key."""
    __slots__ = ("hash", "device", "index", "kind", "prev", "time", "before", "after",
                 "sequence", "ref", "amount", "faults", "valid", "key")


def recheck(conn, device, first=0):
    """Check again, with the key of their span, the signatures of `device`'s stored
    receipts from index `first` that were checked with another key or none (their key was
    registered after they arrived). One transaction; returns how many were checked."""
    epochs = registry.device_keys(conn, device)
    if not epochs:
        return 0
    with transaction(conn):
        return _reverify(conn, device, _Spans(epochs), first)


def _reverify(conn, device, spans, first=0):
    """Check the signatures of `device`'s receipts (from index `first`) not yet checked
    with the key of their span (a key registered after the import). Returns how many were
    checked."""
    verify = Verifier()
    updates = []
    for idx, h, raw, checked in conn.execute(
            "SELECT idx, hash, raw, checked_kid FROM receipts WHERE device = ? AND idx >= ?",
            (device, first)).fetchall():
        key = spans.key(idx)
        if key is None or checked == key.kid:
            continue
        r = receipts_io.parse(raw)
        ok = 1 if r.kid == key.kid and verify(key.public_key, r.tbs, r.sig) else 0
        updates.append((key.kid, ok, device, idx, h))
    conn.executemany("UPDATE receipts SET checked_kid = ?, sig_ok = ? WHERE device = ? AND "
                     "idx = ? AND hash = ?", updates)
    return len(updates)


def _mp(mp):
    """Milli-pence as pounds, exact (e.g. £1.23 or £1.234)."""
    sign = "-" if mp < 0 else ""
    p, m = divmod(abs(mp), 1000)
    return sign + format_pence(p) + (("%03d" % m).rstrip("0") if m else "")


def _span(a, b):
    return "index %d" % a if a == b else "indices %d-%d" % (a, b)


def _plural(n, word="receipt"):
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def _chain(dev, epochs, rs, out):
    """Everything about one meter's receipts `rs` (sorted by index, hash) but the matching
    to vouchers: unverifiable and bad signatures, gaps, forks, epochs, balances, faults."""
    first = epochs[0].first_index
    before = [r for r in rs if r.key is None]
    if before:
        out.append(Anomaly(
            "no_device_key", dev, before[0].index, None, None,
            "%s (%s) come before the first meter key registered for this meter (receipts from "
            "%d): not verified" % (_plural(len(before)), _span(before[0].index, before[-1].index),
                                   first)))
    valid = []
    for r in rs:
        if r.key is None:
            continue
        if r.valid:
            valid.append(r)
        else:
            out.append(Anomaly("bad_signature", dev, r.index, r.hash, r.sequence,
                               "receipt %d does not verify with the meter key registered for "
                               "its index (%s, key epoch %d, receipts from %d)" % (
                                   r.index, r.key.kid.hex(), r.key.epoch, r.key.first_index)))
    expect = first
    for i in sorted({r.index for r in rs if r.key is not None}):
        if i > expect:
            out.append(Anomaly("chain_gap", dev, expect, None, None,
                               "%s missing (%s)" % (_span(expect, i - 1),
                                                    _plural(i - expect))))
        expect = i + 1
    by_idx = {}
    for r in valid:
        by_idx.setdefault(r.index, []).append(r)
    for i in sorted(by_idx):
        group = by_idx[i]
        if len(group) > 1:
            out.append(Anomaly("chain_fork", dev, i, group[1].hash, None,
                               "%d different signed receipts at index %d (%s)" % (
                                   len(group), i, ", ".join(r.hash.hex()[:12] for r in group))))
    for r in valid:
        _balance_within(dev, r, out)
        if r.kind == pr.FAULT and any(r.faults.values()):
            out.append(Anomaly("meter_fault", dev, r.index, r.hash, None,
                               "receipt %d: the meter found flash damage at start-up: %s" % (
                                   r.index, describe_faults(r.faults))))
        if r.index == r.key.first_index:
            # The first receipt of a key starts a new chain: a new epoch, not a fork.
            if r.prev != (r.key.first_prev or pr.GENESIS):
                out.append(Anomaly("chain_fork", dev, r.index, r.hash, None,
                                   "receipt %d does not start a chain (its prev is not zero): "
                                   "it is the first of key epoch %d" % (r.index, r.key.epoch)))
            continue
        preds = by_idx.get(r.index - 1)
        if not preds:
            continue  # a gap, or only an unverifiable receipt before it
        p = None
        for q in preds:
            if q.hash == r.prev:
                p = q
                break
        if p is None:
            out.append(Anomaly("chain_fork", dev, r.index, r.hash, None,
                               "receipt %d does not follow receipt %d (its prev %s… is the hash"
                               " of a receipt %d not received)" % (
                                   r.index, r.index - 1, r.prev.hex()[:12], r.index - 1)))
        elif r.before > p.after:
            out.append(Anomaly("balance_rise", dev, r.index, r.hash, None,
                               "balance rose by %s between receipts %d and %d (%s to %s) "
                               "with no top-up" % (_mp(r.before - p.after), p.index, r.index,
                                                   _mp(p.after), _mp(r.before))))


_WHAT = {pr.EMERGENCY: "emergency credit", pr.REJECTIONS: "rejections", pr.FAULT: "fault"}


def _balance_within(dev, r, out):
    if r.kind == pr.TOPUP:
        expected = r.before + 1000 * r.amount
        if r.after > expected:
            out.append(Anomaly("balance_rise", dev, r.index, r.hash, r.sequence,
                               "top-up of %s raised the balance by %s" % (
                                   format_pence(r.amount), _mp(r.after - r.before))))
        elif r.after < expected:
            out.append(Anomaly("balance_mismatch", dev, r.index, r.hash, r.sequence,
                               "top-up of %s raised the balance by only %s" % (
                                   format_pence(r.amount), _mp(r.after - r.before))))
    elif r.after != r.before:
        kind = "balance_rise" if r.after > r.before else "balance_mismatch"
        out.append(Anomaly(kind, dev, r.index, r.hash, None,
                           "%s receipt changed the balance from %s to %s" % (
                               _WHAT.get(r.kind, "kind %d" % r.kind), _mp(r.before),
                               _mp(r.after))))


def reconcile(conn, now=None, expired_policy="refund", at=None):
    """Verify and match everything stored; store and return a Result.

    now: the time expiry is judged at (default: the clock). expired_policy: "refund" or
    "void" (how expired vouchers count in the totals; their status is "expired" either way).
    """
    if expired_policy not in POLICIES:
        raise ValueError("expired_policy must be one of %s" % ", ".join(POLICIES))
    now = int(time.time()) if now is None else int(now)
    at = int(time.time()) if at is None else int(at)
    res = Result(now, expired_policy)
    with transaction(conn):
        _reconcile(conn, res, registry.all_device_keys(conn))
        conn.execute("DELETE FROM anomalies")
        conn.executemany("INSERT INTO anomalies (id, kind, device, receipt_index, receipt, "
                         "sequence, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [a.row() for a in res.anomalies])
        last = conn.execute("SELECT coalesce(max(batch), 0) FROM imports").fetchone()[0]
        cur = conn.execute("INSERT INTO reconciliations (at, as_of, expired_policy, receipts, "
                           "last_batch, vouchers, anomalies) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING run",
                           (at, now, expired_policy, res.receipts, last, res.vouchers,
                            len(res.anomalies)))
        res.run = cur.fetchone()[0]
    return res


# Reconciliation reads the stored receipts in SQL, where the common case costs no Python
# per row: a meter whose receipts SQL finds regular (indices first..first+n-1 from its
# first key's first index, one receipt each, every signature valid with the key of its
# span, the first receipt of every span starting a chain, every other's prev the hash of
# the receipt before, balances continuous, no fault receipt) has no chain anomaly; only an
# irregular meter's receipts are loaded and walked in Python (`_chain`). Statuses are
# written by one INSERT ... SELECT; only top-ups that do not match a voucher, or vouchers
# applied more than once or for another amount, come back to Python to be described.
# tests/host/test_reconcile_model.py holds this to a plain Python model of the rules.

# The spans of the meter keys: [lo, hi) per key, hi the next key's first index (a key
# followed by one with the same first index has an empty span: the later one wins).
_SPANS = """spans AS (
    SELECT device, kid, first_index AS lo, first_prev,
           lead(first_index, 1, 9223372036854775807)
               OVER (PARTITION BY device ORDER BY epoch) AS hi
    FROM device_keys)"""

# Per meter, in one pass over its receipts: how many, lowest and highest index; how many
# lie in a key's span, were checked with that key, verified with it; verified top-ups
# (what `vt` below holds) and fault receipts; and how many do not start or follow the
# chain as they should, raise the balance between receipts, or have balances that
# disagree with their kind. A meter with receipts first..first+n-1, all in a span and
# valid and none of those, has a regular chain (two receipts at one index would leave an
# index missing, and the receipt after it does not follow anything).
_STATS = """
WITH %s
SELECT r.device, count(*), min(r.idx), max(r.idx), count(s.kid),
       sum(CASE WHEN s.kid IS NOT NULL AND r.checked_kid = s.kid THEN 1 ELSE 0 END),
       sum(CASE WHEN r.sig_ok = 1 AND r.checked_kid = s.kid AND s.kid IS NOT NULL
           THEN 1 ELSE 0 END),
       sum(CASE WHEN r.kind = 1 AND r.sig_ok = 1 AND r.checked_kid = s.kid
           AND s.kid IS NOT NULL THEN 1 ELSE 0 END),
       sum(CASE WHEN r.kind = 4 THEN 1 ELSE 0 END),
       sum(CASE WHEN (r.idx = s.lo AND r.prev != coalesce(s.first_prev, :genesis))
           OR (r.idx > s.lo AND (p.idx IS NULL OR r.balance_before > p.balance_after))
           OR r.balance_after != r.balance_before
                                 + CASE WHEN r.kind = 1 THEN 1000 * r.amount ELSE 0 END
           THEN 1 ELSE 0 END)
FROM receipts r
LEFT JOIN spans s ON s.device = r.device AND r.idx >= s.lo AND r.idx < s.hi
LEFT JOIN receipts p ON p.device = r.device AND p.idx = r.idx - 1 AND p.hash = r.prev
GROUP BY r.device
""" % _SPANS

# Verified top-up receipts: signature checked with the key of their span (`_reverify` has
# just brought every such receipt's check up to date, and a receipt outside every span is
# never checked). device_keys.device is indexed: IN is the join.
_VT = """vt AS (
    SELECT r.device, r.idx, r.hash, r.sequence, r.voucher_ref, r.amount, r.meter_time,
           r.balance_after, coalesce(r.form, 1) AS form
    FROM receipts r
    WHERE r.kind = 1 AND r.sig_ok = 1
      AND r.device IN (SELECT device FROM device_keys))"""

# Redeemed: the first verified receipt (in index order) applying the voucher's bytes (or
# the code's digits: its reference, SPEC.md §8) on the voucher's own meter. Rows go in in
# receipt order; OR IGNORE keeps the first. %s: an extra condition. With "AND v.amount =
# vt.amount AND v.form = vt.form" it stores only the top-ups that match their voucher's
# bytes, amount and form: if that is every verified top-up (none ignored), the matching is
# clean and these are exactly the redeemed vouchers and codes.
_REDEEMED = """
WITH %s
INSERT OR IGNORE INTO voucher_status (device, sequence, status, amount, closed_at, receipt,
                                      receipt_index, balance_after)
SELECT v.device, v.sequence, 'redeemed', v.amount, vt.meter_time, vt.hash, vt.idx,
       vt.balance_after
FROM vt JOIN vouchers v ON v.device = vt.device AND v.sequence = vt.sequence
                       AND v.ref = vt.voucher_ref %%s
ORDER BY vt.device, vt.idx, vt.hash
""" % _VT

# Every other voucher: void, stale, expired or outstanding (closed_at and note of stale
# ones are filled in by _stale_since). Redeemed ones are passed over before anything is
# joined.
_NOT_REDEEMED = """
WITH %s, highest AS (SELECT device, max(sequence) AS h FROM vt GROUP BY device),
floors AS (SELECT device, max(floor) AS f FROM device_keys GROUP BY device)
INSERT OR IGNORE INTO voucher_status (device, sequence, status, amount, closed_at)
SELECT v.device, v.sequence,
       CASE WHEN k.revoked IS NOT NULL OR v.voided IS NOT NULL THEN 'void'
            WHEN v.sequence < h.h - %d OR v.sequence <= f.f THEN 'stale'
            WHEN v.expires <= :now THEN 'expired'
            ELSE 'outstanding' END,
       v.amount,
       CASE WHEN k.revoked IS NOT NULL OR v.voided IS NOT NULL
                 THEN CASE WHEN k.revoked IS NULL THEN v.voided
                           WHEN v.voided IS NULL OR k.revoked < v.voided THEN k.revoked
                           ELSE v.voided END
            WHEN v.sequence < h.h - %d OR v.sequence <= f.f THEN NULL
            WHEN v.expires <= :now THEN v.expires END
FROM vouchers v LEFT JOIN keys k ON k.kid = v.kid
LEFT JOIN highest h ON h.device = v.device
LEFT JOIN floors f ON f.device = v.device
WHERE NOT EXISTS (SELECT 1 FROM voucher_status s
                  WHERE s.device = v.device AND s.sequence = v.sequence)
""" % (_VT, WINDOW, WINDOW)

# (device, sequence) pairs with more than one verified top-up: applied twice (in one key
# epoch or across a reset), forks, or a sequence reused by another voucher.
_SHARED_SEQUENCE = """
WITH %s
SELECT device, sequence FROM vt GROUP BY device, sequence HAVING count(*) > 1
""" % _VT

# Verified top-ups that match no voucher by (device, sequence, reference), or match one
# issued for another amount or in the other form (a voucher named as a code, or a code as
# a voucher).
_UNMATCHED = """
WITH %s
SELECT vt.device, vt.idx, vt.hash, vt.sequence, vt.voucher_ref, vt.amount, v.ref, vt.form,
       v.form FROM vt
LEFT JOIN vouchers v ON v.device = vt.device AND v.sequence = vt.sequence
WHERE v.ref IS NULL OR v.ref != vt.voucher_ref OR v.amount != vt.amount
   OR v.form != vt.form
ORDER BY vt.device, vt.idx, vt.hash
""" % _VT

_FORM_WORD = {1: "voucher", 2: "keypad code"}

_RECEIPT_COLUMNS = ("hash, device, idx, kind, prev, meter_time, balance_before, "
                    "balance_after, sequence, voucher_ref, amount, faults, sig_ok, checked_kid")


def _load(conn, where, args, spans):
    out = []
    for row in conn.execute("SELECT %s FROM receipts WHERE %s ORDER BY device, idx, hash"
                            % (_RECEIPT_COLUMNS, where), args):
        r = _R()
        (r.hash, r.device, r.index, r.kind, r.prev, r.time, r.before, r.after, r.sequence,
         r.ref, r.amount, faults, ok, checked) = row
        r.faults = {int(k): v for k, v in json.loads(faults).items()} if faults else None
        sp = spans.get(r.device)
        r.key = sp.key(r.index) if sp is not None else None
        r.valid = ok == 1 and r.key is not None and checked == r.key.kid
        out.append(r)
    return out


def _stats(conn):
    return conn.execute(_STATS, {"genesis": pr.GENESIS}).fetchall()


def _reconcile(conn, res, devices):
    anomalies = []
    spans = {d: _Spans(e) for d, e in devices.items() if e}
    stats = _stats(conn)
    # Signatures checked with another key than the one of their span, or not at all.
    redo = [dev for dev, n, _, _, spanned, checked, _, _, _, _ in stats
            if dev in spans and checked != spanned]
    for dev in redo:
        _reverify(conn, dev, spans[dev])
    if redo:
        stats = _stats(conn)
    res.receipts = sum(s[1] for s in stats)
    topups = sum(s[7] for s in stats if s[0] in spans)

    # Chains: meters, one by one.
    for dev, n, lo, hi, spanned, _, ok, _, faults, irregular in stats:
        if dev not in devices:
            anomalies.append(Anomaly(
                "unknown_device", dev, lo, None, None,
                "%s (%s) from a meter not registered here; register it with its public key "
                "and reconcile again" % (_plural(n), _span(lo, hi))))
        elif not devices[dev]:
            anomalies.append(Anomaly(
                "no_device_key", dev, lo, None, None,
                "%s (%s) cannot be verified: no public key is registered for this meter"
                % (_plural(n), _span(lo, hi))))
        elif (ok != n or spanned != n or faults or irregular
              or lo != devices[dev][0].first_index or hi != lo + n - 1):
            _chain(dev, devices[dev], _load(conn, "device = ?", (dev,), spans), anomalies)

    # Statuses of every issued voucher.
    conn.execute("DELETE FROM voucher_status")
    before = conn.total_changes
    conn.execute(_REDEEMED % "AND v.amount = vt.amount AND v.form = vt.form")
    clean = conn.total_changes - before == topups
    if not clean:
        conn.execute("DELETE FROM voucher_status")
        conn.execute(_REDEEMED % "")
    conn.execute(_NOT_REDEEMED, {"now": res.as_of})
    _stale_since(conn, devices)

    # Top-ups that match no voucher, or one issued for another amount; and vouchers
    # whose sequence more than one top-up carries.
    unmatched = []
    odd = set() if clean else set(conn.execute(_SHARED_SEQUENCE).fetchall())
    for row in () if clean else conn.execute(_UNMATCHED).fetchall():
        if row[6] == row[4]:  # the voucher's bytes: another amount, or another form
            odd.add((row[0], row[3]))
            if row[7] != row[8]:
                anomalies.append(Anomaly(
                    "form_mismatch", row[0], row[1], row[2], row[3],
                    "receipt %d applied %s %d as a %s; it was issued as a %s" % (
                        row[1], _FORM_WORD[row[8]], row[3], _FORM_WORD.get(row[7], "form %d"
                                                                            % row[7]),
                        _FORM_WORD[row[8]])))
        else:
            unmatched.append(row[:8])
    for dev, seq in sorted(odd):
        v = conn.execute("SELECT ref, amount, form FROM vouchers WHERE device = ? AND "
                         "sequence = ?", (dev, seq)).fetchone()
        if v is None:
            continue  # never issued: reported below
        v_ref, v_amount, v_form = v
        word = _FORM_WORD[v_form]
        first = None
        for r in _load(conn, "device = ? AND kind = 1 AND sequence = ? AND voucher_ref = ?",
                       (dev, seq, v_ref), spans):
            if not r.valid:
                continue
            if first is None:
                first = r
                if r.amount != v_amount:
                    anomalies.append(Anomaly(
                        "amount_mismatch", r.device, r.index, r.hash, r.sequence,
                        "receipt %d applied %s %d for %s; it was issued for %s" % (
                            r.index, word, r.sequence, format_pence(r.amount),
                            format_pence(v_amount))))
            elif first.index != r.index:
                anomalies.append(Anomaly(
                    "applied_twice", r.device, r.index, r.hash, r.sequence,
                    "%s %d applied again by receipt %d (first by receipt %d%s)" % (
                        word, r.sequence, r.index, first.index,
                        ", before the meter's key epoch %d" % r.key.epoch
                        if r.key.epoch != first.key.epoch else "")))

    # Top-ups that match no voucher: whose is it?
    by_ref = {}
    refs = sorted({u[4] for u in unmatched})
    for i in range(0, len(refs), 500):
        chunk = refs[i:i + 500]
        for dev, seq, ref in conn.execute(
                "SELECT device, sequence, ref FROM vouchers WHERE ref IN (%s)"
                % ",".join("?" * len(chunk)), chunk):
            by_ref[ref] = (dev, seq)
    for dev, idx, h, seq, ref, amount, issued_ref, form in unmatched:
        what = _FORM_WORD.get(form, "voucher")
        other = by_ref.get(ref)
        if other is not None and other[0] != dev:
            anomalies.append(Anomaly(
                "device_mismatch", dev, idx, h, seq,
                "receipt %d applied a %s issued for meter %s (sequence %d)" % (
                    idx, what, format_eui64(other[0]), other[1])))
        elif other is not None or issued_ref is not None:
            anomalies.append(Anomaly(
                "ref_mismatch", dev, idx, h, seq,
                "receipt %d applied %s reference %s… under sequence %d; the one "
                "issued %s" % (idx, what, ref.hex()[:12], seq,
                               "with that sequence is %s…" % issued_ref.hex()[:12]
                               if issued_ref is not None
                               else "with that reference has sequence %d" % other[1])))
        else:
            anomalies.append(Anomaly(
                "not_issued", dev, idx, h, seq,
                "receipt %d applied %ssequence %d for %s, which was never issued" % (
                    idx, "a keypad code with " if form == 2 else "", seq,
                    format_pence(amount))))

    # Cancelled vouchers: why they are void, and those a meter applied all the same.
    conn.execute("UPDATE voucher_status SET note = (SELECT CASE WHEN v.void_note IS NULL "
                 "THEN 'cancelled' ELSE 'cancelled: ' || v.void_note END FROM vouchers v "
                 "WHERE v.device = voucher_status.device AND v.sequence = "
                 "voucher_status.sequence) WHERE status = 'void' AND EXISTS (SELECT 1 FROM "
                 "vouchers v WHERE v.device = voucher_status.device AND v.sequence = "
                 "voucher_status.sequence AND v.voided IS NOT NULL)")
    for dev, seq, voided, idx, h, t in conn.execute(
            "SELECT s.device, s.sequence, v.voided, s.receipt_index, s.receipt, s.closed_at "
            "FROM voucher_status s JOIN vouchers v ON v.device = s.device AND v.sequence = "
            "s.sequence WHERE s.status = 'redeemed' AND v.voided IS NOT NULL "
            "ORDER BY s.device, s.sequence").fetchall():
        anomalies.append(Anomaly(
            "void_redeemed", dev, idx, h, seq,
            "voucher %d was cancelled on %s but receipt %d applied it (meter time %s)%s" % (
                seq, _utc(voided), idx, _utc(t),
                "; if it was refunded or replaced, it was paid for twice")))

    # Signed commands (SPEC.md §10): what the meters confirmed, vouchers applied under a
    # key after its meter's receipt of the revocation, and what is still exposed.
    commands.settle_from_receipts(conn)
    for dev, idx, h, seq, kid, ridx in commands.applied_after_revocation(conn):
        anomalies.append(Anomaly(
            "applied_after_revocation", dev, idx, h, seq,
            "receipt %d applied voucher %d under issuer key %s, which the meter had revoked "
            "at receipt %d" % (idx, seq, bytes(kid).hex(), ridx)))
    res.exposure = commands.exposure(conn)
    commands.close_for_supplier_change(conn)

    count, pence = res.count, res.pence
    for status, n, total in conn.execute(
            "SELECT status, count(*), sum(amount) FROM voucher_status GROUP BY status"):
        count[status] = n
        pence[status] = total
    res.vouchers = sum(count.values())

    anomalies.sort(key=lambda a: (a.device or b"", a.index if a.index is not None else -1,
                                  a.kind, a.detail, a.id))
    seen = set()
    res.anomalies = [a for a in anomalies if not (a.id in seen or seen.add(a.id))]


def _utc(ts):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _stale_since(conn, devices):
    """closed_at and note of stale vouchers: the earlier of the meter time of the first
    verified top-up (in index order) whose sequence put the voucher below the window, and
    the registration time of the first key epoch whose floor covers it."""
    per_device = {}
    for dev, seq in conn.execute("SELECT device, sequence FROM voucher_status "
                                 "WHERE status = 'stale'"):
        per_device.setdefault(dev, []).append(seq)
    updates = []
    for dev, seqs in per_device.items():
        marks, high = [], 0
        for seq, idx, t in conn.execute(
                "SELECT sequence, idx, meter_time FROM receipts WHERE device = ? AND kind = 1 "
                "AND sig_ok = 1 ORDER BY idx, hash", (dev,)):
            if seq > high:
                high = seq
                marks.append((high, t, idx))
        epochs = devices.get(dev) or []
        for seq in seqs:
            reasons = []  # (time, note)
            j = bisect.bisect_right(marks, (seq + WINDOW, float("inf")))
            if j < len(marks):
                h, t, idx = marks[j]
                reasons.append((t, "below the meter's replay window since receipt %d applied "
                                   "sequence %d" % (idx, h)))
            for e in epochs:
                if e.floor >= seq:
                    reasons.append((e.provisioned, (
                        "refused by the meter after its factory reset on %s (key epoch %d: "
                        "every sequence up to %d is stale)" if e.epoch > 1 else
                        "refused by the meter since its provisioning on %s (key epoch %d: "
                        "every sequence up to %d is stale)") % (_utc(e.provisioned), e.epoch,
                                                                e.floor)))
                    break
            updates.append((min(t for t, _ in reasons), "; ".join(n for _, n in reasons),
                            dev, seq))
    conn.executemany("UPDATE voucher_status SET closed_at = ?, note = ? WHERE device = ? AND "
                     "sequence = ?", updates)
