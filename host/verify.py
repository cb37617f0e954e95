# What `topup verify` works out about a voucher: decode it, find its signer in the key
# store, check the signature with libsodium, compare it with what this database issued,
# and run SPEC.md §2.1 checks 1-8 for a device with that device's registered limits.
import nacl.exceptions
import nacl.signing

from protocol import cose
from protocol import voucher as pv
from protocol.errors import Rejected, UNKNOWN_KEY, OK

from . import keystore, registry
from .issuer import code_epoch, find_sequence


def nacl_verify(public, msg, sig):
    """libsodium's Ed25519 verify (strict) as the protocol's verify_sig callback."""
    try:
        nacl.signing.VerifyKey(bytes(public)).verify(bytes(msg), bytes(sig))
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError,
            TypeError):
        return False


class Report:
    """Everything `verify` found. `reason` is protocol.errors.OK or the first failure."""

    def __init__(self):
        self.raw = b""
        self.tagged = None
        self.kid = None
        self.key = None            # keystore.KeyInfo, or None if not in this database
        self.signature = None      # True / False / None (no key to check with)
        self.voucher = None        # protocol Voucher (decoded, maybe unsigned)
        self.payload_error = None  # Rejected if the payload did not decode
        self.device = None         # registry.Device the checks used, or None
        self.device_note = None
        self.db_match = None       # "same", "different", "not issued", or None
        self.reason = OK
        self.detail = ""

    @property
    def accepted(self):
        return self.reason == OK


class Cache:
    """What `explain` looks up once per database when it checks many vouchers: keys, the
    trust list, devices (without their issuance counts)."""

    def __init__(self, conn):
        self.conn = conn
        self.keys = {}
        self.devices = {}
        self._trusted = None

    def key(self, kid):
        if kid not in self.keys:
            self.keys[kid] = keystore.get_key(self.conn, kid)
        return self.keys[kid]

    def trusted(self):
        if self._trusted is None:
            self._trusted = keystore.trusted(self.conn)
        return self._trusted

    def device(self, eui):
        if eui not in self.devices:
            r = self.conn.execute("SELECT %s FROM devices WHERE device = ?"
                                  % registry._COLUMNS, (eui,)).fetchone()
            self.devices[eui] = registry.Device(*r) if r else None
        return self.devices[eui]


def explain(conn, raw, device=None, now=None, cache=None):
    """Build a Report for `raw` voucher bytes.

    device: EUI-64 bytes of the device to check against (must be registered; TopupError
    if not), or None for the voucher's own device if it is registered. cache: a Cache, to
    check many vouchers without looking the same things up each time.
    """
    rep = Report()
    rep.raw = bytes(raw)
    if cache is None:
        cache = Cache(conn)
    if device is not None:
        rep.device = cache.device(device) or registry.get_device(conn, device)
    try:
        msg = cose.decode(rep.raw)
    except Rejected as e:
        rep.reason, rep.detail = e.reason, e.detail
        return rep
    rep.tagged = msg.tagged
    rep.kid = msg.kid
    rep.key = cache.key(msg.kid)
    if rep.key is not None:
        rep.signature = msg.verify(rep.key.public_key, nacl_verify)
    try:
        rep.voucher = pv.parse(rep.raw)
    except Rejected as e:
        rep.payload_error = e
    v = rep.voucher
    if v is not None:
        if rep.device is None:
            rep.device = cache.device(v.device)
            if rep.device is None:
                rep.device_note = "not registered: device limits not checked"
        stored = find_sequence(conn, v.device, v.sequence)
        if stored is None:
            rep.db_match = "not issued"
        elif stored.ref == pv.reference(rep.raw):
            rep.db_match = "same"
        elif stored.cose is not None and stored.cose[-64:] == rep.raw[-64:] and rep.signature:
            rep.db_match = "re-encoded"  # the same signed voucher, e.g. untagged
        else:
            rep.db_match = "different"
    dev = rep.device
    try:
        pv.verify(rep.raw, cache.trusted(),
                  device=dev.device if dev else None, now=now,
                  max_amount=dev.max_voucher if dev else None, verify_sig=nacl_verify)
    except Rejected as e:
        rep.reason, rep.detail = e.reason, e.detail
        if e.reason == UNKNOWN_KEY and rep.key is not None and rep.key.revoked is not None:
            rep.detail = "issuer key %s was revoked; its vouchers are void" % rep.kid.hex()
    return rep


