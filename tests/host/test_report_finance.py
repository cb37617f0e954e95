"""Issue 9, item 7: the report a finance reader needs at scale — separate tables for
outstanding, refunds due and void, each with a total over all of its vouchers that agrees
with the CSV (one outstanding voucher among thousands of void ones is visible); redemptions
per day in pounds; a liability chart that draws one day of data and never goes past the
reconciliation's --now or the day it ran."""
import csv
import re

import pytest

from host import issuer, keystore, reconcile, receipts_io, report

from .test_reconcile_data import A, DAY, PASS, T0, World

VOID = 3000


@pytest.fixture
def many_void(tmp_path):
    """A's 3,000 vouchers void (key revoked), one outstanding under a new key, B's two
    redeemed on one day."""
    w = World(tmp_path / "topup.db", a_count=VOID, b_count=2)
    w.b.apply(w.vb[0].cose, T0 + 3600)
    w.b.use(123_456)
    w.b.apply(w.vb[1].cose, T0 + 7200)
    path = tmp_path / "r.cbor"
    receipts_io.write_receipts(path, w.b.receipts)
    reconcile.import_files(w.conn, [path])
    keystore.new_key(w.conn, PASS, activate=True, now=T0)
    keystore.revoke(w.conn, w.signer.kid, now=T0 + 600)
    fresh = keystore.unlock_active(w.conn, PASS)
    (w.one,) = issuer.issue(w.conn, fresh, A, 4321, 1, now=T0 + 1200)
    reconcile.reconcile(w.conn, now=T0 + DAY // 2, at=T0 + DAY // 2)
    yield w
    w.close()


def _section(text, title):
    start = text.index("<h2>%s</h2>" % title)
    end = text.index("<h2>", start + 4)
    return text[start:end]


def test_outstanding_refunds_and_void_are_separate_tables_with_totals(many_void, tmp_path):
    s = report.load(many_void.conn)
    text = report.render_html(s)
    out = _section(text, "Outstanding vouchers (liability)")
    assert "<b>1 voucher, £43.21</b>" in out
    assert re.search(r"70-B3-D5-F0-00-00-00-A1</td><td>[^<]*</td><td class=\"n\">%d</td>"
                     % many_void.one.sequence, out)
    void = _section(text, "Void")
    assert "<b>3,000 vouchers, £30,000.00</b>" in void
    assert void.count("<tr><td class=\"mono\">") == 500
    assert "The 500 largest of 3000 shown; the total is of all 3000" in void
    assert "<b>0 vouchers, £0.00</b>" in _section(text, "Refunds due")
    # the CSV's rows of each status add up to the same totals
    report.write_csv(s, str(tmp_path / "f.csv"))
    with open(tmp_path / "f.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by = {}
    for r in rows:
        n, p = by.get(r["status"], (0, 0))
        by[r["status"]] = (n + 1, p + int(r["amount_pence"]))
    assert by["outstanding"] == (1, 4321) and by["void"] == (VOID, VOID * 1000)
    assert by["redeemed"] == (2, 1000)
    owed = _section(text, "Owed, by meter")
    assert "1 · £43.21" in owed


def test_redemptions_per_day_are_in_pounds(many_void):
    text = report.render_html(report.load(many_void.conn))
    m = re.search(r'<svg[^>]*aria-label="Redemptions per day in pounds.*?</svg>', text, re.S)
    assert m, "no redemptions chart"
    chart = m.group(0)
    assert "<title>%s: £10.00</title>" % report.utc(T0, date_only=True)[5:] in chart
    assert "£" in re.sub(r"<title>.*?</title>", "", chart)  # the axis is in pounds


def test_one_day_of_liability_draws_a_band(many_void):
    s = report.load(many_void.conn)
    series = s.liability_series()
    assert series == [(T0 // DAY * DAY, 4321)]
    svg = report.svg_line_chart(series, "liability")
    xs = {float(x) for x, _ in re.findall(r"([\d.]+),([\d.]+)", re.search(
        r'<polyline points="([^"]*)"', svg).group(1))}
    assert len(xs) == 2 and max(xs) - min(xs) > 900  # across the whole plot
    assert "£43.21" in svg


def test_the_chart_never_goes_past_now_or_the_run(tmp_path):
    w = World(tmp_path / "topup.db", a_count=2, b_count=1)
    try:
        reconcile.reconcile(w.conn, now=T0 + 400 * DAY, at=T0 + 3 * DAY)  # --now ahead
        series = report.load(w.conn).liability_series()
        assert series[-1][0] == (T0 + 3 * DAY) // DAY * DAY
        reconcile.reconcile(w.conn, now=T0 - DAY, at=T0 + 3 * DAY)  # --now before the issue
        assert report.load(w.conn).liability_series() == []
    finally:
        w.close()
