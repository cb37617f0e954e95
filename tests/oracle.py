"""An independent statement of SPEC.md §1–§2.1 for CPython tests: the verdict a voucher
verifier must give, written out plainly here and computed with PyNaCl for signatures,
without importing anything from protocol/ (so a test comparing protocol.voucher with
this oracle compares two readings of the SPEC, not the code with itself).

`voucher_verdict(raw, trusted, device, now, max_amount)` returns "OK" or the reason name.
`command_verdict(raw, command_keys, device)` does the same for SPEC §10's checks 1-6 (a
signed command's form, key, signature, payload and device), returning ("OK", payload) or
(reason name, None).
"""
import hashlib

import nacl.exceptions
import nacl.signing

MAX_DEPTH = 8


class Bad(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


# --- SPEC §1: deterministic CBOR, the subset we use ------------------------------------------
class _Cbor:
    def __init__(self, data):
        self.d = bytes(data)
        self.i = 0

    def take(self, n):
        if self.i + n > len(self.d):
            raise Bad("MALFORMED")                       # truncated
        out = self.d[self.i:self.i + n]
        self.i += n
        return out

    def head(self):
        b = self.take(1)[0]
        major, ai = b >> 5, b & 31
        if ai < 24:
            return major, ai, ai
        if ai > 27:
            raise Bad("MALFORMED")                       # indefinite length or reserved
        n = 1 << (ai - 24)
        arg = int.from_bytes(self.take(n), "big")
        smallest = {1: 24, 2: 256, 4: 1 << 16, 8: 1 << 32}[n]
        if major != 7 and arg < smallest:
            raise Bad("MALFORMED")                       # not the shortest argument
        return major, arg, ai

    def item(self, depth, top=False):
        if depth > MAX_DEPTH:
            raise Bad("MALFORMED")
        major, arg, ai = self.head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self.take(arg)
        if major == 3:
            try:
                return self.take(arg).decode("utf-8")
            except UnicodeDecodeError:
                raise Bad("MALFORMED") from None
        if major == 4:
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            out = {}
            last = None
            for _ in range(arg):
                start = self.i
                key = self.item(depth + 1)
                encoded = self.d[start:self.i]
                if not isinstance(key, (int, str)) or isinstance(key, bool):
                    raise Bad("MALFORMED")
                if last is not None and encoded <= last:
                    raise Bad("MALFORMED")               # unsorted or duplicate keys
                last = encoded
                out[key] = self.item(depth + 1)
            return out
        if major == 6:
            if not top or arg != 18:
                raise Bad("MALFORMED")                   # tag 18, outermost only
            return ("tag18", self.item(depth + 1))
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai == 22:
            return None
        raise Bad("MALFORMED")                           # floats, undefined, other simple values


def cbor_decode(data, allow_tag=False):
    r = _Cbor(data)
    value = r.item(0, top=allow_tag)
    if r.i != len(r.d):
        raise Bad("MALFORMED")                           # trailing bytes
    return value


# --- SPEC §2: the voucher ---------------------------------------------------------------------
def _is_uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _nacl_ok(public, message, signature):
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
        return True
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False


def _sig_structure(protected, payload, aad=b""):
    # ["Signature1", protected, external_aad, payload], encoded deterministically by hand
    def bstr(b):
        n = len(b)
        if n < 24:
            return bytes([0x40 | n]) + b
        if n < 256:
            return bytes([0x58, n]) + b
        return bytes([0x59]) + n.to_bytes(2, "big") + b
    return b"\x84" + b"\x6aSignature1" + bstr(protected) + bstr(aad) + bstr(payload)


def voucher_verdict(raw, trusted, device, now, max_amount):
    try:
        _check(bytes(raw), trusted, device, now, max_amount)
        return "OK"
    except Bad as e:
        return e.reason


def _check(raw, trusted, device, now, max_amount):
    fields = _signed(raw, trusted, b"")
    _voucher_payload(fields, device, now, max_amount)


def _signed(raw, trusted, aad):
    """Checks 1-4, common to vouchers and commands: the payload map once the signature made
    over `aad` verifies under a trusted kid."""
    # 1. one deterministic CBOR item, tag 18 or none, an array of 4 with the right types
    top = cbor_decode(raw, allow_tag=True)
    if isinstance(top, tuple):
        top = top[1]
    if not isinstance(top, list) or len(top) != 4:
        raise Bad("MALFORMED")
    protected, unprotected, payload, signature = top
    if not isinstance(protected, bytes) or not isinstance(unprotected, dict):
        raise Bad("MALFORMED")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes) or len(signature) != 64:
        raise Bad("MALFORMED")
    header = cbor_decode(protected)
    if not isinstance(header, dict):
        raise Bad("MALFORMED")
    # 2. protected header exactly {1: -8, 4: kid(8)}; unprotected empty
    if unprotected:
        raise Bad("BAD_HEADER")
    if set(header) != {1, 4} or header[1] != -8 or isinstance(header[1], bool):
        raise Bad("BAD_HEADER")
    kid = header[4]
    if not isinstance(kid, bytes) or len(kid) != 8:
        raise Bad("BAD_HEADER")
    # 3. a trusted kid
    if kid not in trusted:
        raise Bad("UNKNOWN_KEY")
    # 4. libsodium's verdict on the signature over the protected bytes as received
    if not _nacl_ok(trusted[kid], _sig_structure(protected, payload, aad), signature):
        raise Bad("BAD_SIGNATURE")
    return cbor_decode(payload)


