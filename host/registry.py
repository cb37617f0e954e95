# Device registry: EUI-64 device ids, limits (per-voucher maximum and maximum credit, in
# pence), the next sequence to issue, and every receipt key the meter has had.
#
# Key epochs (SPEC.md §2.2, §4 "Epochs"): each provisioning makes a new meter key. The
# registry keeps all of them, in order, each with the index of its first receipt and the
# sequence floor the meter took: a key's span of receipt indices runs from its first index
# to the next key's, receipts are verified with the key of their span, and the meter
# refuses every voucher sequence up to the floor. devices.public_key is the current key.
import bisect
import re
import time

from protocol.cose import kid_for
from protocol.voucher import MAX_AMOUNT

from .db import transaction
from .errors import TopupError
from .money import format_pence

DEFAULT_MAX_VOUCHER = 10000   # £100.00
DEFAULT_MAX_CREDIT = 50000    # £500.00

_SEPARATED = re.compile(r"[0-9A-Fa-f]{2}([-:])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){6}\Z")
_PLAIN = re.compile(r"[0-9A-Fa-f]{16}\Z")


def parse_eui64(text):
    """8 bytes from `00-11-22-33-44-55-66-77`, `00:11:…:77` or `0011223344556677`.

    All zeros and all ones are refused: they are the "no address" and broadcast values of
    an EUI-64 (an unprovisioned meter reports no device at all), never a meter's id."""
    s = str(text).strip()
    eui = None
    if _SEPARATED.match(s):
        eui = bytes.fromhex(s.replace(s[2], ""))
    elif _PLAIN.match(s):
        eui = bytes.fromhex(s)
    if eui is not None:
        if eui in (bytes(8), b"\xff" * 8):
            raise TopupError("device id %s is not a meter's EUI-64 (all %s is reserved)"
                             % (format_eui64(eui), "zeros" if eui == bytes(8) else "ones"))
        return eui
    raise TopupError("device id %r is not an EUI-64 (write 00-11-22-33-44-55-66-77, "
                     "00:11:22:33:44:55:66:77 or 16 hex digits)" % (text,))


def format_eui64(device):
    return "-".join("%02X" % b for b in device)


def parse_public_key(text):
    s = str(text).strip()
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", s):
        raise TopupError("device public key must be 64 hex digits (32 bytes)")
    return bytes.fromhex(s)


class MeterKey(bytes):
    """A meter's receipt public key (32 bytes) as its provisioning reported it, with the
    index of the key's first receipt and the meter's sequence floor (None: not reported),
    the meter's X25519 key-agreement public key (`ka`; None: its firmware printed none, so
    it takes no keypad codes) and the kid of the supplier code key installed with it
    (`code_kid`). `set_public_key` registers these figures unless it is given others."""

    def __new__(cls, public, first_index=None, floor=None, ka=None, code_kid=None,
                command_kid=None, trust=None):
        self = super().__new__(cls, public)
        self.first_index = first_index
        self.floor = floor
        self.ka = None if ka is None else bytes(ka)
        self.code_kid = None if code_kid is None else bytes(code_kid)
        # Signed commands (SPEC.md §10): the command key installed (None: none, the meter
        # takes no commands) and the kids of the issuer keys it was given (None: unknown).
        self.command_kid = None if command_kid is None else bytes(command_kid)
        self.trust = None if trust is None else [bytes(k) for k in trust]
        return self


class KeyEpoch:
    """One meter key of a device: epoch (1, 2, ... in registration order), public key,
    kid, first receipt index, sequence floor, registration time; and for keypad codes the
    meter's key-agreement public key and the kid of the supplier code key it was given
    (both None for a meter that takes no codes)."""

    __slots__ = ("device", "epoch", "public_key", "kid", "first_index", "floor", "provisioned",
                 "ka_public", "code_kid", "command_kid", "first_prev")

    def __init__(self, device, epoch, public_key, kid, first_index, floor, provisioned,
                 ka_public=None, code_kid=None, command_kid=None, first_prev=None):
        self.device = bytes(device)
        self.epoch = epoch
        self.public_key = bytes(public_key)
        self.kid = bytes(kid)
        self.first_index = first_index
        self.floor = floor
        self.provisioned = provisioned
        self.ka_public = None if ka_public is None else bytes(ka_public)
        self.code_kid = None if code_kid is None else bytes(code_kid)
        self.command_kid = None if command_kid is None else bytes(command_kid)
        self.first_prev = None if first_prev is None else bytes(first_prev)

    @property
    def takes_commands(self):
        return self.command_kid is not None

    @property
    def takes_codes(self):
        return self.ka_public is not None and self.code_kid is not None

    def __repr__(self):
        return "KeyEpoch(%s #%d kid=%s first=%d floor=%d)" % (
            format_eui64(self.device), self.epoch, self.kid.hex(), self.first_index, self.floor)


