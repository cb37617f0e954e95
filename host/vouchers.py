# Stored vouchers and keypad codes: find them again (by device, sequence range, issue
# batch, status, delivery, form), say what was written where, and cancel one (void). Codes
# live beside vouchers in the same table and sequence space (host/db.py, schema v5), so
# everything here treats both alike; `form` tells them apart.
#
# Status, as `topup vouchers list` shows it: the last reconciliation's (host/reconcile.py)
# where there is one, with what happened since on top — a voucher cancelled or whose key
# was revoked since is void; one issued since is outstanding (or expired, by its expiry).
# Redeemed stays redeemed: a receipt says the credit is on the meter.
#
# Delivery: a voucher is delivered when a recorded delivery (host/db.py, schema v4) covers
# its sequence; "undelivered" ones were stored and never confirmed written anywhere (an
# interrupted `topup issue`, a write error, a kill -9). Vouchers issued before deliveries
# were recorded have no record either way ("unknown").
import heapq
import re
import time

from protocol import voucher as pv

from .db import transaction
from .errors import TopupError
from .issuer import FORM_CODE, FORM_NAMES, FORM_VOUCHER, Issued
from .registry import format_eui64

STATUSES = ("outstanding", "redeemed", "stale", "expired", "void")
DELIVERY = ("delivered", "undelivered", "unknown")
FORMS = {"voucher": FORM_VOUCHER, "code": FORM_CODE}

_STATUS_SQL = """CASE WHEN s.status = 'redeemed' THEN 'redeemed'
     WHEN v.voided IS NOT NULL OR k.revoked IS NOT NULL THEN 'void'
     WHEN s.status IS NOT NULL THEN s.status
     WHEN v.expires IS NOT NULL AND v.expires <= :now THEN 'expired'
     ELSE 'outstanding' END"""


class Row:
    """One stored voucher or code with its status and delivery."""

    __slots__ = ("device", "sequence", "amount", "issued", "expires", "kid", "ref", "cose",
                 "batch", "voided", "void_note", "status", "reconciled", "delivery",
                 "delivered_to", "form", "code")

    def issued_voucher(self):
        return Issued(self.device, self.sequence, self.amount, self.issued, self.expires,
                      self.kid, self.ref, self.cose, self.form, self.code)

    @property
    def form_name(self):
        return FORM_NAMES[self.form]

    @property
    def is_code(self):
        return self.form == FORM_CODE


def parse_range(text):
    """(first, last) from `N`, `N-M`, `N-` or `-M` (sequences)."""
    m = re.fullmatch(r"\s*(\d*)\s*-\s*(\d*)\s*|\s*(\d+)\s*", text or "")
    if not m or (m.group(3) is None and not (m.group(1) or m.group(2))):
        raise TopupError("sequence range %r: write N, N-M, N- or -M" % text)
    if m.group(3) is not None:
        n = int(m.group(3))
        return n, n
    lo = int(m.group(1)) if m.group(1) else 1
    hi = int(m.group(2)) if m.group(2) else pv.MAX_SEQUENCE
    if lo > hi:
        raise TopupError("sequence range %r is empty (%d > %d)" % (text, lo, hi))
    return lo, hi


