# Reconciliation: import of receipt files, verification, matching, statuses, anomalies.
# Data: the real issuer and meters signing receipts as the firmware does
# (tests/host/test_reconcile_data.py). Each tampering test expects exactly its anomalies.
import os
import sqlite3

import pytest

from host import db, keystore, reconcile, receipts_io, registry
from host.errors import TopupError
from protocol import receipt as pr

from .conftest import snapshot
from .test_reconcile_data import A, B, C, DAY, PASS, T0, Meter, World, normal_life

NOW = T0 + 10 * DAY


@pytest.fixture
def world(db_target):
    w = World(db_target)
    yield w
    w.close()


def run(w, raws, tmp_path, now=NOW, name="receipts.cbor", **kw):
    path = tmp_path / name
    receipts_io.write_receipts(path, raws)
    reconcile.import_files(w.conn, [path])
    return reconcile.reconcile(w.conn, now=now, **kw)


def found(res):
    return sorted((a.kind, a.device, a.index) for a in res.anomalies)


def statuses(w):
    return {(bytes(d), s): st for d, s, st in
            w.conn.execute("SELECT device, sequence, status FROM voucher_status")}


# --- clean --------------------------------------------------------------------------

def test_clean_reconcile_has_no_anomalies_and_right_statuses(world, tmp_path):
    raws = normal_life(world)
    res = run(world, raws, tmp_path)
    assert res.anomalies == []
    assert res.receipts == len(raws) == 10
    st = statuses(world)
    assert [st[(A, s)] for s in range(1, 11)] == ["redeemed"] * 6 + ["outstanding"] * 4
    assert [st[(B, s)] for s in range(1, 6)] == ["redeemed"] * 2 + ["outstanding"] * 3
    assert res.count == {"outstanding": 7, "redeemed": 8, "stale": 0, "expired": 0, "void": 0}
    assert res.liability == 4 * 1000 + 3 * 500
    assert res.pence["redeemed"] == 6 * 1000 + 2 * 500
    assert res.refunds_due == 0
    # Redeemed: when (meter time), which receipt, balance after.
    row = world.conn.execute("SELECT closed_at, receipt_index, balance_after, receipt FROM "
                             "voucher_status WHERE device = ? AND sequence = 1", (A,)).fetchone()
    first = pr.parse(world.a.receipts[0])
    assert row == (first.time, 0, first.balance_after, first.hash)
    stored = world.conn.execute("SELECT count(*), sum(sig_ok), count(checked_kid) FROM receipts"
                                ).fetchone()
    assert stored == (10, 10, 10)


def test_receipts_are_stored_with_their_fields(world, tmp_path):
    raws = normal_life(world)
    path = tmp_path / "r.cbor"
    receipts_io.write_receipts(path, raws)
    reconcile.import_files(world.conn, [path], now=T0 + 9 * DAY)
    rows = world.conn.execute(
        "SELECT device, idx, kind, prev, meter_time, balance_before, balance_after, sequence, "
        "voucher_ref, amount, rejections, raw, hash, imported, source FROM receipt_log "
        "WHERE device = ? ORDER BY idx", (A,)).fetchall()
    assert [r[1] for r in rows] == list(range(8))
    for row, raw in zip(rows, world.a.receipts):
        r = pr.parse(raw)
        assert row[:11] == (r.device, r.index, r.kind, r.prev, r.time, r.balance_before,
                            r.balance_after, r.sequence, r.voucher, r.amount,
                            None if r.rejections is None else
                            '{"4": 2, "8": 1}')
        assert (row[11], row[12], row[13], row[14]) == (raw, r.hash, T0 + 9 * DAY, str(path))


# --- tampered files: exactly the expected anomalies -----------------------------------

def test_flipped_signature_bit_is_a_bad_signature(world, tmp_path):
    raws = normal_life(world)
    k = 4  # the top-up of voucher 4
    bad = bytearray(world.a.receipts[k])
    bad[-5] ^= 0x10
    raws[k] = bytes(bad)
    res = run(world, raws, tmp_path)
    assert found(res) == [("bad_signature", A, k)]
    # An unverifiable receipt redeems nothing: that voucher stays outstanding.
    assert statuses(world)[(A, pr.parse(world.a.receipts[k]).sequence)] == "outstanding"


