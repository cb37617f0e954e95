# Issuance. The (device, sequence) pair is reserved durably before any voucher leaves:
# for each batch, one BEGIN IMMEDIATE transaction reads next_sequence, signs, inserts the
# vouchers, bumps next_sequence and COMMITs (WAL, synchronous=FULL: on disk when COMMIT
# returns), and only then are the vouchers handed to the caller. A crash or kill -9 before
# COMMIT loses the whole batch, reservation and vouchers together, and none was released;
# after COMMIT they are on disk. A concurrent run waits on the write lock (busy timeout).
#
# The core knows nothing of the screen: bulk runs report through `progress(done, total)`.
#
# What was written where (schema v4, host/db.py): every run is an issue batch (one row in
# issue_batches, written with its first transaction; every voucher names it). A caller
# that writes the vouchers somewhere says where (`fmt`, `destination`) and reports what it
# has written whole through `delivered()`, which the next transaction records (so the
# bookkeeping costs no extra commit) — and `record_deliveries` records the rest at the
# end. A program that takes the vouchers itself (no destination) has each transaction's
# vouchers recorded as handed over in that same transaction.
import collections
import collections.abc
import hashlib as _hashlib
import hmac as _hmac
import struct
import time

from nacl.bindings import crypto_sign

try:  # libsodium's crypto_sign through PyNaCl's own cffi module, with reused buffers
    from nacl._sodium import ffi as _ffi, lib as _lib
    _lib.crypto_sign
except (ImportError, AttributeError):  # pragma: no cover - PyNaCl without that module
    _ffi = _lib = None

from protocol import cose, keycode, voucher
from protocol.voucher import MAX_AMOUNT, MAX_SEQUENCE, check_fields

from .db import transaction
from .errors import TopupError
from .money import format_pence
from . import registry
from .registry import format_eui64, get_device

DEFAULT_BATCH = 2000


FORM_VOUCHER = 1  # receipts' field 13 (SPEC.md §4): how a top-up came
FORM_CODE = 2
FORM_NAMES = {FORM_VOUCHER: "voucher", FORM_CODE: "code"}


class Issued(collections.namedtuple(
        "Issued", "device sequence amount issued expires kid ref cose form code",
        defaults=(FORM_VOUCHER, None))):
    """One issued voucher or keypad code as stored: fields, reference and the COSE_Sign1
    bytes (a voucher), or the code's 20 digits (`code`, form 2: `kid` is then the code
    key's, `cose` None)."""

    __slots__ = ()

    @property
    def is_code(self):
        return self.form == FORM_CODE


class Batch(collections.abc.Sequence):
    """The vouchers of one committed transaction: a sequence of Issued, built on demand.

    Within a batch only the sequence, reference and bytes differ from voucher to voucher.
    `batch` is the issue batch (issue_batches.batch) the transaction belongs to.
    """

    __slots__ = ("device", "amount", "issued", "expires", "kid", "rows", "batch", "form")

    def __init__(self, device, amount, issued, expires, kid, rows, batch=None,
                 form=FORM_VOUCHER):
        self.device, self.amount, self.issued, self.expires, self.kid = (
            device, amount, issued, expires, kid)
        self.rows = rows  # [(sequence, ref, cose)], or [(sequence, ref, digits)] for codes
        self.batch = batch
        self.form = form

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.rows)))]
        seq, ref, raw = self.rows[i]
        if self.form == FORM_CODE:
            return Issued(self.device, seq, self.amount, self.issued, None, self.kid, ref,
                          None, FORM_CODE, raw)
        return Issued(self.device, seq, self.amount, self.issued, self.expires, self.kid,
                      ref, raw)


# --- the voucher bytes ------------------------------------------------------------------
# A specialised encoder for the one shape the issuer writes. It produces exactly the bytes
# of protocol.voucher.encode (deterministic CBOR, tagged COSE_Sign1) — the tests hold it to
# that — at a fraction of the generic encoder's cost, so bulk issuance runs near the
# speed of signing itself.

_U16 = struct.Struct(">BH").pack
_U32 = struct.Struct(">BI").pack
_U64 = struct.Struct(">BQ").pack