def select(conn, device=None, seq=None, batch=None, status=None, delivery=None, now=None,
           with_bytes=True, form=None):
    """Stored vouchers and codes matching every filter given, in (device, sequence) order
    (a generator of Row). status: one of STATUSES; delivery: one of DELIVERY; form:
    "voucher" or "code"."""
    now = int(time.time()) if now is None else int(now)
    where, args = [], {"now": now}
    if device is not None:
        where.append("v.device = :device")
        args["device"] = bytes(device)
    if seq is not None:
        where.append("v.sequence BETWEEN :lo AND :hi")
        args["lo"], args["hi"] = seq
    if batch is not None:
        where.append("v.batch = :batch")
        args["batch"] = batch
    if form is not None:
        if form not in FORMS:
            raise TopupError("unknown form %r (voucher or code)" % form)
        where.append("v.form = :form")
        args["form"] = FORMS[form]
    status_sql = _STATUS_SQL
    if status is not None:
        if status not in STATUSES:
            raise TopupError("unknown status %r" % status)
        where.append("(%s) = :status" % status_sql)
        args["status"] = status
    sql = ("SELECT v.device, v.sequence, v.amount, v.issued, v.expires, "
           "coalesce(v.kid, v.code_kid), v.ref, %s, v.batch, v.voided, v.void_note, %s, "
           "s.status IS NOT NULL, v.form, v.code FROM vouchers v "
           "LEFT JOIN keys k ON k.kid = v.kid LEFT JOIN voucher_status s ON s.device = v.device "
           "AND s.sequence = v.sequence %s ORDER BY v.device, v.sequence"
           % ("v.cose" if with_bytes else "NULL", status_sql,
              "WHERE " + " AND ".join(where) if where else ""))
    cover = _Coverage(conn)
    for r in conn.execute(sql, args):
        row = Row()
        (row.device, row.sequence, row.amount, row.issued, row.expires, row.kid, row.ref,
         row.cose, row.batch, row.voided, row.void_note, row.status, row.reconciled,
         row.form, row.code) = r
        row.device, row.kid, row.ref = bytes(row.device), bytes(row.kid), bytes(row.ref)
        row.cose = bytes(row.cose) if row.cose is not None else None
        row.delivered_to = cover.at(row.device, row.sequence)
        if row.delivered_to is not None:
            row.delivery = "delivered"
        else:
            row.delivery = "unknown" if row.batch is None else "undelivered"
        if delivery is not None and row.delivery != delivery:
            continue
        yield row


class _Coverage:
    """Which recorded delivery covers (device, sequence), for sequences asked in
    increasing order per device: a sweep over the deliveries sorted by first sequence."""

    def __init__(self, conn):
        self.conn = conn
        self.device = None

    def _load(self, device):
        self.device = device
        self.todo = [tuple(r) for r in self.conn.execute(
            "SELECT first, last, at, destination, format, id FROM deliveries WHERE device = ? "
            "ORDER BY first, id", (device,))]
        self.todo.reverse()
        self.active = []  # heap of (last, at, id, destination, format)

    def at(self, device, seq):
        """(destination or None for a program, format, time) of the latest delivery of
        `seq`, or None if none covers it."""
        if device != self.device:
            self._load(device)
        while self.todo and self.todo[-1][0] <= seq:
            first, last, at, dest, fmt, rid = self.todo.pop()
            heapq.heappush(self.active, (last, at, rid, dest or "", fmt or ""))
        while self.active and self.active[0][0] < seq:
            heapq.heappop(self.active)
        if not self.active:
            return None
        best = max(self.active, key=lambda e: (e[1], e[2]))  # the latest recorded
        return (best[3] or None, best[4] or None, best[1])


def describe_destination(dest, fmt=None):
    if dest is None:
        return "handed to a program"
    what = "standard output" if dest == "-" else dest
    return "%s (%s)" % (what, fmt) if fmt else what


def batch_summary(conn, batch):
    """What issue batch `batch` stored and where it went: (stored [(device, first, last)],
    delivered {destination: [(device, first, last)]}, undelivered [(device, first,
    last)], amount)."""
    from .issuer import ranges
    rows = select(conn, batch=batch, with_bytes=False)
    stored, undelivered, delivered, amount = [], [], {}, 0
    for r in rows:
        stored.append((r.device, r.sequence))
        amount += r.amount
        if r.delivery == "delivered":
            delivered.setdefault(r.delivered_to[0], []).append((r.device, r.sequence))
        else:
            undelivered.append((r.device, r.sequence))
    return (ranges(stored), {d: ranges(p) for d, p in delivered.items()}, ranges(undelivered),
            amount)


