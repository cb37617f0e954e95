"""What the rig checks about a meter under test, from the host side.

- `Books`: the meter's receipts as read over the HAN — each verified with the meter key
  registered with the supplier, the hash chain intact from receipt 0, no receipt that was
  once read ever changing, no voucher applied under two receipts, no top-up for anything
  the supplier did not issue (or for another amount), balances that only metering lowers.
- `MeterModel`: the meter's ledger as firmware/README.md and SPEC.md describe it, computed
  independently on the host: credit = opening + Σ applied top-ups − metered, where metered =
  ⌊Wh × unit rate / 1000⌋ + ⌊seconds × standing charge / 86400⌋ (exact integers, milli-pence);
  the replay window; emergency credit; the checkpoint rule (at once when 20 p of charges are
  unsaved, else when 15 minutes have passed since the last commit with anything unsaved;
  always with a top-up, an emergency-credit or a rejections receipt); and what a power cut
  loses: everything since the last commit, which is only ever unsaved metering and rejection
  counts — never a top-up the meter acknowledged.

The model and the books are compared with the board after every step by the credit-integrity
suite and the model-based run (tests/hil/).
"""
import copy

from protocol import errors, receipt as receipt_format, voucher as voucher_format, window as replay
from protocol.errors import Rejected

CHECKPOINT_MP = 20000
CHECKPOINT_SECONDS = 900
REJECTIONS_RECEIPT_SECONDS = 3600


def energy_mp(wh, unit_rate):
    """Cumulative energy charge for `wh` Wh (milli-pence, remainder carried: floor)."""
    return wh * unit_rate // 1000


def standing_mp(seconds, standing):
    """Cumulative standing charge for `seconds` (milli-pence per day, floor)."""
    return seconds * standing // 86400


class BooksError(AssertionError):
    pass


class Books:
    """The receipts read back from one meter, checked as they come (see the module docstring).

    issued: {sequence: voucher bytes} the supplier issued for this meter (kept up to date by
    the caller); verify(raw) -> protocol Receipt, raising on a bad signature.
    """

    def __init__(self, device, verify, issued, ec_amount):
        self.device = device
        self.verify = verify
        self.issued = issued
        self.ec_amount = ec_amount
        self.receipts = {}        # index -> Receipt
        self.applied = {}         # sequence -> (index, amount)

    def _fail(self, msg):
        raise BooksError(msg)

    def sync(self, han, count, full=False):
        """Read receipts up to `count` (the meter's receipt count) over `han`: from the first
        unseen one, or all of them (full=True, which also proves none changed).  Return the
        new receipts."""
        if count < len(self.receipts) and self.receipts and max(self.receipts) >= count:
            self._fail("the meter's receipt count fell to %d; receipt %d was read before"
                       % (count, max(self.receipts)))
        start = 0 if full else len(self.receipts)
        if start >= count:
            return []
        raws = han.receipts(start)
        new = []
        for raw in raws:
            r = self.verify(raw)
            if r.device != self.device:
                self._fail("receipt %d is for device %s" % (r.index, r.device.hex()))
            if r.index >= count:
                self._fail("receipt %d is beyond the receipt count %d" % (r.index, count))
            old = self.receipts.get(r.index)
            if old is not None:
                if old.raw != r.raw:
                    self._fail("committed receipt %d changed" % r.index)
                continue
            if r.index != len(self.receipts):
                self._fail("receipt %d read while %d receipts were known (a gap)"
                           % (r.index, len(self.receipts)))
            self._check_new(r)
            self.receipts[r.index] = r
            new.append(r)
        if len(self.receipts) != count:
            self._fail("the meter reports %d receipts, %d could be read" % (count, len(self.receipts)))
        return new

    def _check_new(self, r):
        prev = self.receipts.get(r.index - 1)
        want_prev = receipt_format.GENESIS if r.index == 0 else prev.hash
        if r.prev != want_prev:
            self._fail("receipt chain broken at %d" % r.index)
        if prev is not None and r.balance_before > prev.balance_after:
            self._fail("balance rose between receipts %d and %d outside a top-up (%d > %d)"
                       % (prev.index, r.index, r.balance_before, prev.balance_after))
        if r.kind == receipt_format.TOPUP:
            if r.sequence in self.applied:
                self._fail("voucher %d applied twice (receipts %d and %d)"
                           % (r.sequence, self.applied[r.sequence][0], r.index))
            raw = self.issued.get(r.sequence)
            if raw is None:
                self._fail("credit from nowhere: receipt %d applies sequence %d, never issued"
                           % (r.index, r.sequence))
            amount = voucher_format.parse(raw).amount
            if r.amount != amount or r.voucher != voucher_format.reference(raw):
                self._fail("receipt %d: sequence %d applied for %d p / ref %s, issued as %d p"
                           % (r.index, r.sequence, r.amount, r.voucher.hex(), amount))
            if r.balance_after != r.balance_before + 1000 * r.amount:
                self._fail("receipt %d: %d + %d p ≠ %d" % (r.index, r.balance_before, r.amount,
                                                           r.balance_after))
            self.applied[r.sequence] = (r.index, r.amount)
        elif r.kind == receipt_format.EMERGENCY:
            if r.amount != self.ec_amount or r.balance_after != r.balance_before:
                self._fail("receipt %d: emergency credit of %d p, balance %d → %d"
                           % (r.index, r.amount, r.balance_before, r.balance_after))
        elif r.kind == receipt_format.REJECTIONS:
            if r.balance_after != r.balance_before:
                self._fail("receipt %d: rejections receipt changed the balance" % r.index)

    def applied_total(self):
        return sum(a for _, a in self.applied.values())


