"""Record format of the power-safe store (meter.store): header, CRC, seal, parse and
single-bit repair. Pure functions on a record held in a buffer; flash and the ring are
meter.store's business.

A record is a 20-byte header and a payload, padded with 0xFF to a multiple of 4 bytes::

    0  u8   magic 0xA7
    1  u8   type (CONFIG .. CARRY below)
    2  u16  payload length
    4  u32  generation (below 2**31)
    8  u32  index
    12 u32  tag
    16 u32  CRC-32 of bytes 0..15, then the payload (the padding is not covered)
    (all little-endian)

Repair: when the CRC fails, `repair` looks for the one flipped bit that makes the record
whole, anywhere in it: the magic or the type (tried directly), the length (each of the 16
alternatives, each giving another payload span), the stored CRC (a syndrome of one bit),
or any other bit of header and payload. For the last it uses the linearity of the CRC: a
flip at message bit t (message = header bytes 0..15 then the payload, n bytes in order,
bits LSB first) changes the CRC by 0xEDB88320 shifted through 8n-1-t zero-bit steps, so
the position is found from the syndrome (baby-step giant-step, with binascii.crc32 over
zero bytes doing the shifts) without trying each bit. IEEE CRC-32 has Hamming distance >= 3 at these lengths,
so the repair of a single flipped bit is unique. A repair is accepted only if the repaired
header is plausible (magic, known type, fits in the room given, generation below 2**31).
"""
import binascii
import struct

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):
        return x

MAGIC = const(0xA7)
CONFIG = const(1)       # index: copy number (0, 1)
STATE = const(2)        # index: committed receipt count; tag: STATE_V2 | flags | span
RECEIPT = const(3)      # index: receipt index; tag: the caller's
WIPE = const(4)         # a format in progress; payload: the carry; tag: 1 if there is one
CARRY = const(5)        # the carry kept across the last format; tag 1
HDR = const(20)
GENMAX = const(0x7FFFFFFF)
FMT = "<BBHIII"         # header bytes 0..15; the CRC follows at 16
# State tag: bit 31 says the other bits are set; bit 30: a config was live; bit 29: a
# carry was live; bits 16..28: the live config's CRC-32, low 13 bits; bits 0..15: span,
# the receipts [index - span, index) are kept on flash.
STATE_V2 = const(0x80000000)
STATE_CFG = const(0x40000000)
STATE_CARRY = const(0x20000000)
CSUM_SHIFT = const(16)
CSUM = const(0x1FFF)
SPAN = const(0xFFFF)


def csum(blob):
    return binascii.crc32(blob) & CSUM

POLY = 0xEDB88320      # reflected CRC-32 polynomial
_G = const(32)
_Z1 = bytes(1)
_ZG = bytes(_G)


def size(ln):
    """Bytes a record with an ln-byte payload takes on flash."""
    return (HDR + ln + 3) & ~3


def known(typ):
    return CONFIG <= typ <= CARRY


def crc(mv, ln):
    return binascii.crc32(mv[HDR:HDR + ln], binascii.crc32(mv[0:16]))


def stored(buf):
    return struct.unpack_from("<I", buf, 16)[0]


def seal(buf, mv, ln, gen):
    """Stamp gen and the CRC into the record in buf; pad with 0xFF. Returns its size."""
    sz = size(ln)
    struct.pack_into("<I", buf, 4, gen)
    for j in range(HDR + ln, sz):
        buf[j] = 0xFF
    struct.pack_into("<I", buf, 16, crc(mv, ln))
    return sz


def sane(buf, room):
    """Payload length if the header in buf is plausible for a record with `room` bytes
    available from its start, else -1."""
    magic, typ, ln, gen = struct.unpack_from("<BBHI", buf, 0)
    if magic != MAGIC or not known(typ) or size(ln) > room or gen > GENMAX:
        return -1
    return ln


def candidate(buf, room):
    """True if one flipped bit could make the header in buf plausible."""
    magic, typ, ln, gen = struct.unpack_from("<BBHI", buf, 0)
    off = 0
    d = magic ^ MAGIC
    if d:
        if d & (d - 1):
            return False
        off += 1
    if not known(typ):
        if not _near(typ):
            return False
        off += 1
    if size(ln) > room:
        if _shorter(ln, room) < 0:
            return False
        off += 1
    if gen > GENMAX:
        off += 1
    return off <= 1


