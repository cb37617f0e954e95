# Meter time (SPEC.md §7): the board's clock, never behind the floor kept with the
# committed state. A board without a battery-backed RTC restarts its clock from the port's
# epoch (2000 or 2021) after a power cut; the meter then resumes its time at the floor and
# runs on from there. Time the meter cannot account for is never charged to the customer:
# the ledger charges the standing charge only for time this clock has seen pass.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

# At boot a board clock that claims to have run through the cut is believed only up to this
# far ahead of the floor (a dead RTC can read any date).
MAX_BOOT_STEP = const(400 * 86400)
# A signed time (a voucher's `issued`) moves meter time forward by at most this per voucher.
MAX_SIGNED_STEP = const(7 * 86400)


class MeterClock:
    """`clock()` is meter time in Unix seconds; it never goes backwards.

    board_time: the board's `time()`; survives: the board's clock keeps running while the
    meter has no power (a battery-backed RTC, or the host clock of the virtual board)."""

    def __init__(self, board_time, survives=True):
        self._board = board_time
        self._survives = survives
        self._offset = 0
        self._last = 0
        self.reset_at_boot = False    # meter time was resumed from the floor at the last start

    def start(self, floor):
        """At boot (or provisioning): take the board's clock if it can be believed, else
        resume at the floor. Return True when the time since the floor is accounted for
        (the board's clock ran through the cut): only then may it be charged."""
        t = self._board()
        plausible = floor <= t <= floor + MAX_BOOT_STEP
        self._offset = 0 if plausible else floor - t
        self._last = floor
        self.reset_at_boot = not plausible
        return plausible and self._survives

    def __call__(self):
        t = self._board() + self._offset
        if t < self._last:
            t = self._last     # the board clock stepped back: meter time waits for it
        self._last = t
        return t

    def ahead(self, t):
        """The meter time a signed time t moves us to (never back, at most MAX_SIGNED_STEP)."""
        now = self()
        if t <= now:
            return now
        return now + MAX_SIGNED_STEP if t - now > MAX_SIGNED_STEP else t

    def advance_to(self, t):
        """Move meter time forward to t (a value `ahead` gave): the ledger has committed it."""
        now = self()
        if t > now:
            self._offset += t - now
            self._last = t