class MeterModel:
    """The ledger of one meter, computed on the host (see the module docstring).

    Time is the meter clock (frozen on the virtual board; the rig moves it).  The RAM state
    and the last committed state are both kept: `cut()` is a power cut or reboot (RAM lost),
    `step()` one pass of the meter's main loop with nothing new (metering and its checkpoint
    rule, then the rejections receipt rule).  Each action below is what the firmware does
    with that input inside one pass.
    """

    def __init__(self, device, trust, opening_mp, settings, now):
        self.device = device
        self.trust = dict(trust)               # {kid: issuer public key}
        self.opening_mp = opening_mp
        self.unit_rate = settings["unit_rate"]
        self.standing = settings["standing"]
        self.ec_amount = settings["ec_amount"]
        self.ec_threshold = settings["ec_threshold"]
        self.max_voucher = settings["max_voucher"]
        self.max_credit = settings["max_credit"]
        self.t0 = now                          # provisioning: standing charge counted from here
        self.now = now
        self.s = {                             # the ledger's state (RAM)
            "applied": {},                     # sequence -> (amount pence, voucher ref, receipt index)
            "highest": 0, "bitmap": 0,
            "wh": 0, "charged_to": now,
            "ec": 0,                           # pence of emergency credit in use
            "receipts": 0,
            "rejections": {}, "rej_at": now,
        }
        self.c = copy.deepcopy(self.s)         # the committed state (flash)
        self.committed_at = now
        self.unsaved = 0
        self.dirty = False
        self.commits = 0

    # -- views ------------------------------------------------------------------------------
    def balance_of(self, s):
        return (self.opening_mp + 1000 * sum(a for a, _, _ in s["applied"].values())
                - energy_mp(s["wh"], self.unit_rate)
                - standing_mp(s["charged_to"] - self.t0, self.standing))

    @property
    def balance_mp(self):
        return self.balance_of(self.s)

    @property
    def metered_mp(self):
        s = self.s
        return energy_mp(s["wh"], self.unit_rate) + standing_mp(s["charged_to"] - self.t0, self.standing)

    def supply_on(self):
        return self.balance_mp + 1000 * self.s["ec"] > 0

    def expected_status(self):
        """The HAN status fields the board must show."""
        return {"balance_mp": self.balance_mp, "supply_on": self.supply_on(),
                "highest_sequence": self.s["highest"], "receipt_count": self.s["receipts"],
                "emergency_mp": 1000 * self.s["ec"]}

    def window(self):
        return replay.ReplayWindow(self.s["highest"], self.s["bitmap"])

    # -- the ledger's moves -------------------------------------------------------------------
    def _accrue(self, wh):
        s = self.s
        before = self.metered_mp
        s["wh"] += wh
        if self.now > s["charged_to"]:
            s["charged_to"] = self.now
        cost = self.metered_mp - before
        if wh or cost:
            self.unsaved += cost
            self.dirty = True

    def _commit(self):
        self.c = copy.deepcopy(self.s)
        self.committed_at = self.now
        self.unsaved = 0
        self.dirty = False
        self.commits += 1

    def _meter(self, wh):
        self._accrue(wh)
        if self.unsaved >= CHECKPOINT_MP or (self.dirty and self.now - self.committed_at >= CHECKPOINT_SECONDS):
            self._commit()

    def _record_rejections(self):
        s = self.s
        if s["rejections"] and self.now - s["rej_at"] >= REJECTIONS_RECEIPT_SECONDS:
            self._accrue(0)
            s["rejections"] = {}
            s["rej_at"] = self.now
            s["receipts"] += 1
            self._commit()

    def step(self, wh=0):
        """One pass of the main loop: metering (+ checkpoint rule), then the rejections rule."""
        self._meter(wh)
        self._record_rejections()

    def pulses(self, n):
        self.step(n)

    def advance(self, seconds):
        self.now += seconds
        self.step()

    def button(self):
        """A press of the emergency-credit button. Return the receipt index or None (refused)."""
        self._meter(0)
        self._accrue(0)
        s = self.s
        granted = None
        if not s["ec"] and self.balance_mp < self.ec_threshold * 1000:
            s["ec"] = self.ec_amount
            granted = s["receipts"]
            s["receipts"] += 1
            self._commit()
        self._record_rejections()
        self.step()
        return granted

    def submit(self, data):
        """What the meter must answer to these voucher bytes: ("applied", receipt index),
        ("duplicate", index of the original receipt) or ("rejected", reason code)."""
        from host.verify import nacl_verify
        self._meter(0)
        s = self.s
        try:
            v = voucher_format.verify(data, self.trust, self.device, self.now, self.max_voucher,
                                      nacl_verify)
            w = self.window()
            if w.is_used(v.sequence):
                amount, ref, index = s["applied"][v.sequence]
                if ref == v.ref:
                    out = ("duplicate", index)
                    self._record_rejections()
                    self.step()
                    return out
                raise Rejected(errors.SEQUENCE_REUSED, "")
            self._accrue(0)
            replay.check_credit(self.balance_mp, v.amount, self.max_credit)
        except Rejected as e:
            counts = s["rejections"]
            counts[e.reason] = counts.get(e.reason, 0) + 1
            self.dirty = True
            self._record_rejections()
            self.step()
            return ("rejected", e.reason)
        w.mark(v.sequence)
        index = s["receipts"]
        s["applied"][v.sequence] = (v.amount, v.ref, index)
        s["highest"], s["bitmap"] = w.highest, w.bitmap
        s["receipts"] += 1
        if self.balance_mp >= 0:
            s["ec"] = 0
        self._commit()
        self._record_rejections()
        self.step()
        return ("applied", index)

    def cut(self):
        """Power cut or reboot: RAM is lost, the committed state is mounted, and the first
        pass of the main loop runs (standing charge caught up to the meter clock)."""
        self.s = copy.deepcopy(self.c)
        self.committed_at = self.s["charged_to"]
        self.unsaved = 0
        self.dirty = False
        self.step()

    def fork(self):
        return copy.deepcopy(self)


