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
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_dict(v):
    """JSON-ready fields of an issued voucher (host.issuer.Issued)."""
    return {
        "device": format_eui64(v.device),
        "sequence": v.sequence,
        "amount_pence": v.amount,
        "amount": format_pence(v.amount),
        "issued": v.issued,
        "issued_utc": utc(v.issued),
        "expires": v.expires,
        "expires_utc": utc(v.expires),
        "kid": v.kid.hex(),
        "ref": v.ref.hex(),
        "text": to_text(v.cose),
        "cose_base64": base64.b64encode(v.cose).decode("ascii"),
    }


def to_json(v):
    """One line of JSON (JSON Lines for a batch)."""
    return json.dumps(to_dict(v), separators=(",", ":"))


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


def load(arg):
    """Voucher bytes from a text form (`OTU1:…`), or a file holding one or raw CBOR.

    Raises TopupError if `arg` is neither a text form nor a readable file, and
    protocol.errors.Rejected(MALFORMED) if a text form does not decode.
    Returns (bytes, description of the source).
    """
    stripped = arg.strip()
    if stripped[:len(pv.TEXT_PREFIX)].upper() == pv.TEXT_PREFIX:
        return pv.from_text(stripped), "text form"
    if not os.path.exists(arg):
        raise TopupError("%r is neither a voucher text (OTU1:…) nor a file" % _short(arg))
    if os.path.isdir(arg):
        raise TopupError("%s is a directory, not a voucher file" % arg)
    try:
        with open(arg, "rb") as f:
            data = f.read(1 << 16)
    except OSError as e:
        raise TopupError("cannot read %s: %s" % (arg, e.strerror or e)) from None
    head = data.lstrip()[:len(pv.TEXT_PREFIX)]
    if head.upper() == pv.TEXT_PREFIX.encode("ascii"):
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise Rejected(1, "file %s starts like a text form but is not ASCII" % arg) from None
        return pv.from_text(text), "text form in %s" % arg
    if data.lstrip()[:1] == b"{":
        try:
            obj = json.loads(data)
            return pv.from_text(obj["text"]), "JSON in %s" % arg
        except (ValueError, KeyError, TypeError):
            pass
    return data, "raw CBOR in %s" % arg


def _short(s, n=40):
    return s if len(s) <= n else s[:n] + "…"
