"""Model-based run against the board under test: a Hypothesis state machine drives random
sequences of issue, submit (in order, out of order, duplicated, tampered, stale), keypad
codes over the HAN as a PPMID sends them (right, wrong -- in bursts that reach the lockout
--, typo, incomplete, duplicate), the PPMID's confirm and emergency-credit actions, signed
commands made by the supplier's real `topup key new --activate` and `topup key revoke` and
delivered as `topup han sync` does (the issuer key rotated and the old one revoked with no
factory reset; replayed and tampered commands; cuts while one is applied), energy
pulses, clock steps, WAN toggles, button presses, reboots and power cuts of both kinds (kill
at a random instant with a request in flight; a cut at the n-th flash erase/program) against
the board and a host-side model of the ledger (hil/rig.py: SPEC.md's and firmware/README.md's
rules written out, independent of the firmware). Each example starts with a factory reset
(the vouchers of the example before must be STALE) and, on the virtual board, every other
one runs with a board clock that restarts from 2000-01-01 at each power cut.

After every step (hil.rig.Harness.settle): the board's HAN status — balance, supply state
(interrupted, armed, on), highest sequence, receipt count, emergency credit, code lockout
seconds and tries left — equals the model's; the relay agrees; every
receipt verifies with the registered meter key, the chain is intact, none once read has
changed, no voucher is applied twice and none that was not issued; and
balance = opening + Σ applied − metered, exactly, in milli-pence.

Power cuts are modelled honestly: a cut loses what the firmware says it may (RAM: unsaved
metering, rejection counts and the signature back-off since the last commit). With a request
in flight the board may come back with any prefix of that pass's commits landed (a receipt
whose state record was torn rolled forward) or with the request taken after the boot — the
model allows exactly those states and no other — and a top-up the meter answered must have
landed (what the pass wrote after the answer need not have).

Scale: `make test` runs examples(EXAMPLES) examples of up to STEPS steps; TOPUP_SOAK
multiplies the example count (tests/soak.py). TOPUP_MODEL_STATS=FILE writes the run's
figures (steps, power cuts, seconds) for tests/bench/bench_rig.py.
"""
import json
import os
import time

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from hil.rig import Harness
from protocol import errors
from tests.soak import examples

pytestmark = pytest.mark.hil

EXAMPLES = 8
STEPS = 30

amounts = st.integers(1, 2500)
forms = st.sampled_from(["plain", "grouped", "dashed"])


def _typed(code, form):
    """A code as a customer may type it: spaces and dashes are allowed (SPEC §8)."""
    if form == "grouped":
        return " ".join(code[i:i + 4] for i in range(0, 20, 4))
    if form == "dashed":
        return "-".join(code[i:i + 5] for i in range(0, 20, 5))
    return code


def _wrong_code(code, k):
    """A code whose check digit fits but that no issuer wrote (its MAC does not fit)."""
    from hil.rig import damm_ok
    body = code[:18] + str((int(code[18]) + k) % 10)
    return next(body + c for c in "0123456789" if damm_ok(body + c))
pulse_counts = st.one_of(st.integers(1, 60), st.integers(60, 1500), st.integers(1500, 40000))


