# Deterministic CBOR (SPEC.md §1): encodings from RFC 8949 Appendix A, and every refusal.
from protocol import cbor
from protocol.errors import MALFORMED
from tests.protocol._support import unhex, expect_rejected

# (value, hex) pairs from RFC 8949 Appendix A that fall inside our subset.
KNOWN = [
    (0, "00"), (1, "01"), (10, "0a"), (23, "17"), (24, "1818"), (25, "1819"),
    (100, "1864"), (1000, "1903e8"), (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"), (18446744073709551615, "1bffffffffffffffff"),
    (-1, "20"), (-10, "29"), (-100, "3863"), (-1000, "3903e7"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (False, "f4"), (True, "f5"), (None, "f6"),
    (b"", "40"), (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"), ("a", "6161"), ("IETF", "6449455446"), ("\u00fc", "62c3bc"),
    ([], "80"), ([1, 2, 3], "83010203"), ([1, [2, 3], [4, 5]], "8301820203820405"),
    ({}, "a0"), ({1: 2, 3: 4}, "a201020304"), ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
]


def test_known_encodings_round_trip():
    for value, hx in KNOWN:
        raw = unhex(hx)
        assert cbor.encode(value) == raw, hx
        assert cbor.decode(raw) == value, hx


def test_encoder_sorts_map_keys_bytewise():
    assert cbor.encode({3: 0, 1: 0, 2: 0}) == unhex("a3010002000300")
    # -1 (0x20) sorts after 24 (0x1818) in bytewise order of the encodings.
    assert cbor.encode({-1: 0, 24: 0}) == unhex("a2181800" + "2000")


def test_tag_only_where_asked():
    raw = unhex("d28100")  # 18([0])
    expect_rejected(MALFORMED, cbor.decode, raw)
    assert cbor.decode_tagged(raw, 18) == (True, [0])
    assert cbor.decode_tagged(unhex("8100"), 18) == (False, [0])
    expect_rejected(MALFORMED, cbor.decode_tagged, unhex("d18100"), 18)  # tag 17
    expect_rejected(MALFORMED, cbor.decode_tagged, unhex("d2d28100"), 18)  # nested tag


REFUSED = [
    ("", "empty input"),
    ("1817", "non-shortest 1-byte argument"),
    ("190017", "non-shortest 2-byte argument"),
    ("1a0000ffff", "non-shortest 4-byte argument"),
    ("1b00000000ffffffff", "non-shortest 8-byte argument"),
    ("3817", "non-shortest negative"),
    ("5801ff", "non-shortest byte-string length"),
    ("1c", "reserved additional info 28"),
    ("1f", "integer with indefinite marker"),
    ("5fff", "indefinite byte string"),
    ("9fff", "indefinite array"),
    ("bfff", "indefinite map"),
    ("f93c00", "half float"),
    ("fa3f800000", "single float"),
    ("fb3ff0000000000000", "double float"),
    ("f7", "undefined"),
    ("f0", "simple value 16"),
    ("f820", "simple value 32"),
    ("c100", "tag 1"),
    ("a2020001 00", "unsorted map keys"),
    ("a201000100", "duplicate map keys"),
    ("a1f500", "boolean map key"),
    ("a14100 00", "byte-string map key"),
    ("0000", "trailing bytes"),
    ("8301", "truncated array"),
    ("44010203", "truncated byte string"),
    ("19 01", "truncated argument"),
    ("62c328", "invalid UTF-8"),
    ("63eda080", "UTF-8 surrogate"),
    ("9b00000000ffffffff", "array count larger than the input"),
    ("bb00000000ffffffff", "map count larger than the input"),
    ("818181818181818181818100", "nesting deeper than 8"),
]


def test_every_non_deterministic_form_is_refused():
    for hx, why in REFUSED:
        e = expect_rejected(MALFORMED, cbor.decode, unhex(hx.replace(" ", "")))
        assert "CBOR" in str(e), why


def test_depth_limit_is_exactly_eight():
    ok = unhex("81" * 8 + "00")
    assert cbor.decode(ok) == [[[[[[[[0]]]]]]]]
    expect_rejected(MALFORMED, cbor.decode, unhex("81" * 9 + "00"))


def test_non_bytes_input_is_refused():
    expect_rejected(MALFORMED, cbor.decode, "a0")
    expect_rejected(MALFORMED, cbor.decode, None)


def test_encoder_refuses_what_it_cannot_encode_deterministically():
    for bad in (1.5, {1.5: 0}, {(1,): 0}, 1 << 64, -(1 << 64) - 1, object()):
        try:
            cbor.encode(bad)
        except ValueError:
            continue
        raise AssertionError("encoded %r" % (bad,))


def test_utf8_validation_matches_rfc_3629():
    for hx in ("", "61", "c3bc", "e282ac", "ed9fbf", "ee8080", "f09f9880", "f48fbfbf"):
        raw = unhex(hx)
        assert cbor.decode(bytes([0x60 + len(raw)]) + raw).encode("utf-8") == raw
    for hx in ("c0af", "e080af", "f08080af", "eda080", "edbfbf", "f4908080", "f5808080",
               "80", "c3", "e282", "ff"):
        body = unhex(hx)
        raw = bytes([0x60 + len(body)]) + body
        expect_rejected(MALFORMED, cbor.decode, raw)
