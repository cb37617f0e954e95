# Reports of a reconciliation: the terminal summary, CSV for finance, and the
# self-contained HTML (parses, holds the three SVG charts, references nothing outside).
import csv
import html.parser
import io

import pytest
from click.testing import CliRunner
from rich.console import Console

from host import keystore, reconcile, receipts_io, report
from host.cli import cli
from host.errors import TopupError

from .test_reconcile_data import A, B, C, DAY, PASS, T0, Meter, World, normal_life

NOW = T0 + 10 * DAY


@pytest.fixture
def done(tmp_path):
    """A reconciled database with every status and a few anomalies."""
    w = World(tmp_path / "topup.db", a_count=80, b_count=4, b_expires_days=5)
    raws = normal_life(w)
    a = w.a
    a.apply(w.va[79].cose, T0 + 7 * DAY)                   # sequences 7-15 go stale
    a.apply(w.forge(A, 81, 2500), T0 + 8 * DAY)            # never issued; now 7-16 are
    c = Meter(C, 0xC3)
    c.apply(w.forge(C, 1, 100), T0 + DAY)                  # unknown meter
    # A later key issues to B, then the first is revoked: B's unredeemed go void.
    keystore.new_key(w.conn, PASS, activate=True, now=T0)
    later = keystore.unlock_active(w.conn, PASS)
    from host import issuer
    issuer.issue(w.conn, later, B, 250, 2, now=T0 + 2 * DAY, expires_in=2 * DAY)
    path = tmp_path / "r.cbor"
    receipts_io.write_receipts(path, raws[:8] + a.receipts[8:] + raws[8:] + c.receipts)
    reconcile.import_files(w.conn, [path])
    res = reconcile.reconcile(w.conn, now=NOW)
    yield w, res
    w.close()


def test_summary_totals(done):
    w, res = done
    s = report.load(w.conn)
    assert s.count == res.count
    assert s.count["redeemed"] == 9 and s.count["stale"] == 10
    assert s.count["expired"] == 4 and s.count["void"] == 0
    assert s.count["outstanding"] == 63  # A's 17-79, inside the window
    assert s.liability == res.liability == s.pence["outstanding"] == 63 * 1000
    assert s.refunds_due == 10 * 1000 + 2 * 500 + 2 * 250
    assert s.by_kind == {"not_issued": 1, "unknown_device": 1}
    keystore.revoke(w.conn, w.signer.kid, now=T0 + 9 * DAY)
    reconcile.reconcile(w.conn, now=NOW)
    s = report.load(w.conn)
    # Void wins over stale and expired: A's 73 unredeemed and B's 2 from the first key.
    assert s.count["void"] == 73 + 2 and s.count["stale"] == 0 and s.count["expired"] == 2


def test_terminal_summary(done):
    w, _ = done
    buf = io.StringIO()
    report.print_summary(Console(file=buf, width=200), report.load(w.conn))
    out = buf.getvalue()
    for text in ("outstanding", "redeemed", "stale", "expired", "void", "refunds due",
                 "not_issued", "unknown_device", "70-B3-D5-F0-00-00-00-C3"):
        assert text in out


def test_csv_one_row_per_voucher_and_anomalies(done, tmp_path):
    w, res = done
    paths = report.write_csv(report.load(w.conn), str(tmp_path / "finance.csv"))
    assert paths[1] == str(tmp_path / "finance-anomalies.csv")
    with open(paths[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == w.conn.execute("SELECT count(*) FROM vouchers").fetchone()[0] == 86
    by = {(r["device"], int(r["sequence"])): r for r in rows}
    r1 = by[("70-B3-D5-F0-00-00-00-A1", 1)]
    assert (r1["status"], r1["amount_pence"], r1["amount"], r1["receipt_index"],
            r1["liability"], r1["refund_due"]) == ("redeemed", "1000", "10.00", "0", "no", "no")
    assert by[("70-B3-D5-F0-00-00-00-A1", 7)]["refund_due"] == "yes"
    assert by[("70-B3-D5-F0-00-00-00-A1", 16)]["refund_due"] == "yes"
    assert by[("70-B3-D5-F0-00-00-00-A1", 17)]["liability"] == "yes"
    assert sum(int(r["amount_pence"]) for r in rows if r["liability"] == "yes") == res.liability
    with open(paths[1], newline="") as f:
        anomalies = list(csv.DictReader(f))
    assert sorted(a["kind"] for a in anomalies) == ["not_issued", "unknown_device"]
    assert {a["id"] for a in anomalies} == {a.id for a in res.anomalies}


class _Checker(html.parser.HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr",
            "source", "track", "embed", "param"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.errors = [], [], []
        self.attrs = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append("unbalanced </%s> (open: %s)" % (tag, self.stack[-3:]))
        else:
            self.stack.pop()


def test_html_is_self_contained_with_charts(done, tmp_path):
    w, _ = done
    path = report.write_html(report.load(w.conn), str(tmp_path / "report.html"))
    text = open(path, encoding="utf-8").read()
    p = _Checker()
    p.feed(text)
    p.close()
    assert p.errors == [] and p.stack == []
    assert text.startswith("<!DOCTYPE html>")
    assert p.tags.count("svg") == 3
    assert "polyline" in p.tags and "rect" in p.tags  # the line chart and the bar charts
    for label in ("Outstanding liability over time", "Redemptions per day",
                  "Anomalies by kind"):
        assert 'aria-label="%s' % label in text
    # Nothing outside the file: no scripts, no links, no URLs of any kind.
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert "http:" not in text and "https:" not in text and "//" not in text.replace(
        "<!DOCTYPE", "")
    assert not [v for k, v in p.attrs if k in ("src", "href")]
    assert "url(" not in text and "@import" not in text
    for text_ in ("not_issued", "unknown_device", "£", "stale"):
        assert text_ in text


def test_html_with_nothing_to_chart(tmp_path):
    w = World(tmp_path / "topup.db", a_count=1, b_count=1)
    try:
        reconcile.reconcile(w.conn, now=NOW)
        text = report.render_html(report.load(w.conn))
        assert text.count("<svg") == 3 and "no anomalies" in text
    finally:
        w.close()


def test_report_before_any_reconcile_is_a_clear_error(tmp_path):
    w = World(tmp_path / "topup.db", a_count=1, b_count=1)
    try:
        with pytest.raises(TopupError, match="topup reconcile"):
            report.load(w.conn)
    finally:
        w.close()


def test_cli_report(done, tmp_path):
    w, _ = done
    env = {"TOPUP_DB": w.path}
    runner = CliRunner()
    r = runner.invoke(cli, ["report", "--csv", str(tmp_path / "v.csv"), "--html",
                            str(tmp_path / "r.html")], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "v.csv").exists() and (tmp_path / "v-anomalies.csv").exists()
    assert (tmp_path / "r.html").read_text().count("<svg") == 3
    r = runner.invoke(cli, ["report"], env=env, catch_exceptions=False)
    assert r.exit_code == 0 and "refunds due" in r.stdout
    # Receipts imported after the run are pointed out.
    m = Meter(B, 0xB2)
    path = tmp_path / "more.cbor"
    receipts_io.write_receipts(path, [m.make(2, T0 + 9 * DAY, 0, 0, index=50, amount=5)])
    assert runner.invoke(cli, ["receipts", "import", str(path)], env=env).exit_code == 0
    r = runner.invoke(cli, ["report"], env=env, catch_exceptions=False)
    assert "imported since this reconciliation" in r.stdout
