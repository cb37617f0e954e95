"""Receipts from the board under test, back through the supplier's tools: read out over the
HAN (`topup han receipts`), pushed over the WAN link (`topup headend`), imported and
reconciled — with zero anomalies and statuses that match what the test did; a tampered
receipt file yielding exactly the anomalies its tampering should; and a factory reset
between two uploads that loses nothing and re-opens nothing.

The board carries its receipt count and sequence floor across the factory reset each test
starts with (SPEC.md §2.2), so indices and sequences are taken relative to what the meter
reported at provisioning (`board.public_key.first_index`, the issued vouchers)."""
import threading

import pytest

from hil.transport import BUTTON, POWER_CUT, PULSES
from host import receipts_io
from protocol import voucher as pv

pytestmark = pytest.mark.hil


def _statuses(issuer):
    return {seq: status for seq, status in issuer.conn.execute(
        "SELECT v.sequence, s.status FROM vouchers v JOIN voucher_status s "
        "ON s.device = v.device AND s.sequence = v.sequence")}


def _seq(raw):
    return pv.parse(raw).sequence


def _wan_port(board):
    port = getattr(getattr(board.transport, "board", None), "wan_port", None)
    if port is None:
        pytest.skip("%s has no WAN link port" % board.transport.describe())
    return port


def _headend(issuer, board, wan_port, idle=3):
    """`topup headend --idle-exit` while the WAN comes up; the WAN goes down after."""
    threading.Timer(0.5, board.set_wan, [True]).start()
    r = issuer.cli("headend", "--port", wan_port, "--idle-exit", idle)
    board.set_wan(False)
    assert r.exit_code == 0, r.stdout + r.stderr
    return r.stdout


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
    vouchers = issuer.issue(500, count=8)            # 8 sequences, £5 each
    seqs = [_seq(v) for v in vouchers]
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
    # the 5th, 7th and 8th never reach the meter: outstanding
    items = _readout(issuer, board, tmp_path / "readout.cbor")
    assert len(items) == 5
    assert issuer.cli("receipts", "import", str(tmp_path / "readout.cbor")).exit_code == 0
    r = issuer.cli("reconcile")
    assert r.exit_code == 0, r.stdout
    assert "no anomalies" in r.stdout
    st = _statuses(issuer)
    assert {s for s, v in st.items() if v == "redeemed"} == {seqs[i] for i in (0, 1, 2, 3, 5)}
    assert {s for s, v in st.items() if v == "outstanding"} == {seqs[i] for i in (4, 6, 7)}
    # the supplier's books agree with the meter's: the last receipt's balance is the status
    last = issuer.verify_receipt(items[-1].raw)
    assert last.balance_after == board.opening_mp + 5 * 500000 - 30000 * 245 // 10


def test_receipts_pushed_over_the_wan_reconcile(board, han, issuer, tmp_path):
    wan_port = _wan_port(board)
    first = board.public_key.first_index
    for v in issuer.issue(700, count=3):
        han.submit(v)
    out = _headend(issuer, board, wan_port)
    assert "3 new receipt(s) stored" in out and "0 push(es) refused" in out
    assert han.status()["receipt_count"] == first + 3
    r = issuer.cli("reconcile")
    assert r.exit_code == 0 and "no anomalies" in r.stdout, r.stdout
    assert set(_statuses(issuer).values()) == {"redeemed"}


def test_a_factory_reset_between_uploads_loses_nothing_and_reopens_nothing(board, han, issuer,
                                                                           tmp_path):
    """Issue 8: receipts from before a factory reset stay verified (old key) and redeemed;
    a receipt never uploaded is read out before the wipe; every voucher issued before the
    reset is refused by the reset meter and reconciles stale, not outstanding; the head end
    serves the reset meter; nothing is an anomaly."""
    from hil.han_client import HanError
    from protocol import errors
    wan_port = _wan_port(board)
    first = board.public_key.first_index
    old_kid = issuer.conn.execute("SELECT kid FROM device_keys WHERE device = ? ORDER BY epoch "
                                  "DESC LIMIT 1", (issuer.device,)).fetchone()[0]
    before = issuer.issue(400, count=4)
    for v in before[:2]:
        han.submit(v)
    assert "2 new receipt(s) stored" in _headend(issuer, board, wan_port)
    han.submit(before[2])                             # applied, never uploaded
    r = issuer.cli("provision", "--port", board.repl_port, "--device", issuer.eui,
                   "--factory-reset")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "read out 3 receipt(s) before the factory reset: 1 new, stored" in r.stdout
    assert "key epoch 2: receipts from #%d" % (first + 3) in r.stdout, r.stdout
    board.wait_meter(device=issuer.device)
    with board.han() as h:
        for v in before:                              # applied or not, all refused now
            with pytest.raises(HanError) as e:
                h.submit(v)
            assert e.value.reason == errors.STALE
        after = issuer.issue(400, count=2)
        for v in after:
            h.submit(v)
        out = _headend(issuer, board, wan_port)
        assert "2 new receipt(s) stored" in out and "acknowledged #%d-#%d" % (first + 3,
                                                                            first + 4) in out
        assert h.status()["receipt_count"] == first + 5
    r = issuer.cli("reconcile")
    assert r.exit_code == 0 and "no anomalies" in r.stdout, r.stdout
    st = _statuses(issuer)
    assert [st[_seq(v)] for v in before] == ["redeemed"] * 3 + ["stale"]
    assert [st[_seq(v)] for v in after] == ["redeemed"] * 2
    kids = [k for (k,) in issuer.conn.execute(
        "SELECT checked_kid FROM receipts WHERE device = ? AND sig_ok = 1 ORDER BY idx",
        (issuer.device,))]
    assert kids[:3] == [old_kid] * 3 and len(set(kids[3:])) == 1 and kids[3] != old_kid


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
    first = board.public_key.first_index
    assert _anomalies(issuer) == [("bad_signature", first + 1), ("chain_gap", first + 3)]
    st = _statuses(issuer)
    seqs = sorted(st)
    assert st[seqs[1]] == "outstanding" and st[seqs[3]] == "outstanding"   # unproven
    assert {st[seqs[0]], st[seqs[2]], st[seqs[4]]} == {"redeemed"}
    # the genuine read-out fills the gap and replaces nothing: the bad copy stays an anomaly
    assert issuer.cli("receipts", "import", str(tmp_path / "good.cbor")).exit_code == 0
    issuer.cli("reconcile")
    assert ("chain_gap", first + 3) not in _anomalies(issuer)