class MeterMachine(RuleBasedStateMachine):
    board = None          # set by the test: the plugin's BoardUnderTest
    han = None
    stats = None
    linger = 0.0          # a flash cut stays armed this long after a submit's answer

    def __init__(self):
        super().__init__()
        # Every other example on a board whose clock does not survive a power cut (it
        # restarts from 2000-01-01: SPEC.md §7); a bench board keeps the clock it has.
        from hil.transport import VirtualTransport
        if isinstance(self.board.transport, VirtualTransport):
            self.board.transport.set_clock_survives(self.stats["examples"] % 2 == 0)
        self.board.commands = True                       # the meter takes signed commands
        self.board.reprovision()
        self.h = Harness(self.board, self.han)
        self.held = []                                   # issued, not yet submitted
        self.sent = []                                   # commands sent to the meter
        self.wan = False
        self.stats["examples"] += 1
        # The factory reset that starts each example re-opens nothing: vouchers of the last
        # example, applied or not, are at or below the new floor (SPEC.md §2.2).
        old = self.stats.pop("previous", None)
        if old:
            for raw in old:
                self.h.submit(raw)
            self.h.settle()

    def _remember(self):
        applied = sorted(self.h.books.applied)
        vouchers = self._vouchers()
        applied = [seq for seq in applied if seq in vouchers]
        unused = sorted(set(vouchers) - set(applied))
        picks = applied[-1:] + unused[-1:]
        self.stats["previous"] = [vouchers[seq] for seq in picks]

    def _count(self):
        self.stats["steps"] += 1

    def has(self, cap):
        return self.board.has(cap)

    # -- issuing and submitting ---------------------------------------------------------------------
    @rule(amount=amounts, cli=st.booleans())
    def issue_and_submit(self, amount, cli):
        (raw,) = self.h.issue(amount, cli=cli and amount % 7 == 0)   # the real CLI now and then
        self.h.submit(raw)
        self._count()

    # -- keypad codes, as the PPMID sends them over the HAN (SPEC §8) ------------------------------
    def _vouchers(self):
        return {seq: raw for seq, raw in self.h.issued.items() if not isinstance(raw, str)}

    def _codes(self):
        return [c for c in self.h.issued.values() if isinstance(c, str)]

    def _code(self, text):
        got = self.h.submit_code(text)
        key = "code_" + (got[0] if got[0] != "rejected" else errors.name(got[1]).lower())
        self.stats[key] = self.stats.get(key, 0) + 1
        return got

    @rule(amount=amounts, form=forms, cli=st.booleans())
    def code_typed(self, amount, form, cli):
        (code,) = self.h.issue_codes(amount, cli=cli and amount % 5 == 0)
        self._code(_typed(code, form))
        self._count()

    @rule(amount=amounts, n=st.sampled_from([1, 1, 2, 3, 4, 5, 6]), k=st.integers(1, 9))
    def wrong_codes(self, amount, n, k):
        """n wrong codes in a row (5 lock code entry out), then a right one."""
        (code,) = self.h.issue_codes(amount)
        for i in range(n):
            self._code(_wrong_code(code, (k + i) % 9 + 1))
        self._code(code)
        self._count()

    @rule(amount=amounts, at=st.integers(0, 19), d=st.integers(1, 9))
    def code_with_a_typo(self, amount, at, d):
        (code,) = self.h.issue_codes(amount)
        self._code(code[:at] + str((int(code[at]) + d) % 10) + code[at + 1:])
        self._code(code[:at + 1])                # and one cut short: incomplete
        self._count()

    @precondition(lambda self: self._codes())
    @rule(i=st.integers(0, 1000), form=forms)
    def code_again(self, i, form):
        codes = self._codes()
        self._code(_typed(codes[i % len(codes)], form))
        self._count()

    @rule(what=st.sampled_from([1, 2]))
    def ppmid_action(self, what):
        """The PPMID's B (confirm an armed supply) or A (emergency credit)."""
        self.h.action(what)
        self._count()

    @rule(amount=amounts, count=st.integers(1, 4))
    def issue_held(self, amount, count):
        self.held.extend(self.h.issue(amount, count))
        self._count()

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 1000))
    def submit_out_of_order(self, i):
        raw = self.held.pop(i % len(self.held))
        self.h.submit(raw)
        self._count()

    @precondition(lambda self: self._vouchers())
    @rule(i=st.integers(0, 1000))
    def resubmit(self, i):
        vouchers = self._vouchers()
        seqs = sorted(vouchers)
        self.h.submit(vouchers[seqs[i % len(seqs)]])
        self._count()

    @precondition(lambda self: self._vouchers())
    @rule(i=st.integers(0, 1000), pos=st.integers(0, 200), bit=st.integers(0, 7))
    def submit_tampered(self, i, pos, bit):
        vouchers = self._vouchers()
        seqs = sorted(vouchers)
        raw = bytearray(vouchers[seqs[i % len(seqs)]])
        raw[pos % len(raw)] ^= 1 << bit
        self.h.submit(bytes(raw))
        self._count()

    @rule(amount=amounts)
    def jump_past_the_window(self, amount):
        """66 vouchers issued, only the last submitted: the others are now below the window
        (a few kept to try later)."""
        raws = self.h.issue(amount, 66)
        self.held.extend(raws[:2])
        self.h.submit(raws[-1])
        self._count()

    # -- signed commands (SPEC §10): the issuer key rotated with no factory reset ---------------------
    def _cli(self, *args):
        r = self.board.issuer.cli(*args)
        assert r.exit_code == 0, (args, r.stdout, r.stderr)
        return r

    def _new_issuer_key(self):
        """`topup key new --activate`: an ADD_ISSUER_KEY for the meter, pending; vouchers are
        signed with the new key from now on. Return the old key's kid."""
        old = self.board.issuer.signer.kid
        self._cli("key", "new", "--activate")
        self.board.issuer.reload_signer()
        return old

    def _delivered(self, answers):
        for raw, got in answers:
            self.sent.append(raw)
            key = "command_" + (got[0] if got[0] != "rejected" else errors.name(got[1]).lower())
            self.stats[key] = self.stats.get(key, 0) + 1

    @rule()
    def rotate_issuer_key(self):
        """The new key added and the old one revoked, each delivered over the HAN: vouchers
        held back under the old key are then refused KEY_REVOKED, the new key's applied."""
        old = self._new_issuer_key()
        self._delivered(self.h.deliver_commands())
        self._cli("key", "revoke", old.hex(), "--yes")
        self._delivered(self.h.deliver_commands())
        self._count()

    @precondition(lambda self: self.sent)
    @rule(i=st.integers(0, 1000), tamper=st.booleans(), pos=st.integers(0, 200),
          bit=st.integers(0, 7))
    def command_again(self, i, tamper, pos, bit):
        """A command sent before, again: its original receipt while it is among the meter's
        last 4, else COMMAND_REPLAYED; or a copy with one bit flipped, refused."""
        raw = bytearray(self.sent[i % len(self.sent)])
        if tamper:
            raw[pos % len(raw)] ^= 1 << bit
        got = self.h.submit_command(bytes(raw))
        key = "command_again_" + (got[0] if got[0] != "rejected" else errors.name(got[1]).lower())
        self.stats[key] = self.stats.get(key, 0) + 1
        self._count()

    def _cut_command(self, kind, n=0, delay=0.0):
        """A new key's ADD_ISSUER_KEY in flight when the power goes: applied once (its
        receipt rolled forward, or landed) or not at all, then delivered as usual, and the
        old key revoked."""
        old = self._new_issuer_key()
        pending = self.h.pending_commands()
        if not pending:
            return
        landed, res = self.h.power_cut(kind, n=n, action=("command", pending[0]), delay=delay,
                                       linger=self.linger)
        self.h.settle_commands()
        self.stats["command_cut_" + ("landed" if landed else "lost")] = \
            self.stats.get("command_cut_" + ("landed" if landed else "lost"), 0) + 1
        self.stats["kill" if kind == "kill" else "flash_cut"] += 1 if kind == "kill" or res.cut else 0
        self._delivered(self.h.deliver_commands())
        self._cli("key", "revoke", old.hex(), "--yes")
        self._delivered(self.h.deliver_commands())
        self._count()

    @precondition(lambda self: self.has("power_cut") or self.has("flash_cut"))
    @rule(flash=st.booleans(), n=st.integers(0, 5), delay=st.floats(0, 0.08))
    def cut_during_command(self, flash, n, delay):
        if flash and self.has("flash_cut"):
            self._cut_command("flash", n=n)
        elif self.has("power_cut"):
            self._cut_command("kill", delay=delay)

    # -- the meter's inputs ---------------------------------------------------------------------------
    @precondition(lambda self: self.has("pulses"))
    @rule(n=pulse_counts)
    def pulses(self, n):
        self.h.pulses(n)
        self._count()

    @precondition(lambda self: self.has("clock"))
    @rule(seconds=st.sampled_from([1, 2, 59, 600, 899, 900, 1800, 3600, 86400]))
    def clock(self, seconds):
        self.h.advance(seconds)
        self._count()

    @precondition(lambda self: self.has("wan"))
    @rule()
    def toggle_wan(self):
        self.wan = not self.wan
        self.h.set_wan(self.wan)
        self._count()

    @precondition(lambda self: self.has("button"))
    @rule()
    def button(self):
        self.h.button()
        self._count()

    # -- restarts and power cuts ----------------------------------------------------------------------
    @precondition(lambda self: self.has("reboot"))
    @rule()
    def reboot(self):
        self.h.reboot()
        self.stats["reboots"] += 1
        self._count()

    def _action(self, what, amount, n):
        if what == "submit":
            (raw,) = self.h.issue(amount)
            return ("submit", raw)
        if what == "held" and self.held:
            return ("submit", self.held.pop(0))
        if what == "code":
            (code,) = self.h.issue_codes(amount)
            return ("code", code)
        if what == "wrong_code":
            (code,) = self.h.issue_codes(amount)
            return ("code", _wrong_code(code, n % 9 + 1))
        if what == "pulses" and self.has("pulses"):
            return ("pulses", n)
        if what == "button" and self.has("button"):
            return ("button",)
        return None

    # Power cuts are split into several rules so that they make up a good share of the steps.
    def _kill(self, what, delay, amount=1, n=1):
        action = self._action(what, amount, n)
        landed, res = self.h.power_cut("kill", action=action, delay=delay)
        self.stats["kill"] += 1
        if action is not None:
            self.stats["landed" if landed else "lost"] += 1
        self._count()

    def _flash(self, what, n, amount=1, pulses=1):
        action = self._action(what, amount, pulses)
        if action is None:
            return
        landed, res = self.h.power_cut("flash", n=n, action=action, linger=self.linger)
        if res.cut:
            self.stats["flash_cut"] += 1
            self.stats["landed" if landed else "lost"] += 1
        self._count()

    @precondition(lambda self: self.has("power_cut"))
    @rule(delay=st.floats(0, 0.08))
    def kill_idle(self, delay):
        self._kill("idle", delay)

    @precondition(lambda self: self.has("power_cut"))
    @rule(delay=st.floats(0, 0.08), amount=amounts, held=st.booleans())
    def kill_during_submit(self, delay, amount, held):
        self._kill("held" if held and self.held else "submit", delay, amount=amount)

    @precondition(lambda self: self.has("power_cut"))
    @rule(delay=st.floats(0, 0.08), amount=amounts, wrong=st.booleans(), k=st.integers(1, 9))
    def kill_during_code(self, delay, amount, wrong, k):
        """A cut while a code is checked: a wrong one counts (its failure was committed
        first) or was never taken; a right one applied or not, never twice."""
        self._kill("wrong_code" if wrong else "code", delay, amount=amount, n=k)

    @precondition(lambda self: self.has("flash_cut"))
    @rule(n=st.integers(0, 3), amount=amounts, wrong=st.booleans(), k=st.integers(1, 9))
    def flash_cut_during_code(self, n, amount, wrong, k):
        self._flash("wrong_code" if wrong else "code", n, amount=amount, pulses=k)

    @precondition(lambda self: self.has("power_cut") and self.has("pulses"))
    @rule(delay=st.floats(0, 0.08), n=pulse_counts)
    def kill_during_pulses(self, delay, n):
        self._kill("pulses", delay, n=n)

    @precondition(lambda self: self.has("power_cut") and self.has("button"))
    @rule(delay=st.floats(0, 0.08))
    def kill_during_button(self, delay):
        self._kill("button", delay)

    @precondition(lambda self: self.has("flash_cut"))
    @rule(n=st.integers(0, 3), amount=amounts, held=st.booleans())
    def flash_cut_during_submit(self, n, amount, held):
        self._flash("held" if held and self.held else "submit", n, amount=amount)

    @precondition(lambda self: self.has("flash_cut") and self.has("pulses"))
    @rule(n=st.integers(0, 1), pulses=st.integers(800, 40000))
    def flash_cut_during_checkpoint(self, n, pulses):
        self._flash("pulses", n, pulses=pulses)

    @precondition(lambda self: self.has("flash_cut") and self.has("button"))
    @rule(n=st.integers(0, 3))
    def flash_cut_during_button(self, n):
        self._flash("button", n)

    @invariant()
    def board_matches_model(self):
        self.h.settle()

    def teardown(self):
        for r in self.h.books.receipts.values():
            self.stats["receipts_kind_%d" % r.kind] = self.stats.get("receipts_kind_%d" % r.kind, 0) + 1
        self.reconcile_receipts()
        self._remember()

    def reconcile_receipts(self):
        """The receipts read back from the board go through the supplier's reconciliation:
        zero anomalies, and exactly the vouchers the model applied are redeemed. Each example
        re-provisions the meter (a new key epoch, its chain from the index the meter carried),
        so this example is reconciled in a scratch copy of the supplier's database holding
        only its own vouchers and meter keys."""
        import sqlite3
        import tempfile
        from host import db, reconcile
        receipts = [self.h.books.receipts[i].raw for i in sorted(self.h.books.receipts)]
        ours = sorted(self.h.issued)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "scratch.db")
            copy = sqlite3.connect(path)
            self.board.issuer.conn.backup(copy)
            copy.close()
            conn = db.open_db(path)
            try:
                marks = ",".join("?" * len(ours))
                with conn:
                    for table in ("voucher_status", "anomalies", "receipts"):
                        conn.execute("DELETE FROM %s" % table)
                    conn.execute("DELETE FROM vouchers WHERE sequence NOT IN (%s)" % marks, ours)
                    conn.execute("DELETE FROM device_keys WHERE device = ? AND first_index < ?",
                                 (self.board.device, self.h.books.epochs[0]))
                if receipts:
                    reconcile.import_raw(conn, receipts, "model run")
                reconcile.reconcile(conn)
                anomalies = conn.execute("SELECT kind, receipt_index, detail FROM anomalies").fetchall()
                assert anomalies == [], anomalies
                redeemed = {seq for (seq,) in conn.execute(
                    "SELECT sequence FROM voucher_status WHERE status = 'redeemed'")}
                assert redeemed == set(self.h.books.applied), (redeemed, self.h.books.applied)
                self.stats["reconciled"] = self.stats.get("reconciled", 0) + 1
            finally:
                conn.close()