def test_dropped_receipt_is_a_gap(world, tmp_path):
    raws = normal_life(world)
    del raws[2]
    res = run(world, raws, tmp_path)
    assert found(res) == [("chain_gap", A, 2)]
    assert "index 2 missing" in res.anomalies[0].detail


def test_dropped_run_of_receipts_is_one_gap(world, tmp_path):
    raws = normal_life(world)
    del raws[0:3]  # also the start of the chain
    res = run(world, raws, tmp_path)
    assert found(res) == [("chain_gap", A, 0)]
    assert "indices 0-2 missing (3 receipts)" in res.anomalies[0].detail


def test_two_receipts_at_one_index_is_a_fork(world, tmp_path):
    raws = normal_life(world)
    a = world.a
    k = 4
    orig = pr.parse(a.receipts[k])
    before = pr.parse(a.receipts[k - 1]).balance_after - 5000
    other = a.make(pr.EMERGENCY, orig.time, before, before, index=k, prev=orig.prev,
                   amount=500)
    res = run(world, raws + [other], tmp_path)
    assert found(res) == [("chain_fork", A, k)]


def test_receipt_that_does_not_follow_its_predecessor_is_a_fork(world, tmp_path):
    raws = normal_life(world)
    a = world.a
    # The last receipt (7) re-signed with a prev that is not receipt 6's hash: another
    # receipt 6 must exist that the supplier never received.
    r7 = pr.parse(a.receipts[7])
    forged = a.make(r7.kind, r7.time, r7.balance_before, r7.balance_after, index=7,
                    prev=bytes(32 * [7]), sequence=r7.sequence, voucher=r7.voucher,
                    amount=r7.amount)
    raws[raws.index(a.receipts[7])] = forged
    res = run(world, raws, tmp_path)
    assert found(res) == [("chain_fork", A, 7)]
    assert "does not follow receipt 6" in res.anomalies[0].detail


def test_receipt_for_a_never_issued_sequence(world, tmp_path):
    normal_life(world)
    world.a.apply(world.forge(A, 20, 2500), T0 + 8 * DAY)
    res = run(world, world.a.receipts + world.b.receipts, tmp_path)
    assert found(res) == [("not_issued", A, 8)]
    assert res.anomalies[0].sequence == 20


def test_amount_mismatch(world, tmp_path):
    normal_life(world)
    world.a.apply(world.va[7].cose, T0 + 8 * DAY, amount=2000)
    res = run(world, world.a.receipts + world.b.receipts, tmp_path)
    assert found(res) == [("amount_mismatch", A, 8)]
    assert statuses(world)[(A, 8)] == "redeemed"  # it was applied, at the wrong amount


def test_balance_rise_between_receipts(world, tmp_path):
    normal_life(world)
    world.a.balance += 500_000  # £5 of credit from nowhere
    world.a.apply(world.va[7].cose, T0 + 8 * DAY)
    res = run(world, world.a.receipts + world.b.receipts, tmp_path)
    assert found(res) == [("balance_rise", A, 8)]
    assert "£5.00" in res.anomalies[0].detail


def test_balance_change_inside_receipts(world, tmp_path):
    normal_life(world)
    a = world.a
    a.emit(pr.EMERGENCY, T0 + 8 * DAY, a.balance, a.balance + 500_000, amount=500)
    a.balance += 500_000
    a.emit(pr.REJECTIONS, T0 + 9 * DAY, a.balance, a.balance - 1, rejections={4: 1})
    a.balance -= 1
    res = run(world, a.receipts + world.b.receipts, tmp_path)
    assert found(res) == [("balance_mismatch", A, 9), ("balance_rise", A, 8)]


def test_voucher_applied_twice(world, tmp_path):
    normal_life(world)
    world.a.apply(world.va[1].cose, T0 + 8 * DAY, check_window=False)
    res = run(world, world.a.receipts + world.b.receipts, tmp_path)
    assert found(res) == [("applied_twice", A, 8)]
    row = world.conn.execute("SELECT receipt_index FROM voucher_status WHERE device = ? AND "
                             "sequence = 2", (A,)).fetchone()
    assert row == (1,)  # the first application (receipt 1) is the redemption


