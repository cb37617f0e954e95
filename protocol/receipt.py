# Receipt v1 (SPEC.md §4): signed by the meter's own key, hash-chained per meter.
from . import cbor, cose
from .errors import Rejected, MALFORMED, UNKNOWN_KEY, BAD_SIGNATURE
from hashlib import sha256

TOPUP = 1
EMERGENCY = 2
REJECTIONS = 3
FAULT = 4
COMMAND = 5       # a signed command applied (SPEC.md §10)
KINDS = (TOPUP, EMERGENCY, REJECTIONS, FAULT, COMMAND)

HASH_LEN = 32
GENESIS = bytes(HASH_LEN)  # `prev` of receipt 0

K_DEVICE = 1
K_INDEX = 2
K_KIND = 3
K_TIME = 4
K_PREV = 5
K_BEFORE = 6
K_AFTER = 7
K_SEQUENCE = 8
K_VOUCHER = 9
K_AMOUNT = 10
K_REJECTIONS = 11
K_FAULTS = 12
K_FORM = 13       # optional, kind 1: how the top-up came (SPEC.md §4)
K_SUPPLY = 14     # optional, kinds 1 and 2: the supply state after it (SPEC.md §9)
K_COMMAND_KIND = 15  # kind 5: the command's kind (SPEC.md §10)
K_TARIFF = 16     # kind 5, SET_TARIFF only: the tariff as applied (its effective time as the meter takes it)

FORM_VOUCHER = 1  # the default when K_FORM is absent
FORM_CODE = 2     # a keypad code (SPEC.md §8): K_VOUCHER is the code's reference
FORMS = (FORM_VOUCHER, FORM_CODE)
SUPPLY_INTERRUPTED = 0
SUPPLY_ARMED = 1
SUPPLY_ON = 2
SUPPLY_STATES = (SUPPLY_INTERRUPTED, SUPPLY_ARMED, SUPPLY_ON)

_FIELDS_FOR_KIND = {
    TOPUP: (K_SEQUENCE, K_VOUCHER, K_AMOUNT),
    EMERGENCY: (K_AMOUNT,),
    REJECTIONS: (K_REJECTIONS,),
    FAULT: (K_FAULTS,),
    COMMAND: (K_SEQUENCE, K_VOUCHER, K_COMMAND_KIND),
}
_ALWAYS = (K_DEVICE, K_INDEX, K_KIND, K_TIME, K_PREV, K_BEFORE, K_AFTER)
_OPTIONAL_FOR_KIND = {
    TOPUP: (K_FORM, K_SUPPLY),
    EMERGENCY: (K_SUPPLY,),
    REJECTIONS: (),
    FAULT: (),
    COMMAND: (K_TARIFF,),
}


class Receipt:
    """A decoded receipt; `raw` the COSE bytes, `hash` what the next receipt's prev holds."""

    def __init__(self, fields, kid, raw):
        self.device = fields[K_DEVICE]
        self.index = fields[K_INDEX]
        self.kind = fields[K_KIND]
        self.time = fields[K_TIME]
        self.prev = fields[K_PREV]
        self.balance_before = fields[K_BEFORE]
        self.balance_after = fields[K_AFTER]
        self.sequence = fields.get(K_SEQUENCE)
        self.voucher = fields.get(K_VOUCHER)
        self.amount = fields.get(K_AMOUNT)
        self.rejections = fields.get(K_REJECTIONS)
        self.faults = fields.get(K_FAULTS)
        self.form = fields.get(K_FORM)        # None: absent (a voucher, for a top-up)
        self.supply = fields.get(K_SUPPLY)    # None: absent (older firmware)
        self.command_kind = fields.get(K_COMMAND_KIND)
        self.tariff = fields.get(K_TARIFF)
        self.kid = kid
        self.raw = raw
        self.hash = chain_hash(raw)


def chain_hash(raw):
    return sha256(bytes(raw)).digest()


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _uint(v):
    return _int(v) and v >= 0


