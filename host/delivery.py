# Delivery formats for an issued voucher: text (OTU1: + base45), QR code (PNG, SVG, the
# terminal), raw CBOR (the COSE_Sign1 bytes), and JSON for integration. Also the reverse
# for `topup verify`: voucher bytes from a text form or a file.
import base64
import datetime
import io
import json
import os

import segno

from protocol import voucher as pv
from protocol.errors import Rejected

from .errors import TopupError
from .money import format_pence
from .registry import format_eui64

QR_ERROR = "m"


def to_text(raw):
    return pv.to_text(raw)


def utc(ts):
    """ISO 8601 UTC for Unix time `ts`; for a time no calendar date can show (before year
    1 or after 9999: a voucher may carry any time up to 2^48 - 1 s, SPEC.md §2), the raw
    number of seconds, said so. None for None."""
    if ts is None:
        return None
    return utc_or_none(ts) or "%d s after 1970 (no calendar date)" % ts


def utc_or_none(ts):
    """ISO 8601 UTC for `ts`, or None if there is none (None, or out of the calendar)."""
    if ts is None:
        return None
    try:
        return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return None


def to_dict(v):
    """JSON-ready fields of an issued voucher or keypad code (host.issuer.Issued)."""
    if getattr(v, "form", 1) == 2:
        from protocol import keycode
        return {
            "form": "code",
            "device": format_eui64(v.device),
            "sequence": v.sequence,
            "amount_pence": v.amount,
            "amount": format_pence(v.amount),
            "issued": v.issued,
            "issued_utc": utc_or_none(v.issued),
            "code_kid": v.kid.hex(),
            "ref": v.ref.hex(),
            "code": keycode.grouped(v.code),
        }
    return {
        "device": format_eui64(v.device),
        "sequence": v.sequence,
        "amount_pence": v.amount,
        "amount": format_pence(v.amount),
        "issued": v.issued,
        "issued_utc": utc_or_none(v.issued),
        "expires": v.expires,
        "expires_utc": utc_or_none(v.expires),
        "kid": v.kid.hex(),
        "ref": v.ref.hex(),
        "text": to_text(v.cose),
        "cose_base64": base64.b64encode(v.cose).decode("ascii"),
    }


def to_json(v):
    """One line of JSON (JSON Lines for a batch), UTF-8 (the £ is written as it is)."""
    return json.dumps(to_dict(v), separators=(",", ":"), ensure_ascii=False)


def json_disagreements(obj, raw, v=None):
    """The informative fields of a JSON voucher (`obj`, as `to_dict` writes it) that
    disagree with the signed bytes `raw`: [(field, the JSON's value, the signed value)].
    Only the COSE bytes count (a meter sees nothing else); fields a JSON object leaves out
    are not checked. [] if the bytes do not decode (the verdict says why). `v`: the
    voucher already parsed from `raw`, if it was."""
    if v is None:
        try:
            v = pv.parse(raw)
        except Rejected:
            return []
    from .issuer import Issued
    truth = to_dict(Issued(v.device, v.sequence, v.amount, v.issued, v.expires, v.kid, v.ref,
                           bytes(raw)))
    out = []
    for field, value in truth.items():
        if field not in obj:
            continue
        given = obj[field]
        same = given == value
        if not same and field == "device" and isinstance(given, str):
            try:
                from .registry import parse_eui64
                same = parse_eui64(given) == v.device
            except TopupError:
                same = False
        if not same and field in ("kid", "ref") and isinstance(given, str):
            same = given.lower() == value
        if not same and field == "text" and isinstance(given, str):
            try:
                same = pv.from_text(given) == bytes(raw)
            except Rejected:
                same = False
        if not same:
            out.append((field, given, value))
    return out


def qr(raw):
    """A segno QR code of the voucher's text form (alphanumeric mode, level M)."""
    return segno.make_qr(to_text(raw), error=QR_ERROR, boost_error=False)


def qr_terminal(raw, out):
    """Draw the QR code on a terminal (compact: two modules per character cell)."""
    buf = io.StringIO()
    qr(raw).terminal(out=buf, compact=True, border=2)
    out.write(buf.getvalue())


def write_png(raw, path, scale=6):
    qr(raw).save(path, kind="png", scale=scale, border=4)


def write_svg(raw, path, scale=4):
    qr(raw).save(path, kind="svg", scale=scale, border=4)


def write_cbor(raw, path):
    with open(path, "wb") as f:
        f.write(raw)


_CODE_CHARS = frozenset("0123456789 -\t")


def looks_like_code(arg):
    """Whether a command-line argument is meant as a keypad code (SPEC.md §8): digits with
    any spaces or dashes (however many: the meter, or `topup verify`, says whether there are
    20 with a fitting check digit), or a short run of mostly digits with a letter or two in
    it (a mistyped code: CODE_INCOMPLETE, not "not a voucher"); never the name of an
    existing file, and never a voucher's text form (OTU1:…, far longer)."""
    if not isinstance(arg, str) or not arg.strip() or os.path.exists(arg):
        return False
    if all(c in _CODE_CHARS for c in arg):
        return any(c.isdigit() for c in arg)
    digits = sum(c.isdigit() for c in arg)
    return (len(arg) <= 40 and digits >= 12 and ":" not in arg
            and all(c.isalnum() or c in " -\t" for c in arg) and digits * 4 >= len(arg) * 3)


