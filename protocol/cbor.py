# Strict deterministic CBOR (RFC 8949 §4.2.1), only the subset SPEC.md §1 allows.
# The decoder refuses anything another encoder could have written differently, so one
# value has exactly one encoding: what the meter verifies is what the supplier signed.
import struct

from .errors import Rejected, MALFORMED

MAX_DEPTH = 8


class Tag:
    """A tagged item (only tag 18, COSE_Sign1, is used by this protocol)."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value


def _head(major, arg):
    mt = major << 5
    if arg < 24:
        return bytes((mt | arg,))
    if arg < 0x100:
        return bytes((mt | 24, arg))
    if arg < 0x10000:
        return struct.pack(">BH", mt | 25, arg)
    if arg < 0x100000000:
        return struct.pack(">BI", mt | 26, arg)
    if arg < 0x10000000000000000:
        return struct.pack(">BQ", mt | 27, arg)
    raise ValueError("integer out of CBOR range")


def _encode(obj, out):
    # bool before int: True is an int on CPython.
    if obj is False:
        out.append(b"\xf4")
    elif obj is True:
        out.append(b"\xf5")
    elif obj is None:
        out.append(b"\xf6")
    elif isinstance(obj, int):
        out.append(_head(0, obj) if obj >= 0 else _head(1, -1 - obj))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        out.append(_head(2, len(obj)))
        out.append(bytes(obj))
    elif isinstance(obj, str):
        b = obj.encode("utf-8")
        out.append(_head(3, len(b)))
        out.append(b)
    elif isinstance(obj, (list, tuple)):
        out.append(_head(4, len(obj)))
        for item in obj:
            _encode(item, out)
    elif isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (int, str)) or isinstance(k, bool):
                raise ValueError("map keys must be integers or text")
            items.append((encode(k), v))
        items.sort(key=lambda kv: kv[0])
        out.append(_head(5, len(items)))
        for kb, v in items:
            out.append(kb)
            _encode(v, out)
    elif isinstance(obj, Tag):
        out.append(_head(6, obj.tag))
        _encode(obj.value, out)
    else:
        raise ValueError("cannot encode %s in deterministic CBOR" % type(obj).__name__)


def encode(obj):
    """Deterministic encoding of ints, bytes, str, list/tuple, dict, bool, None, Tag."""
    out = []
    _encode(obj, out)
    return b"".join(out)


class _Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def fail(self, why):
        raise Rejected(MALFORMED, "CBOR: %s at byte %d" % (why, self.pos))

    def take(self, n):
        start = self.pos
        end = start + n
        if end > len(self.data):
            self.fail("truncated")
        self.pos = end
        return self.data[start:end]

    def head(self):
        """Return (major, argument, additional info); enforce shortest arguments."""
        if self.pos >= len(self.data):
            self.fail("truncated")
        ib = self.data[self.pos]
        self.pos += 1
        major = ib >> 5
        ai = ib & 0x1F
        if ai < 24:
            return major, ai, ai
        if ai == 24:
            arg = self.take(1)[0]
            minimum = 24
        elif ai == 25:
            arg = struct.unpack(">H", self.take(2))[0]
            minimum = 0x100
        elif ai == 26:
            arg = struct.unpack(">I", self.take(4))[0]
            minimum = 0x10000
        elif ai == 27:
            arg = struct.unpack(">Q", self.take(8))[0]
            minimum = 0x100000000
        elif ai == 31:
            self.fail("indefinite length")
        else:
            self.fail("reserved additional info")
        # Simple values (major 7) with ai 24..27 are floats or extended simples: refused below.
        if major != 7 and arg < minimum:
            self.fail("non-shortest argument")
        return major, arg, ai

    def item(self, depth):
        if depth > MAX_DEPTH:
            self.fail("nested too deeply")
        major, arg, ai = self.head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return bytes(self.take(arg))
        if major == 3:
            raw = bytes(self.take(arg))
            try:
                return _utf8(raw)
            except (UnicodeError, ValueError):
                self.fail("invalid UTF-8")
        if major == 4:
            # Each item takes at least one byte: refuse counts the input cannot hold
            # before allocating anything.
            if arg > len(self.data) - self.pos:
                self.fail("truncated")
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            if 2 * arg > len(self.data) - self.pos:
                self.fail("truncated")
            result = {}
            prev = None
            for _ in range(arg):
                start = self.pos
                key = self.item(depth + 1)
                if not isinstance(key, (int, str)) or isinstance(key, bool):
                    self.fail("map key not an integer or text")
                kb = self.data[start:self.pos]
                if prev is not None and not bytes(prev) < bytes(kb):
                    self.fail("map keys unsorted or duplicated")
                prev = kb
                result[key] = self.item(depth + 1)
            return result
        if major == 6:
            self.fail("unexpected tag %d" % arg)
        # major 7
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai == 22:
            return None
        self.fail("float or unsupported simple value")


def _utf8(raw):
    # Validate by hand (RFC 3629): MicroPython's decoder lets surrogates and some
    # overlong forms through, and both VMs must refuse the same inputs.
    i = 0
    n = len(raw)
    while i < n:
        b = raw[i]
        if b < 0x80:
            i += 1
            continue
        if 0xC2 <= b <= 0xDF:
            need, lo, hi = 1, 0x80, 0xBF
        elif 0xE0 <= b <= 0xEF:
            need = 2
            lo = 0xA0 if b == 0xE0 else 0x80   # no overlong 3-byte forms
            hi = 0x9F if b == 0xED else 0xBF   # no surrogates
        elif 0xF0 <= b <= 0xF4:
            need = 3
            lo = 0x90 if b == 0xF0 else 0x80   # no overlong 4-byte forms
            hi = 0x8F if b == 0xF4 else 0xBF   # nothing above U+10FFFF
        else:
            raise ValueError("invalid UTF-8 lead byte")
        if i + need >= n:
            raise ValueError("truncated UTF-8")
        if not lo <= raw[i + 1] <= hi:
            raise ValueError("invalid UTF-8 continuation")
        for j in range(i + 2, i + need + 1):
            if not 0x80 <= raw[j] <= 0xBF:
                raise ValueError("invalid UTF-8 continuation")
        i += need + 1
    return raw.decode("utf-8")


def _finish(reader, value):
    if reader.pos != len(reader.data):
        reader.fail("trailing bytes")
    return value


def decode(data):
    """Decode exactly one deterministic CBOR item (no tags); raise Rejected(MALFORMED)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Rejected(MALFORMED, "CBOR: input is not bytes")
    reader = _Reader(memoryview(data))
    return _finish(reader, reader.item(0))


def decode_tagged(data, tag):
    """Decode one item that may carry `tag` outermost. Return (was_tagged, value)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Rejected(MALFORMED, "CBOR: input is not bytes")
    reader = _Reader(memoryview(data))
    if len(data) and data[0] >> 5 == 6:
        major, arg, ai = reader.head()
        if arg != tag:
            reader.fail("unexpected tag %d" % arg)
        return True, _finish(reader, reader.item(1))
    return False, _finish(reader, reader.item(0))
