# Money-safety under faults that are not clean power cuts (issue 8), on both VMs: factory
# resets that must not re-open a sequence, flash damage under the ledger, running out of
# memory, resubmission after expiry, the signature back-off, a HAN flood against the main
# loop, and a board clock that restarts after a power cut.
#
# The rules the tests hold the code to are written out here, not taken from it:
#   balance = opening + Σ applied amounts − energy − standing charge (milli-pence, floors);
#   energy(Wh) = ⌊Wh × unit rate / 1000⌋; standing(s) = ⌊s × daily charge / 86400⌋;
#   a sequence applies at most once, ever, on a device, whatever resets happen.
import sys

import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)
from tests.firmware._meterkit import (Kit, Clock, issue, public, DEVICE, ISSUER_SEED, STRANGER_SEED,
                                      T0, _ProvisioningBoard)
from tests.protocol._support import expect_rejected

from boards.fake import Board
from boards.nor import NorFlash, PowerCut
from meter import config as cfg, provisioning
from meter.app import Meter
from meter.clock import MeterClock, MAX_SIGNED_STEP
from meter.ledger import Ledger, CHECKPOINT_MP
from meter.store import Store
from protocol import cose, ed25519, errors, han, receipt

MPY = sys.implementation.name == "micropython"
UNIT_RATE = 24500        # milli-pence per kWh (config default)
STANDING = 60000         # milli-pence per day (config default)
EPOCH_2000 = 946684800   # where an ESP32's clock restarts after a power cut


def _energy(wh):
    return wh * UNIT_RATE // 1000


def _standing(seconds):
    return seconds * STANDING // 86400


def _tampered(seq, amount=100):
    v = bytearray(issue(seq, amount))
    v[-1] ^= 1
    return bytes(v)


def _newest(data, blob):
    pos = bytes(data).rfind(blob)
    assert pos >= 0
    return pos


def _receipt_at(kit, index):
    raw = kit.store.receipt(index)
    assert raw is not None, index
    return receipt.parse(raw)


# --- factory reset and re-provisioning ------------------------------------------------------
def _reprovision(kit, floor=0, first_index=0, seed=99, now=T0 + 100):
    key = provisioning.provision(kit.store, _ProvisioningBoard(kit.clock, seed=seed), DEVICE,
                                 [public(ISSUER_SEED)], None, 0, now, floor, first_index)
    kit.reboot()
    return key


def test_a_factory_reset_never_reopens_a_sequence():
    kit = Kit(initial=0)
    old_key = kit.public_key
    for seq in (1, 3):
        kit.ledger.submit(issue(seq, 1000))
    old = [kit.store.receipt(i) for i in (0, 1)]
    provisioning.factory_reset(kit.store)
    kit.reboot()
    assert not kit.ledger.provisioned
    # the supplier had also issued 4 and 5, never applied: its floor covers them
    new_key = _reprovision(kit, floor=5)
    assert new_key != old_key
    for seq in (1, 2, 3, 4, 5):
        expect_rejected(errors.STALE, kit.ledger.submit, issue(seq, 1000))
    assert kit.ledger.balance_mp == 0 and kit.ledger.floor == 5
    raw, dup = kit.ledger.submit(issue(6, 250))
    r = receipt.verify(raw, {cose.kid_for(new_key): new_key})
    # receipt numbers continue; the new key's chain starts afresh (a new epoch, not a fork)
    assert not dup and r.index == 2 and r.prev == receipt.GENESIS and r.balance_after == 250000
    # the old receipts still verify with the old key
    for raw_old in old:
        assert receipt.verify(raw_old, {cose.kid_for(old_key): old_key}).device == DEVICE


def test_the_meter_keeps_its_own_floor_when_the_supplier_gives_none():
    kit = Kit(initial=0)
    for seq in (2, 7):
        kit.ledger.submit(issue(seq, 100))
    provisioning.factory_reset(kit.store)
    kit.reboot()
    _reprovision(kit, floor=0, first_index=0)
    for seq in (1, 2, 3, 7):
        expect_rejected(errors.STALE, kit.ledger.submit, issue(seq, 100))
    raw, _ = kit.ledger.submit(issue(8, 100))
    assert receipt.parse(raw).index == 2
    # a second reset keeps the higher floor and the count
    provisioning.factory_reset(kit.store)
    kit.reboot()
    _reprovision(kit, seed=5)
    expect_rejected(errors.STALE, kit.ledger.submit, issue(8, 100))
    assert receipt.parse(kit.ledger.submit(issue(9, 100))[0]).index == 3


