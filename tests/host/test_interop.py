# A voucher issued by `topup` checked by independent implementations: pycose verifies the
# COSE_Sign1 with an OKP Ed25519 key, and cbor2 decodes it in canonical mode to the same
# bytes.
import cbor2
import pytest
from pycose.algorithms import EdDSA
from pycose.headers import KID, Algorithm
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import Sign1Message

from protocol import voucher as pv

from .conftest import DEVICE, DEVICE_BYTES


def pycose_decode(raw):
    """Sign1Message.decode(raw), working around pycose 1.1 with cbor2 >= 6.

    cbor2 6 decodes the tagged array as a tuple and its empty map as a frozendict, and
    pycose 1.1 insists on list and dict ("Bytes cannot be decoded as COSE message",
    "unprotected header should be of type 'dict'"). Only those two containers are
    converted; header parsing, the Sig_structure and EdDSA verification are pycose's own.
    """
    obj = cbor2.loads(raw)
    assert isinstance(obj, cbor2.CBORTag) and obj.tag == Sign1Message.cbor_tag
    protected, unprotected, payload, signature = obj.value
    return Sign1Message.from_cose_obj([protected, dict(unprotected), payload, signature], True)


@pytest.fixture
def issued(store):
    lines = store.ok("issue", DEVICE, "12.34", "-n", "3", "--expires-in", "10").stdout.splitlines()
    pub = bytes.fromhex(store.ok("key", "list").stdout.splitlines()[1].split()[4])
    return [pv.from_text(t) for t in lines], pub


def test_pycose_verifies_topup_vouchers(issued):
    raws, pub = issued
    for raw in raws:
        msg = pycose_decode(raw)
        msg.key = OKPKey(crv=Ed25519, x=pub)
        assert msg.verify_signature()
        assert msg.phdr[KID] == pv.parse(raw).kid
        assert msg.phdr[Algorithm] is EdDSA
        tampered = bytearray(raw)
        tampered[-5] ^= 0x40
        bad = pycose_decode(bytes(tampered))
        bad.key = OKPKey(crv=Ed25519, x=pub)
        assert not bad.verify_signature()


def test_cbor2_canonical_round_trip(issued):
    raws, _ = issued
    for raw in raws:
        obj = cbor2.loads(raw)
        assert isinstance(obj, cbor2.CBORTag) and obj.tag == 18
        assert cbor2.dumps(obj, canonical=True) == raw
        protected, unprotected, payload, sig = obj.value
        assert cbor2.dumps(cbor2.loads(protected), canonical=True) == protected
        fields = cbor2.loads(payload)
        assert cbor2.dumps(fields, canonical=True) == payload
        assert fields[1] == DEVICE_BYTES and fields[3] == 1234
        assert fields[5] - fields[4] == 10 * 86400
        assert unprotected == {} and len(sig) == 64
