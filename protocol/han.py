# HAN framing (SPEC.md §5): COBS(body || CRC-32 LE) then a 0x00 delimiter; body is
# deterministic CBOR [type, id, payload].  The receiver resynchronises on every 0x00.
import binascii
import struct

from . import cbor
from .errors import Rejected, MALFORMED, BAD_REQUEST, UNKNOWN_REQUEST

MAX_FRAME = 1024  # decoded bytes (body + CRC), SPEC.md §5
MAX_ENCODED = MAX_FRAME + MAX_FRAME // 254 + 2

STATUS = 1
SUBMIT = 2
RECEIPTS = 3
PUSH = 4      # WAN uplink: the meter pushes receipts to the head end (SPEC.md §5.1)
CODE = 5      # a keypad code (SPEC.md §8)
ACTION = 6    # a customer action (SPEC.md §9)
COMMAND = 7   # a signed command (SPEC.md §10): {1: command bytes} -> {1: receipt, 2: duplicate}
RESPONSE = 0x80
ERROR = 0xFF
MAX_RECEIPTS_PER_READ = 4


def cobs_encode(data):
    out = bytearray()
    block = bytearray()
    for b in data:
        if b == 0:
            out.append(len(block) + 1)
            out.extend(block)
            block = bytearray()
        else:
            block.append(b)
            if len(block) == 254:
                out.append(255)
                out.extend(block)
                block = bytearray()
    out.append(len(block) + 1)
    out.extend(block)
    return bytes(out)


def cobs_decode(data):
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise Rejected(MALFORMED, "COBS: zero byte inside frame")
        end = i + code
        if end > n:
            raise Rejected(MALFORMED, "COBS: truncated block")
        block = data[i + 1:end]
        if 0 in block:
            raise Rejected(MALFORMED, "COBS: zero byte inside frame")
        out.extend(block)
        i = end
        if code != 255 and i < n:
            out.append(0)
    return bytes(out)


def crc32(data):
    return binascii.crc32(data) & 0xFFFFFFFF


def encode_frame(body):
    """Wrap body bytes for the wire, delimiter included."""
    if not body or len(body) + 4 > MAX_FRAME:
        raise ValueError("frame body must be 1..%d bytes" % (MAX_FRAME - 4))
    return cobs_encode(body + struct.pack("<I", crc32(body))) + b"\x00"


def decode_frame(encoded):
    """Undo encode_frame for the bytes between two delimiters; check size and CRC."""
    if len(encoded) > MAX_ENCODED:
        raise Rejected(MALFORMED, "frame too long")
    raw = cobs_decode(encoded)
    if len(raw) < 5 or len(raw) > MAX_FRAME:
        raise Rejected(MALFORMED, "frame size %d out of range" % len(raw))
    body = raw[:-4]
    if struct.unpack("<I", raw[-4:])[0] != crc32(body):
        raise Rejected(MALFORMED, "frame CRC mismatch")
    return body


def encode_message(msg_type, msg_id, payload):
    return encode_frame(cbor.encode([msg_type, msg_id, payload]))


def decode_message(body):
    """Parse a frame body into (type, id, payload); raise Rejected(BAD_REQUEST), or
    UNKNOWN_REQUEST for a well-formed message whose type is no type this protocol has."""
    msg = cbor.decode(body)
    if (not isinstance(msg, list) or len(msg) != 3 or not isinstance(msg[0], int)
            or isinstance(msg[0], bool) or not isinstance(msg[1], int) or isinstance(msg[1], bool)
            or msg[0] < 0 or not 0 <= msg[1] <= 0xFFFF or not isinstance(msg[2], dict)):
        raise Rejected(BAD_REQUEST, "message is not [type, id, {payload}]")
    if msg[0] > 0xFF:
        raise Rejected(UNKNOWN_REQUEST, "unknown message type %d" % msg[0])
    return msg[0], msg[1], msg[2]


class Deframer:
    """Byte-stream to frames. Bounded memory: one buffer of the largest encoded frame, made
    once; an oversize frame is dropped and the link resynchronises on the next delimiter.
    `feed` returns the list of good frame bodies; bad frames are counted in `dropped`, never
    raised. If memory runs out inside `feed` (MemoryError passes through), the frame being
    read is lost and the next one is read whole: the state is never left half-updated."""

    def __init__(self):
        self._buf = bytearray(MAX_ENCODED)
        self._n = 0
        self._overflow = False
        self.dropped = 0

    def feed(self, data):
        bodies = []
        buf = self._buf
        for b in data:
            if b == 0:
                n = self._n
                overflow = self._overflow
                self._n = 0                 # the next frame starts clean, whatever follows
                self._overflow = False
                if overflow:
                    self.dropped += 1
                elif n:
                    try:
                        bodies.append(decode_frame(bytes(buf[:n])))
                    except Rejected:
                        self.dropped += 1
            elif not self._overflow:
                if self._n >= MAX_ENCODED:
                    self._overflow = True
                    self._n = 0
                else:
                    buf[self._n] = b
                    self._n += 1
        return bodies
