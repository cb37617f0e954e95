# HAN framing (SPEC.md §5): COBS, CRC, size limit, resynchronisation.
from protocol import han, cbor
from protocol.errors import MALFORMED, BAD_REQUEST, UNKNOWN_REQUEST
from tests.protocol._support import unhex, expect_rejected

# Examples from Cheshire & Baker's COBS paper and its common test set.
COBS_EXAMPLES = [
    ("", "01"),
    ("00", "0101"),
    ("0000", "010101"),
    ("11220033", "0311220233"),
    ("11223344", "0511223344"),
    ("11000000", "02110101 01"),
]


def test_cobs_examples():
    for raw, enc in COBS_EXAMPLES:
        raw, enc = unhex(raw), unhex(enc.replace(" ", ""))
        assert han.cobs_encode(raw) == enc
        assert han.cobs_decode(enc) == raw


def test_cobs_long_runs_and_no_zero_inside():
    for n in (253, 254, 255, 508, 1000):
        raw = bytes((i % 255) + 1 for i in range(n))
        enc = han.cobs_encode(raw)
        assert 0 not in enc
        assert han.cobs_decode(enc) == raw
        mixed = bytes(i % 7 for i in range(n))
        assert han.cobs_decode(han.cobs_encode(mixed)) == mixed


def test_frame_round_trip_through_deframer():
    d = han.Deframer()
    frames = [han.encode_message(han.STATUS, i, {}) for i in range(3)]
    bodies = d.feed(b"".join(frames))
    assert [han.decode_message(b) for b in bodies] == [(han.STATUS, i, {}) for i in range(3)]
    assert d.dropped == 0


def test_frame_split_across_feeds():
    d = han.Deframer()
    frame = han.encode_message(han.SUBMIT, 7, {1: b"\x00\x01" * 50})
    got = []
    for i in range(len(frame)):
        got += d.feed(frame[i:i + 1])
    assert [han.decode_message(b) for b in got] == [(han.SUBMIT, 7, {1: b"\x00\x01" * 50})]


def test_bad_crc_and_garbage_are_dropped_and_link_resynchronises():
    good = han.encode_message(han.STATUS, 1, {})
    bad = bytearray(good)
    bad[2] = bad[2] % 255 + 1  # changed, and still no 0x00 inside the frame
    d = han.Deframer()
    bodies = d.feed(b"\x13\x37garbage\x00" + bytes(bad) + b"\x00\x00" + good)
    assert [han.decode_message(b) for b in bodies] == [(han.STATUS, 1, {})]
    assert d.dropped == 2  # the garbage and the corrupted frame; empty frames are not counted


def test_oversize_frame_is_dropped_without_growing_the_buffer():
    d = han.Deframer()
    assert d.feed(b"\x01" * (han.MAX_ENCODED * 3)) == []
    assert len(d._buf) <= han.MAX_ENCODED
    good = han.encode_message(han.STATUS, 2, {})
    assert [han.decode_message(b) for b in d.feed(b"\x00" + good)] == [(han.STATUS, 2, {})]
    assert d.dropped == 1


def test_size_limit_is_enforced_on_both_sides():
    body = cbor.encode([2, 1, {1: bytes(han.MAX_FRAME - 4 - 8)}])
    assert len(body) + 4 <= han.MAX_FRAME
    assert han.decode_frame(han.encode_frame(body)[:-1]) == body
    try:
        han.encode_frame(bytes(han.MAX_FRAME - 3))
    except ValueError:
        pass
    else:
        raise AssertionError("encoded an oversize frame")
    raw = bytes(han.MAX_FRAME - 3)
    import struct
    enc = han.cobs_encode(raw + struct.pack("<I", han.crc32(raw)))
    expect_rejected(MALFORMED, han.decode_frame, enc)


def test_frame_errors_are_malformed():
    expect_rejected(MALFORMED, han.decode_frame, b"")
    expect_rejected(MALFORMED, han.decode_frame, unhex("05010203"))     # truncated block
    expect_rejected(MALFORMED, han.decode_frame, unhex("0201"))          # too short for a CRC
    expect_rejected(MALFORMED, han.decode_frame, unhex("0601020304ff"))  # CRC mismatch


def test_message_shape_is_checked():
    for bad in ([1, 2], [1, 2, []], [-1, 0, {}], [1, 70000, {}], [True, 0, {}], {1: 2}):
        expect_rejected(BAD_REQUEST, han.decode_message, cbor.encode(bad))
    # a well-formed message of a type no version has is an unknown request (SPEC.md §5)
    for t in (256, 70000, 2 ** 40):
        expect_rejected(UNKNOWN_REQUEST, han.decode_message, cbor.encode([t, 5, {}]))
    expect_rejected(MALFORMED, han.decode_message, b"\xff")
