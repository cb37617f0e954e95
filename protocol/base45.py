# Base45 (RFC 9285): the text form of a voucher, all in the QR alphanumeric set.
from .errors import Rejected, MALFORMED

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}


def encode(data):
    out = []
    n = len(data)
    for i in range(0, n - 1, 2):
        v = data[i] * 256 + data[i + 1]
        out.append(ALPHABET[v % 45])
        out.append(ALPHABET[(v // 45) % 45])
        out.append(ALPHABET[v // 2025])
    if n % 2:
        v = data[n - 1]
        out.append(ALPHABET[v % 45])
        out.append(ALPHABET[v // 45])
    return "".join(out)


def decode(text):
    """Decode base45 text; raise Rejected(MALFORMED) on a bad character, length or value."""
    try:
        values = [_VALUE[c] for c in text]
    except KeyError:
        raise Rejected(MALFORMED, "base45: character outside the alphabet")
    n = len(values)
    if n % 3 == 1:
        raise Rejected(MALFORMED, "base45: dangling character")
    out = bytearray()
    for i in range(0, n - 2, 3):
        v = values[i] + values[i + 1] * 45 + values[i + 2] * 2025
        if v > 0xFFFF:
            raise Rejected(MALFORMED, "base45: triple out of range")
        out.append(v >> 8)
        out.append(v & 0xFF)
    if n % 3 == 2:
        v = values[n - 2] + values[n - 1] * 45
        if v > 0xFF:
            raise Rejected(MALFORMED, "base45: pair out of range")
        out.append(v)
    return bytes(out)
