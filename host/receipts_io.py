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
import hashlib
import json
import os
import re

from protocol import cbor, cose, receipt as pr
from protocol.errors import Rejected

from .errors import TopupError
from .registry import format_eui64

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
                 "after", "sequence", "ref", "amount", "rejections", "faults", "form",
                 "supply", "kid", "tbs", "sig", "item", "offset")


# --- the fast path --------------------------------------------------------------------
# A meter writes one exact layout (deterministic CBOR, SPEC.md §1 and §4). This parser
# reads that layout directly — one regular expression for the whole receipt, integers in
# their shortest form included — and answers None for anything else, which then goes to
# the generic strict decoder (protocol.receipt.parse): that either accepts it with the
# same fields or says precisely what is wrong. The tests hold the two to that: for any
# input, fast_parse is None or equals the generic answer (and `parse_rows` of a file
# equals parsing its items one by one).

_PROT_HEAD = b"\x4d\xa2\x01\x27\x04\x48"  # bstr(13) {1: -8, 4: bstr(8) ...
assert cose.protected_header(bytes(8)) == _PROT_HEAD[1:] + bytes(8)
_TBS_PREFIX = b"\x84\x6aSignature1"
_TBS_HEAD = _TBS_PREFIX + _PROT_HEAD  # Sig_structure up to the kid
_EMPTY_AAD = b"\x40"


def _int_re(small, heads):
    """A CBOR integer token in shortest form: `small` the one-byte values, `heads` the
    initial bytes of the 1-, 2-, 4- and 8-byte forms (each too big for the next smaller)."""
    h1, h2, h4, h8 = heads
    return (b"(" + small + b"|" + h1 + rb"[\x18-\xff]|" + h2 + rb"[\x01-\xff].|" + h4 +
            rb"(?:[\x01-\xff].|\x00[\x01-\xff])..|" + h8 +
            rb"(?:[\x01-\xff]...|\x00[\x01-\xff]..|\x00\x00[\x01-\xff].|\x00\x00\x00[\x01-\xff])"
            rb"....)")


_UINT = _int_re(rb"[\x00-\x17]", (rb"\x18", rb"\x19", rb"\x1a", rb"\x1b"))
_POS = _int_re(rb"[\x01-\x17]", (rb"\x18", rb"\x19", rb"\x1a", rb"\x1b"))  # > 0
_INT = _int_re(rb"[\x00-\x17\x20-\x37]",
               (rb"[\x18\x38]", rb"[\x19\x39]", rb"[\x1a\x3a]", rb"[\x1b\x3b]"))

# COSE_Sign1 [protected {1: -8 (EdDSA), 4: kid}, {}, payload, signature], optionally tag
# 18; payload a bstr of 24..255 bytes holding the map {1: device, 2: index, 3: kind,
# 4: time, 5: prev, 6: before, 7: after, then by kind: 8: sequence, 9: voucher ref,
# 10: amount (kind 1) | 10: amount (kind 2) | 11: rejections (kind 3) | 12: faults
# (kind 4), then optionally 13: form (kind 1, 1 or 2) and 14: supply (kinds 1 and 2, 0..2)}
# (SPEC.md §4). Groups: 1 kid, 2 the payload bstr (head included), 3 the map's head byte,
# 4 device, 5 index, 6 kind, 7 time, 8 prev, 9 before, 10 after, 11 sequence, 12 ref,
# 13 amount, 14 the rejections map, 15 the faults map, 16 form, 17 supply, 18 signature.
# After the match (`_fields_fit`): the payload's length byte, that the fields present are
# exactly the kind's (and the map's entry count says as many), and (kinds 3 and 4) that
# the counts map decodes strictly to unsigned integers.
_RECEIPT = re.compile(
    rb"\xd2?\x84" + re.escape(_PROT_HEAD) + rb"(.{8})\xa0"
    rb"(\x58[\x18-\xff]([\xa8-\xac])\x01\x48(.{8})\x02" + _UINT +
    rb"\x03([\x01-\x04])\x04" + _UINT + rb"\x05\x58\x20(.{32})\x06" + _INT +
    rb"\x07" + _INT + rb"(?:\x08" + _UINT + rb"\x09\x50(.{16}))?(?:\x0a" + _POS +
    rb")?(?:\x0b([\xa0-\xbb].*)|\x0c([\xa0-\xbb].*))?(?:\x0d([\x01\x02]))?"
    rb"(?:\x0e([\x00-\x02]))?"
    rb")\x58\x40(.{64})", re.S)
