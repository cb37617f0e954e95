# Reports of the stored reconciliation (host/reconcile.py): the terminal summary (rich),
# CSV for finance (one row per voucher; anomalies in a second file), and one
# self-contained HTML file (inline CSS, inline SVG charts drawn here, no scripts, no
# network) that opens in any browser.
import csv
import datetime
import html
import io
import math
import os
import re

from .errors import TopupError
from .money import format_pence
from .output import OutputFile, check_target
from .reconcile import ANOMALY_KINDS, STATUSES
from .registry import format_eui64

DAY = 86400

STATUS_MEANING = {
    "outstanding": "not yet redeemed: a liability",
    "redeemed": "applied by its meter (signed receipt)",
    "stale": "the meter refuses it (below its replay window, or at or below the sequence "
             "floor of a provisioning or factory reset), never redeemed: refund due",
    "expired": "past its expiry, never redeemed",
    "void": "cancelled (the voucher voided, or its issuer key revoked) before it was "
            "redeemed: withdrawn, nothing owed",
}
STATUS_COLOUR = {"outstanding": "#d97706", "redeemed": "#15803d", "stale": "#b91c1c",
                 "expired": "#7c3aed", "void": "#6b7280"}


def utc(ts, date_only=False):
    if ts is None:
        return ""
    try:
        d = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):
        return "%d" % ts  # beyond any calendar date: the Unix time itself
    return d.strftime("%Y-%m-%d" if date_only else "%Y-%m-%dT%H:%M:%SZ")


