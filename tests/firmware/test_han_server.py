# The HAN server (both VMs): requests and answers per SPEC.md §5, and hostile input that
# must never crash the loop or change credit.
from tests.firmware._meterkit import Kit, issue, DEVICE
from meter.han_server import HanServer
from meter import config as cfg
from protocol import cbor, errors, han, receipt


class Pipe:
    """A HAN byte stream: the test writes requests in, reads the meter's answers out."""

    def __init__(self, chunk=64):
        self.incoming = bytearray()
        self.outgoing = bytearray()
        self.chunk = chunk

    def read(self, n):
        n = min(n, self.chunk)
        if not self.incoming:
            return None
        data = bytes(self.incoming[:n])
        self.incoming = self.incoming[n:]
        return data

    def write(self, data):
        self.outgoing.extend(data)
        return len(data)


def _setup(initial=1000):
    kit = Kit(initial=initial)
    pipe = Pipe()
    server = HanServer(kit.ledger, pipe, lambda: False)
    return kit, pipe, server


def _exchange(server, pipe, *frames):
    for f in frames:
        pipe.incoming.extend(f)
    # One poll is one main-loop step's bounded share (SPEC.md §5.2): step until all is read.
    for _ in range(1000):
        server.poll()
        if not pipe.incoming and not server.backlog:
            break
    replies = [han.decode_message(b) for b in han.Deframer().feed(bytes(pipe.outgoing))]
    pipe.outgoing = bytearray()
    return replies


def test_status():
    kit, pipe, server = _setup()
    [(t, i, p)] = _exchange(server, pipe, han.encode_message(han.STATUS, 41, {}))
    assert (t, i) == (0x81, 41)
    assert p == {1: DEVICE, 2: cfg.FIRMWARE_VERSION, 3: 1000000, 4: True, 5: False, 6: 0, 7: 0, 8: 0,
                 9: {}, 10: kit.clock.now, 11: False, 12: 0, 13: False, 14: 0,
                 15: 2, 16: 0, 17: 5, 18: False}


def test_submit_resubmit_and_read_receipts():
    kit, pipe, server = _setup()
    v = issue(1, 250)
    [(t, i, p)] = _exchange(server, pipe, han.encode_message(han.SUBMIT, 1, {1: v}))
    assert (t, i, p[2]) == (0x82, 1, False)
    r = receipt.verify(p[1], kit.meter_keys())
    assert r.balance_after == 1250000
    [(t, i, p2)] = _exchange(server, pipe, han.encode_message(han.SUBMIT, 2, {1: v}))
    assert p2 == {1: p[1], 2: True}
    _exchange(server, pipe, han.encode_message(han.SUBMIT, 3, {1: issue(2, 10)}))
    [(t, i, p3)] = _exchange(server, pipe, han.encode_message(han.RECEIPTS, 4, {1: 0, 2: 4}))
    assert t == 0x83 and p3[2] == 2 and p3[1][0] == p[1] and len(p3[1]) == 2
    [(t, i, p4)] = _exchange(server, pipe, han.encode_message(han.RECEIPTS, 5, {1: 1, 2: 1}))
    assert len(p4[1]) == 1 and receipt.parse(p4[1][0]).index == 1


def test_failures_answer_with_reason_codes():
    kit, pipe, server = _setup()
    tampered = bytearray(issue(1, 250))
    tampered[-3] ^= 4
    cases = [
        (han.encode_message(han.SUBMIT, 1, {1: bytes(tampered)}), errors.BAD_SIGNATURE),
        (han.encode_message(han.SUBMIT, 2, {}), errors.BAD_REQUEST),
        (han.encode_message(han.SUBMIT, 3, {1: "text"}), errors.BAD_REQUEST),
        (han.encode_message(9, 4, {}), errors.UNKNOWN_REQUEST),
        (han.encode_frame(cbor.encode([256, 9, {}])), errors.UNKNOWN_REQUEST),
        (han.encode_message(han.RECEIPTS, 5, {1: 0, 2: 99}), errors.BAD_REQUEST),
        (han.encode_message(han.RECEIPTS, 6, {1: -1, 2: 1}), errors.BAD_REQUEST),
        (han.encode_frame(cbor.encode([han.STATUS, 7])), errors.BAD_REQUEST),
        (han.encode_frame(cbor.encode([han.STATUS, 8, []])), errors.BAD_REQUEST),
    ]
    for frame, reason in cases:
        [(t, i, p)] = _exchange(server, pipe, frame)
        assert t == han.ERROR and p == {1: reason}, (i, p)
    assert kit.ledger.balance_mp == 1000000


def test_garbage_oversize_and_truncated_frames_are_dropped_and_the_link_resyncs():
    kit, pipe, server = _setup()
    status = han.encode_message(han.STATUS, 9, {})
    junk = [
        b"\x00\x00\x00",
        b"hello world\x00",
        b"\x01" * 5000,                       # oversize, no delimiter for a long time
        status[:-4],                          # truncated: the rest never comes
        b"\x00",
        han.encode_frame(b"\xff\xff"),        # frames fine, CBOR not: no id, dropped
    ]
    replies = _exchange(server, pipe, *(junk + [status]))
    assert [(t, i) for t, i, p in replies] == [(0x81, 9)]
    assert kit.ledger.balance_mp == 1000000


def test_random_and_mutated_input_never_crashes_or_changes_credit():
    kit, pipe, server = _setup()
    v = issue(1, 100)
    good = [han.encode_message(han.SUBMIT, 1, {1: v}), han.encode_message(han.STATUS, 2, {}),
            han.encode_message(han.RECEIPTS, 3, {1: 0, 2: 2})]
    x = 2026
    for round_ in range(300):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        if round_ % 3 == 0:
            data = bytes((x >> (i % 24)) & 0xFF for i in range(x % 200))
        else:
            data = bytearray(good[x % 3])
            pos = x % len(data)
            data[pos] = (data[pos] + 1 + (x >> 8) % 255) & 0xFF
            data = bytes(data)
        pipe.incoming.extend(data)
        server.poll()
        pipe.outgoing = bytearray()
        # only the one valid voucher may ever add credit, and only once
        assert kit.ledger.balance_mp in (1000000, 1100000)
    pipe.incoming.extend(b"\x00" + good[1])
    server.poll()
    assert han.Deframer().feed(bytes(pipe.outgoing))
