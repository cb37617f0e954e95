"""CPython-only differential tests: protocol.ed25519 against libsodium (PyNaCl)."""
import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from protocol import ed25519
from tests.soak import examples

L = ed25519.L
P = ed25519.P


def nacl_verify(pk, msg, sig):
    try:
        VerifyKey(pk).verify(msg, sig)
        return True
    except BadSignatureError:
        return False


SETTINGS = settings(max_examples=examples(150), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=300))
def test_sign_and_public_key_equal_pynacl(seed, msg):
    sk = SigningKey(seed)
    assert ed25519.public_key(seed) == bytes(sk.verify_key)
    sig = ed25519.sign(seed, msg)
    assert sig == sk.sign(msg).signature
    assert ed25519.verify(bytes(sk.verify_key), msg, sig) is True


@SETTINGS
@given(seed=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=200),
       bit=st.integers(0, 511))
def test_flipped_signature_bit_agrees(seed, msg, bit):
    sk = SigningKey(seed)
    pk = bytes(sk.verify_key)
    sig = bytearray(sk.sign(msg).signature)
    sig[bit // 8] ^= 1 << (bit % 8)
    assert ed25519.verify(pk, msg, bytes(sig)) == nacl_verify(pk, msg, bytes(sig))


@SETTINGS
@given(seed=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=200),
       bit=st.integers(0, 255))
def test_flipped_key_bit_agrees(seed, msg, bit):
    sk = SigningKey(seed)
    pk = bytearray(bytes(sk.verify_key))
    pk[bit // 8] ^= 1 << (bit % 8)
    sig = sk.sign(msg).signature
    assert ed25519.verify(bytes(pk), msg, sig) == nacl_verify(bytes(pk), msg, sig)


@SETTINGS
@given(pk=st.binary(min_size=32, max_size=32), r=st.binary(min_size=32, max_size=32),
       s=st.integers(0, 2**256 - 1), msg=st.binary(max_size=64))
def test_random_inputs_agree(pk, r, s, msg):
    sig = r + s.to_bytes(32, "little")
    assert ed25519.verify(pk, msg, sig) == nacl_verify(pk, msg, sig)


@SETTINGS
@given(seed=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=100),
       delta=st.integers(-3, 3), mult=st.integers(0, 15))
def test_s_around_l_agrees(seed, msg, delta, mult):
    sk = SigningKey(seed)
    pk = bytes(sk.verify_key)
    sig = sk.sign(msg).signature
    s = int.from_bytes(sig[32:], "little") + mult * L + delta
    if not 0 <= s < 2**256:
        return
    bad = sig[:32] + s.to_bytes(32, "little")
    assert ed25519.verify(pk, msg, bad) == nacl_verify(pk, msg, bad)


@SETTINGS
@given(seed=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=100),
       rnd=st.binary(min_size=32, max_size=32), which=st.sampled_from(["R", "A"]))
def test_random_r_or_a_with_valid_rest_agrees(seed, msg, rnd, which):
    sk = SigningKey(seed)
    pk = bytes(sk.verify_key)
    sig = sk.sign(msg).signature
    if which == "R":
        sig = rnd + sig[32:]
    else:
        pk = rnd
    assert ed25519.verify(pk, msg, sig) == nacl_verify(pk, msg, sig)


def test_many_random_valid_signatures():
    rng = random.Random(8032)
    for i in range(300):
        seed = rng.randbytes(32)
        msg = rng.randbytes(rng.randrange(0, 200))
        sk = SigningKey(seed)
        sig = sk.sign(msg).signature
        assert ed25519.verify(bytes(sk.verify_key), msg, sig)


def test_pure_sha512_path_gives_same_signatures(monkeypatch):
    from protocol import sha512 as sha_mod
    monkeypatch.setattr(ed25519, "sha512", sha_mod.sha512_pure)
    seed = os.urandom(32)
    msg = os.urandom(100)
    sk = SigningKey(seed)
    assert ed25519.sign(seed, msg) == sk.sign(msg).signature
    assert ed25519.verify(bytes(sk.verify_key), msg, sk.sign(msg).signature)


def test_sign_with_cached_and_alternating_seeds_equals_pynacl():
    # the one-entry signing-key cache: same seed repeatedly, then seeds alternating,
    # and the verify-side two-entry key cache with three keys rotating
    rng = random.Random(25519)
    seeds = [rng.randbytes(32) for _ in range(3)]
    keys = [SigningKey(s) for s in seeds]
    order = [0, 0, 0, 1, 0, 1, 2, 2, 0, 1, 2, 1, 0]
    for n, i in enumerate(order * 3):
        msg = rng.randbytes(rng.randrange(0, 300))
        sig = ed25519.sign(seeds[i], msg)
        assert sig == keys[i].sign(msg).signature
        assert ed25519.public_key(seeds[i]) == bytes(keys[i].verify_key)
        pk = bytes(keys[(i + n) % 3].verify_key)
        assert ed25519.verify(pk, msg, sig) == nacl_verify(pk, msg, sig)
