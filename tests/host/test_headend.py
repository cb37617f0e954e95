"""The head end against the meter's own uplink code, in one process: receipts queued while
the WAN was down reach the supplier's database, are acknowledged, and reconcile."""
import tests.firmware._fw  # noqa: F401

from boards.fake import Board, HanStream
from host import db, headend, registry
from meter import provisioning
from meter.app import Meter
from meter.store import Store
from protocol import errors, han
from tests.firmware._meterkit import DEVICE, ISSUER_SEED, issue, public


class Link:
    """A byte pipe between the meter's WAN stream and the head end."""

    def __init__(self, meter_side):
        self.meter_side = meter_side

    def read(self, n):
        return self.meter_side.take_output()

    def write(self, data):
        self.meter_side.feed(data)


def _setup(tmp_path):
    conn = db.create(str(tmp_path / "supplier.db"))
    board = Board(now=1790000000)
    board.wan = HanStream()
    store = Store(board.flash)
    store.mount()
    key = provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 100)
    registry.add_device(conn, DEVICE, public_key=key)
    meter = Meter(board)
    return conn, board, meter, headend.HeadEnd(conn, Link(board.wan), "wan:test")


def test_queued_receipts_reach_the_head_end_when_the_wan_is_back(tmp_path):
    conn, board, meter, head = _setup(tmp_path)
    for seq in range(1, 11):
        board.feed(han.encode_message(han.SUBMIT, seq, {1: issue(seq, 50)}))
        meter.step()
    board.take_output()
    meter.step()
    assert head.poll() == 0                            # WAN down: nothing comes
    board.set_wan(True)
    for _ in range(10):
        meter.step()
        head.poll()
    assert meter.ledger.uploaded == 10
    stored = conn.execute("SELECT count(*), min(idx), max(idx) FROM receipts WHERE device = ?",
                          (DEVICE,)).fetchone()
    assert tuple(stored) == (10, 0, 9)
    assert head.pushes == 3 and head.stored == 10      # 4 + 4 + 2


def test_a_repeated_push_changes_nothing_and_is_acknowledged_again(tmp_path):
    conn, board, meter, head = _setup(tmp_path)
    board.feed(han.encode_message(han.SUBMIT, 1, {1: issue(1, 50)}))
    meter.step()
    raw = meter.store.receipt(0)
    for _ in range(2):
        nxt, result = headend.handle_push(conn, {1: DEVICE, 2: 0, 3: [raw]}, "wan:test")
        assert nxt == 1
    assert conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 1


def test_acknowledgement_never_skips_a_missing_receipt_the_meter_could_send(tmp_path):
    conn, board, meter, head = _setup(tmp_path)
    for seq in (1, 2, 3):
        board.feed(han.encode_message(han.SUBMIT, seq, {1: issue(seq, 50)}))
        meter.step()
    r0, r2 = meter.store.receipt(0), meter.store.receipt(2)
    assert headend.handle_push(conn, {1: DEVICE, 2: 0, 3: [r0]}, "x")[0] == 1
    assert headend.handle_push(conn, {1: DEVICE, 2: 2, 3: [r2]}, "x")[0] == 3
    # receipt 1 is still missing: a push starting there is asked for it
    assert headend.next_needed(conn, DEVICE, 1) == 1


def test_garbage_and_bad_pushes_are_refused_without_storing(tmp_path):
    conn, board, meter, head = _setup(tmp_path)
    link_in = []

    class Stream:
        def read(self, n):
            return link_in.pop(0) if link_in else b""

        def write(self, data):
            link_in_replies.append(data)

    link_in_replies = []
    head = headend.HeadEnd(conn, Stream(), "x")
    link_in.append(b"noise\x00" + han.encode_message(han.PUSH, 5, {1: DEVICE, 2: 0, 3: [b"junk"]})
                   + han.encode_message(han.STATUS, 6, {}))
    assert head.poll() == 2
    replies = [han.decode_message(b) for b in han.Deframer().feed(b"".join(link_in_replies))]
    assert replies == [(han.ERROR, 5, {1: errors.BAD_REQUEST}), (han.ERROR, 6, {1: errors.UNKNOWN_REQUEST})]
    assert conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 0
