"""What the rig checks about a meter under test, from the host side.

`MeterModel` is the meter's ledger as protocol/SPEC.md and firmware/README.md state it,
computed on the host and independent of the code under test: it imports nothing from the
firmware and none of protocol/'s decisions (no replay window, credit check or voucher
verification from there); the stateless voucher checks of SPEC §2.1 (1-8) come from
tests/oracle.py, a restatement of the SPEC on PyNaCl that imports nothing from protocol/.
Its rules, written out:

Money (README "Metering"). Balances are milli-pence. Per epoch (a provisioning):
balance = opening + 1000 x (pence of top-ups applied) - floor(Wh x unit rate / 1000)
- floor(charged seconds x standing charge / 86400); the meter keeps exact remainders, so
its running charges are these cumulative floors.

Meter time (SPEC §7). Meter time = the board's clock + an offset, never going back (a board
clock that steps back holds it still). At start-up the floor is the meter time of the last
commit: a board clock between the floor and 400 days after it is believed (offset 0),
otherwise meter time resumes at the floor (status field 11 says so). The time between the
last commit and the start is charged only when the board declares a clock that survives
power cuts and it was believed; otherwise charging restarts from the start-up time. A
voucher applied with `issued` ahead of meter time moves meter time on to it, at most 7
days, uncharged; the receipt carries the time before the step. The virtual board's clock
restarts from 2000-01-01 at power-on when it has no battery-backed RTC; a reset keeps it.

A submit (SPEC §2.1, §2.2, §5.2), in this order:
  0. These exact bytes were applied by this ledger and their receipt is on the meter's
     flash: the original receipt, whatever the time, limits or back-off; nothing changes.
     A receipt is surely on flash while it is among the newest 128 (the uplink queue: no
     head end acknowledges anything on the rig) or its sequence is at or above highest-64
     (inside the replay window); an older one may or may not be (then the answer may be
     the original receipt or STALE).
  1-2. The bytes decode as a COSE_Sign1 with the right header (else MALFORMED/BAD_HEADER).
  -. The kid is trusted and signature checks are paused: BUSY, not counted as a rejection.
  1-8. The oracle's verdict. A BAD_SIGNATURE extends the run of bad signatures: from the
     3rd in a row on, checks pause for 2^(n-3) s, at most 256 s. A signature that
     verifies ends the run (SPEC §5.2).
  9. sequence <= floor: STALE. sequence < highest - 64: STALE (below the window).
  10. sequence used (= highest, or applied inside the window): if its receipt is lost,
     RECEIPT_LOST; if the stored receipt is of the same bytes, the original receipt;
     else SEQUENCE_REUSED.
  11. balance (charged up to now) + amount > maximum credit: OVER_CREDIT_LIMIT.
  Applied: receipt (kind 1) at the next index, the top-up repays emergency credit once the
  balance is >= 0, committed with the state. Every refusal but BUSY is counted (RAM) and
  saved with the next commit; no refusal writes flash by itself.

One pass of the main loop: meter (Wh pulses and the standing charge up to now; checkpoint
at once when 20 p are unsaved, or when anything is unsaved and 15 minutes have passed since
the last commit), button presses (emergency credit: refused while in use or at/above the
threshold, else granted with a kind-2 receipt), the HAN (one submit at most), then a
kind-3 receipt of the counted refusals if there are any and an hour has passed since the
last one.

Power cuts. A commit is a receipt (if any) then the state record. A cut loses RAM: unsaved
metering, counts, the back-off, a meter-time step not yet saved. A cut during an action
leaves the first k of its commits landed, for any k; a commit whose receipt landed but not
its state record is rolled forward at start-up (its receipt is taken as committed, RAM-only
counters as of the commit before). A submit that was answered has its own commit landed;
what the same pass writes after the answer (a rejections receipt, say) may still be lost.
A request in flight may also reach the meter only after it boots. At start-up the store's
report of flash faults (status field 9) is written to a kind-4 receipt when it differs from
the last one recorded.

Factory reset and provisioning (SPEC §2.2, §4). The reset keeps a carry: the highest
sequence the ledger closed (max of highest and floor), the next receipt index, the meter
time. Provisioning takes the larger of each and of the supplier's figures: every sequence
up to the floor is STALE; receipt indices continue from the first index, whose receipt has
prev = 32 zero bytes (a new epoch, signed with the new key); meter time never goes back.

Supply (SPEC §9). The supply is on (2), interrupted (0) or armed (1); the relay is closed
only when on. A provisioning with opening credit starts on, without it interrupted. When
credit (balance + emergency credit in use) is exhausted an on or armed supply is
interrupted, and that is committed in the same pass (at its end, unless another commit of
the pass already carried it). A top-up that lifts credit above zero arms an interrupted
supply (in its own commit); the customer's confirmation -- the button while armed, or the
PPMID's action 1 -- switches an armed supply on (committed at once). Emergency credit taken
(the button when not armed, or action 2) switches the supply on if credit is then above
zero. Receipts of kinds 1 and 2 carry the supply state after them.

Keypad codes (SPEC §8), one HAN request in one pass: 0. the exact digits of a code applied
and still on flash: the original receipt. 1. code entry locked (meter time < until):
CODE_LOCKED. 2. not 20 digits (spaces and dashes allowed): CODE_INCOMPLETE. 3. Damm check
digit fails: CODE_TYPO. Then the lockout state a wrong code would leave (count + 1; at the
5th: count 0, lockouts + 1, locked for 1 h doubling per lockout up to 7 days) is committed
before the MAC check, unless the flash already holds exactly it. 4. The code is not one the
supplier issued for this meter at a sequence among the candidates rebuilt from its low 14
bits (around max(highest, floor)): CODE_WRONG. Otherwise the series ends (cleared in RAM; on
flash with the top-up's commit, or at once when a refusal follows and the flash holds more
than this code's own pending failure), and the code goes on as a voucher from check 9, with
the per-voucher maximum first. Every refusal is counted in the rejections receipt.

Signed commands (SPEC §10), one HAN request in one pass; the model sends issuer-key
additions and revocations (kinds 1 and 2), replays and tampered copies of them: 0. these
exact bytes are among the meter's last 4 applied commands: the original receipt. -. no
command key installed: NOT_PROVISIONED (not counted). 1-2 as a voucher's. 3. kid not the
command key: UNKNOWN_KEY. -. signature checks paused: BUSY (the vouchers' back-off, shared).
4. BAD_SIGNATURE (extends the run as a voucher's; a signature that verifies ends it). 5-6.
payload, device (tests/oracle.py's command_verdict). 7. number <= the last applied:
COMMAND_REPLAYED; > the last + 1: COMMAND_OUT_OF_ORDER. 9. adding a revoked key, a fifth
key, or revoking the last key: COMMAND_REFUSED. Applied: metering charged up to now, then
one commit: a kind-5 receipt (balance before = after, the command's number and reference)
with the trust list, the revoked list (newest 8), the last number and the last 4 command
receipts. A cut that leaves its receipt rolls it forward (the configuration is the commit
point, and the roll-forward is taken only when it names the command; the model allows both
the receipt rolled forward and the command not applied). A voucher whose kid was revoked:
KEY_REVOKED at check 3 (counted), before any signature check. Every refusal but BUSY and
NOT_PROVISIONED is counted.

`Books` checks the receipts read over the HAN; `Harness` drives a board with a set of
models (a power cut can leave the meter in more than one allowed state: the board's
answers and status tell which) and checks them after every step.
"""
import copy
import hashlib
import time

from protocol import errors, receipt as receipt_format

CHECKPOINT_MP = 20000
CHECKPOINT_SECONDS = 900
REJECTIONS_RECEIPT_SECONDS = 3600
WINDOW = 64
UPLINK_QUEUE = 128               # unacknowledged receipts the meter keeps
FREE_BAD_SIGNATURES = 3
MAX_BACKOFF_SECONDS = 256
MAX_BOOT_STEP = 400 * 86400
MAX_SIGNED_STEP = 7 * 86400
LOST_CLOCK = 946684800           # 2000-01-01T00:00:00Z
GENESIS = bytes(32)
# Refusals a kind-3 receipt may count: the voucher checks and RECEIPT_LOST (never BUSY,
# STORAGE, EC_UNAVAILABLE, DAMAGED, NOT_PROVISIONED: those are not verdicts).
COUNTED = frozenset(range(1, 11)) | {errors.RECEIPT_LOST, errors.CODE_WRONG, errors.CODE_TYPO,
                                     errors.CODE_INCOMPLETE, errors.CODE_LOCKED,
                                     errors.KEY_REVOKED, errors.COMMAND_OUT_OF_ORDER,
                                     errors.COMMAND_REPLAYED, errors.COMMAND_REFUSED}