def span_key(epochs, index):
    """The key whose span holds receipt `index`: the one with the largest first index <=
    index (of two with the same first index, the later epoch), or None if `index` comes
    before every key. `epochs` in epoch order, as `device_keys` gives them."""
    if not epochs or index < epochs[0].first_index:
        return None
    if len(epochs) == 1:
        return epochs[0]
    return epochs[bisect.bisect_right([e.first_index for e in epochs], index) - 1]


class Device:
    def __init__(self, device, public_key, max_voucher, max_credit, next_sequence, label,
                 created, issued_count=None, key_count=None):
        self.device = bytes(device)
        self.public_key = bytes(public_key) if public_key is not None else None
        self.max_voucher = max_voucher
        self.max_credit = max_credit
        self.next_sequence = next_sequence
        self.label = label
        self.created = created
        self.issued_count = issued_count
        self.key_count = key_count

    @property
    def name(self):
        return format_eui64(self.device)


_COLUMNS = "device, public_key, max_voucher, max_credit, next_sequence, label, created"
_KEY_COLUMNS = ("device, epoch, public_key, kid, first_index, floor, provisioned, ka_public, "
                "code_kid, command_kid, first_prev")


def check_limits(max_voucher, max_credit):
    if not 1 <= max_voucher <= MAX_AMOUNT:
        raise TopupError("per-voucher maximum must be 1p..%s" % format_pence(MAX_AMOUNT))
    if max_credit < max_voucher:
        raise TopupError("maximum credit %s is below the per-voucher maximum %s"
                         % (format_pence(max_credit), format_pence(max_voucher)))


def add_device(conn, device, max_voucher=DEFAULT_MAX_VOUCHER, max_credit=DEFAULT_MAX_CREDIT,
               public_key=None, label=None, now=None, ka_public=None, code_kid=None):
    """Register a meter. With `public_key` (its receipt key: a meter provisioned elsewhere)
    it starts key epoch 1; `ka_public` and `code_kid` add the meter's key-agreement key and
    the supplier code key it holds, for keypad codes."""
    check_limits(max_voucher, max_credit)
    created = int(time.time()) if now is None else int(now)
    if public_key is not None:
        _check_key(public_key)
    if (ka_public is None) != (code_kid is None) or (ka_public is not None and public_key is None):
        raise TopupError("a meter's key-agreement key goes with its receipt key and the code "
                         "key it was given")
    if ka_public is not None:
        _check_key(ka_public, "key-agreement")
    with transaction(conn):
        if conn.execute("SELECT 1 FROM devices WHERE device = ?", (device,)).fetchone():
            raise TopupError("device %s is already registered" % format_eui64(device))
        conn.execute("INSERT INTO devices (device, public_key, max_voucher, max_credit, "
                     "next_sequence, label, created) VALUES (?, ?, ?, ?, 1, ?, ?)",
                     (device, public_key, max_voucher, max_credit, label, created))
        if public_key is not None:  # a meter key known from the start: receipts from 0
            _insert_epoch(conn, device, 1, bytes(public_key), 0, 0, created, ka_public,
                          code_kid)
    return get_device(conn, device)


def find_device(conn, device):
    """The Device, or None."""
    r = conn.execute("SELECT %s FROM devices WHERE device = ?" % _COLUMNS, (device,)).fetchone()
    if r is None:
        return None
    count = conn.execute("SELECT count(*) FROM vouchers WHERE device = ?", (device,)).fetchone()[0]
    keys = conn.execute("SELECT count(*) FROM device_keys WHERE device = ?", (device,)).fetchone()[0]
    return Device(*r, issued_count=count, key_count=keys)


def get_device(conn, device):
    """The Device, or TopupError naming the unknown device."""
    d = find_device(conn, device)
    if d is None:
        raise TopupError("unknown device %s (register it with `topup device add`)"
                         % format_eui64(device))
    return d