def _uint(n):
    """Deterministic CBOR encoding of an unsigned integer (major type 0)."""
    if n < 24:
        return bytes((n,))
    if n < 0x100:
        return bytes((0x18, n))
    if n < 0x10000:
        return _U16(0x19, n)
    if n < 0x100000000:
        return _U32(0x1A, n)
    return _U64(0x1B, n)


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

    @staticmethod
    def payload_parts(device, amount, issued, expires=None):
        """The payload around the sequence: (head up to key 2, tail after the sequence)."""
        head = (b"\xa4" if expires is None else b"\xa5") + b"\x01\x48" + device + b"\x02"
        tail = b"\x03" + _uint(amount) + b"\x04" + _uint(issued)
        if expires is not None:
            tail += b"\x05" + _uint(expires)
        return head, tail

    def payload(self, device, sequence, amount, issued, expires=None):
        head, tail = self.payload_parts(device, amount, issued, expires)
        return head + _uint(sequence) + tail

    def encode(self, device, sequence, amount, issued, expires=None):
        payload = self.payload(device, sequence, amount, issued, expires)
        bpay = _bstr_head(len(payload)) + payload
        sig = crypto_sign(self._tbs_prefix + bpay, self._secret64)[:64]
        return self._cose_prefix + bpay + b"\x58\x40" + sig

    def encode_run(self, device, first, count, amount, issued, expires=None):
        """[(sequence, cose bytes)] for sequences first..first+count-1.

        The same bytes as `encode` for each sequence, with everything but the sequence
        encoded once, and libsodium called with reused buffers (PyNaCl's
        nacl.bindings.crypto_sign allocates two per call and copies the message back).
        """
        head, tail = self.payload_parts(device, amount, issued, expires)
        fixed = len(head) + len(tail)
        tbs_prefix, cose_prefix, sk = self._tbs_prefix, self._cose_prefix, self._secret64
        if _lib is not None:
            out = _ffi.new("unsigned char[]", 64 + 256)  # Sig_structure is < 128 bytes
            sig_of = _ffi.buffer(out, 64).__getitem__
            whole = slice(0, 64)
            c_sign, null = _lib.crypto_sign, _ffi.NULL

            def sign(msg):
                if c_sign(out, null, msg, len(msg), sk) != 0:
                    raise RuntimeError("crypto_sign failed")
                return sig_of(whole)
        else:
            def sign(msg):
                return crypto_sign(msg, sk)[:64]
        result = []
        pre = {}  # sequence encoding length -> (Sig_structure prefix, COSE prefix)
        for seq in range(first, first + count):
            s = _uint(seq)
            p = pre.get(len(s))
            if p is None:
                bhead = _bstr_head(fixed + len(s)) + head
                p = pre[len(s)] = (tbs_prefix + bhead, cose_prefix + bhead)
            body = s + tail
            result.append((seq, p[1] + body + b"\x58\x40" + sign(p[0] + body)))
        return result


reference = voucher.reference  # one definition of the voucher reference: SPEC.md §2.2


# --- keypad codes (SPEC.md §8) ------------------------------------------------------------
# The digits of protocol.keycode.encode — the tests hold this to that — with the HMAC key
# and everything but the sequence set up once per run (hmac's C implementation, its state
# copied per code), and the Damm check digit walked over the bytes with one flat table.

def _damm_table():
    # state << 8 | digit byte  ->  next state << 8
    table = [0] * (10 << 8)
    for state in range(10):
        for digit in range(10):
            table[state << 8 | (48 + digit)] = keycode._DAMM[state][digit] << 8
    return tuple(table)


_DAMM_NEXT = _damm_table()
_CHECK_FOR = tuple(str(next(c for c in range(10) if keycode._DAMM[s][c] == 0)) for s in range(10))
_CODE_REF_PREFIX = b"OTU1 code "


