# The credit ledger: every change to the customer's credit goes through here.
#
# Balance is in milli-pence and may go negative while emergency credit is in use: taking
# emergency credit lets the balance fall to -(emergency amount) before the supply is cut,
# and the next top-up fills that hole first ("repaid first"). Top-ups and emergency credit
# are committed with their receipt (receipt first, state last: the state record is the
# commit point). Metering lowers the balance in RAM and is checkpointed at a bounded
# interval, and always with any other commit. Keypad codes (meter/codes.py), signed commands
# (meter/commands.py) and the supply's arming (meter/supply.py) are decided in their own
# modules; what changes credit, the supply state or the configuration is committed here.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

import sys

from protocol import cose, errors, receipt as receipt_format, voucher as voucher_format, window as replay
from protocol.errors import Rejected
from meter import backoff, config as cfg, lockout, metering, recovery, supply
from meter.clock import MeterClock
from meter.receipts import ReceiptSigner
from meter.store import StoreError

_C_COMMAND_KEY = const(17)      # meter.admin.C_COMMAND_KEY (a meter with a command key)
# Ledger.admin's layout (meter/admin.py: RECEIPTS, REVOKED, RETIRED, FLOOR, PENDING)
_RECEIPTS = const(3)
_REVOKED = const(5)
_RETIRED = const(6)
_FLOOR = const(7)
_PENDING = const(8)
# Metering checkpoint: at most every 15 minutes while anything is unsaved, and at once when
# 20 p of consumption is unsaved. A power cut loses at most min(15 min, 20 p) of metered
# consumption, in the customer's favour (see firmware/README.md, "Storage").
CHECKPOINT_SECONDS = const(900)
CHECKPOINT_MP = const(20000)
# A flood of bad vouchers costs no flash: counts stay in RAM until the next checkpoint
# and at most one rejections receipt is written per hour.
REJECTIONS_RECEIPT_SECONDS = const(3600)
_MAX_COUNT = const(0xFFFFFFFF)
# Receipts the head end has not acknowledged stay on flash, up to this many (SPEC.md §5.1).
UPLINK_QUEUE = const(128)


# A code's check (meter/codes.py with protocol/keycode.py, ~9 KiB of heap on the unix port)
# is loaded for each code and dropped after it: codes are typed by a person, so they are
# rare, and a voucher between them then has the heap of a meter that never saw one (the
# heap budget, tests/test_heap_budget.py). On CPython there is no heap to keep.
_DROP = sys.implementation.name == "micropython"


_CODE_MODULES = (("meter", "codes"), ("protocol", "keycode"))
# A signed command (meter/commands.py with protocol/command.py, and X25519 for a new code
# key) is rarer still: loaded for it and dropped after it, the same way.
_COMMAND_MODULES = (("meter", "commands"), ("meter", "admin"), ("protocol", "command"),
                    ("protocol", "keycode"), ("protocol", "x25519"))
# meter/admin.py is loaded to read a command key's part of the config, and when a tariff
# change comes due; dropped after it like the rest.
_ADMIN_MODULES = (("meter", "admin"),)


def _drop_code_modules(modules=_CODE_MODULES):
    if not _DROP:
        return
    for package, name in modules:
        sys.modules.pop(package + "." + name, None)
        parent = sys.modules.get(package)
        if parent is not None and name in dir(parent):
            delattr(parent, name)


