# Signed command v1 (SPEC.md §10): how a supplier changes a provisioned meter's trust list,
# tariff and limits, or its supplier, offline. A COSE_Sign1 like a voucher, signed by the
# supplier's *command key* (the meter's root of trust, never an issuer key), with the
# external AAD "OTU1 command v1" so that no command signature passes for a voucher's, a
# receipt's or an acknowledgement's, nor the other way round. Runs unchanged on CPython
# and MicroPython; the host builds commands with encode() and its own signing function.
from . import base45, cbor, cose, voucher
from .errors import (Rejected, MALFORMED, UNKNOWN_KEY, BAD_SIGNATURE, WRONG_DEVICE,
                     COMMAND_REFUSED)

TEXT_PREFIX = "OTC1:"
AAD = b"OTU1 command v1"
DEVICE_LEN = 8
KEY_LEN = 32
KID_LEN = 8
REF_LEN = 16
MAX_NUMBER = 0xFFFFFFFF
MAX_TIME = 0xFFFFFFFFFFFF
MAX_ISSUER_KEYS = 4          # issuer keys a change of supplier installs at most
PAST_BOUND = 7 * 86400       # a tariff's effective time may be at most this far behind meter time

# Payload keys
K_DEVICE = 1
K_NUMBER = 2
K_KIND = 3
K_ISSUED = 4
K_ARGS = 5
_REQUIRED = (K_DEVICE, K_NUMBER, K_KIND, K_ISSUED, K_ARGS)

# Kinds
ADD_ISSUER_KEY = 1
REVOKE_ISSUER_KEY = 2
SET_CODE_KEY = 3
SET_TARIFF = 4
ROTATE_COMMAND_KEY = 5
CHANGE_SUPPLIER = 6
KINDS = (ADD_ISSUER_KEY, REVOKE_ISSUER_KEY, SET_CODE_KEY, SET_TARIFF, ROTATE_COMMAND_KEY,
         CHANGE_SUPPLIER)
KIND_NAMES = {ADD_ISSUER_KEY: "ADD_ISSUER_KEY", REVOKE_ISSUER_KEY: "REVOKE_ISSUER_KEY",
              SET_CODE_KEY: "SET_CODE_KEY", SET_TARIFF: "SET_TARIFF",
              ROTATE_COMMAND_KEY: "ROTATE_COMMAND_KEY", CHANGE_SUPPLIER: "CHANGE_SUPPLIER"}

# Argument keys
A_KEY = 1             # kinds 1, 3, 5: a public key; kind 2: the kid to revoke; kind 6: new command key
A_EFFECTIVE = 1       # kind 4
A_UNIT_RATE = 2       # kind 4: milli-pence per kWh
A_STANDING = 3        # kind 4: milli-pence per day
A_EC_AMOUNT = 4       # kind 4: pence of emergency credit
A_EC_THRESHOLD = 5    # kind 4: pence
A_MAX_VOUCHER = 6     # kind 4: pence
A_MAX_CREDIT = 7      # kind 4: pence
A_ISSUERS = 2         # kind 6: [issuer public key, ...]
A_CODE_KEY = 3        # kind 6, optional: the new supplier's code key (X25519 public)
A_FLOOR = 4           # kind 6: sequence floor
TARIFF_KEYS = (A_UNIT_RATE, A_STANDING, A_EC_AMOUNT, A_EC_THRESHOLD, A_MAX_VOUCHER, A_MAX_CREDIT)
# Bounds of each tariff value (inclusive), checked by check_args: COMMAND_REFUSED outside.
TARIFF_BOUNDS = {
    A_UNIT_RATE: (1, 1000000),        # mp/kWh: up to £10/kWh; zero is refused
    A_STANDING: (0, 10000000),        # mp/day: up to £100/day
    A_EC_AMOUNT: (1, 1000000),        # pence (the voucher ceiling, SPEC.md §2)
    A_EC_THRESHOLD: (0, 1000000),
    A_MAX_VOUCHER: (1, 1000000),
    A_MAX_CREDIT: (1, 1000000),
}


class Command:
    """A decoded command. `raw` the bytes as received; `ref` its reference (§10)."""

    def __init__(self, device, number, kind, issued, args, kid, raw):
        self.device = device
        self.number = number
        self.kind = kind
        self.issued = issued
        self.args = args
        self.kid = kid
        self.raw = raw
        self.ref = reference(raw)


