# Base45 (RFC 9285): the RFC's examples, and malformed text refused.
from protocol import base45
from protocol.errors import MALFORMED
from tests.protocol._support import expect_rejected

RFC_EXAMPLES = [
    (b"AB", "BB8"),
    (b"Hello!!", "%69 VD92EX0"),
    (b"base-45", "UJCLQE7W581"),
    (b"ietf!", "QED8WEX0"),
    (b"", ""),
    (b"\x00", "00"),
    (b"\xff\xff", "FGW"),
]


def test_rfc_9285_examples():
    for raw, text in RFC_EXAMPLES:
        assert base45.encode(raw) == text
        assert base45.decode(text) == raw


def test_round_trip_all_byte_values():
    data = bytes(range(256)) + bytes(reversed(range(256)))
    for n in (0, 1, 2, 3, 255, 511, 512):
        assert base45.decode(base45.encode(data[:n])) == data[:n]


def test_malformed_text_is_refused():
    expect_rejected(MALFORMED, base45.decode, "GGW")   # 65536: triple out of range
    expect_rejected(MALFORMED, base45.decode, "::")    # pair 2024 > 255
    expect_rejected(MALFORMED, base45.decode, "BB8A")  # dangling character
    expect_rejected(MALFORMED, base45.decode, "bb8")   # lower case is not base45
    expect_rejected(MALFORMED, base45.decode, "BB#")   # outside the alphabet
