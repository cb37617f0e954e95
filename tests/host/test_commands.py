# Signed commands on the supplier's side (SPEC.md §10, issue 12): the command key, schema
# v6, numbering, trust, tariff bounds, receipts of kind 5, exposure and the anomaly of a
# voucher applied after its key's revocation. Expectations are computed here from first
# principles (hashlib, PyNaCl, the CBOR bytes), not from host.commands.
import hashlib
import sqlite3

import nacl.signing
import pytest

from host import commands as cmds, db, issuer, keystore, reconcile, registry
from host.errors import TopupError
from protocol import cbor, command as pc, cose, receipt as pr

from .conftest import DEVICE_BYTES, PASSPHRASE

OTHER = bytes.fromhex("aabbccddeeff0011")
NOW = 1_790_000_000


def kid(public):
    return hashlib.sha256(bytes(public)).digest()[:8]


class Meter:
    """A stand-in meter: its receipt key, and receipts it signs in a chain."""

    def __init__(self, device, seed=b"\x07" * 32, first=0):
        self.device = device
        self.sk = nacl.signing.SigningKey(seed)
        self.public = bytes(self.sk.verify_key)
        self.index = first
        self.prev = pr.GENESIS
        self.balance = 0

    def sign(self, msg):
        return self.sk.sign(msg).signature

    def _receipt(self, fields):
        base = {pr.K_DEVICE: self.device, pr.K_INDEX: self.index, pr.K_TIME: NOW + self.index,
                pr.K_PREV: self.prev, pr.K_BEFORE: self.balance}
        base.update(fields)
        raw = pr.encode(kid(self.public), self.sign, base)
        self.prev = hashlib.sha256(raw).digest()
        self.index += 1
        return raw

    def command(self, raw):
        c = pc.parse(raw)
        fields = {pr.K_KIND: 5, pr.K_AFTER: self.balance, pr.K_SEQUENCE: c.number,
                  pr.K_VOUCHER: hashlib.sha256(raw).digest()[:16], 15: c.kind}
        if c.kind == pc.SET_TARIFF:
            fields[16] = dict(c.args)
        return self._receipt(fields)

    def topup(self, voucher_raw, sequence, amount):
        before = self.balance
        self.balance += amount * 1000
        return self._receipt({pr.K_KIND: 1, pr.K_BEFORE: before, pr.K_AFTER: self.balance,
                              pr.K_SEQUENCE: sequence,
                              pr.K_VOUCHER: hashlib.sha256(voucher_raw).digest()[:16],
                              pr.K_AMOUNT: amount})


@pytest.fixture
def conn(db_target):
    c = db.create(db_target)
    yield c
    c.close()


def provisioned(conn, device=DEVICE_BYTES, meter=None, with_command_key=True):
    """Register `device` as a meter provisioned with this database's keys (as `topup
    provision` does): trusts every key not revoked, holds the active command key."""
    if registry.find_device(conn, device) is None:
        registry.add_device(conn, device, 10000, 50000, now=NOW)
    meter = meter or Meter(device)
    ck = keystore.active_command_key(conn) if with_command_key else None
    key = registry.MeterKey(meter.public, meter.index, 0, None, None,
                            None if ck is None else ck.kid)
    registry.set_public_key(conn, device, key, now=NOW)
    return meter


def test_first_key_brings_a_sealed_command_key_and_it_signs_commands(conn):
    k = keystore.new_key(conn, PASSPHRASE, now=NOW)
    ck = keystore.active_command_key(conn)
    assert ck is not None and ck.kid == kid(ck.public_key) and ck.kid != k.kid
    sealed = conn.execute("SELECT sealed_seed FROM command_keys").fetchone()[0]
    signer = keystore.unlock_command_key(conn, PASSPHRASE, ck.kid)
    assert signer.secret64[:32] not in bytes(sealed)
    with pytest.raises(TopupError, match="wrong passphrase"):
        keystore.unlock_command_key(conn, "not it", ck.kid)
    keystore.new_key(conn, PASSPHRASE, now=NOW)       # a second issuer key: same command key
    assert [c.kid for c in keystore.list_command_keys(conn)] == [ck.kid]