# --- keypad codes (SPEC.md §8) -----------------------------------------------------------
# What `topup verify CODE` works out: the form (CODE_INCOMPLETE), the check digit
# (CODE_TYPO, with the issued codes one typo away), which meter it was issued for (a code
# for another meter is CODE_WRONG there), the MAC under the meter's code key (derived from
# the supplier code key its provisioning installed and its key-agreement key), then what
# the meter checks as for a voucher: kind and amount, its per-voucher maximum, the sequence
# against its floor and window; and what this database knows: issued or not, and status.

class CodeReport:
    """Everything `verify` found about a code. `reason` is OK or the first refusal a meter
    would give; `status` the stored code's status (host/vouchers.py) if it was issued."""

    def __init__(self):
        self.digits = None
        self.reason = OK
        self.detail = ""
        self.kind = self.amount = self.low = None
        self.sequence = None
        self.ref = None
        self.device = None         # registry.Device checked against
        self.epoch = None          # its current KeyEpoch (codes)
        self.row = None            # host.vouchers.Row of the code at its sequence, if issued
        self.db_match = None       # "same", "different" (another top-up holds the sequence),
        #                            "not issued"
        self.issued_for = None     # [(device, sequence)] where this database issued these digits
        self.near = []             # [(grouped digits, device, sequence)]: issued, one typo away
        self.status = None
        self.highest = None

    @property
    def accepted(self):
        return self.reason == OK


def _near_codes(conn, digits):
    """Issued codes one typo from `digits`: one wrong digit or two neighbours swapped."""
    from protocol import keycode
    variants = set()
    for i in range(len(digits)):
        for c in "0123456789":
            if c != digits[i]:
                variants.add(digits[:i] + c + digits[i + 1:])
        if i + 1 < len(digits) and digits[i] != digits[i + 1]:
            variants.add(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:])
    refs = [keycode.reference(v) for v in variants if keycode.damm(v) == 0]
    found = []
    for k in range(0, len(refs), 500):
        chunk = refs[k:k + 500]
        found += conn.execute("SELECT code, device, sequence FROM vouchers WHERE form = 2 AND "
                              "ref IN (%s) ORDER BY device, sequence" % ",".join("?" * len(chunk)),
                              chunk).fetchall()
    return [(keycode.grouped(c), bytes(d), s) for c, d, s in found]


