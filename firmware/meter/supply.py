# Supply arming (SPEC.md §9): the relay's three states, kept in the ledger state
# (S_SUPPLY) and decided here; the ledger commits them and the main loop drives the relay
# from them (closed only when on).
#
#   on (2)           closed. When credit (emergency credit included) is exhausted the
#                    supply is interrupted, and the ledger commits that at once: a power
#                    cut never brings the supply back on by itself.
#   interrupted (0)  open. A top-up (voucher or code) that lifts credit above zero arms it.
#   armed (1)        open. The customer confirms -- the meter's button (while armed a
#                    press confirms and takes no emergency credit) or the PPMID (HAN
#                    request 6, action 1) -- and it closes: nothing left on comes back
#                    unattended. Emergency credit taken while interrupted or armed
#                    switches it on at once: taking it is the customer's confirmation.
#
# The supply is armed or on only while credit is above zero (the ledger's every accrual
# checks it), so the states and the balance never disagree after a power cut.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from meter import config as cfg

INTERRUPTED = const(0)
ARMED = const(1)
ON = const(2)


def credit_mp(st):
    """Credit left before the supply is interrupted: balance + emergency credit taken."""
    return st[cfg.S_BALANCE] + st[cfg.S_EC] * 1000


def load(st):
    """A state read from flash: one written before arming existed has no supply state (the
    supply was then on exactly while there was credit). Return True if the supply must be
    interrupted now (to be committed at once)."""
    if cfg.S_SUPPLY not in st:
        st[cfg.S_SUPPLY] = ON if credit_mp(st) > 0 else INTERRUPTED
    elif st[cfg.S_SUPPLY] == INTERRUPTED and credit_mp(st) > 0:
        # Credit above zero is never left interrupted (a press would find no emergency
        # credit to take, and nothing could switch it on): armed, still open.
        st[cfg.S_SUPPLY] = ARMED
    return exhausted(st)


def exhausted(st):
    """After credit went down: an armed or on supply with no credit left is interrupted.
    Return True if that changed st (the ledger then commits at once)."""
    if st[cfg.S_SUPPLY] != INTERRUPTED and credit_mp(st) <= 0:
        st[cfg.S_SUPPLY] = INTERRUPTED
        return True
    return False


def topped_up(st):
    """After a top-up: an interrupted supply with credit above zero is armed. (A top-up that
    repays emergency credit to exactly zero leaves no credit: interrupted, as before it.)"""
    if credit_mp(st) <= 0:
        st[cfg.S_SUPPLY] = INTERRUPTED
    elif st[cfg.S_SUPPLY] == INTERRUPTED:
        st[cfg.S_SUPPLY] = ARMED


def emergency_taken(st):
    """After emergency credit is taken: the customer is there, so the supply comes on
    (if the emergency credit covers what is owed; else it stays interrupted)."""
    if credit_mp(st) > 0:
        st[cfg.S_SUPPLY] = ON


def confirm(st):
    """The customer confirms: an armed supply comes on. Return True if st changed."""
    if st[cfg.S_SUPPLY] == ARMED:
        st[cfg.S_SUPPLY] = ON
        return True
    return False


def press(ledger):
    """The meter's button: confirms an armed supply, else takes emergency credit (which
    may raise Rejected: not available now). Return the supply state after it."""
    if ledger.supply_state == ARMED:
        return ledger.confirm_supply()
    ledger.take_emergency_credit()
    return ledger.supply_state
