"""Issue 9, item 3: `topup vouchers list|export` find stored vouchers again (by device,
sequence range, batch, status, delivery) and write them in every format `issue` has;
`topup vouchers void` cancels one voucher, reconciliation counts it void, and a meter that
applies it all the same shows as `void_redeemed`. Through the real `topup`."""
import json
import re

import pytest

from host.receipts_io import write_receipts
from protocol import voucher as pv
from tests.host.test_reconcile_data import Meter

from .conftest import DEVICE, one_line_error

OTHER = "70-B3-D5-F0-00-00-00-B2"


def _listed(r):
    """(device, sequence, status, batch, written to) of `vouchers list` rows."""
    rows = []
    for ln in r.stdout.splitlines()[1:-1]:
        w = ln.split()
        assert w[2] in ("voucher", "code"), ln          # the form column (issue 11)
        rows.append((w[0], int(w[1]), w[4].rstrip("*"), w[7], " ".join(w[8:-1])))
    return rows


@pytest.fixture
def issued(store, tmp_path):
    """Batch 1: 3 vouchers to stdout; batch 2: 2 to a file; batch 3: 2 for another meter."""
    store.ok("device", "add", OTHER)
    store.ok("issue", DEVICE, "1", "-n", "3")
    store.ok("issue", DEVICE, "2.50", "-n", "2", "-f", "json", "-o", tmp_path / "b2.jsonl")
    store.ok("issue", OTHER, "5", "-n", "2", "--expires-in", "1")
    return store


def test_list_filters(issued, tmp_path):
    rows = _listed(issued.ok("vouchers", "list"))
    assert [(d, s, b) for d, s, _, b, _ in rows] == [
        (DEVICE, 1, "1"), (DEVICE, 2, "1"), (DEVICE, 3, "1"), (DEVICE, 4, "2"), (DEVICE, 5, "2"),
        (OTHER, 1, "3"), (OTHER, 2, "3")]
    assert rows[0][4] == "standard output (text)"
    assert rows[3][4] == "%s (json)" % (tmp_path / "b2.jsonl")
    r = issued.ok("vouchers", "list", "--device", DEVICE, "--seq", "2-4")
    assert [s for _, s, *_ in _listed(r)] == [2, 3, 4]
    assert r.stdout.splitlines()[-1] == "3 vouchers, £4.50: outstanding 3 (£4.50)"
    assert [s for _, s, *_ in _listed(issued.ok("vouchers", "list", "--batch", "2"))] == [4, 5]
    assert [d for d, *_ in _listed(issued.ok("vouchers", "list", "--device", OTHER))] == [OTHER] * 2
    assert issued.ok("vouchers", "list", "--undelivered").stderr.startswith("no vouchers match")
    assert "seq" in one_line_error(issued("vouchers", "list", "--seq", "5-2"))


@pytest.mark.parametrize("fmt", ["text", "json", "cbor", "qr", "png", "svg"])
def test_export_in_every_issue_format(issued, tmp_path, fmt):
    out = tmp_path / ("out" if fmt in ("png", "svg", "cbor") else "out.%s" % fmt)
    if fmt in ("png", "svg", "cbor"):
        out = str(out) + "/"
    r = issued.ok("vouchers", "export", "--batch", "1", "-f", fmt, "-o", out)
    assert "exported 3 vouchers (sequences 1-3)" in r.stderr
    if fmt == "text":
        got = [pv.parse(pv.from_text(t)).sequence for t in open(out).read().splitlines()]
    elif fmt == "json":
        got = [json.loads(ln)["sequence"] for ln in open(out, encoding="utf-8")]
    elif fmt == "qr":
        got = [int(m) for m in re.findall(r"seq (\d+)", open(out, encoding="utf-8").read())]
    else:
        import os
        names = sorted(os.listdir(out))
        assert names == ["%s-%d.%s" % (DEVICE, s, fmt) for s in (1, 2, 3)]
        got = [1, 2, 3]
        if fmt == "cbor":
            got = [pv.parse(open(os.path.join(out, n), "rb").read()).sequence for n in names]
    assert got == [1, 2, 3]
    # the export is recorded: the listing says where they were written last
    rows = _listed(issued.ok("vouchers", "list", "--batch", "1"))
    assert all(str(out).rstrip("/") in w for *_, w in rows)


