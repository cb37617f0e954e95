# Key epochs (SPEC.md §2.2, §4): a factory reset gives the meter a new key whose receipts
# continue the index and start a new chain, and a sequence floor that refuses every voucher
# issued before it. The supplier keeps every key with its span, so receipts from before a
# reset still verify and stay redeemed, and vouchers the reset meter refuses are stale
# (refund due), not outstanding. Also: fault receipts (kind 4), the registry's rules, and
# the upgrade of a version-2 database.
import json
import sqlite3

import pytest

from host import db, issuer, keystore, reconcile, receipts_io, registry
from host.errors import TopupError
from protocol import receipt as pr, voucher as pv
from protocol.cose import kid_for

from .test_reconcile_data import A, B, DAY, PASS, T0, World, normal_life

NOW = T0 + 20 * DAY
RESET_AT = T0 + 9 * DAY


@pytest.fixture
def world(db_target):
    w = World(db_target)
    yield w
    w.close()


def _import(w, raws, tmp_path, name="r.cbor"):
    path = tmp_path / name
    receipts_io.write_receipts(path, raws)
    return reconcile.import_files(w.conn, [path])


def _found(res):
    return sorted((a.kind, a.device, a.index) for a in res.anomalies)


def _status(w, device):
    return {s: st for s, st in w.conn.execute(
        "SELECT sequence, status FROM voucher_status WHERE device = ?", (device,))}


def _reset(w, seed_byte=0xA7, opening=0, register=True, now=RESET_AT):
    """Factory-reset and re-provision meter A as `topup provision --factory-reset` does:
    the supplier passes its highest issued sequence; the new key is registered with the
    figures the meter reports."""
    a = w.a
    floor = a.reset(seed_byte, floor=registry.issued_floor(w.conn, A), opening=opening)
    key = registry.MeterKey(a.public, a.first_index, floor)
    if register:
        registry.set_public_key(w.conn, A, key, now=now)
    return key


def test_reset_meter_old_receipts_stay_verified_and_redeemed(world, tmp_path):
    """Issue 8, defect 1: after a factory reset the pre-reset receipts verify with the old
    key and stay redeemed; the new ones verify with the new key; no anomaly at all."""
    w, a = world, world.a
    raws = normal_life(w)                          # A: receipts 0-7, vouchers 1-6 applied
    old_kid = a.kid
    key = _reset(w, opening=250)                   # floor 10: every voucher issued so far
    assert (key.first_index, key.floor) == (8, 10)
    fresh = issuer.issue(w.conn, w.signer, A, 1500, 3, now=RESET_AT)
    assert [v.sequence for v in fresh] == [11, 12, 13]
    a.apply(fresh[0].cose, RESET_AT + 3600)
    a.use(20_000)
    a.apply(fresh[1].cose, RESET_AT + 7200)
    raws += a.receipts[8:]
    _import(w, raws, tmp_path)
    res = reconcile.reconcile(w.conn, now=NOW)
    assert res.anomalies == []
    st = _status(w, A)
    assert [st[s] for s in range(1, 7)] == ["redeemed"] * 6
    assert [st[s] for s in range(7, 11)] == ["stale"] * 4    # refused by the reset meter
    assert [st[s] for s in (11, 12, 13)] == ["redeemed", "redeemed", "outstanding"]
    assert res.liability == 1500 + 3 * 500                   # A's 13, B's 3-5
    assert res.refunds_due == 4 * 1000
    checked = dict(w.conn.execute("SELECT idx, checked_kid FROM receipts WHERE device = ? "
                                  "AND sig_ok = 1", (A,)).fetchall())
    assert sorted(checked) == list(range(10))
    assert {checked[i] for i in range(8)} == {old_kid}
    assert {checked[i] for i in (8, 9)} == {kid_for(a.public)}
    # the new epoch starts a new chain: its first receipt's prev is zero
    assert pr.parse(a.receipts[8]).prev == pr.GENESIS