assert _RECEIPT.groups == 18


def _counts(blob):
    """A kind 3 or 4 receipt's counts map, decoded strictly ({uint: uint}), or None."""
    try:
        counts = cbor.decode(blob)
    except Rejected:
        return None
    if not isinstance(counts, dict):
        return None
    for k, v in counts.items():
        if type(k) is not int or type(v) is not int or k < 0 or v < 0:
            return None
    return counts


def _fields_fit(head, kb, st, amt, rej, flt, form, supply):
    """Whether the fields matched are exactly those of the receipt's kind, as many as the
    map's head says: (kind, rejections, faults), or None (then the generic parser answers,
    with the same result or the precise refusal)."""
    kind = kb[0]
    n = 7
    if kind == 1:
        if st is None or amt is None or rej is not None or flt is not None:
            return None
        n += 3
    elif kind == 2:
        if st is not None or amt is None or rej is not None or flt is not None \
                or form is not None:
            return None
        n += 1
    else:
        if st is not None or amt is not None or form is not None or supply is not None:
            return None
        blob, other = (rej, flt) if kind == 3 else (flt, rej)
        if blob is None or other is not None:
            return None
        n += 1
    n += (form is not None) + (supply is not None)
    if head[0] - 0xA0 != n:
        return None
    if kind <= 2:
        return kind, None, None
    counts = _counts(blob)
    if counts is None:
        return None
    return (kind, counts, None) if kind == 3 else (kind, None, counts)


# A token's value is int.from_bytes(token) - _BASE[its first byte], then -1 - that for
# a negative one (first byte 0x20..0x3b).
_BASE = [0] * 256
for _major in (0x00, 0x20):
    for _ai in range(24):
        _BASE[_major | _ai] = _major
    for _ai, _width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        _BASE[_major | _ai] = (_major | _ai) << (8 * _width)
del _major, _ai, _width


def fast_parse(raw):
    """A Parsed for a receipt in the meter's exact canonical layout, or None."""
    m = _RECEIPT.fullmatch(raw)
    if m is None:
        return None
    (kid, pay, head, device, it, kb, tt, prev, bt, at, st, ref, amt, rej, flt, form, supply,
     sig) = m.groups()
    if pay[1] + 2 != len(pay):
        return None
    kc = _fields_fit(head, kb, st, amt, rej, flt, form, supply)
    if kc is None:
        return None
    fb, base = int.from_bytes, _BASE
    r = Parsed()
    r.raw = raw
    r.device, r.kid, r.prev, r.ref, r.sig = device, kid, prev, ref, sig
    r.index = fb(it, "big") - base[it[0]]
    r.kind, r.rejections, r.faults = kc
    r.time = fb(tt, "big") - base[tt[0]]
    b = fb(bt, "big") - base[bt[0]]
    r.before = -1 - b if bt[0] & 0x20 else b
    a = fb(at, "big") - base[at[0]]
    r.after = -1 - a if at[0] & 0x20 else a
    r.sequence = None if st is None else fb(st, "big") - base[st[0]]
    r.amount = None if amt is None else fb(amt, "big") - base[amt[0]]
    r.form = None if form is None else form[0]
    r.supply = None if supply is None else supply[0]
    r.tbs = _TBS_HEAD + kid + _EMPTY_AAD + pay
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
    r.faults = dict(rec.faults) if rec.faults is not None else None
    r.form, r.supply = rec.form, rec.supply
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