class Summary:
    """The stored result of the last `topup reconcile`, read back for reporting."""

    def __init__(self, conn):
        run = conn.execute("SELECT run, at, as_of, expired_policy, receipts, vouchers, anomalies,"
                           " last_batch FROM reconciliations ORDER BY run DESC LIMIT 1"
                           ).fetchone()
        if run is None:
            raise TopupError("no reconciliation yet (run `topup reconcile` first)")
        (self.run, self.at, self.as_of, self.policy, self.receipts, self.vouchers,
         self.anomaly_count, last_batch) = run
        self.conn = conn
        self.count = dict.fromkeys(STATUSES, 0)
        self.pence = dict.fromkeys(STATUSES, 0)
        for status, n, total in conn.execute(
                "SELECT status, count(*), sum(amount) FROM voucher_status GROUP BY status"):
            self.count[status] = n
            self.pence[status] = total
        self.anomalies = [
            (i, kind, bytes(dev) if dev is not None else None, idx, bytes(h) if h else None,
             seq, detail)
            for i, kind, dev, idx, h, seq, detail in conn.execute(
                "SELECT id, kind, device, receipt_index, receipt, sequence, detail "
                "FROM anomalies ORDER BY device, receipt_index, kind, detail, id")]
        self.by_kind = {}
        for a in self.anomalies:
            self.by_kind[a[1]] = self.by_kind.get(a[1], 0) + 1
        self.imported_since = conn.execute(
            "SELECT count(*) FROM receipts WHERE batch > ?", (last_batch,)).fetchone()[0]
        self.stored_receipts = conn.execute("SELECT count(*) FROM receipts").fetchone()[0]

    @property
    def liability(self):
        return self.pence["outstanding"]

    @property
    def refunds_due(self):
        return self.pence["stale"] + (self.pence["expired"] if self.policy == "refund" else 0)

    def refund_due(self, status):
        return status == "stale" or (status == "expired" and self.policy == "refund")

    @property
    def refund_statuses(self):
        return ("stale", "expired") if self.policy == "refund" else ("stale",)

    @property
    def withdrawn_statuses(self):
        return ("void",) if self.policy == "refund" else ("void", "expired")

    def voucher_rows(self):
        """Every issued voucher with its status, in (device, sequence) order."""
        return self.conn.execute(
            "SELECT v.device, v.sequence, s.status, v.amount, v.issued, v.expires, "
            "coalesce(v.kid, v.code_kid), k.revoked, s.closed_at, s.receipt_index, "
            "s.balance_after, s.receipt, v.ref, d.label, s.note, v.form FROM vouchers v "
            "JOIN voucher_status s ON s.device = v.device AND s.sequence = v.sequence "
            "LEFT JOIN keys k ON k.kid = v.kid LEFT JOIN devices d ON d.device = v.device "
            "ORDER BY v.device, v.sequence")

    def devices(self):
        """[(device, label, {status: (count, pence)}, anomalies)] for every device seen."""
        out = {}
        for dev, label in self.conn.execute("SELECT device, label FROM devices"):
            out[bytes(dev)] = [label, {}, 0]
        for dev, status, n, total in self.conn.execute(
                "SELECT device, status, count(*), sum(amount) FROM voucher_status "
                "GROUP BY device, status"):
            out.setdefault(bytes(dev), [None, {}, 0])[1][status] = (n, total)
        for a in self.anomalies:
            if a[2] is not None:
                out.setdefault(a[2], [None, {}, 0])[2] += 1
        return [(d, v[0], v[1], v[2]) for d, v in sorted(out.items())]

    @property
    def end(self):
        """The last moment the report describes: the as-of time of the reconciliation, and
        never later than when it ran (nothing after that is known)."""
        return min(self.as_of, self.at)

    def liability_series(self):
        """[(day start, outstanding pence at the end of that day)], one per UTC day from
        the first issue to the day of `end` (never a day after it)."""
        deltas = {}
        first = None
        last = self.end // DAY
        for issued, amount, closed in self.conn.execute(
                "SELECT v.issued, v.amount, s.closed_at FROM vouchers v JOIN voucher_status s "
                "ON s.device = v.device AND s.sequence = v.sequence"):
            d = issued // DAY
            if d > last:
                continue  # issued after the report's end
            deltas[d] = deltas.get(d, 0) + amount
            first = d if first is None or d < first else first
            if closed is not None:
                c = max(closed // DAY, d)
                if c <= last:
                    deltas[c] = deltas.get(c, 0) - amount
        if first is None:
            return []
        series, level = [], 0
        for d in range(first, last + 1):
            level += deltas.get(d, 0)
            series.append((d * DAY, level))
        return series

    def rows_with_status(self, statuses, limit=None):
        """Voucher rows (as voucher_rows) whose status is in `statuses`, largest amount
        first, at most `limit`; and (count, pence) of all of them."""
        marks = ",".join("?" * len(statuses))
        total = self.conn.execute("SELECT count(*), coalesce(sum(amount), 0) FROM "
                                  "voucher_status WHERE status IN (%s)" % marks,
                                  statuses).fetchone()
        rows = self.conn.execute(
            "SELECT v.device, v.sequence, s.status, v.amount, v.issued, v.expires, "
            "coalesce(v.kid, v.code_kid), k.revoked, s.closed_at, s.receipt_index, "
            "s.balance_after, s.receipt, v.ref, d.label, s.note, v.form FROM voucher_status s "
            "JOIN vouchers v ON v.device = s.device AND v.sequence = s.sequence "
            "LEFT JOIN keys k ON k.kid = v.kid LEFT JOIN devices d ON d.device = v.device "
            "WHERE s.status IN (%s) ORDER BY v.amount DESC, v.device, v.sequence%s"
            % (marks, "" if limit is None else " LIMIT %d" % limit), statuses).fetchall()
        return rows, total

    def owed_by_meter(self):
        """[(device, label, outstanding (n, pence), refund due (n, pence))] for every meter
        with something outstanding or a refund due: most owed first."""
        refund = ["stale"] + (["expired"] if self.policy == "refund" else [])
        out = {}
        for dev, label, status, n, total in self.conn.execute(
                "SELECT s.device, d.label, s.status, count(*), sum(s.amount) FROM "
                "voucher_status s LEFT JOIN devices d ON d.device = s.device "
                "WHERE s.status IN ('outstanding', 'stale', 'expired') "
                "GROUP BY s.device, d.label, s.status"):
            e = out.setdefault(bytes(dev), [label, [0, 0], [0, 0]])
            if status == "outstanding":
                e[1] = [n, total]
            elif status in refund:
                e[2] = [e[2][0] + n, e[2][1] + total]
        rows = [(d, v[0], tuple(v[1]), tuple(v[2])) for d, v in out.items()
                if v[1][0] or v[2][0]]
        rows.sort(key=lambda r: (-r[3][1], -r[2][1], r[0]))
        return rows

    def redemptions_per_day(self):
        """[(day start, count, pence)] of redeemed vouchers by meter day, no gaps."""
        per = {}
        for closed, amount in self.conn.execute(
                "SELECT closed_at, amount FROM voucher_status WHERE status = 'redeemed'"):
            d = closed // DAY
            n, p = per.get(d, (0, 0))
            per[d] = (n + 1, p + amount)
        if not per:
            return []
        return [(d * DAY,) + per.get(d, (0, 0)) for d in range(min(per), max(per) + 1)]


def load(conn):
    return Summary(conn)


# --- terminal -------------------------------------------------------------------------

def print_summary(con, s, details=20):
    """The rich terminal summary: statuses with £ totals, anomalies by kind, a few details."""
    from rich.markup import escape
    from rich.table import Table
    con.print("[bold]Reconciliation[/] run %d at %s (expiry judged at %s; expired vouchers: "
              "%s) — %d receipts, %d vouchers" % (
                  s.run, utc(s.at), utc(s.as_of), s.policy, s.receipts, s.vouchers))
    t = Table(title="Vouchers by status", title_justify="left", box=None, pad_edge=False)
    t.add_column("status")
    t.add_column("vouchers", justify="right")
    t.add_column("amount", justify="right")
    t.add_column("meaning")
    for st in STATUSES:
        meaning = STATUS_MEANING[st]
        if st == "expired":
            meaning += ": refund due" if s.policy == "refund" else ": void (policy)"
        t.add_row("[%s]%s[/]" % (STATUS_COLOUR[st], st), str(s.count[st]),
                  format_pence(s.pence[st]), meaning)
    con.print(t)
    con.print("outstanding liability [bold]%s[/]   redeemed [bold]%s[/]   refunds due "
              "[bold]%s[/]" % (format_pence(s.liability), format_pence(s.pence["redeemed"]),
                               format_pence(s.refunds_due)))
    if not s.anomalies:
        con.print("[bold green]no anomalies[/]")
    else:
        t = Table(title="Anomalies by kind", title_justify="left", box=None, pad_edge=False)
        t.add_column("kind")
        t.add_column("count", justify="right")
        t.add_column("meaning")
        for kind in ANOMALY_KINDS:
            if kind in s.by_kind:
                t.add_row("[red]%s[/]" % kind, str(s.by_kind[kind]), ANOMALY_KINDS[kind])
        con.print(t)
        t = Table(title="Anomalies" + (" (first %d of %d; all in `topup report --csv`)"
                                       % (details, len(s.anomalies))
                                       if len(s.anomalies) > details else ""),
                  title_justify="left", box=None, pad_edge=False)
        for col in ("kind", "device", "index", "detail"):
            t.add_column(col)
        for a in s.anomalies[:details]:
            t.add_row(a[1], format_eui64(a[2]) if a[2] else "-",
                      "-" if a[3] is None else str(a[3]), escape(a[6]))
        con.print(t)
    from .commands import exposure
    exposed = exposure(s.conn)
    if exposed:
        con.print("[bold red]exposure[/]: %d meter%s still trust a revoked issuer key "
                  "(their revocation is not confirmed by a receipt):" % (
                      len({e.device for e in exposed}), "" if len(exposed) == 1 else "s"))
        for e in exposed:
            con.print("  " + escape(e.line()))
    elif s.conn.execute("SELECT 1 FROM keys WHERE revoked IS NOT NULL").fetchone():
        con.print("exposure: none (every meter's receipts confirm it no longer trusts a "
                  "revoked issuer key)")
    if s.imported_since:
        con.print("[yellow]%d receipt%s imported since this reconciliation: run `topup "
                  "reconcile` again[/]" % (s.imported_since, "" if s.imported_since == 1
                                            else "s"))


# --- CSV ------------------------------------------------------------------------------

VOUCHER_COLUMNS = ("device", "sequence", "status", "amount_pence", "amount", "liability",
                   "refund_due", "issued_utc", "expires_utc", "kid", "key_revoked_utc",
                   "closed_utc", "receipt_index", "balance_after_mp", "receipt_hash",
                   "voucher_ref", "label", "note", "form")
# form: voucher (signed, SPEC.md §2) or code (a keypad code, §8: kid is then the supplier
# code key's, voucher_ref the code's reference, and there is no expiry)
FORM_NAMES = {1: "voucher", 2: "code"}
ANOMALY_COLUMNS = ("id", "kind", "device", "receipt_index", "sequence", "receipt_hash",
                   "voucher_ref", "detail")


def anomalies_path(path):
    root, ext = os.path.splitext(path)
    return root + "-anomalies" + (ext or ".csv")


def check_outputs(csv_path=None, html_path=None, force=False):
    """Refuse, before writing anything, an output that exists (without force) or cannot be
    written: the CSV, its anomalies file and the HTML."""
    if csv_path is not None and check_target(csv_path, force) != "in place":
        check_target(anomalies_path(csv_path), force)
    if html_path is not None:
        check_target(html_path, force)


class _Rows:
    """CSV rows into an OutputFile, handed over in whole rows (host/output.py)."""

    def __init__(self, out, every=5000):
        self.out, self.every = out, every
        self.buf = io.StringIO()
        self.w = csv.writer(self.buf)
        self.n = 0

    def row(self, values):
        self.w.writerow(values)
        self.n += 1
        if self.n % self.every == 0:
            self.flush()

    def flush(self):
        data = self.buf.getvalue().encode("utf-8")
        if data:
            self.out.write(data)
        self.buf.seek(0)
        self.buf.truncate()


def _write_rows(path, force, fill):
    out = OutputFile(path, force)
    try:
        rows = _Rows(out)
        fill(rows)
        rows.flush()
        out.commit()
    finally:
        out.abort()
    return path


_ABBREVIATED = re.compile(r"(?<![0-9a-f])([0-9a-f]{12,63})(?![0-9a-f])…?")


def _related_hashes(conn, dev, idx, seq):
    """Full hex hashes an anomaly's detail may abbreviate: the receipts at and next to its
    index (their hashes, prev hashes and voucher references) and the vouchers issued
    under its sequence."""
    found = set()
    if dev is not None and idx is not None:
        for h, prev, ref in conn.execute(
                "SELECT hash, prev, voucher_ref FROM receipts WHERE device = ? AND idx "
                "BETWEEN ? AND ?", (dev, idx - 1, idx + 1)):
            found.update(bytes(x).hex() for x in (h, prev, ref) if x is not None)
    if dev is not None and seq is not None:
        for (ref,) in conn.execute("SELECT ref FROM vouchers WHERE device = ? AND sequence = ?",
                                   (dev, seq)):
            found.add(bytes(ref).hex())
        for (ref,) in conn.execute("SELECT voucher_ref FROM receipts WHERE device = ? AND "
                                   "kind = 1 AND sequence = ?", (dev, seq)):
            if ref is not None:
                found.add(bytes(ref).hex())
    return found


def whole_hashes(conn, dev, idx, seq, detail):
    """`detail` with every abbreviated hash ("1a2b3c4d5e6f…", or 12 hex digits alone)
    written out in full where exactly one related hash starts with it."""
    if not _ABBREVIATED.search(detail):
        return detail
    related = _related_hashes(conn, dev, idx, seq)

    def full(m):
        hits = [h for h in related if h.startswith(m.group(1))]
        return hits[0] if len(hits) == 1 else m.group(0)
    return _ABBREVIATED.sub(full, detail)


def write_csv(s, path, anomalies=None, force=False):
    """Vouchers (one row each, with status) to `path`; anomalies to `anomalies` (default:
    PATH with -anomalies before the extension; none when PATH is a device or FIFO). Each
    file appears whole or not at all; existing files only with force. Returns the paths
    written."""
    to_device = check_target(path, force) == "in place"
    if anomalies is None and to_device:
        anomalies = False  # PATH is a device or FIFO: no PATH-anomalies.csv beside it
    anomalies = anomalies_path(path) if anomalies is None else anomalies
    if anomalies:
        check_target(anomalies, force)

    def vouchers(out):
        out.row(VOUCHER_COLUMNS)
        for (dev, seq, status, amount, issued, expires, kid, revoked, closed, ridx, bal,
             rhash, ref, label, note, form) in s.voucher_rows():
            out.row((format_eui64(dev), seq, status, amount, "%d.%02d" % divmod(amount, 100),
                     "yes" if status == "outstanding" else "no",
                     "yes" if s.refund_due(status) else "no",
                     utc(issued), utc(expires), bytes(kid).hex(), utc(revoked), utc(closed),
                     "" if ridx is None else ridx, "" if bal is None else bal,
                     bytes(rhash).hex() if rhash else "", bytes(ref).hex(), label or "",
                     note or "", FORM_NAMES[form]))

    def anomaly_rows(out):
        out.row(ANOMALY_COLUMNS)
        for i, kind, dev, idx, h, seq, detail in s.anomalies:
            ref = None
            if h is not None:
                r = s.conn.execute("SELECT voucher_ref FROM receipts WHERE device IS ? AND "
                                   "hash = ?", (dev, h)).fetchone()
                ref = bytes(r[0]).hex() if r and r[0] is not None else None
            out.row((i, kind, format_eui64(dev) if dev else "", "" if idx is None else idx,
                     "" if seq is None else seq, h.hex() if h else "", ref or "",
                     whole_hashes(s.conn, dev, idx, seq, detail)))
    _write_rows(path, force, vouchers)
    if not anomalies:
        return (path,)
    _write_rows(anomalies, force, anomaly_rows)
    return path, anomalies


# --- HTML -----------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2937;
       margin: 0; background: #f3f4f6; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; }
.sub { color: #6b7280; margin: 0 0 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border-radius: 8px; padding: 12px 16px; min-width: 170px;
        box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card .k { color: #6b7280; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 22px; font-weight: 600; margin-top: 2px; }
.card.bad .v { color: #b91c1c; } .card.good .v { color: #15803d; }
.panel { background: #fff; border-radius: 8px; padding: 12px 16px; margin-top: 12px;
         box-shadow: 0 1px 2px rgba(0,0,0,.08); overflow-x: auto; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.charts .wide { grid-column: 1 / -1; }
@media (max-width: 800px) { .charts { grid-template-columns: 1fr; } }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e5e7eb; vertical-align: top; }
th { font-size: 12px; color: #6b7280; font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
        white-space: nowrap; }
.pill { display: inline-block; padding: 0 8px; border-radius: 999px; color: #fff; font-size: 12px; }
.note { color: #6b7280; font-size: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: #4b5563; }
svg .title { font-size: 13px; font-weight: 600; fill: #1f2937; }
footer { color: #9ca3af; font-size: 12px; margin: 24px 0; }
tr.sum td { font-weight: 600; border-top: 2px solid #9ca3af; }
p.total { margin: 4px 0 8px; }
"""


def _e(text):
    return html.escape(str(text), quote=True)


def _nice_max(v, parts=4):
    """A round top for an axis of `parts` equal integer steps that holds `v`."""
    raw = max(v / parts, 1)
    mag = 10 ** int(math.floor(math.log10(raw)))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        step = m * mag
        if raw <= step and step == int(step):
            return int(step) * parts
    return 10 * mag * parts  # pragma: no cover


def _money_axis(p):
    pounds = p / 100
    if pounds >= 1_000_000:
        return "£%gm" % round(pounds / 1_000_000, 2)
    if pounds >= 1000:
        return "£%gk" % round(pounds / 1000, 2)
    return "£%g" % round(pounds, 2)


def _bucket(points, limit):
    """How many consecutive daily points to merge so that at most `limit` remain."""
    return max(1, math.ceil(len(points) / limit))


def svg_line_chart(series, title, width=1040, height=260):
    """Step chart of [(day start, pence at the end of that day)] with a money axis: each
    day's level is drawn across that day, so one day of data is a band, not a point."""
    left, right, top, bottom = 64, 16, 28, 36
    w, h = width - left - right, height - top - bottom
    out = ['<svg class="chart" role="img" aria-label="%s" viewBox="0 0 %d %d" width="100%%" '
           'preserveAspectRatio="xMidYMid meet">' % (_e(title), width, height),
           '<text class="title" x="%d" y="18">%s</text>' % (left, _e(title))]
    if not series:
        out.append('<text x="%d" y="%d">no vouchers issued</text></svg>' % (left, top + h // 2))
        return "".join(out)
    size = _bucket(series, 400)
    # The level at the end of each bucket of `size` days, drawn across the bucket.
    pts = [series[min(i + size, len(series)) - 1][1] for i in range(0, len(series), size)]
    starts = [series[i][0] for i in range(0, len(series), size)]
    t0, t1 = starts[0], series[-1][0] + DAY
    top_v = _nice_max(max(pts))

    def x(t):
        return left + (t - t0) * w / (t1 - t0)

    def y(v):
        return top + h - v * h / top_v
    for k in range(5):
        v = top_v * k / 4
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e5e7eb"/>'
                   % (left, y(v), left + w, y(v)))
        out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>'
                   % (left - 6, y(v) + 4, _e(_money_axis(v))))
    steps = []
    for i, v in enumerate(pts):
        end = starts[i + 1] if i + 1 < len(starts) else t1
        steps += [(starts[i], v), (end, v)]
    line = " ".join("%.1f,%.1f" % (x(t), y(v)) for t, v in steps)
    area = "%.1f,%.1f %s %.1f,%.1f" % (x(t0), y(0), line, x(t1), y(0))
    out.append('<polygon points="%s" fill="#fde68a" fill-opacity="0.6"/>' % area)
    out.append('<polyline points="%s" fill="none" stroke="#d97706" stroke-width="2">'
               '<title>%s at the end of %s</title></polyline>'
               % (line, _e(format_pence(pts[-1])), utc(series[-1][0], date_only=True)))
    out.append('<text x="%.1f" y="%.1f" text-anchor="end">%s</text>'
               % (left + w - 4, max(y(pts[-1]) - 6, top + 12), _e(format_pence(pts[-1]))))
    for t in _ticks(t0, series[-1][0], 6):
        anchor = "end" if x(t) > left + w - 40 else "start" if x(t) < left + 40 else "middle"
        out.append('<text x="%.1f" y="%d" text-anchor="%s">%s</text>'
                   % (x(t), top + h + 18, anchor, utc(t, date_only=True)))
    out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#9ca3af"/>'
               % (left, top + h, left + w, top + h))
    out.append("</svg>")
    return "".join(out)


def _ticks(t0, t1, n):
    if t1 <= t0:
        return [t0]
    step = max(DAY, (t1 - t0) / (n - 1))
    step = math.ceil(step / DAY) * DAY
    out, t = [], t0
    while t <= t1 + 1:
        out.append(t)
        t += step
    return out


def svg_bar_chart(bars, title, width=510, height=260, money=False):
    """Vertical bars [(label, value)] (labels thinned to fit); money=True: values are
    pence, shown in pounds."""
    left, right, top, bottom = 56, 12, 28, 36
    w, h = width - left - right, height - top - bottom
    out = ['<svg class="chart" role="img" aria-label="%s" viewBox="0 0 %d %d" width="100%%" '
           'preserveAspectRatio="xMidYMid meet">' % (_e(title), width, height),
           '<text class="title" x="%d" y="18">%s</text>' % (left, _e(title))]
    if not bars:
        out.append('<text x="%d" y="%d">none yet</text></svg>' % (left, top + h // 2))
        return "".join(out)
    top_v = _nice_max(max(v for _, v in bars))
    bw = w / len(bars)
    for k in range(5):
        v = top_v * k / 4
        yy = top + h - v * h / top_v
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e5e7eb"/>'
                   % (left, yy, left + w, yy))
        out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>'
                   % (left - 6, yy + 4, _e(_money_axis(v) if money else "%g" % round(v, 1))))
    every = max(1, math.ceil(len(bars) / 8))
    for i, (label, v) in enumerate(bars):
        bh = v * h / top_v
        out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#15803d">'
                   '<title>%s: %s</title></rect>'
                   % (left + i * bw + bw * 0.1, top + h - bh, max(bw * 0.8, 0.5), bh,
                      _e(label), _e(format_pence(v) if money else v)))
        if i % every == 0:
            out.append('<text x="%.1f" y="%d" text-anchor="middle">%s</text>'
                       % (left + i * bw + bw / 2, top + h + 18, _e(label)))
    out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#9ca3af"/>'
               % (left, top + h, left + w, top + h))
    out.append("</svg>")
    return "".join(out)


def svg_hbar_chart(bars, title, width=510, height=260):
    """Horizontal bars [(label, count)], one row per label."""
    left, right, top = 130, 40, 28
    rows = max(len(bars), 1)
    row_h = min(24, (height - top - 8) / rows)
    out = ['<svg class="chart" role="img" aria-label="%s" viewBox="0 0 %d %d" width="100%%" '
           'preserveAspectRatio="xMidYMid meet">' % (_e(title), width, height),
           '<text class="title" x="12" y="18">%s</text>' % _e(title)]
    if not bars:
        out.append('<text x="12" y="%d" fill="#15803d">no anomalies</text></svg>' % (top + 20))
        return "".join(out)
    top_v = max(v for _, v in bars)
    w = width - left - right
    for i, (label, v) in enumerate(bars):
        yy = top + i * row_h
        bw = max(v * w / top_v, 1)
        out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>'
                   % (left - 6, yy + row_h * 0.65, _e(label)))
        out.append('<rect x="%d" y="%.1f" width="%.1f" height="%.1f" fill="#b91c1c">'
                   '<title>%s: %d</title></rect>'
                   % (left, yy + row_h * 0.15, bw, row_h * 0.7, _e(label), v))
        out.append('<text x="%.1f" y="%.1f">%d</text>' % (left + bw + 4, yy + row_h * 0.65, v))
    out.append("</svg>")
    return "".join(out)


def _voucher_table(parts, s, title, statuses, blurb, max_rows, empty):
    """One table of vouchers with these statuses: a totals line for all of them (what the
    CSV sums to), the largest first, at most max_rows shown."""
    rows, (n, total) = s.rows_with_status(statuses, limit=max_rows)
    parts.append('<h2>%s</h2><div class="panel"><p>%s</p>' % (_e(title), _e(blurb)))
    parts.append('<p class="total"><b>{:,} voucher%s, %s</b>%s</p>'.format(n) % (
        "" if n == 1 else "s", _e(format_pence(total)),
        " — in the CSV: rows with status %s" % " or ".join(statuses)))
    if not n:
        parts.append("<p>%s</p></div>" % _e(empty))
        return
    parts.append('<table><tr><th>device</th><th>label</th><th class="n">sequence</th>'
                 '<th>form</th><th>status</th><th class="n">amount</th><th>issued</th>'
                 '<th>expires</th><th>closed</th><th>why</th></tr>')
    for (dev, seq, status, amount, issued, expires, _kid, revoked, closed, _ri, _bal, _rh,
         _ref, label, note, form) in rows:
        why = note or ("issuer key revoked" if status == "void" and revoked else "")
        parts.append('<tr><td class="mono">%s</td><td>%s</td><td class="n">%d</td><td>%s</td>'
                     '<td><span class="pill" style="background:%s">%s</span></td><td class="n">'
                     '%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>'
                     % (_e(format_eui64(dev)), _e(label or ""), seq, FORM_NAMES[form],
                        STATUS_COLOUR[status],
                        status, _e(format_pence(amount)), _e(utc(issued)), _e(utc(expires)),
                        _e(utc(closed)), _e(why)))
    parts.append('<tr class="sum"><td colspan="5">total (all %d)</td><td class="n">%s</td>'
                 '<td colspan="4"></td></tr></table>' % (n, _e(format_pence(total))))
    if n > len(rows):
        parts.append('<p class="note">The %d largest of %d shown; the total is of all %d; the '
                     'CSV has one row per voucher.</p>' % (len(rows), n, n))
    parts.append("</div>")


def render_html(s, max_rows=500):
    """The report as one HTML document (a str)."""
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             '<title>Offline top-up reconciliation — run %d</title>' % s.run,
             "<style>%s</style></head><body><main>" % _CSS,
             "<h1>Offline top-up reconciliation</h1>",
             '<p class="sub">Run %d at %s · expiry judged at %s · expired vouchers: %s · '
             '%d receipts · %d vouchers</p>' % (s.run, _e(utc(s.at)), _e(utc(s.as_of)),
                                              "refund due" if s.policy == "refund"
                                              else "void (no refund)", s.receipts, s.vouchers)]
    if s.imported_since:
        parts.append('<p class="note">%d receipts were imported after this run; run '
                     '<code>topup reconcile</code> again to include them.</p>' % s.imported_since)
    withdrawn = sum(s.pence[st] for st in s.withdrawn_statuses)
    cards = [("Outstanding liability", format_pence(s.liability), ""),
             ("Refunds due", format_pence(s.refunds_due), "bad" if s.refunds_due else ""),
             ("Redeemed", format_pence(s.pence["redeemed"]), ""),
             ("Void (nothing owed)", format_pence(withdrawn), ""),
             ("Anomalies", str(len(s.anomalies)), "bad" if s.anomalies else "good")]
    parts.append('<div class="cards">%s</div>' % "".join(
        '<div class="card %s"><div class="k">%s</div><div class="v">%s</div></div>'
        % (cls, _e(k), _e(v)) for k, v, cls in cards))

    # What is owed to whom: each meter's outstanding vouchers and refunds due.
    owed = s.owed_by_meter()
    parts.append('<h2>Owed, by meter</h2><div class="panel"><p>Outstanding: paid for, not '
                 'yet redeemed (a liability). Refunds due: the customer paid and the meter '
                 'will never apply them.</p>')
    if not owed:
        parts.append("<p>Nothing outstanding and no refunds due.</p>")
    else:
        parts.append('<table><tr><th>device</th><th>label</th><th class="n">outstanding</th>'
                     '<th class="n">refunds due</th></tr>')
        for dev, label, (on, op), (rn, rp) in owed[:max_rows]:
            parts.append('<tr><td class="mono">%s</td><td>%s</td><td class="n">%s</td>'
                         '<td class="n">%s</td></tr>' % (
                             _e(format_eui64(dev)), _e(label or ""),
                             "%d · %s" % (on, _e(format_pence(op))) if on else "-",
                             "%d · %s" % (rn, _e(format_pence(rp))) if rn else "-"))
        parts.append('<tr class="sum"><td colspan="2">total (%d meters)</td><td class="n">%d · '
                     '%s</td><td class="n">%d · %s</td></tr></table>' % (
                         len(owed), s.count["outstanding"], _e(format_pence(s.liability)),
                         sum(s.count[st] for st in s.refund_statuses),
                         _e(format_pence(s.refunds_due))))
        if len(owed) > max_rows:
            parts.append('<p class="note">The %d meters owed most of %d shown; totals are of '
                         'all.</p>' % (max_rows, len(owed)))
    parts.append("</div>")

    red = s.redemptions_per_day()
    size = _bucket(red, 60)
    bars = []
    for i in range(0, len(red), size):
        chunk = red[i:i + size]
        bars.append((utc(chunk[0][0], date_only=True)[5:] if size == 1
                     else utc(chunk[0][0], date_only=True), sum(c[2] for c in chunk)))
    kinds = [(k, s.by_kind[k]) for k in ANOMALY_KINDS if k in s.by_kind]
    parts.append('<h2>Charts</h2><div class="charts">')
    parts.append('<div class="panel wide">%s</div>'
                 % svg_line_chart(s.liability_series(), "Outstanding liability over time "
                                  "(end of each UTC day, to %s)" % utc(s.end, date_only=True)))
    parts.append('<div class="panel">%s</div>' % svg_bar_chart(
        bars, "Redemptions per %s in pounds (meter time)"
        % ("day" if size == 1 else "%d days" % size), money=True))
    parts.append('<div class="panel">%s</div>' % svg_hbar_chart(kinds, "Anomalies by kind"))
    parts.append("</div>")

    parts.append('<h2>Vouchers by status</h2><div class="panel"><table><tr><th>status</th>'
                 '<th class="n">vouchers</th><th class="n">amount</th><th>meaning</th></tr>')
    for st in STATUSES:
        meaning = STATUS_MEANING[st]
        if st == "expired":
            meaning += ": refund due" if s.policy == "refund" else ": void by policy"
        parts.append('<tr><td><span class="pill" style="background:%s">%s</span></td>'
                     '<td class="n">{:,}</td><td class="n">%s</td><td>%s</td></tr>'
                     .format(s.count[st]) % (STATUS_COLOUR[st], st, _e(format_pence(s.pence[st])),
                        _e(meaning)))
    parts.append('<tr class="sum"><td>all</td><td class="n">%d</td><td class="n">%s</td>'
                 '<td></td></tr></table></div>' % (sum(s.count.values()),
                                                   _e(format_pence(sum(s.pence.values())))))

    _voucher_table(parts, s, "Outstanding vouchers (liability)", ("outstanding",),
                   "Paid for and still redeemable on their meters.", max_rows,
                   "None: nothing is outstanding.")
    _voucher_table(parts, s, "Refunds due", s.refund_statuses,
                   "The customer paid and the meter will never apply them: stale (below the "
                   "meter's replay window, or at or below a provisioning's sequence floor)%s."
                   % (" or expired" if s.policy == "refund" else ""), max_rows,
                   "None: no refunds are due.")
    _voucher_table(parts, s, "Void", s.withdrawn_statuses,
                   "Cancelled before they were redeemed (the voucher voided, or its issuer "
                   "key revoked)%s: nothing is owed for them." % (
                       "" if s.policy == "refund" else ", or expired (policy: void)"),
                   max_rows, "None.")

    parts.append('<h2>Anomalies</h2><div class="panel">')
    if not s.anomalies:
        parts.append("<p>None: every receipt verified, every chain is whole and every top-up "
                     "matches a voucher.</p>")
    else:
        parts.append("<table><tr><th>kind</th><th class=\"n\">count</th><th>meaning</th></tr>")
        for k, n in kinds:
            parts.append('<tr><td>%s</td><td class="n">%d</td><td>%s</td></tr>'
                         % (_e(k), n, _e(ANOMALY_KINDS[k])))
        parts.append("</table><br><table><tr><th>kind</th><th>device</th>"
                     "<th class=\"n\">receipt</th><th class=\"n\">sequence</th><th>detail</th>"
                     "<th>id</th></tr>")
        for i, kind, dev, idx, h, seq, detail in s.anomalies[:max_rows]:
            parts.append('<tr><td>%s</td><td class="mono">%s</td><td class="n">%s</td>'
                         '<td class="n">%s</td><td>%s</td><td class="mono">%s</td></tr>'
                         % (_e(kind), _e(format_eui64(dev)) if dev else "-",
                            "" if idx is None else idx, "" if seq is None else seq,
                            _e(detail), _e(i)))
        parts.append("</table>")
        if len(s.anomalies) > max_rows:
            parts.append('<p class="note">First %d of %d anomalies; the CSV has them all.</p>'
                         % (max_rows, len(s.anomalies)))
    parts.append("</div>")

    parts.append('<h2>Meters</h2><div class="panel"><table><tr><th>device</th><th>label</th>')
    for st in STATUSES:
        parts.append('<th class="n">%s</th>' % st)
    parts.append('<th class="n">anomalies</th></tr>')
    devs = s.devices()
    for dev, label, per, n_anom in devs[:max_rows]:
        parts.append('<tr><td class="mono">%s</td><td>%s</td>' % (_e(format_eui64(dev)),
                                                                   _e(label or "")))
        for st in STATUSES:
            c, p = per.get(st, (0, 0))
            parts.append('<td class="n">%s</td>' % ("%d · %s" % (c, _e(format_pence(p)))
                                                    if c else "-"))
        parts.append('<td class="n">%s</td></tr>' % (n_anom or "-"))
    parts.append("</table>")
    if len(devs) > max_rows:
        parts.append('<p class="note">First %d of %d meters.</p>' % (max_rows, len(devs)))
    parts.append("</div>")
    parts.append("<footer>offline-topup · generated by <code>topup report</code> from the "
                 "supplier database; self-contained, no network needed.</footer>")
    parts.append("</main></body></html>\n")
    return "".join(parts)


def write_html(s, path, force=False):
    """The HTML report to `path`, whole (a temporary file renamed into place); an existing
    file only with force."""
    from .output import write_whole
    write_whole(path, render_html(s).encode("utf-8"), force=force)
    return path