# A command's reference is a voucher's (§10): the first 16 bytes of SHA-256 of its bytes.
reference = voucher.reference
_uint = voucher._uint  # a CBOR unsigned integer, never a bool


def _key(v, n=KEY_LEN):
    return isinstance(v, bytes) and len(v) == n


def check_structure(kind, args):
    """The per-kind argument table (types, required and allowed keys); Rejected(MALFORMED)."""
    if not _uint(kind) or kind not in KINDS:
        raise Rejected(MALFORMED, "unknown command kind %r" % (kind,))
    if not isinstance(args, dict):
        raise Rejected(MALFORMED, "command args must be a map")
    if kind == SET_TARIFF:
        allowed = (A_EFFECTIVE,) + TARIFF_KEYS
    elif kind == CHANGE_SUPPLIER:
        allowed = (A_KEY, A_ISSUERS, A_CODE_KEY, A_FLOOR)
    else:
        allowed = (A_KEY,)
    for k in args:
        if k not in allowed:
            raise Rejected(MALFORMED, "arg %r not allowed in a kind %d command" % (k, kind))
    if kind == SET_TARIFF:
        if not _uint(args.get(A_EFFECTIVE)) or args[A_EFFECTIVE] > MAX_TIME:
            raise Rejected(MALFORMED, "a tariff needs an effective time (Unix seconds)")
        n = 0
        for k in TARIFF_KEYS:
            if k in args:
                if not _uint(args[k]):
                    raise Rejected(MALFORMED, "tariff value %d must be an unsigned integer" % k)
                n += 1
        if not n:
            raise Rejected(MALFORMED, "a tariff sets at least one value")
    elif kind == REVOKE_ISSUER_KEY:
        if not _key(args.get(A_KEY), KID_LEN):
            raise Rejected(MALFORMED, "revoke needs {1: the 8-byte kid}")
    elif kind == CHANGE_SUPPLIER:
        if not _key(args.get(A_KEY)):
            raise Rejected(MALFORMED, "change of supplier needs {1: new command key}")
        issuers = args.get(A_ISSUERS)
        if not isinstance(issuers, list) or not 1 <= len(issuers) <= MAX_ISSUER_KEYS:
            raise Rejected(MALFORMED, "change of supplier needs {2: 1..%d issuer keys}" % MAX_ISSUER_KEYS)
        for k in issuers:
            if not _key(k):
                raise Rejected(MALFORMED, "issuer keys are 32-byte Ed25519 public keys")
        if A_CODE_KEY in args and not _key(args[A_CODE_KEY]):
            raise Rejected(MALFORMED, "a code key is 32 bytes")
        if not _uint(args.get(A_FLOOR)) or args[A_FLOOR] > MAX_NUMBER:
            raise Rejected(MALFORMED, "change of supplier needs {4: sequence floor}")
    elif not _key(args.get(A_KEY)):
        raise Rejected(MALFORMED, "a kind %d command needs {1: a 32-byte public key}" % kind)


def check_fields(device, number, kind, issued, args):
    if not _key(device, DEVICE_LEN):
        raise Rejected(MALFORMED, "device must be an 8-byte EUI-64")
    if not _uint(number) or not 1 <= number <= MAX_NUMBER:
        raise Rejected(MALFORMED, "number must be 1..%d" % MAX_NUMBER)
    if not _uint(issued) or issued > MAX_TIME:
        raise Rejected(MALFORMED, "issued must be Unix seconds")
    check_structure(kind, args)


def check_args(kind, args, now=None):
    """The stateless value checks (SPEC.md §10, check 8): Rejected(COMMAND_REFUSED) for a
    tariff value outside its bounds, or an effective time more than PAST_BOUND seconds
    behind meter time `now` (None skips that). The structure was checked at decode."""
    if kind == SET_TARIFF:
        for k in TARIFF_KEYS:
            if k in args:
                lo, hi = TARIFF_BOUNDS[k]
                if not lo <= args[k] <= hi:
                    raise Rejected(COMMAND_REFUSED, "tariff value %d = %d is outside %d..%d"
                                   % (k, args[k], lo, hi))
        if now is not None and args[A_EFFECTIVE] + PAST_BOUND < now:
            raise Rejected(COMMAND_REFUSED, "effective %d is more than 7 days before meter time %d"
                           % (args[A_EFFECTIVE], now))
    elif kind == CHANGE_SUPPLIER:
        seen = []
        for k in args[A_ISSUERS]:
            if k in seen:
                raise Rejected(COMMAND_REFUSED, "an issuer key is listed twice")
            seen.append(k)