def test_a_reset_cut_at_any_write_never_reopens_a_sequence():
    base = Kit(initial=0)
    for seq in (1, 2):
        base.ledger.submit(issue(seq, 100))
    n = 0
    while True:
        kit = base.copy(seed=n)
        kit.flash.cut_after(n)
        finished = False
        try:
            provisioning.factory_reset(kit.store)
            _reprovision(kit, floor=0)
            finished = True
        except PowerCut:
            pass
        kit.flash.cut_after(None)
        ledger = kit.reboot()
        if not ledger.provisioned:
            _reprovision(kit, floor=0)
        balance = kit.ledger.balance_mp
        for seq in (1, 2):
            try:
                _, duplicate = kit.ledger.submit(issue(seq, 100))
            except errors.Rejected as e:
                assert e.reason == errors.STALE, (n, e)      # the reset went through
            else:                                            # the old ledger is still there
                assert duplicate, "sequence %d applied again after a cut at write %d" % (seq, n)
        assert kit.ledger.balance_mp == balance
        if finished:
            break
        n += 1
    assert n > 3


# --- flash damage under the ledger ----------------------------------------------------------
def test_a_flipped_bit_in_the_newest_state_is_repaired_and_reported():
    kit = Kit(initial=1000)
    first, _ = kit.ledger.submit(issue(1, 700))
    pos = _newest(kit.flash.data, kit.store.state)
    kit.flash.data[pos + 3] ^= 0x10
    ledger = kit.reboot()
    assert ledger.balance_mp == 1700000 and ledger.highest == 1
    assert ledger.faults.get(1) == 1                        # one record repaired (SPEC §4.1)
    # reported in a signed fault receipt after the top-up's
    assert ledger.receipt_count == 2
    f = receipt.verify(kit.store.receipt(1), kit.meter_keys())
    assert f.kind == receipt.FAULT and f.faults == ledger.faults and f.balance_after == 1700000
    assert ledger.submit(issue(1, 700)) == (first, True)
    # the same damage found again at the next start is not recorded again
    assert kit.reboot().receipt_count == 2


def test_a_destroyed_newest_state_record_rolls_forward_from_its_receipt():
    kit = Kit(initial=1000)
    first, _ = kit.ledger.submit(issue(1, 700))
    pos = _newest(kit.flash.data, kit.store.state)
    for k in range(0, len(kit.store.state), 2):
        kit.flash.data[pos + k] ^= 0x5A
    ledger = kit.reboot()
    assert ledger.balance_mp == 1700000 and ledger.highest == 1
    assert ledger.submit(issue(1, 700)) == (first, True)      # never applied twice
    raw, _ = ledger.submit(issue(2, 100))
    r = receipt.verify(raw, kit.meter_keys())
    assert r.prev == receipt.chain_hash(first) and r.balance_before == 1700000
    assert kit.reboot().balance_mp == 1800000


def test_one_config_copy_destroyed_keeps_the_meter_provisioned():
    kit = Kit(initial=801 * 100, limits={cfg.C_MAX_CREDIT: 100000})
    pos = bytes(kit.flash.data).find(kit.store.config)
    for k in range(0, len(kit.store.config), 3):
        kit.flash.data[pos + k] ^= 0xFF
    ledger = kit.reboot()
    assert ledger.provisioned and ledger.balance_mp == 80100000 and ledger.supply_on()
    assert ledger.faults.get(3)                            # a config copy lost, and reported
    ledger.submit(issue(1, 100))
    assert ledger.balance_mp == 80200000
    assert kit.reboot().provisioned


def test_a_lost_receipt_is_not_a_different_voucher():
    kit = Kit(initial=0)
    first, _ = kit.ledger.submit(issue(1, 100))
    kit.ledger.submit(issue(2, 100))
    pos = bytes(kit.flash.data).find(first)
    for k in range(0, len(first), 2):
        kit.flash.data[pos + k] ^= 0xA5
    ledger = kit.reboot()
    assert ledger.balance_mp == 200000
    e = expect_rejected(errors.RECEIPT_LOST, ledger.submit, issue(1, 100))
    assert ledger.balance_mp == 200000 and ledger.faults
    assert e.reason == errors.RECEIPT_LOST


