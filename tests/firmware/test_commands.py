# Signed commands at the meter (SPEC.md §10), on both VMs and CPython: each kind applies
# once with a signed receipt and survives a reboot; every bad command is refused with its
# reason and changes nothing on the flash; a power cut at every flash operation of a command
# leaves it applied once or not at all; a tariff change charges exactly what a plain
# calculation written here says; revoked keys, rotated keys and a change of supplier.
from tests.firmware._meterkit import (Kit, issue, command, public, DEVICE, OTHER_DEVICE, T0,
                                      ISSUER_SEED, COMMAND_SEED, STRANGER_SEED)
from boards.nor import PowerCut
from meter import admin as A, config as cfg
from meter.han_server import HanServer
from protocol import cose, errors, keycode, receipt, x25519
from protocol import command as C
from tests.protocol._support import expect_rejected

NEW_ISSUER = bytes(range(11, 43))
NEW_COMMAND = bytes(range(171, 203))
NEXT_SUPPLIER_COMMAND = bytes(range(181, 213))
NEXT_SUPPLIER_ISSUER = bytes(range(21, 53))
NEW_CODE_SECRET = bytes(range(221, 253))


def kid(seed):
    return cose.kid_for(public(seed))


def _applied(kit, raw, number, kind):
    """Submit a command that must apply; check its receipt against the SPEC table."""
    before = kit.ledger.balance_mp
    count = kit.ledger.receipt_count
    r_raw, dup = kit.ledger.submit_command(raw)
    assert dup is False
    r = receipt.verify(r_raw, kit.meter_keys())
    assert r.kind == receipt.COMMAND and r.index == count
    assert (r.sequence, r.command_kind, r.voucher) == (number, kind, C.reference(raw))
    # a command moves no money: metering up to it (the standing charge) is charged first
    assert r.balance_before == r.balance_after == kit.ledger.balance_mp <= before
    assert kit.ledger.receipt_count == count + 1
    # the same bytes again: the original receipt, nothing new
    again, dup = kit.ledger.submit_command(raw)
    assert dup is True and again == r_raw and kit.ledger.receipt_count == count + 1
    return r


def test_add_and_revoke_an_issuer_key_without_a_factory_reset():
    kit = Kit(initial=1000, commands=True)
    old_raw = issue(1, 100)
    kit.ledger.submit(old_raw)
    # before: the new key's vouchers are UNKNOWN_KEY
    expect_rejected(errors.UNKNOWN_KEY, kit.ledger.submit, issue(2, 100, seed=NEW_ISSUER))
    _applied(kit, command(1, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}), 1, C.ADD_ISSUER_KEY)
    kit.ledger.submit(issue(2, 100, seed=NEW_ISSUER))
    _applied(kit, command(2, C.REVOKE_ISSUER_KEY, {1: kid(ISSUER_SEED)}), 2, C.REVOKE_ISSUER_KEY)
    for ledger in (kit.ledger, kit.reboot()):
        before = ledger.balance_mp
        expect_rejected(errors.KEY_REVOKED, ledger.submit, issue(3, 100))
        # a voucher applied before the revocation still gets its original receipt back
        raw, dup = ledger.submit(old_raw)
        assert dup is True and receipt.parse(raw).sequence == 1
        assert ledger.balance_mp == before
    kit.ledger.submit(issue(4, 100, seed=NEW_ISSUER))
    assert kit.ledger.balance_mp == (1000 + 300) * 1000
    # the revoked key can never come back
    expect_rejected(errors.COMMAND_REFUSED, kit.ledger.submit_command,
                    command(3, C.ADD_ISSUER_KEY, {1: public(ISSUER_SEED)}))
    assert kit.ledger.admin[A.LAST] == 2