def test_vouchers_issued_before_a_reset_are_stale_with_a_reason(world, tmp_path):
    w, a = world, world.a
    a.apply(w.va[0].cose, T0 + DAY)
    _reset(w)
    _import(w, a.receipts, tmp_path)
    res = reconcile.reconcile(w.conn, now=NOW)
    assert res.anomalies == []
    rows = w.conn.execute("SELECT sequence, status, closed_at, note FROM voucher_status WHERE "
                          "device = ? ORDER BY sequence", (A,)).fetchall()
    assert rows[0][:2] == (1, "redeemed")
    for seq, status, closed, note in rows[1:]:
        assert status == "stale" and closed == RESET_AT
        assert "refused by the meter after its factory reset" in note
        assert "every sequence up to 10" in note
    # B was never reset: its vouchers are still outstanding
    assert set(_status(w, B).values()) == {"outstanding"}
    # the next voucher issued is above the floor, and outstanding
    v = issuer.issue(w.conn, w.signer, A, 100, 1, now=NOW)[0]
    assert v.sequence == 11
    reconcile.reconcile(w.conn, now=NOW)
    assert _status(w, A)[11] == "outstanding"


def test_the_reset_floor_and_the_replay_window_both_explain_a_stale_voucher(tmp_path):
    w = World(tmp_path / "topup.db", a_count=80)
    try:
        a = w.a
        a.apply(w.va[79].cose, T0 + DAY)         # highest 80: 1-15 below the window
        _reset(w)
        _import(w, a.receipts, tmp_path)
        reconcile.reconcile(w.conn, now=NOW)
        closed, note = w.conn.execute("SELECT closed_at, note FROM voucher_status WHERE "
                                      "device = ? AND sequence = 3", (A,)).fetchone()
        assert closed == T0 + DAY                # the window moved first
        assert "replay window since receipt 0 applied sequence 80" in note
        assert "factory reset" in note
    finally:
        w.close()


def test_one_voucher_applied_before_and_after_a_reset_is_applied_twice(world, tmp_path):
    """A meter that took a voucher again after its reset (what the floor prevents) is named:
    the voucher stays redeemed by its first receipt."""
    w, a = world, world.a
    first = a.apply(w.va[0].cose, T0 + DAY)
    a.apply(w.va[2].cose, T0 + DAY + 60)
    _reset(w)
    a.floor = 0                                   # an old firmware: no floor after reset
    again = a.apply(w.va[0].cose, RESET_AT + 60)
    a.apply(w.va[2].cose, RESET_AT + 120)
    _import(w, a.receipts, tmp_path)
    res = reconcile.reconcile(w.conn, now=NOW)
    assert _found(res) == [("applied_twice", A, 2), ("applied_twice", A, 3)]
    assert "before the meter's key epoch 2" in res.anomalies[0].detail
    row = w.conn.execute("SELECT status, receipt FROM voucher_status WHERE device = ? AND "
                         "sequence = 1", (A,)).fetchone()
    assert row == ("redeemed", pr.chain_hash(first))
    assert pr.parse(again).index == 2


def test_new_key_registered_after_its_receipts_were_imported(world, tmp_path):
    """Receipts pushed before the supplier registered the new key fail with the old one;
    registering the key re-checks them with the key of their span."""
    w, a = world, world.a
    a.apply(w.va[0].cose, T0 + DAY)
    key = _reset(w, register=False)
    v = issuer.issue(w.conn, w.signer, A, 700, 1, now=RESET_AT)[0]
    a.apply(v.cose, RESET_AT + 60)
    res = _import(w, a.receipts, tmp_path)
    assert res.bad == 1
    assert _found(reconcile.reconcile(w.conn, now=NOW)) == [("bad_signature", A, 1)]
    registry.set_public_key(w.conn, A, key, now=RESET_AT)
    res = reconcile.reconcile(w.conn, now=NOW)
    assert res.anomalies == []
    assert _status(w, A)[v.sequence] == "redeemed"


