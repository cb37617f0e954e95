# The credit ledger on a fake NOR flash (both VMs): every voucher check, idempotent
# resubmission, emergency credit, metering, supply, and rejection recording.
from tests.firmware._meterkit import (Kit, issue, DEVICE, OTHER_DEVICE, STRANGER_SEED, T0)
from tests.protocol._support import expect_rejected

from meter import config as cfg, provisioning
from meter.ledger import CHECKPOINT_MP, REJECTIONS_RECEIPT_SECONDS
from protocol import errors, receipt, voucher


def test_top_up_applies_once_with_a_signed_chained_receipt():
    kit = Kit(initial=1000)
    ledger = kit.ledger
    raw, dup = ledger.submit(issue(1, 2550))
    assert not dup
    r = receipt.verify(raw, kit.meter_keys())
    assert (r.kind, r.index, r.sequence, r.amount) == (receipt.TOPUP, 0, 1, 2550)
    assert (r.balance_before, r.balance_after) == (1000000, 3550000)
    assert r.prev == receipt.GENESIS and r.device == DEVICE and r.time == T0
    assert r.voucher == voucher.reference(issue(1, 2550))
    assert ledger.balance_mp == 3550000 and ledger.receipt_count == 1 and ledger.highest == 1
    # survives a reboot
    ledger = kit.reboot()
    assert ledger.balance_mp == 3550000 and ledger.receipt_count == 1
    raw2, _ = ledger.submit(issue(2, 100))
    r2 = receipt.verify(raw2, kit.meter_keys())
    assert r2.index == 1 and r2.prev == r.hash and r2.balance_before == 3550000


def test_resubmission_returns_the_original_receipt_and_changes_nothing():
    kit = Kit()
    v = issue(5, 700)
    first, _ = kit.ledger.submit(v)
    kit.clock.now += 30
    programs = kit.flash.programs
    again, dup = kit.ledger.submit(v)
    assert dup and again == first
    assert kit.ledger.balance_mp == 1700000 and kit.ledger.receipt_count == 1
    assert kit.flash.programs == programs
    # also after a reboot, and after later vouchers moved the window on
    kit.reboot()
    for seq in (6, 7, 9):
        kit.ledger.submit(issue(seq, 1))
    again, dup = kit.ledger.submit(v)
    assert dup and again == first


def test_out_of_order_inside_the_window_and_stale_below_it():
    kit = Kit(initial=0, limits={cfg.C_MAX_CREDIT: 10 ** 6})
    ledger = kit.ledger
    ledger.submit(issue(70, 1))
    ledger.submit(issue(10, 1))        # 70 - 64 = 6: still inside
    ledger.submit(issue(69, 1))
    assert ledger.balance_mp == 3000
    expect_rejected(errors.STALE, ledger.submit, issue(5, 1))
    assert ledger.balance_mp == 3000 and ledger.receipt_count == 3


def test_a_different_voucher_with_a_used_sequence_is_refused():
    kit = Kit()
    kit.ledger.submit(issue(3, 500))
    expect_rejected(errors.SEQUENCE_REUSED, kit.ledger.submit, issue(3, 501))
    assert kit.ledger.balance_mp == 1500000


