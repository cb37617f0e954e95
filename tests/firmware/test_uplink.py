# The WAN uplink (both VMs): receipts queue while the WAN is down and go up when it is
# back; only a signed acknowledgement that names this meter, its key and the hash of its
# own receipt moves the acknowledged index (SPEC.md §5.1); acknowledgements survive a
# reboot; a silent head end gets the push again.
import tests.firmware._fw  # noqa: F401

from boards.fake import Board, HanStream
from meter import provisioning
from meter.app import Meter
from meter.store import Store
from protocol import ack, cose, ed25519, han, receipt
from tests.firmware._meterkit import DEVICE, OTHER_DEVICE, ISSUER_SEED, STRANGER_SEED, public, issue


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


def _signed(meter, next_index, last_raw, seed=ISSUER_SEED, device=DEVICE, meter_kid=None):
    """What a head end holding receipts up to last_raw answers (SPEC.md §5.1)."""
    kid = cose.kid_for(public(seed))
    return ack.encode(kid, lambda m: ed25519.sign(seed, m), device,
                      meter_kid or meter.ledger.signer.kid, next_index, receipt.chain_hash(last_raw))


def _answer(board, msg_id, next_index, signed=None):
    payload = {1: next_index}
    if signed is not None:
        payload[2] = signed
    board.wan.feed(han.encode_message(han.PUSH | han.RESPONSE, msg_id, payload))


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
    _answer(board, i, 4, _signed(meter, 4, p[3][3]))
    meter.step()
    [(t2, i2, p2)] = _pushes(board)
    assert p2[2] == 4 and len(p2[3]) == 2 and i2 != i
    _answer(board, i2, 6, _signed(meter, 6, p2[3][1]))
    meter.step()
    assert meter.ledger.uploaded == 6
    meter.step()
    assert _pushes(board) == []


def test_unsigned_forged_and_replayed_acknowledgements_move_nothing():
    meter, board = _meter()
    for seq in range(1, 5):
        _top_up(meter, board, seq)
    board.set_wan(True)
    meter.step()
    [(t, i, p)] = _pushes(board)
    good = _signed(meter, 4, p[3][3])
    forged = [
        None,                                                   # the old, unsigned answer
        _signed(meter, 4, p[3][3], seed=STRANGER_SEED),         # a key the meter does not trust
        _signed(meter, 4, p[3][2]),                             # the hash of another receipt
        _signed(meter, 4, p[3][3], device=OTHER_DEVICE),        # another meter's
        _signed(meter, 4, p[3][3], meter_kid=b"\x01" * 8),      # another meter key (epoch)
        good[:-1] + bytes([good[-1] ^ 1]),                      # a flipped signature bit
        _signed(meter, 3, p[3][2]),                             # signed, but not what field 1 says
    ]
    for n, signed in enumerate(forged):
        _answer(board, i, 4, signed)
        meter.step()
        assert meter.ledger.uploaded == 0, n
        board.advance(6)                     # silence: the push goes again, the next forgery answers it
        meter.step()
        [(t, i, p2)] = _pushes(board)
        assert p2[3] == p[3]
    _answer(board, i, 4, good)
    meter.step()
    assert meter.ledger.uploaded == 4
    # the same acknowledgement again, later, moves nothing further (and nothing back)
    _top_up(meter, board, 5)
    [(t, i, p3)] = _pushes(board)
    _answer(board, i, 4, good)
    meter.step()
    assert meter.ledger.uploaded == 4


def test_silent_head_end_gets_the_push_again_and_wrong_answers_are_ignored():
    meter, board = _meter()
    _top_up(meter, board, 1)
    board.set_wan(True)
    meter.step()
    [(t, i, p)] = _pushes(board)
    _answer(board, i + 1, 1, _signed(meter, 1, p[3][0]))   # wrong id
    board.wan.feed(b"garbage\x00")
    board.advance(4)
    meter.step()
    assert _pushes(board) == [] and meter.ledger.uploaded == 0
    board.advance(2)
    meter.step()
    [(t, i2, p2)] = _pushes(board)
    assert p2[3] == p[3]
    _answer(board, i2, 99, _signed(meter, 99, p[3][0]))     # beyond count: ignored
    meter.step()
    assert meter.ledger.uploaded == 0


def test_acknowledgement_is_kept_across_a_reboot_once_checkpointed():
    meter, board = _meter()
    _top_up(meter, board, 1)
    _top_up(meter, board, 2)
    board.set_wan(True)
    meter.step()
    [(t, i, p)] = _pushes(board)
    _answer(board, i, 2, _signed(meter, 2, p[3][1]))
    meter.step()
    meter.ledger.checkpoint()
    meter2, board2 = _meter(flash=board.flash, now=board.now)
    assert meter2.ledger.uploaded == 2
    board2.set_wan(True)
    meter2.step()
    assert _pushes(board2) == []
