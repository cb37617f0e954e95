# The WAN uplink (both VMs): receipts queue while the WAN is down and go up when it is
# back; acknowledgements survive a reboot; a silent head end gets the push again.
import tests.firmware._fw  # noqa: F401

from boards.fake import Board, HanStream
from meter import provisioning
from meter.app import Meter
from meter.store import Store
from protocol import han, receipt
from tests.firmware._meterkit import DEVICE, ISSUER_SEED, public, issue


def _meter(flash=None, now=1790000000):
    board = Board(now=now, flash=flash)
    board.wan = HanStream()
    if flash is None:
        store = Store(board.flash)
        store.mount()
        provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 100)
    return Meter(board), board


def _pushes(board):
    out = []
    for body in han.Deframer().feed(board.wan.take_output()):
        out.append(han.decode_message(body))
    return out


def _top_up(meter, board, seq, amount=100):
    board.feed(han.encode_message(han.SUBMIT, seq, {1: issue(seq, amount)}))
    meter.step()
    board.take_output()


def test_receipts_wait_for_the_wan_and_go_up_when_it_is_back():
    meter, board = _meter()
    for seq in range(1, 7):
        _top_up(meter, board, seq)
    assert _pushes(board) == []                  # WAN down: nothing sent
    board.set_wan(True)
    meter.step()
    [(t, i, p)] = _pushes(board)
    assert t == han.PUSH and p[1] == DEVICE and p[2] == 0 and len(p[3]) == 4
    assert [receipt.parse(r).index for r in p[3]] == [0, 1, 2, 3]
    meter.step()
    assert _pushes(board) == []                  # waiting for the answer
    board.wan.feed(han.encode_message(han.PUSH | han.RESPONSE, i, {1: 4}))
    meter.step()
    [(t2, i2, p2)] = _pushes(board)
    assert p2[2] == 4 and len(p2[3]) == 2 and i2 != i
    board.wan.feed(han.encode_message(han.PUSH | han.RESPONSE, i2, {1: 6}))
    meter.step()
    assert meter.ledger.uploaded == 6
    meter.step()
    assert _pushes(board) == []


def test_silent_head_end_gets_the_push_again_and_wrong_answers_are_ignored():
    meter, board = _meter()
    _top_up(meter, board, 1)
    board.set_wan(True)
    meter.step()
    [(t, i, p)] = _pushes(board)
    board.wan.feed(han.encode_message(han.PUSH | han.RESPONSE, i + 1, {1: 1}))   # wrong id
    board.wan.feed(b"garbage\x00")
    board.advance(4)
    meter.step()
    assert _pushes(board) == [] and meter.ledger.uploaded == 0
    board.advance(2)
    meter.step()
    [(t, i2, p2)] = _pushes(board)
    assert p2[3] == p[3]
    board.wan.feed(han.encode_message(han.PUSH | han.RESPONSE, i2, {1: 99}))    # beyond count: ignored
    meter.step()
    assert meter.ledger.uploaded == 0


def test_acknowledgement_is_kept_across_a_reboot_once_checkpointed():
    meter, board = _meter()
    _top_up(meter, board, 1)
    _top_up(meter, board, 2)
    board.set_wan(True)
    meter.step()
    [(t, i, p)] = _pushes(board)
    board.wan.feed(han.encode_message(han.PUSH | han.RESPONSE, i, {1: 2}))
    meter.step()
    meter.ledger.checkpoint()
    meter2, board2 = _meter(flash=board.flash, now=board.now)
    assert meter2.ledger.uploaded == 2
    board2.set_wan(True)
    meter2.step()
    assert _pushes(board2) == []
