# The whole meter on the fake board (both VMs): the main loop's step reads pulses and the
# button, serves the HAN and drives the relay.
import tests.firmware._fw  # noqa: F401

from boards.fake import Board
from meter import provisioning
from meter.app import Meter
from meter.store import Store
from protocol import han
from tests.firmware._meterkit import DEVICE, ISSUER_SEED, public, issue


def _provisioned_board(initial):
    board = Board(now=1790000000)
    store = Store(board.flash)
    store.mount()
    provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, initial)
    return board


def _ask(meter, board, msg_type, msg_id, payload):
    board.feed(han.encode_message(msg_type, msg_id, payload))
    meter.step()
    [body] = han.Deframer().feed(board.take_output())
    return han.decode_message(body)


def test_unprovisioned_meter_answers_status_and_refuses_vouchers():
    board = Board()
    meter = Meter(board)
    t, i, p = _ask(meter, board, han.STATUS, 1, {})
    assert t == 0x81 and p[1] == b"" and p[3] == 0 and p[4] is False
    t, i, p = _ask(meter, board, han.SUBMIT, 2, {1: issue(1, 100)})
    assert t == han.ERROR and p == {1: 14}
    assert board.relay_on is False


def test_pulses_cut_the_supply_and_a_voucher_over_the_han_arms_it_and_a_confirm_restores_it():
    board = _provisioned_board(initial=1)
    meter = Meter(board)
    assert board.relay_on
    board.add_pulses(50)                      # 50 Wh at 24.5 p/kWh = 1.225 p > 1 p
    meter.step()
    assert not board.relay_on
    t, i, p = _ask(meter, board, han.SUBMIT, 7, {1: issue(1, 500)})
    assert t == 0x82 and p[2] is False
    assert not board.relay_on                 # armed (SPEC §9): nothing comes back unattended
    t, i, p = _ask(meter, board, han.STATUS, 8, {})
    assert p[3] == 1000 - 1225 + 500000 and p[4] is False and p[15] == 1 and p[6] == 1 and p[7] == 1
    t, i, p = _ask(meter, board, 6, 9, {1: 1})  # the PPMID confirms
    assert (t, p) == (0x86, {1: 2}) and board.relay_on
    t, i, p = _ask(meter, board, han.STATUS, 10, {})
    assert p[4] is True and p[15] == 2


def test_button_takes_emergency_credit_when_low():
    board = _provisioned_board(initial=10)
    meter = Meter(board)
    board.add_pulses(400)                     # 9.8 p: 0.2 p left
    board.press_button()
    meter.step()
    assert meter.ledger.emergency_mp == 500000 and board.relay_on
    board.add_pulses(20000)                   # £4.90 more: still within emergency credit
    meter.step()
    assert board.relay_on
    board.add_pulses(1000)
    meter.step()
    assert not board.relay_on
    board.press_button()                      # already in use: ignored
    meter.step()
    assert meter.ledger.receipt_count == 1


def test_state_survives_a_reboot_of_the_board():
    board = _provisioned_board(initial=100)
    meter = Meter(board)
    _ask(meter, board, han.SUBMIT, 1, {1: issue(1, 200)})
    rebooted = Board(flash=board.flash, now=board.now + 5)
    meter2 = Meter(rebooted)
    assert meter2.ledger.balance_mp == 300000 and rebooted.relay_on