def test_set_code_key_and_rotate_command_key():
    kit = Kit(commands=True, codes=True)
    old_code = kit.code(1, 100)
    supplier = x25519.public_key(NEW_CODE_SECRET)
    _applied(kit, command(1, C.SET_CODE_KEY, {1: supplier}), 1, C.SET_CODE_KEY)
    kit.reboot()
    # the supplier derives the meter's new code key from its new secret and the meter's
    # registered key-agreement key (SPEC §8)
    key = keycode.derive_key(x25519.x25519(NEW_CODE_SECRET, kit.ka_public), DEVICE, supplier,
                             kit.ka_public)
    new_code = keycode.grouped(keycode.encode(key, DEVICE, 250, 2))
    e = expect_rejected(errors.CODE_WRONG, kit.ledger.submit_code, old_code)
    assert e.fields == {3: 4}
    kit.ledger.submit_code(new_code)
    assert kit.ledger.balance_mp == 1250000
    # rotation: signed by the old key; after it the old key's commands are UNKNOWN_KEY
    _applied(kit, command(2, C.ROTATE_COMMAND_KEY, {1: public(NEW_COMMAND)}), 2, C.ROTATE_COMMAND_KEY)
    kit.reboot()
    assert kit.ledger.admin[A.KID] == kid(NEW_COMMAND)
    expect_rejected(errors.UNKNOWN_KEY, kit.ledger.submit_command,
                    command(3, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}))
    _applied(kit, command(3, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}, seed=NEW_COMMAND), 3,
             C.ADD_ISSUER_KEY)
    # the rotation command itself, sent again, still gets its receipt (the bytes are known)
    raw, dup = kit.ledger.submit_command(command(2, C.ROTATE_COMMAND_KEY, {1: public(NEW_COMMAND)}))
    assert dup is True and receipt.parse(raw).sequence == 2


def _flash(kit):
    return bytes(kit.flash.data)


def test_every_bad_command_is_refused_with_its_reason_and_changes_nothing():
    kit = Kit(commands=True)
    _applied(kit, command(1, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}), 1, C.ADD_ISSUER_KEY)
    kit.ledger.checkpoint()
    tariff = {1: T0, 2: 30000}
    bad = (
        (errors.COMMAND_OUT_OF_ORDER, command(3, C.SET_TARIFF, tariff)),
        # number 1 again, but another command: a replay, not the original
        (errors.COMMAND_REPLAYED, command(1, C.SET_TARIFF, tariff)),
        (errors.WRONG_DEVICE, command(2, C.SET_TARIFF, tariff, device=OTHER_DEVICE)),
        # signed by an issuer key the meter trusts for vouchers
        (errors.UNKNOWN_KEY, command(2, C.SET_TARIFF, tariff, seed=ISSUER_SEED)),
        (errors.UNKNOWN_KEY, command(2, C.SET_TARIFF, tariff, seed=STRANGER_SEED)),
        (errors.COMMAND_REFUSED, command(2, C.SET_TARIFF, {1: T0, 2: 0}, strict=False)),
        (errors.COMMAND_REFUSED, command(2, C.SET_TARIFF, {1: T0, 2: 10 ** 8}, strict=False)),
        (errors.COMMAND_REFUSED, command(2, C.SET_TARIFF, {1: T0, 7: 10 ** 9}, strict=False)),
        (errors.COMMAND_REFUSED, command(2, C.SET_TARIFF, {1: T0 - 8 * 86400, 2: 30000})),
        (errors.MALFORMED, b"\xd2\x84"),
    )
    image = _flash(kit)
    status = HanServer(kit.ledger, None).status()
    for reason, raw in bad:
        expect_rejected(reason, kit.ledger.submit_command, raw)
        assert _flash(kit) == image, errors.name(reason)
    # forged signature under the command key
    forged = bytearray(command(2, C.SET_TARIFF, tariff))
    forged[-2] ^= 0x40
    expect_rejected(errors.BAD_SIGNATURE, kit.ledger.submit_command, bytes(forged))
    assert _flash(kit) == image
    # revoking both issuer keys: the second would leave none
    _applied(kit, command(2, C.REVOKE_ISSUER_KEY, {1: kid(ISSUER_SEED)}), 2, C.REVOKE_ISSUER_KEY)
    kit.ledger.checkpoint()
    image = _flash(kit)
    expect_rejected(errors.COMMAND_REFUSED, kit.ledger.submit_command,
                    command(3, C.REVOKE_ISSUER_KEY, {1: kid(NEW_ISSUER)}))
    assert _flash(kit) == image
    # a refused command used no number: number 3 is still the next
    _applied(kit, command(3, C.SET_TARIFF, {1: T0, 3: 50000}), 3, C.SET_TARIFF)
    # the refusals are counted for the rejections receipt, like a voucher's
    counts = kit.ledger.pending_rejections
    assert counts[errors.COMMAND_REFUSED] == 5 and counts[errors.UNKNOWN_KEY] == 2
    assert counts[errors.COMMAND_OUT_OF_ORDER] == 1 and counts[errors.COMMAND_REPLAYED] == 1
    assert status[19] == 1 and status[20] == kid(COMMAND_SEED) and status[21] == 0