def test_every_bad_voucher_is_refused_with_its_reason_and_changes_nothing():
    kit = Kit(initial=1000, limits={cfg.C_MAX_VOUCHER: 5000, cfg.C_MAX_CREDIT: 8000})
    ledger = kit.ledger
    good = issue(1, 100)
    tampered = bytearray(good)
    tampered[-1] ^= 1
    cases = [
        (errors.MALFORMED, b"\xd2\x84"),
        (errors.MALFORMED, good + b"\x00"),
        (errors.BAD_SIGNATURE, bytes(tampered)),
        (errors.UNKNOWN_KEY, issue(1, 100, seed=STRANGER_SEED)),
        (errors.WRONG_DEVICE, issue(1, 100, device=OTHER_DEVICE)),
        (errors.OVER_VOUCHER_LIMIT, issue(1, 5001)),
        (errors.EXPIRED, issue(1, 100, expires=T0)),
        (errors.OVER_CREDIT_LIMIT, issue(1, 5000)),
    ]
    # Fill to 6000 p of the 8000 p ceiling, so that another 5000 p is over it.
    ledger.submit(issue(2, 5000))
    programs = kit.flash.programs
    balance = ledger.balance_mp
    for reason, data in cases:
        expect_rejected(reason, ledger.submit, data)
        assert ledger.balance_mp == balance and ledger.receipt_count == 1
    assert kit.flash.programs == programs          # rejections cost no flash writes
    counts = ledger.pending_rejections
    assert counts[errors.MALFORMED] == 2 and counts[errors.OVER_CREDIT_LIMIT] == 1
    assert sum(counts.values()) == len(cases)


def test_rejections_are_recorded_rate_limited():
    kit = Kit()
    ledger = kit.ledger
    for _ in range(500):
        expect_rejected(errors.MALFORMED, ledger.submit, b"\xff")
    assert ledger.record_rejections(T0 + 10) is None               # within the hour
    raw = ledger.record_rejections(T0 + REJECTIONS_RECEIPT_SECONDS)
    r = receipt.verify(raw, kit.meter_keys())
    assert r.kind == receipt.REJECTIONS and r.rejections == {errors.MALFORMED: 500}
    assert ledger.pending_rejections == {}
    expect_rejected(errors.MALFORMED, ledger.submit, b"\xff")
    assert ledger.record_rejections(T0 + REJECTIONS_RECEIPT_SECONDS + 60) is None
    assert ledger.receipt_count == 1


def test_metering_is_exact_and_checkpointed():
    # 24.50 p/kWh and 60.00 p/day: 1 Wh costs 24.5 mp, so two Wh cost exactly 49 mp.
    kit = Kit(initial=1000)
    ledger = kit.ledger
    ledger.meter(1, T0)
    assert ledger.balance_mp == 1000000 - 24          # 0.5 mp carried, not rounded away
    ledger.meter(1, T0)
    assert ledger.balance_mp == 1000000 - 49
    ledger.meter(0, T0 + 86400)                        # one day of standing charge
    assert ledger.balance_mp == 1000000 - 49 - 60000   # checkpointed: 20 p or more unsaved
    assert kit.reboot().balance_mp == 1000000 - 49 - 60000
    # a power cut loses at most the unsaved consumption, below the checkpoint threshold
    kit.ledger.meter(100, T0 + 86400)
    assert kit.ledger.balance_mp == 1000000 - 49 - 60000 - 2450
    assert kit.reboot().balance_mp == 1000000 - 49 - 60000
    assert 2450 < CHECKPOINT_MP


def test_supply_cut_at_zero_and_restored_by_a_top_up():
    kit = Kit(initial=1)
    ledger = kit.ledger
    assert ledger.supply_on()
    ledger.meter(41, T0)                               # 41 Wh = 1004.5 mp > 1 p
    assert not ledger.supply_on() and ledger.balance_mp < 0
    ledger.submit(issue(1, 100))
    assert not ledger.supply_on() and ledger.supply_state == 1    # armed (SPEC §9)
    assert ledger.confirm_supply() == 2 and ledger.supply_on()


