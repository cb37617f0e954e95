"""Model-based run against the board under test: a Hypothesis state machine drives random
sequences of issue, submit (in order, out of order, duplicated, tampered, stale), energy
pulses, clock steps, WAN toggles, button presses, reboots and power cuts of both kinds (kill
at a random instant with a request in flight; a cut at the n-th flash erase/program) against
the board and a host-side model of the ledger (hil/rig.py, from firmware/README.md's rules).

After every step (hil.rig.Harness.settle): the board's HAN status — balance, supply, highest
sequence, receipt count, emergency credit — equals the model's; the relay agrees; every
receipt verifies with the registered meter key, the chain is intact, none once read has
changed, no voucher is applied twice and none that was not issued; and
balance = opening + Σ applied − metered, exactly, in milli-pence.

Power cuts are modelled honestly: a cut loses what the firmware says it may (RAM: unsaved
metering and rejection counts since the last commit). With a request in flight the board
may come back with it landed or not — the model allows exactly those two states and no
other, and a top-up the meter answered must have landed.

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
from protocol import voucher as pv
from tests.soak import examples

pytestmark = pytest.mark.hil

EXAMPLES = 8
STEPS = 30

amounts = st.integers(1, 2500)
pulse_counts = st.one_of(st.integers(1, 60), st.integers(60, 1500), st.integers(1500, 40000))


class MeterMachine(RuleBasedStateMachine):
    board = None          # set by the test: the plugin's BoardUnderTest
    han = None
    stats = None

    def __init__(self):
        super().__init__()
        self.board.reprovision()
        self.h = Harness(self.board, self.han)
        self.held = []                                   # issued, not yet submitted
        self.wan = False
        self.stats["examples"] += 1

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

    @precondition(lambda self: self.h.issued)
    @rule(i=st.integers(0, 1000))
    def resubmit(self, i):
        seqs = sorted(self.h.issued)
        self.h.submit(self.h.issued[seqs[i % len(seqs)]])
        self._count()

    @precondition(lambda self: self.h.issued)
    @rule(i=st.integers(0, 1000), pos=st.integers(0, 200), bit=st.integers(0, 7))
    def submit_tampered(self, i, pos, bit):
        seqs = sorted(self.h.issued)
        raw = bytearray(self.h.issued[seqs[i % len(seqs)]])
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
        landed, res = self.h.power_cut("flash", n=n, action=action)
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

    def reconcile_receipts(self):
        """The receipts read back from the board go through the supplier's reconciliation:
        zero anomalies, and exactly the vouchers the model applied are redeemed. Each example
        re-provisions the meter (a new key, a new chain), so this example is reconciled in a
        scratch copy of the supplier's database holding only its own vouchers."""
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
            json.dump(stats, f)
    print("model-based run:", stats)
    assert stats["examples"] >= 1
    assert stats.get("reconciled") == stats["examples"]
    if board.has("power_cut"):
        assert stats["kill"] > 0, "no power cut was exercised"
