# Keypad codes at the meter (SPEC.md §8), on both VMs: a right code credits exactly its
# amount through the vouchers' ledger path, typed again it gets its original receipt, and
# the lockout -- 5 consecutive wrong codes lock code entry for 1 h, 2 h, 4 h ... 7 days --
# is kept in the power-safe store so that no power cut, not even one during the check,
# resets it. Vouchers are never locked out.
#
# The rules are written out here, not taken from the code under test:
#   a code's reference = SHA-256("OTU1 code " + its 20 digits)[:16];
#   the n-th lockout of a series lasts min(3600 * 2^(n-1), 604800) s;
#   only a wrong MAC counts; a typo, a short code or letters never do.
from hashlib import sha256

from tests.firmware._meterkit import (Kit, issue, DEVICE, OTHER_DEVICE, T0, CODE_SECRET,
                                      code_public)
from tests.firmware.test_ledger_powercut import _every_cut
from tests.protocol._support import expect_rejected
from boards.nor import PowerCut
from meter import config as cfg
from protocol import errors, receipt, x25519

HOUR = 3600
WEEK = 7 * 86400
STANDING = 60000         # milli-pence per day (the config default)


def _charged(kit):
    # the standing charge since provisioning: floor(seconds * daily charge / 86400)
    return (kit.clock.now - T0) * STANDING // 86400


def _lock(n):
    return min(HOUR * 2 ** (n - 1), WEEK)


def _digits(code):
    return "".join(ch for ch in code if "0" <= ch <= "9")


def _ref(code):
    return sha256(b"OTU1 code " + _digits(code).encode()).digest()[:16]


def _wrong(kit, n=0):
    # A well-formed code (its check digit fits) that is not for this meter.
    return kit.code(1000 + n, 100 + n, device=OTHER_DEVICE)


def _typo(code):
    # One digit changed: the check digit catches it (SPEC §8).
    d = _digits(code)
    i = 7
    return d[:i] + str((int(d[i]) + 3) % 10) + d[i + 1:]


def _commits(kit):
    # Count the store's commits (each is at least one flash record).
    store = kit.store
    count = [0]
    inner = store.commit

    def commit(*args, **kwargs):
        count[0] += 1
        return inner(*args, **kwargs)

    store.commit = commit
    return count


def _fields(e):
    return getattr(e, "fields", {})


# --- provisioning -----------------------------------------------------------------------------
def _hmac(key, msg):
    key = key + bytes(64 - len(key))
    inner = sha256(bytes(b ^ 0x36 for b in key) + msg).digest()
    return sha256(bytes(b ^ 0x5C for b in key) + inner).digest()


def test_provisioning_makes_a_key_agreement_key_and_derives_the_code_key_by_hkdf():
    kit = Kit(initial=0, codes=True)
    c = cfg.decode(kit.store.config)
    ka_public = c[cfg.C_KA_PUBLIC]
    assert len(ka_public) == 32 and c[cfg.C_KA_SEED] != c[cfg.C_SEED]
    assert x25519.public_key(c[cfg.C_KA_SEED]) == ka_public
    # HKDF-SHA-256 (RFC 5869) written out: extract with the salt, one expand block.
    shared = x25519.x25519(CODE_SECRET, ka_public)
    prk = _hmac(b"OTU1 keypad code key v1", shared)
    key = _hmac(prk, DEVICE + code_public() + ka_public + b"\x01")
    assert c[cfg.C_CODE_KEY] == key and c[cfg.C_CODE_SUPPLIER] == code_public()
    assert kit.ledger.code_key == key
    # without a supplier code key the meter still has its key-agreement key, and no code key
    plain = Kit(initial=0)
    c = cfg.decode(plain.store.config)
    assert len(c[cfg.C_KA_PUBLIC]) == 32 and cfg.C_CODE_KEY not in c