def test_epoch_boundary_rules(world, tmp_path):
    """Each span is one chain: its first receipt starts a new one (prev zero), a receipt
    signed with the old key inside the new span does not verify, and a receipt missing
    just before the boundary is a gap."""
    w, a = world, world.a
    for i in range(3):
        a.apply(w.va[i].cose, T0 + DAY + i)          # 0, 1, 2
    old = (a.key, a.kid, a.prev)
    _reset(w)
    v = issuer.issue(w.conn, w.signer, A, 300, 3, now=RESET_AT)
    r3 = a.apply(v[0].cose, RESET_AT + 1)
    a.apply(v[1].cose, RESET_AT + 2)                 # 4
    good = list(a.receipts)
    # a receipt 3 that continues the old chain instead of starting a new one
    p3 = pr.parse(r3)
    forked = a.make(pr.TOPUP, p3.time, p3.balance_before, p3.balance_after, index=3,
                    prev=old[2], sequence=p3.sequence, voucher=p3.voucher, amount=p3.amount)
    # receipt 5 signed with the old key (a meter that kept it, or a forgery)
    new = (a.key, a.kid)
    a.key, a.kid = old[0], old[1]
    stray = a.make(pr.EMERGENCY, RESET_AT + 3, a.balance, a.balance, index=5, amount=500)
    a.key, a.kid = new
    raws = good[:2] + [forked, good[4], stray]       # receipt 2 dropped: a gap
    _import(w, raws, tmp_path)
    res = reconcile.reconcile(w.conn, now=NOW)
    # (receipt 4 follows the genuine receipt 3, not the forked one)
    assert _found(res) == [("bad_signature", A, 5), ("chain_fork", A, 3), ("chain_fork", A, 4),
                           ("chain_gap", A, 2)]
    fork = [x for x in res.anomalies if x.kind == "chain_fork"][0]
    assert "does not start a chain" in fork.detail and "key epoch 2" in fork.detail
    bad = [x for x in res.anomalies if x.kind == "bad_signature"][0]
    assert "key epoch 2, receipts from 3" in bad.detail
    # the genuine receipts fill the gap and start the epoch properly
    _import(w, good, tmp_path, "good.cbor")
    res = reconcile.reconcile(w.conn, now=NOW)
    # the forgeries stay: two signed receipts at 3, one of which starts no chain
    assert _found(res) == [("bad_signature", A, 5), ("chain_fork", A, 3), ("chain_fork", A, 3)]


def test_receipts_of_the_old_key_never_received_are_a_gap(world, tmp_path):
    """The new key's chain is whole, but none of the old key's receipts arrived: the gap
    before the boundary is named (the chain runs from the first key's first index)."""
    w, a = world, world.a
    for i in range(3):
        a.apply(w.va[i].cose, T0 + DAY + i)
    _reset(w)
    v = issuer.issue(w.conn, w.signer, A, 300, 2, now=RESET_AT)
    a.apply(v[0].cose, RESET_AT + 1)
    a.apply(v[1].cose, RESET_AT + 2)
    _import(w, a.receipts[3:], tmp_path)
    res = reconcile.reconcile(w.conn, now=NOW)
    assert _found(res) == [("chain_gap", A, 0)]
    assert "indices 0-2 missing (3 receipts)" in res.anomalies[0].detail


def test_balance_is_not_carried_across_a_reset(world, tmp_path):
    """A new epoch starts a new ledger at its opening credit: no balance_rise at the
    boundary, but balance rules hold inside it."""
    w, a = world, world.a
    a.apply(w.va[0].cose, T0 + DAY)
    a.use(900_000)                                   # £1 left
    _reset(w, opening=5000)                          # £50 opening credit
    a.emergency(500, RESET_AT + 10)
    _import(w, a.receipts, tmp_path)
    assert reconcile.reconcile(w.conn, now=NOW).anomalies == []


