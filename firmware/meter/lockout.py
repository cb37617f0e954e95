# The keypad-code lockout (SPEC.md §8), as the ledger state holds it: after MAX_WRONG
# consecutive wrong codes code entry is locked for 1 h, doubling with each further lockout
# of the series (2 h, 4 h, ...) up to 7 days; a good code ends the series. Vouchers are
# never locked out.
#
# This module is what the boot path needs (the HAN status shows the lockout, recovery ends
# a series): reading and clearing it. Counting a wrong code and the lock's length are in
# meter/codes.py, which (with protocol/keycode.py) is loaded only when a code arrives, so
# a meter that only ever sees vouchers never carries either in its heap.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from meter import config as cfg

MAX_WRONG = const(5)                   # consecutive wrong codes that start a lockout
CLEAR = (0, 0, 0)                      # (wrong, lockouts, until) with no series


def of(st):
    """(wrong codes since the last lockout or good code, lockouts in the series, meter time
    until which entry is locked) from a state dict; a state from before codes holds none."""
    return (st.get(cfg.S_CODE_WRONG, 0), st.get(cfg.S_CODE_LOCKOUTS, 0), st.get(cfg.S_CODE_UNTIL, 0))


def clear(st):
    """A good code ends the series. (No series is no keys: the state, in RAM and in every
    record, stays as small as it was before codes.)"""
    st.pop(cfg.S_CODE_WRONG, None)
    st.pop(cfg.S_CODE_LOCKOUTS, None)
    st.pop(cfg.S_CODE_UNTIL, None)


def locked_for(st, now):
    """Seconds until code entry opens (0: open)."""
    until = st.get(cfg.S_CODE_UNTIL, 0)
    return until - now if until > now else 0


def tries_left(st, now):
    """Wrong codes left before a lockout (0 while locked)."""
    return 0 if locked_for(st, now) else MAX_WRONG - st.get(cfg.S_CODE_WRONG, 0)
