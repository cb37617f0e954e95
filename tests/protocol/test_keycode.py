# Keypad code v1 and its primitives (SPEC.md §8), on both VMs: X25519 (RFC 7748 vectors),
# HMAC-SHA-256 (RFC 4231), HKDF (RFC 5869), the Damm check digit, the code's fields, MAC and
# sequence rebuild. (The PyNaCl differential for X25519 is tests/test_x25519_differential.py.)
import binascii

from protocol import errors, keycode, x25519
from tests.protocol._support import expect_rejected

H = binascii.unhexlify
DEVICE = b"\x70\xb3\xd5\xf0\x00\x00\x00\xa1"
KEY = bytes(range(32))


def test_rfc7748_section_5_2_vectors():
    k = H("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = H("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert x25519.x25519(k, u) == H("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")
    k = H("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d")
    u = H("e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493")
    assert x25519.x25519(k, u) == H("95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957")


def test_rfc7748_iterated_once():
    k = u = x25519.BASE
    k, u = x25519.x25519(k, u), k
    assert k == H("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")


def test_rfc7748_section_6_1_diffie_hellman():
    a = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    pa, pb = x25519.public_key(a), x25519.public_key(b)
    assert pa == H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert pb == H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert x25519.x25519(a, pb) == shared == x25519.x25519(b, pa)


def test_small_order_points_give_no_secret():
    for u in (bytes(32), b"\x01" + bytes(31)):
        try:
            x25519.x25519(bytes(range(32)), u)
        except ValueError:
            continue
        raise AssertionError("zero shared secret accepted")


def test_hmac_sha256_rfc4231_case_2_and_hkdf_rfc5869_case_1():
    assert keycode.hmac_sha256(b"Jefe", b"what do ya want for nothing?") == \
        H("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    ikm = b"\x0b" * 22
    okm = keycode.hkdf_sha256(ikm, H("000102030405060708090a0b0c"), H("f0f1f2f3f4f5f6f7f8f9"), 32)
    assert okm == H("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf")


def test_damm_known_value_and_every_single_error_and_adjacent_swap():
    assert keycode.damm("5724") == 0 and keycode.damm("572") == 4
    code = keycode.encode(KEY, DEVICE, 1050, 77)
    assert len(code) == 20 and keycode.damm(code) == 0
    for i in range(20):
        for d in "0123456789":
            if d != code[i]:
                typo = code[:i] + d + code[i + 1:]
                expect_rejected(errors.CODE_TYPO, keycode.parse, typo)
        if i < 19 and code[i] != code[i + 1]:
            swap = code[:i] + code[i + 1] + code[i] + code[i + 2:]
            expect_rejected(errors.CODE_TYPO, keycode.parse, swap)


def test_round_trip_with_the_fields_and_the_grouping():
    code = keycode.encode(KEY, DEVICE, 2500, 123456)
    shown = keycode.grouped(code)
    assert len(shown) == 24 and shown.count(" ") == 4
    for typed in (code, shown, "-".join(shown.split(" ")), " %s \n" % shown):
        c = keycode.verify(typed, KEY, DEVICE, 123400)
        assert (c.kind, c.amount, c.sequence, c.digits) == (0, 2500, 123456, code)
        assert c.ref == keycode.reference(code) and len(c.ref) == 16


def test_the_wrong_meter_or_key_is_a_wrong_code():
    code = keycode.encode(KEY, DEVICE, 100, 5)
    expect_rejected(errors.CODE_WRONG, keycode.verify, code, KEY, b"\x70\xb3\xd5\xf0\x00\x00\x00\xa2", 0)
    expect_rejected(errors.CODE_WRONG, keycode.verify, code, bytes(32), DEVICE, 0)


def test_form_errors_do_not_reach_the_mac():
    for text in ("1234", "1" * 21, "1234 5678 9012 3456 789x", "", "١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦٧٨٩٠"):
        expect_rejected(errors.CODE_INCOMPLETE, keycode.parse, text)
    expect_rejected(errors.CODE_INCOMPLETE, keycode.parse, None)


def test_the_sequence_is_rebuilt_from_its_low_bits_and_the_window():
    span = keycode.SEQ_SPAN
    # near the start, inside and above the window, and across a wrap of the low bits
    for highest, seq in ((0, 1), (0, 5), (10, 3), (1000, 940), (1000, 1000 + span - 100),
                         (span + 50, span + 10), (span - 10, span + 7), (3 * span, 3 * span - 64)):
        code = keycode.encode(KEY, DEVICE, 1, seq)
        assert keycode.verify(code, KEY, DEVICE, highest).sequence == seq, (highest, seq)
    # a code below the window (by less than 2^14) is still recognised, so the meter can
    # answer STALE, not WRONG
    code = keycode.encode(KEY, DEVICE, 1, 100)
    assert keycode.verify(code, KEY, DEVICE, 100 + 600).sequence == 100
    assert keycode.candidates(5, 0) == [5, 5 + span]


def test_amount_range_and_derived_keys():
    for amount in (0, keycode.MAX_AMOUNT + 1):
        try:
            keycode.encode(KEY, DEVICE, amount, 1)
        except ValueError:
            continue
        raise AssertionError(amount)
    keycode.encode(KEY, DEVICE, keycode.MAX_AMOUNT, 0xFFFFFFFF)
    supplier, meter = bytes(range(1, 33)), bytes(range(41, 73))
    sp, mp = x25519.public_key(supplier), x25519.public_key(meter)
    k1 = keycode.derive_key(x25519.x25519(supplier, mp), DEVICE, sp, mp)
    k2 = keycode.derive_key(x25519.x25519(meter, sp), DEVICE, sp, mp)
    assert k1 == k2 and len(k1) == 32
    assert keycode.derive_key(x25519.x25519(supplier, mp), b"\x00" * 8, sp, mp) != k1