def test_receipts_before_the_first_key_are_not_verified(tmp_path):
    """A meter provisioned from this database for the first time with receipts already
    counted (a carry from an earlier life): its first key's span starts at its first
    receipt, and anything older is kept but not verified."""
    w = World(tmp_path / "topup.db")
    try:
        d = bytes.fromhex("70b3d5f0000000d4")
        registry.add_device(w.conn, d, now=T0)
        vs = issuer.issue(w.conn, w.signer, d, 300, 2, now=T0)
        from .test_reconcile_data import Meter
        m = Meter(d, 0xD4)
        m.emergency(500, T0)                         # index 0, from an earlier life
        m.reset(0xD5)
        registry.set_public_key(w.conn, d, registry.MeterKey(m.public, m.first_index, 0),
                                now=T0)
        m.apply(vs[0].cose, T0 + DAY)
        _import(w, m.receipts, tmp_path)
        res = reconcile.reconcile(w.conn, now=NOW)
        assert _found(res) == [("no_device_key", d, 0)]
        assert "come before the first meter key registered" in res.anomalies[0].detail
        assert _status(w, d) == {1: "redeemed", 2: "outstanding"}
        m2 = w.conn.execute("SELECT count(*) FROM receipts WHERE device = ? AND sig_ok IS NULL",
                            (d,)).fetchone()
        assert m2 == (1,)
    finally:
        w.close()


# --- fault receipts (kind 4) ---------------------------------------------------------

def test_fault_receipts_import_verify_chain_and_show(world, tmp_path):
    w, a = world, world.a
    a.apply(w.va[0].cose, T0 + DAY)
    a.faults({1: 2, 4: 1}, T0 + DAY + 60)            # receipt 1
    a.apply(w.va[1].cose, T0 + 2 * DAY)              # follows the fault receipt
    a.faults({}, T0 + 3 * DAY)                       # nothing found: no anomaly
    res = _import(w, a.receipts, tmp_path)
    assert (res.new, res.bad) == (4, 0)
    row = w.conn.execute("SELECT kind, faults, rejections, sig_ok, balance_before = "
                         "balance_after FROM receipts WHERE device = ? AND idx = 1",
                         (A,)).fetchone()
    assert row == (4, '{"1": 2, "4": 1}', None, 1, 1)
    out = reconcile.reconcile(w.conn, now=NOW)
    assert _found(out) == [("meter_fault", A, 1)]
    detail = out.anomalies[0].detail
    assert "2 × record repaired (one bit was wrong) [1]" in detail
    assert "1 × committed receipt lost [4]" in detail
    assert _status(w, A)[2] == "redeemed"
    # the reports show it
    from host import report
    s = report.load(w.conn)
    assert s.by_kind == {"meter_fault": 1}
    paths = report.write_csv(s, str(tmp_path / "r.csv"))
    assert "meter_fault" in open(paths[1]).read()
    assert "flash damage" in report.render_html(s)


def test_a_fault_receipt_that_moves_the_balance_is_an_anomaly(world, tmp_path):
    w, a = world, world.a
    a.apply(w.va[0].cose, T0 + DAY)
    a.emit(pr.FAULT, T0 + DAY + 5, a.balance, a.balance + 1000, faults={2: 1})
    _import(w, a.receipts, tmp_path)
    res = reconcile.reconcile(w.conn, now=NOW)
    assert _found(res) == [("balance_rise", A, 1), ("meter_fault", A, 1)]
    assert "fault receipt changed the balance" in [x for x in res.anomalies
                                                   if x.kind == "balance_rise"][0].detail


