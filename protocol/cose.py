# COSE_Sign1 (RFC 9052 §4) with EdDSA/Ed25519 only, as SPEC.md §2 pins it.
from . import cbor
from .errors import Rejected, MALFORMED, BAD_HEADER
from hashlib import sha256

TAG_SIGN1 = 18
ALG_EDDSA = -8
HDR_ALG = 1
HDR_KID = 4
KID_LEN = 8


def kid_for(public_key):
    """Key id: the first 8 bytes of SHA-256 of the 32-byte Ed25519 public key."""
    return sha256(bytes(public_key)).digest()[:KID_LEN]


def protected_header(kid):
    return cbor.encode({HDR_ALG: ALG_EDDSA, HDR_KID: bytes(kid)})


def sig_structure(protected, payload, aad=b""):
    # External AAD is empty for vouchers and receipts (SPEC.md §2); other signed messages
    # name themselves in it, so that no signature can be taken for another kind's
    # (SPEC.md §5.1). `protected` is the header bytes as received.
    return cbor.encode(["Signature1", protected, aad, payload])


def encode(kid, payload, sign, aad=b""):
    """Build a tagged COSE_Sign1. `sign(message) -> 64-byte signature` is the key."""
    protected = protected_header(kid)
    signature = sign(sig_structure(protected, payload, aad))
    return cbor.encode(cbor.Tag(TAG_SIGN1, [protected, {}, payload, signature]))


class Sign1:
    """A structurally valid COSE_Sign1 whose header passed the v1 rules; not yet verified."""

    def __init__(self, protected, kid, payload, signature, tagged):
        self.protected = protected
        self.kid = kid
        self.payload = payload
        self.signature = signature
        self.tagged = tagged

    def to_be_signed(self, aad=b""):
        return sig_structure(self.protected, self.payload, aad)

    def verify(self, public_key, verify_sig, aad=b""):
        return verify_sig(public_key, self.to_be_signed(aad), self.signature)


def decode(data):
    """Checks 1 and 2 of SPEC.md §2.1: MALFORMED for structure, BAD_HEADER for headers."""
    tagged, msg = cbor.decode_tagged(data, TAG_SIGN1)
    if not isinstance(msg, list) or len(msg) != 4:
        raise Rejected(MALFORMED, "COSE_Sign1 must be an array of 4")
    protected, unprotected, payload, signature = msg
    if not isinstance(protected, bytes) or not isinstance(unprotected, dict):
        raise Rejected(MALFORMED, "COSE_Sign1 headers have the wrong types")
    if not isinstance(payload, bytes):
        raise Rejected(MALFORMED, "COSE_Sign1 payload must be a byte string")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise Rejected(MALFORMED, "COSE_Sign1 signature must be 64 bytes")
    header = cbor.decode(protected)
    if not isinstance(header, dict):
        raise Rejected(MALFORMED, "protected header is not a map")
    if unprotected:
        raise Rejected(BAD_HEADER, "unprotected header must be empty")
    if len(header) != 2 or header.get(HDR_ALG) != ALG_EDDSA:
        raise Rejected(BAD_HEADER, "protected header must be exactly {alg: EdDSA (-8), kid}")
    kid = header.get(HDR_KID)
    if not isinstance(kid, bytes) or len(kid) != KID_LEN:
        raise Rejected(BAD_HEADER, "kid must be an 8-byte byte string")
    return Sign1(protected, kid, payload, signature, tagged)