def test_a_bad_supplier_code_key_is_refused_at_provisioning():
    from tests.firmware._meterkit import _ProvisioningBoard, Clock, public, ISSUER_SEED
    from boards.nor import NorFlash
    from meter import provisioning
    from meter.store import Store
    for bad in (b"\x01" * 31, "00" * 32, bytes(32)):     # short, text, an all-zero point
        store = Store(NorFlash(blocks=16))
        store.mount()
        try:
            provisioning.provision(store, _ProvisioningBoard(Clock()), DEVICE, [public(ISSUER_SEED)],
                                   None, 0, T0, 0, 0, bad)
        except provisioning.ProvisioningError:
            pass
        else:
            raise AssertionError("provisioned with code key %r" % (bad,))
        assert store.config is None


# --- a right code, and the same code again -----------------------------------------------------
def test_a_right_code_credits_exactly_its_amount_with_a_code_receipt():
    kit = Kit(initial=1000, codes=True)
    code = kit.code(1, 1234)
    raw, dup = kit.ledger.submit_code(code)
    assert dup is False
    r = receipt.verify(raw, kit.meter_keys())
    assert (r.kind, r.sequence, r.amount, r.form, r.supply) == (receipt.TOPUP, 1, 1234, 2, 2)
    assert r.voucher == _ref(code)
    assert (r.balance_before, r.balance_after) == (1000000, 2234000)
    assert kit.ledger.balance_mp == 2234000 and kit.ledger.highest == 1
    assert kit.reboot().balance_mp == 2234000
    # a voucher's receipt says nothing of its form (1, the default) -- the code's says 2
    raw, _ = kit.ledger.submit(issue(2, 10))
    assert receipt.verify(raw, kit.meter_keys()).form is None


def test_a_code_is_accepted_with_spaces_or_dashes_and_out_of_order_in_the_window():
    kit = Kit(initial=0, codes=True)
    kit.ledger.submit_code(kit.code(5, 100))
    c3 = kit.code(3, 50)
    raw, dup = kit.ledger.submit_code(_digits(c3)[:10] + "-" + _digits(c3)[10:])
    assert not dup and receipt.parse(raw).sequence == 3
    raw, dup = kit.ledger.submit_code(" " + _digits(kit.code(4, 25)) + " ")
    assert not dup and kit.ledger.balance_mp == 175000


def test_the_same_code_again_gets_its_original_receipt_and_no_credit():
    kit = Kit(initial=0, codes=True)
    code = kit.code(1, 500)
    first, _ = kit.ledger.submit_code(code)
    count = kit.ledger.receipt_count
    commits = _commits(kit)
    again, dup = kit.ledger.submit_code(_digits(code))          # typed without spaces
    assert (again, dup) == (first, True)
    assert kit.ledger.balance_mp == 500000 and kit.ledger.receipt_count == count
    assert commits[0] == 0                                     # no flash write
    # after a reboot, and while code entry is locked: still the original receipt
    ledger = kit.reboot()
    for n in range(5):
        expect_rejected(errors.CODE_WRONG, ledger.submit_code, _wrong(kit, n))
    assert ledger.code_locked_for > 0
    assert ledger.submit_code(code) == (first, True)
    assert ledger.balance_mp == 500000 and ledger.code_tries_left == 0


def test_a_code_whose_sequence_a_voucher_used_is_refused_and_does_not_count():
    kit = Kit(initial=0, codes=True)
    kit.ledger.submit(issue(7, 100))
    commits = _commits(kit)
    expect_rejected(errors.SEQUENCE_REUSED, kit.ledger.submit_code, kit.code(7, 100))
    assert kit.ledger.balance_mp == 100000 and kit.ledger.code_tries_left == 5
    # Its check wrote the one failure a cut during it would leave; the clear goes with the
    # next checkpoint, so typing it again costs no flash at all (a flood of a replayed old
    # code wears nothing) ...
    assert commits[0] == 1
    for _ in range(10):
        expect_rejected(errors.SEQUENCE_REUSED, kit.ledger.submit_code, kit.code(7, 100))
    assert commits[0] == 1 and kit.ledger.code_tries_left == 5
    # ... and a cut before that checkpoint counts one wrong code, never more
    copy = kit.copy()
    assert copy.reboot().code_tries_left == 4
    kit.ledger.checkpoint()
    assert kit.reboot().code_tries_left == 5