def test_export_of_a_selection_to_stdout_and_by_status(issued):
    r = issued.ok("vouchers", "export", "--device", OTHER, "-f", "json")
    objs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [o["sequence"] for o in objs] == [1, 2] and objs[0]["amount"] == "£5.00"
    assert "£" in r.stdout  # JSON as UTF-8, not \\u00a3
    import time
    issued.ok("reconcile", "--now", int(time.time()) + 3 * 86400)  # OTHER's have expired
    r = issued.ok("vouchers", "export", "--status", "expired")
    assert len(r.stdout.splitlines()) == 2
    r = issued.ok("vouchers", "export", "--status", "redeemed")
    assert r.stdout == "" and r.stderr == "topup: no vouchers match; nothing written\n"


def test_void_one_voucher_and_a_meter_that_applies_it_anyway(store, tmp_path):
    meter = Meter(bytes.fromhex("70b3d5f0000000c3"), 0xC3)
    store.ok("device", "add", "70-B3-D5-F0-00-00-00-C3", "--public-key", meter.public.hex())
    texts = store.ok("issue", "70-B3-D5-F0-00-00-00-C3", "4", "-n", "3").stdout.splitlines()
    refs = [pv.parse(pv.from_text(t)).ref.hex() for t in texts]
    # by reference (a prefix), and by device and sequence
    r = store.ok("vouchers", "void", refs[1][:10], "--note", "refunded by phone", "--yes")
    assert r.stdout.startswith("cancelled voucher 2 of 70-B3-D5-F0-00-00-00-C3 (£4.00, ref %s)"
                               % refs[1])
    msg = one_line_error(store("vouchers", "void", "--device", "70-B3-D5-F0-00-00-00-C3",
                               "--seq", "2", "--yes"))
    assert "already void" in msg
    r = store("vouchers", "void", "--device", "70-B3-D5-F0-00-00-00-C3", "--seq", "3",
              input="n\n")
    assert r.returncode == 1 and "not cancelled" in r.stderr
    assert "no voucher or code with reference" in one_line_error(store("vouchers", "void", "ab" * 8))
    # reconciliation counts it void: not a liability, no refund
    r = store("reconcile")
    assert r.returncode == 0, r.stdout
    assert re.search(r"void\s+1\s+£4\.00", r.stdout)
    assert re.search(r"outstanding\s+2\s+£8\.00", r.stdout)
    assert [st for _, _, st, *_ in _listed(store.ok("vouchers", "list", "--device",
                                                     "70-B3-D5-F0-00-00-00-C3"))] == [
        "outstanding", "void", "outstanding"]
    # the meter applies it all the same: redeemed (the credit is there) and named
    raws = [meter.apply(pv.from_text(texts[0]), 1_800_000_000),
            meter.apply(pv.from_text(texts[1]), 1_800_000_100)]
    write_receipts(tmp_path / "r.cbor", raws)
    store.ok("receipts", "import", tmp_path / "r.cbor")
    r = store("reconcile")
    assert r.returncode == 1 and "void_redeemed" in r.stdout, r.stdout
    assert re.search(r"voucher 2 was cancelled on .* but receipt 1 applied it", r.stdout)
    msg = one_line_error(store("vouchers", "void", "--device", "70-B3-D5-F0-00-00-00-C3",
                               "--seq", "1", "--yes"))
    assert "was redeemed (receipt 0" in msg
    csv_path = tmp_path / "f.csv"
    store.ok("report", "--csv", csv_path)
    rows = (tmp_path / "f-anomalies.csv").read_text().splitlines()
    assert any(",void_redeemed," in ln for ln in rows)