class CodeEncoder:
    """Keypad codes of one meter (its 32-byte code key, SPEC.md §8)."""

    def __init__(self, key, device):
        self._key = bytes(key)
        self._device = bytes(device)

    def encode_run(self, first, count, amount, kind=keycode.KIND_ADD):
        """[(sequence, reference, 20 digits)] for sequences first..first+count-1."""
        if not 1 <= amount <= keycode.MAX_AMOUNT:
            raise ValueError("a code carries 1..%d pence" % keycode.MAX_AMOUNT)
        base = _hmac.new(self._key, keycode._MAC_DOMAIN + self._device + bytes((kind,))
                         + amount.to_bytes(4, "big"), _hashlib.sha256)
        head = (kind << keycode.AMOUNT_BITS | amount) << keycode.SEQ_BITS
        shift, mac_mask, seq_mask = keycode.MAC_BITS, (1 << keycode.MAC_BITS) - 1, \
            keycode.SEQ_SPAN - 1
        nxt, check, sha, prefix = _DAMM_NEXT, _CHECK_FOR, _hashlib.sha256, _CODE_REF_PREFIX
        out = []
        for seq in range(first, first + count):
            h = base.copy()
            h.update(seq.to_bytes(4, "big"))
            tag = int.from_bytes(h.digest()[:4], "big") & mac_mask
            body = "%019d" % ((head | (seq & seq_mask)) << shift | tag)
            d = 0
            for b in body.encode():
                d = nxt[d | b]
            digits = body + check[d >> 8]
            out.append((seq, sha(prefix + digits.encode()).digest()[:keycode.REF_LEN], digits))
        return out


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
                  batch_size=DEFAULT_BATCH, progress=None, fmt=None, destination=None,
                  delivered=None, also=None):
    """Issue `count` vouchers of `amount` pence to `device`; yield Batches of Issued.

    Each list is yielded only after its transaction has committed. `expires_in` is in
    seconds from the issue time; `now` fixes the issue time (default: the clock, read per
    batch). Everything the caller got wrong is checked before the first transaction, so a
    refused request changes nothing.

    `destination` (with `fmt`): where the caller writes the vouchers; then `delivered()`
    is called before each transaction and returns the caller's list of [(device, first,
    last)] written whole and not yet recorded: they are recorded in that transaction and
    removed from the list once it commits (the caller records what is left with
    `record_deliveries`). Without a destination the vouchers are recorded as handed to
    the calling program when they are committed.

    `also(conn, batch)`: called inside each transaction once its batch is stored, to write
    more in the same commit (the HTTP service's idempotency answer and audit row); what it
    raises rolls the batch back.
    """
    device = bytes(device)
    dev = get_device(conn, device)
    _check_request(dev, amount, count, expires_in)
    store = _voucher_store(signer, device, amount, expires_in)
    yield from _issue(conn, device, amount, count, now, batch_size, progress, fmt,
                      destination, delivered, store, "vouchers", also)