def test_unknown_device(world, tmp_path):
    raws = normal_life(world)
    c = Meter(C, 0xC3)
    c.apply(world.forge(C, 1, 100), T0 + DAY)
    c.use(1000)
    c.apply(world.forge(C, 2, 100), T0 + 2 * DAY)
    res = run(world, raws + c.receipts, tmp_path)
    assert found(res) == [("unknown_device", C, 0)]
    assert "2 receipts (indices 0-1)" in res.anomalies[0].detail
    # Kept, not dropped: registering the meter's key later verifies them.
    assert world.conn.execute("SELECT count(*) FROM receipts WHERE device = ?",
                              (C,)).fetchone()[0] == 2


def test_device_without_key_then_key_registered(tmp_path):
    w = World(tmp_path / "topup.db")
    try:
        d = bytes.fromhex("70b3d5f0000000d4")
        registry.add_device(w.conn, d, now=T0)
        from host import issuer
        v = issuer.issue(w.conn, w.signer, d, 300, 2, now=T0)
        m = Meter(d, 0xD4)
        m.apply(v[0].cose, T0 + DAY)
        res = run(w, normal_life(w) + m.receipts, tmp_path)
        assert found(res) == [("no_device_key", d, 0)]
        assert statuses(w)[(d, 1)] == "outstanding"
        registry.set_public_key(w.conn, d, m.public)  # a first key: receipts from 0
        res = reconcile.reconcile(w.conn, now=NOW)  # checks the stored receipt now
        assert res.anomalies == []
        assert statuses(w)[(d, 1)] == "redeemed"
    finally:
        w.close()


def test_device_mismatch_and_reference_mismatch(world, tmp_path):
    normal_life(world)
    a = world.a
    a.apply(world.vb[3].cose, T0 + 8 * DAY, check_window=False)  # B's voucher, on A
    a.apply(world.forge(A, 9, 1000, issued=T0 + 1), T0 + 9 * DAY)  # other bytes, seq 9
    res = run(world, a.receipts + world.b.receipts, tmp_path)
    assert found(res) == [("device_mismatch", A, 8), ("ref_mismatch", A, 9)]
    st = statuses(world)
    assert st[(B, 4)] == "outstanding" and st[(A, 9)] == "outstanding"


def test_everything_at_once_is_stable_across_runs(world, tmp_path):
    raws = normal_life(world)
    a = world.a
    a.apply(world.forge(A, 20, 2500), T0 + 8 * DAY)
    a.apply(world.va[2].cose, T0 + 9 * DAY, check_window=False)  # first at receipt 2
    bad = bytearray(raws[1])
    bad[-1] ^= 1
    raws = [bytes(bad)] + raws[2:] + a.receipts[8:]
    res1 = run(world, raws, tmp_path)
    assert found(res1) == [("applied_twice", A, 9), ("bad_signature", A, 1),
                           ("chain_gap", A, 0), ("not_issued", A, 8)]
    dump1 = _results(world)
    res2 = reconcile.reconcile(world.conn, now=NOW)
    assert [a.row() for a in res2.anomalies] == [a.row() for a in res1.anomalies]
    assert _results(world) == dump1


def _results(w):
    return (w.conn.execute("SELECT * FROM voucher_status ORDER BY device, sequence").fetchall(),
            w.conn.execute("SELECT * FROM anomalies ORDER BY id").fetchall())


# --- statuses: stale, expired, void -----------------------------------------------