# --- what never counts --------------------------------------------------------------------------
def test_typos_short_codes_and_letters_never_count_and_write_nothing():
    kit = Kit(initial=0, codes=True)
    code = kit.code(1, 100)
    d = _digits(code)
    commits = _commits(kit)
    typos = [d[:i] + str((int(d[i]) + k) % 10) + d[i + 1:] for i in (0, 9, 19) for k in (1, 5)]
    typos += [d[:i] + d[i + 1] + d[i] + d[i + 2:] for i in (0, 10, 18) if d[i] != d[i + 1]]
    for t in typos * 3:
        expect_rejected(errors.CODE_TYPO, kit.ledger.submit_code, t)
    for t in (d[:19], d + "1", "", "    ", d[:19] + "O", "1234 5678 9012 3456 789x", d.replace("5", "S", 1)
              if "5" in d else d[:19] + "S", "+" + d, d[:4] + "." + d[4:]):
        expect_rejected(errors.CODE_INCOMPLETE, kit.ledger.submit_code, t)
    assert commits[0] == 0
    assert kit.ledger.code_tries_left == 5 and kit.ledger.code_locked_for == 0
    # the rejections are counted for the next rejections receipt, like a voucher's
    pending = kit.ledger.pending_rejections
    assert pending[errors.CODE_TYPO] == len(typos) * 3 and pending[errors.CODE_INCOMPLETE] == 9
    raw, dup = kit.ledger.submit_code(code)
    assert not dup and kit.ledger.balance_mp == 100000


def test_stale_codes_below_the_window_or_the_floor_are_refused_and_do_not_count():
    kit = Kit(initial=0, codes=True, floor=40)
    expect_rejected(errors.STALE, kit.ledger.submit_code, kit.code(40, 100))   # at the floor
    expect_rejected(errors.STALE, kit.ledger.submit_code, kit.code(12, 100))   # below it
    kit.ledger.submit(issue(200, 100))                                         # window 136..199
    expect_rejected(errors.STALE, kit.ledger.submit_code, kit.code(135, 100))
    expect_rejected(errors.STALE, kit.ledger.submit_code, kit.code(41, 100))
    raw, dup = kit.ledger.submit_code(kit.code(136, 100))                      # the window's edge
    assert not dup and receipt.parse(raw).sequence == 136
    assert kit.ledger.code_tries_left == 5 and kit.ledger.balance_mp == 200000
    assert kit.reboot().code_tries_left == 5


def test_limits_are_refused_never_truncated_and_do_not_count():
    kit = Kit(initial=1000, codes=True, limits={cfg.C_MAX_CREDIT: 2000, cfg.C_MAX_VOUCHER: 1500})
    expect_rejected(errors.OVER_CREDIT_LIMIT, kit.ledger.submit_code, kit.code(1, 1001))
    expect_rejected(errors.OVER_VOUCHER_LIMIT, kit.ledger.submit_code, kit.code(2, 1501))
    assert kit.ledger.balance_mp == 1000000 and kit.ledger.receipt_count == 0
    assert kit.ledger.code_tries_left == 5
    raw, _ = kit.ledger.submit_code(kit.code(1, 1000))        # exactly up to the ceiling
    assert kit.ledger.balance_mp == 2000000 and receipt.parse(raw).amount == 1000