def test_activating_a_new_key_adds_it_on_every_meter_that_takes_commands(conn):
    keystore.new_key(conn, PASSPHRASE, now=NOW)
    provisioned(conn)
    provisioned(conn, OTHER, Meter(OTHER, b"\x08" * 32), with_command_key=False)
    k2 = keystore.new_key(conn, PASSPHRASE, now=NOW, activate=True, seed=b"\x02" * 32)
    plan = cmds.plan_add_key(conn, k2.kid, k2.public_key)
    assert [p[0] for p in plan] == [DEVICE_BYTES]     # the other meter takes no commands
    made = cmds.make(conn, PASSPHRASE, plan, now=NOW)
    ck = keystore.active_command_key(conn)
    (m,) = made
    assert m.number == 1
    # The bytes: a COSE_Sign1 under the command key, AAD "OTU1 command v1", payload as SPEC.
    c = pc.verify(m.raw, {ck.kid: ck.public_key}, DEVICE_BYTES)
    assert (c.number, c.kind, c.args) == (1, 1, {1: bytes(nacl.signing.SigningKey(
        b"\x02" * 32).verify_key)})
    msg = cose.decode(m.raw)
    nacl.signing.VerifyKey(ck.public_key).verify(
        cbor.encode(["Signature1", msg.protected, b"OTU1 command v1", msg.payload]),
        msg.signature)
    assert m.ref == hashlib.sha256(m.raw).digest()[:16]
    # Already trusted (pending add counts): no second command.
    assert cmds.plan_add_key(conn, k2.kid, k2.public_key) == []
    # Numbering continues per meter.
    args = cmds.tariff_args(NOW, now=NOW, unit_rate_mp=30000)
    (t,) = cmds.make(conn, PASSPHRASE, cmds.plan_tariff(conn, [DEVICE_BYTES], args), now=NOW)
    assert t.number == 2
    assert [r.number for r in cmds.pending_for(conn, DEVICE_BYTES)] == [1, 2]


def test_a_meter_without_a_command_key_gets_no_command(conn):
    keystore.new_key(conn, PASSPHRASE, now=NOW)
    provisioned(conn, with_command_key=False)
    args = cmds.tariff_args(NOW, now=NOW, standing_mp=0)
    with pytest.raises(TopupError, match="takes no signed commands"):
        cmds.make(conn, PASSPHRASE, cmds.plan_tariff(conn, [DEVICE_BYTES], args), now=NOW)
    assert conn.execute("SELECT count(*) FROM commands").fetchone()[0] == 0


def test_revoke_that_would_leave_a_meter_without_an_issuer_key_is_refused(conn):
    k = keystore.new_key(conn, PASSPHRASE, now=NOW)
    provisioned(conn)
    with pytest.raises(TopupError, match="no issuer key"):
        cmds.plan_revoke_key(conn, k.kid)
    k2 = keystore.new_key(conn, PASSPHRASE, now=NOW, activate=True)
    cmds.make(conn, PASSPHRASE, cmds.plan_add_key(conn, k2.kid, k2.public_key), now=NOW)
    plan = cmds.plan_revoke_key(conn, k.kid)
    assert [(p[0], p[1], p[2]) for p in plan] == [(DEVICE_BYTES, 2, {1: k.kid})]


@pytest.mark.parametrize("values, words", [
    ({"unit_rate_mp": 0}, "unit rate"),
    ({"unit_rate_mp": 1_000_001}, "unit rate"),
    ({"standing_mp": 10_000_001}, "standing"),
    ({"max_credit": 1_000_001}, "max credit"),
    ({"max_voucher": 500, "max_credit": 400}, "below"),
    ({}, "at least one"),
])
def test_tariff_bounds(values, words):
    with pytest.raises(TopupError, match=words):
        cmds.tariff_args(NOW, now=NOW, **values)


def test_tariff_effective_time_bound():
    week = 7 * 86400
    assert cmds.tariff_args(NOW - week, now=NOW, unit_rate_mp=1)[1] == NOW - week
    with pytest.raises(TopupError, match="7 days"):
        cmds.tariff_args(NOW - week - 1, now=NOW, unit_rate_mp=1)
    # The bounds are the meter's (protocol.command): the extremes pass there too.
    args = cmds.tariff_args(NOW, now=NOW, unit_rate_mp=1_000_000, standing_mp=10_000_000,
                            max_credit=1_000_000)
    pc.check_args(pc.SET_TARIFF, args, NOW)