def list_devices(conn):
    rows = conn.execute("SELECT %s, (SELECT count(*) FROM vouchers v WHERE v.device = d.device),"
                        " (SELECT count(*) FROM device_keys k WHERE k.device = d.device)"
                        " FROM devices d ORDER BY device" % _COLUMNS).fetchall()
    return [Device(*r[:7], issued_count=r[7], key_count=r[8]) for r in rows]


def device_keys(conn, device):
    """Every meter key `device` has had, as [KeyEpoch] in epoch order ([] if none)."""
    return [KeyEpoch(*r) for r in conn.execute(
        "SELECT %s FROM device_keys WHERE device = ? ORDER BY epoch" % _KEY_COLUMNS, (device,))]


def all_device_keys(conn):
    """{device: [KeyEpoch] in epoch order} for every registered device ([] if it has no
    key yet). Devices not registered are absent."""
    out = {bytes(d): [] for (d,) in conn.execute("SELECT device FROM devices")}
    for r in conn.execute("SELECT %s FROM device_keys ORDER BY device, epoch" % _KEY_COLUMNS):
        out.setdefault(bytes(r[0]), []).append(KeyEpoch(*r))
    return out


def issued_floor(conn, device):
    """The highest sequence this database has issued or reserved for `device` (0 if
    none): what a provisioning asks the meter to refuse (SPEC.md §2.2)."""
    return get_device(conn, device).next_sequence - 1


def next_first_index(conn, device):
    """The receipt index a new meter key of `device` starts at, as far as this database
    knows: past every receipt it holds verified, and not before the current key's first
    index (0 for a device with no key). Receipts whose signature did not verify do not
    count: anyone on the WAN link can push those, at any index."""
    keys = device_keys(conn, device)
    held = conn.execute("SELECT max(idx) FROM receipts WHERE device = ? AND sig_ok = 1",
                        (device,)).fetchone()[0]
    first = 0 if held is None else held + 1
    if keys:
        first = max(first, keys[-1].first_index)
    return first


def _check_key(public_key, what="public"):
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise TopupError("a meter %s key is 32 bytes" % what)


def _check_figure(value, what):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
        raise TopupError("%s must be 0..2^32-1" % what)


def _insert_epoch(conn, device, epoch, public_key, first_index, floor, now, ka_public=None,
                  code_kid=None, command_kid=None, trust=None, first_prev=None):
    conn.execute("INSERT INTO device_keys (device, epoch, public_key, kid, first_index, floor, "
                 "provisioned, ka_public, code_kid, command_kid, first_prev) VALUES (?, ?, ?, "
                 "?, ?, ?, ?, ?, ?, ?, ?)",
                 (device, epoch, public_key, kid_for(public_key), first_index, floor, now,
                  None if ka_public is None else bytes(ka_public),
                  None if code_kid is None else bytes(code_kid),
                  None if command_kid is None else bytes(command_kid),
                  None if first_prev is None else bytes(first_prev)))
    # The issuer keys the meter trusts from this provisioning (SPEC.md §10): as given, else
    # every key not revoked (what `topup provision` installs).
    if trust is None:
        trust = [bytes(k) for (k,) in conn.execute("SELECT kid FROM keys WHERE revoked IS NULL")]
    conn.executemany("INSERT OR IGNORE INTO device_trust (device, epoch, kid) VALUES (?, ?, ?)",
                     [(device, epoch, bytes(k)) for k in trust])
    # Commands still pending for an earlier epoch never apply: the provisioning replaced
    # the meter's trust list and tariff (and its command numbering starts again).
    conn.execute("UPDATE commands SET status = 'superseded', settled = ? WHERE device = ? AND "
                 "epoch < ? AND status = 'pending'", (now, device, epoch))
    # Vouchers issued from now on must be above the meter's floor, or it refuses them.
    conn.execute("UPDATE devices SET public_key = ?, next_sequence = CASE WHEN next_sequence "
                 "> ? THEN next_sequence ELSE ? END WHERE device = ?",
                 (public_key, floor + 1, floor + 1, device))


