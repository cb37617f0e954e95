# Runs on CPython (pytest) and on MicroPython (tools/mpy_test.mjs): plain asserts only.
import json

from protocol import ed25519

_DATA = __file__.rsplit("/", 1)[0] + "/data/ed25519_edge.json"


def _h(s):
    return bytes.fromhex(s)


# RFC 8032 section 7.1, tests 1-3: (secret seed, public key, message, signature)
RFC8032 = (
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
     "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
     "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
     "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
)


def test_rfc8032_public_keys():
    for seed, pk, _, _ in RFC8032:
        assert ed25519.public_key(_h(seed)) == _h(pk)


def test_rfc8032_signatures():
    for seed, _, msg, sig in RFC8032:
        assert ed25519.sign(_h(seed), _h(msg)) == _h(sig)


def test_rfc8032_verify():
    for _, pk, msg, sig in RFC8032:
        assert ed25519.verify(_h(pk), _h(msg), _h(sig)) is True
        assert ed25519.verify(_h(pk), _h(msg) + b"\x00", _h(sig)) is False


def test_edge_cases_match_libsodium():
    with open(_DATA) as f:
        cases = json.load(f)["cases"]
    assert len(cases) > 100
    wrong = []
    for c in cases:
        got = ed25519.verify(_h(c["pk"]), _h(c["msg"]), _h(c["sig"]))
        if got is not c["libsodium"]:
            wrong.append(c["name"])
    assert not wrong, wrong


def test_edge_cases_cover_the_named_classes():
    with open(_DATA) as f:
        names = [c["name"] for c in json.load(f)["cases"]]
    joined = "\n".join(names)
    for needle in ("S = L\n", "S = L + 1", "S = 2^253", "non-canonical", "A = torsion",
                   "R = torsion", "not on curve", "wrong message", "flipped",
                   "cofactored-only holds"):
        assert needle in joined + "\n", needle


def test_bad_inputs_return_false_never_raise():
    seed, pk, msg, sig = RFC8032[1]
    pk = _h(pk)
    sig = _h(sig)
    msg = _h(msg)
    for args in ((pk[:31], msg, sig), (pk + b"\x00", msg, sig), (pk, msg, sig[:63]),
                 (pk, msg, sig + b"\x00"), (b"", msg, b""), (None, msg, sig),
                 (pk, None, sig), (pk, msg, None), ("x" * 32, msg, sig),
                 (pk, "r", sig), (pk, msg, "s" * 64), (12, 34, 56)):
        assert ed25519.verify(*args) is False
    # bytearray / memoryview inputs are accepted like bytes
    assert ed25519.verify(bytearray(pk), bytearray(msg), bytearray(sig)) is True
    assert ed25519.verify(memoryview(pk), memoryview(msg), memoryview(sig)) is True


def test_sign_verify_round_trip_and_tamper():
    for i in range(4):
        seed = bytes((i * 37 + j * 11) & 0xFF for j in range(32))
        msg = bytes((i + j) & 0xFF for j in range(i * 40))
        pk = ed25519.public_key(seed)
        sig = ed25519.sign(seed, msg)
        assert ed25519.verify(pk, msg, sig)
        for pos in (0, 31, 32, 63):
            bad = bytearray(sig)
            bad[pos] ^= 0x01
            assert not ed25519.verify(pk, msg, bytes(bad))


def test_key_cache_does_not_confuse_keys():
    s1 = bytes(32)
    s2 = bytes([1] * 32)
    p1 = ed25519.public_key(s1)
    p2 = ed25519.public_key(s2)
    sig1 = ed25519.sign(s1, b"m")
    for _ in range(2):
        assert ed25519.verify(p1, b"m", sig1)
        assert not ed25519.verify(p2, b"m", sig1)


def test_field_inverse():
    p = ed25519.P
    for z in (1, 2, 19, p - 1, p + 1, 2 ** 255 - 1, 2 ** 256 - 1, ed25519.D,
              ed25519.SQRT_M1, ed25519.BX, ed25519.BY, 0x1234567890ABCDEF << 180):
        assert ed25519._inv(z) * z % p == 1, z
    assert ed25519._inv(0) == 0 and ed25519._inv(p) == 0


def _double_and_add(n):
    acc = (0, 1, 1, 0)
    q = (ed25519.BX, ed25519.BY, 1, ed25519.BX * ed25519.BY % ed25519.P)
    while n:
        if n & 1:
            acc = ed25519._add(acc, q)
        q = ed25519._add(q, q)
        n >>= 1
    return ed25519._encode(acc[0], acc[1], acc[2])


def test_fixed_base_tables_match_double_and_add():
    # scalars at and around the 64-bit piece boundaries, the top of the clamped range,
    # L and its neighbours, and a few dense and sparse patterns
    L = ed25519.L
    for n in (0, 1, 2, 63, (1 << 64) - 1, 1 << 64, (1 << 128) + 1, (1 << 192) - 1,
              1 << 192, (1 << 255) - 8, (1 << 254) | 0x5555, L - 1, L, L + 1,
              int("a5" * 32, 16) >> 3, int("0f" * 31, 16)):
        X, Y, Z = ed25519._scalarmult_base(n)
        assert ed25519._encode(X, Y, Z) == _double_and_add(n), hex(n)


def test_sign_cache_follows_the_seed():
    s1 = bytes(range(32))
    s2 = bytes(range(1, 33))
    sig1 = ed25519.sign(s1, b"receipt")
    sig2 = ed25519.sign(s2, b"receipt")
    assert ed25519.sign(s1, b"receipt") == sig1 and sig1 != sig2
    assert ed25519.verify(ed25519.public_key(s1), b"receipt", sig1)
    assert ed25519.verify(ed25519.public_key(s2), b"receipt", sig2)
    assert not ed25519.verify(ed25519.public_key(s2), b"receipt", sig1)
    # a bytearray seed equal to a cached bytes seed gives the same signature
    assert ed25519.sign(bytearray(s2), b"receipt") == sig2


def test_key_cache_with_three_keys_rotating():
    seeds = [bytes([i]) * 32 for i in (3, 4, 5)]
    pks = [ed25519.public_key(s) for s in seeds]
    sigs = [ed25519.sign(s, b"voucher") for s in seeds]
    for rnd in range(2):
        for i in (0, 1, 0, 2, 2, 1, 0):
            assert ed25519.verify(pks[i], b"voucher", sigs[i])
            assert not ed25519.verify(pks[i], b"voucher", sigs[(i + 1) % 3])