def test_fast_parser_takes_fault_and_rejection_receipts(world):
    a = world.a
    for counts in ({}, {1: 1}, {5: 2**40, 1: 0, 3: 24}):
        raw = a.faults(counts, T0)
        r = receipts_io.fast_parse(raw)
        assert r is not None and r.kind == 4 and r.faults == counts and r.rejections is None
        raw = a.rejections(counts, T0)
        r = receipts_io.fast_parse(raw)
        assert r is not None and r.kind == 3 and r.rejections == counts and r.faults is None
    rows = receipts_io.parse_rows(receipts_io.encode_cbor(a.receipts))
    assert [json.loads(row[receipts_io.ROW_COUNTS]) for row in rows] == [
        {}, {}, {"1": 1}, {"1": 1}, {"1": 0, "3": 24, "5": 2**40},
        {"1": 0, "3": 24, "5": 2**40}]


# --- the registry's rules ----------------------------------------------------------------

def test_registering_key_epochs(world):
    w, a = world, world.a
    old = a.public
    assert [(e.epoch, e.first_index, e.floor) for e in registry.device_keys(w.conn, A)] == [(1, 0, 0)]
    # the current key again: nothing changes
    registry.set_public_key(w.conn, A, old)
    assert len(registry.device_keys(w.conn, A)) == 1
    with pytest.raises(TopupError, match="already registered"):
        registry.set_public_key(w.conn, A, old, first_index=5)
    a.reset(0xA8)
    d = registry.set_public_key(w.conn, A, registry.MeterKey(a.public, 7, 40), now=T0)
    assert d.public_key == a.public and d.key_count == 2
    assert d.next_sequence == 41                  # vouchers issued from now apply
    assert [(e.epoch, e.kid, e.first_index, e.floor, e.provisioned)
            for e in registry.device_keys(w.conn, A)] == [
        (1, kid_for(old), 0, 0, T0 - DAY), (2, kid_for(a.public), 7, 40, T0)]
    with pytest.raises(TopupError, match="before: a provisioning always makes a new key"):
        registry.set_public_key(w.conn, A, old, first_index=9)
    a.reset(0xA9)
    with pytest.raises(TopupError, match="receipt indices never go back"):
        registry.set_public_key(w.conn, A, a.public, first_index=6)
    # the span of an index
    epochs = registry.device_keys(w.conn, A)
    assert [registry.span_key(epochs, i).epoch for i in (0, 6, 7, 100)] == [1, 1, 2, 2]


def test_next_first_index_counts_only_verified_receipts(world, tmp_path):
    """A forged receipt at a huge index (anyone on the WAN link can push one) must not move
    where the next key's receipts start."""
    w, a = world, world.a
    assert registry.next_first_index(w.conn, A) == 0
    for i in range(3):
        a.apply(w.va[i].cose, T0 + DAY + i)
    forged = bytearray(a.make(pr.EMERGENCY, T0, 0, 0, index=2**32 + 7, amount=1))
    forged[-1] ^= 1
    _import(w, a.receipts + [bytes(forged)], tmp_path)
    assert registry.next_first_index(w.conn, A) == 3
    assert registry.issued_floor(w.conn, A) == 10


def test_device_show_and_list_count_the_keys(world, tmp_path):
    from click.testing import CliRunner
    from host.cli import cli
    w, a = world, world.a
    a.reset(0xAB)
    registry.set_public_key(w.conn, A, registry.MeterKey(a.public, 12, 10), now=T0)
    env = {"TOPUP_DB": w.path}
    r = CliRunner().invoke(cli, ["device", "show", "70-B3-D5-F0-00-00-00-A1"], env=env)
    assert r.exit_code == 0, r.output
    assert "meter keys           2" in r.stdout
    assert "key epoch 1  kid %s, receipts 0-11, sequence floor 0" % kid_for(w.a.public).hex() \
        not in r.stdout                          # (the first key is not a's current one)
    assert "receipts 0-11, sequence floor 0" in r.stdout
    assert "kid %s, receipts from 12, sequence floor 10" % a.kid.hex() in r.stdout
    r = CliRunner().invoke(cli, ["device", "list"], env=env)
    assert r.exit_code == 0
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("70-B3-D5-F0-00-00-00-A1")][0]
    assert " 2 " in line


