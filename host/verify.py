# What `topup verify` works out about a voucher: decode it, find its signer in the key
# store, check the signature with libsodium, compare it with what this database issued,
# and run SPEC.md §2.1 checks 1-8 for a device with that device's registered limits.
import nacl.exceptions
import nacl.signing

from protocol import cose
from protocol import voucher as pv
from protocol.errors import Rejected, UNKNOWN_KEY, OK

from . import keystore, registry
from .issuer import find_sequence


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
        elif stored.cose[-64:] == rep.raw[-64:] and rep.signature:
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