# --- resources -------------------------------------------------------------------------------
def test_running_out_of_memory_is_busy_and_never_counted_against_the_voucher():
    kit = Kit(initial=0)
    real_verify, real_sign = ed25519.verify, ed25519.sign

    def no_memory(*args):
        raise MemoryError()
    v = issue(1, 100)
    try:
        for where in ("verify", "sign"):
            if where == "verify":
                ed25519.verify = no_memory
            else:
                ed25519.sign = no_memory
            expect_rejected(errors.BUSY, kit.ledger.submit, v)
            ed25519.verify, ed25519.sign = real_verify, real_sign
            assert kit.ledger.balance_mp == 0 and kit.ledger.receipt_count == 0
            assert kit.ledger.pending_rejections == {}
    finally:
        ed25519.verify, ed25519.sign = real_verify, real_sign
    raw, dup = kit.ledger.submit(v)
    assert not dup and kit.ledger.balance_mp == 100000


def test_the_han_answers_busy_when_memory_runs_out():
    board = Board(now=T0)
    store = Store(board.flash)
    store.mount()
    provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 0)
    meter = Meter(board, log=lambda m: None)
    real = ed25519.verify

    def no_memory(*args):
        raise MemoryError()
    ed25519.verify = no_memory
    try:
        board.feed(han.encode_message(han.SUBMIT, 9, {1: issue(1, 100)}))
        meter.step()
    finally:
        ed25519.verify = real
    [body] = han.Deframer().feed(board.take_output())
    assert han.decode_message(body) == (han.ERROR, 9, {1: errors.BUSY})
    board.feed(han.encode_message(han.SUBMIT, 10, {1: issue(1, 100)}))
    meter.step()
    [body] = han.Deframer().feed(board.take_output())
    assert han.decode_message(body)[0] == han.SUBMIT | han.RESPONSE


# --- resubmission whatever the time -----------------------------------------------------------
def test_an_applied_voucher_gets_its_receipt_after_its_expiry_and_during_a_back_off():
    kit = Kit(initial=0)
    v = issue(1, 100, expires=T0 + 60)
    first, _ = kit.ledger.submit(v)
    kit.clock.now = T0 + 30 * 86400
    assert kit.ledger.submit(v) == (first, True)
    for seq in (7, 8, 9, 10):
        try:
            kit.ledger.submit(_tampered(seq))
        except errors.Rejected:
            pass
    expect_rejected(errors.BUSY, kit.ledger.submit, issue(11, 100))
    assert kit.ledger.submit(v) == (first, True)
    assert kit.reboot().submit(v) == (first, True)


# --- signature back-off -----------------------------------------------------------------------
def test_bad_signatures_pause_checks_for_a_growing_time_that_a_reboot_keeps():
    kit = Kit(initial=0)
    ledger = kit.ledger
    for seq in (1, 2, 3):
        expect_rejected(errors.BAD_SIGNATURE, ledger.submit, _tampered(seq))
    # the third in a row paused checks for 1 s; vouchers under a trusted key wait
    expect_rejected(errors.BUSY, ledger.submit, _tampered(4))
    expect_rejected(errors.BUSY, ledger.submit, issue(5, 100))
    # a key the meter does not trust costs no check and is not paused
    expect_rejected(errors.UNKNOWN_KEY, ledger.submit, issue(5, 100, seed=STRANGER_SEED))
    kit.clock.now += 1
    expect_rejected(errors.BAD_SIGNATURE, ledger.submit, _tampered(4))    # now 2 s
    kit.clock.now += 1
    expect_rejected(errors.BUSY, ledger.submit, issue(5, 100))
    ledger.checkpoint()
    ledger = kit.reboot()
    expect_rejected(errors.BUSY, ledger.submit, issue(5, 100))            # kept across a reboot
    kit.clock.now += 1
    ledger.submit(issue(5, 100))                                          # the streak is over
    expect_rejected(errors.BAD_SIGNATURE, ledger.submit, _tampered(6))
    ledger.submit(issue(6, 100))
    assert ledger.balance_mp == 200000 - _standing(3)
    counts = ledger.pending_rejections
    assert counts[errors.BAD_SIGNATURE] == 5 and errors.BUSY not in counts