def test_a_meter_without_a_command_key_refuses_commands_and_says_nothing_new():
    kit = Kit()
    image = _flash(kit)
    expect_rejected(errors.NOT_PROVISIONED, kit.ledger.submit_command,
                    command(1, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}))
    assert _flash(kit) == image
    status = HanServer(kit.ledger, None).status()
    assert 19 not in status and 20 not in status and 21 not in status


def _plain_charge(steps, rates, start):
    """The exact charge in milli-pence for metering `steps` [(t, wh)] from meter time
    `start`, with `rates` [(from time, mp/kWh, mp/day)] in time order: energy metered at t
    at the unit rate in force at t; the standing charge second by second at the daily rate
    in force in that second. Integer arithmetic: whole milli-pence, remainders carried."""
    def rate_at(t):
        u = d = None
        for frm, unit, daily in rates:
            if frm <= t:
                u, d = unit, daily
        return u, d
    energy = 0          # 1/1000 mp
    standing = 0        # mp * seconds / day
    last = start
    for t, wh in steps:
        while last < t:                      # second by second: no cleverness to share
            standing += rate_at(last)[1]
            last += 1
        energy += wh * rate_at(t)[0]
    return energy // 1000 + standing // 86400


def test_tariff_change_mid_metering_charges_exactly_the_plain_calculation():
    for eff_offset in (1000, 1001, 1537):
        kit = Kit(initial=5000, commands=True)
        ledger = kit.ledger
        start = kit.clock.now
        effective = start + eff_offset
        steps = []
        t = start
        applied_at = None
        for i in range(60):
            t += 17 + (i * 7) % 23
            wh = (i * 13) % 41
            if applied_at is None and t > start + 300:
                kit.clock.now = t
                r = _applied(kit, command(1, C.SET_TARIFF, {1: effective, 2: 31234, 3: 87001}),
                             1, C.SET_TARIFF)
                assert r.tariff == {1: effective, 2: 31234, 3: 87001}
                assert HanServer(ledger, None).status()[21] == effective
                applied_at = t
            kit.clock.now = t
            ledger.meter(wh, t)
            steps.append((t, wh))
            if i == 40:
                ledger.checkpoint(t)
                ledger = kit.reboot()           # the pending change survives a reboot
        assert t > effective
        assert HanServer(ledger, None).status()[21] == 0
        want = _plain_charge(steps, [(0, 24500, 60000), (effective, 31234, 87001)], start)
        assert 5000 * 1000 - ledger.balance_mp == want, (5000 * 1000 - ledger.balance_mp, want)
        assert ledger.unit_rate == 31234 and ledger.standing == 87001


def test_tariff_effective_in_the_past_applies_from_the_meter_time_it_arrives():
    kit = Kit(initial=5000, commands=True)
    start = kit.clock.now
    kit.clock.now = start + 5000
    kit.ledger.meter(100, kit.clock.now)
    r = _applied(kit, command(1, C.SET_TARIFF, {1: start - 6 * 86400, 3: 0, 6: 20000}), 1,
                 C.SET_TARIFF)
    assert r.tariff == {1: start + 5000, 3: 0, 6: 20000}     # as applied: from now
    assert kit.ledger.max_voucher == 20000
    kit.clock.now += 86400
    kit.ledger.meter(0, kit.clock.now)
    want = _plain_charge([(start + 5000, 100), (kit.clock.now, 0)],
                         [(0, 24500, 60000), (start + 5000, 24500, 0)], start)
    assert 5000 * 1000 - kit.ledger.balance_mp == want
    kit.ledger.submit(issue(1, 15000))                      # over the old £100 maximum


