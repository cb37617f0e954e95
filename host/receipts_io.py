# Receipt export files (SPEC.md §6): reading, structure checks and writing.
#
# The export format is a CBOR sequence (RFC 8742): each receipt's COSE_Sign1 bytes as one
# CBOR byte string, one after another, nothing else. Readers also take, item by item, a
# bare COSE_Sign1 (tag 18, the form `topup issue --format cbor` writes vouchers in), and
# JSON Lines with each receipt in base64 under "cose_base64" (for integrations).
#
# `read_file(path)` parses a whole file and checks every receipt's structure before the
# caller applies anything: a truncated or corrupt file raises ReceiptFileError naming the
# item and the byte. Signatures are not checked here (host/reconcile.py does that against
# the registered device keys: a bad signature is an anomaly to keep, not a corrupt file).
import base64
import binascii
import json
import os
import tempfile

from protocol import cose, receipt as pr
from protocol.errors import Rejected

from .errors import TopupError

FORMATS = ("cbor", "jsonl")
MAX_RECEIPT = 4096  # a v1 receipt is < 300 bytes; anything this big is not one


class ReceiptFileError(TopupError):
    """A receipt file that cannot be imported; nothing of it was applied. Exit code 1."""

    exit_code = 1

    def __init__(self, path, message, item=None, offset=None, what="item"):
        where = []
        if item is not None:
            where.append("%s %d" % (what, item))
        if offset is not None:
            where.append("byte %d" % offset)
        text = "%s: %s%s; nothing imported" % (
            path, "%s: " % ", ".join(where) if where else "", message)
        super().__init__(text)
        self.path, self.item, self.offset = path, item, offset


class Parsed:
    """One structurally valid receipt: its fields, the bytes its signature covers, and
    where it came from. `hash` is SHA-256 of `raw` (what the next receipt's prev holds)."""

    __slots__ = ("raw", "hash", "device", "index", "kind", "time", "prev", "before",
                 "after", "sequence", "ref", "amount", "rejections", "kid", "tbs", "sig",
                 "item", "offset")


# --- the fast path --------------------------------------------------------------------
# A meter writes one exact layout (deterministic CBOR, SPEC.md §1 and §4). This parser
# reads that layout directly, checking as it goes, and answers None for anything else —
# which then goes to the generic strict decoder (protocol.receipt.parse), which either
# accepts it with the same fields or says precisely what is wrong. The tests hold the two
# to that: for any input, fast_parse is None or equals the generic answer.

_PROT_HEAD = b"\x4d\xa2\x01\x27\x04\x48"  # bstr(13) {1: -8, 4: bstr(8) ...
assert cose.protected_header(bytes(8)) == _PROT_HEAD[1:] + bytes(8)
_TBS_PREFIX = b"\x84\x6aSignature1"
_EMPTY_AAD = b"\x40"


class _Defer(Exception):
    pass


def _num(b, i):
    """(value, next offset) of the shortest-form integer (major type 0 or 1) at b[i]."""
    ib = b[i]
    ai = ib & 0x1F
    if ai < 24:
        v = ai
        i += 1
    elif ai == 24:
        v = b[i + 1]
        if v < 24:
            raise _Defer
        i += 2
    elif ai == 25:
        v = b[i + 1] << 8 | b[i + 2]
        if v < 0x100:
            raise _Defer
        i += 3
    elif ai == 26:
        v = int.from_bytes(b[i + 1:i + 5], "big")
        if v < 0x10000:
            raise _Defer
        i += 5
    elif ai == 27:
        v = int.from_bytes(b[i + 1:i + 9], "big")
        if v < 0x100000000:
            raise _Defer
        i += 9
    else:
        raise _Defer
    if ib < 0x20:
        return v, i
    if ib < 0x40:
        return -1 - v, i
    raise _Defer