def explain_code(conn, text, device=None, unlock=None):
    """A CodeReport for keypad code `text` as typed, checked for `device` (EUI-64 bytes,
    registered), or for the meter this database issued it for. `unlock(kid)` returns the
    unlocked supplier code key (host.keystore.CodeKey) with that kid; it is called only
    when the MAC has to be checked. TopupError when there is no meter to check against."""
    from protocol import keycode
    from protocol.errors import CODE_INCOMPLETE, CODE_TYPO, CODE_WRONG, MALFORMED, \
        OVER_VOUCHER_LIMIT, STALE
    from . import vouchers as vq
    from .errors import TopupError
    rep = CodeReport()
    try:
        digits = keycode.normalize(text)
    except Rejected as e:
        rep.reason, rep.detail = CODE_INCOMPLETE, e.detail
        return rep
    rep.digits = digits
    rep.ref = keycode.reference(digits)
    if device is not None:
        rep.device = registry.get_device(conn, device)
    if keycode.damm(digits) != 0:
        rep.reason = CODE_TYPO
        rep.detail = ("the check digit does not fit: a digit is mistyped or two neighbours "
                      "are swapped (a meter does not count this towards its lockout)")
        rep.near = _near_codes(conn, digits)
        return rep
    rep.issued_for = [(bytes(d), s) for d, s in conn.execute(
        "SELECT device, sequence FROM vouchers WHERE form = 2 AND ref = ? ORDER BY device",
        (rep.ref,))]
    if rep.device is None:
        if not rep.issued_for:
            raise TopupError("this code was not issued by this database: give --device EUI64 "
                             "to check it against a meter's key")
        rep.device = registry.get_device(conn, rep.issued_for[0][0])
    dev = rep.device
    try:
        code = keycode.parse(digits)
    except Rejected as e:
        rep.reason, rep.detail = e.reason, "not a code any issuer writes (%s)" % e.detail
        return rep
    rep.kind, rep.amount, rep.low = code.kind, code.amount, code.low
    elsewhere = [(d, s) for d, s in rep.issued_for if d != dev.device]
    if elsewhere and len(elsewhere) == len(rep.issued_for):
        d, s = elsewhere[0]
        rep.reason = CODE_WRONG
        rep.detail = ("this code was issued for meter %s (sequence %d), not %s: this meter "
                      "refuses it as wrong, and counts it towards its lockout"
                      % (registry.format_eui64(d), s, dev.name))
        return rep
    # the code key the meter is known to hold (a confirmed SET_CODE_KEY replaces the
    # provisioned one); TopupError: the meter takes no codes
    rep.epoch = code_epoch(conn, dev.device)
    key = unlock(rep.epoch.code_kid).code_key(dev.device, rep.epoch.ka_public)
    rep.highest = registry.highest_applied(conn, dev.device)
    tries = list(keycode.candidates(code.low, rep.highest))
    tries += [s for d, s in rep.issued_for if d == dev.device and s not in tries]
    for s in tries:
        if keycode.mac(key, dev.device, code.kind, code.amount, s) == code.tag:
            rep.sequence = s
            break
    mine = [s for d, s in rep.issued_for if d == dev.device]
    if rep.sequence is None:
        rep.reason = CODE_WRONG
        if mine:
            rep.detail = ("issued by this database as sequence %d, but the meter was "
                          "provisioned again since (key epoch %d, %s): its code key changed, "
                          "so it refuses this code as wrong" % (
                              mine[0], rep.epoch.epoch, _utc(rep.epoch.provisioned)))
        else:
            rep.detail = ("the code does not fit this meter's code key at any sequence near "
                          "its window: a wrong code, or one for another meter (a meter counts "
                          "it towards its lockout)")
        return rep
    s = rep.sequence
    rows = list(vq.select(conn, device=dev.device, seq=(s, s), with_bytes=False))
    if rows and rows[0].form == 2 and rows[0].code == digits:
        rep.row, rep.db_match, rep.status = rows[0], "same", rows[0].status
    elif rows:
        rep.row, rep.db_match = rows[0], "different"
    else:
        rep.db_match = "not issued"
    if code.kind != keycode.KIND_ADD or code.amount == 0:
        rep.reason, rep.detail = MALFORMED, "unsupported code kind %d" % code.kind
    elif code.amount > dev.max_voucher:
        rep.reason, rep.detail = OVER_VOUCHER_LIMIT, "%s is over the meter's per-voucher " \
            "maximum %s" % (_pence(code.amount), _pence(dev.max_voucher))
    elif s <= rep.epoch.floor:
        rep.reason, rep.detail = STALE, "sequence %d is at or below the meter's sequence " \
            "floor %d (set when it was provisioned)" % (s, rep.epoch.floor)
    elif s < rep.highest - 64 and rep.status != "redeemed":
        rep.reason, rep.detail = STALE, "sequence %d is below the meter's replay window " \
            "(its highest sequence applied is at least %d)" % (s, rep.highest)
    return rep


def _utc(ts):
    import time
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _pence(p):
    from .money import format_pence
    return format_pence(p)