def test_change_of_supplier():
    kit = Kit(initial=1000, commands=True, codes=True)
    kit.ledger.submit(issue(5, 100))
    old_code = kit.code(6, 100)
    _applied(kit, command(1, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}), 1, C.ADD_ISSUER_KEY)
    balance = kit.ledger.balance_mp
    change = command(2, C.CHANGE_SUPPLIER, {1: public(NEXT_SUPPLIER_COMMAND),
                                            2: [public(NEXT_SUPPLIER_ISSUER)], 4: 3})
    _applied(kit, change, 2, C.CHANGE_SUPPLIER)
    for ledger in (kit.ledger, kit.reboot()):
        assert ledger.balance_mp == balance
        assert ledger.floor == 5 and ledger.admin[A.LAST] == 0
        assert ledger.admin[A.KID] == kid(NEXT_SUPPLIER_COMMAND)
        # the old supplier's vouchers (either key) are STALE, its codes not taken
        expect_rejected(errors.STALE, ledger.submit, issue(7, 100))
        expect_rejected(errors.STALE, ledger.submit, issue(8, 100, seed=NEW_ISSUER))
        expect_rejected(errors.NOT_PROVISIONED, ledger.submit_code, old_code)
        # the old supplier's commands are not the meter's any more
        expect_rejected(errors.UNKNOWN_KEY, ledger.submit_command,
                        command(3, C.SET_TARIFF, {1: T0, 2: 1000}))
    # the new supplier: vouchers above the floor, commands numbered from 1
    expect_rejected(errors.STALE, kit.ledger.submit, issue(5, 100, seed=NEXT_SUPPLIER_ISSUER))
    kit.ledger.submit(issue(6, 100, seed=NEXT_SUPPLIER_ISSUER))
    _applied(kit, command(1, C.SET_TARIFF, {1: T0, 2: 20000}, seed=NEXT_SUPPLIER_COMMAND), 1,
             C.SET_TARIFF)
    # the change itself, sent again by the old supplier's engineer: its original receipt
    raw, dup = kit.ledger.submit_command(change)
    assert dup is True and receipt.parse(raw).command_kind == C.CHANGE_SUPPLIER


def test_over_the_han():
    from protocol import han
    kit = Kit(commands=True)

    class Link:
        def __init__(self):
            self.inbox = b""
            self.out = b""

        def read(self, n):
            d, self.inbox = self.inbox[:n], self.inbox[n:]
            return d

        def write(self, d):
            self.out += d

    link = Link()
    server = HanServer(kit.ledger, link)
    raw = command(1, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)})
    link.inbox = han.encode_message(7, 9, {1: raw})
    server.poll()
    body = han.Deframer().feed(link.out)[0]
    t, i, p = han.decode_message(body)
    assert (t, i, p[2]) == (0x87, 9, False)
    assert receipt.parse(p[1]).command_kind == C.ADD_ISSUER_KEY
    link.out = b""
    link.inbox = han.encode_message(7, 10, {1: command(3, C.ADD_ISSUER_KEY, {1: bytes(32)})})
    server.poll()
    t, i, p = han.decode_message(han.Deframer().feed(link.out)[0])
    assert (t, i, p) == (0xFF, 10, {1: errors.COMMAND_OUT_OF_ORDER})


def _every_cut(kit, operation, check):
    n = 0
    while True:
        trial = kit.copy(seed=n)
        trial.flash.cut_after(n)
        try:
            operation(trial)
            completed = True
        except PowerCut:
            completed = False
        trial.flash.cut_after(None)
        trial.reboot()
        check(trial, completed)
        if completed:
            return n
        n += 1


