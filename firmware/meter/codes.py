# Keypad codes at the meter (SPEC.md §8): a code's own checks, beside the ledger, which
# applies a code whose MAC fits exactly as it applies a voucher (floor, window, limits,
# signed receipt: Ledger._top_up), with receipt field 13 = 2 and the code's reference in
# field 9. The lockout's state and arithmetic are in meter/lockout.py.
#
# Loaded only when the first code arrives (Ledger.submit_code), with protocol/keycode.py:
# the boot and voucher paths never carry either in their heap.
#
# The order of a code check, and its commits:
#   0. the exact digits of a code already applied: the original receipt, before any check
#      and whatever the lockout (no flash write);
#   -. a meter with no code key: NOT_PROVISIONED (it takes vouchers only);
#   1. code entry locked out: CODE_LOCKED with the seconds left (no flash write);
#   2-3. CODE_INCOMPLETE, CODE_TYPO (no flash write; never towards the lockout);
#   *. COMMIT the lockout state a wrong code would leave (count + 1, a lockout started at
#      the 5th) -- so a power cut, or anything else, during the MAC check counts as a
#      failure; a failed commit answers STORAGE and checks nothing;
#   4. the MAC against the candidate sequences: none fits, CODE_WRONG with the tries left
#      (the commit above is its record). One fits: the series is over -- cleared in RAM,
#      and written by the top-up's own commit (receipt, then state);
#   5-6. MALFORMED, OVER_VOUCHER_LIMIT, then as a voucher STALE, SEQUENCE_REUSED,
#      OVER_CREDIT_LIMIT, or applied.
#
# Flash writes stay bounded under a flood: a wrong code costs one state record, and 5 of
# them start a lockout (1 h, doubling up to 7 days) during which codes cost none. The
# pre-check commit is skipped when the flash already holds exactly the state it would
# write, so a code whose MAC fits but that is refused (an old code typed again, say)
# costs at most one record until the next checkpoint; its clear is committed at once only
# if the flash held more than that one pending failure (a cut then counts one wrong code,
# never more). Every refusal but BUSY and STORAGE is counted in the rejections receipt,
# like a voucher's.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from protocol import errors, keycode, receipt as receipt_format
from protocol.errors import Rejected
from meter import config as cfg, lockout

FIRST_LOCK_SECONDS = const(3600)       # the first lockout of a series; each next doubles
MAX_LOCK_SECONDS = const(604800)       # 7 days
_MAX_LOCKOUTS = const(16)              # the count stops growing (long past the cap)
_ONE_PENDING = (1, 0, 0)               # the record a code whose MAC fitted leaves behind


class Refused(Rejected):
    """A refusal with HAN error fields (SPEC.md §5): {2: seconds locked} or {3: tries left}."""

    def __init__(self, reason, detail, fields):
        super().__init__(reason, detail)
        self.fields = fields


def lock_seconds(n):
    """How long the n-th lockout of a series lasts: 1 h, 2 h, 4 h ... at most 7 days."""
    if n > 8:
        return MAX_LOCK_SECONDS
    t = FIRST_LOCK_SECONDS << (n - 1)
    return MAX_LOCK_SECONDS if t > MAX_LOCK_SECONDS else t


def after_wrong(lock, now):
    """The lockout state (meter/lockout.py) after one more wrong code at meter time now."""
    wrong, lockouts, until = lock
    wrong += 1
    if wrong >= lockout.MAX_WRONG:
        wrong = 0
        if lockouts < _MAX_LOCKOUTS:
            lockouts += 1
        until = now + lock_seconds(lockouts)
    return (wrong, lockouts, until)


def _put(st, lock):
    st[cfg.S_CODE_WRONG] = lock[0]
    st[cfg.S_CODE_LOCKOUTS] = lock[1]
    st[cfg.S_CODE_UNTIL] = lock[2]


def _anchor(ledger):
    # The sequence the candidates are rebuilt around (SPEC.md §8): the highest applied, or
    # the floor when that is above it (after a factory reset nothing is applied yet, and
    # every sequence up to the floor is STALE anyway).
    h = ledger.highest
    f = ledger.floor
    return f if f > h else h


def original(ledger, text):
    """The receipt of these exact digits if they were applied, else None. No MAC check:
    the digits were checked when applied, and the reference is a hash of all of them."""
    try:
        code = keycode.parse(text)
    except Rejected:
        return None
    window = ledger.window
    floor = ledger.floor
    store = ledger.store
    for s in keycode.candidates(code.low, _anchor(ledger)):
        try:
            used = s <= floor or window.is_used(s)
        except Rejected:
            used = True       # below the window: its receipt may still be on flash
        if used:
            raw = store.find_receipt(s)
            if raw is not None and code.ref in raw and receipt_format.parse(raw).voucher == code.ref:
                return raw
    return None


def submit(ledger, text):
    """A keypad code typed on the PPMID (HAN request 5). Return (receipt, duplicate); raise
    Rejected (Refused for CODE_LOCKED and CODE_WRONG). The ledger is provisioned."""
    raw = original(ledger, text)
    if raw is not None:
        return raw, True
    if ledger.code_key is None:
        raise Rejected(errors.NOT_PROVISIONED, "no code key installed: this meter takes vouchers only")
    now = ledger.clock()
    good = False
    try:
        left = lockout.locked_for(ledger._state, now)
        if left:
            raise Refused(errors.CODE_LOCKED, "code entry is locked for %d s" % left, {2: left})
        try:
            keycode.parse(text)                     # CODE_INCOMPLETE, CODE_TYPO
        except Rejected as e:
            if e.reason != errors.CODE_WRONG:       # (a number no issuer writes: wrong)
                raise
        _record_failure(ledger, now)
        try:
            code = keycode.verify(text, ledger.code_key, ledger.device, _anchor(ledger))
        except Rejected as e:
            if e.reason == errors.CODE_WRONG:
                raise Refused(errors.CODE_WRONG, e.detail,
                              {3: lockout.tries_left(ledger._state, now)})
            good = True                             # MALFORMED: its MAC fitted
            raise
        good = True
        _clear(ledger)
        if code.amount > ledger.max_voucher:
            raise Rejected(errors.OVER_VOUCHER_LIMIT, "%d p is over the per-top-up maximum of %d p"
                           % (code.amount, ledger.max_voucher))
        r, duplicate = ledger._top_up(code, now, receipt_format.FORM_CODE)
    except Rejected as e:
        if e.reason != errors.BUSY and e.reason != errors.STORAGE:
            ledger._count_rejection(e.reason)
        if good:
            _end_series(ledger, now)
        raise
    if duplicate:
        _end_series(ledger, now)                    # (no commit of its own)
    return r, duplicate


def _record_failure(ledger, now):
    # Commit, before the MAC is checked, the state a wrong code leaves. Skipped when the
    # flash holds exactly that already (RAM cleared a pending failure a checkpoint has
    # not written yet).
    failed = after_wrong(lockout.of(ledger._state), now)
    if ledger.committed_lockout == failed:
        _put(ledger._state, failed)
        return
    ledger._accrue(0, now)
    new = dict(ledger._state)
    _put(new, failed)
    ledger._commit(new, now)


def _clear(ledger):
    if lockout.of(ledger._state) != lockout.CLEAR:
        lockout.clear(ledger._state)
        ledger._dirty = True


def _end_series(ledger, now):
    # A good code that changed no credit ends the series on flash too -- at once, unless
    # the flash holds no more than the one failure this code's own check recorded.
    _clear(ledger)
    committed = ledger.committed_lockout
    if committed != lockout.CLEAR and committed != _ONE_PENDING:
        ledger.checkpoint(now)
