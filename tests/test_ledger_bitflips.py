"""Every bit of a small meter's flash flipped in turn, and random multi-bit damage, under
the ledger (CPython; the store-level flips also run inside MicroPython, in
tests/firmware/test_store_faults.py).

The image holds top-ups, an emergency-credit take, a rejections receipt, metering
checkpoints and a ring that has wrapped. The rules, written out here:
  - one flipped bit anywhere: the meter is provisioned, its balance, window and receipts
    are exactly those committed, every applied voucher resubmitted gets its original
    receipt back, none applies twice, and a new voucher still applies;
  - any damage: the meter never crashes; it either holds exactly the committed books, or
    says what it lost (the HAN status's faults, or DAMAGED) -- and even then it never
    credits a voucher twice and never shows more credit than was committed.
The single-bit run takes every 157th bit of the programmed bytes (about 1,000 flips, a
different phase each record); `make soak` (TOPUP_SOAK=20) takes every 7th, and runs more
damage examples.
"""
import random

from hypothesis import HealthCheck, given, settings, strategies as st

import tests.firmware._fw  # noqa: F401
from meter import config as cfg
from protocol import errors, receipt
from tests.firmware._meterkit import Kit, issue
from tests.soak import SCALE, examples

OPENING = 500            # pence
BLOCKS = 6               # 6 x 4 KiB: small, and the ring wraps within the workload


def _image():
    kit = Kit(initial=OPENING, blocks=BLOCKS, limits={cfg.C_MAX_CREDIT: 10 ** 6})
    vouchers = {}
    ledger = kit.ledger
    for seq in range(1, 61):
        v = issue(seq, 100 + seq)
        vouchers[seq] = (v, ledger.submit(v)[0])
        kit.clock.now += 600
        ledger.meter(50, kit.clock.now)
        if seq == 20:
            # spend down below the £1 threshold, then take emergency credit
            ledger.meter((ledger.balance_mp - 50000) * 1000 // 24500 + 1, kit.clock.now)
            ledger.take_emergency_credit()
        if seq % 9 == 0:
            try:
                ledger.submit(b"\xff")
            except errors.Rejected:
                pass
            ledger.record_rejections(kit.clock.now + 3600)
    ledger.checkpoint(kit.clock.now)
    books = {
        "balance": ledger.balance_mp,
        "highest": ledger.highest,
        "count": ledger.receipt_count,
        "ec": ledger.emergency_mp,
        "receipts": {i: kit.store.receipt(i) for i in range(ledger.receipt_count)},
    }
    return kit, vouchers, books


KIT, VOUCHERS, BOOKS = _image()
IMAGE = bytes(KIT.flash.data)
WINDOW_SEQS = [s for s in VOUCHERS if s > BOOKS["highest"] - 64]
# resubmitted after each flip: the oldest and newest in the window, and a few between
PROBE_SEQS = sorted(set(WINDOW_SEQS[::len(WINDOW_SEQS) // 4] + WINDOW_SEQS[-1:]))


def _used_bits():
    """Bit positions in programmed bytes (records); erased 0xFF space is covered by the
    store's own tests."""
    out = []
    for pos, b in enumerate(IMAGE):
        if b != 0xFF:
            out.extend(pos * 8 + k for k in range(8))
    return out


def _damaged_kit(flips):
    kit = KIT.copy()
    for bit in flips:
        kit.flash.data[bit // 8] ^= 1 << (bit % 8)
    kit.reboot()
    return kit


def _exact(kit):
    ledger = kit.ledger
    assert ledger.provisioned and not ledger.damaged
    assert ledger.balance_mp == BOOKS["balance"] and ledger.highest == BOOKS["highest"]
    assert ledger.emergency_mp == BOOKS["ec"]
    # a fault receipt may follow the committed ones; those are unchanged
    assert ledger.receipt_count in (BOOKS["count"], BOOKS["count"] + 1)
    for i, raw in BOOKS["receipts"].items():
        got = kit.store.receipt(i)
        assert got is None or got == raw, i
    for seq in PROBE_SEQS:
        v, first = VOUCHERS[seq]
        assert ledger.submit(v) == (first, True), seq
    raw, dup = ledger.submit(issue(1000, 1))
    assert not dup and receipt.parse(raw).balance_after == BOOKS["balance"] + 1000


def test_every_single_bit_flip_keeps_the_books_exact():
    bits = _used_bits()
    stride = max(1, 157 // SCALE)
    start = random.Random(2026).randrange(stride)
    checked = 0
    for bit in bits[start::stride]:
        kit = _damaged_kit([bit])
        try:
            _exact(kit)
        except AssertionError as e:
            raise AssertionError("bit %d (byte %d): %s" % (bit, bit // 8, e)) from None
        checked += 1
    assert checked >= len(bits) // stride


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(IMAGE) * 8 - 1), min_size=2, max_size=40))
def test_multi_bit_damage_never_doubles_or_invents_credit(flips):
    kit = _damaged_kit(flips)
    ledger = kit.ledger
    if ledger.damaged or not ledger.provisioned:
        # says so, and refuses to change credit
        for seq in (1, 1000):
            try:
                ledger.submit(issue(seq, 1))
            except errors.Rejected as e:
                assert e.reason in (errors.DAMAGED, errors.NOT_PROVISIONED)
            else:
                raise AssertionError("a damaged meter changed credit")
        return
    silent = not ledger.faults
    assert ledger.balance_mp <= BOOKS["balance"] + 50 * 1000 // 40   # at most unsaved metering back
    if silent:
        # nothing reported: then nothing committed may be missing
        assert ledger.balance_mp == BOOKS["balance"] and ledger.highest == BOOKS["highest"]
    for seq in WINDOW_SEQS:
        v, first = VOUCHERS[seq]
        try:
            got, dup = ledger.submit(v)
        except errors.Rejected as e:
            assert not silent and e.reason in (errors.RECEIPT_LOST, errors.STALE, errors.BUSY), (seq, e)
            continue
        assert dup, "voucher %d applied twice" % seq
        assert got == first or not silent