def _raw_code(kit, kind, amount, seq):
    # A code with any kind and amount under the right MAC, laid out as SPEC §8 says (the
    # issuer's encoder makes only kind 0 with an amount of at least 1).
    from protocol import keycode
    from tests.firmware._meterkit import supplier_code_key
    key = supplier_code_key(kit.ka_public)
    n = ((((kind << 16) | amount) << 14 | (seq & 0x3FFF)) << 31) | keycode.mac(key, DEVICE, kind, amount, seq)
    body = "%019d" % n
    return body + [str(c) for c in range(10) if keycode.damm(body + str(c)) == 0][0]


def test_a_reserved_kind_or_a_zero_amount_under_a_good_mac_is_malformed_and_does_not_count():
    kit = Kit(initial=0, codes=True)
    for kind, amount in ((1, 100), (3, 100), (0, 0)):
        expect_rejected(errors.MALFORMED, kit.ledger.submit_code, _raw_code(kit, kind, amount, 1))
    assert kit.ledger.code_tries_left == 5 and kit.ledger.balance_mp == 0
    assert kit.copy().ledger.code_tries_left == 4     # a cut now: the one pending failure
    kit.ledger.checkpoint()
    assert kit.reboot().code_tries_left == 5
    raw, dup = kit.ledger.submit_code(_raw_code(kit, 0, 100, 1))                 # the layout is right
    assert not dup and kit.ledger.balance_mp == 100000


def test_a_meter_without_a_code_key_says_so_and_takes_vouchers():
    kit = Kit(initial=0)
    code = Kit(initial=0, codes=True).code(1, 100)
    e = expect_rejected(errors.NOT_PROVISIONED, kit.ledger.submit_code, code)
    assert "code key" in e.detail
    assert kit.ledger.code_tries_left == 5 and kit.ledger.balance_mp == 0
    kit.ledger.submit(issue(1, 100))
    assert kit.ledger.balance_mp == 100000


# --- wrong codes and the lockout ----------------------------------------------------------------
def test_five_wrong_codes_lock_code_entry_for_an_hour_and_vouchers_still_apply():
    kit = Kit(initial=0, codes=True)
    ledger = kit.ledger
    for n in range(5):
        kit.clock.now += 10
        e = expect_rejected(errors.CODE_WRONG, ledger.submit_code, _wrong(kit, n))
        assert _fields(e) == {3: 4 - n}
    assert ledger.code_locked_for == HOUR and ledger.code_tries_left == 0
    good = kit.code(1, 300)
    for text in (good, _typo(good), "12"):       # locked: checked for nothing, whatever it is
        e = expect_rejected(errors.CODE_LOCKED, ledger.submit_code, text)
        assert _fields(e) == {2: HOUR}
    raw, dup = ledger.submit(issue(1, 300))      # a voucher is never locked out
    assert not dup and ledger.balance_mp == 300000 - _charged(kit)
    kit.clock.now += HOUR - 1
    e = expect_rejected(errors.CODE_LOCKED, ledger.submit_code, kit.code(2, 300))
    assert _fields(e) == {2: 1}
    kit.clock.now += 1
    assert ledger.code_locked_for == 0 and ledger.code_tries_left == 5
    raw, dup = ledger.submit_code(kit.code(2, 300))
    assert not dup and ledger.balance_mp == 600000 - _charged(kit)


def test_a_code_for_another_meter_or_with_a_forged_mac_is_wrong():
    kit = Kit(initial=0, codes=True)
    e = expect_rejected(errors.CODE_WRONG, kit.ledger.submit_code, kit.code(1, 100, device=OTHER_DEVICE))
    assert _fields(e) == {3: 4}
    # the right fields with a MAC that is off by one (check digit recomputed): wrong
    from protocol import keycode
    body = "%019d" % (int(_digits(kit.code(1, 100))[:19]) ^ 1)
    forged = body + [str(c) for c in range(10) if keycode.damm(body + str(c)) == 0][0]
    e = expect_rejected(errors.CODE_WRONG, kit.ledger.submit_code, forged)
    assert _fields(e) == {3: 3}
    # a number no issuer writes (above 2^63) is wrong too, and counts
    big = "9" * 19
    big += [str(c) for c in range(10) if keycode.damm(big + str(c)) == 0][0]
    e = expect_rejected(errors.CODE_WRONG, kit.ledger.submit_code, big)
    assert _fields(e) == {3: 2} and kit.ledger.balance_mp == 0