def test_a_command_is_applied_once_or_not_at_all_at_every_power_cut():
    kinds = (
        (C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}, lambda l: kid(NEW_ISSUER) in l.trust),
        (C.REVOKE_ISSUER_KEY, {1: kid(ISSUER_SEED)}, lambda l: kid(ISSUER_SEED) in l.admin[A.REVOKED]),
        (C.SET_TARIFF, {1: T0, 2: 33333}, lambda l: l.unit_rate == 33333),
        (C.ROTATE_COMMAND_KEY, {1: public(NEW_COMMAND)}, lambda l: l.admin[A.KID] == kid(NEW_COMMAND)),
        (C.CHANGE_SUPPLIER, {1: public(NEXT_SUPPLIER_COMMAND), 2: [public(NEXT_SUPPLIER_ISSUER)],
                             4: 40}, lambda l: l.floor == 40),
        (C.SET_CODE_KEY, {1: x25519.public_key(NEW_CODE_SECRET)}, lambda l: l.code_key is not None),
    )
    for fill, (kind, args, done) in zip((0, 9, 23, 37, 61, 45), kinds):
        kit = Kit(initial=500, commands=True)
        kit.ledger.submit(issue(1, 100, seed=ISSUER_SEED))
        _applied(kit, command(1, C.ADD_ISSUER_KEY, {1: public(STRANGER_SEED)}), 1, C.ADD_ISSUER_KEY)
        for _ in range(fill):           # meet a block change or a reclaim at some offsets
            kit.clock.now += 1000
            kit.ledger.meter(1, kit.clock.now)
            kit.ledger.checkpoint(kit.clock.now)
        kit.ledger.checkpoint(kit.clock.now)
        before = kit.ledger.balance_mp
        count = kit.ledger.receipt_count
        raw = command(2, kind, args)

        def check(trial, completed):
            ledger = trial.ledger
            assert ledger.provisioned and not ledger.damaged
            applied = done(ledger)
            assert applied or not completed
            assert ledger.receipt_count == count + (1 if applied else 0)
            assert ledger.admin[A.LAST] == (0 if applied and kind == C.CHANGE_SUPPLIER
                                           else 2 if applied else 1)
            assert ledger.balance_mp == before
            receipts = trial.receipts()
            assert cfg.decode(trial.store.state)[cfg.S_LAST_HASH] == receipts[-1].hash
            if applied:
                assert receipts[-1].kind == receipt.COMMAND and receipts[-1].sequence == 2
            # the engineer sends it again: applied exactly once
            r, dup = ledger.submit_command(raw)
            assert dup == applied
            assert done(ledger) and ledger.receipt_count == count + 1
            trial.reboot()
            assert done(trial.ledger) and trial.ledger.receipt_count == count + 1

        cuts = _every_cut(kit, lambda t: t.ledger.submit_command(raw), check)
        assert cuts >= 4, cuts


def test_limits_that_keep_the_config_within_its_flash_records():
    kit = Kit(commands=True)
    seeds = [bytes(range(k, k + 32)) for k in (61, 62, 63)]
    n = 0
    for s in seeds:
        n += 1
        _applied(kit, command(n, C.ADD_ISSUER_KEY, {1: public(s)}), n, C.ADD_ISSUER_KEY)
    # a 5th issuer key is refused, and that used no number
    image = _flash(kit)
    expect_rejected(errors.COMMAND_REFUSED, kit.ledger.submit_command,
                    command(n + 1, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}))
    assert _flash(kit) == image
    # an issuer key already trusted: applied, changes nothing but the number
    n += 1
    _applied(kit, command(n, C.ADD_ISSUER_KEY, {1: public(seeds[0])}), n, C.ADD_ISSUER_KEY)
    assert len(kit.ledger.trust) == 4
    # two tariff changes may wait for their time; a third is refused
    for k in (1, 2):
        n += 1
        _applied(kit, command(n, C.SET_TARIFF, {1: T0 + k * 86400, 2: 30000 + k,
                                                3: 70000, 4: 600, 5: 200, 6: 20000, 7: 60000}),
                 n, C.SET_TARIFF)
    expect_rejected(errors.COMMAND_REFUSED, kit.ledger.submit_command,
                    command(n + 1, C.SET_TARIFF, {1: T0 + 3 * 86400, 2: 40000}))
    assert HanServer(kit.ledger, None).status()[21] == T0 + 86400
    # revocations of keys (trusted or not) pile up: the newest 8 are kept, every commit fits
    for k in range(10):
        n += 1
        _applied(kit, command(n, C.REVOKE_ISSUER_KEY, {1: bytes([k]) * 8}), n, C.REVOKE_ISSUER_KEY)
    n += 1
    _applied(kit, command(n, C.REVOKE_ISSUER_KEY, {1: kid(seeds[2])}), n, C.REVOKE_ISSUER_KEY)
    kit.reboot()
    assert kit.ledger.admin[A.LAST] == n and len(kit.ledger.trust) == 3
    assert list(kit.ledger.admin[A.REVOKED]) == [bytes([k]) * 8 for k in range(3, 10)] + [kid(seeds[2])]
    expect_rejected(errors.KEY_REVOKED, kit.ledger.submit, issue(9, 10, seed=seeds[2]))
    expect_rejected(errors.UNKNOWN_KEY, kit.ledger.submit, issue(9, 10, seed=STRANGER_SEED))


