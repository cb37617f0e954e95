# Reconciliation: receipts back from meters, verified and matched against what was issued.
#
# Import (`import_files`): every file is parsed and structure-checked first (a corrupt
# file stops everything before the database is touched); the signatures of receipts not
# yet stored are checked against the registered device keys; then all new receipts are
# inserted in one transaction (WAL, synchronous=FULL: all or nothing, even under kill -9).
# A receipt is identified by the SHA-256 of its bytes, so importing it again changes
# nothing. Receipts that cannot be verified (unknown device, no key registered) are kept.
#
# Reconcile (`reconcile`): one write transaction that
#   1. checks the signatures of stored receipts not yet checked with the device's current
#      key (a key registered after the import);
#   2. walks each meter's chain of verified receipts: gaps (missing indices), forks (two
#      receipts at one index, or a receipt whose prev is not its predecessor's hash), and
#      balance continuity (balance_before(n+1) <= balance_after(n); kinds 2 and 3 leave
#      the balance as it was; a top-up adds exactly its amount);
#   3. matches every verified top-up receipt to an issued voucher, and gives every issued
#      voucher a status;
#   4. replaces the stored statuses and anomalies with the new ones and logs the run.
# Everything is derived from the stored receipts, vouchers, devices and keys, in a fixed
# order, so reconciling twice gives the same statuses and the same anomalies (same ids).
#
# Statuses, first that applies:
#   redeemed    a verified receipt from the voucher's own meter applied it (when: meter
#               time; which receipt; balance after)
#   void        its issuer key is revoked (and it was never redeemed): the supplier has
#               withdrawn it; neither a liability nor a refund counted here
#   stale       its sequence is below the meter's replay window as evidenced by receipts
#               (sequence < highest applied sequence - 64, SPEC.md §2.2): the meter will
#               refuse it for ever, so a refund is due
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
from protocol.cose import kid_for
from protocol.window import SIZE as WINDOW

from . import receipts_io
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
    "bad_signature": "receipt signature does not verify with the meter's registered key",
    "unknown_device": "receipts from a meter that is not registered (kept, not verified)",
    "no_device_key": "receipts from a meter with no public key registered (kept, not verified)",
    "chain_gap": "receipts missing from a meter's chain",
    "chain_fork": "two different receipts at one index, or a receipt that does not follow "
                  "the one before it",
    "balance_rise": "credit from nowhere: the balance rose outside a top-up",
    "balance_mismatch": "a receipt's balances disagree with its kind and amount",
    "not_issued": "top-up receipt for a voucher that was never issued",
    "amount_mismatch": "top-up amount differs from the issued voucher's",
    "ref_mismatch": "issued sequence, but a different voucher was applied under it",
    "device_mismatch": "voucher issued for another meter was applied",
    "applied_twice": "one voucher applied by more than one receipt",
}


# --- signatures -----------------------------------------------------------------------

class Verifier:
    """libsodium's Ed25519 verify (crypto_sign_open: strict, as PyNaCl's VerifyKey.verify)
    called with reused buffers. `verifier(public, message, signature) -> bool`."""

    _CAP = 4096

    def __init__(self):
        if _lib is not None:
            self._out = _ffi.new("unsigned char[]", self._CAP)
            self._len = _ffi.new("unsigned long long *")
            self._open = _lib.crypto_sign_open

    def __call__(self, public, msg, sig):
        sm = sig + msg
        if _lib is not None and len(sm) <= self._CAP:
            return self._open(self._out, self._len, sm, len(sm), public) == 0
        try:
            nacl.bindings.crypto_sign_open(sm, public)
            return True
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
            return False


def _check(verify, r, public, kid):
    """1 if receipt `r` is signed by the meter key `public` (whose kid is `kid`), else 0."""
    return 1 if r.kid == kid and verify(public, r.tbs, r.sig) else 0


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


def _device_keys(conn):
    keys = {}
    for device, public in conn.execute("SELECT device, public_key FROM devices"):
        keys[bytes(device)] = (bytes(public), kid_for(public)) if public is not None else None
    return keys


