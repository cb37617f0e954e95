# Keypad code v1 (SPEC.md §8): 20 decimal digits a customer types on the PPMID. Runs
# unchanged on CPython and MicroPython.
#
# The 19 leading digits are one number N < 2^63 holding, from the top: kind (2 bits),
# amount in pence (16), the sequence's low 14 bits, and a 31-bit MAC; the 20th digit is a
# Damm check digit over the 19, so any single wrong digit and any swap of two neighbours is
# a TYPO, told apart before the MAC is looked at. The MAC is HMAC-SHA-256 under a per-meter
# key both sides derive from an X25519 agreement (the supplier's code key and the meter's
# key-agreement key), truncated to 31 bits; it covers the meter's EUI-64 and the full
# sequence, which the meter rebuilds from the low bits and its replay window.
from hashlib import sha256

from .errors import Rejected, MALFORMED, CODE_WRONG, CODE_TYPO, CODE_INCOMPLETE

DIGITS = 20
KIND_ADD = 0                  # add credit (kinds 1-3 are reserved)
KIND_BITS = 2
AMOUNT_BITS = 16              # pence: 1 p ... £655.35
SEQ_BITS = 14                 # the sequence's low bits: the meter rebuilds the rest
MAC_BITS = 31
MAX_AMOUNT = (1 << AMOUNT_BITS) - 1
SEQ_SPAN = 1 << SEQ_BITS
REF_LEN = 16
_MAC_MASK = (1 << MAC_BITS) - 1
_SEQ_MASK = SEQ_SPAN - 1
_AMOUNT_MASK = MAX_AMOUNT
_MAC_DOMAIN = b"OTU1 keypad code v1"
_HKDF_SALT = b"OTU1 keypad code key v1"
_WINDOW = 64                  # SPEC §2.2 (the vouchers' replay window)

# Damm's totally anti-symmetric quasigroup of order 10 (H. M. Damm, 2004): a check digit
# that detects every single-digit error and every adjacent transposition.
_DAMM = (
    b"\x00\x03\x01\x07\x05\x09\x08\x06\x04\x02",
    b"\x07\x00\x09\x02\x01\x05\x04\x08\x06\x03",
    b"\x04\x02\x00\x06\x08\x07\x01\x03\x05\x09",
    b"\x01\x07\x05\x00\x09\x08\x03\x04\x02\x06",
    b"\x06\x01\x02\x03\x00\x04\x05\x09\x07\x08",
    b"\x03\x06\x07\x04\x02\x00\x09\x05\x08\x01",
    b"\x05\x08\x06\x09\x07\x02\x00\x01\x03\x04",
    b"\x08\x09\x04\x05\x03\x06\x02\x00\x01\x07",
    b"\x09\x04\x03\x08\x06\x01\x07\x02\x00\x05",
    b"\x02\x05\x08\x01\x04\x03\x06\x07\x09\x00",
)


def damm(digits):
    """The Damm interim digit of a string of digits: 0 iff a string ending in its check
    digit is intact."""
    d = 0
    for ch in digits:
        d = _DAMM[d][ord(ch) - 48]
    return d


def hmac_sha256(key, msg):
    """HMAC-SHA-256 (RFC 2104); MicroPython ports have SHA-256 in C but not all have hmac."""
    if len(key) > 64:
        key = sha256(key).digest()
    key = bytes(key) + bytes(64 - len(key))
    inner = sha256(bytes(b ^ 0x36 for b in key) + bytes(msg)).digest()
    return sha256(bytes(b ^ 0x5C for b in key) + inner).digest()


def hkdf_sha256(ikm, salt, info, length=32):
    """HKDF (RFC 5869) with SHA-256; length <= 32 (one block is all the codes need)."""
    if length > 32:
        raise ValueError("one block only")
    prk = hmac_sha256(salt, ikm)
    return hmac_sha256(prk, bytes(info) + b"\x01")[:length]


def derive_key(shared, device, supplier_public, meter_public):
    """The per-meter code key from the X25519 shared secret (both sides compute it)."""
    return hkdf_sha256(shared, _HKDF_SALT, bytes(device) + bytes(supplier_public) + bytes(meter_public))


def mac(key, device, kind, amount, sequence):
    msg = (_MAC_DOMAIN + bytes(device) + bytes([kind]) + amount.to_bytes(4, "big")
           + sequence.to_bytes(4, "big"))
    return int.from_bytes(hmac_sha256(key, msg)[:4], "big") & _MAC_MASK


