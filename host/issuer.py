# Issuance. The (device, sequence) pair is reserved durably before any voucher leaves:
# for each batch, one BEGIN IMMEDIATE transaction reads next_sequence, signs, inserts the
# vouchers, bumps next_sequence and COMMITs (WAL, synchronous=FULL: on disk when COMMIT
# returns), and only then are the vouchers handed to the caller. A crash or kill -9 before
# COMMIT loses the whole batch, reservation and vouchers together, and none was released;
# after COMMIT they are on disk. A concurrent run waits on the write lock (busy timeout).
#
# The core knows nothing of the screen: bulk runs report through `progress(done, total)`.
import hashlib
import struct
import time

from nacl.bindings import crypto_sign

from protocol import cose
from protocol.voucher import MAX_AMOUNT, MAX_SEQUENCE, REF_LEN, check_fields

from .db import transaction
from .errors import TopupError
from .money import format_pence
from .registry import format_eui64, get_device

DEFAULT_BATCH = 1000


class Issued:
    """One issued voucher as stored: fields, reference and the COSE_Sign1 bytes."""

    __slots__ = ("device", "sequence", "amount", "issued", "expires", "kid", "ref", "cose")

    def __init__(self, device, sequence, amount, issued, expires, kid, ref, cose):
        self.device = bytes(device)
        self.sequence = sequence
        self.amount = amount
        self.issued = issued
        self.expires = expires
        self.kid = bytes(kid)
        self.ref = bytes(ref)
        self.cose = bytes(cose)


# --- the voucher bytes ------------------------------------------------------------------
# A specialised encoder for the one shape the issuer writes. It produces exactly the bytes
# of protocol.voucher.encode (deterministic CBOR, tagged COSE_Sign1) — the tests hold it to
# that — at a fraction of the generic encoder's cost, so bulk issuance runs near the
# speed of signing itself.

def _uint(n):
    if n < 24:
        return bytes((n,))
    if n < 0x100:
        return bytes((0x18, n))
    if n < 0x10000:
        return struct.pack(">BH", 0x19, n)
    if n < 0x100000000:
        return struct.pack(">BI", 0x1A, n)
    return struct.pack(">BQ", 0x1B, n)


def _bstr_head(length):
    if length < 24:
        return bytes((0x40 | length,))
    return bytes((0x58, length))  # everything here is < 256 bytes


class VoucherEncoder:
    """Builds and signs vouchers for one key (libsodium's 64-byte secret key)."""

    def __init__(self, kid, secret64):
        protected = cose.protected_header(kid)
        bprot = _bstr_head(len(protected)) + protected
        self._tbs_prefix = b"\x84\x6aSignature1" + bprot + b"\x40"
        self._cose_prefix = b"\xd2\x84" + bprot + b"\xa0"
        self._secret64 = secret64

    def payload(self, device, sequence, amount, issued, expires=None):
        body = (b"\x01\x48" + device + b"\x02" + _uint(sequence) + b"\x03" + _uint(amount)
                + b"\x04" + _uint(issued))
        if expires is None:
            return b"\xa4" + body
        return b"\xa5" + body + b"\x05" + _uint(expires)

    def encode(self, device, sequence, amount, issued, expires=None):
        payload = self.payload(device, sequence, amount, issued, expires)
        bpay = _bstr_head(len(payload)) + payload
        sig = crypto_sign(self._tbs_prefix + bpay, self._secret64)[:64]
        return self._cose_prefix + bpay + b"\x58\x40" + sig


def reference(raw):
    return hashlib.sha512(raw).digest()[:REF_LEN]


# --- issuance ---------------------------------------------------------------------------

