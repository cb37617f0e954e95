# Where vouchers and keypad codes go when they are issued or exported again: standard
# output, one file (text, JSON Lines, CSV, the terminal QR drawing, CBOR), or a folder of
# one file per voucher (PNG, SVG, CBOR). A code (SPEC.md §8) has text (its 20 digits in
# groups of four), JSON and CSV forms only: it is read out or printed, never signed bytes. Files are written whole (host/output.py): a file of several vouchers
# appears under its name only once it is complete up to a whole voucher, and a folder's
# files one by one. The sink says which vouchers it has written whole, so the issuer can
# record what was delivered where (host/db.py, schema v4).
import csv
import io
import os

from protocol import keycode

from . import delivery
from .errors import TopupError
from .issuer import ranges
from .money import format_pence
from .output import OutputFile, StandardOutput, check_target, write_whole
from .registry import format_eui64

FORMATS = ("text", "json", "csv", "cbor", "qr", "png", "svg")
FORMAT_HELP = ("text (one OTU1:… line each), json (JSON Lines), csv (a header, then one row "
               "each), cbor (COSE_Sign1; a CBOR sequence on stdout), qr (drawn on the "
               "terminal), png, svg")
CODE_FORMATS = ("text", "json", "csv")
CODE_FORMAT_HELP = ("text (one code a line, in groups of four: 1234 5678 9012 3456 7890), "
                    "json (JSON Lines), csv (a header, then one row each)")
CSV_COLUMNS = ("form", "device", "sequence", "amount_pence", "amount", "issued_utc",
               "expires_utc", "kid", "ref", "text")


def csv_line(values):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(values)
    return buf.getvalue()


CSV_HEADER = csv_line(CSV_COLUMNS).encode("utf-8")


def render(fmt, v):
    """The bytes of voucher or code `v` (host.issuer.Issued) in a stream format."""
    if fmt == "csv":
        return csv_line((
            "code" if v.is_code else "voucher", format_eui64(v.device), v.sequence, v.amount,
            "%d.%02d" % divmod(v.amount, 100), delivery.utc_or_none(v.issued) or v.issued,
            delivery.utc_or_none(v.expires) or (v.expires if v.expires is not None else ""),
            v.kid.hex(), v.ref.hex(),
            keycode.grouped(v.code) if v.is_code else delivery.to_text(v.cose))).encode("utf-8")
    if v.is_code:
        if fmt == "text":
            return (keycode.grouped(v.code) + "\n").encode("ascii")
        if fmt == "json":
            return (delivery.to_json(v) + "\n").encode("utf-8")
        raise TopupError("a keypad code has no %s form (use text, json or csv)" % fmt)
    if fmt == "text":
        return (delivery.to_text(v.cose) + "\n").encode("ascii")
    if fmt == "json":
        return (delivery.to_json(v) + "\n").encode("utf-8")
    if fmt == "qr":
        buf = io.StringIO()
        buf.write("%s  seq %d  %s\n" % (format_eui64(v.device), v.sequence,
                                         format_pence(v.amount)))
        delivery.qr_terminal(v.cose, buf)
        buf.write(delivery.to_text(v.cose) + "\n\n")
        return buf.getvalue().encode("utf-8")
    if fmt == "cbor":
        return bytes(v.cose)
    raise ValueError(fmt)


def file_bytes(fmt, v):
    """The bytes of the one-voucher file of `v` in format png, svg or cbor."""
    if v.is_code:
        raise TopupError("a keypad code has no %s form (use text, json or csv)" % fmt)
    if fmt == "cbor":
        return bytes(v.cose)
    buf = io.BytesIO()
    if fmt == "png":
        delivery.qr(v.cose).save(buf, kind="png", scale=6, border=4)
    elif fmt == "svg":
        delivery.qr(v.cose).save(buf, kind="svg", scale=4, border=4)
    else:
        raise ValueError(fmt)
    return buf.getvalue()