def test_stale_expired_and_void(tmp_path):
    w = World(tmp_path / "topup.db", a_count=80, b_count=4, b_expires_days=5)
    try:
        a, b = w.a, w.b
        for i in range(3):
            a.apply(w.va[i].cose, T0 + DAY + i)
        jump = a.apply(w.va[79].cose, T0 + 2 * DAY)    # highest 80: window is 16..79
        b.apply(w.vb[0].cose, T0 + DAY)
        # A second key issues one more voucher to B; the first key is then revoked.
        keystore.new_key(w.conn, PASS, activate=True, now=T0)
        from host import issuer
        signer2 = keystore.unlock_active(w.conn, PASS)
        late = issuer.issue(w.conn, signer2, B, 700, 1, now=T0 + 3 * DAY)[0]
        keystore.revoke(w.conn, w.signer.kid, now=T0 + 4 * DAY)
        res = run(w, a.receipts + b.receipts, tmp_path, now=T0 + 6 * DAY)
        assert res.anomalies == []
        st = statuses(w)
        # Revoked key: never-redeemed vouchers are void; redeemed ones stay redeemed.
        assert st[(A, 1)] == "redeemed" and st[(A, 80)] == "redeemed"
        assert {st[(A, s)] for s in range(4, 80)} == {"void"}
        assert {st[(B, s)] for s in range(2, 5)} == {"void"}
        assert st[(B, late.sequence)] == "outstanding"

        # Without the revocation: stale below the window, expired past expiry.
        w.conn.execute("UPDATE keys SET revoked = NULL WHERE kid = ?", (w.signer.kid,))
        res = reconcile.reconcile(w.conn, now=T0 + 6 * DAY)
        st = statuses(w)
        assert {st[(A, s)] for s in range(4, 16)} == {"stale"}    # 4..15 < 80 - 64
        assert {st[(A, s)] for s in range(16, 80)} == {"outstanding"}
        assert {st[(B, s)] for s in range(2, 5)} == {"expired"}
        assert res.count == {"redeemed": 5, "stale": 12, "outstanding": 65, "expired": 3,
                             "void": 0}
        assert res.refunds_due == 12 * 1000 + 3 * 500
        closed = w.conn.execute("SELECT closed_at FROM voucher_status WHERE device = ? AND "
                                "sequence = 4", (A,)).fetchone()[0]
        assert closed == pr.parse(jump).time  # stale since the receipt that moved the window
        res = reconcile.reconcile(w.conn, now=T0 + 6 * DAY, expired_policy="void")
        assert res.refunds_due == 12 * 1000
        # Before expiry, B's are outstanding.
        reconcile.reconcile(w.conn, now=T0 + 4 * DAY)
        assert statuses(w)[(B, 2)] == "outstanding"
    finally:
        w.close()


# --- import: idempotent, atomic ----------------------------------------------------

def test_import_twice_changes_nothing(world, tmp_path):
    raws = normal_life(world)
    path = tmp_path / "r.cbor"
    receipts_io.write_receipts(path, raws)
    res = reconcile.import_files(world.conn, [path])
    assert (res.total, res.new) == (10, 10)
    before = snapshot(world.path)
    res = reconcile.import_files(world.conn, [path, path])
    assert (res.total, res.new, res.duplicates) == (20, 0, 20)
    assert snapshot(world.path) == before
    # The same receipts in the other format, and a file with a duplicate inside.
    jpath = tmp_path / "r.jsonl"
    receipts_io.write_receipts(jpath, raws + raws[:3], fmt="jsonl")
    assert reconcile.import_files(world.conn, [jpath]).new == 0
    assert snapshot(world.path) == before


def test_truncated_file_is_reported_and_nothing_applied(world, tmp_path):
    raws = normal_life(world)
    good = tmp_path / "good.cbor"
    receipts_io.write_receipts(good, raws[:5])
    reconcile.import_files(world.conn, [good])
    before = snapshot(world.path)
    data = receipts_io.encode_cbor(raws)
    offsets = [0]
    for r in raws:
        offsets.append(offsets[-1] + 2 + len(r))
    cut = tmp_path / "cut.cbor"
    cut.write_bytes(data[:offsets[7] + 40])  # inside item 8
    with pytest.raises(receipts_io.ReceiptFileError) as e:
        reconcile.import_files(world.conn, [good, cut])
    assert e.value.item == 8 and e.value.offset == offsets[7]
    assert "truncated" in str(e.value) and "nothing imported" in str(e.value)
    cut.write_bytes(data[:offsets[7] + 1])  # inside item 8's length
    with pytest.raises(receipts_io.ReceiptFileError, match="item 8, byte %d" % offsets[7]):
        reconcile.import_files(world.conn, [cut])
    assert snapshot(world.path) == before