def _cbor_item(data, pos, n, path):
    """(start, stop) of item `n`, the receipt at byte `pos` of a CBOR sequence: the
    content of a byte string, or a bare COSE_Sign1 (tag 18). ReceiptFileError if not."""
    end = len(data)
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
        return start, start + length
    if ib == 0xD2:  # a bare COSE_Sign1, tag 18
        try:
            return pos, _skip(data, pos)
        except EOFError:
            raise ReceiptFileError(path, "truncated COSE_Sign1 (the file ends inside it)",
                                   n, pos) from None
        except ValueError as e:
            raise ReceiptFileError(path, "not a receipt: %s" % e, n, pos) from None
    raise ReceiptFileError(path, "expected a receipt (a CBOR byte string), found "
                           "initial byte 0x%02x" % ib, n, pos)


def split_cbor(data, path="<data>"):
    """[(raw receipt bytes, item number from 1, byte offset)] from a CBOR sequence."""
    if not isinstance(data, bytes):
        data = bytes(data)
    items = []
    pos, n, end = 0, 0, len(data)
    while pos < end:
        n += 1
        start, stop = _cbor_item(data, pos, n, path)
        items.append((data[start:stop], n, pos))
        pos = stop
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
    return parse_items(_read(path), str(path))


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TopupError("cannot read %s: %s" % (path, e.strerror or e)) from None


def parse_items(data, path="<data>"):
    fmt = detect(data)
    items = split_jsonl(data, path) if fmt == "jsonl" else split_cbor(data, path)
    what = "line" if fmt == "jsonl" else "item"
    out = []
    fast = fast_parse
    for raw, n, offset in items:
        r = fast(raw) or _parse_item(raw, path, n, offset, what)
        r.item, r.offset = n, offset
        out.append(r)
    return out


def _parse_item(raw, path, n, offset, what="item"):
    try:
        return parse(raw)
    except Rejected as e:
        raise ReceiptFileError(path, "not a valid receipt (%s)" % (e.detail or e), n,
                               offset, what=what) from None


# --- rows: from file bytes straight to what the importer stores -----------------------
# A row is a tuple: (device, kid, signed message, hash, index, hash, kind, prev, time,
# balance before, balance after, sequence, voucher ref, amount, raw, form, supply, counts
# JSON). The signed message is signature || Sig_structure, what libsodium's
# crypto_sign_open takes; row[ROW_VALUES] are the receipts table's columns idx .. supply in
# that order (the blobs as bytearrays, which sqlite3 binds without its adaptation look-up),
# and row[ROW_COUNTS] the counts map as JSON: the rejections column of a kind-3 receipt,
# the faults column of a kind-4 one, None for the others. `hash` (row[3], bytes) is SHA-256
# of raw.
ROW_DEVICE, ROW_KID, ROW_SIGNED, ROW_HASH = 0, 1, 2, 3
ROW_VALUES = slice(4, 17)
ROW_VALUES_COUNTS = slice(4, 18)
ROW_INDEX, ROW_KIND = 4, 6
ROW_COUNTS = 17


def row_of(r):
    """The row of a Parsed (sets r.hash)."""
    h = r.hash = hashlib.sha256(r.raw).digest()
    counts = r.rejections if r.faults is None else r.faults
    return (r.device, r.kid, r.sig + r.tbs, h, r.index, bytearray(h), r.kind,
            bytearray(r.prev), r.time, r.before, r.after, r.sequence,
            None if r.ref is None else bytearray(r.ref), r.amount, bytearray(r.raw), r.form,
            r.supply, None if counts is None else json.dumps(counts, sort_keys=True))