def test_lockouts_grow_hour_by_doubling_to_a_week_and_a_good_code_ends_the_series():
    kit = Kit(initial=0, codes=True)
    ledger = kit.ledger
    for n in range(1, 12):
        for k in range(5):
            expect_rejected(errors.CODE_WRONG, ledger.submit_code, _wrong(kit, k))
        assert ledger.code_locked_for == _lock(n), (n, ledger.code_locked_for)
        if n == 3:
            assert kit.reboot().code_locked_for == _lock(3)   # kept on flash
            ledger = kit.ledger
        kit.clock.now += ledger.code_locked_for
    assert _lock(11) == WEEK
    # a good code ends the series: the next lockout is an hour again
    ledger.submit_code(kit.code(1, 100))
    assert ledger.code_tries_left == 5
    assert kit.reboot().code_tries_left == 5
    ledger = kit.ledger
    for k in range(5):
        expect_rejected(errors.CODE_WRONG, ledger.submit_code, _wrong(kit, k))
    assert ledger.code_locked_for == HOUR


def test_wrong_codes_count_consecutively_only_until_a_good_code():
    kit = Kit(initial=0, codes=True)
    ledger = kit.ledger
    for k in range(4):
        expect_rejected(errors.CODE_WRONG, ledger.submit_code, _wrong(kit, k))
    ledger.submit_code(kit.code(1, 100))
    assert ledger.code_tries_left == 5
    # a good code that is refused (already used by a voucher) also ends the series, on flash
    for k in range(4):
        expect_rejected(errors.CODE_WRONG, ledger.submit_code, _wrong(kit, k))
    ledger.submit(issue(2, 10))
    expect_rejected(errors.SEQUENCE_REUSED, ledger.submit_code, kit.code(2, 10))
    assert ledger.code_tries_left == 5
    assert kit.reboot().code_tries_left == 5


def test_the_lockout_survives_power_cuts_and_a_board_clock_that_restarts():
    from meter.clock import MeterClock
    from meter.ledger import Ledger
    from meter.store import Store
    kit = Kit(initial=0, codes=True)
    for k in range(5):
        expect_rejected(errors.CODE_WRONG, kit.ledger.submit_code, _wrong(kit, k))
    kit.clock.now += 600
    assert kit.reboot().code_locked_for == HOUR - 600
    # a board without a battery-backed clock restarts in 2000: meter time resumes at the
    # last commit, so the lock is not shortened by the cut
    kit.clock.now = 946684800
    kit.store = Store(kit.flash)
    kit.store.mount()
    ledger = Ledger(kit.store, MeterClock(kit.clock, survives=False))
    assert ledger.code_locked_for == HOUR
    e = expect_rejected(errors.CODE_LOCKED, ledger.submit_code, kit.code(1, 100))
    assert _fields(e) == {2: HOUR}


def test_a_power_cut_during_the_check_counts_as_a_failure():
    # A right code, cut at every flash write of its submission in turn. After the reboot
    # the meter holds one of three states, never another: nothing written (5 tries), the
    # failure recorded before the MAC check and nothing applied (4 tries: a cut during the
    # check counts), or the code applied with the series cleared (5 tries, credited).
    kit = Kit(initial=0, codes=True)
    code = kit.code(1, 700)
    seen = set()

    def check(trial, completed):
        ledger = trial.ledger
        applied = ledger.balance_mp == 700000
        assert applied or ledger.balance_mp == 0
        assert applied or not completed
        if applied:
            state = "applied"
            assert ledger.code_tries_left == 5 and ledger.receipt_count == 1
        else:
            assert ledger.code_tries_left in (4, 5), ledger.code_tries_left
            state = "counted" if ledger.code_tries_left == 4 else "nothing"
        seen.add(state)
        # the customer types it again: it applies once
        raw, dup = ledger.submit_code(code)
        assert dup == applied and ledger.balance_mp == 700000 and ledger.code_tries_left == 5

    _every_cut(kit, lambda t: t.ledger.submit_code(code), check)
    assert seen == {"nothing", "counted", "applied"}, seen