def test_corrupt_items_are_reported_and_nothing_applied(world, tmp_path):
    raws = normal_life(world)
    before = snapshot(world.path)
    data = bytearray(receipts_io.encode_cbor(raws))
    off3 = sum(2 + len(r) for r in raws[:3])
    bad = bytearray(data)
    bad[off3 + 2 + 20] = 0xFF  # inside item 4's payload: not deterministic CBOR
    path = tmp_path / "bad.cbor"
    path.write_bytes(bytes(bad))
    with pytest.raises(receipts_io.ReceiptFileError) as e:
        reconcile.import_files(world.conn, [path])
    assert (e.value.item, e.value.offset) == (4, off3)
    assert "not a valid receipt" in str(e.value)
    path.write_bytes(bytes(data) + b"\x01\x02")  # garbage after the last item
    with pytest.raises(receipts_io.ReceiptFileError, match="item 11, byte %d" % len(data)):
        reconcile.import_files(world.conn, [path])
    path.write_bytes(b'{"cose_base64": "AAAA"}\nnot json\n')
    with pytest.raises(receipts_io.ReceiptFileError, match="line 2, byte 24: not a JSON"):
        reconcile.import_files(world.conn, [path])
    path.write_bytes(b'{"cose_base64": "AAAA"}\n')
    with pytest.raises(receipts_io.ReceiptFileError, match="line 1, byte 0: not a valid"):
        reconcile.import_files(world.conn, [path])
    assert snapshot(world.path) == before


def test_bare_cose_items_are_accepted(world, tmp_path):
    raws = normal_life(world)
    path = tmp_path / "bare.cbor"
    path.write_bytes(b"".join(raws))  # as `topup issue --format cbor` writes vouchers
    assert [r.raw for r in receipts_io.read_file(path)] == raws
    path.write_bytes(b"".join(raws)[:-10])
    with pytest.raises(receipts_io.ReceiptFileError, match="item 10"):
        receipts_io.read_file(path)


def _unsigned_receipts(device, n):
    """n chained emergency-credit receipts with dummy signatures, quickly: from a meter
    that is not registered, so the import keeps them without checking signatures."""
    kid = bytes(8)
    out, prev = [], pr.GENESIS
    for i in range(n):
        raw = pr.encode(kid, lambda msg: bytes(64), {
            pr.K_DEVICE: device, pr.K_INDEX: i, pr.K_KIND: pr.EMERGENCY, pr.K_TIME: T0 + i,
            pr.K_PREV: prev, pr.K_BEFORE: -i, pr.K_AFTER: -i, pr.K_AMOUNT: 100})
        out.append(raw)
        prev = pr.chain_hash(raw)
    return out