def parse_rows(data, path="<data>"):
    """The rows of every receipt in a file's bytes, structure checked: the same receipts,
    the same checks and the same ReceiptFileError as parse_items, in one pass."""
    if detect(data) == "jsonl":
        return [row_of(r) for r in parse_items(data, path)]
    data = bytes(data)
    try:
        return _rows(data, path)
    except ReceiptFileError:
        # parse_items reports the first item that does not split before the first that
        # does not parse; say what it says.
        return [row_of(r) for r in parse_items(data, path)]


def _rows(data, path):
    buf = bytearray(data)  # its slices are bytearrays (match groups are bytes)
    full = _RECEIPT.fullmatch
    fb, base, sha = int.from_bytes, _BASE, hashlib.sha256
    tbs_head, aad = _TBS_HEAD, _EMPTY_AAD
    rows = []
    append = rows.append
    pos, n, end = 0, 0, len(data)
    while pos < end:
        n += 1
        # The meter's layout in a byte string of one-byte length: matched in place.
        if data[pos] == 0x58 and pos + 1 < end:
            start = pos + 2
            stop = start + data[pos + 1]
            m = full(data, start, stop) if stop <= end else None
            if m is not None:
                (kid, pay, head, device, it, kb, tt, prev, bt, at, st, ref, amt, rej, flt,
                 form, supply, sig) = m.groups()
                # Top-ups and emergency credit here; kinds 3 and 4 (rare) below.
                if (pay[1] + 2 == len(pay) and kb[0] <= 2
                        and _fields_fit(head, kb, st, amt, rej, flt, form, supply)):
                    raw = buf[start:stop]
                    h = sha(raw).digest()
                    b = fb(bt, "big") - base[bt[0]]
                    a = fb(at, "big") - base[at[0]]
                    append((device, kid, b"".join((sig, tbs_head, kid, aad, pay)), h,
                            fb(it, "big") - base[it[0]], bytearray(h), kb[0],
                            bytearray(prev), fb(tt, "big") - base[tt[0]],
                            -1 - b if bt[0] & 0x20 else b, -1 - a if at[0] & 0x20 else a,
                            None if st is None else fb(st, "big") - base[st[0]],
                            None if ref is None else bytearray(ref),
                            fb(amt, "big") - base[amt[0]], raw,
                            None if form is None else form[0],
                            None if supply is None else supply[0], None))
                    pos = stop
                    continue
        # Anything else: item by item, as split_cbor and parse_items would.
        start, stop = _cbor_item(data, pos, n, path)
        raw = data[start:stop]
        append(row_of(fast_parse(raw) or _parse_item(raw, path, n, pos)))
        pos = stop
    return rows


def read_rows(path):
    """parse_rows of a file; ReceiptFileError (nothing imported) as for read_file."""
    return parse_rows(_read(path), str(path))


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
            obj = {"device": format_eui64(r.device), "index": r.index, "kind": r.kind,
                   "cose_base64": obj["cose_base64"]}
        except Rejected:
            pass
        lines.append(json.dumps(obj, separators=(",", ":")) + "\n")
    return "".join(lines).encode("ascii")


def write_receipts(path, raws, fmt="cbor", force=True):
    """Write receipts to `path` as an export file, whole (host/output.py: a temporary file,
    synced, renamed into place; a device or FIFO written in place, never replaced).

    `raws` are receipt COSE bytes. `fmt` is "cbor" (SPEC.md §6) or "jsonl". A reader never
    sees a half-written file under `path`. force=False refuses to replace an existing
    regular file (the CLI's default; `--force`). Returns the number of receipts written.
    """
    from .output import write_whole
    if fmt not in FORMATS:
        raise ValueError("format must be one of %s" % ", ".join(FORMATS))
    raws = [bytes(r) for r in raws]
    data = encode_cbor(raws) if fmt == "cbor" else encode_jsonl(raws)
    write_whole(os.fspath(path), data, force=force)
    return len(raws)