@pytest.mark.meter(initial_credit=500, max_voucher=2500, max_credit=20000)
def test_random_traffic_and_power_cuts_keep_the_books(board, han):
    stats = {"examples": 0, "steps": 0, "kill": 0, "flash_cut": 0, "reboots": 0,
             "landed": 0, "lost": 0}

    class Machine(MeterMachine):
        pass
    Machine.board, Machine.han, Machine.stats = board, han, stats
    t0 = time.monotonic()
    run_state_machine_as_test(Machine, settings=settings(
        max_examples=examples(EXAMPLES), stateful_step_count=STEPS, deadline=None,
        suppress_health_check=list(HealthCheck), print_blob=True))
    stats["seconds"] = time.monotonic() - t0
    stats["power_cuts"] = stats["kill"] + stats["flash_cut"]
    stats["cuts_per_minute"] = 60 * stats["power_cuts"] / stats["seconds"]
    out = os.environ.get("TOPUP_MODEL_STATS")
    if out:
        with open(out, "w") as f:
            json.dump({k: v for k, v in stats.items() if k != "previous"}, f)
    print("model-based run:", stats)
    assert stats["examples"] >= 1
    assert stats.get("reconciled") == stats["examples"]
    # codes were exercised: applied, and refused as wrong (or locked out)
    assert stats.get("code_applied", 0), stats
    assert stats.get("code_code_wrong", 0) + stats.get("code_code_locked", 0), stats
    # and signed commands: applied over the HAN (the issuer key rotated, the old one revoked)
    assert stats.get("command_applied", 0), stats
    if board.has("power_cut"):
        assert stats["kill"] > 0, "no power cut was exercised"