def check_fields(fields):
    """SPEC.md §4 table; raise Rejected(MALFORMED)."""
    if not isinstance(fields, dict):
        raise Rejected(MALFORMED, "receipt payload is not a map")
    kind = fields.get(K_KIND)
    if kind not in KINDS or not _uint(kind):
        raise Rejected(MALFORMED, "unknown receipt kind %r" % (kind,))
    required = _ALWAYS + _FIELDS_FOR_KIND[kind]
    optional = _OPTIONAL_FOR_KIND[kind]
    for key in fields:
        if key not in required and key not in optional:
            raise Rejected(MALFORMED, "field %r not allowed in a kind %d receipt" % (key, kind))
    for key in required:
        if key not in fields:
            raise Rejected(MALFORMED, "receipt field %d missing" % key)
    device = fields[K_DEVICE]
    if not isinstance(device, bytes) or len(device) != 8:
        raise Rejected(MALFORMED, "receipt device must be 8 bytes")
    if not _uint(fields[K_INDEX]) or not _uint(fields[K_TIME]):
        raise Rejected(MALFORMED, "receipt index and time must be unsigned")
    prev = fields[K_PREV]
    if not isinstance(prev, bytes) or len(prev) != HASH_LEN:
        raise Rejected(MALFORMED, "receipt prev must be %d bytes" % HASH_LEN)
    if not _int(fields[K_BEFORE]) or not _int(fields[K_AFTER]):
        raise Rejected(MALFORMED, "receipt balances must be integers")
    if kind == TOPUP:
        ref = fields[K_VOUCHER]
        if not _uint(fields[K_SEQUENCE]) or not isinstance(ref, bytes) or len(ref) != 16:
            raise Rejected(MALFORMED, "top-up receipt needs sequence and a 16-byte voucher ref")
    if kind == COMMAND:
        # (in protocol/command.py: a meter loads it only when a command comes)
        from .command import check_receipt
        check_receipt(fields)
    if kind in (TOPUP, EMERGENCY) and (not _uint(fields[K_AMOUNT]) or fields[K_AMOUNT] == 0):
        raise Rejected(MALFORMED, "receipt amount must be positive")
    if kind == REJECTIONS or kind == FAULT:
        counts = fields[K_REJECTIONS if kind == REJECTIONS else K_FAULTS]
        if not isinstance(counts, dict):
            raise Rejected(MALFORMED, "counts must be a map")
        for code, count in counts.items():
            if not _uint(code) or not _uint(count):
                raise Rejected(MALFORMED, "counts must be unsigned")
    if K_FORM in fields and (not _uint(fields[K_FORM]) or fields[K_FORM] not in FORMS):
        raise Rejected(MALFORMED, "receipt form must be 1 (voucher) or 2 (keypad code)")
    if K_SUPPLY in fields and (not _uint(fields[K_SUPPLY])
                               or fields[K_SUPPLY] not in SUPPLY_STATES):
        raise Rejected(MALFORMED, "receipt supply state must be 0, 1 or 2")


def encode_payload(fields):
    check_fields(fields)
    return cbor.encode(fields)


def encode(kid, sign, fields):
    """Signed receipt bytes from a payload dict keyed by the K_* constants."""
    return cose.encode(kid, encode_payload(fields), sign)


def parse(data):
    """Decode without verifying the signature."""
    msg = cose.decode(data)
    fields = cbor.decode(msg.payload)
    check_fields(fields)
    return Receipt(fields, msg.kid, bytes(data))


def verify(data, device_keys, verify_sig=None):
    """Decode and verify a receipt. device_keys: {kid: meter public key}."""
    msg = cose.decode(data)
    public = device_keys.get(msg.kid)
    if public is None:
        raise Rejected(UNKNOWN_KEY, "receipt signed by an unknown meter key")
    if verify_sig is None:
        from .ed25519 import verify as verify_sig
    if not msg.verify(public, verify_sig):
        raise Rejected(BAD_SIGNATURE, "receipt signature does not verify")
    fields = cbor.decode(msg.payload)
    check_fields(fields)
    return Receipt(fields, msg.kid, bytes(data))