def issue_group(conn, signer, requests, now=None):
    """Group commit (the HTTP service): issue several requests inside the caller's write
    transaction with a handful of statements in all, whatever their number.

    `requests`: [(device, amount, count, expires_in)]. Returns one item per request, in
    order: the Batch stored for it (its own issue batch and sequence reservation, as
    `issue_batches` would make in one transaction), or the TopupError refusing it (device
    removed, limits changed meanwhile, sequences run out, key no longer active), which
    stored nothing for it. Everything is checked under the write lock before anything is
    written. The caller commits, and must not release a Batch before COMMIT has returned.
    """
    out = [None] * len(requests)
    kid = signer.kid
    key = conn.execute("SELECT active FROM keys WHERE kid = ?", (kid,)).fetchone()
    if key is None or not key[0]:
        e = TopupError("key %s is no longer the active key; stopped after 0 vouchers"
                       % kid.hex())
        return [e] * len(requests)
    wanted = sorted({bytes(r[0]) for r in requests})
    state = {bytes(d): [first, top] for d, first, top in conn.execute(
        "SELECT device, next_sequence, max_voucher FROM devices WHERE device IN (%s)"
        % ",".join("?" * len(wanted)), wanted)}
    start = {d: st[0] for d, st in state.items()}
    issued = int(time.time()) if now is None else int(now)
    plan = []
    for i, (device, amount, count, expires_in) in enumerate(requests):
        device = bytes(device)
        st = state.get(device)
        if st is None:
            out[i] = TopupError("device %s was removed" % format_eui64(device))
            continue
        first, top = st
        if not 1 <= amount <= min(top, MAX_AMOUNT) or first + count - 1 > MAX_SEQUENCE \
                or count < 1 or (expires_in is not None and expires_in <= 0):
            out[i] = TopupError("device %s limits changed; stopped after 0 vouchers"
                                % format_eui64(device))
            continue
        expires = None if expires_in is None else issued + int(expires_in)
        check_fields(device, first, amount, issued, expires)
        st[0] = first + count
        plan.append((i, device, amount, count, first, expires))
    if not plan:
        return out
    # One issue batch per request. Rows alike in (device, amount, requested) are alike in
    # every column, so matching the returned ids by those values is exact in any order.
    ids = {}
    for b, d, a, n in conn.execute(
            "INSERT INTO issue_batches (device, amount, requested, created, format, "
            "destination) VALUES %s RETURNING batch, device, amount, requested"
            % ",".join(["(?, ?, ?, ?, NULL, NULL)"] * len(plan)),
            [v for _, d, a, n, _, _ in plan for v in (d, a, n, issued)]).fetchall():
        ids.setdefault((bytes(d), a, n), []).append(b)
    enc = VoucherEncoder(kid, signer.secret64)
    vouchers, delivered = [], []
    for i, device, amount, count, first, expires in plan:
        batch_id = ids[(device, amount, count)].pop()
        rows = [(seq, reference(raw), raw)
                for seq, raw in enc.encode_run(device, first, count, amount, issued, expires)]
        vouchers.extend((device, seq, amount, issued, expires, kid, ref, raw, batch_id)
                        for seq, ref, raw in rows)
        delivered.append((device, first, first + count - 1, issued, batch_id))
        out[i] = Batch(device, amount, issued, expires, kid, rows, batch_id)
    conn.executemany("INSERT INTO vouchers (device, sequence, amount, issued, expires, kid, "
                     "ref, cose, batch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", vouchers)
    moved = [(d, st[0]) for d, st in state.items() if st[0] != start[d]]
    cur = conn.execute(
        "UPDATE devices SET next_sequence = CASE device %s END WHERE device IN (%s)"
        % (" ".join(["WHEN ? THEN ?"] * len(moved)), ",".join("?" * len(moved))),
        [v for d, n in moved for v in (d, n)] + [d for d, _ in moved])
    if cur.rowcount != len(moved):  # cannot happen under the write lock; refuse loudly
        raise RuntimeError("devices changed inside a write transaction")
    conn.executemany("INSERT INTO deliveries (device, first, last, at, batch) "
                     "VALUES (?, ?, ?, ?, ?)", delivered)
    return out


def _voucher_store(signer, device, amount, expires_in):
    enc = VoucherEncoder(signer.kid, signer.secret64)
    kid = signer.kid

    def store(conn, first, n, issued, batch_id, done):
        key = conn.execute("SELECT active FROM keys WHERE kid = ?", (kid,)).fetchone()
        if key is None or not key[0]:
            raise TopupError("key %s is no longer the active key; stopped after %d "
                             "vouchers" % (kid.hex(), done))
        expires = None if expires_in is None else issued + int(expires_in)
        check_fields(device, first, amount, issued, expires)
        rows = [(seq, reference(raw), raw)
                for seq, raw in enc.encode_run(device, first, n, amount, issued, expires)]
        # What is constant in the batch goes into the statement as literals (integers
        # and hex we made ourselves), so only three values are bound per voucher.
        conn.executemany(
            "INSERT INTO vouchers (device, sequence, amount, issued, expires, kid, ref,"
            " cose, batch) VALUES (X'%s', ?, %d, %d, %s, X'%s', ?, ?, %d)"
            % (device.hex(), amount, issued, "NULL" if expires is None else "%d" % expires,
               kid.hex(), batch_id), rows)
        return Batch(device, amount, issued, expires, kid, rows, batch_id)
    return store


def code_epoch(conn, device):
    """The meter's current key epoch for keypad codes (registry.code_epoch: TopupError if
    it takes none), its `code_kid` the supplier code key the meter is known to derive its
    code key from: a SET_CODE_KEY command confirmed by a receipt replaces the one its
    provisioning installed (SPEC.md §10); a pending one does not yet."""
    from . import commands
    epoch = registry.code_epoch(conn, device)
    kid = commands.code_kid(conn, device, confirmed=True)
    if kid is not None and kid != epoch.code_kid:
        epoch = registry.KeyEpoch(epoch.device, epoch.epoch, epoch.public_key, epoch.kid,
                                  epoch.first_index, epoch.floor, epoch.provisioned,
                                  epoch.ka_public, kid, epoch.command_kid, epoch.first_prev)
    return epoch