def test_repl_provisioning_installs_the_command_key_and_prints_its_kid():
    import binascii
    import sys
    from boards.fake import Board
    from meter import provisioning
    from meter.ledger import Ledger
    from meter.store import Store
    trust = [binascii.hexlify(public(ISSUER_SEED)).decode()]
    cmd = binascii.hexlify(public(COMMAND_SEED)).decode()
    for bad in (cmd[:-2], "zz" + cmd[2:]):
        try:
            provisioning.provision_board("70b3d5f0000000a1", trust, board=Board(now=T0),
                                         command_key_hex=bad)
        except provisioning.ProvisioningError:
            pass
        else:
            raise AssertionError("provisioned with %r" % bad)
    board = Board(now=T0)
    printed = []
    if sys.implementation.name == "cpython":
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            provisioning.provision_board("70b3d5f0000000a1", trust, board=board, command_key_hex=cmd)
        printed = out.getvalue().split()
    else:
        provisioning.provision_board("70b3d5f0000000a1", trust, board=board, command_key_hex=cmd)
    store = Store(board.flash)
    store.mount()
    ledger = Ledger(store, board.time)
    assert ledger.admin[A.KID] == kid(COMMAND_SEED) and ledger.admin[A.LAST] == 0
    if printed:
        assert printed[0::2] == ["PUBLIC", "FIRST", "FLOOR", "KA", "CMD"], printed
        assert printed[9] == binascii.hexlify(kid(COMMAND_SEED)).decode()
    ledger.submit_command(command(1, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}))
    assert kid(NEW_ISSUER) in ledger.trust


def test_the_command_modules_leave_the_heap_after_each_command():
    import sys
    kit = Kit(commands=True, codes=True)
    for raw in (command(1, C.SET_CODE_KEY, {1: x25519.public_key(NEW_CODE_SECRET)}),
                command(3, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}), b"\x00"):
        try:
            kit.ledger.submit_command(raw)
        except errors.Rejected:
            pass
        if sys.implementation.name == "micropython":
            for m in ("meter.commands", "meter.admin", "protocol.command", "protocol.x25519",
                      "protocol.keycode"):
                assert m not in sys.modules, m
    # a tariff change coming due loads meter.admin for the moment it takes, too
    kit.ledger.submit_command(command(2, C.SET_TARIFF, {1: kit.clock.now + 10, 2: 30000}))
    kit.clock.now += 20
    kit.ledger.meter(1)
    assert kit.ledger.unit_rate == 30000
    if sys.implementation.name == "micropython":
        assert "meter.admin" not in sys.modules and "meter.commands" not in sys.modules
        kit.reboot()
        assert "meter.admin" not in sys.modules
    # a meter without a command key never loads meter.admin either
    if sys.implementation.name == "micropython":
        sys.modules.pop("meter.admin", None)
        plain = Kit()
        plain.ledger.submit(issue(1, 100))
        plain.reboot().meter(5)
        assert "meter.admin" not in sys.modules