class Code:
    """A keypad code, parsed. `sequence` is the full sequence once rebuilt, else 0."""

    def __init__(self, digits, kind, amount, low, tag):
        self.digits = digits
        self.kind = kind
        self.amount = amount
        self.low = low
        self.tag = tag
        self.sequence = 0
        self.ref = reference(digits)


def reference(digits):
    """The code's reference in receipts (like a voucher's, SPEC.md §2.2): the first 16 bytes
    of SHA-256 of "OTU1 code " and its 20 digits."""
    return sha256(b"OTU1 code " + digits.encode()).digest()[:REF_LEN]


def encode(key, device, amount, sequence, kind=KIND_ADD):
    """The 20 digits of a code (a str), unspaced; see grouped() for display."""
    if kind != KIND_ADD:
        raise ValueError("kind")
    if not 1 <= amount <= MAX_AMOUNT:
        raise ValueError("a code carries 1..%d pence" % MAX_AMOUNT)
    if not 1 <= sequence <= 0xFFFFFFFF:
        raise ValueError("sequence")
    n = (((kind << AMOUNT_BITS | amount) << SEQ_BITS | (sequence & _SEQ_MASK)) << MAC_BITS
         | mac(key, device, kind, amount, sequence))
    body = "%019d" % n
    return body + str(_check_digit(body))


def _check_digit(body):
    interim = damm(body)
    for c in range(10):
        if _DAMM[interim][c] == 0:
            return c
    raise AssertionError("Damm table")


def grouped(digits):
    """`1234 5678 9012 3456 7890`: how a code is shown."""
    return " ".join(digits[i:i + 4] for i in range(0, len(digits), 4))


def normalize(text):
    """The 20 digits of typed text (spaces and dashes allowed); Rejected(CODE_INCOMPLETE)."""
    if not isinstance(text, str):
        raise Rejected(CODE_INCOMPLETE, "a code is text")
    out = []
    for ch in text:
        if "0" <= ch <= "9":
            out.append(ch)
        elif ch not in " -\t\r\n":
            raise Rejected(CODE_INCOMPLETE, "a code has only digits (and spaces or dashes)")
    digits = "".join(out)
    if len(digits) != DIGITS:
        raise Rejected(CODE_INCOMPLETE, "a code has %d digits, not %d" % (DIGITS, len(digits)))
    return digits


def parse(text):
    """Check the form and the check digit (no key needed). Rejected(CODE_INCOMPLETE) for
    the wrong length or letters, Rejected(CODE_TYPO) for a check digit that does not fit."""
    digits = normalize(text)
    if damm(digits) != 0:
        raise Rejected(CODE_TYPO, "the check digit does not fit: a digit is mistyped")
    n = int(digits[:19])
    if n >> (KIND_BITS + AMOUNT_BITS + SEQ_BITS + MAC_BITS):
        raise Rejected(CODE_WRONG, "not a code")      # a number no issuer writes
    tag = n & _MAC_MASK
    n >>= MAC_BITS
    low = n & _SEQ_MASK
    n >>= SEQ_BITS
    amount = n & _AMOUNT_MASK
    kind = n >> AMOUNT_BITS
    return Code(digits, kind, amount, low, tag)


def candidates(low, highest):
    """Full sequences whose low bits are `low`, nearest the replay window first: the one in
    [base, base + 2^14) where base = max(1, highest - 64), then the one 2^14 below it (a
    code older than the window: STALE, not WRONG) and the one 2^14 above it."""
    base = highest - _WINDOW if highest > _WINDOW else 1
    s = base + ((low - base) & _SEQ_MASK)
    out = [s]
    if s - SEQ_SPAN >= 1:
        out.append(s - SEQ_SPAN)
    if s + SEQ_SPAN <= 0xFFFFFFFF:
        out.append(s + SEQ_SPAN)
    return out


def verify(text, key, device, highest):
    """Checks in SPEC.md §8 order: the form (CODE_INCOMPLETE), the check digit (CODE_TYPO),
    then the MAC against each candidate sequence (CODE_WRONG if none fits). Return the Code
    with its full sequence. A kind other than add credit or an amount of 0 under a good MAC
    is MALFORMED."""
    code = parse(text)
    for s in candidates(code.low, highest):
        if mac(key, device, code.kind, code.amount, s) == code.tag:
            code.sequence = s
            break
    else:
        raise Rejected(CODE_WRONG, "the code is not for this meter, or is wrong")
    if code.kind != KIND_ADD or code.amount == 0:
        raise Rejected(MALFORMED, "unsupported code kind %d" % code.kind)
    return code