def fast_parse(raw):
    """A Parsed for a receipt in the meter's exact canonical layout, or None."""
    try:
        p = 1 if raw[0] == 0xD2 else 0
        if raw[p] != 0x84 or raw[p + 1:p + 7] != _PROT_HEAD or raw[p + 15] != 0xA0:
            return None
        q = p + 16
        if raw[q] != 0x58:  # payload bstr, 24..255 bytes
            return None
        s = q + 2
        e = s + raw[q + 1]
        if raw[q + 1] < 24 or e + 66 != len(raw) or raw[e] != 0x58 or raw[e + 1] != 0x40:
            return None
        pl = raw[s:e]
        head = pl[0]
        if pl[1] != 1 or pl[2] != 0x48 or pl[11] != 2:
            return None
        index, i = _num(pl, 12)
        if pl[i] != 3:
            return None
        kind = pl[i + 1]
        if not ((kind == 1 and head == 0xAA) or (kind == 2 and head == 0xA8)) or pl[i + 2] != 4:
            return None  # kind 3 (rare) goes the generic way
        time, i = _num(pl, i + 3)
        if pl[i] != 5 or pl[i + 1] != 0x58 or pl[i + 2] != 0x20 or pl[i + 35] != 6:
            return None
        prev = pl[i + 3:i + 35]
        before, i = _num(pl, i + 36)
        if pl[i] != 7:
            return None
        after, i = _num(pl, i + 1)
        sequence = ref = None
        if kind == 1:
            if pl[i] != 8:
                return None
            sequence, i = _num(pl, i + 1)
            if pl[i] != 9 or pl[i + 1] != 0x50:
                return None
            ref = pl[i + 2:i + 18]
            i += 18
        if pl[i] != 10:
            return None
        amount, i = _num(pl, i + 1)
        if i != len(pl) or amount <= 0 or index < 0 or time < 0 or (kind == 1 and sequence < 0):
            return None
    except (IndexError, _Defer):
        return None
    r = Parsed()
    r.raw = raw
    r.device = pl[3:11]
    r.index, r.kind, r.time, r.prev, r.before, r.after = index, kind, time, prev, before, after
    r.sequence, r.ref, r.amount, r.rejections = sequence, ref, amount, None
    r.kid = raw[p + 7:p + 15]
    r.tbs = _TBS_PREFIX + raw[p + 1:p + 15] + _EMPTY_AAD + raw[q:e]
    r.sig = raw[e + 2:]
    return r


def parse(raw):
    """A Parsed for any structurally valid receipt; Rejected(MALFORMED/BAD_HEADER) if not."""
    raw = bytes(raw)
    r = fast_parse(raw)
    if r is not None:
        return r
    rec = pr.parse(raw)
    msg = cose.decode(raw)
    r = Parsed()
    r.raw = raw
    r.device, r.index, r.kind, r.time, r.prev = (rec.device, rec.index, rec.kind, rec.time,
                                                 rec.prev)
    r.before, r.after = rec.balance_before, rec.balance_after
    r.sequence, r.ref, r.amount = rec.sequence, rec.voucher, rec.amount
    r.rejections = dict(rec.rejections) if rec.rejections is not None else None
    r.kid = msg.kid
    r.tbs = msg.to_be_signed()
    r.sig = msg.signature
    return r


# --- reading --------------------------------------------------------------------------

def _skip(data, pos, depth=0):
    """End offset of the definite-length CBOR item at `pos` (for bare COSE items)."""
    if depth > 8:
        raise ValueError("nested too deeply")
    if pos >= len(data):
        raise EOFError
    ib = data[pos]
    major, ai = ib >> 5, ib & 0x1F
    pos += 1
    if ai < 24:
        arg = ai
    elif ai <= 27:
        n = 1 << (ai - 24)
        if pos + n > len(data):
            raise EOFError
        arg = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    else:
        raise ValueError("indefinite length or reserved value")
    if major in (0, 1, 7):
        return pos
    if major in (2, 3):
        if pos + arg > len(data):
            raise EOFError
        return pos + arg
    if major == 6:
        return _skip(data, pos, depth + 1)
    count = arg if major == 4 else 2 * arg
    for _ in range(count):
        pos = _skip(data, pos, depth + 1)
    return pos


def split_cbor(data, path="<data>"):
    """[(raw receipt bytes, item number from 1, byte offset)] from a CBOR sequence."""
    if not isinstance(data, bytes):
        data = bytes(data)
    items = []
    pos, n, end = 0, 0, len(data)
    while pos < end:
        n += 1
        ib = data[pos]
        major, ai = ib >> 5, ib & 0x1F
        if major == 2:
            if ai < 24:
                length, start = ai, pos + 1
            elif ai <= 27:
                w = 1 << (ai - 24)
                if pos + 1 + w > end:
                    raise ReceiptFileError(path, "truncated in the length of a byte string",
                                           n, pos)
                length = int.from_bytes(data[pos + 1:pos + 1 + w], "big")
                start = pos + 1 + w
            else:
                raise ReceiptFileError(path, "indefinite-length byte string (not allowed)",
                                       n, pos)
            if length > MAX_RECEIPT:
                raise ReceiptFileError(path, "byte string of %d bytes is too long for a "
                                       "receipt" % length, n, pos)
            if start + length > end:
                raise ReceiptFileError(path, "truncated: the receipt needs %d bytes, the file "
                                       "has %d left" % (length, end - start), n, pos)
            items.append((data[start:start + length], n, pos))
            pos = start + length
        elif ib == 0xD2:  # a bare COSE_Sign1, tag 18
            try:
                stop = _skip(data, pos)
            except EOFError:
                raise ReceiptFileError(path, "truncated COSE_Sign1 (the file ends inside it)",
                                       n, pos) from None
            except ValueError as e:
                raise ReceiptFileError(path, "not a receipt: %s" % e, n, pos) from None
            items.append((data[pos:stop], n, pos))
            pos = stop
        else:
            raise ReceiptFileError(path, "expected a receipt (a CBOR byte string), found "
                                   "initial byte 0x%02x" % ib, n, pos)
    return items