def test_refused_commands_reach_the_rejections_receipt():
    kit = Kit(commands=True)
    expect_rejected(errors.COMMAND_OUT_OF_ORDER, kit.ledger.submit_command,
                    command(2, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}))
    expect_rejected(errors.COMMAND_REFUSED, kit.ledger.submit_command,
                    command(1, C.SET_TARIFF, {1: T0, 2: 0}, strict=False))
    kit.ledger.submit(issue(1, 100))
    kit.clock.now += 3600
    raw = kit.ledger.record_rejections(kit.clock.now)
    r = receipt.verify(raw, kit.meter_keys())
    assert r.rejections == {errors.COMMAND_OUT_OF_ORDER: 1, errors.COMMAND_REFUSED: 1}


def test_a_roll_forward_across_a_tariff_change_rebuilds_the_state_exactly():
    # A top-up whose state record is lost, with a tariff change between the last state and
    # its receipt: the rolled-forward state is the one the whole commit writes.
    kit = Kit(initial=2000, commands=True)
    start = kit.clock.now
    _applied(kit, command(1, C.SET_TARIFF, {1: start + 300, 2: 30011, 3: 90001}), 1, C.SET_TARIFF)
    kit.ledger.checkpoint(start)
    for k in range(1, 9):
        kit.clock.now = start + 100 * k - 7
        kit.ledger.meter(7 + k, kit.clock.now)
    assert kit.ledger.unit_rate == 30011
    v = issue(1, 500)
    reference = kit.copy()
    reference.ledger.submit(v)
    want = cfg.decode(reference.store.state)
    keys = (cfg.S_BALANCE, cfg.S_CHARGED_TO, cfg.S_ENERGY_REM, cfg.S_STANDING_REM, cfg.S_WH_TOTAL,
            cfg.S_LAST_HASH)

    def check(trial, completed):
        ledger = trial.ledger
        applied = ledger.window.is_used(1)
        if applied:
            got = cfg.decode(trial.store.state)
            assert [got[k] for k in keys] == [want[k] for k in keys], (got, want)
        if applied and not completed:
            rolled.append(1)

    rolled = []
    _every_cut(kit, lambda t: t.ledger.submit(v), check)
    assert rolled, "no cut left the receipt without its state record"


def test_commands_pushed_back_by_the_head_end_over_the_wan():
    from boards.fake import Board, HanStream
    from meter import provisioning
    from meter.app import Meter
    from meter.store import Store
    from protocol import han
    board = Board(now=T0)
    board.wan = HanStream()
    store = Store(board.flash)
    store.mount()
    provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 100,
                           command_key=public(COMMAND_SEED))
    meter = Meter(board)
    board.feed(han.encode_message(han.SUBMIT, 1, {1: issue(1, 100)}))
    meter.step()
    board.take_output()
    board.set_wan(True)
    meter.step()
    [(t, i, p)] = [han.decode_message(b) for b in han.Deframer().feed(board.wan.take_output())]
    assert t == han.PUSH
    tariff = command(2, C.SET_TARIFF, {1: T0, 2: 29999})
    # the answer names no acknowledgement (it holds nothing verified), only commands;
    # one of them for another meter, which is refused
    board.wan.feed(han.encode_message(han.PUSH | han.RESPONSE, i, {
        1: 0, 3: [command(1, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}),
                  command(1, C.ADD_ISSUER_KEY, {1: public(NEW_ISSUER)}, device=OTHER_DEVICE),
                  tariff]}))
    for _ in range(4):
        meter.step()
    ledger = meter.ledger
    assert ledger.admin[A.LAST] == 2 and ledger.unit_rate == 29999
    assert kid(NEW_ISSUER) in ledger.trust
    kinds = [receipt.parse(ledger.store.receipt(k)).kind for k in range(ledger.receipt_count)]
    assert kinds == [receipt.TOPUP, receipt.COMMAND, receipt.COMMAND]
    assert ledger.pending_rejections == {errors.WRONG_DEVICE: 1}
