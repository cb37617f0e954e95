"""Hypothesis fuzzing of every protocol decoder (CPython; MicroPython replays the fixed
corpus in tests/protocol/test_vectors.py). A decoder may return a result or raise the
codec's own Rejected, never anything else."""
import json
import os

import cbor2
from tests.soak import examples
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol import base45, cbor, cose, errors, han, receipt, voucher
from tests import oracle

VECTORS = os.path.join(os.path.dirname(__file__), "..", "protocol", "vectors")
with open(os.path.join(VECTORS, "vouchers.json")) as f:
    VOUCHERS = json.load(f)
with open(os.path.join(VECTORS, "receipts.json")) as f:
    RECEIPTS = json.load(f)
TRUSTED = {bytes.fromhex(k): bytes.fromhex(v) for k, v in VOUCHERS["context"]["trusted"].items()}
DEVICE = bytes.fromhex(VOUCHERS["context"]["device"])
METER_KEYS = {bytes.fromhex(RECEIPTS["meter_kid"]): bytes.fromhex(RECEIPTS["meter_public"])}
SEEDS = ([bytes.fromhex(v["hex"]) for v in VOUCHERS["valid"]]
         + [bytes.fromhex(v["hex"]) for v in VOUCHERS["invalid"]]
         + [bytes.fromhex(r["hex"]) for r in RECEIPTS["chain"]])


def _nacl_verify(public, msg, sig):
    import nacl.signing
    try:
        nacl.signing.VerifyKey(public).verify(msg, sig)
        return True
    except Exception:
        return False


DECODERS = [
    cbor.decode,
    lambda b: cbor.decode_tagged(b, 18),
    cose.decode,
    voucher.parse,
    lambda b: voucher.verify(b, TRUSTED, DEVICE, 1790000000, 10000, verify_sig=_nacl_verify),
    lambda b: voucher.verify(b, TRUSTED, DEVICE, 1790000000, 10000),  # pure-Python Ed25519
    receipt.parse,
    lambda b: receipt.verify(b, METER_KEYS, verify_sig=_nacl_verify),
    han.decode_frame,
    han.decode_message,
    han.cobs_decode,
    lambda b: han.Deframer().feed(b),
    lambda b: base45.decode(b.decode("latin-1")),
    lambda b: voucher.from_text(b.decode("latin-1")),
]


def only_rejected(data):
    for decode in DECODERS:
        try:
            decode(data)
        except errors.Rejected as e:
            assert e.reason in errors.NAMES
            assert str(e)


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == 2 and data:
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


FUZZ = settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_rejected(data):
    only_rejected(data)


@FUZZ
@given(mutated())
def test_mutated_vouchers_and_receipts_only_ever_rejected(data):
    only_rejected(data)


@FUZZ
@given(mutated())
def test_pure_python_verifier_agrees_with_libsodium_on_mutations(data):
    def verdict(**kw):
        try:
            voucher.verify(data, TRUSTED, DEVICE, 1790000000, 10000, **kw)
            return "OK"
        except errors.Rejected as e:
            return errors.name(e.reason)
    assert verdict() == verdict(verify_sig=_nacl_verify)


def _code_verdict(data):
    try:
        voucher.verify(data, TRUSTED, DEVICE, 1790000000, 10000)
        return "OK"
    except errors.Rejected as e:
        return errors.name(e.reason)


@FUZZ
@given(mutated())
def test_verifier_agrees_with_the_independent_oracle_on_mutations(data):
    # tests/oracle.py states SPEC §1-§2.1 again, on PyNaCl, importing nothing from protocol/
    assert _code_verdict(data) == oracle.voucher_verdict(data, TRUSTED, DEVICE, 1790000000, 10000)


@FUZZ
@given(st.binary(max_size=160))
def test_verifier_agrees_with_the_independent_oracle_on_random_bytes(data):
    assert _code_verdict(data) == oracle.voucher_verdict(data, TRUSTED, DEVICE, 1790000000, 10000)


def test_oracle_and_verifier_agree_on_every_vector():
    for v in VOUCHERS["valid"] + VOUCHERS["invalid"]:
        raw = bytes.fromhex(v["hex"])
        assert _code_verdict(raw) == oracle.voucher_verdict(raw, TRUSTED, DEVICE, 1790000000, 10000), v


# Values inside the deterministic subset; map keys kept to one-byte encodings so that
# cbor2's canonical order (length first) and RFC 8949 §4.2.1 (bytewise) coincide.
leaf = (st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=20)
        | st.booleans() | st.none())
values = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.integers(-24, 23), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=examples(300), deadline=None)
@given(values)
def test_encoding_is_cbor2_canonical_and_round_trips(value):
    raw = cbor.encode(value)
    assert raw == cbor2.dumps(value, canonical=True)
    assert cbor.decode(raw) == value
    assert cbor2.loads(raw) == value


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(min_size=1, max_size=han.MAX_FRAME - 4))
def test_frames_round_trip(body):
    frame = han.encode_frame(body)
    assert frame.count(0) == 1 and frame.endswith(b"\x00")
    assert han.Deframer().feed(frame) == [body]


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=200))
def test_base45_round_trips(data):
    assert base45.decode(base45.encode(data)) == data