def test_a_power_cut_during_the_fifth_check_leaves_the_lock():
    kit = Kit(initial=0, codes=True)
    for k in range(4):
        expect_rejected(errors.CODE_WRONG, kit.ledger.submit_code, _wrong(kit, k))
    code = kit.code(1, 700)
    locked = [0]

    def check(trial, completed):
        ledger = trial.ledger
        if ledger.balance_mp == 0:
            assert ledger.code_tries_left == 1 or ledger.code_locked_for == HOUR
            if ledger.code_locked_for:
                locked[0] += 1
                expect_rejected(errors.CODE_LOCKED, ledger.submit_code, code)
        else:
            assert ledger.code_tries_left == 5

    _every_cut(kit, lambda t: t.ledger.submit_code(code), check)
    assert locked[0] >= 1


def test_a_wrong_code_cut_at_any_write_counts_at_most_once():
    kit = Kit(initial=0, codes=True)
    expect_rejected(errors.CODE_WRONG, kit.ledger.submit_code, _wrong(kit, 0))

    def check(trial, completed):
        left = trial.ledger.code_tries_left
        assert left in (3, 4) and (left == 3 or not completed), (left, completed)

    def op(trial):
        try:
            trial.ledger.submit_code(_wrong(trial, 1))
        except errors.Rejected as e:
            assert e.reason == errors.CODE_WRONG

    _every_cut(kit, op, check)


def test_a_flood_of_wrong_codes_over_the_han_keeps_flash_writes_bounded_and_the_lock():
    from tests.firmware.test_han_server import Pipe, _exchange
    from meter.han_server import HanServer
    from protocol import han
    kit = Kit(initial=0, codes=True)
    pipe = Pipe()
    server = HanServer(kit.ledger, pipe, lambda: False)
    commits = _commits(kit)
    answers = {}
    for n in range(200):
        frame = han.encode_message(5, n, {1: _wrong(kit, n % 7)})
        [(t, i, p)] = _exchange(server, pipe, frame)
        assert t == han.ERROR and i == n
        answers[p[1]] = answers.get(p[1], 0) + 1
        kit.clock.now += 1
    assert answers == {errors.CODE_WRONG: 5, errors.CODE_LOCKED: 195}, answers
    assert commits[0] == 5                       # one record per wrong code; none while locked
    assert kit.ledger.code_locked_for == HOUR - (200 - 4)   # locked at the 5th, at +4 s
    # vouchers still apply during the flood's lockout
    [(t, i, p)] = _exchange(server, pipe, han.encode_message(han.SUBMIT, 900, {1: issue(1, 100)}))
    assert t == 0x82 and kit.ledger.balance_mp == 100000 - _charged(kit)


