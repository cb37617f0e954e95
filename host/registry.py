# Device registry: EUI-64 device ids, optional device public key (for receipts), limits
# (per-voucher maximum and maximum credit, in pence) and the next sequence to issue.
import re
import time

from protocol.voucher import MAX_AMOUNT

from .db import transaction
from .errors import TopupError
from .money import format_pence

DEFAULT_MAX_VOUCHER = 10000   # £100.00
DEFAULT_MAX_CREDIT = 50000    # £500.00

_SEPARATED = re.compile(r"[0-9A-Fa-f]{2}([-:])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){6}\Z")
_PLAIN = re.compile(r"[0-9A-Fa-f]{16}\Z")


def parse_eui64(text):
    """8 bytes from `00-11-22-33-44-55-66-77`, `00:11:…:77` or `0011223344556677`."""
    s = str(text).strip()
    if _SEPARATED.match(s):
        return bytes.fromhex(s.replace(s[2], ""))
    if _PLAIN.match(s):
        return bytes.fromhex(s)
    raise TopupError("device id %r is not an EUI-64 (write 00-11-22-33-44-55-66-77, "
                     "00:11:22:33:44:55:66:77 or 16 hex digits)" % (text,))


def format_eui64(device):
    return "-".join("%02X" % b for b in device)


def parse_public_key(text):
    s = str(text).strip()
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", s):
        raise TopupError("device public key must be 64 hex digits (32 bytes)")
    return bytes.fromhex(s)


class Device:
    def __init__(self, device, public_key, max_voucher, max_credit, next_sequence, label,
                 created, issued_count=None):
        self.device = bytes(device)
        self.public_key = bytes(public_key) if public_key is not None else None
        self.max_voucher = max_voucher
        self.max_credit = max_credit
        self.next_sequence = next_sequence
        self.label = label
        self.created = created
        self.issued_count = issued_count

    @property
    def name(self):
        return format_eui64(self.device)


_COLUMNS = "device, public_key, max_voucher, max_credit, next_sequence, label, created"


def check_limits(max_voucher, max_credit):
    if not 1 <= max_voucher <= MAX_AMOUNT:
        raise TopupError("per-voucher maximum must be 1p..%s" % format_pence(MAX_AMOUNT))
    if max_credit < max_voucher:
        raise TopupError("maximum credit %s is below the per-voucher maximum %s"
                         % (format_pence(max_credit), format_pence(max_voucher)))


def add_device(conn, device, max_voucher=DEFAULT_MAX_VOUCHER, max_credit=DEFAULT_MAX_CREDIT,
               public_key=None, label=None, now=None):
    check_limits(max_voucher, max_credit)
    created = int(time.time()) if now is None else int(now)
    with transaction(conn):
        if conn.execute("SELECT 1 FROM devices WHERE device = ?", (device,)).fetchone():
            raise TopupError("device %s is already registered" % format_eui64(device))
        conn.execute("INSERT INTO devices (device, public_key, max_voucher, max_credit, "
                     "next_sequence, label, created) VALUES (?, ?, ?, ?, 1, ?, ?)",
                     (device, public_key, max_voucher, max_credit, label, created))
    return get_device(conn, device)


def find_device(conn, device):
    """The Device, or None."""
    r = conn.execute("SELECT %s FROM devices WHERE device = ?" % _COLUMNS, (device,)).fetchone()
    if r is None:
        return None
    count = conn.execute("SELECT count(*) FROM vouchers WHERE device = ?", (device,)).fetchone()[0]
    return Device(*r, issued_count=count)


def get_device(conn, device):
    """The Device, or TopupError naming the unknown device."""
    d = find_device(conn, device)
    if d is None:
        raise TopupError("unknown device %s (register it with `topup device add`)"
                         % format_eui64(device))
    return d


def list_devices(conn):
    rows = conn.execute("SELECT %s, (SELECT count(*) FROM vouchers v WHERE v.device = d.device)"
                        " FROM devices d ORDER BY device" % _COLUMNS).fetchall()
    return [Device(*r[:7], issued_count=r[7]) for r in rows]


def set_public_key(conn, device, public_key):
    """Record the meter's receipt key (from provisioning). A new key replaces the old one:
    a factory reset makes a new key, and later receipts are signed with it."""
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise TopupError("a meter public key is 32 bytes")
    with transaction(conn):
        get_device(conn, device)
        conn.execute("UPDATE devices SET public_key = ? WHERE device = ?", (public_key, device))
    return get_device(conn, device)
