# Supply arming (SPEC.md §9), on both VMs: a top-up that lifts credit above zero after the
# supply was interrupted ARMS it -- the relay stays open -- and only the customer's
# confirmation (the meter's button, or the PPMID's request 6) closes it; emergency credit
# switches it on at once; the interruption is committed at once, so a power cut never
# brings the supply back by itself.
#
# The rules, written out here: states 0 interrupted, 1 armed, 2 on; the relay is closed only
# when on; credit = balance + emergency credit taken; energy(Wh) = floor(Wh * 24500 / 1000) mp.
import tests.firmware._fw  # noqa: F401

from tests.firmware._meterkit import Kit, issue, DEVICE, ISSUER_SEED, public, T0
from tests.firmware.test_ledger_powercut import _every_cut
from tests.protocol._support import expect_rejected
from boards.fake import Board
from boards.nor import PowerCut
from meter import config as cfg, provisioning
from meter.app import Meter
from meter.store import Store
from protocol import errors, han, receipt

INTERRUPTED, ARMED, ON = 0, 1, 2


def _energy(wh):
    return wh * 24500 // 1000


def _board(initial, codes=False):
    board = Board(now=T0)
    store = Store(board.flash)
    store.mount()
    provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, initial, T0)
    return board


def _ask(meter, board, msg_type, msg_id, payload):
    board.feed(han.encode_message(msg_type, msg_id, payload))
    meter.step()
    [body] = han.Deframer().feed(board.take_output())
    return han.decode_message(body)


def _run_dry(kit, initial_mp):
    # Meter just past the credit: 41 Wh costs 1004.5 mp, so (initial_mp // 1004) + 1 lots.
    wh = initial_mp * 1000 // 24500 + 1
    kit.ledger.meter(wh, kit.clock.now)
    return wh


# --- the ledger ---------------------------------------------------------------------------------
def test_a_meter_provisioned_without_credit_starts_interrupted_and_with_credit_on():
    assert Kit(initial=0).ledger.supply_state == INTERRUPTED
    assert not Kit(initial=0).ledger.supply_on()
    assert Kit(initial=1).ledger.supply_state == ON


def test_running_out_interrupts_a_top_up_arms_and_a_confirm_switches_on():
    kit = Kit(initial=10)
    ledger = kit.ledger
    _run_dry(kit, 10000)
    assert ledger.supply_state == INTERRUPTED and not ledger.supply_on()
    raw, _ = ledger.submit(issue(1, 200))
    r = receipt.verify(raw, kit.meter_keys())
    assert r.supply == ARMED and r.balance_after > 0
    assert ledger.supply_state == ARMED and not ledger.supply_on()
    assert kit.reboot().supply_state == ARMED                    # armed is kept on flash
    ledger = kit.ledger
    assert ledger.confirm_supply() == ON and ledger.supply_on()
    assert kit.reboot().supply_state == ON
    # a confirm when not armed changes nothing and writes nothing
    count = kit.store.receipt_count
    assert kit.ledger.confirm_supply() == ON and kit.store.receipt_count == count


def test_a_top_up_while_on_stays_on_and_says_so_in_its_receipt():
    kit = Kit(initial=500)
    raw, _ = kit.ledger.submit(issue(1, 100))
    assert receipt.parse(raw).supply == ON and kit.ledger.supply_on()


def test_a_top_up_that_leaves_credit_at_or_below_zero_leaves_it_interrupted():
    kit = Kit(initial=0)
    kit.clock.now += 10 * 86400                    # £6 of standing charge while off
    kit.ledger.meter(0, kit.clock.now)
    assert kit.ledger.balance_mp == -600000
    raw, _ = kit.ledger.submit(issue(1, 500))
    assert receipt.parse(raw).supply == INTERRUPTED and kit.ledger.supply_state == INTERRUPTED
    raw, _ = kit.ledger.submit(issue(2, 101))      # now 1 p above zero
    assert receipt.parse(raw).supply == ARMED and kit.ledger.balance_mp == 1000


def test_emergency_credit_while_interrupted_switches_on_at_once():
    kit = Kit(initial=10)
    _run_dry(kit, 10000)
    assert kit.ledger.supply_state == INTERRUPTED
    raw = kit.ledger.take_emergency_credit()
    r = receipt.verify(raw, kit.meter_keys())
    assert (r.kind, r.amount, r.supply) == (receipt.EMERGENCY, 500, ON)
    assert kit.ledger.supply_on() and kit.reboot().supply_on()