def _near(typ):
    for k in range(8):
        if known(typ ^ (1 << k)):
            return True
    return False


def _shorter(ln, room):
    for k in range(16):
        if size(ln ^ (1 << k)) <= room:
            return k
    return -1


def _bit(d):
    k = 0
    while d > 1:
        d >>= 1
        k += 1
    return k


def _zeros(r, z):
    # The CRC register r after the zero bytes z: 8 * len(z) steps of the bitwise shift
    # r = (r >> 1) ^ (POLY if r & 1 else 0), done by binascii.crc32 in C.
    return binascii.crc32(z, r ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _locate(s, n):
    # The message bit t (of n bytes) whose flip changes the CRC by s, or -1. Its syndrome
    # is the polynomial shifted through m = 8n-1-t zero bits; with m = 8a + b, a is found
    # by baby steps from s and giant steps of _G bytes from the polynomial shifted b bits
    # (about _G + 8n/_G crc32 calls rather than 8n Python steps).
    if not s:
        return -1
    baby = {}
    r = s
    for j in range(_G):
        baby[r] = j
        r = _zeros(r, _Z1)
    v = POLY
    for b in range(8):
        r = v
        q = 0
        while q * _G - _G < n:
            j = baby.get(r)
            if j is not None and 0 <= q * _G - j < n:
                return 8 * n - 1 - 8 * (q * _G - j) - b
            r = _zeros(r, _ZG)
            q += 1
        v = (v >> 1) ^ POLY if v & 1 else v >> 1
    return -1


def repair(buf, mv, room):
    """buf holds a record whose CRC fails, with `room` bytes read (at most what is left of
    its block, at most len(buf)). If exactly one flipped bit explains it, fix the bit in
    buf and return its position in the record (byte * 8 + bit, bits LSB first); else
    return -1 and leave buf as it was."""
    magic, typ, ln, gen = struct.unpack_from("<BBHI", buf, 0)
    want = stored(buf)
    fits = size(ln) <= room
    d = magic ^ MAGIC
    if d:
        if d & (d - 1) or not fits or not known(typ) or gen > GENMAX:
            return -1
        buf[0] = MAGIC
        if crc(mv, ln) == want:
            return _bit(d)
        buf[0] = magic
        return -1
    if not known(typ):
        if not fits or gen > GENMAX:
            return -1
        for k in range(8):
            t = typ ^ (1 << k)
            if known(t):
                buf[1] = t
                if crc(mv, ln) == want:
                    return 8 + k
        buf[1] = typ
        return -1
    if fits:
        s = crc(mv, ln) ^ want
        if s and not s & (s - 1):               # one bit: the stored CRC itself
            if gen <= GENMAX:
                j = _bit(s)
                buf[16 + (j >> 3)] ^= 1 << (j & 7)
                return 128 + j
            return -1
        t = _locate(s, 16 + ln)
        if t >= 0 and not 16 <= t < 32:         # a length bit would change the span
            at = t >> 3
            if at >= 16:
                at += 4                         # payload: after the stored CRC
            m = 1 << (t & 7)
            buf[at] ^= m
            if sane(buf, room) == ln:
                return at * 8 + (t & 7)
            buf[at] ^= m
    if gen > GENMAX:
        return -1
    for k in range(16):
        l2 = ln ^ (1 << k)
        if size(l2) <= room:
            struct.pack_into("<H", buf, 2, l2)
            if crc(mv, l2) == want:
                return 16 + k
    struct.pack_into("<H", buf, 2, ln)
    return -1


def tornlike(buf, ln, bit):
    """True if a record repaired at `bit` could be a write torn by a power cut rather than
    damage: the repair cleared the bit (a program left it unfinished) and every byte of
    the record after it is 0xFF (a record is programmed in address order; a cut leaves a
    prefix programmed, the byte at the cut partly, the rest erased)."""
    at = bit >> 3
    if (buf[at] >> (bit & 7)) & 1:
        return False
    j = at + 1
    end = HDR + ln
    while j < end:
        if buf[j] != 0xFF:
            return False
        j += 1
    return True