def file_name(fmt, device, sequence):
    return "%s-%d.%s" % (format_eui64(device), sequence, fmt)


class Sink:
    """Where `count` vouchers in format `fmt` go: `out` is a path, a folder, "-" or None
    (the format's default). Set up, and checked, before anything is issued.

    `destination` is what the database records (`-`, an absolute path, or an absolute
    folder path ending in "/"); `label` is how to tell a user. `delivered()` is the list
    of [(device, first, last)] written whole and not yet recorded."""

    def __init__(self, fmt, out, count, force=False, predicted=None):
        if fmt not in FORMATS:
            raise TopupError("unknown format %r" % fmt)
        self.fmt = fmt
        self.force = force
        self.out = None       # an OutputFile or StandardOutput (stream formats)
        self.dir = None       # a folder (one file per voucher)
        self.staged = []      # (device, sequence) in a file not yet renamed into place
        self.pending = []     # [(device, first, last)] delivered, not yet recorded
        self.files = []       # one-voucher files written
        self.count = 0        # vouchers written whole
        self.header = CSV_HEADER if fmt == "csv" else b""  # written before the first record
        stream = fmt in ("text", "json", "csv", "qr") or (fmt == "cbor" and out in (None, "-"))
        self.stream = stream
        if stream and out in (None, "-"):
            self.out = StandardOutput()
            if fmt == "cbor" and self.out.isatty():
                raise TopupError("refusing to write binary CBOR to a terminal; use --out PATH")
            self.destination, self.label = "-", "standard output"
        elif stream or (count == 1 and out is not None and not out.endswith(os.sep)
                        and not os.path.isdir(out)):
            self.out = OutputFile(out, force)
            self.destination, self.label = os.path.abspath(out), out
        else:
            self.dir = "." if out is None else out
            if os.path.exists(self.dir) and not os.path.isdir(self.dir):
                raise TopupError("--out %s must be a directory for %d vouchers"
                                 % (self.dir, count))
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as e:
                raise TopupError("cannot create directory %s: %s"
                                 % (self.dir, e.strerror or e)) from None
            self.destination = os.path.join(os.path.abspath(self.dir), "")
            self.label = "folder %s" % self.dir
            for device, seq in (predicted or ()):
                check_target(os.path.join(self.dir, file_name(fmt, device, seq)), force)

    @property
    def to_file(self):
        return isinstance(self.out, OutputFile) and not self.out.in_place

    def delivered(self):
        return self.pending

    def write(self, vouchers):
        """Write vouchers (host.issuer.Issued, all or until an error: WriteError, with what
        came before written whole)."""
        if self.out is not None:
            encode = render if self.stream else file_bytes
            data = b"".join(encode(self.fmt, v) for v in vouchers)
            if self.header and vouchers:
                self.out.write(self.header + data)
                self.header = b""
            else:
                self.out.write(data)
            done = [(v.device, v.sequence) for v in vouchers]
            self.count += len(done)
            if self.to_file:
                self.staged.extend(done)  # delivered when the file is renamed into place
            else:
                self.pending.extend(ranges(done))
            return
        done = []
        try:
            for v in vouchers:
                path = os.path.join(self.dir, file_name(self.fmt, v.device, v.sequence))
                write_whole(path, file_bytes(self.fmt, v), force=self.force)
                self.files.append(path)
                done.append((v.device, v.sequence))
        finally:
            self.count += len(done)
            self.pending.extend(ranges(done))

    def finish(self):
        """Put a file of several vouchers in place (nothing at all if none was written);
        WriteError if that fails."""
        if self.out is None:
            return
        if self.to_file and not self.staged:
            self.out.abort()
            return
        self.out.commit()
        if self.staged:
            self.pending.extend(ranges(self.staged))
            self.staged = []

    def abort(self):
        if self.out is not None:
            self.out.abort()
        self.staged = []