def _existing(conn, hashes):
    found = set()
    hashes = list(hashes)
    for i in range(0, len(hashes), 500):
        chunk = hashes[i:i + 500]
        q = "SELECT hash FROM receipts WHERE hash IN (%s)" % ",".join("?" * len(chunk))
        found.update(bytes(h) for (h,) in conn.execute(q, chunk))
    return found


_INSERT = ("INSERT OR IGNORE INTO receipts (hash, device, idx, kind, prev, meter_time, "
           "balance_before, balance_after, sequence, voucher_ref, amount, rejections, kid, raw,"
           " imported, source, checked_key, sig_ok) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def import_parsed(conn, batches, now=None, progress=None):
    """Store receipts already parsed: `batches` is [(source, [receipts_io.Parsed])].

    Signatures of new receipts are checked before the transaction; the insert is one
    transaction for all batches. Returns an ImportResult.
    """
    now = int(time.time()) if now is None else int(now)
    res = ImportResult()
    sha = hashlib.sha256
    pending = {}  # hash -> (source, Parsed), first occurrence
    per_file = []
    for source, items in batches:
        hs = []
        for r in items:
            h = r.hash = sha(r.raw).digest()
            hs.append(h)
            if h not in pending:
                pending[h] = (source, r)
        per_file.append((source, hs))
        res.total += len(items)
    stored = _existing(conn, pending)
    keys = _device_keys(conn)
    verify = Verifier()
    rows = []
    todo = [(h, s, r) for h, (s, r) in pending.items() if h not in stored]
    for n, (h, source, r) in enumerate(todo):
        key = keys.get(r.device)
        if key is None:
            checked, ok = None, None
            res.unverified += 1
        else:
            checked = key[0]
            ok = _check(verify, r, key[0], key[1])
            res.bad += 1 - ok
        rows.append((h, r.device, r.index, r.kind, r.prev, r.time, r.before, r.after,
                     r.sequence, r.ref, r.amount,
                     None if r.rejections is None else json.dumps(r.rejections, sort_keys=True),
                     r.kid, r.raw, now, source, checked, ok))
        if progress and n % 1000 == 999:
            progress(n + 1, len(todo))
    if rows:
        with transaction(conn):
            before = conn.total_changes
            conn.executemany(_INSERT, rows)
            res.new = conn.total_changes - before
    if progress:
        progress(len(todo), len(todo))
    new_hashes = {row[0] for row in rows}
    for source, hs in per_file:
        fresh = set()
        for h in hs:
            if h in new_hashes:
                fresh.add(h)
        res.files.append((source, len(hs), len(fresh)))
        new_hashes -= fresh
    return res


def import_files(conn, paths, now=None, progress=None):
    """Import receipt export files (SPEC.md §6) atomically: all of them or none."""
    batches = [(str(p), receipts_io.read_file(p)) for p in paths]
    return import_parsed(conn, batches, now=now, progress=progress)


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
    """A stored receipt as reconciliation reads it (no raw bytes)."""
    __slots__ = ("hash", "device", "index", "kind", "prev", "time", "before", "after",
                 "sequence", "ref", "amount", "valid")


def _reverify(conn):
    """Check signatures not yet checked with the device's current key. Returns the count."""
    rows = conn.execute(
        "SELECT r.id, r.raw, d.public_key FROM receipts r JOIN devices d ON d.device = r.device"
        " WHERE d.public_key IS NOT NULL AND (r.checked_key IS NULL OR"
        " r.checked_key != d.public_key)").fetchall()
    verify = Verifier()
    updates = []
    kids = {}
    for rid, raw, public in rows:
        public = bytes(public)
        kid = kids.get(public)
        if kid is None:
            kid = kids[public] = kid_for(public)
        r = receipts_io.parse(bytes(raw))
        updates.append((public, _check(verify, r, public, kid), rid))
    conn.executemany("UPDATE receipts SET checked_key = ?, sig_ok = ? WHERE id = ?", updates)
    return len(updates)


def _mp(mp):
    """Milli-pence as pounds, exact (e.g. £1.23 or £1.234)."""
    sign = "-" if mp < 0 else ""
    p, m = divmod(abs(mp), 1000)
    return sign + format_pence(p) + (("%03d" % m).rstrip("0") if m else "")


def _span(a, b):
    return "index %d" % a if a == b else "indices %d-%d" % (a, b)


def _chain(dev, present, valid, out):
    """Gaps, forks and balance continuity of one meter's verified receipts."""
    idxs = sorted(present)
    expect = 0
    for i in idxs:
        if i > expect:
            n = i - expect
            out.append(Anomaly("chain_gap", dev, expect, None, None,
                               "%s missing (%d receipt%s)" % (_span(expect, i - 1), n,
                                                              "" if n == 1 else "s")))
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
        if r.index == 0:
            if r.prev != pr.GENESIS:
                out.append(Anomaly("chain_fork", dev, 0, r.hash, None,
                                   "receipt 0 does not start a chain (its prev is not zero)"))
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
        what = "emergency credit" if r.kind == pr.EMERGENCY else "rejections"
        kind = "balance_rise" if r.after > r.before else "balance_mismatch"
        out.append(Anomaly(kind, dev, r.index, r.hash, None,
                           "%s receipt changed the balance from %s to %s" % (
                               what, _mp(r.before), _mp(r.after))))


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
        _reverify(conn)
        _reconcile(conn, res)
        conn.execute("DELETE FROM anomalies")
        conn.executemany("INSERT INTO anomalies (id, kind, device, receipt_index, receipt, "
                         "sequence, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [a.row() for a in res.anomalies])
        last = conn.execute("SELECT coalesce(max(id), 0) FROM receipts").fetchone()[0]
        cur = conn.execute("INSERT INTO reconciliations (at, as_of, expired_policy, receipts, "
                           "last_receipt, vouchers, anomalies) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (at, now, expired_policy, res.receipts, last, res.vouchers,
                            len(res.anomalies)))
        res.run = cur.lastrowid
    return res


def _reconcile(conn, res):
    anomalies = []
    devices = {bytes(d): (bytes(p) if p is not None else None)
               for d, p in conn.execute("SELECT device, public_key FROM devices")}
    revoked = {bytes(k): t for k, t in
               conn.execute("SELECT kid, revoked FROM keys WHERE revoked IS NOT NULL")}

    # Receipts, per device, in index order (hash order within an index).
    per_device = {}
    n = 0
    for row in conn.execute(
            "SELECT hash, device, idx, kind, prev, meter_time, balance_before, balance_after, "
            "sequence, voucher_ref, amount, sig_ok, checked_key FROM receipts "
            "ORDER BY device, idx, hash"):
        r = _R()
        (r.hash, r.device, r.index, r.kind, r.prev, r.time, r.before, r.after, r.sequence,
         r.ref, r.amount, ok, checked) = row
        dev = r.device
        public = devices.get(dev, False)
        r.valid = ok == 1 and public is not False and public is not None and checked == public
        per_device.setdefault(dev, []).append(r)
        n += 1
    res.receipts = n

    topups = []        # verified top-up receipts, device by device in index order
    highest = {}       # device -> [(running highest sequence, meter time)] in index order
    for dev in sorted(per_device):
        rs = per_device[dev]
        if dev not in devices:
            anomalies.append(Anomaly(
                "unknown_device", dev, rs[0].index, None, None,
                "%d receipt%s (%s) from a meter not registered here; register it with its "
                "public key and reconcile again" % (len(rs), "" if len(rs) == 1 else "s",
                                                    _span(rs[0].index, rs[-1].index))))
            continue
        if devices[dev] is None:
            anomalies.append(Anomaly(
                "no_device_key", dev, rs[0].index, None, None,
                "%d receipt%s (%s) cannot be verified: no public key is registered for this "
                "meter" % (len(rs), "" if len(rs) == 1 else "s",
                           _span(rs[0].index, rs[-1].index))))
            continue
        valid = []
        for r in rs:
            if r.valid:
                valid.append(r)
            else:
                anomalies.append(Anomaly("bad_signature", dev, r.index, r.hash, r.sequence,
                                         "receipt %d does not verify with the meter's "
                                         "registered key" % r.index))
        _chain(dev, {r.index for r in rs}, valid, anomalies)
        run_high, marks = 0, []
        for r in valid:
            if r.kind == pr.TOPUP:
                topups.append(r)
                if r.sequence > run_high:
                    run_high = r.sequence
                    marks.append((run_high, r.time))
        if marks:
            highest[dev] = marks

    # Vouchers and the matching of top-up receipts to them.
    vouchers = {}
    order = []
    for row in conn.execute("SELECT device, sequence, kid, amount, issued, expires, ref "
                            "FROM vouchers ORDER BY device, sequence"):
        key = (row[0], row[1])
        vouchers[key] = row
        order.append(key)
    res.vouchers = len(order)
    redeemed = {}  # (device, sequence) -> first receipt applying it
    by_ref = None
    for r in topups:
        key = (r.device, r.sequence)
        v = vouchers.get(key)
        if v is not None and v[6] == r.ref:
            first = redeemed.get(key)
            if first is None:
                redeemed[key] = r
                if r.amount != v[3]:
                    anomalies.append(Anomaly(
                        "amount_mismatch", r.device, r.index, r.hash, r.sequence,
                        "receipt %d applied voucher %d for %s; it was issued for %s" % (
                            r.index, r.sequence, format_pence(r.amount), format_pence(v[3]))))
            elif first.index != r.index:
                anomalies.append(Anomaly(
                    "applied_twice", r.device, r.index, r.hash, r.sequence,
                    "voucher %d applied again by receipt %d (first by receipt %d)" % (
                        r.sequence, r.index, first.index)))
            continue
        if by_ref is None:
            by_ref = {row[6]: row for row in vouchers.values()}
        other = by_ref.get(r.ref)
        if other is not None and other[0] != r.device:
            anomalies.append(Anomaly(
                "device_mismatch", r.device, r.index, r.hash, r.sequence,
                "receipt %d applied a voucher issued for meter %s (sequence %d)" % (
                    r.index, format_eui64(other[0]), other[1])))
        elif other is not None or v is not None:
            anomalies.append(Anomaly(
                "ref_mismatch", r.device, r.index, r.hash, r.sequence,
                "receipt %d applied voucher reference %s… under sequence %d; the voucher "
                "issued %s" % (r.index, r.ref.hex()[:12], r.sequence,
                               "with that sequence is %s…" % v[6].hex()[:12] if v is not None
                               else "with that reference has sequence %d" % other[1])))
        else:
            anomalies.append(Anomaly(
                "not_issued", r.device, r.index, r.hash, r.sequence,
                "receipt %d applied sequence %d for %s, which was never issued" % (
                    r.index, r.sequence, format_pence(r.amount))))

    # A status for every issued voucher.
    status_rows = []
    count, pence = res.count, res.pence
    asof = res.as_of
    for key in order:
        dev, seq, kid, amount, issued, expires, ref = vouchers[key]
        r = redeemed.get(key)
        if r is not None:
            row = (dev, seq, "redeemed", r.time, r.hash, r.index, r.after)
        elif kid in revoked:
            row = (dev, seq, "void", revoked[kid], None, None, None)
        else:
            marks = highest.get(dev)
            if marks is not None and seq < marks[-1][0] - WINDOW:
                # The first receipt whose sequence put this one below the window.
                j = bisect.bisect_right(marks, (seq + WINDOW, float("inf")))
                row = (dev, seq, "stale", marks[j][1], None, None, None)
            elif expires is not None and expires <= asof:
                row = (dev, seq, "expired", expires, None, None, None)
            else:
                row = (dev, seq, "outstanding", None, None, None, None)
        status_rows.append(row)
        count[row[2]] += 1
        pence[row[2]] += amount
    conn.execute("DELETE FROM voucher_status")
    conn.executemany("INSERT INTO voucher_status (device, sequence, status, closed_at, receipt,"
                     " receipt_index, balance_after) VALUES (?, ?, ?, ?, ?, ?, ?)", status_rows)

    anomalies.sort(key=lambda a: (a.device or b"", a.index if a.index is not None else -1,
                                  a.kind, a.detail, a.id))
    seen = set()
    res.anomalies = [a for a in anomalies if not (a.id in seen or seen.add(a.id))]