def _voucher_payload(fields, device, now, max_amount):
    # 5. the payload table: keys 1-4 required, 5 optional, nothing else, exact types
    if not isinstance(fields, dict) or not set(fields) >= {1, 2, 3, 4} or not set(fields) <= {1, 2, 3, 4, 5}:
        raise Bad("MALFORMED")
    dev, seq, amount, issued = fields[1], fields[2], fields[3], fields[4]
    if not isinstance(dev, bytes) or len(dev) != 8:
        raise Bad("MALFORMED")
    if not _is_uint(seq) or not 1 <= seq <= 2 ** 32 - 1:
        raise Bad("MALFORMED")
    if not _is_uint(amount) or not 1 <= amount <= 1_000_000:
        raise Bad("MALFORMED")
    if not _is_uint(issued) or issued > 2 ** 48 - 1:
        raise Bad("MALFORMED")
    if 5 in fields:
        expires = fields[5]
        if not _is_uint(expires) or expires <= issued or expires > 2 ** 48 - 1:
            raise Bad("MALFORMED")
    else:
        expires = None
    # 6-8. this meter, its per-voucher maximum, not expired
    if dev != device:
        raise Bad("WRONG_DEVICE")
    if amount > max_amount:
        raise Bad("OVER_VOUCHER_LIMIT")
    if expires is not None and now >= expires:
        raise Bad("EXPIRED")


def voucher_reference(raw):
    """SPEC §2.2: the first 16 bytes of SHA-256 of the voucher bytes as received."""
    return hashlib.sha256(bytes(raw)).digest()[:16]


# --- SPEC §10: a signed command ------------------------------------------------------------------
COMMAND_AAD = b"OTU1 command v1"
# kind -> {arg key: (type, length)}: the kinds whose args are keys. The args of a tariff (4)
# and a change of supplier (6) are not restated here (the rig's model sends neither): a map.
_COMMAND_ARGS = {1: {1: (bytes, 32)}, 2: {1: (bytes, 8)}, 3: {1: (bytes, 32)}, 5: {1: (bytes, 32)}}


def command_verdict(raw, command_keys, device):
    """("OK", payload map) or (reason name, None) for SPEC §10 checks 1-6: COSE form and
    header as a voucher's, kid one of `command_keys` ({kid: public key}), the signature over
    the command's external AAD, the payload table (keys 1-5 exactly, number 1 <= n < 2^32,
    issued <= 2^48 - 1, args as the kind's table), the device."""
    try:
        fields = _signed(bytes(raw), command_keys, COMMAND_AAD)
        if not isinstance(fields, dict) or set(fields) != {1, 2, 3, 4, 5}:
            raise Bad("MALFORMED")
        dev, number, kind, issued, args = (fields[k] for k in (1, 2, 3, 4, 5))
        if not isinstance(dev, bytes) or len(dev) != 8:
            raise Bad("MALFORMED")
        if not _is_uint(number) or not 1 <= number < 2 ** 32:
            raise Bad("MALFORMED")
        if not _is_uint(issued) or issued > 2 ** 48 - 1:
            raise Bad("MALFORMED")
        if not _is_uint(kind) or kind not in (1, 2, 3, 4, 5, 6) or not isinstance(args, dict):
            raise Bad("MALFORMED")
        table = _COMMAND_ARGS.get(kind)
        if table is not None:
            if set(args) != set(table):
                raise Bad("MALFORMED")
            for k, (typ, n) in table.items():
                if not isinstance(args[k], typ) or len(args[k]) != n:
                    raise Bad("MALFORMED")
        if dev != device:
            raise Bad("WRONG_DEVICE")
        return "OK", fields
    except Bad as e:
        return e.reason, None


def command_reference(raw):
    """SPEC §10: a command's reference, as a voucher's."""
    return voucher_reference(raw)