def test_codes_over_the_han_answer_receipts_duplicates_and_error_fields():
    from tests.firmware.test_han_server import Pipe, _exchange
    from meter.han_server import HanServer
    from protocol import han
    kit = Kit(initial=0, codes=True)
    pipe = Pipe()
    server = HanServer(kit.ledger, pipe, lambda: False)
    code = kit.code(1, 250)
    [(t, i, p)] = _exchange(server, pipe, han.encode_message(5, 1, {1: code}))
    assert (t, i, p[2]) == (0x85, 1, False)
    r = receipt.verify(p[1], kit.meter_keys())
    assert r.form == 2 and r.amount == 250 and r.voucher == _ref(code)
    [(t, i, p2)] = _exchange(server, pipe, han.encode_message(5, 2, {1: _digits(code)}))
    assert (t, p2) == (0x85, {1: p[1], 2: True})
    [(t, i, p)] = _exchange(server, pipe, han.encode_message(5, 3, {1: _typo(code)}))
    assert (t, p) == (han.ERROR, {1: errors.CODE_TYPO})
    [(t, i, p)] = _exchange(server, pipe, han.encode_message(5, 4, {1: "1234"}))
    assert (t, p) == (han.ERROR, {1: errors.CODE_INCOMPLETE})
    [(t, i, p)] = _exchange(server, pipe, han.encode_message(5, 5, {1: _wrong(kit)}))
    assert (t, p) == (han.ERROR, {1: errors.CODE_WRONG, 3: 4})
    for n in range(4):
        _exchange(server, pipe, han.encode_message(5, 6 + n, {1: _wrong(kit, n + 1)}))
    [(t, i, p)] = _exchange(server, pipe, han.encode_message(5, 10, {1: kit.code(2, 10)}))
    assert (t, p) == (han.ERROR, {1: errors.CODE_LOCKED, 2: HOUR})
    [(t, i, p)] = _exchange(server, pipe, han.encode_message(han.STATUS, 11, {}))
    assert (p[16], p[17], p[18]) == (HOUR, 0, True)
    # not a code: BAD_REQUEST, and nothing counted
    for bad in ({}, {1: b"12345678901234567890"}, {1: 12345678901234567890}, {1: None}, {1: ["1"]},
                {2: code}):
        [(t, i, p)] = _exchange(server, pipe, han.encode_message(5, 12, bad))
        assert (t, p) == (han.ERROR, {1: errors.BAD_REQUEST}), (bad, p)
    # a meter that takes no codes says so, and status field 18 says why
    kit2 = Kit(initial=0)
    server2 = HanServer(kit2.ledger, pipe, lambda: False)
    [(t, i, p)] = _exchange(server2, pipe, han.encode_message(5, 13, {1: code}))
    assert (t, p) == (han.ERROR, {1: errors.NOT_PROVISIONED})
    [(t, i, p)] = _exchange(server2, pipe, han.encode_message(han.STATUS, 14, {}))
    assert p[18] is False and p[17] == 5 and p[16] == 0


def test_hostile_code_requests_never_crash_the_server():
    from tests.firmware.test_han_server import Pipe, _exchange
    from meter.han_server import HanServer
    from protocol import han
    kit = Kit(initial=0, codes=True)
    pipe = Pipe()
    server = HanServer(kit.ledger, pipe, lambda: False)
    d = _digits(kit.code(1, 100))
    texts = ["", " " * 900, "-" * 40, d * 2, d[:19] + "\u00e9", "\u0661" * 20, "0" * 20, "9" * 20,
             "\x00" * 20, d[:10] + "\n" + d[10:], "0" * 19 + "0"]
    for n, text in enumerate(texts):
        replies = _exchange(server, pipe, han.encode_message(5, n, {1: text}))
        assert len(replies) == 1 and replies[0][1] == n
    for n, what in enumerate((0, 3, -1, True, False, None, "1", b"\x01", [1], {1: 1}, 2 ** 40)):
        replies = _exchange(server, pipe, han.encode_message(6, 100 + n, {1: what}))
        assert len(replies) == 1 and replies[0][0] == han.ERROR, (what, replies)
        assert replies[0][2] == {1: errors.BAD_REQUEST}, (what, replies)
    assert kit.ledger.balance_mp == 100000     # (the code split by a newline is still the code)