def test_kill_during_import_leaves_before_or_all(tmp_path):
    """A real process importing a big file is SIGKILLed inside its transaction (once its
    writes have started spilling into the WAL) and at other points: the database holds
    none of the file or all of it, never part, and is intact."""
    import signal
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dbp = str(tmp_path / "topup.db")
    World(dbp, a_count=1, b_count=1).close()
    n = 30000
    path = tmp_path / "big.cbor"
    receipts_io.write_receipts(path, _unsigned_receipts(C, n))
    env = dict(os.environ, TOPUP_DB=dbp, PYTHONPATH=root)
    wal = dbp + "-wal"
    outcomes = []
    for when in ("wal", 0.2, "wal", None):
        base = os.path.getsize(wal) if os.path.exists(wal) else 0
        p = subprocess.Popen([sys.executable, "-m", "host.cli", "receipts", "import",
                              str(path)], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        killed_inside = False
        if when == "wal":  # the transaction is writing: pages spill into the WAL
            deadline = time.monotonic() + 60
            while p.poll() is None and time.monotonic() < deadline:
                if os.path.exists(wal) and os.path.getsize(wal) > base + (1 << 20):
                    p.send_signal(signal.SIGKILL)
                    killed_inside = True
                    break
                time.sleep(0.002)
        elif when is not None:
            time.sleep(when)
            p.send_signal(signal.SIGKILL)
        p.communicate()
        c = sqlite3.connect(dbp, timeout=10)
        try:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = c.execute("SELECT count(*) FROM receipts").fetchone()[0]
            batches = c.execute("SELECT count(*) FROM imports").fetchone()[0]
        finally:
            c.close()
        assert (stored, batches) in ((0, 0), (n, 1)), (when, stored, batches)
        outcomes.append((when, killed_inside, stored))
        if stored:
            break
    assert outcomes[-1][2] == n  # the unkilled run imported everything
    assert any(k and s == 0 for _, k, s in outcomes), outcomes  # a kill landed mid-write


def test_cli_import_reconcile_exit_codes(tmp_path):
    from click.testing import CliRunner
    from host.cli import cli
    w = World(tmp_path / "topup.db")
    raws = normal_life(w)
    w.close()
    path = tmp_path / "r.cbor"
    receipts_io.write_receipts(path, raws)
    env = {"TOPUP_DB": str(tmp_path / "topup.db")}

    def topup(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    r = topup("receipts", "import", path)
    assert r.exit_code == 0, r.output
    assert "10 receipts, 10 new, 0 already stored" in r.stdout
    r = topup("receipts", "import", path)
    assert "10 receipts, 0 new, 10 already stored" in r.stdout
    r = topup("reconcile", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert "no anomalies" in r.stdout and "£55.00" in r.stdout
    bad = bytearray(raws[2])
    bad[-3] ^= 4
    receipts_io.write_receipts(path, [bytes(bad)])
    topup("receipts", "import", path)
    r = topup("reconcile", "--now", NOW)
    assert r.exit_code == 1
    assert "bad_signature" in r.stdout
    path.write_bytes(receipts_io.encode_cbor(raws)[:100])
    r = topup("receipts", "import", path)
    assert r.exit_code == 1
    assert "item 1, byte 0" in r.stderr and "nothing imported" in r.stderr
    assert "Traceback" not in r.output
    r = topup("receipts", "import", tmp_path / "missing.cbor")
    assert r.exit_code == 2 and "cannot read" in r.stderr
    out = tmp_path / "export.cbor"
    r = topup("receipts", "export", out, "--device", "70-B3-D5-F0-00-00-00-B2")
    assert r.exit_code == 0
    assert [x.raw for x in receipts_io.read_file(out)] == w.b.receipts


# --- the fast receipt parser agrees with the strict generic one ----------------------

def test_fast_parser_matches_generic_parser(world):
    from hypothesis import given, settings, strategies as st
    from protocol.errors import Rejected
    raws = normal_life(world)
    raws.append(world.a.make(pr.TOPUP, 2**40, -2**40, 2**63, index=2**32 + 5,
                             sequence=2**31, voucher=bytes(16), amount=2**20))
    # fault receipts (kind 4) and rejections (kind 3) with small and big counts maps
    raws.append(world.a.make(pr.FAULT, 7, -5, -5, faults={1: 2, 4: 1}))
    raws.append(world.a.make(pr.FAULT, 2**33, 2**40, 2**40, index=2**20, faults={}))
    raws.append(world.a.make(pr.FAULT, 8, 0, 0, faults={k: 2**k for k in range(1, 6)}))
    raws.append(world.a.make(pr.REJECTIONS, 9, 3, 3, rejections={k: k for k in range(30)}))
    # issue 11: a top-up's form (13) and supply state (14), emergency credit's supply state
    raws.append(world.a.make(pr.TOPUP, 10, 0, 5000, sequence=3, voucher=bytes(16), amount=5,
                             form=2, supply=1))
    raws.append(world.a.make(pr.TOPUP, 11, 0, 5000, sequence=4, voucher=bytes(16), amount=5,
                             form=1))
    raws.append(world.a.make(pr.TOPUP, 12, 0, 5000, sequence=5, voucher=bytes(16), amount=5,
                             supply=0))
    raws.append(world.a.make(pr.EMERGENCY, 13, 0, 0, amount=500, supply=2))
    names = ("device", "index", "kind", "time", "prev", "before", "after", "sequence", "ref",
             "amount", "rejections", "faults", "form", "supply", "kid", "tbs", "sig")

    def check(raw):
        fast = receipts_io.fast_parse(raw)
        try:
            slow = pr.parse(raw)
        except Rejected:
            assert fast is None
            return
        if fast is not None:
            from protocol import cose
            msg = cose.decode(raw)
            assert [getattr(fast, n) for n in names] == [
                slow.device, slow.index, slow.kind, slow.time, slow.prev, slow.balance_before,
                slow.balance_after, slow.sequence, slow.voucher, slow.amount, slow.rejections,
                slow.faults, slow.form, slow.supply, msg.kid, msg.to_be_signed(),
                msg.signature]
    for raw in raws:
        check(raw)
        # every kind in the meter's layout takes the fast path (a counts map of 24 entries
        # or more too, while the payload stays under 256 bytes)
        assert receipts_io.fast_parse(raw) is not None
        check(raw[1:])  # untagged

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from(raws), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)),
                                           min_size=1, max_size=3),
           st.integers(0, 3))
    def mutate(raw, edits, cut):
        b = bytearray(raw)
        for pos, val in edits:
            b[pos % len(b)] = val
        check(bytes(b[:len(b) - cut]))
    mutate()


