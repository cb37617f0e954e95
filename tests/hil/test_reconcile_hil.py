"""Receipts from the board under test, back through the supplier's tools: read out over the
HAN (`topup han receipts`), pushed over the WAN link (`topup headend`), imported and
reconciled — with zero anomalies and statuses that match what the test did; and a tampered
receipt file yielding exactly the anomalies its tampering should."""
import threading

import pytest

from hil.transport import BUTTON, POWER_CUT, PULSES
from host import receipts_io

pytestmark = pytest.mark.hil


def _statuses(issuer):
    return {seq: status for seq, status in issuer.conn.execute(
        "SELECT v.sequence, s.status FROM vouchers v JOIN voucher_status s "
        "ON s.device = v.device AND s.sequence = v.sequence")}


def _anomalies(issuer):
    return sorted((kind, idx) for kind, idx in issuer.conn.execute(
        "SELECT kind, receipt_index FROM anomalies"))


def _wait_for_balance(han, expected, timeout=10):
    import time
    deadline = time.monotonic() + timeout
    while True:
        balance = han.status()["balance_mp"]
        if balance == expected or time.monotonic() > deadline:
            assert balance == expected
            return
        time.sleep(0.05)


def _readout(issuer, board, path):
    r = issuer.cli("han", "receipts", "--port", board.han_port, "--out", str(path))
    assert r.exit_code == 0, r.stdout + r.stderr
    return receipts_io.read_file(str(path))


@pytest.mark.rig(PULSES, BUTTON, POWER_CUT)
def test_a_days_traffic_reconciles_with_zero_anomalies(board, han, issuer, tmp_path):
    vouchers = issuer.issue(500, count=8)            # sequences 1..8, £5 each
    for i in (1, 0, 3, 2):                            # out of order inside the window
        han.submit(vouchers[i])
    han.submit(vouchers[0])                           # a retry: same receipt, nothing new
    board.add_pulses(30000)                           # £7.35 of energy
    # Once the meter shows it, it is on flash (20 p unsaved forces a checkpoint at once).
    _wait_for_balance(han, board.opening_mp + 4 * 500000 - 735000)
    board.power_cut_kill()                            # a cut at any instant
    han = board.han()
    han.submit(vouchers[5])
    board.add_pulses(3000)
    # seq 5, 7, 8 (indices 4, 6, 7) never reach the meter: outstanding
    items = _readout(issuer, board, tmp_path / "readout.cbor")
    assert len(items) == 5
    assert issuer.cli("receipts", "import", str(tmp_path / "readout.cbor")).exit_code == 0
    r = issuer.cli("reconcile")
    assert r.exit_code == 0, r.stdout
    assert "no anomalies" in r.stdout
    st = _statuses(issuer)
    assert {s for s, v in st.items() if v == "redeemed"} == {1, 2, 3, 4, 6}
    assert {s for s, v in st.items() if v == "outstanding"} == {5, 7, 8}
    # the supplier's books agree with the meter's: the last receipt's balance is the status
    last = issuer.verify_receipt(items[-1].raw)
    assert last.balance_after == board.opening_mp + 5 * 500000 - 30000 * 245 // 10


def test_receipts_pushed_over_the_wan_reconcile(board, han, issuer, tmp_path):
    transport = board.transport
    wan_port = getattr(getattr(transport, "board", None), "wan_port", None)
    if wan_port is None:
        pytest.skip("%s has no WAN link port" % transport.describe())
    for v in issuer.issue(700, count=3):
        han.submit(v)
    threading.Timer(0.5, board.set_wan, [True]).start()
    r = issuer.cli("headend", "--port", wan_port, "--idle-exit", "3")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "3 new receipt(s) stored" in r.stdout
    assert han.status()["receipt_count"] == 3
    r = issuer.cli("reconcile")
    assert r.exit_code == 0 and "no anomalies" in r.stdout, r.stdout
    assert set(_statuses(issuer).values()) == {"redeemed"}


def test_a_tampered_receipt_file_gives_exactly_the_expected_anomalies(board, han, issuer, tmp_path):
    for v in issuer.issue(300, count=5):
        han.submit(v)
    items = _readout(issuer, board, tmp_path / "good.cbor")
    raws = [it.raw for it in items]
    assert len(raws) == 5
    flipped = bytearray(raws[1])
    flipped[-1] ^= 0x01                               # receipt 1: signature no longer holds
    tampered = [raws[0], bytes(flipped), raws[2], raws[4]]   # receipt 3 dropped: a gap
    receipts_io.write_receipts(str(tmp_path / "tampered.cbor"), tampered)
    assert issuer.cli("receipts", "import", str(tmp_path / "tampered.cbor")).exit_code == 0
    r = issuer.cli("reconcile")
    assert r.exit_code == 1
    assert _anomalies(issuer) == [("bad_signature", 1), ("chain_gap", 3)]
    st = _statuses(issuer)
    assert st[2] == "outstanding" and st[4] == "outstanding"   # unproven: not counted as redeemed
    assert {st[1], st[3], st[5]} == {"redeemed"}
    # the genuine read-out fills the gap and replaces nothing: the bad copy stays an anomaly
    assert issuer.cli("receipts", "import", str(tmp_path / "good.cbor")).exit_code == 0
    issuer.cli("reconcile")
    assert ("chain_gap", 3) not in _anomalies(issuer)