def encode_payload(device, number, kind, issued, args, strict=True):
    """Payload bytes; strict (the default) also applies check_args without a time."""
    check_fields(device, number, kind, issued, args)
    if strict:
        check_args(kind, args)
    return cbor.encode({K_DEVICE: device, K_NUMBER: number, K_KIND: kind, K_ISSUED: issued,
                        K_ARGS: args})


def encode(kid, sign, device, number, kind, issued, args, strict=True):
    """A signed command (tagged COSE_Sign1 bytes). `sign(msg) -> 64-byte signature` is the
    command key; kid = protocol.cose.kid_for(its public key)."""
    return cose.encode(kid, encode_payload(device, number, kind, issued, args, strict), sign, AAD)


def decode_payload(payload):
    fields = cbor.decode(payload)
    if not isinstance(fields, dict):
        raise Rejected(MALFORMED, "payload is not a map")
    for key in fields:
        if key not in _REQUIRED:
            raise Rejected(MALFORMED, "unknown payload field %r" % (key,))
    for key in _REQUIRED:
        if key not in fields:
            raise Rejected(MALFORMED, "payload field %d missing" % key)
    values = (fields[K_DEVICE], fields[K_NUMBER], fields[K_KIND], fields[K_ISSUED], fields[K_ARGS])
    check_fields(*values)
    return values


def parse(data):
    """Decode without checking the signature (for display, and the duplicate look-up)."""
    msg = cose.decode(data)
    return Command(*decode_payload(msg.payload), kid=msg.kid, raw=bytes(data))


def verify(data, keys, device=None, verify_sig=None):
    """SPEC.md §10 checks 1-6 in order; return the Command or raise Rejected.

    keys: {kid: command public key} (a meter has one). device: the meter's EUI-64 (None
    skips check 6). verify_sig(public, msg, sig) -> bool, default pure-Python Ed25519."""
    msg = cose.decode(data)
    public = keys.get(msg.kid)
    if public is None:
        raise Rejected(UNKNOWN_KEY, "kid %s is not the command key" % _hex(msg.kid))
    if verify_sig is None:
        from .ed25519 import verify as verify_sig
    if not msg.verify(public, verify_sig, AAD):
        raise Rejected(BAD_SIGNATURE, "command signature does not verify")
    c = Command(*decode_payload(msg.payload), kid=msg.kid, raw=bytes(data))
    if device is not None and c.device != device:
        raise Rejected(WRONG_DEVICE, "command is for device %s" % _hex(c.device))
    return c


def check_receipt(fields):
    """The kind-5 rows of the receipt table (SPEC.md §4), for protocol.receipt; raise
    Rejected(MALFORMED)."""
    from . import receipt as r
    ref = fields[r.K_VOUCHER]
    kind = fields[r.K_COMMAND_KIND]
    tariff = fields.get(r.K_TARIFF, {})
    if (not _uint(fields[r.K_SEQUENCE]) or fields[r.K_SEQUENCE] == 0 or not isinstance(ref, bytes)
            or len(ref) != REF_LEN or not _uint(kind)
            or fields[r.K_BEFORE] != fields[r.K_AFTER] or not isinstance(tariff, dict)
            or (r.K_TARIFF in fields) != (kind == SET_TARIFF)
            or (r.K_TARIFF in fields and not tariff)
            or not all(_uint(k) and _uint(v) for k, v in tariff.items())):
        raise Rejected(MALFORMED, "a command receipt has a number, a 16-byte reference, a kind, "
                       "equal balances, and field 16 (uint -> uint) with a tariff only")


def to_text(data):
    return TEXT_PREFIX + base45.encode(data)


def from_text(text):
    """Command bytes from its text form; raise Rejected(MALFORMED)."""
    if not isinstance(text, str):
        raise Rejected(MALFORMED, "text form must be a string")
    text = text.strip()
    if text[:len(TEXT_PREFIX)].upper() != TEXT_PREFIX:
        raise Rejected(MALFORMED, "text form must start with %s" % TEXT_PREFIX)
    return base45.decode(text[len(TEXT_PREFIX):])


def _hex(b):
    return "".join("%02x" % x for x in b)