def set_public_key(conn, device, public_key, first_index=None, floor=None, now=None,
                   ka_public=None, code_kid=None, command_kid=None, trust=None,
                   first_prev=None):
    """Register a new key epoch: the meter's receipt key from a provisioning, the index of
    its first receipt and the meter's sequence floor (SPEC.md §2.2, §4), and for keypad
    codes (§8) its key-agreement key and the supplier code key it was given (default: what
    a MeterKey carries; None: the meter takes no codes).

    The device keeps every key it has had: receipts before `first_index` stay with the
    earlier keys. first_index defaults to what the provisioning reported (a MeterKey), else
    `next_first_index`; floor to what the provisioning reported, else 0 (nothing claimed).
    The next sequence to issue moves above the floor. Registering the current key again
    changes nothing; a key the device had before, or a first index below the current
    key's, is refused. Returns the Device.
    """
    _check_key(public_key)
    if first_index is None:
        first_index = getattr(public_key, "first_index", None)
    if floor is None:
        floor = getattr(public_key, "floor", None)
    if ka_public is None:
        ka_public = getattr(public_key, "ka", None)
    if code_kid is None:
        code_kid = getattr(public_key, "code_kid", None)
    if command_kid is None:
        command_kid = getattr(public_key, "command_kid", None)
    if trust is None:
        trust = getattr(public_key, "trust", None)
    if ka_public is None:
        code_kid = None        # a code key the meter cannot use is not worth recording
    elif code_kid is None:
        raise TopupError("a meter's key-agreement key needs the code key it was given")
    else:
        _check_key(bytes(ka_public), "key-agreement")
    public_key = bytes(public_key)
    now = int(time.time()) if now is None else int(now)
    with transaction(conn):
        get_device(conn, device)
        keys = device_keys(conn, device)
        if keys and keys[-1].public_key == public_key:
            if first_index is not None and keys[-1].first_index != first_index:
                raise TopupError("meter key %s is already registered for %s, from receipt %d"
                                 % (keys[-1].kid.hex(), format_eui64(device), keys[-1].first_index))
            return get_device(conn, device)
        if first_index is None:
            first_index = next_first_index(conn, device)
        floor = 0 if floor is None else floor
        _check_figure(first_index, "a key's first receipt index")
        _check_figure(floor, "a sequence floor")
        for k in keys:
            if k.public_key == public_key:
                raise TopupError("meter key %s was %s's key epoch %d before: a provisioning "
                                 "always makes a new key" % (k.kid.hex(), format_eui64(device),
                                                             k.epoch))
        if keys and first_index < keys[-1].first_index:
            raise TopupError("the new key's first receipt index %d is below the current key's "
                             "(%d): receipt indices never go back" % (first_index,
                                                                     keys[-1].first_index))
        _insert_epoch(conn, device, len(keys) + 1, public_key, first_index, floor, now,
                      ka_public, code_kid, command_kid, trust, first_prev)
    return get_device(conn, device)


# --- keypad codes (SPEC.md §8) ----------------------------------------------------------

CODE_SPAN = (1 << 14) - 64   # how far above what a meter may have applied a code may go


def code_epoch(conn, device):
    """The current key epoch of `device` if its meter takes keypad codes; else TopupError
    saying why not, in one line."""
    dev = get_device(conn, device)
    keys = device_keys(conn, device)
    if not keys:
        raise TopupError("meter %s has no meter key registered yet: keypad codes need the "
                         "key-agreement key its provisioning registers (`topup provision`)"
                         % dev.name)
    cur = keys[-1]
    if not cur.takes_codes:
        raise TopupError("meter %s cannot take keypad codes: its provisioning (key epoch %d, "
                         "%s) registered no key-agreement key, as firmware older than keypad "
                         "codes prints none; issue a voucher, or flash current firmware and "
                         "provision it again" % (dev.name, cur.epoch, _utc(cur.provisioned)))
    return cur


def highest_applied(conn, device):
    """The highest sequence the meter of `device` is known to have closed: the larger of
    the highest sequence applied in a receipt held with a verified signature and the
    sequence floor of its provisionings (0 if neither). The meter's own may only be higher."""
    seq = conn.execute("SELECT max(sequence) FROM receipts WHERE device = ? AND kind = 1 AND "
                       "sig_ok = 1", (device,)).fetchone()[0] or 0
    floor = conn.execute("SELECT max(floor) FROM device_keys WHERE device = ?",
                         (device,)).fetchone()[0] or 0
    return max(seq, floor)


def _utc(ts):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))

