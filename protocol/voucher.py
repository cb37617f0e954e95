# Voucher v1 (SPEC.md §2): codec, the stateless verification rules 1-8, and the text form.
from . import base45, cbor, cose
from .errors import (Rejected, MALFORMED, UNKNOWN_KEY, BAD_SIGNATURE, WRONG_DEVICE,
                     OVER_VOUCHER_LIMIT, EXPIRED)
from hashlib import sha256

TEXT_PREFIX = "OTU1:"
DEVICE_LEN = 8
MAX_SEQUENCE = 0xFFFFFFFF
MAX_AMOUNT = 1000000  # pence: the protocol's hard ceiling (£10,000)
REF_LEN = 16

K_DEVICE = 1
K_SEQUENCE = 2
K_AMOUNT = 3
K_ISSUED = 4
K_EXPIRES = 5
_REQUIRED = (K_DEVICE, K_SEQUENCE, K_AMOUNT, K_ISSUED)


class Voucher:
    """A decoded voucher. `raw` is the bytes as received; `ref` its reference (§2.2)."""

    def __init__(self, device, sequence, amount, issued, expires, kid, raw):
        self.device = device
        self.sequence = sequence
        self.amount = amount
        self.issued = issued
        self.expires = expires
        self.kid = kid
        self.raw = raw
        self.ref = reference(raw)


def reference(raw):
    # SHA-256, not SHA-512: every MicroPython port has it in C (SPEC.md §2.2).
    return sha256(bytes(raw)).digest()[:REF_LEN]


def _uint(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_fields(device, sequence, amount, issued, expires):
    """Payload table rules; raise Rejected(MALFORMED) naming the field that breaks one."""
    if not isinstance(device, bytes) or len(device) != DEVICE_LEN:
        raise Rejected(MALFORMED, "device must be an 8-byte EUI-64")
    if not _uint(sequence) or not 1 <= sequence <= MAX_SEQUENCE:
        raise Rejected(MALFORMED, "sequence must be 1..%d" % MAX_SEQUENCE)
    if not _uint(amount) or not 1 <= amount <= MAX_AMOUNT:
        raise Rejected(MALFORMED, "amount must be 1..%d pence" % MAX_AMOUNT)
    if not _uint(issued) or issued > 0xFFFFFFFFFFFF:
        raise Rejected(MALFORMED, "issued must be Unix seconds")
    if expires is not None and (not _uint(expires) or expires <= issued or expires > 0xFFFFFFFFFFFF):
        raise Rejected(MALFORMED, "expires must be Unix seconds after issued")


def encode_payload(device, sequence, amount, issued, expires=None):
    check_fields(device, sequence, amount, issued, expires)
    fields = {K_DEVICE: device, K_SEQUENCE: sequence, K_AMOUNT: amount, K_ISSUED: issued}
    if expires is not None:
        fields[K_EXPIRES] = expires
    return cbor.encode(fields)


def encode(kid, sign, device, sequence, amount, issued, expires=None):
    """A signed voucher (tagged COSE_Sign1 bytes). `sign(msg) -> signature`."""
    return cose.encode(kid, encode_payload(device, sequence, amount, issued, expires), sign)


def decode_payload(payload):
    fields = cbor.decode(payload)
    if not isinstance(fields, dict):
        raise Rejected(MALFORMED, "payload is not a map")
    for key in fields:
        if key not in _REQUIRED and key != K_EXPIRES:
            raise Rejected(MALFORMED, "unknown payload field %r" % (key,))
    for key in _REQUIRED:
        if key not in fields:
            raise Rejected(MALFORMED, "payload field %d missing" % key)
    # A present `expires` must be a uint: `null` is not "no expiry" (SPEC.md §2).
    if K_EXPIRES in fields and not _uint(fields[K_EXPIRES]):
        raise Rejected(MALFORMED, "expires must be Unix seconds after issued")
    values = (fields[K_DEVICE], fields[K_SEQUENCE], fields[K_AMOUNT], fields[K_ISSUED],
              fields.get(K_EXPIRES))
    check_fields(*values)
    return values


def parse(data):
    """Decode without checking the signature (for display). Checks 1, 2 and 5."""
    msg = cose.decode(data)
    return Voucher(*decode_payload(msg.payload), kid=msg.kid, raw=bytes(data))


def verify(data, trusted, device=None, now=None, max_amount=None, verify_sig=None):
    """Apply SPEC.md §2.1 checks 1-8 in order; return the Voucher or raise Rejected.

    trusted: {kid: public key}. device: this meter's EUI-64 (None skips check 6).
    now: meter time in Unix seconds (None skips check 8). max_amount: per-voucher maximum
    in pence (None skips check 7). verify_sig(public, msg, sig) -> bool, default the
    pure-Python Ed25519 (the host passes libsodium's, which gives the same answers).
    """
    msg = cose.decode(data)
    public = trusted.get(msg.kid)
    if public is None:
        raise Rejected(UNKNOWN_KEY, "no trusted issuer key with kid %s" % _hex(msg.kid))
    if verify_sig is None:
        from .ed25519 import verify as verify_sig
    if not msg.verify(public, verify_sig):
        raise Rejected(BAD_SIGNATURE, "signature does not verify with key %s" % _hex(msg.kid))
    v = Voucher(*decode_payload(msg.payload), kid=msg.kid, raw=bytes(data))
    if device is not None and v.device != device:
        raise Rejected(WRONG_DEVICE, "voucher is for device %s" % _hex(v.device))
    if max_amount is not None and v.amount > max_amount:
        raise Rejected(OVER_VOUCHER_LIMIT, "%d p is over the per-voucher maximum of %d p"
                       % (v.amount, max_amount))
    if now is not None and v.expires is not None and now >= v.expires:
        raise Rejected(EXPIRED, "expired at %d, meter time %d" % (v.expires, now))
    return v


def to_text(data):
    return TEXT_PREFIX + base45.encode(data)


def from_text(text):
    """Voucher bytes from its text form; raise Rejected(MALFORMED)."""
    if not isinstance(text, str):
        raise Rejected(MALFORMED, "text form must be a string")
    text = text.strip()
    if text[:len(TEXT_PREFIX)].upper() != TEXT_PREFIX:
        raise Rejected(MALFORMED, "text form must start with %s" % TEXT_PREFIX)
    return base45.decode(text[len(TEXT_PREFIX):])


def _hex(b):
    return "".join("%02x" % x for x in b)