def _machine(board, han, **attrs):
    class Machine(MeterMachine):
        pass
    Machine.board, Machine.han = board, han
    Machine.stats = {"examples": 0, "steps": 0, "kill": 0, "flash_cut": 0, "reboots": 0,
                     "landed": 0, "lost": 0}
    for k, v in attrs.items():
        setattr(Machine, k, v)
    return Machine()


@pytest.mark.meter(initial_credit=500, max_voucher=2500, max_credit=20000)
def test_the_saved_example_a_cut_after_an_answered_rejection(board, han):
    """The example Hypothesis saved (reproduce_failure('6.170.17', b'AXicY3DMdWRkYHBkQMLc…'))
    step by step, the final cut kept armed after the answer so that it lands where it did:
    a STALE voucher is answered, and the rejections receipt the same pass writes (an hour
    has passed) is torn.  The meter came back with receipt_count 2 where the model said 3:
    the model took "answered" to mean that everything the pass wrote landed, but a refusal
    writes nothing itself and the rejections receipt after it is a commit of its own, which
    a cut may lose (firmware/README.md, "Rejections").  Now the model allows both."""
    m = _machine(board, han, linger=1.0)
    steps = [("reboot",), ("button",), ("button",), ("button",), ("clock", 1), ("reboot",),
             ("reboot",), ("kill_idle", 0.0), ("flash_cut_during_submit", 0, 261, False),
             ("button",), ("clock", 3600), ("flash_cut_during_submit", 2, 655, False),
             ("jump_past_the_window", 1033), ("jump_past_the_window", 1432),
             ("flash_cut_during_submit", 2, 98, True)]
    m.board_matches_model()
    for name, *args in steps:
        getattr(m, name)(*args)
        m.board_matches_model()
    m.teardown()


@pytest.mark.rig("flash_cut", "clock")
@pytest.mark.meter(initial_credit=500, max_voucher=2500, max_credit=20000)
def test_a_cut_after_an_answered_rejection_may_lose_only_what_follows_the_answer(board, meter):
    """A refused voucher is answered, then the same pass writes the rejections receipt (an
    hour since the last): a cut at each of that commit's flash operations leaves the refusal
    answered and the receipt landed (or rolled forward) or lost, never anything else."""
    stale = meter.issue(1, 70)[:6]
    meter.submit(meter.issued[max(meter.issued)])       # sequences 1-5 are now below the window
    outcomes = []
    for n, raw in enumerate(stale[:5]):
        meter.advance(3600)
        count = meter.settle()["receipt_count"]
        landed, res = meter.power_cut("flash", n=n, action=("submit", raw), linger=1.0)
        # answered STALE (unless the power went before the answer was read: then the model
        # allows the refusal and its receipt in any state, as for any request in flight)
        assert res.result is None and getattr(res.error, "reason", errors.STALE) == errors.STALE
        st = meter.settle()
        outcomes.append((n, res.cut, st["receipt_count"] - count))
    assert any(cut for _, cut, _ in outcomes), outcomes
    meter.check(full=True)