def test_emergency_credit_running_out_interrupts_and_a_top_up_into_it_arms():
    kit = Kit(initial=10)
    kit.ledger.take_emergency_credit()             # on, with £5 more
    kit.ledger.meter(20900, kit.clock.now)         # 20.9 kWh = £5.1205: past the emergency credit
    assert kit.ledger.balance_mp == 10000 - _energy(20900) and kit.ledger.supply_state == INTERRUPTED
    raw, _ = kit.ledger.submit(issue(1, 100))      # still below zero, but credit is back above it
    r = receipt.parse(raw)
    assert r.balance_after < 0 and r.supply == ARMED and kit.ledger.emergency_mp == 500000


def test_the_interruption_is_committed_at_once_and_a_cut_never_brings_the_supply_back():
    kit = Kit(initial=10)
    saves = kit.store.receipt_count, kit.store.state
    _run_dry(kit, 10000)                           # far below the 20 p checkpoint threshold
    assert kit.store.state != saves[1]             # but written at once
    assert kit.reboot().supply_state == INTERRUPTED
    # at every cut of the interrupting commit: either on with the credit it had (the relay
    # had not opened yet) or interrupted -- never on without credit
    kit = Kit(initial=10)

    def check(trial, completed):
        ledger = trial.ledger
        assert ledger.supply_state in (ON, INTERRUPTED)
        assert ledger.supply_state == INTERRUPTED or not completed
        if ledger.supply_on():
            assert ledger.balance_mp == 10000

    _every_cut(kit, lambda t: _run_dry(t, 10000), check)


def test_armed_survives_a_cut_at_any_write_of_its_top_up():
    kit = Kit(initial=10)
    _run_dry(kit, 10000)

    def check(trial, completed):
        ledger = trial.ledger
        applied = ledger.receipt_count == 1
        assert ledger.supply_state == (ARMED if applied else INTERRUPTED)
        assert applied or not completed
        assert not ledger.supply_on()

    _every_cut(kit, lambda t: t.ledger.submit(issue(1, 300)), check)


def test_emergency_credit_cut_at_any_write_is_on_with_it_or_interrupted_without_it():
    # the receipt is written before the state: a cut between them rolls forward from the
    # receipt, whose field 14 says the supply came on
    kit = Kit(initial=10)
    _run_dry(kit, 10000)
    rolled = [0]

    def check(trial, completed):
        ledger = trial.ledger
        taken = ledger.emergency_mp == 500000
        assert ledger.supply_state == (ON if taken else INTERRUPTED)
        assert taken or not completed
        if taken and not completed:
            rolled[0] += 1

    _every_cut(kit, lambda t: t.ledger.take_emergency_credit(), check)
    assert rolled[0] >= 1


def test_a_confirm_cut_at_any_write_is_armed_or_on():
    kit = Kit(initial=10)
    _run_dry(kit, 10000)
    kit.ledger.submit(issue(1, 300))

    def check(trial, completed):
        state = trial.ledger.supply_state
        assert state == ON or (state == ARMED and not completed)

    _every_cut(kit, lambda t: t.ledger.confirm_supply(), check)


def test_a_state_from_before_arming_gets_its_supply_state_from_its_credit():
    for initial, expected in ((100, ON), (0, INTERRUPTED)):
        kit = Kit(initial=initial)
        st = cfg.decode(kit.store.state)
        del st[cfg.S_SUPPLY]
        kit.ledger._commit(st, kit.clock.now)
        assert cfg.S_SUPPLY not in cfg.decode(kit.store.state)
        assert kit.reboot().supply_state == expected


# --- the meter: relay, button, HAN --------------------------------------------------------------
def test_the_relay_stays_open_while_armed_and_closes_on_the_button_without_emergency_credit():
    board = _board(initial=1)
    meter = Meter(board)
    assert board.relay_on
    board.add_pulses(41)                           # 1004.5 mp > 1 p
    meter.step()
    assert not board.relay_on
    _ask(meter, board, han.SUBMIT, 1, {1: issue(1, 50)})    # 50 p: below the £1 threshold
    assert not board.relay_on and meter.ledger.supply_state == ARMED
    count = meter.ledger.receipt_count
    board.press_button(3)                          # a burst of presses: one confirm
    meter.step()
    assert board.relay_on and meter.ledger.supply_state == ON
    assert meter.ledger.emergency_mp == 0 and meter.ledger.receipt_count == count
    board.press_button()                           # on and below the threshold: emergency credit
    meter.step()
    assert meter.ledger.emergency_mp == 500000 and meter.ledger.receipt_count == count + 1


