"""X25519 (protocol/x25519.py) against libsodium (PyNaCl's crypto_scalarmult) on random
scalars and u-coordinates, small-order points included, and RFC 7748's 1,000-iteration
vector (CPython; the RFC vectors run on both VMs in tests/protocol/test_keycode.py)."""
import nacl.bindings
import nacl.exceptions
from hypothesis import given, settings, strategies as st

from protocol import x25519
from tests.soak import examples

# u-coordinates of small order (libsodium's blocklist) and their non-canonical spellings
SMALL = [bytes(32), b"\x01" + bytes(31),
         bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
         bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
         bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
         bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
         bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")]


def _sodium(k, u):
    try:
        return nacl.bindings.crypto_scalarmult(k, u)
    except nacl.exceptions.RuntimeError:
        return None


def _ours(k, u):
    try:
        return x25519.x25519(k, u)
    except ValueError:
        return None


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(min_size=32, max_size=32), st.one_of(st.binary(min_size=32, max_size=32), st.sampled_from(SMALL)))
def test_agrees_with_libsodium(k, u):
    assert _ours(k, u) == _sodium(k, u)


def test_rfc7748_after_1000_iterations():
    k = u = x25519.BASE
    for _ in range(1000):
        k, u = x25519.x25519(k, u), k
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"
