"""A seeded random workload with random power cuts against the ledger (CPython,
Hypothesis): thousands of operations, and after every step the meter's books must
balance exactly — balance = opening + Σ applied top-ups − metered charges, no voucher
or keypad code applied twice, no credit from nowhere, the receipt chain intact — and
the supply must agree with the credit: never on without credit, never back on after a
power cut by itself (SPEC §9); the code lockout stays within its bounds (SPEC §8)."""
from hashlib import sha256

import nacl.signing
from tests.soak import examples
from hypothesis import HealthCheck, given, settings, strategies as st

import tests.firmware._fw  # noqa: F401
from boards.nor import PowerCut
from meter import config as cfg, supply
from protocol import cose, errors, keycode, receipt, voucher
from tests.firmware._meterkit import DEVICE, ISSUER_SEED, OTHER_DEVICE, Kit, T0, supplier_code_key

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
    st.tuples(st.just("code"), st.integers(1, 3000)),             # a right keypad code
    st.tuples(st.just("code_again"), st.integers(0, 10 ** 6)),    # typed again
    st.tuples(st.just("code_wrong"), st.integers(0, 10 ** 6)),
    st.tuples(st.just("code_typo"), st.integers(0, 10 ** 6)),
    st.tuples(st.just("press"), st.just(0)),                      # the button: confirm or EC
    st.tuples(st.just("confirm"), st.just(0)),                    # the PPMID confirms
)
ON = 2


class Books:
    def __init__(self, kit):
        self.kit = kit
        self.issued = {}          # seq -> (bytes, amount)
        self.next_seq = 1
        self.applied = {}         # seq -> amount, from every committed receipt ever seen
        self.seen = {}            # receipt index -> raw bytes
        self.pulses = 0
        self.certain = set()      # sequences whose submit returned a new receipt
        self.codes = {}           # seq -> the code's digits (codes share the sequences)
        self.key = supplier_code_key(kit.ka_public)

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
                    is_code = r.sequence in self.codes
                    assert r.form == (2 if is_code else None)
                    if is_code:
                        ref = sha256(b"OTU1 code " + self.codes[r.sequence].encode()).digest()[:16]
                        assert r.voucher == ref
                    self.applied[r.sequence] = r.amount
                if r.kind in (receipt.TOPUP, receipt.EMERGENCY):
                    assert r.supply in (0, 1, 2)
                    credit = r.balance_after + (ledger.ec_amount * 1000 if r.kind == receipt.EMERGENCY
                                                else 0)
                    assert r.supply == 0 or credit > 0 or r.kind == receipt.TOPUP
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
        # the supply: on or armed only with credit above zero
        credit = ledger.balance_mp + ledger.emergency_mp
        assert ledger.supply_state in (0, 1, 2)
        assert ledger.supply_state == 0 or credit > 0, (ledger.supply_state, credit)
        assert ledger.supply_state != 0 or credit <= 0 or not self.steady, (ledger.supply_state, credit)
        # the lockout: within its bounds
        assert 0 <= ledger.code_tries_left <= 5
        assert 0 <= ledger.code_locked_for <= 7 * 86400


def _code(books, seq, amount, device=DEVICE):
    return keycode.encode(books.key, device, amount, seq)


_CODE_REFUSALS = (errors.OVER_CREDIT_LIMIT, errors.STALE, errors.CODE_LOCKED, errors.STORAGE)


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
    elif kind in ("old", "tampered") and len(books.issued) > len(books.codes):
        seqs = sorted(s for s in books.issued if s not in books.codes)     # the vouchers
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
    elif kind == "code":
        seq = books.next_seq
        books.next_seq += 1
        digits = _code(books, seq, arg)
        books.issued[seq] = (digits, arg)
        books.codes[seq] = digits
        try:
            raw, dup = ledger.submit_code(keycode.grouped(digits))
            assert not dup
            books.certain.add(seq)
        except errors.Rejected as e:
            assert e.reason in _CODE_REFUSALS, e
    elif kind == "code_again" and books.codes:
        seqs = sorted(books.codes)
        seq = seqs[arg % len(seqs)]
        try:
            raw, dup = ledger.submit_code(books.codes[seq])
            if not dup:
                books.certain.add(seq)
        except errors.Rejected as e:
            assert e.reason in _CODE_REFUSALS, e
    elif kind == "code_wrong":
        left = ledger.code_tries_left
        try:
            ledger.submit_code(_code(books, 1 + arg % 5000, 100, OTHER_DEVICE))
            raise AssertionError("a code for another meter was taken")
        except errors.Rejected as e:
            assert e.reason in (errors.CODE_WRONG, errors.CODE_LOCKED), e
            if e.reason == errors.CODE_WRONG:
                assert e.fields == {3: max(left - 1, 0)}, (e.fields, left)
    elif kind == "code_typo" and books.codes:
        seqs = sorted(books.codes)
        d = books.codes[seqs[arg % len(seqs)]]
        i = arg % 20
        typo = d[:i] + str((int(d[i]) + 1 + arg % 9) % 10) + d[i + 1:]
        left = ledger.code_tries_left
        try:
            ledger.submit_code(typo)
            raise AssertionError("a typo was taken")
        except errors.Rejected as e:
            assert e.reason in (errors.CODE_TYPO, errors.CODE_LOCKED), e
        assert ledger.code_tries_left == left
    elif kind == "press":
        try:
            supply.press(ledger)
        except errors.Rejected as e:
            assert e.reason == errors.EC_UNAVAILABLE
    elif kind == "confirm":
        ledger.confirm_supply()


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=50, max_size=150), st.integers(0, 2 ** 16))
def test_books_balance_through_random_work_and_power_cuts(ops, seed):
    kit = Kit(initial=OPENING, limits={cfg.C_MAX_CREDIT: 20000, cfg.C_MAX_VOUCHER: 3000},
              codes=True)
    kit.flash.seed = seed
    books = Books(kit)
    books.steady = True
    cut_next = None
    for kind, arg in ops:
        if kind == "cut":
            cut_next = arg
            continue
        if cut_next is not None:
            kit.flash.cut_after(cut_next)
        before = kit.ledger.supply_state
        try:
            _run(books, kind, arg)
        except PowerCut:
            kit.reboot()
            # a cut never switches the supply on by itself: only a confirmation or
            # emergency credit, whose commit the cut may or may not have let land
            if before != ON and kind not in ("press", "confirm", "button"):
                assert kit.ledger.supply_state != ON, (kind, before)
        finally:
            kit.flash.cut_after(None)
            cut_next = None
        books.check()
    kit.reboot()
    books.check()