def _check_request(dev, amount, count, expires_in):
    if not isinstance(count, int) or count < 1:
        raise TopupError("count must be at least 1")
    if not 1 <= amount <= MAX_AMOUNT:
        raise TopupError("amount must be 1p..%s" % format_pence(MAX_AMOUNT))
    if amount > dev.max_voucher:
        raise TopupError("amount %s is over device %s's per-voucher maximum of %s"
                         % (format_pence(amount), dev.name, format_pence(dev.max_voucher)))
    if expires_in is not None and expires_in <= 0:
        raise TopupError("expiry must be in the future")
    if dev.next_sequence + count - 1 > MAX_SEQUENCE:
        raise TopupError("device %s has only %d sequence numbers left"
                         % (dev.name, MAX_SEQUENCE - dev.next_sequence + 1))


def issue_batches(conn, signer, device, amount, count=1, expires_in=None, now=None,
                  batch_size=DEFAULT_BATCH, progress=None):
    """Issue `count` vouchers of `amount` pence to `device`; yield lists of Issued.

    Each list is yielded only after its transaction has committed. `expires_in` is in
    seconds from the issue time; `now` fixes the issue time (default: the clock, read per
    batch). Everything the caller got wrong is checked before the first transaction, so a
    refused request changes nothing.
    """
    dev = get_device(conn, device)
    _check_request(dev, amount, count, expires_in)
    enc = VoucherEncoder(signer.kid, signer.secret64)
    kid = signer.kid
    done = 0
    if progress:
        progress(0, count)
    while done < count:
        n = min(batch_size, count - done)
        with transaction(conn):
            row = conn.execute("SELECT next_sequence, max_voucher FROM devices WHERE device = ?",
                               (device,)).fetchone()
            key = conn.execute("SELECT active FROM keys WHERE kid = ?", (kid,)).fetchone()
            if row is None:
                raise TopupError("device %s was removed" % format_eui64(device))
            if key is None or not key[0]:
                raise TopupError("key %s is no longer the active key; stopped after %d "
                                 "vouchers" % (kid.hex(), done))
            first, max_voucher = row
            if amount > max_voucher or first + n - 1 > MAX_SEQUENCE:
                raise TopupError("device %s limits changed; stopped after %d vouchers"
                                 % (format_eui64(device), done))
            issued = int(time.time()) if now is None else int(now)
            expires = None if expires_in is None else issued + int(expires_in)
            check_fields(device, first, amount, issued, expires)
            rows = []
            for seq in range(first, first + n):
                raw = enc.encode(device, seq, amount, issued, expires)
                ref = reference(raw)
                rows.append((device, seq, amount, issued, expires, kid, ref, raw))
            conn.executemany("INSERT INTO vouchers (device, sequence, amount, issued, expires,"
                             " kid, ref, cose) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            cur = conn.execute("UPDATE devices SET next_sequence = ? WHERE device = ? AND "
                               "next_sequence = ?", (first + n, device, first))
            if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; refuse loudly
                raise RuntimeError("next_sequence moved inside a write transaction")
            batch = [Issued(*r) for r in rows]
        # COMMIT has returned: the reservation is durable. Now the vouchers may leave.
        done += n
        if progress:
            progress(done, count)
        yield batch


def issue(conn, signer, device, amount, count=1, **kw):
    """All vouchers of `issue_batches` as one list."""
    out = []
    for batch in issue_batches(conn, signer, device, amount, count, **kw):
        out.extend(batch)
    return out


def stored(conn, device=None):
    """Stored vouchers (all, or one device's), in (device, sequence) order."""
    sql = "SELECT device, sequence, amount, issued, expires, kid, ref, cose FROM vouchers"
    args = ()
    if device is not None:
        sql += " WHERE device = ?"
        args = (device,)
    return [Issued(*r) for r in conn.execute(sql + " ORDER BY device, sequence", args)]


def find_sequence(conn, device, sequence):
    r = conn.execute("SELECT device, sequence, amount, issued, expires, kid, ref, cose FROM "
                     "vouchers WHERE device = ? AND sequence = ?", (device, sequence)).fetchone()
    return Issued(*r) if r else None