def test_an_interrupted_run_stores_no_command_and_uses_no_number(conn):
    k = keystore.new_key(conn, PASSPHRASE, now=NOW)
    provisioned(conn)
    k2 = keystore.new_key(conn, PASSPHRASE, now=NOW, seed=b"\x05" * 32)
    plan = cmds.plan_add_key(conn, k2.kid, k2.public_key)

    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cmds.make(conn, PASSPHRASE, plan, now=NOW, before_commit=boom)
    assert conn.execute("SELECT count(*) FROM commands").fetchone()[0] == 0
    # With what it follows from (`also`): the key is not revoked either.
    with pytest.raises(KeyboardInterrupt):
        keystore.revoke(conn, k2.kid, within=lambda fn: cmds.make(
            conn, PASSPHRASE, plan, now=NOW, also=fn, before_commit=boom))
    assert keystore.get_key(conn, k2.kid).revoked is None
    (m,) = cmds.make(conn, PASSPHRASE, plan, now=NOW)
    assert m.number == 1


def test_command_receipts_settle_commands_and_exposure_follows_them(conn):
    k = keystore.new_key(conn, PASSPHRASE, now=NOW)
    meter = provisioned(conn)
    v1, v2 = issuer.issue(conn, keystore.unlock_active(conn, PASSPHRASE), DEVICE_BYTES, 500,
                          count=2, now=NOW)
    k2 = keystore.new_key(conn, PASSPHRASE, now=NOW, activate=True)
    (add,) = cmds.make(conn, PASSPHRASE, cmds.plan_add_key(conn, k2.kid, k2.public_key),
                       now=NOW)
    plan = cmds.plan_revoke_key(conn, k.kid)
    (rev,) = cmds.make(conn, PASSPHRASE, plan, now=NOW,
                       also=lambda: conn.execute("UPDATE keys SET active = 0, revoked = ? "
                                                 "WHERE kid = ?", (NOW, k.kid)))
    # Before any receipt: the meter trusts the revoked key, with both vouchers exposed.
    res = reconcile.reconcile(conn, now=NOW)
    assert [(e.device, e.kid, e.vouchers, e.pence, e.pending) for e in res.exposure] == [
        (DEVICE_BYTES, k.kid, 2, 1000, True)]
    # The meter applies v1, then both commands, then (wrongly) v2 after the revocation.
    raws = [meter.topup(v1.cose, 1, 500), meter.command(add.raw), meter.command(rev.raw),
            meter.topup(v2.cose, 2, 500)]
    reconcile.import_raw(conn, raws, "test")
    got = [(r.number, r.status, r.receipt_index) for r in
           cmds.list_commands(conn, DEVICE_BYTES)]
    assert got == [(1, "applied", 1), (2, "applied", 2)]
    stored = conn.execute("SELECT command_kind FROM receipts WHERE kind = 5 ORDER BY idx"
                          ).fetchall()
    assert stored == [(1,), (2,)]
    res = reconcile.reconcile(conn, now=NOW)
    assert res.exposure == []
    kinds = [(a.kind, a.index, a.sequence) for a in res.anomalies]
    assert ("applied_after_revocation", 3, 2) in kinds
    assert kid(k2.public_key) in cmds.trust(conn, DEVICE_BYTES, confirmed=True)
    assert k.kid not in cmds.trust(conn, DEVICE_BYTES, confirmed=True)


def test_a_refused_command_frees_its_number_for_the_next(conn):
    keystore.new_key(conn, PASSPHRASE, now=NOW)
    meter = provisioned(conn)
    a = cmds.tariff_args(NOW, now=NOW, unit_rate_mp=20000)
    b = cmds.tariff_args(NOW, now=NOW, unit_rate_mp=21000)
    one, two = cmds.make(conn, PASSPHRASE, cmds.plan_tariff(conn, [DEVICE_BYTES], a) +
                         cmds.plan_tariff(conn, [DEVICE_BYTES], b), now=NOW)
    pending = cmds.pending_for(conn, DEVICE_BYTES)
    (again,) = cmds.mark_refused(conn, pending[0].id, 26, PASSPHRASE, now=NOW + 5)
    assert again.number == 1 and pc.parse(again.raw).args == pc.parse(two.raw).args
    rows = {(r.number, r.status, r.reason) for r in cmds.list_commands(conn, DEVICE_BYTES)}
    assert rows == {(1, "refused", 26), (2, "superseded", None), (1, "pending", None)}
    reconcile.import_raw(conn, [meter.command(again.raw)], "test")
    assert [r.status for r in cmds.pending_for(conn, DEVICE_BYTES)] == []