class Ledger:
    def __init__(self, store, clock, log=None):
        """store: a mounted meter.store.Store; clock: a MeterClock, or the board's time()
        (a clock that keeps running through power cuts); log(message): the REPL log."""
        self._unsynced = False
        self._interrupted = False
        self.committed_lockout = lockout.CLEAR
        self.code_key = None
        self.store = store
        self.clock = clock if isinstance(clock, MeterClock) else MeterClock(clock)
        self.log = log or (lambda message: None)
        store.retain = self._retain
        self.load()

    def load(self):
        """(Re)read config and state from the store, e.g. after provisioning or a mount:
        roll forward from receipts whose state record was lost, and record flash faults."""
        store = self.store
        self._dirty = False
        self._interrupted = False
        self._unsaved_mp = 0
        self._state = None
        self.code_key = None
        self.admin = None       # a list (meter/admin.py): only a meter with a command key
        self.faults = dict(store.faults)
        # Damaged: the store holds a ledger that cannot be read whole. The meter then
        # changes no credit at all (DAMAGED) rather than invent or forget any.
        self.damaged = None
        self.provisioned = False
        if store.config is None:
            if store.state is not None:
                self.damaged = "the configuration is lost"
            return
        try:
            self._load_records(store.config, store.state)
        except Exception as e:  # noqa: BLE001 - a record that passed its CRC but not its format
            self.damaged = "unreadable ledger records (%s)" % (e,)
            self._state = None
            return
        self.provisioned = True
        self._committed_at = self._state[cfg.S_CHARGED_TO]
        self.committed_lockout = lockout.of(self._state)
        recovery.roll_forward(self)
        _drop_code_modules(_ADMIN_MODULES)
        # A state from before arming gets its supply state; one whose credit ran out with
        # the supply not interrupted is interrupted now and committed at the first
        # metering pass (before the relay is driven).
        self._interrupted = supply.load(self._state)
        if not self.clock.start(self._state[cfg.S_CHARGED_TO]):
            # The time since the last commit is not accounted for (the board clock did not
            # run through the cut, or cannot be believed): it is not charged.
            self._state[cfg.S_CHARGED_TO] = self.clock()
            self._dirty = True
        self._committed_at = self._state[cfg.S_CHARGED_TO]
        recovery.record_faults(self)

    def _load_records(self, config, state):
        if state is None:
            raise ValueError("no state record")
        c = cfg.decode(config)
        self.device = c[cfg.C_DEVICE]
        self.signer = ReceiptSigner(self.device, c[cfg.C_SEED], c[cfg.C_PUBLIC])
        self.public_key = c[cfg.C_PUBLIC]
        self.first_receipt = c.get(cfg.C_FIRST_RECEIPT, 0)
        st = cfg.decode(state)
        self._apply_config(c, st[cfg.S_CHARGED_TO])
        self._state = st

    def _apply_config(self, c, charged_to):
        """The parts of the config a signed command may change (SPEC.md §10): trust,
        limits and tariff (tariff changes due by meter time charged_to in force, later
        ones pending), code key, command key."""
        self.trust = {}
        for key in c[cfg.C_TRUST]:
            self.trust[cose.kid_for(key)] = key
        self.max_voucher = c[cfg.C_MAX_VOUCHER]
        self.max_credit = c[cfg.C_MAX_CREDIT]
        self.ec_amount = c[cfg.C_EC_AMOUNT]
        self.ec_threshold = c[cfg.C_EC_THRESHOLD]
        self.unit_rate = c[cfg.C_UNIT_RATE]
        self.standing = c[cfg.C_STANDING]
        self.code_key = c.get(cfg.C_CODE_KEY)        # None: this meter takes no codes
        if _C_COMMAND_KEY in c:
            from meter import admin     # only a meter with a command key (dropped after)
            self.admin = admin.load(self, c, charged_to)


    # ---- views -------------------------------------------------------------------
    def _need(self):
        if self._unsynced:
            self._resync()
        if self.damaged:
            raise Rejected(errors.DAMAGED, "flash damage: %s" % self.damaged)
        if not self.provisioned:
            raise Rejected(errors.NOT_PROVISIONED, "meter is not provisioned")
        a = self.admin
        if a is not None and a[_PENDING] and a[_PENDING][0][0] <= self.clock():
            self._accrue(0, self.clock())   # a tariff change that is due: in force first

    @property
    def balance_mp(self):
        return self._state[cfg.S_BALANCE] if self.provisioned else 0

    @property
    def emergency_mp(self):
        return self._state[cfg.S_EC] * 1000 if self.provisioned else 0

    @property
    def highest(self):
        return self._state[cfg.S_HIGHEST] if self.provisioned else 0

    @property
    def window(self):
        return replay.ReplayWindow(self._state[cfg.S_HIGHEST], self._state[cfg.S_BITMAP])

    @property
    def receipt_count(self):
        return self.store.receipt_count

    @property
    def pending_rejections(self):
        return dict(self._state[cfg.S_REJECTIONS]) if self.provisioned else {}

    @property
    def floor(self):
        if not self.provisioned:
            return 0
        f = self._state.get(cfg.S_FLOOR, 0)
        a = self.admin
        return a[_FLOOR] if a is not None and a[_FLOOR] > f else f

    @property
    def supply_state(self):
        """SPEC.md §9 (meter/supply.py): INTERRUPTED, ARMED or ON. A meter whose ledger is
        damaged keeps the supply on: it cannot know the credit, and a flash fault must not
        disconnect a customer; an unprovisioned meter keeps it off."""
        if self.damaged:
            return supply.ON
        return self._state[cfg.S_SUPPLY] if self.provisioned else supply.INTERRUPTED

    def supply_on(self):
        """The relay is closed: the supply is on (not interrupted, not merely armed)."""
        return self.supply_state == supply.ON

    @property
    def code_locked_for(self):
        """Seconds until keypad-code entry opens again (0: open)."""
        return lockout.locked_for(self._state, self.clock()) if self.provisioned else 0

    @property
    def code_tries_left(self):
        return lockout.tries_left(self._state, self.clock()) if self.provisioned else lockout.MAX_WRONG

    # ---- top-up ------------------------------------------------------------------
    def submit(self, data):
        """Apply a voucher. Return (receipt bytes, duplicate). Raise Rejected: nothing changed.

        Running out of memory is not the voucher's fault: it is answered BUSY, not counted,
        and changes nothing (the PPMID retries)."""
        self._need()
        try:
            return self._submit(data)
        except MemoryError:
            raise Rejected(errors.BUSY, "out of memory")

    def _submit(self, data):
        # An applied voucher gets its original receipt back whatever the time, limits or
        # back-off: the same bytes (its reference) were verified when they were applied.
        original = self._original_receipt(data)
        if original is not None:
            return original, True
        now = self.clock()
        st = self._state
        try:
            checked = self._gate_signature(data, now)
            try:
                v = voucher_format.verify(data, self.trust, self.device, now, self.max_voucher)
            except Rejected as e:
                if e.reason == errors.BAD_SIGNATURE:
                    backoff.failed(st, now)
                elif checked and backoff.passed(st):
                    # checks 1-3 had passed, so a later refusal came after a good signature
                    self._dirty = True
                raise
            if backoff.passed(st):
                self._dirty = True
            r, duplicate = self._top_up(v, now, receipt_format.FORM_VOUCHER)
        except Rejected as e:
            # turned away by the back-off, or a failed commit: not a verdict
            if e.reason != errors.BUSY and e.reason != errors.STORAGE:
                self._count_rejection(e.reason)
            raise
        if not duplicate:
            self._signed_time(v.issued)
        return r, duplicate

    def submit_code(self, text):
        """Apply a keypad code (SPEC.md §8, meter/codes.py): the checks of a voucher after
        the code's own, under the code lockout. Return (receipt bytes, duplicate); raise
        Rejected: nothing changed but the lockout count. Out of memory is BUSY."""
        self._need()
        try:
            from meter import codes    # loaded for the code, dropped after it (below)
            return codes.submit(self, text)
        except MemoryError:
            raise Rejected(errors.BUSY, "out of memory")
        finally:
            _drop_code_modules()

    def submit_command(self, data):
        """Apply a signed command (SPEC.md §10, meter/commands.py). Return (receipt bytes,
        duplicate); raise Rejected: nothing changed. Out of memory is BUSY."""
        self._need()
        try:
            from meter import commands    # loaded for the command, dropped after it
            return commands.submit(self, data)
        except MemoryError:
            raise Rejected(errors.BUSY, "out of memory")
        finally:
            _drop_code_modules(_COMMAND_MODULES)

    def _top_up(self, item, now, form):
        """Checks 9-11 of SPEC.md §2.1 (a code's check 6) for a verified voucher or code
        (item: .sequence, .ref, .amount), then the commit: receipt first, state last. A
        top-up that lifts credit above zero arms an interrupted supply. Return (receipt,
        duplicate); raise Rejected."""
        st = self._state
        if item.sequence <= self.floor:
            raise Rejected(errors.STALE, "sequence %d is at or below the floor %d set at provisioning"
                           % (item.sequence, self.floor))
        window = self.window
        if not replay.admit(window, item, self._ref_for_sequence):
            return self.store.find_receipt(item.sequence), True
        self._accrue(0, now)
        replay.check_credit(st[cfg.S_BALANCE], item.amount, self.max_credit)
        before = st[cfg.S_BALANCE]
        after = before + item.amount * 1000
        new = dict(st)
        new[cfg.S_BALANCE] = after
        if after >= 0:
            new[cfg.S_EC] = 0  # emergency credit repaid
        supply.topped_up(new)   # (arms an interrupted supply if credit is now above zero)
        window.mark(item.sequence)
        new[cfg.S_HIGHEST] = window.highest
        new[cfg.S_BITMAP] = window.bitmap
        r = self.signer.make(self.store.receipt_count, receipt_format.TOPUP, now,
                             st[cfg.S_LAST_HASH], before, after, sequence=item.sequence,
                             voucher=item.ref, amount=item.amount, form=form,
                             supply=new[cfg.S_SUPPLY])
        new[cfg.S_LAST_HASH] = receipt_format.chain_hash(r)
        self._commit(new, now, r, item.sequence)
        return r, False

    def _signed_time(self, issued):
        # A verified issue time ahead of meter time moves it on (the board's clock was lost
        # in a power cut): the step is not charged. It is saved with the next commit; a
        # cut before that loses only the step, which the next voucher makes again.
        at = self.clock.ahead(issued)
        st = self._state
        if at > st[cfg.S_CHARGED_TO]:
            self.clock.advance_to(at)
            st[cfg.S_CHARGED_TO] = at
            self._dirty = True

    def _original_receipt(self, data):
        """The receipt of these exact voucher bytes if they were applied, else None."""
        try:
            v = voucher_format.parse(data)
        except Rejected:
            return None       # the full check gives the reason
        try:
            used = self.window.is_used(v.sequence) or v.sequence <= self.floor
        except Rejected:
            used = True       # below the window: its receipt may still be on flash
        if not used:
            return None
        raw = self.store.find_receipt(v.sequence)
        if raw is not None and receipt_format.parse(raw).voucher == v.ref:
            return raw
        return None

    def _gate_signature(self, data, now):
        # The cheap checks first; a signature is only checked when it would be under a
        # trusted key, and not while the back-off holds.
        msg = cose.decode(data)
        if msg.kid not in self.trust:
            a = self.admin
            if a is not None:
                if msg.kid in a[_REVOKED]:
                    raise Rejected(errors.KEY_REVOKED, "the issuer key was revoked")
                if msg.kid in a[_RETIRED]:
                    raise Rejected(errors.STALE, "the issuer key is the previous supplier's")
            return False
        backoff.check(self._state, now)
        return True

    def _ref_for_sequence(self, seq):
        raw = self.store.find_receipt(seq)
        if raw is None:
            # Used, but its receipt is gone (flash damage the store reported): the meter
            # cannot prove which voucher it was, so it changes nothing and says so.
            raise Rejected(errors.RECEIPT_LOST, "sequence %d was applied; its receipt was lost" % seq)
        return receipt_format.parse(raw).voucher

    def _retain(self, index, tag):
        # Top-up receipts whose sequence is still inside the replay window must stay
        # readable: a resubmission of that voucher gets its original receipt back. And the
        # newest unacknowledged receipts wait for the WAN, up to UPLINK_QUEUE of them.
        st = self._state
        if st is None:
            return False
        if tag > 0 and tag >= st[cfg.S_HIGHEST] - replay.SIZE:
            return True
        if self.admin is not None and index in self.admin[_RECEIPTS]:
            return True       # a repeated command gets its original receipt back
        return index >= st[cfg.S_UPLOADED] and index >= self.store.receipt_count - UPLINK_QUEUE

    # ---- WAN uplink ----------------------------------------------------------------
    @property
    def uploaded(self):
        """Receipts below this index are acknowledged by the head end."""
        return self._state[cfg.S_UPLOADED] if self.provisioned else 0

    def acknowledge(self, next_index, last_hash):
        """The head end holds, with verified signatures, every receipt below next_index, the
        last of which hashes to last_hash (a signed acknowledgement, SPEC.md §5.1, checked by
        the uplink). Saved at the next checkpoint (a push repeated after a cut is harmless).
        Return True if it moved the acknowledged index."""
        if not self.provisioned:
            return False
        st = self._state
        if not st[cfg.S_UPLOADED] < next_index <= self.store.receipt_count:
            return False
        raw = self.store.receipt(next_index - 1)
        if raw is None or receipt_format.chain_hash(raw) != last_hash:
            return False
        st[cfg.S_UPLOADED] = next_index
        self._dirty = True
        return True

    # ---- emergency credit ----------------------------------------------------------
    def take_emergency_credit(self):
        """Button press: grant emergency credit when low. Return the receipt."""
        self._need()
        try:
            return self._take_emergency_credit()
        except MemoryError:
            raise Rejected(errors.BUSY, "out of memory")

    def _take_emergency_credit(self):
        now = self.clock()
        self._accrue(0, now)      # (puts a tariff change that is due in force first)
        st = self._state
        if st[cfg.S_EC]:
            raise Rejected(errors.EC_UNAVAILABLE, "emergency credit already in use")
        if st[cfg.S_BALANCE] >= self.ec_threshold * 1000:
            raise Rejected(errors.EC_UNAVAILABLE, "credit is above the emergency threshold")
        new = dict(st)
        new[cfg.S_EC] = self.ec_amount
        supply.emergency_taken(new)
        balance = st[cfg.S_BALANCE]
        r = self.signer.make(self.store.receipt_count, receipt_format.EMERGENCY, now,
                             st[cfg.S_LAST_HASH], balance, balance, amount=self.ec_amount,
                             supply=new[cfg.S_SUPPLY])
        new[cfg.S_LAST_HASH] = receipt_format.chain_hash(r)
        self._commit(new, now, r, 0)
        return r

    # ---- supply arming ---------------------------------------------------------------
    def confirm_supply(self):
        """The customer confirms (button or PPMID, SPEC.md §9): an armed supply comes on,
        committed at once. Otherwise nothing changes. Return the supply state."""
        self._need()
        if self._state[cfg.S_SUPPLY] == supply.ARMED:
            now = self.clock()
            self._accrue(0, now)    # (which may find the credit gone: then it is interrupted)
            new = dict(self._state)
            supply.confirm(new)
            self._commit(new, now)  # on, or interrupted: either is committed at once
        return self.supply_state

    def settle(self):
        """Commit an interruption of the supply not yet written (before the relay opens)."""
        if self._interrupted and self.provisioned and not self._unsynced:
            self.checkpoint()

    # ---- metering ------------------------------------------------------------------
    def meter(self, wh, now=None):
        """Charge `wh` Wh of energy and the standing charge up to now; checkpoint when due."""
        if self._unsynced:
            try:
                self._resync()
            except Rejected:
                return        # still out of memory: this step's pulses are not charged
        if not self.provisioned:
            return
        if now is None:
            now = self.clock()
        self._accrue(wh, now)
        if self._interrupted or self._unsaved_mp >= CHECKPOINT_MP or (
                self._dirty and now - self._committed_at >= CHECKPOINT_SECONDS):
            self.checkpoint(now)       # an interruption of the supply is committed at once

    def _accrue(self, wh, now):
        st = self._state
        cost = 0
        a = self.admin
        if a is not None and a[_PENDING] and a[_PENDING][0][0] <= now:
            from meter import admin         # tariff changes due: split at their time
            cost = admin.changes(self, now)
            _drop_code_modules(_ADMIN_MODULES)
        energy, st[cfg.S_ENERGY_REM] = metering.energy_cost(wh, self.unit_rate, st[cfg.S_ENERGY_REM])
        cost += energy
        if now > st[cfg.S_CHARGED_TO]:
            # A clock that steps back charges nothing until it passes the old time again.
            sc, st[cfg.S_STANDING_REM] = metering.standing_cost(
                now - st[cfg.S_CHARGED_TO], self.standing, st[cfg.S_STANDING_REM])
            st[cfg.S_CHARGED_TO] = now
            cost += sc
        if wh or cost:
            st[cfg.S_BALANCE] -= cost
            st[cfg.S_WH_TOTAL] += wh
            self._unsaved_mp += cost
            self._dirty = True
            if cost and supply.exhausted(st):
                self._interrupted = True

    def checkpoint(self, now=None):
        """Persist metering (and rejection counts). A full flash is retried next time."""
        if not self.provisioned:
            return False
        if now is None:
            now = self.clock()
        self._accrue(0, now)
        try:
            self._commit(dict(self._state), now)
        except Rejected:
            return False
        return True

    # ---- rejections ----------------------------------------------------------------
    def _count_rejection(self, reason):
        counts = self._state[cfg.S_REJECTIONS]
        counts[reason] = min(counts.get(reason, 0) + 1, _MAX_COUNT)
        self._dirty = True

    def record_rejections(self, now=None):
        """Write a rejections receipt if any are pending and the last was an hour ago."""
        if not self.provisioned:
            return None
        if now is None:
            now = self.clock()
        st = self._state
        if not st[cfg.S_REJECTIONS] or now - st[cfg.S_REJ_RECEIPT_AT] < REJECTIONS_RECEIPT_SECONDS:
            return None
        self._accrue(0, now)
        new = dict(st)
        new[cfg.S_REJECTIONS] = {}
        new[cfg.S_REJ_RECEIPT_AT] = now
        balance = st[cfg.S_BALANCE]
        r = self.signer.make(self.store.receipt_count, receipt_format.REJECTIONS, now,
                             st[cfg.S_LAST_HASH], balance, balance,
                             rejections=dict(st[cfg.S_REJECTIONS]))
        new[cfg.S_LAST_HASH] = receipt_format.chain_hash(r)
        try:
            self._commit(new, now, r, 0)
        except Rejected:
            return None
        return r

    # ---- flash faults --------------------------------------------------------------
    def record_faults(self, faults):
        """Write a fault receipt: what the store found repaired or lost at its mount."""
        now = self.clock()
        self._accrue(0, now)
        st = self._state
        new = dict(st)
        new[cfg.S_FAULTS_SEEN] = dict(faults)
        balance = st[cfg.S_BALANCE]
        r = self.signer.make(self.store.receipt_count, receipt_format.FAULT, now,
                             st[cfg.S_LAST_HASH], balance, balance, faults=dict(faults))
        new[cfg.S_LAST_HASH] = receipt_format.chain_hash(r)
        self._commit(new, now, r, 0)
        return r

    # ---- commit --------------------------------------------------------------------
    def _commit(self, new, now, receipt=None, tag=0, adopt=0, config=None):
        try:
            self.store.commit(cfg.encode(new), receipt, tag, adopt=adopt, config=config)
        except StoreError as e:
            raise Rejected(errors.STORAGE, str(e))
        except (OSError, MemoryError) as e:
            # Failed inside the store's write (a flash I/O error, or memory): RAM may no
            # longer match the flash, and what is on the flash now is what counts.
            self._unsynced = True
            self._resync()
            if isinstance(e, MemoryError):
                raise Rejected(errors.BUSY, "out of memory")
            raise Rejected(errors.STORAGE, "flash error %s" % (e,))
        self._state = new
        if config is not None:
            self._apply_config(cfg.decode(config), new[cfg.S_CHARGED_TO])
        self._committed_at = now
        self._unsaved_mp = 0
        self._dirty = False
        self._interrupted = False
        self.committed_lockout = lockout.of(new)

    def _resync(self):
        # After an error inside a commit RAM may no longer match the flash: read the flash
        # again, as after a power cut (unsaved metering is lost, as a cut would lose it).
        # If memory runs out again, the ledger stays marked and every entry point tries
        # again first; it answers BUSY meanwhile and changes nothing.
        try:
            import gc
            gc.collect()
        except ImportError:
            pass
        try:
            self.store.mount()
            self.load()
        except MemoryError:
            raise Rejected(errors.BUSY, "out of memory while re-reading the flash")
        self._unsynced = False