def test_file_rows_match_item_by_item_parsing(world):
    """receipts_io.parse_rows (file bytes straight to rows, what import_files uses) gives
    the rows of parse_items' receipts, or the same ReceiptFileError, for any file."""
    from hypothesis import given, settings, strategies as st
    raws = normal_life(world)
    raws.append(world.a.make(pr.TOPUP, 2**40, -2**40, 2**63, index=2**32 + 5,
                             sequence=2**31, voucher=bytes(16), amount=2**20))
    raws.append(world.a.make(pr.EMERGENCY, 5, -7, -7, amount=1))
    raws.append(world.a.make(pr.FAULT, 6, -7, -7, faults={3: 1, 5: 300}))
    raws.append(world.a.make(pr.TOPUP, 7, 0, 5000, sequence=3, voucher=bytes(16), amount=5,
                             form=2, supply=1))                       # issue 11: fields 13, 14
    raws.append(world.a.make(pr.EMERGENCY, 8, -7, -7, amount=1, supply=2))

    def outcome(fn, data):
        try:
            return fn(data)
        except receipts_io.ReceiptFileError as e:
            return str(e)

    def check(data):
        rows = outcome(receipts_io.parse_rows, data)
        items = outcome(receipts_io.parse_items, data)
        if isinstance(items, str):
            assert rows == items
            return
        assert rows == [receipts_io.row_of(r) for r in items]
        for row, r in zip(rows, items):
            assert row[receipts_io.ROW_HASH] == r.hash == pr.chain_hash(r.raw)
            assert isinstance(row[receipts_io.ROW_DEVICE], bytes)
    whole = receipts_io.encode_cbor(raws)
    check(whole)
    assert len(receipts_io.parse_rows(whole)) == len(raws)
    check(b"".join(raws))  # bare COSE items
    check(b"".join(receipts_io.encode_cbor([r]) if i % 2 else r for i, r in enumerate(raws)))
    check(receipts_io.encode_jsonl(raws))

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.sampled_from(raws), min_size=1, max_size=4),
           st.lists(st.tuples(st.integers(0, 1200), st.integers(0, 255)), max_size=3),
           st.integers(0, 3), st.booleans())
    def mutate(picked, edits, cut, bare):
        b = bytearray(b"".join(picked) if bare else receipts_io.encode_cbor(picked))
        for pos, val in edits:
            b[pos % len(b)] = val
        check(bytes(b[:len(b) - cut]))
    mutate()


# --- schema migration --------------------------------------------------------------

def test_version_1_database_is_upgraded_in_place(tmp_path):
    path = str(tmp_path / "v1.db")
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode = WAL")
    for stmt in db._statements(db.SCHEMA):
        c.execute(stmt)
    c.execute("PRAGMA application_id = %d" % db.APPLICATION_ID)
    c.execute("PRAGMA user_version = 1")
    c.execute("INSERT INTO devices (device, max_voucher, max_credit, created) "
              "VALUES (?, 100, 100, 1)", (A,))
    c.close()
    conn = db.open_db(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"receipts", "voucher_status", "anomalies", "reconciliations",
                "device_keys"} <= tables
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 1
        res = reconcile.reconcile(conn, now=NOW)
        assert res.anomalies == [] and res.vouchers == 0
    finally:
        conn.close()
    db.open_db(path).close()  # opening again is a no-op


def test_reconcile_policy_checked():
    with pytest.raises(ValueError):
        reconcile.reconcile(None, expired_policy="maybe")
    assert issubclass(receipts_io.ReceiptFileError, TopupError)