FAULT_CODES = frozenset(range(1, 6))
_BY_NAME = {v: k for k, v in errors.NAMES.items()}
MAX_CANDIDATES = 24
SUPPLY_OFF, SUPPLY_ARMED, SUPPLY_ON = 0, 1, 2          # SPEC §9 (status field 15)
MAX_WRONG = 5                                         # SPEC §8: the lockout
FIRST_LOCK_SECONDS = 3600
MAX_LOCK_SECONDS = 7 * 86400
MAX_LOCKOUTS = 16
CODE_CLEAR = (0, 0, 0)                                # (wrong, lockouts, locked until)
CODE_SPAN = 1 << 14
FORM_CODE = 2
ADD_ISSUER_KEY, REVOKE_ISSUER_KEY = 1, 2                # SPEC §10 command kinds
MAX_ISSUER_KEYS = 4
MAX_REVOKED = 8
KEEP_COMMAND_RECEIPTS = 4
_DAMM = ("0317598642", "7092154863", "4206871359", "1750983426", "6123045978",
         "3674209581", "5869720134", "8945362017", "9438617205", "2581436790")


def damm_ok(digits):
    """Damm's check over a string of digits (H. M. Damm 2004): True if it ends in its check digit."""
    d = 0
    for ch in digits:
        d = int(_DAMM[d][int(ch)])
    return d == 0


def code_digits(text):
    """SPEC §8: the 20 digits of typed text (spaces and dashes allowed), else None."""
    if not isinstance(text, str) or any(ch not in "0123456789 -" for ch in text):
        return None
    digits = text.replace(" ", "").replace("-", "")
    return digits if len(digits) == 20 else None


def code_fields(digits):
    """(kind, amount, low 14 bits of the sequence) of a code's 19 leading digits (SPEC §8)."""
    n = int(digits[:19])
    return n >> 61, (n >> 45) & 0xFFFF, (n >> 31) & (CODE_SPAN - 1)


def code_ref(digits):
    """SPEC §8: SHA-256 of "OTU1 code " and the 20 digits, first 16 bytes."""
    return hashlib.sha256(b"OTU1 code " + digits.encode()).digest()[:16]


def code_candidates(low, anchor):
    base = max(1, anchor - WINDOW)
    c = base + ((low - base) % CODE_SPAN)
    return [x for x in (c, c - CODE_SPAN, c + CODE_SPAN) if 1 <= x <= 0xFFFFFFFF]


def lock_seconds(n):
    return min(FIRST_LOCK_SECONDS << (n - 1), MAX_LOCK_SECONDS) if n <= 8 else MAX_LOCK_SECONDS


def energy_mp(wh, unit_rate):
    """Cumulative energy charge for `wh` Wh (milli-pence, remainder carried: floor)."""
    return wh * unit_rate // 1000


def standing_mp(seconds, standing):
    """Cumulative standing charge for `seconds` (milli-pence per day, floor)."""
    return seconds * standing // 86400


def voucher_ref(raw):
    """SPEC §2.2: the first 16 bytes of SHA-256 of the voucher bytes as received (a keypad
    code, given as its digits: its reference, SPEC §8)."""
    if isinstance(raw, str):
        return code_ref(raw)
    return hashlib.sha256(bytes(raw)).digest()[:16]


def kid_of(public_key):
    """SPEC §2: a key's id, the first 8 bytes of SHA-256 of its 32 bytes."""
    return hashlib.sha256(bytes(public_key)).digest()[:8]


def cose_kid(raw):
    """The kid in a COSE_Sign1's protected header, or None if it does not decode."""
    from tests.oracle import cbor_decode
    try:
        top = cbor_decode(bytes(raw), allow_tag=True)
        if isinstance(top, tuple):
            top = top[1]
        return cbor_decode(top[0]).get(4)
    except Exception:  # noqa: BLE001 - anything that is not a COSE_Sign1
        return None


def voucher_fields(raw):
    """{kid, sequence, amount, issued, expires} read from voucher bytes (for the rig's own
    bookkeeping; nothing is decided here), or None if they do not decode as a voucher.
    A keypad code (a str of its 20 digits) gives its amount (kid, issued: None)."""
    from tests.oracle import cbor_decode
    if isinstance(raw, str):
        _, amount, _ = code_fields(raw)
        return {"kid": None, "sequence": None, "amount": amount, "issued": None, "expires": None}
    try:
        top = cbor_decode(bytes(raw), allow_tag=True)
        if isinstance(top, tuple):
            top = top[1]
        header = cbor_decode(top[0])
        fields = cbor_decode(top[2])
        return {"kid": header.get(4), "sequence": fields[2], "amount": fields[3],
                "issued": fields[4], "expires": fields.get(5)}
    except Exception:  # noqa: BLE001 - anything that is not a voucher
        return None