def test_the_button_takes_emergency_credit_when_interrupted_and_the_relay_closes():
    board = _board(initial=1)
    meter = Meter(board)
    board.add_pulses(41)
    meter.step()
    assert not board.relay_on
    board.press_button()
    meter.step()
    assert board.relay_on and meter.ledger.emergency_mp == 500000


def test_a_reboot_while_interrupted_or_armed_keeps_the_relay_open():
    board = _board(initial=1)
    meter = Meter(board)
    board.add_pulses(41)
    meter.step()
    rebooted = Board(flash=board.flash, now=board.now + 5)
    meter = Meter(rebooted)
    meter.step()
    assert not rebooted.relay_on and meter.ledger.supply_state == INTERRUPTED
    _ask(meter, rebooted, han.SUBMIT, 1, {1: issue(1, 500)})
    again = Board(flash=rebooted.flash, now=rebooted.now + 5)
    meter = Meter(again)
    meter.step()
    assert not again.relay_on and meter.ledger.supply_state == ARMED


def test_the_relay_opens_only_after_the_interruption_is_on_flash():
    # Cut power at every write of the step that runs out of credit: whatever the relay did
    # before the cut, the flash it reboots on agrees -- a relay that opened has an
    # interrupted state on flash.
    n = 0
    while True:
        board = _board(initial=1)
        meter = Meter(board)
        board.add_pulses(41)
        board.flash.cut_after(n)
        try:
            meter.step()
            done = True
        except PowerCut:
            done = False
        board.flash.cut_after(None)
        rebooted = Board(flash=board.flash, now=board.now)
        after = Meter(rebooted)
        if not board.relay_on:
            assert after.ledger.supply_state == INTERRUPTED
        after.step()
        assert rebooted.relay_on == (after.ledger.supply_state == ON)
        if done:
            assert after.ledger.supply_state == INTERRUPTED
            break
        n += 1
    assert n >= 1


def test_customer_actions_over_the_han():
    board = _board(initial=1)
    meter = Meter(board)
    board.add_pulses(41)
    meter.step()
    t, i, p = _ask(meter, board, 6, 1, {1: 1})     # confirm while interrupted: nothing to confirm
    assert (t, i, p) == (0x86, 1, {1: INTERRUPTED}) and not board.relay_on
    t, i, p = _ask(meter, board, han.STATUS, 2, {})
    assert (p[4], p[15]) == (False, INTERRUPTED)
    t, i, p = _ask(meter, board, 6, 3, {1: 2})     # emergency credit: on at once
    assert t == 0x86 and p[1] == ON and board.relay_on
    r = receipt.parse(p[2])
    assert (r.kind, r.amount, r.supply) == (receipt.EMERGENCY, 500, ON)
    t, i, p = _ask(meter, board, 6, 4, {1: 2})     # again: in use
    assert (t, p) == (han.ERROR, {1: errors.EC_UNAVAILABLE})
    board.add_pulses(20500)                        # past the emergency credit
    meter.step()
    assert not board.relay_on
    _ask(meter, board, han.SUBMIT, 5, {1: issue(1, 1000)})
    t, i, p = _ask(meter, board, han.STATUS, 6, {})
    assert (p[4], p[15]) == (False, ARMED) and not board.relay_on
    t, i, p = _ask(meter, board, 6, 7, {1: 1})
    assert (t, p) == (0x86, {1: ON}) and board.relay_on
    t, i, p = _ask(meter, board, han.STATUS, 8, {})
    assert (p[4], p[15]) == (True, ON)


def test_customer_actions_on_an_unprovisioned_meter_are_refused():
    board = Board()
    meter = Meter(board)
    for n, action in enumerate((1, 2)):
        t, i, p = _ask(meter, board, 6, n, {1: action})
        assert (t, p) == (han.ERROR, {1: errors.NOT_PROVISIONED})
    t, i, p = _ask(meter, board, han.STATUS, 9, {})
    assert (p[4], p[15], p[16], p[17], p[18]) == (False, INTERRUPTED, 0, 5, False)
    assert not board.relay_on