def test_provisioning_again_supersedes_pending_commands(conn):
    keystore.new_key(conn, PASSPHRASE, now=NOW)
    provisioned(conn)
    args = cmds.tariff_args(NOW, now=NOW, unit_rate_mp=20000)
    cmds.make(conn, PASSPHRASE, cmds.plan_tariff(conn, [DEVICE_BYTES], args), now=NOW)
    provisioned(conn, meter=Meter(DEVICE_BYTES, b"\x09" * 32, first=5))
    assert [r.status for r in cmds.list_commands(conn, DEVICE_BYTES)] == ["superseded"]
    (m,) = cmds.make(conn, PASSPHRASE, cmds.plan_tariff(conn, [DEVICE_BYTES], args), now=NOW)
    assert (m.epoch, m.number) == (2, 1)      # numbering starts again with the provisioning


def test_text_form_round_trip(conn):
    keystore.new_key(conn, PASSPHRASE, now=NOW)
    provisioned(conn)
    (m,) = cmds.make(conn, PASSPHRASE, cmds.plan_tariff(
        conn, [DEVICE_BYTES], cmds.tariff_args(NOW, now=NOW, ec_amount=500)), now=NOW)
    text = cmds.to_text(m.raw)
    assert text.startswith("OTC1:") and pc.from_text(text) == m.raw
    assert cmds.from_text(text) == m.raw


