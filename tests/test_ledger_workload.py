"""A seeded random workload with random power cuts against the ledger (CPython,
Hypothesis): thousands of operations, and after every step the meter's books must
balance exactly — balance = opening + Σ applied top-ups − metered charges, no voucher
applied twice, no credit from nowhere, the receipt chain intact."""
import nacl.signing
from tests.soak import examples
from hypothesis import HealthCheck, given, settings, strategies as st

import tests.firmware._fw  # noqa: F401
from boards.nor import PowerCut
from meter import config as cfg
from protocol import cose, errors, receipt, voucher
from tests.firmware._meterkit import DEVICE, ISSUER_SEED, Kit, T0

ISSUER = nacl.signing.SigningKey(ISSUER_SEED)
KID = cose.kid_for(bytes(ISSUER.verify_key))
OPENING = 2000


def _voucher(seq, amount):
    return voucher.encode(KID, lambda m: ISSUER.sign(m).signature, DEVICE, seq, amount, T0 - 60)


op = st.one_of(
    st.tuples(st.just("new"), st.integers(1, 3000)),
    st.tuples(st.just("old"), st.integers(0, 10 ** 6)),          # resubmit / out of order
    st.tuples(st.just("tampered"), st.integers(0, 10 ** 6)),
    st.tuples(st.just("pulses"), st.integers(1, 3000)),
    st.tuples(st.just("time"), st.integers(1, 7200)),
    st.tuples(st.just("button"), st.just(0)),
    st.tuples(st.just("reboot"), st.just(0)),
    st.tuples(st.just("rejections"), st.just(0)),
    st.tuples(st.just("cut"), st.integers(0, 6)),
)


class Books:
    def __init__(self, kit):
        self.kit = kit
        self.issued = {}          # seq -> (bytes, amount)
        self.next_seq = 1
        self.applied = {}         # seq -> amount, from every committed receipt ever seen
        self.seen = {}            # receipt index -> raw bytes
        self.pulses = 0
        self.certain = set()      # sequences whose submit returned a new receipt

    def check(self):
        kit = self.kit
        ledger = kit.ledger
        state = ledger._state
        keys = kit.meter_keys()
        prev = None
        for index in range(ledger.receipt_count):
            raw = kit.store.receipt(index)
            if raw is None:
                prev = None
                continue
            if index in self.seen:
                assert self.seen[index] == raw, "committed receipt %d changed" % index
            r = receipt.verify(raw, keys)
            assert prev is None or r.prev == prev, "chain broken at %d" % index
            prev = r.hash
            if index not in self.seen:
                self.seen[index] = raw
                if r.kind == receipt.TOPUP:
                    assert r.sequence not in self.applied, "voucher %d applied twice" % r.sequence
                    assert r.sequence in self.issued, "credit from nowhere"
                    assert r.amount == self.issued[r.sequence][1]
                    self.applied[r.sequence] = r.amount
        if ledger.receipt_count:
            assert state[cfg.S_LAST_HASH] == receipt.chain_hash(self.seen[ledger.receipt_count - 1])
        assert self.certain <= set(self.applied)
        window = ledger.window
        for seq in self.applied:
            try:
                assert window.is_used(seq)
            except errors.Rejected:
                pass  # below the window: stale, and still counted once
        energy = (state[cfg.S_WH_TOTAL] * ledger.unit_rate - state[cfg.S_ENERGY_REM]) // 1000
        standing = ((state[cfg.S_CHARGED_TO] - T0) * ledger.standing - state[cfg.S_STANDING_REM]) // 86400
        expected = OPENING * 1000 + 1000 * sum(self.applied.values()) - energy - standing
        assert ledger.balance_mp == expected, (ledger.balance_mp, expected)
        assert state[cfg.S_WH_TOTAL] <= self.pulses
        assert state[cfg.S_EC] in (0, ledger.ec_amount)


def _run(books, kind, arg):
    kit = books.kit
    ledger = kit.ledger
    if kind == "new":
        seq = books.next_seq
        books.next_seq += 1
        books.issued[seq] = (_voucher(seq, arg), arg)
        try:
            raw, dup = ledger.submit(books.issued[seq][0])
            assert not dup
            books.certain.add(seq)
        except errors.Rejected as e:
            # BUSY: tampered vouchers earlier set off the signature back-off (SPEC §5.2)
            assert e.reason in (errors.OVER_CREDIT_LIMIT, errors.STALE, errors.BUSY), e
    elif kind in ("old", "tampered") and books.issued:
        seqs = sorted(books.issued)
        seq = seqs[arg % len(seqs)]
        data = books.issued[seq][0]
        if kind == "tampered":
            data = bytearray(data)
            data[arg % len(data)] ^= 1 << (arg % 8)
            data = bytes(data)
        try:
            raw, dup = ledger.submit(data)
            assert kind == "old" or data == books.issued[seq][0]
            if not dup:
                books.certain.add(seq)
        except errors.Rejected:
            pass
    elif kind == "pulses":
        books.pulses += arg
        kit.flash  # pulses are counted by the meter; a cut loses at most the unsaved part
        ledger.meter(arg, kit.clock.now)
    elif kind == "time":
        kit.clock.now += arg
        ledger.meter(0, kit.clock.now)
    elif kind == "button":
        try:
            ledger.take_emergency_credit()
        except errors.Rejected as e:
            assert e.reason == errors.EC_UNAVAILABLE
    elif kind == "rejections":
        ledger.record_rejections(kit.clock.now)
    elif kind == "reboot":
        kit.reboot()


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=50, max_size=150), st.integers(0, 2 ** 16))
def test_books_balance_through_random_work_and_power_cuts(ops, seed):
    kit = Kit(initial=OPENING, limits={cfg.C_MAX_CREDIT: 20000, cfg.C_MAX_VOUCHER: 3000})
    kit.flash.seed = seed
    books = Books(kit)
    cut_next = None
    for kind, arg in ops:
        if kind == "cut":
            cut_next = arg
            continue
        if cut_next is not None:
            kit.flash.cut_after(cut_next)
        try:
            _run(books, kind, arg)
        except PowerCut:
            kit.reboot()
        finally:
            kit.flash.cut_after(None)
            cut_next = None
        books.check()
    kit.reboot()
    books.check()