# --- schema version 2 -> 3 ---------------------------------------------------------------

def _v2_database(path, w_raws_by_device):
    """A version-2 database as the previous release left it: a key, devices with their
    meter key in devices.public_key, vouchers, and imported, verified receipts."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode = WAL")
    for stmt in db._statements(db.SCHEMA) + db._statements(db.SCHEMA_V2):
        c.execute(stmt)
    c.execute("PRAGMA application_id = %d" % db.APPLICATION_ID)
    c.execute("PRAGMA user_version = 2")
    keystore.new_key(c, PASS, seed=bytes(range(32)), now=T0 - DAY)
    signer = keystore.unlock_active(c, PASS)
    c.execute("INSERT INTO imports (batch, at, source, receipts, new) VALUES (1, ?, 'v2', 0, 0)",
              (T0,))
    vouchers = {}
    for device, (public, count) in w_raws_by_device.items():
        c.execute("INSERT INTO devices (device, public_key, max_voucher, max_credit, "
                  "next_sequence, created) VALUES (?, ?, 10000, 50000, ?, ?)",
                  (device, public, count + 1, T0 - DAY))
        vouchers[device] = []
        for seq in range(1, count + 1):
            raw = pv.encode(signer.kid, signer.sign, device, seq, 1000, T0, None)
            v = pv.parse(raw)
            c.execute("INSERT INTO vouchers (device, sequence, kid, amount, issued, expires, "
                      "ref, cose) VALUES (?, ?, ?, 1000, ?, NULL, ?, ?)",
                      (device, seq, signer.kid, T0, v.ref, raw))
            vouchers[device].append(raw)
    c.close()
    return vouchers


def test_version_2_database_is_upgraded_in_place(tmp_path):
    from .test_reconcile_data import Meter
    path = str(tmp_path / "v2.db")
    a = Meter(A, 0xA1)
    vouchers = _v2_database(path, {A: (a.public, 4), B: (None, 1)})
    for v in vouchers[A][:3]:
        a.apply(v, T0 + DAY)
    c = sqlite3.connect(path, isolation_level=None)
    for raw in a.receipts:                          # stored as the version-2 importer did
        r = pr.parse(raw)
        c.execute("INSERT INTO receipts (device, idx, hash, kind, prev, meter_time, "
                  "balance_before, balance_after, sequence, voucher_ref, amount, raw, batch, "
                  "checked_kid, sig_ok) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, 1)",
                  (A, r.index, r.hash, r.kind, r.prev, r.time, r.balance_before,
                   r.balance_after, r.sequence, r.voucher, r.amount, raw, a.kid))
    c.close()
    conn = db.open_db(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
        assert [(e.device, e.epoch, e.public_key, e.kid, e.first_index, e.floor, e.provisioned)
                for e in registry.device_keys(conn, A)] == [
            (A, 1, a.public, a.kid, 0, 0, T0 - DAY)]
        assert registry.device_keys(conn, B) == []
        assert registry.get_device(conn, A).key_count == 1
        assert {"faults", "checked_kid"} <= {r[1] for r in conn.execute(
            "PRAGMA table_info(receipt_log)")}
        res = reconcile.reconcile(conn, now=NOW)
        assert res.anomalies == [] and res.count["redeemed"] == 3
        assert res.count["outstanding"] == 2
        # and the upgraded database takes a reset like a new one
        floor = a.reset(0xA3, floor=registry.issued_floor(conn, A))
        registry.set_public_key(conn, A, registry.MeterKey(a.public, a.first_index, floor))
        res = reconcile.reconcile(conn, now=NOW)
        assert res.anomalies == [] and res.count["stale"] == 1
    finally:
        conn.close()
    db.open_db(path).close()  # opening again is a no-op