# --- a HAN flood against the main loop ----------------------------------------------------------
def test_a_han_flood_for_an_hour_neither_stops_metering_nor_keeps_the_supply_on():
    opening = 20000                               # 20 p
    board = Board(now=T0)
    store = Store(board.flash)
    store.mount()
    provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, opening // 1000)
    meter = Meter(board, log=lambda m: None)
    frames = b"".join(han.encode_message(han.SUBMIT, i, {1: _tampered(i + 1)}) for i in range(8))
    step_s = 10 if MPY else 1                      # MicroPython (wasm) is slower: coarser steps
    wh = 0
    bad_signatures = 0
    off_when_due = True
    for t in range(0, 3600, step_s):
        # the PPMID's side floods faster than the meter reads: a UART keeps ~2 KB
        while board.han.pending() < 2048:
            board.feed(frames)
        due = (t + step_s) * 1000 // 3600           # a 1 kW load: 1 Wh every 3.6 s
        board.add_pulses(due - wh)
        wh = due
        board.advance(step_s)
        meter.step()
        for body in han.Deframer().feed(board.take_output()):
            if han.decode_message(body)[2].get(1) == errors.BAD_SIGNATURE:
                bad_signatures += 1
        expected = opening - _energy(wh) - _standing(t + step_s)
        assert meter.ledger.balance_mp == expected, (t, meter.ledger.balance_mp, expected)
        if expected <= 0 and board.relay_on:
            off_when_due = False
    assert expected <= 0 and off_when_due and not board.relay_on
    # signature checks stayed rare: the back-off grew to its cap within minutes
    assert 3 <= bad_signatures <= 3 + 9 + 3600 // 256 + 1, bad_signatures
    # and checkpoints kept their schedule: a power cut now loses less than the bound
    after_cut = Meter(Board(now=board.now, flash=board.flash), log=lambda m: None).ledger.balance_mp
    assert 0 <= after_cut - meter.ledger.balance_mp <= CHECKPOINT_MP


# --- meter time on a board whose clock restarts after a power cut ---------------------------------
def _lost_clock_ledger(kit):
    kit.store = Store(kit.flash)
    kit.store.mount()
    kit.ledger = Ledger(kit.store, MeterClock(kit.clock, survives=False))
    return kit.ledger


def test_meter_time_resumes_at_its_floor_and_the_gap_is_never_charged():
    kit = Kit(initial=1000)
    ledger = _lost_clock_ledger(kit)
    kit.clock.now = T0 + 86400
    ledger.meter(0, ledger.clock())                       # 60 p: checkpointed at once
    assert ledger.balance_mp == 1000000 - _standing(86400)
    kit.clock.now = EPOCH_2000 + 12                       # the RTC restarted after a cut
    ledger = _lost_clock_ledger(kit)
    assert ledger.clock() == T0 + 86400 and ledger.clock.reset_at_boot
    kit.clock.now += 3600                                 # it runs on from there
    ledger.meter(0, ledger.clock())
    assert ledger.clock() == T0 + 86400 + 3600
    assert ledger.balance_mp == 1000000 - _standing(86400 + 3600)
    # a voucher issued 3 days ahead moves meter time on; the step is not charged
    raw, _ = ledger.submit(issue(1, 100, issued=T0 + 4 * 86400))
    assert receipt.parse(raw).time == T0 + 86400 + 3600 and ledger.clock() == T0 + 4 * 86400
    ledger.meter(0, ledger.clock())
    assert ledger.balance_mp == 1100000 - _standing(86400 + 3600)
    # a far-future issue time moves it at most MAX_SIGNED_STEP and drains nothing
    raw, _ = ledger.submit(issue(2, 100, issued=1 << 40))
    assert receipt.parse(raw).time == T0 + 4 * 86400
    assert ledger.clock() == T0 + 4 * 86400 + MAX_SIGNED_STEP
    ledger.meter(0, ledger.clock())
    assert ledger.balance_mp == 1200000 - _standing(86400 + 3600)