# --- recovery -----------------------------------------------------------------------------------
def test_a_code_receipt_whose_state_record_was_lost_rolls_forward_and_clears_the_series():
    kit = Kit(initial=1000, codes=True)
    for k in range(3):
        expect_rejected(errors.CODE_WRONG, kit.ledger.submit_code, _wrong(kit, k))
    code = kit.code(1, 700)
    first, _ = kit.ledger.submit_code(code)
    state = kit.store.state
    pos = bytes(kit.flash.data).rfind(state)
    for k in range(0, len(state), 2):
        kit.flash.data[pos + k] ^= 0x5A
    ledger = kit.reboot()
    assert ledger.balance_mp == 1700000 and ledger.highest == 1
    assert ledger.code_tries_left == 5                       # the code's receipt ended the series
    assert ledger.submit_code(code) == (first, True)         # never applied twice
    assert kit.reboot().balance_mp == 1700000


def test_a_cut_between_a_code_receipt_and_its_state_rolls_forward():
    # The state record is the commit point: a cut after the receipt landed leaves an
    # orphan receipt that is taken as committed at the next start (SPEC §4.1).
    kit = Kit(initial=0, codes=True)
    for k in range(2):
        expect_rejected(errors.CODE_WRONG, kit.ledger.submit_code, _wrong(kit, k))
    code = kit.code(3, 400)
    n = 0
    rolled = 0
    while True:
        trial = kit.copy(seed=n)
        trial.flash.cut_after(n)
        try:
            trial.ledger.submit_code(code)
            done = True
        except PowerCut:
            done = False
        trial.flash.cut_after(None)
        ledger = trial.reboot()
        if ledger.receipt_count == 1:
            assert ledger.balance_mp == 400000 and ledger.code_tries_left == 5
            r = receipt.parse(trial.store.receipt(0))
            assert r.form == 2 and r.voucher == _ref(code)
            rolled += 1
        else:
            assert ledger.balance_mp == 0 and ledger.code_tries_left in (2, 3)
        if done:
            break
        n += 1
    assert rolled >= 2


def test_the_repl_entry_point_takes_the_code_key_and_prints_the_key_agreement_key():
    import binascii
    import sys
    from boards.fake import Board
    from meter import provisioning
    from meter.ledger import Ledger
    from meter.store import Store
    from tests.firmware._meterkit import public, ISSUER_SEED
    trust = [binascii.hexlify(public(ISSUER_SEED)).decode()]
    supplier = binascii.hexlify(code_public()).decode()
    for bad in (supplier[:-2], supplier + "00", "zz" + supplier[2:], "0" * 64):
        board = Board(now=T0)
        try:
            provisioning.provision_board("70b3d5f0000000a1", trust, board=board, code_key_hex=bad)
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
            provisioning.provision_board("70b3d5f0000000a1", trust, board=board, code_key_hex=supplier)
        printed = out.getvalue().split()
    else:
        provisioning.provision_board("70b3d5f0000000a1", trust, board=board, code_key_hex=supplier)
    store = Store(board.flash)
    store.mount()
    c = cfg.decode(store.config)
    ledger = Ledger(store, board.time)
    assert ledger.code_key is not None and c[cfg.C_CODE_SUPPLIER] == code_public()
    if printed:
        assert printed[0::2] == ["PUBLIC", "FIRST", "FLOOR", "KA"], printed
        assert printed[1] == binascii.hexlify(ledger.public_key).decode()
        assert printed[7] == binascii.hexlify(c[cfg.C_KA_PUBLIC]).decode()


def test_the_code_check_leaves_the_heap_after_each_code():
    # On the MicroPython VMs meter.codes and protocol.keycode are loaded for a code and
    # dropped after it, so vouchers between codes have the heap a meter without codes has.
    import sys
    kit = Kit(initial=0, codes=True)
    for text in (kit.code(1, 100), _wrong(kit), "123", kit.code(1, 100)):
        try:
            kit.ledger.submit_code(text)
        except errors.Rejected:
            pass
        if sys.implementation.name == "micropython":
            assert "meter.codes" not in sys.modules and "protocol.keycode" not in sys.modules
    # (the code typed again is its original receipt: before any check, so the wrong one
    # before it still counts)
    assert kit.ledger.balance_mp == 100000 and kit.ledger.code_tries_left == 4