def _check_code_request(conn, dev, amount, count):
    """The code-specific refusals, before anything is stored: (code epoch, highest)."""
    epoch = code_epoch(conn, dev.device)
    if not 1 <= amount <= keycode.MAX_AMOUNT:
        raise TopupError("a keypad code carries 1p..%s (SPEC §8); issue a voucher for more"
                         % format_pence(keycode.MAX_AMOUNT))
    highest = registry.highest_applied(conn, dev.device)
    last = dev.next_sequence + count - 1
    if last > highest + registry.CODE_SPAN:
        raise TopupError(_too_far(dev.name, last, highest, count))
    return epoch, highest


def _too_far(name, last, highest, count):
    return ("code sequence %d would be more than %d above %d, the highest sequence meter %s "
            "may have applied (its reconciled receipts, or its sequence floor): the meter "
            "rebuilds a code's sequence from its 14 low bits near its window and would answer "
            "CODE_WRONG (SPEC §8); import its receipts and `topup reconcile`, or issue "
            "vouchers%s" % (last, registry.CODE_SPAN, highest, name,
                            "" if count == 1 else ", or fewer codes"))


def issue_code_batches(conn, code_key, device, amount, count=1, now=None,
                       batch_size=DEFAULT_BATCH, progress=None, fmt=None, destination=None,
                       delivered=None, also=None):
    """Issue `count` keypad codes (SPEC.md §8) of `amount` pence to `device`; yield
    Batches of Issued (form 2). As `issue_batches`: the sequences are reserved in the same
    transaction that stores the codes, committed before any code is yielded; the same
    issue batches and deliveries are recorded.

    `code_key`: the unlocked supplier code key (host.keystore.CodeKey) that the meter's
    current key epoch was provisioned with. Refused, before anything is stored, for a meter
    that takes no codes, an amount over £655.35 or the meter's per-voucher maximum, and a
    sequence more than 2^14 - 64 above what the meter may have applied.
    """
    device = bytes(device)
    dev = get_device(conn, device)
    _check_request(dev, amount, count, None)
    epoch, _ = _check_code_request(conn, dev, amount, count)
    if epoch.code_kid != code_key.kid:
        raise TopupError("meter %s holds code key %s, not %s"
                         % (dev.name, epoch.code_kid.hex(), code_key.kid.hex()))
    enc = CodeEncoder(code_key.code_key(device, epoch.ka_public), device)
    kid = code_key.kid

    def store(conn, first, n, issued, batch_id, done):
        cur = registry.device_keys(conn, device)
        if not cur or cur[-1].epoch != epoch.epoch:
            raise TopupError("meter %s was provisioned again meanwhile; stopped after %d codes"
                             % (dev.name, done))
        highest = registry.highest_applied(conn, device)
        if first + n - 1 > highest + registry.CODE_SPAN:
            raise TopupError("stopped after %d codes: %s" % (
                done, _too_far(dev.name, first + n - 1, highest, n)))
        rows = enc.encode_run(first, n, amount)
        conn.executemany(
            "INSERT INTO vouchers (device, sequence, amount, issued, ref, code, form, "
            "code_kid, batch) VALUES (X'%s', ?, %d, %d, ?, ?, %d, X'%s', %d)"
            % (device.hex(), amount, issued, FORM_CODE, kid.hex(), batch_id), rows)
        return Batch(device, amount, issued, None, kid, rows, batch_id, FORM_CODE)

    yield from _issue(conn, device, amount, count, now, batch_size, progress, fmt,
                      destination, delivered, store, "codes", also)


def _issue(conn, device, amount, count, now, batch_size, progress, fmt, destination,
           delivered, store, what, also=None):
    """The reservation loop both forms share: per batch one BEGIN IMMEDIATE transaction
    that reads next_sequence, records the issue batch and the deliveries reported so far,
    stores the batch (`store(conn, first, n, issued, batch id, done) -> Batch`), moves
    next_sequence and commits; then yields the batch."""
    done = 0
    batch_id = None
    if progress:
        progress(0, count)
    while done < count:
        n = min(batch_size, count - done)
        pending = delivered() if delivered is not None and batch_id is not None else []
        written = list(pending)
        with transaction(conn):
            batch = _reserve_and_store(conn, device, amount, count, n, now, batch_id, done,
                                       fmt, destination, written, store, what, also)
            batch_id = batch.batch
        del pending[:len(written)]
        # COMMIT has returned: the reservation is durable. Now they may leave.
        done += n
        if progress:
            progress(done, count)
        yield batch


