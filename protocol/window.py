# The meter's replay window (SPEC.md §2.2): the highest applied sequence and a 64-bit
# bitmap of the 64 sequences below it. Shared by the firmware ledger and reconciliation.
from .errors import Rejected, STALE, SEQUENCE_REUSED, OVER_CREDIT_LIMIT

SIZE = 64
_MASK = (1 << SIZE) - 1


class ReplayWindow:
    def __init__(self, highest=0, bitmap=0):
        self.highest = highest
        self.bitmap = bitmap

    def is_used(self, seq):
        """True if `seq` was applied; False if new; Rejected(STALE) if below the window."""
        if seq > self.highest:
            return False
        if seq == self.highest:
            return True
        if seq < self.highest - SIZE:
            raise Rejected(STALE, "sequence %d is below the window (highest %d)" % (seq, self.highest))
        return bool(self.bitmap >> (self.highest - 1 - seq) & 1)

    def mark(self, seq):
        """Record `seq` as applied (the caller checked is_used first)."""
        if seq > self.highest:
            shift = seq - self.highest
            if shift > SIZE:
                self.bitmap = 0
            else:
                # The old highest becomes bit shift-1; older bits move up with it.
                self.bitmap = ((self.bitmap << shift) | (1 << (shift - 1))) & _MASK if self.highest else 0
            self.highest = seq
        else:
            self.bitmap |= 1 << (self.highest - 1 - seq)


def admit(window, voucher, ref_for_sequence):
    """Decide a verified voucher against the window (checks 9-10 of SPEC.md §2.1).

    Return True if new, False if it is a resubmission of the voucher already applied
    under its sequence (the caller answers with the original receipt). Raise STALE or
    SEQUENCE_REUSED. ref_for_sequence(seq) gives the reference stored with the receipt.
    """
    if not window.is_used(voucher.sequence):
        return True
    if ref_for_sequence(voucher.sequence) == voucher.ref:
        return False
    raise Rejected(SEQUENCE_REUSED, "sequence %d was used by another voucher" % voucher.sequence)


def check_credit(balance_mp, amount_pence, max_credit_pence):
    """Check 11: a top-up that would pass the maximum credit is refused, never truncated."""
    if balance_mp + amount_pence * 1000 > max_credit_pence * 1000:
        raise Rejected(OVER_CREDIT_LIMIT, "credit would exceed the maximum of %d p" % max_credit_pence)
