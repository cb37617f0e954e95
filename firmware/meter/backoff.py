# Signature back-off (SPEC.md §5.2): a forged voucher under a trusted key id costs the meter a
# full Ed25519 verification. After FREE_BAD_SIGNATURES in a row, each further one closes
# signature checks for a time that doubles up to MAX_BACKOFF_SECONDS; while closed, a submit
# is answered BUSY (the PPMID retries later) and nothing is verified. A good signature opens
# them again. The counters live in the ledger state, saved like any counter at the next
# commit, so a reboot does not reopen them for free.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from protocol import errors
from protocol.errors import Rejected
from meter import config as cfg

FREE_BAD_SIGNATURES = const(3)
MAX_BACKOFF_SECONDS = const(256)


def check(state, now):
    """Raise Rejected(BUSY) while signature checks are closed."""
    until = state.get(cfg.S_BACKOFF_UNTIL, 0)
    if now < until:
        raise Rejected(errors.BUSY, "signature checks paused for %d s after bad signatures" % (until - now))


def failed(state, now):
    """A signature did not verify: count it; maybe close checks for a while."""
    n = state.get(cfg.S_BAD_SIGNATURES, 0) + 1
    state[cfg.S_BAD_SIGNATURES] = n
    if n >= FREE_BAD_SIGNATURES:
        shift = n - FREE_BAD_SIGNATURES
        state[cfg.S_BACKOFF_UNTIL] = now + (MAX_BACKOFF_SECONDS if shift >= 8 else 1 << shift)


def passed(state):
    """A signature verified: the streak is over. True if that changed the state."""
    if state.get(cfg.S_BAD_SIGNATURES, 0):
        state[cfg.S_BAD_SIGNATURES] = 0
        return True
    return False