def split_jsonl(data, path="<data>"):
    """[(raw, line number, byte offset)] from JSON Lines with "cose_base64" per line."""
    items = []
    pos = 0
    for n, line in enumerate(data.split(b"\n"), 1):
        start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            b64 = obj["cose_base64"] if isinstance(obj, dict) else obj
            if not isinstance(b64, str):
                raise TypeError
            raw = base64.b64decode(b64, validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise ReceiptFileError(path, "not a JSON object with a base64 \"cose_base64\" "
                                   "receipt", n, start, what="line") from None
        items.append((raw, n, start))
    return items


def detect(data):
    """'jsonl' if the file starts (after whitespace) with '{' or '"', else 'cbor'."""
    head = data.lstrip(b" \t\r\n")[:1]
    return "jsonl" if head in (b"{", b'"') else "cbor"


def read_file(path):
    """Every receipt of a file as a Parsed (with .item, .offset), structure checked.

    Raises ReceiptFileError (nothing imported) for an unreadable file, a truncated or
    corrupt item, or an item that is not a well-formed receipt.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TopupError("cannot read %s: %s" % (path, e.strerror or e)) from None
    return parse_items(data, str(path))


def parse_items(data, path="<data>"):
    fmt = detect(data)
    items = split_jsonl(data, path) if fmt == "jsonl" else split_cbor(data, path)
    what = "line" if fmt == "jsonl" else "item"
    out = []
    fast = fast_parse
    for raw, n, offset in items:
        try:
            r = fast(raw) or parse(raw)
        except Rejected as e:
            raise ReceiptFileError(path, "not a valid receipt (%s)" % (e.detail or e), n,
                                   offset, what=what) from None
        r.item, r.offset = n, offset
        out.append(r)
    return out


# --- writing --------------------------------------------------------------------------

def _bstr_head(n):
    if n < 24:
        return bytes((0x40 | n,))
    if n < 0x100:
        return bytes((0x58, n))
    if n < 0x10000:
        return bytes((0x59,)) + n.to_bytes(2, "big")
    return bytes((0x5A,)) + n.to_bytes(4, "big")


def encode_cbor(raws):
    """The export file's bytes: each receipt as a CBOR byte string (SPEC.md §6)."""
    return b"".join(_bstr_head(len(r)) + bytes(r) for r in raws)


def encode_jsonl(raws):
    lines = []
    for raw in raws:
        obj = {"cose_base64": base64.b64encode(bytes(raw)).decode("ascii")}
        try:
            r = parse(raw)
            obj = {"device": r.device.hex(), "index": r.index, "kind": r.kind,
                   "cose_base64": obj["cose_base64"]}
        except Rejected:
            pass
        lines.append(json.dumps(obj, separators=(",", ":")) + "\n")
    return "".join(lines).encode("ascii")


def write_receipts(path, raws, fmt="cbor"):
    """Write receipts to `path` as an export file, atomically (temp file, fsync, rename).

    `raws` are receipt COSE bytes. `fmt` is "cbor" (SPEC.md §6) or "jsonl". A reader never
    sees a half-written file under `path`. Returns the number of receipts written.
    """
    if fmt not in FORMATS:
        raise ValueError("format must be one of %s" % ", ".join(FORMATS))
    raws = [bytes(r) for r in raws]
    data = encode_cbor(raws) if fmt == "cbor" else encode_jsonl(raws)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".receipts-", dir=parent)
    except OSError as e:
        raise TopupError("cannot write %s: %s" % (path, e.strerror or e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise TopupError("cannot write %s: %s" % (path, e.strerror or e)) from None
        raise
    try:
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return len(raws)