def _reserve_and_store(conn, device, amount, count, n, now, batch_id, done, fmt, destination,
                       written, store, what, also):
    """One transaction's work, inside the caller's write transaction: read next_sequence,
    record the issue batch (when `batch_id` is None) and the deliveries reported so far,
    store `n` vouchers or codes, move next_sequence, call `also`. Returns the Batch."""
    row = conn.execute("SELECT next_sequence, max_voucher FROM devices WHERE device = ?",
                       (device,)).fetchone()
    if row is None:
        raise TopupError("device %s was removed" % format_eui64(device))
    first, max_voucher = row
    if amount > max_voucher or first + n - 1 > MAX_SEQUENCE:
        raise TopupError("device %s limits changed; stopped after %d %s"
                         % (format_eui64(device), done, what))
    issued = int(time.time()) if now is None else int(now)
    if batch_id is None:
        batch_id = conn.execute(
            "INSERT INTO issue_batches (device, amount, requested, created, format, "
            "destination) VALUES (?, ?, ?, ?, ?, ?) RETURNING batch",
            (device, amount, count, issued, fmt if destination else None,
             destination)).fetchone()[0]
    if written:
        _insert_deliveries(conn, written, batch_id, fmt, destination)
    batch = store(conn, first, n, issued, batch_id, done)
    cur = conn.execute("UPDATE devices SET next_sequence = ? WHERE device = ? AND "
                       "next_sequence = ?", (first + n, device, first))
    if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; refuse loudly
        raise RuntimeError("next_sequence moved inside a write transaction")
    if destination is None:  # handed to the calling program as this commits
        _insert_deliveries(conn, [(device, first, first + n - 1)], batch_id, None,
                           None, issued)
    if also is not None:
        also(conn, batch)
    return batch


def _insert_deliveries(conn, ranges, batch, fmt, destination, at=None):
    at = int(time.time()) if at is None else int(at)
    conn.executemany("INSERT INTO deliveries (device, first, last, at, batch, format, "
                     "destination) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     [(bytes(d), a, b, at, batch, fmt, destination) for d, a, b in ranges])


def record_deliveries(conn, ranges, batch=None, fmt=None, destination=None, now=None):
    """Record that vouchers [(device, first sequence, last sequence)] were written whole to
    `destination` in format `fmt` (by issue batch `batch`, or an export: None)."""
    ranges = list(ranges)
    if not ranges:
        return
    with transaction(conn):
        _insert_deliveries(conn, ranges, batch, fmt, destination, now)


def ranges(pairs):
    """[(device, first, last)] runs of consecutive sequences from (device, sequence) pairs
    given in (device, sequence) order."""
    out = []
    for device, seq in pairs:
        if out and out[-1][0] == device and out[-1][2] + 1 == seq:
            out[-1][2] = seq
        else:
            out.append([device, seq, seq])
    return [tuple(r) for r in out]


def issue(conn, signer, device, amount, count=1, **kw):
    """All vouchers of `issue_batches` as one list."""
    out = []
    for batch in issue_batches(conn, signer, device, amount, count, **kw):
        out.extend(batch)
    return out


def issue_codes(conn, code_key, device, amount, count=1, **kw):
    """All codes of `issue_code_batches` as one list."""
    out = []
    for batch in issue_code_batches(conn, code_key, device, amount, count, **kw):
        out.extend(batch)
    return out


_STORED = ("SELECT device, sequence, amount, issued, expires, coalesce(kid, code_kid), ref, "
           "cose, form, code FROM vouchers")


def _issued(r):
    return Issued(bytes(r[0]), r[1], r[2], r[3], r[4], bytes(r[5]), bytes(r[6]),
                  None if r[7] is None else bytes(r[7]), r[8], r[9])


def stored(conn, device=None):
    """Stored vouchers and codes (all, or one device's), in (device, sequence) order."""
    sql = _STORED
    args = ()
    if device is not None:
        sql += " WHERE device = ?"
        args = (device,)
    return [_issued(r) for r in conn.execute(sql + " ORDER BY device, sequence", args)]


def find_sequence(conn, device, sequence):
    r = conn.execute(_STORED + " WHERE device = ? AND sequence = ?",
                     (device, sequence)).fetchone()
    return None if r is None else _issued(r)