def load(arg):
    """Voucher bytes from a text form (`OTU1:…`), or a file holding one or raw CBOR.

    Raises TopupError if `arg` is neither a text form nor a readable file, and
    protocol.errors.Rejected(MALFORMED) if a text form does not decode.
    Returns (bytes, description of the source).
    """
    items = load_items(arg)
    first = items[0]
    if first.error is not None:
        raise first.error
    return first.raw, first.source


class Item:
    """One voucher found in an argument or file: `raw` bytes (or `error`, a Rejected, if
    the item does not even decode), `source` (where it was: "line 3 of batch.jsonl"), and
    `claims`, the JSON object it came in (None for text and CBOR)."""

    __slots__ = ("raw", "source", "claims", "error")

    def __init__(self, raw, source, claims=None, error=None):
        self.raw, self.source, self.claims, self.error = raw, source, claims, error


def load_items(arg):
    """Every voucher in a text form, or in a file: one or more text forms (one a line),
    JSON (one object, or JSON Lines as `topup issue -f json` writes them), or CBOR (one
    COSE_Sign1, or a CBOR sequence of them as `topup issue -f cbor` writes to stdout).

    Raises TopupError if `arg` is neither a text form nor a readable file. An item that does
    not decode is returned with its `error` (MALFORMED), not raised.
    """
    stripped = arg.strip()
    if stripped[:len(pv.TEXT_PREFIX)].upper() == pv.TEXT_PREFIX:
        return [_text_item(stripped, "text form")]
    if not os.path.exists(arg):
        raise TopupError("%r is neither a voucher text (OTU1:…) nor a file" % _short(arg))
    if os.path.isdir(arg):
        raise TopupError("%s is a directory, not a voucher file" % arg)
    try:
        with open(arg, "rb") as f:
            data = f.read(64 << 20)
    except OSError as e:
        raise TopupError("cannot read %s: %s" % (arg, e.strerror or e)) from None
    if not data.strip():
        raise TopupError("%s is empty" % arg)
    head = data.lstrip()[:len(pv.TEXT_PREFIX)]
    if head.upper() == pv.TEXT_PREFIX.encode("ascii"):
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            return [Item(None, "text form in %s" % arg, error=Rejected(
                1, "file %s starts like a text form but is not ASCII" % arg))]
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        if len(lines) == 1:
            return [_text_item(lines[0][1], "text form in %s" % arg)]
        return [_text_item(ln, "line %d of %s" % (n, arg)) for n, ln in lines]
    if data.lstrip()[:1] == b"{":
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return [_json_item(obj, "JSON in %s" % arg)]
        out = []
        for n, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            where = "line %d of %s" % (n, arg)
            try:
                obj = json.loads(line)
            except ValueError:
                out.append(Item(None, where, error=Rejected(1, "not a JSON object")))
                continue
            out.append(_json_item(obj, where))
        return out
    return _cbor_items(data, arg)


def _text_item(text, source):
    try:
        return Item(pv.from_text(text), source)
    except Rejected as e:
        return Item(None, source, error=e)


def _json_item(obj, source):
    """The voucher of a JSON object: its COSE bytes (cose_base64, else text)."""
    if not isinstance(obj, dict):
        return Item(None, source, error=Rejected(1, "not a JSON object"))
    raw = None
    try:
        if isinstance(obj.get("cose_base64"), str):
            raw = base64.b64decode(obj["cose_base64"], validate=True)
        elif isinstance(obj.get("text"), str):
            raw = pv.from_text(obj["text"])
    except (ValueError, Rejected) as e:
        return Item(None, source, obj, Rejected(1, "its voucher bytes do not decode (%s)"
                                                % (getattr(e, "detail", "") or e)))
    if raw is None:
        return Item(None, source, obj, Rejected(1, 'no "cose_base64" or "text" member'))
    return Item(raw, source, obj)


def _cbor_items(data, arg):
    """Split a CBOR sequence of COSE_Sign1 items; anything that does not split is one item
    (whose check then says what is wrong with it)."""
    from .receipts_io import _skip
    items, pos = [], 0
    try:
        while pos < len(data):
            end = _skip(data, pos)
            items.append((pos, data[pos:end]))
            pos = end
    except (EOFError, ValueError):
        items = None
    if not items or len(items) == 1:
        return [Item(data, "raw CBOR in %s" % arg)]
    return [Item(raw, "item %d (byte %d) of %s" % (n, at, arg))
            for n, (at, raw) in enumerate(items, 1)]


def _short(s, n=40):
    return s if len(s) <= n else s[:n] + "…"