def test_a_board_clock_far_ahead_of_the_floor_is_not_believed():
    kit = Kit(initial=1000)
    kit.clock.now = T0 + 3 * 365 * 86400                  # a dead RTC reading a date years on
    ledger = kit.reboot()
    assert ledger.clock() == T0 and ledger.clock.reset_at_boot
    ledger.meter(0, ledger.clock())
    assert ledger.balance_mp == 1000000


def test_a_clock_that_runs_through_cuts_is_charged_and_provisioning_sets_the_clock():
    board = Board(now=EPOCH_2000 + 5)
    store = Store(board.flash)
    store.mount()
    provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 10, now=T0)
    assert board.now == T0                                # the board's RTC was set
    board.now = T0 + 3600                                 # off for an hour; the RTC kept time
    meter = Meter(board, log=lambda m: None)
    meter.step()
    assert meter.ledger.balance_mp == 10000 - _standing(3600)


class _FlakyFlash(NorFlash):
    """NOR flash whose n-th page program (from arming) raises MemoryError once, as an
    allocation inside the store's write would: what was written before stays."""

    def arm(self, n):
        self._fail_in = n

    def writeblocks(self, block, buf, offset=0):
        n = getattr(self, "_fail_in", None)
        if n is not None:
            if n == 0:
                self._fail_in = None
                raise MemoryError()
            self._fail_in = n - 1
        NorFlash.writeblocks(self, block, buf, offset)


def test_memory_running_out_inside_a_commit_leaves_the_books_exact():
    for n in range(0, 8):
        kit = Kit(initial=0)
        flash = _FlakyFlash(blocks=16, data=bytearray(kit.flash.data))
        kit.flash = flash
        kit.reboot()
        v = issue(1, 300)
        flash.arm(n)
        try:
            raw, dup = kit.ledger.submit(v)
            answered = (raw, dup)
        except errors.Rejected as e:
            assert e.reason == errors.BUSY, (n, e)
            answered = None
        flash.arm(None)
        assert kit.ledger.pending_rejections == {}
        # whatever the first answer, the retry settles it, and the money is right once
        raw, dup = kit.ledger.submit(v)
        if answered is not None:
            assert (raw, dup) == (answered[0], True)
        assert kit.ledger.balance_mp == 300000 and kit.ledger.receipt_count == 1, n
        assert kit.reboot().balance_mp == 300000


def test_a_ledger_without_a_readable_configuration_refuses_every_change_and_says_so():
    from meter.han_server import HanServer
    kit = Kit(initial=1000)
    kit.ledger.submit(issue(1, 100))
    kit.ledger.submit(issue(4, 100))
    config = kit.store.config
    data = kit.flash.data
    pos = bytes(data).find(config)
    while pos >= 0:                                    # both copies, beyond repair
        for k in range(0, len(config), 2):
            data[pos + k] ^= 0x3C
        pos = bytes(data).find(config, pos + 1)
    ledger = kit.reboot()
    assert ledger.damaged and not ledger.provisioned
    expect_rejected(errors.DAMAGED, ledger.submit, issue(5, 100))
    expect_rejected(errors.DAMAGED, ledger.take_emergency_credit)
    assert ledger.supply_on()                          # a flash fault never disconnects
    status = HanServer(ledger, None).status()
    assert status[13] is True and status[9] == ledger.faults and ledger.faults
    # an engineer re-provisions: what the damaged ledger applied stays closed
    provisioning.factory_reset(kit.store)
    kit.reboot()
    _reprovision(kit)
    for seq in (1, 2, 3, 4):
        expect_rejected(errors.STALE, kit.ledger.submit, issue(seq, 100))
    raw, _ = kit.ledger.submit(issue(5, 100))
    assert receipt.parse(raw).index == 2


def test_a_good_signature_ends_the_back_off_streak_even_when_a_later_check_refuses():
    kit = Kit(initial=0)
    ledger = kit.ledger
    for seq in (1, 2):
        expect_rejected(errors.BAD_SIGNATURE, ledger.submit, _tampered(seq))
    from tests.firmware._meterkit import OTHER_DEVICE
    expect_rejected(errors.WRONG_DEVICE, ledger.submit, issue(3, 100, device=OTHER_DEVICE))
    # the streak restarted: two more bad signatures are still free of any pause
    for seq in (4, 5):
        expect_rejected(errors.BAD_SIGNATURE, ledger.submit, _tampered(seq))
    ledger.submit(issue(6, 100))