def test_emergency_credit_taken_when_low_and_repaid_first():
    kit = Kit(initial=1000)
    ledger = kit.ledger
    expect_rejected(errors.EC_UNAVAILABLE, ledger.take_emergency_credit)   # £10 > £1 threshold
    ledger.meter(40000, T0)                            # 40 kWh = £9.80
    assert ledger.balance_mp == 20000
    raw = ledger.take_emergency_credit()
    r = receipt.verify(raw, kit.meter_keys())
    assert (r.kind, r.amount, r.balance_before, r.balance_after) == (receipt.EMERGENCY, 500, 20000, 20000)
    expect_rejected(errors.EC_UNAVAILABLE, ledger.take_emergency_credit)   # once until repaid
    ledger.meter(20000, T0)                            # £4.90 more: balance −£4.70
    assert ledger.balance_mp == -470000 and ledger.supply_on()
    ledger.meter(2000, T0)                             # −£5.19: past the emergency amount
    assert not ledger.supply_on()
    assert kit.reboot().emergency_mp == 500000
    ledger = kit.ledger
    raw, _ = ledger.submit(issue(1, 1000))             # the top-up fills the hole first
    assert ledger.emergency_mp == 0 and ledger.supply_state == 1 and not ledger.supply_on()
    r = receipt.verify(raw, kit.meter_keys())
    assert r.balance_after == r.balance_before + 1000000 and r.balance_after > 0


def test_provisioning_runs_once_unless_factory_reset():
    kit = Kit()
    from tests.firmware._meterkit import _ProvisioningBoard, public, ISSUER_SEED
    try:
        provisioning.provision(kit.store, _ProvisioningBoard(kit.clock), DEVICE, [public(ISSUER_SEED)])
    except provisioning.ProvisioningError as e:
        assert "factory reset" in str(e)
    else:
        raise AssertionError("provisioned twice")
    old_key = kit.public_key
    provisioning.factory_reset(kit.store)
    assert not kit.reboot().provisioned
    expect_rejected(errors.NOT_PROVISIONED, kit.ledger.submit, issue(1, 100))
    new_key = provisioning.provision(kit.store, _ProvisioningBoard(kit.clock, seed=99), DEVICE,
                                     [public(ISSUER_SEED)], None, 0, T0)
    assert new_key != old_key
    assert kit.reboot().balance_mp == 0 and kit.ledger.receipt_count == 0


def test_provisioning_rejects_bad_arguments():
    kit = Kit()
    provisioning.factory_reset(kit.store)
    kit.reboot()
    from tests.firmware._meterkit import _ProvisioningBoard, public, ISSUER_SEED
    board = _ProvisioningBoard(kit.clock)
    bad = [
        (b"short", [public(ISSUER_SEED)], None, 0),
        (DEVICE, [], None, 0),
        (DEVICE, [b"x" * 31], None, 0),
        (DEVICE, [public(ISSUER_SEED)], {99: 1}, 0),
        (DEVICE, [public(ISSUER_SEED)], {cfg.C_MAX_CREDIT: 0}, 0),
        (DEVICE, [public(ISSUER_SEED)], None, -1),
        (DEVICE, [public(ISSUER_SEED)], {cfg.C_MAX_CREDIT: 100}, 101),
        (DEVICE, [public(ISSUER_SEED)], None, True),     # a bool is not an amount, on every VM
    ]
    for device, trust, limits, initial in bad:
        try:
            provisioning.provision(kit.store, board, device, trust, limits, initial, T0)
        except provisioning.ProvisioningError:
            continue
        raise AssertionError("accepted %r" % ((device, trust, limits, initial),))
    assert kit.store.config is None


def test_repl_entry_point_provisions_and_prints_the_key():
    import binascii
    from boards.fake import Board
    from tests.firmware._meterkit import public, ISSUER_SEED
    board = Board(now=T0)
    key = provisioning.provision_board("70b3d5f0000000a1", [binascii.hexlify(public(ISSUER_SEED)).decode()],
                                       {cfg.C_MAX_CREDIT: 9000}, 250, board=board)
    assert len(key) == 32
    from meter.store import Store
    from meter.ledger import Ledger
    store = Store(board.flash)
    store.mount()
    ledger = Ledger(store, board.time)
    assert ledger.device == DEVICE and ledger.balance_mp == 250000 and ledger.max_credit == 9000
    assert ledger.public_key == key
    provisioning.factory_reset_board(board=board)
    store = Store(board.flash)
    store.mount()
    assert store.config is None