def format_ranges(rs, limit=6):
    """'sequences 1-2000, 4001-6000' (device left out when it is one device)."""
    if not rs:
        return "none"
    devices = {d for d, _, _ in rs}
    parts = []
    for d, a, b in rs[:limit]:
        seqs = "%d" % a if a == b else "%d-%d" % (a, b)
        parts.append(seqs if len(devices) == 1 else "%s %s" % (format_eui64(d), seqs))
    more = " and %d more runs" % (len(rs) - limit) if len(rs) > limit else ""
    n = sum(b - a + 1 for _, a, b in rs)
    word = "sequence" if n == 1 else "sequences"
    return "%s %s%s" % (word, ", ".join(parts), more)


def count(rs):
    return sum(b - a + 1 for _, a, b in rs)


# --- void -----------------------------------------------------------------------------

def find(conn, ref=None, device=None, sequence=None):
    """The stored voucher (Row) named by a reference (32 hex digits, or a unique prefix of
    at least 8), or by (device, sequence). TopupError if there is none or several."""
    if ref is not None:
        t = ref.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,32}", t):
            raise TopupError("voucher reference %r: give at least 8 of its 32 hex digits "
                             "(`topup vouchers list` shows them), or --device and --seq" % ref)
        # A prefix of the hex digits is a range of the 16-byte references.
        found = [(bytes(d), n) for d, n in conn.execute(
            "SELECT device, sequence FROM vouchers WHERE ref BETWEEN ? AND ?",
            (bytes.fromhex(t.ljust(32, "0")), bytes.fromhex(t.ljust(32, "f"))))]
        if not found:
            raise TopupError("no voucher or code with reference %s in this database" % t)
        if len(found) > 1:
            raise TopupError("reference %s matches %d vouchers; give more digits"
                             % (t, len(found)))
        device, sequence = found[0]
    rows = list(select(conn, device=device, seq=(sequence, sequence)))
    if not rows:
        raise TopupError("no voucher or code %d was issued for %s"
                         % (sequence, format_eui64(device)))
    return rows[0]


def redeemed_by(conn, row):
    """(receipt index, meter time) of a verified receipt that applied `row`, or None."""
    return conn.execute(
        "SELECT idx, meter_time FROM receipts WHERE device = ? AND kind = 1 AND sequence = ? "
        "AND voucher_ref = ? AND sig_ok = 1 ORDER BY idx LIMIT 1",
        (row.device, row.sequence, row.ref)).fetchone()


def void(conn, row, note=None, now=None, also=None):
    """Cancel one stored voucher or code: from now on reconciliation counts it void (not a
    liability, no refund) unless a meter applies it, which it then names
    (`void_redeemed`). Refused for one already void or already redeemed. `also(conn)`: more
    to write in the same transaction (the HTTP service's audit row)."""
    when = int(time.time()) if now is None else int(now)
    what = FORM_NAMES[getattr(row, "form", FORM_VOUCHER) or FORM_VOUCHER]
    with transaction(conn):
        cur = conn.execute("SELECT voided FROM vouchers WHERE device = ? AND sequence = ?",
                           (row.device, row.sequence)).fetchone()
        if cur is None:
            raise TopupError("%s %d of %s is not stored" % (what, row.sequence,
                                                            format_eui64(row.device)))
        if cur[0] is not None:
            raise TopupError("%s %d of %s is already void (cancelled %s)" % (
                what, row.sequence, format_eui64(row.device),
                time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cur[0]))))
        revoked = conn.execute("SELECT revoked FROM keys WHERE kid = ?", (row.kid,)).fetchone()
        if revoked and revoked[0] is not None:
            raise TopupError("voucher %d of %s is already void: its issuer key %s was revoked"
                             % (row.sequence, format_eui64(row.device), row.kid.hex()))
        used = redeemed_by(conn, row)
        if used is not None:
            raise TopupError("%s %d of %s was redeemed (receipt %d, meter time %s): the "
                             "credit is on the meter; nothing to cancel" % (
                                 what, row.sequence, format_eui64(row.device), used[0],
                                 time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(used[1]))))
        conn.execute("UPDATE vouchers SET voided = ?, void_note = ? WHERE device = ? AND "
                     "sequence = ?", (when, note, row.device, row.sequence))
        if also is not None:
            also(conn)
    return when