def test_v5_database_upgrades_to_v6_with_its_data(tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for stmt in db._statements(db.SCHEMA):
        conn.execute(stmt)
    for version in (1, 2, 3, 4):
        db._run_migration(conn, version)
    conn.execute("PRAGMA application_id = %d" % db.APPLICATION_ID)
    conn.execute("PRAGMA user_version = 5")
    # A v5 database in use: two issuer keys (one revoked before the meter's provisioning),
    # a meter with a key epoch and a voucher.
    sk = nacl.signing.SigningKey(bytes(32))
    old = nacl.signing.SigningKey(b"\x01" * 32)
    for key, created, revoked in ((sk, 5, None), (old, 4, 8)):
        conn.execute("INSERT INTO keys (kid, public_key, salt, sealed_seed, opslimit, memlimit, "
                     "created, active, revoked) VALUES (?, ?, x'00', x'00', 1, 1, ?, ?, ?)",
                     (kid(key.verify_key), bytes(key.verify_key), created,
                      1 if revoked is None else 0, revoked))
    conn.execute("INSERT INTO devices (device, public_key, max_voucher, max_credit, "
                 "next_sequence, created) VALUES (?, ?, 1000, 5000, 2, 5)",
                 (DEVICE_BYTES, b"\x03" * 32))
    conn.execute("INSERT INTO device_keys (device, epoch, public_key, kid, first_index, floor, "
                 "provisioned) VALUES (?, 1, ?, ?, 0, 0, 10)", (DEVICE_BYTES, b"\x03" * 32,
                                                               kid(b"\x03" * 32)))
    conn.execute("INSERT INTO vouchers (device, sequence, kid, amount, issued, ref, cose) "
                 "VALUES (?, 1, ?, 100, 7, ?, x'00')", (DEVICE_BYTES, kid(sk.verify_key),
                                                       b"\x04" * 16))
    conn.execute("COMMIT")
    conn.close()
    conn = db.open_db(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
        assert conn.execute("SELECT kid FROM device_trust").fetchall() == [
            (kid(sk.verify_key),)]            # the revoked key was not installed
        assert conn.execute("SELECT command_kid FROM device_keys").fetchall() == [(None,)]
        assert conn.execute("SELECT device, sequence, amount FROM vouchers").fetchall() == [
            (DEVICE_BYTES, 1, 100)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert cmds.commandable(conn) == ([], [DEVICE_BYTES])
        cols = {r[1] for r in conn.execute("PRAGMA table_info(commands)")}
        assert {"device", "number", "kind", "args", "raw", "ref", "created", "status",
                "receipt_index"} <= cols
    finally:
        conn.close()


@pytest.mark.sqlite_only  # the old supplier's database is found by PRAGMA database_list
def test_change_of_supplier_old_suppliers_view(conn, tmp_path):
    """The old supplier makes CHANGE_SUPPLIER from the new supplier's database; once its
    receipt is back, our outstanding vouchers for the meter are refunds due (stale), the
    meter takes no more commands from us and trusts none of our keys."""
    keystore.new_key(conn, PASSPHRASE, now=NOW)
    meter = provisioned(conn)
    signer = keystore.unlock_active(conn, PASSPHRASE)
    v1, v2, v3 = issuer.issue(conn, signer, DEVICE_BYTES, 300, count=3, now=NOW)
    new = db.create(str(tmp_path / "new.db"))
    try:
        keystore.new_key(new, "another passphrase", now=NOW)
        theirs = (keystore.active_command_key(new).public_key,
                  [k.public_key for k in keystore.list_keys(new)],
                  keystore.active_code_key(new).public_key)
    finally:
        new.close()
    keys = cmds.new_supplier_keys(conn, str(tmp_path / "new.db"))
    assert keys == theirs
    (m,) = cmds.make(conn, PASSPHRASE, cmds.plan_change_supplier(conn, DEVICE_BYTES, *keys),
                     now=NOW)
    c = pc.parse(m.raw)
    assert c.kind == 6 and c.args == {1: theirs[0], 2: theirs[1], 3: theirs[2], 4: 3}
    with pytest.raises(TopupError, match="changing supplier"):
        cmds.make(conn, PASSPHRASE, cmds.plan_tariff(
            conn, [DEVICE_BYTES], cmds.tariff_args(NOW, now=NOW, unit_rate_mp=1)), now=NOW)
    with pytest.raises(TopupError, match="own command key"):
        cmds.new_supplier_keys(conn, conn.execute("PRAGMA database_list").fetchone()[2])
    reconcile.import_raw(conn, [meter.topup(v1.cose, 1, 300), meter.command(m.raw)], "t")
    res = reconcile.reconcile(conn, now=NOW)
    assert (res.count["redeemed"], res.count["stale"], res.count["outstanding"]) == (1, 2, 0)
    assert res.pence["stale"] == 600 and res.refunds_due == 600
    notes = conn.execute("SELECT note FROM voucher_status WHERE status = 'stale'").fetchall()
    assert all("changed supplier" in n for (n,) in notes)
    assert cmds.trust(conn, DEVICE_BYTES, confirmed=True) == {kid(k) for k in theirs[1]}
    assert cmds.commandable(conn) == ([], [])
    # The new supplier's view: it adopts the meter from the old database.
    old_path = conn.execute("PRAGMA database_list").fetchone()[2]
    new = db.open_db(str(tmp_path / "new.db"))
    try:
        with pytest.raises(TopupError, match="does not know"):
            cmds.adopt(new, OTHER, old_path)
        a = cmds.adopt(new, DEVICE_BYTES, old_path, now=NOW)
        change_hash = meter.prev                    # the command receipt, index 1
        assert (a.receipt_index, a.first_index, a.floor, a.balance_mp) == (1, 2, 3, 300000)
        (e,) = registry.device_keys(new, DEVICE_BYTES)
        assert (e.public_key, e.first_index, e.floor, e.first_prev, e.command_kid) == (
            meter.public, 2, 3, change_hash, kid(theirs[0]))
        assert registry.get_device(new, DEVICE_BYTES).next_sequence == 4
        assert cmds.trust(new, DEVICE_BYTES) == {kid(k) for k in theirs[1]}
        with pytest.raises(TopupError, match="already registered"):
            cmds.adopt(new, DEVICE_BYTES, old_path)
        # The meter's chain goes on from the command receipt: no anomaly in the new books.
        new_signer = keystore.unlock_active(new, "another passphrase")
        (v,) = issuer.issue(new, new_signer, DEVICE_BYTES, 200, now=NOW)
        reconcile.import_raw(new, [meter.topup(v.cose, 4, 200)], "t")
        res = reconcile.reconcile(new, now=NOW)
        assert res.anomalies == [] and res.count["redeemed"] == 1
    finally:
        new.close()


# --- replacing the code key (SET_CODE_KEY) and the command key (ROTATE_COMMAND_KEY) --------

def _x25519_public(secret):
    import nacl.bindings
    return nacl.bindings.crypto_scalarmult_base(bytes(secret))


def test_a_new_code_key_is_set_on_meters_taking_codes_and_codes_follow_once_confirmed(conn):
    import nacl.bindings
    from protocol import keycode
    keystore.new_key(conn, PASSPHRASE, now=NOW)
    old_code = keystore.active_code_key(conn)
    ck = keystore.active_command_key(conn)
    meter_ka_secret = b"\x33" * 32
    ka = _x25519_public(meter_ka_secret)
    registry.add_device(conn, DEVICE_BYTES, 10000, 50000, now=NOW)
    meter = Meter(DEVICE_BYTES)
    registry.set_public_key(conn, DEVICE_BYTES, registry.MeterKey(
        meter.public, 0, 0, ka, old_code.kid, ck.kid), now=NOW)
    provisioned(conn, OTHER, Meter(OTHER, b"\x08" * 32))      # takes commands, no codes
    secret = b"\x44" * 32
    new_pub = _x25519_public(secret)
    new_kid = kid(new_pub)
    plan = cmds.plan_code_key(conn, new_kid, new_pub)
    assert [(p[0], p[1], p[2]) for p in plan] == [(DEVICE_BYTES, 3, {1: new_pub})]
    made = []
    keystore.new_code_key(conn, PASSPHRASE, activate=True, secret=secret, now=NOW,
                          within=lambda ins: made.extend(cmds.make(conn, PASSPHRASE, plan,
                                                                   also=ins, now=NOW)))
    (m,) = made
    assert keystore.active_code_key(conn).kid == new_kid
    c = pc.verify(m.raw, {ck.kid: ck.public_key}, DEVICE_BYTES)
    assert (c.number, c.kind, c.args) == (1, 3, {1: new_pub})
    assert cmds.plan_code_key(conn, new_kid, new_pub) == []      # pending counts
    # Pending: codes are still derived with the key the meter holds.
    assert issuer.code_epoch(conn, DEVICE_BYTES).code_kid == old_code.kid
    new_key = keystore.unlock_code_key(conn, PASSPHRASE, new_kid)
    with pytest.raises(TopupError, match="holds code key %s" % old_code.kid.hex()):
        issuer.issue_codes(conn, new_key, DEVICE_BYTES, 100, now=NOW)
    # The meter's receipt confirms it: from then on the new one.
    reconcile.import_raw(conn, [meter.command(m.raw)], "test")
    assert [r.status for r in cmds.list_commands(conn, DEVICE_BYTES)] == ["applied"]
    assert issuer.code_epoch(conn, DEVICE_BYTES).code_kid == new_kid
    (code,) = issuer.issue_codes(conn, new_key, DEVICE_BYTES, 100, now=NOW)
    assert bytes(code.kid) == new_kid
    # `topup verify CODE` checks the MAC with the key the meter holds now, too.
    from host import verify
    rep = verify.explain_code(conn, code.code, DEVICE_BYTES,
                              unlock=lambda k: keystore.unlock_code_key(conn, PASSPHRASE, k))
    assert rep.reason == 0 and rep.epoch.code_kid == new_kid, (rep.reason, rep.detail)
    # The key the meter derives (X25519 with its own secret, SPEC §8) is the one used.
    theirs = keycode.derive_key(nacl.bindings.crypto_scalarmult(meter_ka_secret, new_pub),
                                DEVICE_BYTES, new_pub, ka)
    assert new_key.code_key(DEVICE_BYTES, ka) == theirs


def test_rotating_the_command_key_signs_later_commands_with_the_new_one(conn):
    keystore.new_key(conn, PASSPHRASE, now=NOW)
    old = keystore.active_command_key(conn)
    provisioned(conn)
    args = cmds.tariff_args(NOW, now=NOW, unit_rate_mp=30000)
    (t1,) = cmds.make(conn, PASSPHRASE, cmds.plan_tariff(conn, [DEVICE_BYTES], args), now=NOW)
    seed = b"\x55" * 32
    new_public = bytes(nacl.signing.SigningKey(seed).verify_key)
    new_kid = kid(new_public)
    plan = cmds.plan_rotate(conn, new_kid, new_public)
    made = []
    keystore.new_command_key(conn, PASSPHRASE, seed=seed, now=NOW,
                             within=lambda ins: made.extend(cmds.make(conn, PASSPHRASE, plan,
                                                                      also=ins, now=NOW)))
    (rot,) = made
    assert keystore.active_command_key(conn).kid == new_kid
    c = pc.verify(rot.raw, {old.kid: old.public_key}, DEVICE_BYTES)   # the old key signs it
    assert (c.number, c.kind, c.args) == (2, 5, {1: new_public})
    assert cmds.plan_rotate(conn, new_kid, new_public) == []
    assert cmds.signing_kid(conn, DEVICE_BYTES) == new_kid
    assert cmds.signing_kid(conn, DEVICE_BYTES, confirmed=True) == old.kid
    (t3,) = cmds.make(conn, PASSPHRASE, cmds.plan_tariff(conn, [DEVICE_BYTES], args), now=NOW)
    c3 = pc.verify(t3.raw, {new_kid: new_public}, DEVICE_BYTES)          # numbering goes on
    assert c3.number == 3
    # A refused rotation never happened: the command after it is signed again, one number
    # lower, by the old key.
    rid = [r.id for r in cmds.list_commands(conn, DEVICE_BYTES) if r.number == 2][0]
    (again,) = cmds.mark_refused(conn, rid, 26, PASSPHRASE, now=NOW)
    assert again.number == 2 and pc.verify(again.raw, {old.kid: old.public_key},
                                           DEVICE_BYTES).kind == 4
    assert cmds.signing_kid(conn, DEVICE_BYTES) == old.kid
    # A command after a rotation in the same run is refused (it would need the new key).
    with pytest.raises(TopupError, match="after a ROTATE_COMMAND_KEY"):
        cmds.make(conn, PASSPHRASE, cmds.plan_rotate(conn, new_kid, new_public)
                  + cmds.plan_tariff(conn, [DEVICE_BYTES], args), now=NOW)


def test_a_refused_command_before_a_rotation_re_signs_each_with_the_key_in_force(conn):
    keystore.new_key(conn, PASSPHRASE, now=NOW)
    old = keystore.active_command_key(conn)
    meter = provisioned(conn)
    args = cmds.tariff_args(NOW, now=NOW, unit_rate_mp=30000)
    (t1,) = cmds.make(conn, PASSPHRASE, cmds.plan_tariff(conn, [DEVICE_BYTES], args), now=NOW)
    new = keystore.new_command_key(conn, PASSPHRASE, seed=b"\x56" * 32, now=NOW)
    (rot,) = cmds.make(conn, PASSPHRASE, cmds.plan_rotate(conn, new.kid, new.public_key),
                       now=NOW)
    (t3,) = cmds.make(conn, PASSPHRASE, cmds.plan_tariff(conn, [DEVICE_BYTES], args), now=NOW)
    assert [m.number for m in (t1, rot, t3)] == [1, 2, 3]
    made = cmds.mark_refused(conn, [r.id for r in cmds.list_commands(conn, DEVICE_BYTES)
                                    if r.number == 1][0], 26, PASSPHRASE, now=NOW)
    assert [(m.number, m.kind) for m in made] == [(1, 5), (2, 4)]
    pc.verify(made[0].raw, {old.kid: old.public_key}, DEVICE_BYTES)
    pc.verify(made[1].raw, {new.kid: new.public_key}, DEVICE_BYTES)
    # The meter applies the rotation: the new key is then the one it is known to hold.
    reconcile.import_raw(conn, [meter.command(made[0].raw)], "test")
    assert cmds.signing_kid(conn, DEVICE_BYTES, confirmed=True) == new.kid