def _canon(x):
    if isinstance(x, dict):
        return tuple(sorted((k, _canon(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_canon(v) for v in x)
    return x


class BooksError(AssertionError):
    pass


class Books:
    """The receipts read back from one meter, checked as they come: each verified with the
    meter key of its index's span (verify(raw) -> protocol Receipt, raising on a bad
    signature), each epoch one hash chain from prev = 32 zero bytes at its first index,
    indices never going back or skipping, no receipt once read ever changing, no voucher
    applied twice (in any epoch), no top-up for anything the supplier did not issue (or for
    another amount), balances that only metering lowers, meter time that never goes back,
    rejection counts that never count BUSY or STORAGE.

    issued: {sequence: voucher bytes} the supplier issued for this meter (kept up to date by
    the caller)."""

    def __init__(self, device, verify, issued, ec_amount, first_index=0, commands=None):
        self.device = device
        self.verify = verify
        self.issued = issued
        self.commands = {} if commands is None else commands  # ref -> (number, kind) signed
        self.ec_amount = ec_amount
        self.epochs = [first_index]   # the first receipt index of each meter key, in order
        self.next = first_index       # the next index to read
        self.receipts = {}            # index -> Receipt
        self.applied = {}             # sequence -> (index, amount)
        self.command_last = 0         # the number of the last command receipt this epoch

    def _fail(self, msg):
        raise BooksError(msg)

    @property
    def first(self):
        """The first index of the current epoch."""
        return self.epochs[-1]

    def new_epoch(self, first_index):
        """A factory reset and provisioning: a new meter key from `first_index` on."""
        if first_index < self.next:
            self._fail("the new key's first receipt index %d is below receipts already read (%d)"
                       % (first_index, self.next))
        self.epochs.append(first_index)
        self.next = first_index
        self.command_last = 0

    def epoch_receipts(self):
        return [self.receipts[i] for i in sorted(self.receipts) if i >= self.first]

    def sync(self, han, count, full=False):
        """Read receipts up to `count` (the meter's receipt count) over `han`: from the first
        unseen one, or every one the meter still holds of this epoch (full=True, which also
        proves none changed).  Return the new receipts."""
        if count < self.next:
            self._fail("the meter's receipt count fell to %d; receipt %d was read before"
                       % (count, self.next - 1))
        start = self.first if full else self.next
        if start >= count:
            return []
        new = []
        for raw in han.receipts(start):
            r = self.verify(raw)
            if r.device != self.device:
                self._fail("receipt %d is for device %s" % (r.index, "-".join("%02X" % b for b in r.device)))
            if r.index >= count:
                self._fail("receipt %d is beyond the receipt count %d" % (r.index, count))
            if r.index < self.first:
                self._fail("receipt %d of an earlier key is still on the meter after its reset" % r.index)
            old = self.receipts.get(r.index)
            if old is not None:
                if old.raw != r.raw:
                    self._fail("committed receipt %d changed" % r.index)
                continue
            if r.index != self.next:
                self._fail("receipt %d read while %d was expected next (a gap)" % (r.index, self.next))
            self._check_new(r)
            self.receipts[r.index] = r
            self.next += 1
            new.append(r)
        if self.next != count:
            self._fail("the meter reports %d receipts, %d could be read" % (count, self.next))
        return new

    def _check_new(self, r):
        prev = self.receipts.get(r.index - 1)
        if r.index == self.first:
            if r.prev != GENESIS:
                self._fail("receipt %d opens an epoch: its prev must be 32 zero bytes" % r.index)
        elif prev is None or r.prev != prev.hash:
            self._fail("receipt chain broken at %d" % r.index)
        elif r.balance_before > prev.balance_after:
            self._fail("balance rose between receipts %d and %d outside a top-up (%d > %d)"
                       % (prev.index, r.index, r.balance_before, prev.balance_after))
        if self.receipts:
            last = self.receipts[max(self.receipts)]
            if r.time < last.time:
                self._fail("receipt %d: meter time went back (%d < %d)" % (r.index, r.time, last.time))
        if r.kind == receipt_format.TOPUP:
            if r.sequence in self.applied:
                self._fail("voucher %d applied twice (receipts %d and %d)"
                           % (r.sequence, self.applied[r.sequence][0], r.index))
            raw = self.issued.get(r.sequence)
            if raw is None:
                self._fail("credit from nowhere: receipt %d applies sequence %d, never issued"
                           % (r.index, r.sequence))
            amount = voucher_fields(raw)["amount"]
            if r.amount != amount or r.voucher != voucher_ref(raw):
                self._fail("receipt %d: sequence %d applied for %d p / ref %s, issued as %d p"
                           % (r.index, r.sequence, r.amount, r.voucher.hex(), amount))
            if (r.form == FORM_CODE) != isinstance(raw, str):
                self._fail("receipt %d says it applied a %s; sequence %d was issued as a %s"
                           % (r.index, "code" if r.form == FORM_CODE else "voucher", r.sequence,
                              "code" if isinstance(raw, str) else "voucher"))
            if r.balance_after != r.balance_before + 1000 * r.amount:
                self._fail("receipt %d: %d + %d p != %d" % (r.index, r.balance_before, r.amount,
                                                            r.balance_after))
            self.applied[r.sequence] = (r.index, r.amount)
        elif r.kind == receipt_format.EMERGENCY:
            if r.amount != self.ec_amount or r.balance_after != r.balance_before:
                self._fail("receipt %d: emergency credit of %d p, balance %d -> %d"
                           % (r.index, r.amount, r.balance_before, r.balance_after))
        elif r.kind == receipt_format.REJECTIONS:
            if r.balance_after != r.balance_before:
                self._fail("receipt %d: a rejections receipt changed the balance" % r.index)
            if not r.rejections or not set(r.rejections) <= COUNTED:
                self._fail("receipt %d counts %r: only voucher verdicts are counted (never BUSY "
                           "or STORAGE)" % (r.index, r.rejections))
        elif r.kind == receipt_format.COMMAND:
            if r.balance_after != r.balance_before:
                self._fail("receipt %d: a command receipt changed the balance" % r.index)
            signed = self.commands.get(bytes(r.voucher))
            if signed is None:
                self._fail("receipt %d applies command %s, which the supplier never signed"
                           % (r.index, bytes(r.voucher).hex()))
            if (r.sequence, r.command_kind) != signed:
                self._fail("receipt %d: command %d of kind %d, signed as number %d of kind %d"
                           % ((r.index, r.sequence, r.command_kind) + signed))
            if r.sequence != self.command_last + 1:
                self._fail("receipt %d applies command %d after command %d (once, in order)"
                           % (r.index, r.sequence, self.command_last))
            self.command_last = r.sequence
        elif r.kind == receipt_format.FAULT:
            if r.balance_after != r.balance_before:
                self._fail("receipt %d: a fault receipt changed the balance" % r.index)
            if not r.faults or not set(r.faults) <= FAULT_CODES:
                self._fail("receipt %d: fault codes %r" % (r.index, r.faults))

    def applied_total(self, since=None):
        """Pence applied by receipts at index >= since (default: this epoch)."""
        since = self.first if since is None else since
        return sum(a for idx, a in self.applied.values() if idx >= since)


class MeterModel:
    """The ledger of one meter, computed on the host by the rules in the module docstring.

    `s` is the ledger's state in RAM, `c` the last committed state (flash).  The board's
    clock is `board_clock` (the rig tells the model when it moves); meter time is derived
    from it by the §7 rules.  Each action is one pass of the meter's main loop in which that
    input is taken.  `trace` records the commits of the current action, for power cuts.
    """

    def __init__(self, device, trust, settings, *, opening_mp, now, floor=0, first_index=0,
                 clock_survives=True, board_clock=None, command_key=None):
        self.device = device
        self.trust = dict(trust)               # {kid: issuer public key} given at provisioning
        self.command_key = command_key         # the command public key installed, or None
        self.unit_rate = settings["unit_rate"]
        self.standing = settings["standing"]
        self.ec_amount = settings["ec_amount"]
        self.ec_threshold = settings["ec_threshold"]
        self.max_voucher = settings["max_voucher"]
        self.max_credit = settings["max_credit"]
        self.clock_survives = clock_survives
        self.board_clock = now if board_clock is None else board_clock
        self.tag = "start"
        self.trace = None
        self.codes = {}                        # digits -> sequence: the codes issued for it
        self.lost_receipts = set()             # receipt indices lost to flash damage
        self._provision(opening_mp, now, floor, first_index)

    def _provision(self, opening_mp, now, floor, first_index):
        self.opening_mp = opening_mp
        self.first_index = first_index
        self.s = {
            "applied": {},                     # sequence -> (pence, voucher ref, receipt index)
            "highest": 0, "floor": floor,
            "topups": 0, "wh": 0, "secs": 0,   # pence applied; Wh and seconds charged
            "charged_to": now,
            "ec": 0,                           # pence of emergency credit in use
            "receipts": first_index,           # the receipt count (next index)
            "log": {},                         # index -> (kind, before, after, time): receipts written
            "rejections": {}, "rej_at": now,
            "bad_sigs": 0, "backoff_until": 0,
            "faults_seen": {},
            "supply": SUPPLY_ON if opening_mp > 0 else SUPPLY_OFF,
            "code": CODE_CLEAR,
            # the configuration signed commands change (SPEC §10)
            "trust": dict(self.trust), "revoked": [],
            "cmd_last": 0, "cmd_recent": [],   # [(command ref, receipt index)], newest 4
        }
        self.c = copy.deepcopy(self.s)
        self.committed_at = now
        self.unsaved = 0
        self.dirty = False
        self.offset = 0
        self.last = now
        self.resumed = False
        self.commits = 0
        self.interrupt_pending = False

    # -- views ------------------------------------------------------------------------------
    def balance_of(self, s):
        return (self.opening_mp + 1000 * s["topups"] - energy_mp(s["wh"], self.unit_rate)
                - standing_mp(s["secs"], self.standing))

    @property
    def balance_mp(self):
        return self.balance_of(self.s)

    @property
    def metered_mp(self):
        s = self.s
        return energy_mp(s["wh"], self.unit_rate) + standing_mp(s["secs"], self.standing)

    @property
    def meter_time(self):
        t = self.board_clock + self.offset
        return t if t > self.last else self.last

    def credit_mp(self):
        return self.balance_mp + 1000 * self.s["ec"]

    def supply_on(self):
        return self.s["supply"] == SUPPLY_ON

    def code_locked_for(self):
        until = self.s["code"][2]
        t = self.meter_time
        return until - t if until > t else 0

    def expected_status(self, exact_time=True):
        """The HAN status fields the board must show."""
        out = {"balance_mp": self.balance_mp, "supply_on": self.supply_on(),
               "highest_sequence": self.s["highest"], "receipt_count": self.s["receipts"],
               "emergency_mp": 1000 * self.s["ec"], "floor": self.s["floor"], "damaged": False,
               "supply_state": self.s["supply"]}
        if self.command_key is not None:
            out["last_command"] = self.s["cmd_last"]
        if exact_time:
            out["meter_time"] = self.meter_time
            out["clock_resumed"] = self.resumed
            locked = self.code_locked_for()
            out["code_locked_s"] = locked
            out["code_tries_left"] = 0 if locked else MAX_WRONG - self.s["code"][0]
        return out

    def key(self):
        return _canon((self.s, self.c, self.committed_at, self.unsaved, self.dirty, self.offset,
                       self.last, self.resumed, self.board_clock, sorted(self.lost_receipts),
                       self.interrupt_pending))

    def fork(self):
        return copy.deepcopy(self)

    # -- meter time -------------------------------------------------------------------------
    def _now(self):
        t = self.meter_time
        self.last = t
        return t

    # -- the ledger's moves -------------------------------------------------------------------
    def _accrue(self, wh, now):
        s = self.s
        before = self.metered_mp
        s["wh"] += wh
        if now > s["charged_to"]:
            s["secs"] += now - s["charged_to"]
            s["charged_to"] = now
        cost = self.metered_mp - before
        if wh or cost:
            self.unsaved += cost
            self.dirty = True
        self._exhausted()

    def _exhausted(self):
        """SPEC §9: credit gone, an on or armed supply is interrupted (committed this pass)."""
        s = self.s
        if s["supply"] != SUPPLY_OFF and self.credit_mp() <= 0:
            s["supply"] = SUPPLY_OFF
            self.interrupt_pending = True

    def _settle(self):
        """The end of a pass: an interruption no commit has carried yet is committed."""
        if self.interrupt_pending:
            now = self._now()
            self._accrue(0, now)
            self._commit(now)

    def _commit(self, now, receipt=None):
        """receipt: (kind, balance before, balance after[, form]) written first, at the next
        index; kinds 1 and 2 carry the supply state after them."""
        s = self.s
        if receipt is not None:
            kind, before, after = receipt[:3]
            supply = s["supply"] if kind in (receipt_format.TOPUP, receipt_format.EMERGENCY) else None
            s["log"][s["receipts"]] = (kind, before, after, now, supply)
            s["receipts"] += 1
        if self.trace is not None:
            self.trace.append({"before": self.c, "after": copy.deepcopy(s), "receipt": receipt,
                               "at": now})
        self.c = copy.deepcopy(s)
        self.committed_at = now
        self.unsaved = 0
        self.dirty = False
        self.interrupt_pending = False
        self.commits += 1

    def _meter(self, wh):
        now = self._now()
        self._accrue(wh, now)
        if self.unsaved >= CHECKPOINT_MP or (self.dirty and now - self.committed_at >= CHECKPOINT_SECONDS):
            self._accrue(0, now)
            self._commit(now)

    def _record_rejections(self):
        s = self.s
        now = self._now()
        if s["rejections"] and now - s["rej_at"] >= REJECTIONS_RECEIPT_SECONDS:
            self._accrue(0, now)
            b = self.balance_mp
            s["rejections"] = {}
            s["rej_at"] = now
            self._commit(now, (receipt_format.REJECTIONS, b, b))

    def _count(self, reason):
        counts = self.s["rejections"]
        counts[reason] = counts.get(reason, 0) + 1
        self.dirty = True

    def _mark(self, label):
        if self.trace is not None:
            self.trace.append(label)

    # one pass of the main loop, with the action's input
    def step(self, wh=0):
        """A pass with nothing new but `wh` pulses: metering (+ checkpoint), rejections rule,
        an interruption committed."""
        self._meter(wh)
        self._record_rejections()
        self._settle()

    def idle(self):
        """The main loop goes on with nothing new: what the last pass left due (a signed
        time step to save, say) is done in the next."""
        self.step()

    def pulses(self, n):
        self.step(n)
        self.idle()

    def advance(self, seconds):
        """The rig's clock (and the board's) moves on; the next pass sees it."""
        self.board_clock += seconds
        self.step()
        self.idle()

    def button(self):
        """A press of the customer's button: confirms an armed supply, else takes emergency
        credit. Return the emergency receipt's index or None."""
        self._meter(0)
        if self.s["supply"] == SUPPLY_ARMED:
            self._confirm()
            granted = None
        else:
            granted = self._emergency()
        self._record_rejections()
        self._settle()
        self.idle()
        return granted

    def _confirm(self):
        now = self._now()
        self._accrue(0, now)
        if self.s["supply"] == SUPPLY_ARMED:
            self.s["supply"] = SUPPLY_ON
            self._commit(now)
        return self.s["supply"]

    def _emergency(self):
        now = self._now()
        self._accrue(0, now)
        s = self.s
        if s["ec"] or self.balance_mp >= self.ec_threshold * 1000:
            return None
        s["ec"] = self.ec_amount
        if self.credit_mp() > 0:
            s["supply"] = SUPPLY_ON
        granted = s["receipts"]
        b = self.balance_mp
        self._commit(now, (receipt_format.EMERGENCY, b, b))
        return granted

    def action(self, what):
        """The PPMID's action over the HAN (SPEC §9): 1 confirm, 2 emergency credit. Return
        ("supply", state) or ("emergency", receipt index) or ("rejected", EC_UNAVAILABLE)."""
        return self._pass(self._decide_action, what, None)

    def _decide_action(self, what, _original):
        if what == 1:
            return ("supply", self._confirm())
        got = self._emergency()
        return ("rejected", errors.EC_UNAVAILABLE) if got is None else ("emergency", got)

    # -- a submit ---------------------------------------------------------------------------
    def _kept(self, seq, index):
        """True / False / None (the store may or may not still hold it)."""
        if index in self.lost_receipts:
            return False
        s = self.s
        if index >= s["receipts"] - UPLINK_QUEUE or seq >= s["highest"] - WINDOW:
            return True
        return None

    def submit_options(self, raw):
        """[(answer, model)]: what the meter may answer to these voucher bytes, each with the
        model after the pass.  answer: ("applied", index), ("duplicate", index) or
        ("rejected", reason).  More than one only where the store's ring may or may not still
        hold an old receipt."""
        ref = voucher_ref(raw)
        for seq, (_, aref, index) in self.s["applied"].items():
            if aref == ref:
                kept = self._kept(seq, index)
                if kept is None:
                    a, b = self.fork(), self.fork()
                    return [(a._submit(raw, original=True), a), (b._submit(raw, original=False), b)]
                m = self.fork()
                return [(m._submit(raw, original=kept), m)]
        m = self.fork()
        return [(m._submit(raw, original=False), m)]

    def submit(self, raw):
        """The answer, when it is certain (the model moves on); see submit_options."""
        return self._certain(self.submit_options(raw))

    def _certain(self, options):
        if len(options) != 1:
            raise AssertionError("the model allows several answers here: use the *_options form")
        answer, m = options[0]
        self.__dict__.update(m.__dict__)
        return answer

    def _submit(self, raw, original):
        return self._pass(self._decide, raw, original)

    def _pass(self, decide, what, original):
        # one request's main-loop pass: meter, decide, answer, then the step's bookkeeping
        self._meter(0)
        answer = decide(what, original)
        self._mark("answered")
        self._record_rejections()
        self._settle()
        self.idle()
        return answer

    def _decide(self, raw, original):
        from tests.oracle import voucher_verdict
        s = self.s
        ref = voucher_ref(raw)
        # 0. the original receipt of these exact bytes, before any check
        if original:
            for seq, (_, aref, index) in s["applied"].items():
                if aref == ref:
                    return ("duplicate", index)
        now = self._now()
        # 1-2 decide whether the key is trusted; the back-off turns trusted keys away
        shape = voucher_verdict(raw, {}, self.device, now, self.max_voucher)
        kid = cose_kid(raw) if shape == "UNKNOWN_KEY" else None
        trusted = kid is not None and kid in s["trust"]
        if kid is not None and not trusted and kid in s["revoked"]:
            return self._refuse(errors.KEY_REVOKED)      # check 3, before any signature
        if trusted and now < s["backoff_until"]:
            return ("rejected", errors.BUSY)            # not a verdict: not counted
        verdict = voucher_verdict(raw, s["trust"], self.device, now, self.max_voucher)
        self._signature_run(verdict, trusted, now)
        if verdict != "OK":
            return self._refuse(_BY_NAME[verdict])
        f = voucher_fields(raw)
        answer = self._top_up(ref, f["sequence"], f["amount"], now)
        if answer[0] != "applied":
            return answer
        # a signed time ahead of meter time moves it on, uncharged, at most 7 days
        now = self._now()
        if f["issued"] > now:
            at = min(f["issued"], now + MAX_SIGNED_STEP)
            if at > s["charged_to"]:
                self.offset += at - now
                self.last = at
                s["charged_to"] = at
                self.dirty = True
        return answer

    def _signature_run(self, verdict, trusted, now):
        """SPEC §5.2: a bad signature extends the run (from the 3rd on, checks pause for
        2^(n-3) s, at most 256 s); a signature that verifies under a trusted key ends it."""
        s = self.s
        if verdict == "BAD_SIGNATURE":
            s["bad_sigs"] += 1
            n = s["bad_sigs"]
            if n >= FREE_BAD_SIGNATURES:
                s["backoff_until"] = now + min(2 ** (n - FREE_BAD_SIGNATURES), MAX_BACKOFF_SECONDS)
        elif trusted and s["bad_sigs"]:
            s["bad_sigs"] = 0
            self.dirty = True

    def _refuse(self, reason):
        self._count(reason)
        return ("rejected", reason)

    # -- a signed command (SPEC §10) --------------------------------------------------------------
    def _command_applied(self, raw):
        ref = voucher_ref(raw)
        for aref, index in self.s["cmd_recent"]:
            if aref == ref:
                return index
        return None

    def command_options(self, raw):
        """[(answer, model)] for these command bytes (as submit_options). The meter keeps the
        receipts of its last 4 commands, so the answer is always certain."""
        m = self.fork()
        return [(m._submit_command(raw, self._command_applied(raw) is not None), m)]

    def submit_command(self, raw):
        return self._certain(self.command_options(raw))

    def _submit_command(self, raw, original):
        return self._pass(self._decide_command, raw, original)

    def _decide_command(self, raw, original):
        from tests.oracle import command_verdict
        s = self.s
        if original:
            return ("duplicate", self._command_applied(raw))
        if self.command_key is None:
            return ("rejected", errors.NOT_PROVISIONED)   # no command key: not counted
        now = self._now()
        keys = {kid_of(self.command_key): self.command_key}
        shape, _ = command_verdict(raw, {}, self.device)
        ours = shape == "UNKNOWN_KEY" and cose_kid(raw) in keys
        if shape != "UNKNOWN_KEY" or not ours:
            return self._refuse(_BY_NAME[shape])
        if now < s["backoff_until"]:
            return ("rejected", errors.BUSY)
        verdict, fields = command_verdict(raw, keys, self.device)
        self._signature_run(verdict, True, now)
        if verdict != "OK":
            return self._refuse(_BY_NAME[verdict])
        number, kind, args = fields[2], fields[3], fields[5]
        if number <= s["cmd_last"]:
            return self._refuse(errors.COMMAND_REPLAYED)
        if number > s["cmd_last"] + 1:
            return self._refuse(errors.COMMAND_OUT_OF_ORDER)
        trust, revoked = dict(s["trust"]), list(s["revoked"])
        if kind == ADD_ISSUER_KEY:
            kid = kid_of(args[1])
            if kid in revoked:
                return self._refuse(errors.COMMAND_REFUSED)
            if kid not in trust:
                if len(trust) >= MAX_ISSUER_KEYS:
                    return self._refuse(errors.COMMAND_REFUSED)
                trust[kid] = bytes(args[1])
        elif kind == REVOKE_ISSUER_KEY:
            kid = bytes(args[1])
            trust.pop(kid, None)
            if not trust:
                return self._refuse(errors.COMMAND_REFUSED)
            if kid not in revoked:
                revoked.append(kid)
            revoked = revoked[-MAX_REVOKED:]
        else:
            raise AssertionError("the model sends issuer-key commands only, not kind %d" % kind)
        self._accrue(0, now)                  # metering up to now, before the change
        index = s["receipts"]
        s["trust"], s["revoked"], s["cmd_last"] = trust, revoked, number
        s["cmd_recent"] = (s["cmd_recent"] + [(voucher_ref(raw), index)])[-KEEP_COMMAND_RECEIPTS:]
        b = self.balance_mp
        self._commit(now, (receipt_format.COMMAND, b, b))
        return ("applied", index)

    # -- a keypad code (SPEC §8) -------------------------------------------------------------
    def _code_applied(self, digits):
        """(sequence, receipt index) if these exact digits were applied, else None."""
        ref = code_ref(digits)
        for seq, (_, aref, index) in self.s["applied"].items():
            if aref == ref:
                return seq, index
        return None

    def code_options(self, text):
        """[(answer, model)] for a code typed as `text` (as submit_options)."""
        digits = code_digits(text)
        hit = self._code_applied(digits) if digits and damm_ok(digits) else None
        if hit is not None:
            kept = self._kept(*hit)
            if kept is None:
                a, b = self.fork(), self.fork()
                return [(a._submit_code(text, True), a), (b._submit_code(text, False), b)]
            m = self.fork()
            return [(m._submit_code(text, kept), m)]
        m = self.fork()
        return [(m._submit_code(text, False), m)]

    def submit_code(self, text):
        return self._certain(self.code_options(text))

    def _submit_code(self, text, original):
        return self._pass(self._decide_code, text, original)

    def _decide_code(self, text, original):
        s = self.s
        digits = code_digits(text)
        if original:
            return ("duplicate", self._code_applied(digits)[1])
        now = self._now()
        wrong, lockouts, until = s["code"]
        if until > now:
            return self._refuse(errors.CODE_LOCKED)
        if digits is None:
            return self._refuse(errors.CODE_INCOMPLETE)
        if not damm_ok(digits):
            return self._refuse(errors.CODE_TYPO)
        # the failure a wrong code leaves, committed before the MAC is checked
        if wrong + 1 >= MAX_WRONG:
            lockouts = min(lockouts + 1, MAX_LOCKOUTS)
            failed = (0, lockouts, now + lock_seconds(lockouts))
        else:
            failed = (wrong + 1, lockouts, until)
        if self.c["code"] == failed:
            s["code"] = failed
        else:
            self._accrue(0, now)
            s["code"] = failed
            self._commit(now)
        kind, amount, low = code_fields(digits)
        anchor = max(s["highest"], s["floor"])
        seq = self.codes.get(digits)
        if seq is None or seq not in code_candidates(low, anchor):
            return self._refuse(errors.CODE_WRONG)
        # a good code: the series is over
        if s["code"] != CODE_CLEAR:
            s["code"] = CODE_CLEAR
            self.dirty = True
        answer = self._code_top_up(digits, seq, amount, now)
        if answer[0] != "applied":
            c = self.c["code"]
            if c != CODE_CLEAR and c != (1, 0, 0):
                self._accrue(0, now)
                self._commit(now)
        return answer

    def _code_top_up(self, digits, seq, amount, now):
        if amount > self.max_voucher:
            return self._refuse(errors.OVER_VOUCHER_LIMIT)
        return self._top_up(code_ref(digits), seq, amount, now, (FORM_CODE,))

    def _top_up(self, ref, seq, amount, now, form=()):
        """Checks 9-11 of SPEC §2.1 (a code's check 6) and the commit, for a voucher or a
        code whose own checks passed. form: () a voucher, (FORM_CODE,) a code."""
        s = self.s
        # 9. the floor, and the window's lower edge
        if seq <= s["floor"] or seq < s["highest"] - WINDOW:
            return self._refuse(errors.STALE)
        # 10. a used sequence
        if seq in s["applied"]:
            _, aref, index = s["applied"][seq]
            if self._kept(seq, index) is False:
                return self._refuse(errors.RECEIPT_LOST)
            if aref == ref:
                return ("duplicate", index)
            return self._refuse(errors.SEQUENCE_REUSED)
        # 11. the maximum credit, on the balance charged up to now
        self._accrue(0, now)
        if self.balance_mp + 1000 * amount > 1000 * self.max_credit:
            return self._refuse(errors.OVER_CREDIT_LIMIT)
        before = self.balance_mp
        index = s["receipts"]
        s["applied"][seq] = (amount, ref, index)
        s["topups"] += amount
        if seq > s["highest"]:
            s["highest"] = seq
        if self.balance_mp >= 0:
            s["ec"] = 0                                 # emergency credit repaid
        if s["supply"] == SUPPLY_OFF and self.credit_mp() > 0:
            s["supply"] = SUPPLY_ARMED                  # armed, not on (SPEC §9)
        self._commit(now, (receipt_format.TOPUP, before, self.balance_mp) + form)
        return ("applied", index)

    # -- power -----------------------------------------------------------------------------
    def power_lost(self):
        """The board was without power: its clock restarts unless it survives a cut."""
        if not self.clock_survives:
            self.board_clock = LOST_CLOCK

    def boot(self, faults=None):
        """A start of the firmware (power-on or reset): RAM is lost, the committed state is
        mounted, meter time starts (§7), flash faults are recorded, then one pass runs."""
        self.s = copy.deepcopy(self.c)
        self.unsaved = 0
        self.dirty = False
        self.interrupt_pending = False
        s = self.s
        floor = s["charged_to"]
        t = self.board_clock
        believed = floor <= t <= floor + MAX_BOOT_STEP
        self.offset = 0 if believed else floor - t
        self.last = floor
        self.resumed = not believed
        if not (believed and self.clock_survives):
            s["charged_to"] = self._now()     # time it cannot account for is not charged
            self.dirty = True
        self.committed_at = s["charged_to"]
        if faults and faults != s["faults_seen"]:
            now = self._now()
            self._accrue(0, now)
            s["faults_seen"] = dict(faults)
            b = self.balance_mp
            self._commit(now, (receipt_format.FAULT, b, b))
        self.step()
        self.idle()

    def cut_options(self, action, answered=False, faults=None):
        """[model]: the states a power cut during `action` (a callable on a model, or None)
        may leave, each booted again: any prefix of the action's commits landed, a commit
        whose receipt landed rolled forward, or the request taken only after the boot.  An
        answered submit has its own commit landed."""
        run = self.fork()
        run.trace = []
        if action is not None:
            action(run)
        trace = run.trace
        first = 0
        if answered:
            first = trace.index("answered") if "answered" in trace else len(trace)
        commits = [t for t in trace if isinstance(t, dict)]
        first = len([t for t in trace[:first] if isinstance(t, dict)])
        out = []
        for k in range(first, len(commits) + 1):
            m = self.fork()
            m.tag = "landed" if k == len(commits) else ("lost" if k == 0 else "cut-%d" % k)
            if k:
                m.c = copy.deepcopy(commits[k - 1]["after"])
            out.append(m)
            if k < len(commits) and commits[k]["receipt"] is not None:
                rf = self.fork()
                rf.tag = "rolled-forward-%d" % k
                rf.c = _roll_forward(commits[k]["before"], commits[k]["after"], commits[k]["receipt"],
                                     commits[k]["at"])
                out.append(rf)
        for m in out:
            m.trace = None
            m.power_lost()
            m.boot(faults)
        if not answered and action is not None:
            late = self.fork()
            late.tag = "late"
            late.power_lost()
            late.boot(faults)
            action(late)
            out.append(late)
        return out

    # -- factory reset and provisioning ------------------------------------------------------
    def carry(self):
        """What a factory reset keeps (from the committed ledger): (floor, next index, time)."""
        c = self.c
        return (max(c["highest"], c["floor"]), c["receipts"], c["charged_to"])

    def factory_reset_and_provision(self, opening_mp, now, floor, first_index, trust=None):
        """The meter is wiped (keeping the carry) and provisioned again: a new epoch.  Return
        (floor, first index, meter time) the meter must report."""
        cfloor, cnext, cclock = self.carry()
        floor = max(floor, cfloor)
        first_index = max(first_index, cnext)
        now = max(now, cclock)
        if trust is not None:
            self.trust = dict(trust)
        self.codes = {}                       # a new key-agreement key: old codes no longer fit
        self.board_clock = now                # provisioning sets the board's clock
        self.lost_receipts = set()
        self._provision(opening_mp, now, floor, first_index)
        self.boot()
        return floor, first_index, now


def _roll_forward(before, after, receipt, at):
    """The state a start-up rolls forward to from a receipt whose state record was lost:
    what the receipt says (balance, the metering behind it, the window, emergency credit,
    the chain), RAM-only counters as they were at the commit before."""
    out = copy.deepcopy(before)
    for k in ("applied", "highest", "topups", "wh", "secs", "charged_to", "ec", "receipts", "log"):
        out[k] = copy.deepcopy(after[k])
    kind = receipt[0]
    if kind in (receipt_format.TOPUP, receipt_format.EMERGENCY):
        out["supply"] = after["supply"]         # receipt field 14
    if kind == receipt_format.TOPUP and len(receipt) > 3 and receipt[3] == FORM_CODE:
        out["code"] = CODE_CLEAR                # a good code ended the series
    if kind == receipt_format.REJECTIONS:
        out["rejections"] = {}
        out["rej_at"] = at
    elif kind == receipt_format.FAULT:
        out["faults_seen"] = copy.deepcopy(after["faults_seen"])
    elif kind == receipt_format.COMMAND:
        for k in ("trust", "revoked", "cmd_last", "cmd_recent"):
            out[k] = copy.deepcopy(after[k])   # the configuration named the command
    return out


def status_diff(status, expected):
    return {k: (status.get(k), v) for k, v in expected.items() if status.get(k) != v}


# -- flash records (firmware/meter/records.py's format, read from an image) ------------------
RECORD_TYPES = {1: "config", 2: "state", 3: "receipt", 4: "wipe", 5: "carry"}


def find_records(image, block_size=4096):
    """[(offset, type name, generation, index, payload length)] of the whole records in a flash
    image: magic 0xA7, type, u16 length, u32 generation, u32 index, u32 tag, then a CRC-32 of
    bytes 0..15 and the payload (little-endian), never across a block."""
    import binascii
    import struct
    out = []
    for off in range(0, len(image) - 20, 4):
        if image[off] != 0xA7 or image[off + 1] not in RECORD_TYPES:
            continue
        _, typ, ln, gen, idx, tag, crc = struct.unpack_from("<BBHIIII", image, off)
        end = off + 20 + ln
        if end > (off // block_size + 1) * block_size:
            continue
        if binascii.crc32(bytes(image[off + 20:end]), binascii.crc32(bytes(image[off:off + 16]))) != crc:
            continue
        out.append((off, RECORD_TYPES[typ], gen, idx, ln))
    return out


def newest_record(image, kind):
    """(offset, payload length) of the record of this type with the highest generation."""
    recs = [r for r in find_records(image) if r[1] == kind]
    if not recs:
        raise AssertionError("no %s record in the flash image" % kind)
    off, _, _, _, ln = max(recs, key=lambda r: r[2])
    return off, ln


class Harness:
    """A provisioned board under test with its model(s) and books, driven together: every
    action goes to the board and the models, and `check()` proves they agree — the HAN status
    (balance, supply, window, receipt count, emergency credit, floor, meter time), the relay
    where the bench can see it, and the receipts (Books, and what the model says each one
    holds).

    A power cut can leave the meter in more than one state the rules allow (`models`); the
    board's answers and status pick among them.  `model` is the first that still fits.

    board: the pytest plugin's BoardUnderTest (or any Transport with device/settings/
    opening_mp/issuer/public_key attributes); han: a HanClient on its HAN port.
    """

    settle_timeout = 5.0

    def __init__(self, board, han):
        from protocol import cose
        self.board = board
        self.han = han
        self.issuer = board.issuer
        self.issued = {}                      # sequence -> voucher bytes (this meter's)
        self.commands = {}                    # ref -> (number, kind): commands signed for it
        self._settled = set()                 # command receipts given to the supplier's database
        trust = {cose.kid_for(k): k for k in self.issuer.trust()}
        command_key = self._command_key()
        self._real_clock = board.clock() is None
        self.expect_faults = {}               # what the store must report at a start
        st = han.status()
        key = board.public_key
        first = getattr(key, "first_index", None)
        floor = getattr(key, "floor", None)
        first = st["receipt_count"] if first is None else first
        floor = st["floor"] if floor is None else floor
        survives = getattr(board, "clock_survives", True)
        if self._real_clock:
            now = int(time.time())
            model = MeterModel(board.device, trust, board.settings, opening_mp=board.opening_mp,
                               now=now, floor=floor, first_index=first, clock_survives=survives,
                               command_key=command_key)
        else:
            # The meter was provisioned at the rig's time, or later if its carry said so.
            now = st["meter_time"]
            if now < board.clock():
                raise AssertionError("meter time %d is behind the rig's clock %d after provisioning"
                                     % (now, board.clock()))
            model = MeterModel(board.device, trust, board.settings, opening_mp=board.opening_mp,
                               now=now, floor=floor, first_index=first, clock_survives=survives,
                               board_clock=board.board_clock(), command_key=command_key)
        # The supplier's figures are a lower bound (SPEC §2.2): the carry may raise them.
        supplier_floor = getattr(board, "supplier_floor", 0) or 0
        supplier_first = getattr(board, "supplier_first", 0) or 0
        if floor < supplier_floor or first < supplier_first:
            raise AssertionError("provisioned with floor %d / first index %d, below the supplier's "
                                 "%d / %d" % (floor, first, supplier_floor, supplier_first))
        self.models = [model]
        self.books = Books(board.device, self.issuer.verify_receipt, self.issued,
                           board.settings["ec_amount"], first_index=first, commands=self.commands)
        self.cuts = 0
        self._flooding = False
        self._tick_origin = time.monotonic()
        self._ticked = 0

    @property
    def model(self):
        return self.models[0]

    def _command_key(self):
        """The command public key the provisioning installed (SPEC §10), or None."""
        kid = getattr(self.board.public_key, "command_kid", None)
        if kid is None:
            return None
        from host import keystore
        key = keystore.active_command_key(self.issuer.conn)
        if key is None or key.kid != bytes(kid):
            raise AssertionError("the meter was given command key %s, the supplier's is %s"
                                 % (bytes(kid).hex(), key and key.kid.hex()))
        return key.public_key

    # -- time -----------------------------------------------------------------------------------
    def _tick(self):
        # A bench board's clock runs in real time: the models' board clocks run with it.
        if self._real_clock:
            total = int(time.monotonic() - self._tick_origin)
            d, self._ticked = total - self._ticked, total
            for m in self.models:
                m.board_clock += d

    # -- issuing --------------------------------------------------------------------------------
    def issue(self, amount, count=1, cli=False):
        """Vouchers for this meter (through the issuer, or the real `topup issue`)."""
        raws = (self.issuer.issue_cli("%d.%02d" % divmod(amount, 100), count) if cli
                else self.issuer.issue(amount, count))
        for raw in raws:
            self.issued[voucher_fields(raw)["sequence"]] = raw
        return raws

    def issue_codes(self, amount, count=1, cli=False):
        """Keypad codes for this meter (through the issuer, or the real `topup code`)."""
        if cli:
            codes = [self.issuer.code_cli("%d.%02d" % divmod(amount, 100)) for _ in range(count)]
        else:
            codes = self.issuer.issue_codes(amount, count)
        from host import issuer as host_issuer
        for digits in codes:
            row = [i for i in host_issuer.stored(self.issuer.conn, self.board.device) if i.code == digits]
            self.issued[row[0].sequence] = digits
            for m in self.models:
                m.codes[digits] = row[0].sequence
        return codes

    def pending_commands(self):
        """The supplier's pending commands for this meter (made by `topup key new`, `key
        revoke`, ...), in number order: [command bytes]. The books learn what was signed."""
        from host import commands as cmds
        rows = cmds.pending_for(self.issuer.conn, self.board.device)
        for r in rows:
            self.commands[bytes(r.ref)] = (r.number, r.kind)
        return [bytes(r.raw) for r in rows]

    def deliver_commands(self):
        """Send the pending commands in order, as `topup han sync` does: an applied one's
        receipt goes into the supplier's database (the command is then applied there), a
        refused one frees its number (the ones after it are signed again), BUSY leaves the
        rest pending for a later try. Return [(command bytes, answer)]."""
        out = []
        for _ in range(16):
            raws = self.pending_commands()
            if not raws:
                break
            for raw in raws:
                got = self.submit_command(raw)
                out.append((raw, got))
                if got[0] == "rejected":
                    break
                self.settle_commands([got[1]])
            if got[0] != "rejected" or got[1] == errors.BUSY:
                break
            self.command_refused(raw, got[1])
        return out

    def settle_commands(self, raws=None):
        """Command receipts from the meter (`raws`, default: those the books read) go into
        the supplier's database, which marks their commands applied (what a read-out and
        `topup receipts import` do)."""
        from host import commands as cmds, reconcile
        if raws is None:
            raws = [r.raw for r in self.books.epoch_receipts() if r.kind == receipt_format.COMMAND]
        raws = [bytes(r) for r in raws if bytes(r) not in self._settled]
        self._settled.update(raws)
        if raws:
            reconcile.import_raw(self.issuer.conn, raws, "model run")
            cmds.settle_from_receipts(self.issuer.conn)

    def command_refused(self, raw, reason):
        """The meter refused a command: the supplier's bookkeeping (`topup han sync` does
        this) frees its number and signs the pending ones after it again, one lower."""
        from host import commands as cmds
        from hil.pytest_plugin import PASSPHRASE
        ref = voucher_ref(raw)
        row = [r for r in cmds.pending_for(self.issuer.conn, self.board.device) if bytes(r.ref) == ref]
        if row:
            cmds.mark_refused(self.issuer.conn, row[0].id, reason, PASSPHRASE)

    # -- following the board ----------------------------------------------------------------------
    def _keep(self, models, why):
        if not models:
            raise AssertionError(why)
        out, seen = [], set()
        for m in models:
            k = m.key()
            if k not in seen:
                seen.add(k)
                out.append(m)
        self.models = out[:MAX_CANDIDATES]

    def follow_submit(self, raw, got):
        """The board answered `got` to these voucher bytes (("applied"|"duplicate", index) or
        ("rejected", reason)): keep the models that allow it."""
        options = [(a, m) for model in self.models for a, m in model.submit_options(raw)]
        fits = [m for a, m in options if a == got]
        want = options[0][0]
        self._keep(fits, "submit: the meter said %s %s, the model %s" % (
            got[0], _name(got), " or ".join("%s %s" % (a[0], _name(a)) for a, _ in options)))
        return want

    def follow_command(self, raw, got):
        options = [(a, m) for model in self.models for a, m in model.command_options(raw)]
        fits = [m for a, m in options if a == got]
        self._keep(fits, "command: the meter said %s %s, the model %s" % (
            got[0], _name(got), " or ".join("%s %s" % (a[0], _name(a)) for a, _ in options)))

    # -- actions ----------------------------------------------------------------------------------
    def submit_command(self, raw):
        """A signed command over the HAN (as `topup han sync` sends it); the answer must be
        the one the model gives. Return ("applied"|"duplicate", receipt bytes) or
        ("rejected", reason)."""
        from hil.han_client import HanError
        self._tick()
        try:
            receipt, dup = self.han.submit_command(raw)
            got = ("duplicate" if dup else "applied", receipt)
        except HanError as e:
            got = ("rejected", e.reason)
        key = got if got[0] == "rejected" else (got[0], self.issuer.verify_receipt(got[1]).index)
        self.follow_command(raw, key)
        if got[0] == "duplicate":
            self.books.sync(self.han, self.model.s["receipts"])
            if self.books.receipts[key[1]].raw != bytes(got[1]):
                raise AssertionError("a repeated command got a receipt other than the original")
        return got

    def submit(self, raw):
        """Submit over the HAN; the answer must be one the model allows. Return (outcome,
        receipt bytes or reason)."""
        from hil.han_client import HanError
        self._tick()
        try:
            receipt, dup = self.han.submit(raw)
            got = ("duplicate" if dup else "applied", receipt)
        except HanError as e:
            got = ("rejected", e.reason)
        if got[0] == "rejected":
            key = got
        else:
            r = self.issuer.verify_receipt(got[1])
            key = (got[0], r.index)
        self.follow_submit(raw, key)
        if got[0] == "duplicate":
            self.books.sync(self.han, self.model.s["receipts"])
            if self.books.receipts[key[1]].raw != bytes(got[1]):
                raise AssertionError("a resubmission got a receipt other than the original")
        return got

    def submit_code(self, text):
        """A keypad code over the HAN (as a PPMID sends it); the answer must be one the model
        allows. Return ("applied"|"duplicate", receipt bytes) or ("rejected", reason)."""
        from hil.han_client import HanError
        self._tick()
        try:
            receipt, dup = self.han.submit_code(text)
            got = ("duplicate" if dup else "applied", receipt)
        except HanError as e:
            got = ("rejected", e.reason)
        key = got if got[0] == "rejected" else (got[0], self.issuer.verify_receipt(got[1]).index)
        self.follow_code(text, key)
        return got

    def follow_code(self, text, got):
        """The meter answered `got` to a code typed as `text`: keep the models that allow it."""
        options = [(a, m) for model in self.models for a, m in model.code_options(text)]
        fits = [m for a, m in options if a == got]
        self._keep(fits, "code %r: the meter said %s %s, the model %s" % (
            text, got[0], _name(got), " or ".join("%s %s" % (a[0], _name(a)) for a, _ in options)))

    def action(self, what):
        """The PPMID's action over the HAN (1 confirm, 2 emergency credit), followed by the
        models. Return what the meter answered."""
        from hil.han_client import HanError
        self._tick()
        try:
            state, receipt = self.han.action(what)
            got = ("supply", state) if what == 1 else (
                "emergency", self.issuer.verify_receipt(receipt).index)
        except HanError as e:
            got = ("rejected", e.reason)
        options = []
        for model in self.models:
            m = model.fork()
            options.append((m.action(what), m))
        fits = [m for a, m in options if a == got]
        self._keep(fits, "action %d: the meter said %r, the model %r" % (what, got, options[0][0]))
        return got

    def _all(self, fn):
        for m in self.models:
            fn(m)

    def pulses(self, n):
        self._tick()
        self.board.add_pulses(n)
        self._all(lambda m: m.pulses(n))

    def advance(self, seconds):
        self.board.advance_clock(seconds)
        self._all(lambda m: m.advance(seconds))

    def button(self):
        self._tick()
        self.board.press_button()
        results = [m.button() for m in self.models]
        return results[0]

    def set_wan(self, up):
        self.board.set_wan(up)
        self.wan = bool(up)

    def _boot_faults(self):
        st = self.han.status()
        faults = st["faults"] or {}
        if self.expect_faults is not None and faults != self.expect_faults:
            raise AssertionError("the store reports flash faults %r at start-up, expected %r "
                                 "(a power cut alone is never reported)" % (faults, self.expect_faults))
        return faults

    def reboot(self):
        """The reset button: a fresh start; the board keeps its clock."""
        self.settle()
        self.board.reboot()
        self._tick()
        faults = self._boot_faults()
        self._all(lambda m: m.boot(faults))
        self.cuts += 1
        self.settle()

    def power_cycle(self, edit=None):
        """Power off (idle: after settle), optionally edit the flash image (the virtual
        board: edit(bytearray)), power on."""
        self.settle()
        if edit is not None:
            self.board.edit_flash(edit)
        else:
            self.board.power_off()
            self.board.power_on()
        self._tick()
        faults = self._boot_faults()

        def cycle(m):
            m.power_lost()
            m.boot(faults)
        self._all(cycle)
        self.cuts += 1

    def receipts_lost(self, *indices):
        """The test destroyed these receipts on the meter's flash (beyond repair)."""
        for m in self.models:
            m.lost_receipts.update(indices)

    def power_cut(self, kind, n=0, action=None, delay=0.0, linger=0.0):
        """A power cut — kind "kill" (at `delay` s into the action) or "flash" (after `n` more
        flash operations; `linger`: keep it armed that long after the answer) — while
        `action` runs: None, ("submit", raw), ("code", text), ("pulses", n) or ("button",).
        The board must
        come back in a state the models allow (MeterModel.cut_options); a submit that was
        answered has its own commit landed.  Return (landed, CutResult)."""
        from hil.han_client import HanError, HanTimeout
        self.settle()
        self._tick()
        if action is None:
            during, act = None, None
        elif action[0] == "submit":
            raw, act = action[1], None                 # the models follow its answer (below)

            def during(han):
                return han.submit(raw)
        elif action[0] == "code":
            text, act = action[1], None

            def during(han):
                return han.submit_code(text)
        elif action[0] == "command":
            raw, act = action[1], None

            def during(han):
                return han.submit_command(raw)
        elif action[0] == "pulses":
            count = action[1]

            def act(m):
                m.pulses(count)
            if kind == "kill":
                self.board.add_pulses(count)           # counted by the meter, or lost with it

                def during(han):
                    return han.status()
            else:
                def during(han):                       # the cut is armed: pulses, then a checkpoint
                    self.board.add_pulses(count)
                    return han.status()
        elif action[0] == "button":
            def act(m):
                m.button()
            if kind == "kill":
                self.board.press_button()

                def during(han):
                    return han.status()
            else:
                def during(han):
                    self.board.press_button()
                    return han.status()
        else:
            raise ValueError(action)
        if kind == "kill":
            res = self.board.power_cut_kill(during=during, delay=delay)
        else:
            res = self.board.power_cut_after(n, during=during, linger=linger)
        if res.error is not None and not isinstance(res.error, (HanError, HanTimeout)):
            raise res.error
        # Only a submit's answer proves its commit (a status answer may come before the step).
        request = action is not None and action[0] in ("submit", "code", "command")
        answered = request and (res.result is not None or isinstance(res.error, HanError))
        got = None
        if answered:
            if res.result is not None:
                r = self.issuer.verify_receipt(res.result[0])
                got = ("duplicate" if res.result[1] else "applied", r.index)
            else:
                got = ("rejected", res.error.reason)
        if not res.cut:
            if request:
                if got is None:
                    raise AssertionError("a submit with no cut got no answer: %r" % (res.error,))
                if action[0] == "code":
                    self.follow_code(action[1], got)
                elif action[0] == "command":
                    self.follow_command(action[1], got)
                else:
                    self.follow_submit(action[1], got)
            elif act is not None:
                self._all(act)
            self.settle()
            return True, res
        self.cuts += 1
        self._tick()
        faults = self._boot_faults()
        candidates = []
        for model in self.models:
            if request:
                # each answer the model allows, then the cut
                options = {"code": model.code_options, "command": model.command_options,
                           "submit": model.submit_options}[action[0]](action[1])
                for answer, _ in options:
                    if got is not None and answer != got:
                        continue
                    candidates += _submit_cut_options(model, action[1], answer, answered, faults,
                                                      what=action[0])
            else:
                candidates += model.cut_options(act, answered=False, faults=faults)
        self._keep(candidates, "no state the rules allow after this power cut")
        self.settle(after_cut=True)
        self.check(full=True)
        if request and action[0] == "command":
            landed = self.model._command_applied(action[1]) is not None
        elif request:
            digits = code_digits(action[1]) if action[0] == "code" else None
            ref = code_ref(digits) if digits else voucher_ref(action[1]) if action[0] == "submit" else None
            landed = any(a[1] == ref for a in self.model.s["applied"].values())
        else:
            landed = self.model.tag != "lost"
        return landed, res

    # -- a HAN flood -----------------------------------------------------------------------------
    def flood(self, frames):
        """A context manager: while it is open, a second HAN connection writes `frames` (encoded
        HAN frames, repeated) as fast as the link takes them.  The meter's answers to it go
        unread.  Refusals it causes are counted by the meter in RAM, so while it runs the model
        does not follow receipts; `end_flood` adopts the rejections receipts it caused."""
        return _Flood(self, frames)

    def adopt_flood_receipts(self):
        """After a flood: the meter wrote kind-3 receipts the model could not time; take them
        as they are (Books has checked them) and carry on with unknown rejection counts."""
        st = self.han.status()
        new = self.books.sync(self.han, st["receipt_count"])
        for r in new:
            if r.kind != receipt_format.REJECTIONS:
                raise AssertionError("a flood of refused vouchers wrote receipt %d of kind %d"
                                     % (r.index, r.kind))
        for m in self.models:
            for r in new:
                m.s["log"][r.index] = (r.kind, r.balance_before, r.balance_after, r.time, r.supply)
                m.s["receipts"] = r.index + 1
                m.s["rej_at"] = r.time
            m.s["rejections"] = {errors.BAD_SIGNATURE: 1}
            m.c = copy.deepcopy(m.s)
        return new

    # -- a factory reset --------------------------------------------------------------------------
    def factory_reset(self, initial_credit=None):
        """Read out the receipts, factory-reset and provision the meter again through the
        engineer's path (the supplier's floor and next receipt index, the rig's time); the
        model predicts what it reports.  A new epoch for the books.  Return the MeterKey."""
        self.settle()
        self.check(full=True)
        board = self.board
        credit = board.settings["initial_credit"] if initial_credit is None else initial_credit
        board.reprovision(initial_credit=credit)
        key, now = board.public_key, board.provisioned_now
        floor, first = board.supplier_floor, board.supplier_first
        from protocol import cose
        trust = {cose.kid_for(k): k for k in self.issuer.trust()}
        command_key = self._command_key()
        outcomes = []
        for m in self.models:
            m.command_key = command_key
            outcomes.append(m.factory_reset_and_provision(credit * 1000, now, floor, first, trust))
        want = outcomes[0]
        got = (key.floor, key.first_index)
        fits = [m for m, o in zip(self.models, outcomes) if o[:2] == got]
        self._keep(fits, "provisioning reported floor %d / first index %d, the model %d / %d"
                   % (key.floor, key.first_index, want[0], want[1]))
        if not self._real_clock and board.board_clock() != self.model.board_clock:
            raise AssertionError("provisioning set the board clock to %d; the model says %d"
                                 % (board.board_clock(), self.model.board_clock))
        self.books.new_epoch(key.first_index)
        self.settle()
        return key

    # -- checks -------------------------------------------------------------------------------------
    def status(self):
        return self.han.status()

    def _poll(self, match):
        from hil.han_client import HanTimeout
        deadline = time.monotonic() + self.settle_timeout
        while True:
            try:
                st = self.han.status()
            except HanTimeout:
                if not self._flooding or time.monotonic() > deadline:
                    raise
                continue                          # dropped in the flood: ask again
            hit = match(st)
            if hit:
                return st, hit
            if time.monotonic() > deadline:
                return st, None
            time.sleep(0.01)

    def _expected(self, m):
        want = m.expected_status(exact_time=not self._real_clock)
        if self._flooding:
            want.pop("receipt_count", None)
        return want

    def settle(self, after_cut=False):
        """Wait until the board shows the status of one of the models (the main loop may be a
        pass behind), keep those that fit, then check everything."""
        st, hit = self._poll(lambda st: [m for m in self.models if not status_diff(st, self._expected(m))])
        if not hit:
            if after_cut:
                raise AssertionError("after the power cut the meter shows %s; it must be one of: %s" % (
                    {k: st.get(k) for k in self._expected(self.model)},
                    "; ".join("%s %s" % (m.tag, self._expected(m)) for m in self.models)))
            raise AssertionError("the meter and the model disagree (meter, model): %s"
                                 % status_diff(st, self._expected(self.model)))
        self.models = hit
        if not self._flooding:
            self.check(st)
        return st

    def check(self, st=None, full=False):
        if st is None:
            st = self.han.status()
        fits = [m for m in self.models if not status_diff(st, self._expected(m))]
        if not fits:
            raise AssertionError("the meter and the model disagree (meter, model): %s"
                                 % status_diff(st, self._expected(self.model)))
        if st["device"] != self.board.device:
            raise AssertionError("the meter says it is %r" % (st["device"],))
        self.books.sync(self.han, st["receipt_count"], full=full)
        why = None
        keep = []
        for m in fits:
            why = self._receipts_differ(m)
            if why is None:
                keep.append(m)
        if not keep:
            raise AssertionError(self._receipts_differ(fits[0]))
        self.models = keep
        model = self.model
        # final balance = opening + Σ applied this epoch − metered
        identity = model.opening_mp + 1000 * self.books.applied_total() - model.metered_mp
        if st["balance_mp"] != identity:
            raise AssertionError("balance %d != opening %d + applied %d - metered %d"
                                 % (st["balance_mp"], model.opening_mp, 1000 * self.books.applied_total(),
                                    model.metered_mp))
        relay = self.board.relay()
        if relay is not None:
            deadline = time.monotonic() + self.settle_timeout
            while relay != st["supply_on"] and time.monotonic() < deadline:
                time.sleep(0.01)
                relay = self.board.relay()
            if relay != st["supply_on"]:
                raise AssertionError("the relay is %s while the meter reports supply %s"
                                     % ("closed" if relay else "open", "on" if st["supply_on"] else "off"))
        return st

    def _receipts_differ(self, m):
        applied = {seq: idx for seq, (idx, _) in self.books.applied.items() if idx >= self.books.first}
        want = {seq: idx for seq, (_, _, idx) in m.s["applied"].items()}
        if applied != want:
            return "top-ups on the meter's receipts %s, the model's %s" % (applied, want)
        for r in self.books.epoch_receipts():
            w = m.s["log"].get(r.index)
            if w is None:
                return "receipt %d (kind %d) is not one the model wrote" % (r.index, r.kind)
            kind, before, after, at, supply = w
            got = (r.kind, r.balance_before, r.balance_after, r.supply) + (() if self._real_clock else (r.time,))
            exp = (kind, before, after, supply) + (() if self._real_clock else (at,))
            if got != exp:
                return ("receipt %d is (kind, balance before, after, supply, time) %s; the model "
                        "says %s" % (r.index, got, exp))
        return None


def _submit_cut_options(model, raw, answer, answered, faults, what="submit"):
    """cut_options for a request (a voucher "submit", a keypad "code", a signed "command")
    whose answer (had it been given) is `answer`: the original receipt is found (or not) as
    that answer says."""
    original = answer[0] == "duplicate"
    step = {"submit": MeterModel._submit, "code": MeterModel._submit_code,
            "command": MeterModel._submit_command}[what]

    def act(m):
        step(m, raw, original)
    return model.cut_options(act, answered=answered, faults=faults)


class _Flood:
    def __init__(self, harness, frames):
        self.h = harness
        self.frames = b"".join(frames)
        self.sent = 0
        self._stop = None
        self._thread = None

    def __enter__(self):
        import threading
        import serial
        self.port = serial.serial_for_url(self.h.board.han_port, timeout=0, write_timeout=0.2)
        self._stop = threading.Event()

        def run():
            data = self.frames
            while not self._stop.is_set():
                try:
                    self.sent += self.port.write(data) or 0
                    self.port.reset_input_buffer()   # the answers to the flood go unread
                except serial.SerialTimeoutException:
                    pass
                except Exception:  # noqa: BLE001 - the port closed under us
                    return
        self._thread = threading.Thread(target=run, daemon=True, name="han-flood")
        self.h._flooding = True
        self._thread.start()
        return self

    def wait_sent(self, n, timeout=30.0):
        """Wait until the flood has written n bytes (the meter has been taking it)."""
        deadline = time.monotonic() + timeout
        while self.sent < n:
            if time.monotonic() > deadline:
                raise AssertionError("the flood wrote only %d bytes in %.0f s" % (self.sent, timeout))
            time.sleep(0.01)

    def __exit__(self, *exc):
        from hil.han_client import HanTimeout
        self._stop.set()
        self._thread.join(5)
        try:
            self.port.close()
            # What the flood left in the link is worked off a bounded share per pass: wait
            # until a request of ours gets through again.
            deadline = time.monotonic() + 30
            while exc[0] is None:
                try:
                    self.h.han.status()
                    break
                except HanTimeout:
                    if time.monotonic() > deadline:
                        raise
        finally:
            self.h._flooding = False


def _name(outcome):
    kind, value = outcome
    if kind == "rejected":
        return errors.name(value)
    if isinstance(value, int):
        return "receipt %d" % value
    return "receipt %d" % receipt_format.parse(value).index