def status_diff(status, expected):
    return {k: (status.get(k), v) for k, v in expected.items() if status.get(k) != v}


class Harness:
    """A provisioned board under test with its model and books, driven together: every
    action goes to the board and the model, and `check()` proves they agree — the HAN
    status (balance, supply, window, receipt count, emergency credit), the relay where the
    bench can see it, and the receipts (Books).

    board: the pytest plugin's BoardUnderTest (or any Transport with device/settings/
    opening_mp/issuer attributes); han: a HanClient on its HAN port.
    """

    settle_timeout = 5.0

    def __init__(self, board, han):
        import time
        from protocol import cose
        self.board = board
        self.han = han
        self.issuer = board.issuer
        self.issued = {}                      # sequence -> voucher bytes (this meter's)
        trust = {cose.kid_for(k): k for k in self.issuer.trust()}
        self._real_clock = board.clock() is None
        now = int(time.time()) if self._real_clock else board.clock()
        self.model = MeterModel(board.device, trust, board.opening_mp, board.settings, now)
        self.books = Books(board.device, self.issuer.verify_receipt, self.issued,
                           board.settings["ec_amount"])
        self.cuts = 0

    # -- time -----------------------------------------------------------------------------------
    def _tick(self):
        if self._real_clock:
            import time
            self.model.now = max(self.model.now, int(time.time()))

    # -- issuing --------------------------------------------------------------------------------
    def issue(self, amount, count=1, cli=False):
        """Vouchers for this meter (through the issuer, or the real `topup issue`)."""
        from protocol import voucher as pv
        raws = (self.issuer.issue_cli("%d.%02d" % divmod(amount, 100), count) if cli
                else self.issuer.issue(amount, count))
        for raw in raws:
            self.issued[pv.parse(raw).sequence] = raw
        return raws

    # -- actions ----------------------------------------------------------------------------------
    def submit(self, raw):
        """Submit over the HAN; the answer must be the model's. Return (outcome, receipt or reason)."""
        from hil.han_client import HanError
        self._tick()
        want = self.model.submit(raw)
        try:
            receipt, dup = self.han.submit(raw)
            got = ("duplicate" if dup else "applied", receipt)
        except HanError as e:
            got = ("rejected", e.reason)
        if got[0] != want[0]:
            raise AssertionError("submit: the meter said %s %s, the model %s %s"
                                 % (got[0], _name(got), want[0], _name(want)))
        if want[0] == "rejected":
            if got[1] != want[1]:
                raise AssertionError("submit rejected with %s, the model says %s"
                                     % (errors.name(got[1]), errors.name(want[1])))
        else:
            r = self.issuer.verify_receipt(got[1])
            if r.index != want[1]:
                raise AssertionError("receipt index %d, the model says %d" % (r.index, want[1]))
            if want[0] == "duplicate":
                self.books.sync(self.han, self.model.s["receipts"])
                if self.books.receipts[want[1]].raw != bytes(got[1]):
                    raise AssertionError("a resubmission got a receipt other than the original")
        return got

    def pulses(self, n):
        self._tick()
        self.board.add_pulses(n)
        self.model.pulses(n)

    def advance(self, seconds):
        self.board.advance_clock(seconds)
        self.model.advance(seconds)

    def button(self):
        self._tick()
        self.board.press_button()
        return self.model.button()

    def set_wan(self, up):
        self.board.set_wan(up)
        self.wan = bool(up)

    def reboot(self):
        self.settle()
        self.board.reboot()
        self._tick()
        self.model.cut()
        self.cuts += 1

    def power_cut(self, kind, n=0, action=None, delay=0.0):
        """A power cut — kind "kill" (at `delay` s into the action) or "flash" (after `n` more
        flash operations) — while `action` runs: None, ("submit", raw), ("pulses", n) or ("button",).
        The board must come back as the model with the action either landed or not (a
        submit that was answered must have landed); the model follows the board's choice.
        Return (landed, CutResult)."""
        self.settle()
        self._tick()
        landed = self.model.fork()
        answered = False
        if action is None:
            during = None
        elif action[0] == "submit":
            landed.submit(action[1])
            raw = action[1]

            def during(han):
                return han.submit(raw)
        elif action[0] == "pulses":
            landed.pulses(action[1])
            count = action[1]
            if kind == "kill":
                self.board.add_pulses(count)           # counted by the meter, or lost with it

                def during(han):
                    return han.status()
            else:
                def during(han):                       # the cut is armed: pulses, then a checkpoint
                    self.board.add_pulses(count)
                    return han.status()
        elif action[0] == "button":
            landed.button()
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
            res = self.board.power_cut_after(n, during=during)
        from hil.han_client import HanError
        if res.error is not None and not isinstance(res.error, (HanError,)):
            from hil.han_client import HanTimeout
            if not isinstance(res.error, HanTimeout):
                raise res.error
        # Only a submit's answer proves its commit (a status answer may come before the step).
        answered = action is not None and action[0] == "submit" and (
            res.result is not None or isinstance(res.error, HanError))
        if not res.cut:
            self.model = landed                      # no cut: the action simply ran
            self.settle()
            return True, res
        self.cuts += 1
        lost = self.model.fork()
        lost.cut()
        landed.cut()
        self._tick()
        candidates = [("landed", landed)]
        if not answered:
            candidates.append(("lost", lost))
            if action is not None and action[0] == "submit":
                # The request reached the HAN link but not the meter before the cut: the board
                # takes it after booting (a UART adapter's buffer, or the PPMID's retry).
                late = lost.fork()
                late.submit(action[1])
                candidates.append(("landed", late))
        st = self._settle_any(candidates)
        which, model = st
        self.model = model
        self.check(full=True)
        return which == "landed", res

    # -- checks -------------------------------------------------------------------------------------
    def status(self):
        return self.han.status()

    def _poll(self, match):
        import time
        deadline = time.monotonic() + self.settle_timeout
        while True:
            st = self.han.status()
            hit = match(st)
            if hit is not None:
                return st, hit
            if time.monotonic() > deadline:
                return st, None
            time.sleep(0.01)

    def _settle_any(self, candidates):
        st, hit = self._poll(lambda st: next(((n, m) for n, m in candidates
                                              if not status_diff(st, m.expected_status())), None))
        if hit is None:
            raise AssertionError("after the power cut the meter shows %s; it must be one of: %s" % (
                {k: st[k] for k in ("balance_mp", "receipt_count", "highest_sequence", "emergency_mp",
                                    "supply_on")},
                "; ".join("%s %s" % (n, m.expected_status()) for n, m in candidates)))
        return hit

    def settle(self):
        """Wait until the board shows the model's status (the main loop may be a pass behind),
        then check everything."""
        want = self.model.expected_status()
        st, hit = self._poll(lambda st: True if not status_diff(st, want) else None)
        if hit is None:
            raise AssertionError("the meter and the model disagree (meter, model): %s"
                                 % status_diff(st, want))
        self.check(st)
        return st

    def check(self, st=None, full=False):
        import time
        if st is None:
            st = self.han.status()
        model = self.model
        diff = status_diff(st, model.expected_status())
        if diff:
            raise AssertionError("the meter and the model disagree (meter, model): %s" % diff)
        if st["device"] != self.board.device:
            raise AssertionError("the meter says it is %r" % (st["device"],))
        self.books.sync(self.han, st["receipt_count"], full=full)
        applied = {seq: idx for seq, (idx, _) in self.books.applied.items()}
        want = {seq: idx for seq, (_, _, idx) in model.s["applied"].items()}
        if applied != want:
            raise AssertionError("top-ups on the meter's receipts %s, the model's %s" % (applied, want))
        # final balance = opening + Σ applied − metered
        identity = model.opening_mp + 1000 * self.books.applied_total() - model.metered_mp
        if st["balance_mp"] != identity:
            raise AssertionError("balance %d ≠ opening %d + applied %d − metered %d"
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


def _name(outcome):
    kind, value = outcome
    if kind == "rejected":
        return errors.name(value)
    if isinstance(value, int):
        return "receipt %d" % value
    return "receipt %d" % receipt_format.parse(value).index
