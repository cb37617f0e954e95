"""Power-safe record store on a raw flash partition (MicroPython block-device protocol).

Holds the meter's config blob (provisioning, in two copies), its state blob (the ledger's
CBOR), a ring of receipts and a small carry kept across a factory reset, so that a power
cut at any instant leaves either the old or the new state whole, with every committed
receipt readable; and so that a flipped bit in flash is repaired, and damage it cannot
repair is reported (`faults`) rather than taken for a power cut.

On-flash format
---------------
The partition (N >= 3 blocks of B bytes) is a log of records. A record is a 20-byte header
and a payload, padded to a multiple of 4 bytes (padding stays 0xFF), never across a block
(the format and its repair are in meter.records)::

    0  u8   magic 0xA7
    1  u8   type: 1 config, 2 state, 3 receipt, 4 wipe (format in progress), 5 carry
    2  u16  payload length
    4  u32  generation: +1 for every record written, so the newest copy wins
    8  u32  receipt: its index; state: receipt_count; config: copy number 0/1; else 0
    12 u32  tag: receipt: the caller's (e.g. the voucher sequence); state: bit 31 set,
            bit 30 a config was live, bit 29 a carry was live, bits 16..28 the low bits
            of the live config's CRC-32, bits 0..15 the span: the receipts
            [count - span, count) are all on flash; wipe/carry: 1 if a carry
    16 u32  CRC-32 of bytes 0..15 and the payload
    (all little-endian)

Records are appended into the head block, into erased (0xFF) flash only, so programming
is safe on NOR (bits are only cleared); each is written in address order, one call per
256-byte page (no call crosses a page boundary), then read back: a record that does not
read back whole is zeroed, its block closed, and it is written again in the next block
(its generation is reused: no hole is left). A block reads as: records, then either all
0xFF to its end (room to append) or the remains of one torn record (the block is then
closed: nothing more is appended to it).

Commit
------
`commit(state, receipt, tag)` makes room for both records in the head block first, writes
the receipt (index = receipt_count), then the state record carrying receipt_count + 1: the
state record is the commit point. A receipt whose state record is missing (torn, or
damaged later) is pending: `pending_receipts()` lists it and `commit(..., adopt=k)` takes
the first k as committed; a commit that does not adopt them supersedes them (its receipt
reuses the index with a higher generation). `write_config` writes two copies.

Mount: torn write or corruption
-------------------------------
Mount reads every record. A record whose CRC fails is repaired if one flipped bit
explains it (meter.records.repair); otherwise the scan goes on at the next 4-byte offset
for the next valid record of that block. The state and config are the valid records of
highest generation; receipt i is the valid record of highest generation with index i.
Mount itself never writes. What a power cut can do is known (the NOR model of
boards/nor.py): tear the last record written (a prefix of it programmed, the byte at the
cut partly, the rest erased; its generation is then reused by the next record, so the
valid generations have no hole), or tear an erase of the block after the head (the
spare, or the block a reclaim was emptying; or the head itself while repairing a torn
reclaim; a reclaim that finds nothing live in the block it empties erases it only once
the new head holds a record, so this stays true). Anything else is damage, and is
reported in `faults` ({code: count}, empty when nothing was wrong):

- FAULT_REPAIRED: a record repaired, except as a torn write also leaves one: by clearing
  a bit with only 0xFF after it in the record (used as whole, but not reported);
- FAULT_LOST: a record lost beyond repair, one per missing generation (inside a block,
  between successive blocks, before the first record of the oldest block), or programmed
  bytes past the end of the last, bad record of the newest block (a torn write leaves
  none there); also a carry that the newest state says was live. Blocks a torn erase may
  have hit are left out;
- FAULT_STATE_LOST: a record newer than the state in use was lost (it may have been a
  newer state);
- FAULT_CONFIG: a config copy repaired, or only one whole copy where a cut between the
  two copies does not explain it, or no config or another config than the one the newest
  state was written with (the state records a 13-bit CRC of it). The next write rewrites
  both copies whenever one is missing or was repaired;
- FAULT_RECEIPT_LOST: a receipt the newest state says is kept (its span) is missing.

What cannot be told from a torn write: damage confined to the newest record(s) of the
newest block when nothing valid follows and the first damaged record's header is gone or
its damage stays within its own length -- the store then reads as if power had been cut
while they were written (the older state; a receipt whose state record is gone is
pending, for the ledger to roll forward). A single flipped bit is always repaired.

Ring, wear and reclaim
----------------------
Blocks are used in ring order; the block after the head (the "spare") is always erased.
When the head has no room, the spare becomes the head and the block after it (the oldest)
is reclaimed: whatever in it is still live -- the config copies, the latest state, the
carry, the pending receipts, the newest `keep_receipts` receipts and those `retain(index,
tag)` asks to keep -- is copied forward into the new head with new generations (copies
of repaired records are whole again), then the oldest block is erased and becomes the
spare. Every block is erased once per trip round the ring, so wear is even. A cut during a
reclaim is repaired by the first write after the next mount:

- the block after the head holds no valid record (torn erase, or a torn first copy): it
  is erased;
- it holds valid records and the head is open (copies done, or a clean cut between
  copies): the rest of its live records are copied forward, then it is erased;
- it holds valid records and the head is closed by a torn copy: the head holds nothing
  but copies of records still whole in the old block, so the head is erased, the
  partition rescanned and the reclaim redone later.

Before anything is written, `commit` and `write_config` check that live data plus the new
records fit with room to spare ((N - 2) * (B - need) bytes); if not, `StoreError` is raised
and nothing has changed.

Format
------
`format(carry)` writes a wipe record (holding the carry) alone in the erased spare, erases
every other block, writes a carry record into the block after the wipe's, then erases the
wipe's block. A cut before the wipe record is whole mounts as the old contents; after it,
as an empty store with `carry` set, and the next write finishes the format.

RAM: two buffers made once (B / 2 and 64 bytes), the cached state, config and carry
blobs, a dict receipt index -> flash address, bounded by keep_receipts + retained
receipts (after a mount it holds every committed receipt found on flash until the first
write prunes it, since `retain` may need the ledger's state, which the ledger reads after
mount), and a few small per-block lists during mount.
"""
import struct

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):
        return x

from meter import records
from meter.records import CARRY, CONFIG, GENMAX, HDR, MAGIC, RECEIPT, STATE, WIPE

FAULT_REPAIRED = const(1)       # a record repaired (one flipped bit)
FAULT_LOST = const(2)           # a record lost beyond repair that no power cut explains
FAULT_CONFIG = const(3)         # a config copy lost or repaired (both copies are rewritten)
FAULT_RECEIPT_LOST = const(4)   # a committed receipt that must be kept is missing
FAULT_STATE_LOST = const(5)     # the newest state may be lost: an older state is in use

_CHK = const(64)
_PAGE = const(256)
_CHECK_MAX = const(4096)        # receipts checked against the state's span at mount
_CARRY_MAX = const(200)
_FMT = "<BBHIII"
_FMTC = "<BBHIIII"       # with the stored CRC
_FF = b"\xff" * 64


class StoreError(Exception):
    """Flash full or unusable: the operation is refused and nothing has changed."""


class _Bad(Exception):
    """A record did not read back whole after it was programmed."""


_size = records.size


class Store:
    def __init__(self, bdev, keep_receipts=64):
        self._bd = bdev
        self.keep = keep_receipts
        self.retain = None
        self._n = bdev.ioctl(4, 0)
        self._bs = bdev.ioctl(5, 0)
        if self._n < 3 or self._bs < 256:
            raise StoreError("partition too small")
        self._buf = bytearray(self._bs // 2)
        self._mv = memoryview(self._buf)
        self._cb = bytearray(_CHK)
        self._cmv = memoryview(self._cb)
        self._erases = 0
        self._programs = 0
        self._mounted = False
        self._clear()

    def _clear(self):
        self.faults = {}
        self._fixed = {}        # address -> 1 (reported) or 2 (silent): records repaired
        self._config = None
        self._cfg = -1          # flash addresses of the two config copies, or -1
        self._cfg2 = -1
        self._cfgsz = 0         # bytes of both copies
        self._cfix = False      # a config copy is missing or repaired: rewrite both
        self._state = None
        self._st = -1
        self._stsz = 0
        self._count = 0
        self._lo = 0            # receipts [lo, count) are kept at least
        self._carry = None
        self._cy = -1
        self._cysz = 0
        self._rx = {}           # receipt index -> flash address
        self._pend = {}         # pending receipts: index -> flash address
        self._live = 0          # bytes of live records
        self._gen = 0           # generation of the next record
        self._head = 0
        self._app = 0           # append offset in the head block; -1 if it is closed
        self._fix = 0           # pending repair: 1 spare not erased, 2 format unfinished
        self._nxv = False       # the block after the head holds valid records
        self._wipe = -1         # block of the wipe record
        self._defer = -1        # block to erase once the head holds a record
        self._pruned = True

    # -- public state ----------------------------------------------------------------------
    @property
    def config(self):
        return self._config

    @property
    def state(self):
        return self._state

    @property
    def carry(self):
        return self._carry

    @property
    def receipt_count(self):
        return self._count

    @property
    def oldest_receipt(self):
        """The lowest committed receipt index still held (receipt_count if none)."""
        rx = self._rx
        low = self._count
        for i in rx:
            if i < low:
                low = i
        return low

    @property
    def erases(self):
        e = getattr(self._bd, "erases", None)
        return self._erases if e is None else e

    @property
    def programs(self):
        p = getattr(self._bd, "programs", None)
        return self._programs if p is None else p

    # -- low level -------------------------------------------------------------------------
    def _erase(self, b):
        self._erases += 1
        self._bd.ioctl(6, b)

    def _hdr(self, loc):
        # Header fields of the record at loc: (magic, type, length, gen, index, tag).
        bs = self._bs
        if loc in self._fixed:
            r = self._rec(loc // bs, loc % bs)
            if r:
                return MAGIC, r[0], r[1], r[2], r[3], r[4]
        self._bd.readblocks(loc // bs, self._cmv[0:16], loc % bs)
        return struct.unpack_from(_FMT, self._cb, 0)

    def _blank(self, b, pos):
        # True if block b is all 0xFF from pos to its end.
        bs = self._bs
        cb = self._cb
        while pos < bs:
            r = bs - pos
            if r >= _CHK:
                self._bd.readblocks(b, cb, pos)
                if cb != _FF:
                    return False
            else:
                self._bd.readblocks(b, self._cmv[0:r], pos)
                if bytes(self._cmv[0:r]) != _FF[:r]:
                    return False
            pos += _CHK
        return True

    def _rec(self, b, pos):
        # Read the record at (b, pos) into the buffer, repairing one flipped bit. None:
        # erased header; False: not a valid record; else (type, length, gen, index, tag,
        # size, fix): fix 0 whole, 1 repaired, 2 repaired as a torn write may leave it.
        mv = self._mv
        cb = self._cb
        bd = self._bd
        self._bd.readblocks(b, self._cmv[0:HDR], pos)
        if cb[0] == 0xFF:       # a record starts with the magic, never 0xFF
            for j in range(1, HDR):
                if cb[j] != 0xFF:
                    return False
            return None
        room = self._bs - pos
        if room > len(mv):
            room = len(mv)
        magic, typ, ln, gen, idx, tag, want = struct.unpack_from(_FMTC, cb, 0)
        size = _size(ln)
        if magic == MAGIC and CONFIG <= typ <= CARRY and gen <= GENMAX and size <= room:
            mv[0:HDR] = self._cmv[0:HDR]
            if ln:
                bd.readblocks(b, mv[HDR:HDR + ln], pos + HDR)
            if records.crc(mv, ln) == want:
                return typ, ln, gen, idx, tag, size, 0
        if not records.candidate(cb, room):
            return False
        bd.readblocks(b, mv[0:room], pos)
        bit = records.repair(self._buf, mv, room)
        if bit < 0:
            return False
        magic, typ, ln, gen, idx, tag = struct.unpack_from(_FMT, self._buf, 0)
        fix = 2 if records.tornlike(self._buf, ln, bit) else 1
        return typ, ln, gen, idx, tag, _size(ln), fix

    def _payload(self, loc):
        bs = self._bs
        r = self._rec(loc // bs, loc % bs)
        if not r:
            return None
        return bytes(self._mv[HDR:HDR + r[1]])

    def _put(self, size):
        # Write buffer[0:size] (a finished record) at the head and read it back; return
        # its address. _Bad if it did not read back whole (it is zeroed, the head closed).
        bs = self._bs
        if self._app < 0 or self._app + size > bs:
            raise StoreError("no room in the head block")
        off = self._app
        head = self._head
        # One call per 256-byte page, in address order: no write crosses a page boundary
        # (a board whose flash programs whole pages can pad each call with 0xFF).
        i = 0
        while i < size:
            c = _PAGE - (off + i) % _PAGE
            if c > size - i:
                c = size - i
            self._programs += 1
            self._bd.writeblocks(head, self._mv[i:i + c], off + i)
            i += c
        if not self._verify(head, off, size):
            self._kill(head, off, size)
            self._app = -1
            raise _Bad()
        self._app = off + size
        self._gen += 1
        self._settle()
        return head * bs + off

    def _verify(self, b, off, size):
        cb = self._cb
        buf = self._buf
        i = 0
        while i < size:
            c = size - i
            if c >= _CHK:
                self._bd.readblocks(b, cb, off + i)
                if cb != buf[i:i + _CHK]:
                    return False
                i += _CHK
            else:
                self._bd.readblocks(b, self._cmv[0:c], off + i)
                if cb[0:c] != buf[i:size]:
                    return False
                i = size
        return True

    def _kill(self, b, off, size):
        # Program a bad record to zeros: it can never read as a record again.
        cb = self._cb
        for j in range(_CHK):
            cb[j] = 0
        i = 0
        while i < size:
            c = _CHK - (off + i) % _CHK
            if c > size - i:
                c = size - i
            self._programs += 1
            self._bd.writeblocks(b, self._cmv[0:c], off + i)
            i += c

    def _append(self, typ, payload, idx, tag):
        ln = len(payload)
        struct.pack_into(_FMT, self._buf, 0, MAGIC, typ, ln, 0, idx, tag)
        self._mv[HDR:HDR + ln] = payload
        return self._put(records.seal(self._buf, self._mv, ln, self._gen))

    def _write(self, recs):
        # Append records [(type, payload, index, tag)] to the head, in order, making room
        # for all of them first; a record that does not read back whole is written again
        # in the next block. Returns their addresses.
        locs = []
        k = 0
        tries = 3
        while k < len(recs):
            need = 0
            for j in range(k, len(recs)):
                need += _size(len(recs[j][1]))
            self._room(need)
            try:
                while k < len(recs):
                    typ, payload, idx, tag = recs[k]
                    locs.append(self._append(typ, payload, idx, tag))
                    k += 1
            except _Bad:
                tries -= 1
                if tries < 0:
                    self._mounted = False
                    raise StoreError("flash does not program")
        return locs

    def _flags(self):
        # What a state record says of the config and carry live as it is written.
        f = records.STATE_V2
        if self._config is not None:
            f |= records.STATE_CFG | records.csum(self._config) << records.CSUM_SHIFT
        if self._carry is not None:
            f |= records.STATE_CARRY
        return f

    def _copy(self, loc):
        bs = self._bs
        r = self._rec(loc // bs, loc % bs)
        if not r:
            raise StoreError("live record unreadable")
        if r[0] == STATE and r[4] & records.STATE_V2:
            # A copy of the state names the config and carry live now, as a new one would.
            struct.pack_into("<I", self._buf, 12, r[4] & records.SPAN | self._flags())
        try:
            return self._put(records.seal(self._buf, self._mv, r[1], self._gen))
        except _Bad:
            self._mounted = False       # remount and redo the reclaim at the next write
            raise StoreError("flash does not program")

    # -- mount -----------------------------------------------------------------------------
    def mount(self):
        """Read the partition; never writes. Sets config, state, carry, receipt_count and
        faults ({fault code: count}, empty when nothing was wrong)."""
        self._clear()
        n = self._n
        bs = self._bs
        lo = [-1] * n           # per block: lowest and highest valid generation
        hi = [-1] * n
        apps = [0] * n
        pre = [0] * n           # 1: records lost before the block's first valid one
        holes = [0] * n         # generations missing between valid records of the block
        hmax = [-1] * n         # the newest of them
        tail = [0] * n          # 1: more than one record lost at the block's end
        reps = [0] * n          # repaired records to report
        stg = c1g = c2g = wg = cyg = -1
        stloc = c1 = c2 = wloc = cyloc = -1
        stcount = sttag = 0
        rx = {}
        fixed = self._fixed
        cb = self._cb
        for b in range(n):
            pos = 0
            app = -1
            prev = -1           # generation of the last valid record in this block
            bad = False         # bad bytes since it
            end = -1            # where the first bad record ends, if its header is plausible
            while pos + HDR <= bs:
                r = self._rec(b, pos)
                if r is None:
                    if self._blank(b, pos):
                        if not bad:
                            app = pos
                        break
                    r = False
                if r and r[2] <= prev:
                    r = False   # generations grow along a block: not one of its records
                if not r:
                    if not bad:
                        bad = True
                        ln = records.sane(cb, bs - pos)
                        end = pos + _size(ln) if ln >= 0 else -1
                    pos += 4
                    continue
                typ, ln, gen, idx, tag, size, fix = r
                loc = b * bs + pos
                if prev >= 0:
                    gap = gen - prev - 1
                    if gap:
                        holes[b] += gap
                        hmax[b] = gen - 1
                elif bad:
                    pre[b] = 1
                if fix:
                    fixed[loc] = fix
                    if fix == 1:
                        reps[b] += 1
                if lo[b] < 0:
                    lo[b] = gen
                hi[b] = prev = gen
                bad = False
                if typ == STATE:
                    if gen > stg:
                        stg, stloc, stcount, sttag = gen, loc, idx, tag
                elif typ == CONFIG:
                    if gen > c1g:
                        c2g, c2 = c1g, c1
                        c1g, c1 = gen, loc
                    elif gen > c2g:
                        c2g, c2 = gen, loc
                elif typ == RECEIPT:
                    old = rx.get(idx)
                    if old is None or self._hdr(old)[3] < gen:
                        rx[idx] = loc
                elif typ == WIPE:
                    if gen > wg:
                        wg, wloc = gen, loc
                elif gen > cyg:
                    cyg, cyloc = gen, loc
                pos += size
            else:
                if not bad:
                    app = pos
            if bad and pos > end >= 0:
                # Bytes programmed past the end the first bad record's header claims: a
                # torn write leaves none (a torn length only reads longer), so more than
                # one record was there.
                tail[b] = 1
            apps[b] = app
        self._mounted = True
        self._pruned = False
        top = -1
        head = 0
        for b in range(n):
            if hi[b] > top:
                top, head = hi[b], b
        self._gen = top + 1
        if wg >= 0:
            # A format was cut short: the store is empty, and the next write finishes it.
            self._fix = 2
            self._wipe = wloc // bs
            loc = cyloc if cyg > wg else wloc
            if self._hdr(loc)[5] & 1:
                self._carry = self._payload(loc)
            return
        self._head = head
        self._app = apps[head]
        nx = (head + 1) % n
        rip = hi[nx] >= 0       # a reclaim was cut: its old block is still there
        if apps[nx] != 0:
            self._fix = 1
            self._nxv = rip
        # Damage a power cut cannot explain, over the blocks in ring order (oldest first),
        # leaving out those a torn erase may have hit: the block after the head, and the
        # head itself while a reclaim is unfinished.
        lost = rep = 0
        mst = -1                # the newest generation lost
        last = -1
        for k in range(1, n):
            b = (nx + k) % n
            if rip and b == head:
                continue
            rep += reps[b]
            if lo[b] < 0:
                continue
            lost += holes[b]
            g = hmax[b]
            if last >= 0:
                if lo[b] > last + 1:
                    lost += lo[b] - last - 1
                    if lo[b] - 1 > g:
                        g = lo[b] - 1
            elif pre[b]:
                lost += 1
                if lo[b] - 1 > g:
                    g = lo[b] - 1
            if b == head and tail[b]:
                lost += 1
                g = top + 1
            if g > mst:
                mst = g
            if hi[b] > last:
                last = hi[b]
        live = 0
        flags = 0
        span = -1
        if stloc >= 0:
            self._state = self._payload(stloc)
            self._st = stloc
            self._stsz = _size(len(self._state))
            self._count = stcount
            if sttag & records.STATE_V2:
                flags = sttag
                span = sttag & records.SPAN
                if span > stcount:
                    span = stcount
            self._lo = stcount - span if span >= 0 else max(0, stcount - self.keep)
            live = self._stsz
        faults = self.faults
        if mst > stg:
            faults[FAULT_STATE_LOST] = 1
        # Config: the newest copy, and whether the second newest is the same config.
        cfault = False
        if c1 >= 0:
            self._config = self._payload(c1)
            self._cfg = c1
            sz = _size(len(self._config))
            self._cfgsz = sz
            if c2 >= 0 and self._payload(c2) == self._config:
                self._cfg2 = c2
                self._cfgsz = 2 * sz
            else:
                self._cfix = True
                # One copy. A cut between the two copies leaves copy 0 last in its block,
                # and the generation of the torn copy 1 unused or reused by the next record
                # (at the start of the next block).
                bc = c1 // bs
                nb = (bc + 1) % n
                if self._hdr(c1)[4] != 0 or not (c1g == top or hi[bc] == c1g and (
                        lo[nb] == c1g + 1 or nb == nx or rip and nb == head)):
                    cfault = True
            for loc in (c1, self._cfg2):
                if loc in fixed:
                    self._cfix = True
                    if fixed[loc] == 1 and not (rip and loc // bs == head) and loc // bs != nx:
                        cfault = True
            live += self._cfgsz
            # The newest state was written after this config: it must name it.
            if flags & records.STATE_CFG and c1g < stg and records.csum(self._config) != (
                    flags >> records.CSUM_SHIFT) & records.CSUM:
                cfault = True
        elif flags & records.STATE_CFG:
            cfault = True
        if cfault:
            faults[FAULT_CONFIG] = 1
        if cyloc >= 0 and self._hdr(cyloc)[5] & 1:
            self._carry = self._payload(cyloc)
            self._cy = cyloc
            self._cysz = _size(len(self._carry))
            live += self._cysz
        elif flags & records.STATE_CARRY:
            lost += 1
        # Receipts: committed ones below the count; pending ones written after the state.
        cnt = self._count
        pend = self._pend
        for i in [i for i in rx if i >= cnt]:
            loc = rx.pop(i)
            h = self._hdr(loc)
            if h[3] > stg:
                pend[i] = loc
                live += _size(h[2])
        for i in rx:
            live += _size(self._hdr(rx[i])[2])
        if span >= 0:
            i = cnt - span
            if i < cnt - _CHECK_MAX:
                i = cnt - _CHECK_MAX
            miss = 0
            while i < cnt:
                if i not in rx:
                    miss += 1
                i += 1
            if miss:
                faults[FAULT_RECEIPT_LOST] = miss
        if rep:
            faults[FAULT_REPAIRED] = rep
        if lost:
            faults[FAULT_LOST] = lost
        self._rx = rx
        self._live = live

    # -- receipts kept in RAM --------------------------------------------------------------
    def _retained(self, i, loc):
        r = self.retain
        return r is not None and bool(r(i, self._hdr(loc)[5]))

    def _drop(self, i):
        loc = self._rx.pop(i)
        self._live -= _size(self._hdr(loc)[2])

    def _old(self):
        # Receipts below this index may go (unless retained): never one the newest state
        # on flash says is kept.
        old = self._count - self.keep
        return old if old < self._lo else self._lo

    def _prune(self):
        old = self._old()
        rx = self._rx
        for i in [i for i in rx if i < old and not self._retained(i, rx[i])]:
            self._drop(i)
        self._pruned = True

    def pending_receipts(self):
        """[(index, tag, receipt)] of the whole receipts from receipt_count on, in order,
        written after the newest state record: a commit whose state record is missing."""
        out = []
        i = self._count
        pend = self._pend
        while i in pend:
            loc = pend[i]
            data = self._payload(loc)
            if data is None:
                break
            out.append((i, self._hdr(loc)[5], data))
            i += 1
        return out

    # -- repair, room, reclaim -------------------------------------------------------------
    def _ready(self):
        if not self._mounted:
            self.mount()
        if self._fix == 2:
            self._finish_format(self._wipe, self._carry)
            return
        self._repair()
        if not self._pruned:
            self._prune()
        if self._cfix and self._config is not None:
            try:
                self._put_config(self._config)
            except StoreError:
                pass            # full: the next write tries again

    def _repair(self):
        guard = self._n + 2
        while self._fix == 1:
            guard -= 1
            if guard < 0:
                raise StoreError("partition unusable")
            nx = (self._head + 1) % self._n
            if not self._nxv:
                self._erase(nx)
                self._fix = 0
            elif self._app >= 0:
                self._prune()
                self._move_live(nx)
                self._erase(nx)
                self._fix = 0
            else:
                self._erase(self._head)
                faults = self.faults
                self.mount()
                self.faults = faults

    def _move_live(self, b):
        # Copy the live records held in block b to the head.
        bs = self._bs
        lo = b * bs
        hi = lo + bs
        # The state after the others, so a record lost among these copies is older than
        # the state in use; pending receipts after the state, so they stay pending.
        if lo <= self._cfg2 < hi:
            self._cfg2 = self._copy(self._cfg2)
        if lo <= self._cfg < hi:
            self._cfg = self._copy(self._cfg)
        if lo <= self._cy < hi:
            self._cy = self._copy(self._cy)
        rx = self._rx
        old = self._old()
        for i in [i for i in rx if lo <= rx[i] < hi]:
            if i < old and not self._retained(i, rx[i]):
                self._drop(i)
            else:
                rx[i] = self._copy(rx[i])
        if lo <= self._st < hi:
            self._st = self._copy(self._st)
        pend = self._pend
        for i in [i for i in pend if lo <= pend[i] < hi]:
            pend[i] = self._copy(pend[i])

    def _advance(self):
        n = self._n
        self._settle()
        s = (self._head + 1) % n
        o = (s + 1) % n
        self._head = s
        self._app = 0
        self._move_live(o)
        if not self._blank(o, 0):
            if self._app:
                self._erase(o)
            else:
                # Nothing was live in it: erase it once the new head holds a record, so
                # that a torn erase is always of the block right after the head.
                self._defer = o

    def _settle(self):
        o = self._defer
        if o >= 0:
            self._defer = -1
            self._erase(o)

    def _room(self, need):
        # Make room for `need` bytes in the head; the caller has checked capacity.
        guard = self._n
        while self._app < 0 or self._app + need > self._bs:
            guard -= 1
            if guard < 0:
                raise StoreError("flash full")
            self._advance()

    def _fit(self, need, biggest, grow):
        # need: bytes written together into one block; grow: live bytes added.
        if biggest > len(self._buf) or need > self._bs // 2:
            raise StoreError("record too large")
        cap = (self._n - 2) * (self._bs - need)
        if self._live + grow > cap:
            self._prune()
            if self._live + grow > cap:
                raise StoreError("flash full: %d live bytes" % self._live)

    # -- writes ----------------------------------------------------------------------------
    def _put_config(self, blob):
        size = _size(len(blob))
        self._fit(2 * size, size, 2 * size - self._cfgsz)
        a, b = self._write([(CONFIG, blob, 0, 0), (CONFIG, blob, 1, 0)])
        self._live += 2 * size - self._cfgsz
        self._config = bytes(blob)
        self._cfg = b
        self._cfg2 = a
        self._cfgsz = 2 * size
        self._cfix = False

    def write_config(self, blob):
        """Write the config blob (two copies)."""
        self._ready()
        self._put_config(blob)

    def commit(self, state, receipt=None, tag=0, first_index=None, adopt=0, config=None):
        """Write receipt (if any) as receipt number receipt_count, then the state record,
        the commit point. first_index: the receipt_count to start from when the store holds
        no state (after a format). adopt: take the first `adopt` pending receipts as
        committed in the same state record, before the new receipt. config: a new config
        blob written (two copies) between the receipt and the state, in the same block: a
        signed command's, whose first whole copy is its commit point (the ledger takes a
        receipt left pending behind it as committed: meter/recovery.py)."""
        if tag < 0 or tag > 0xFFFFFFFF:
            raise ValueError("tag")
        self._ready()
        cnt = self._count
        lo = self._lo
        if first_index is not None:
            if self._state is not None:
                raise ValueError("first_index: the store holds a state")
            if first_index < 0 or first_index > 0xFFFFFFFF:
                raise ValueError("first_index")
            cnt = lo = first_index
        if adopt:
            i = self._count
            while i in self._pend:
                i += 1
            if adopt < 0 or adopt > i - self._count:
                raise ValueError("adopt: not that many pending receipts")
            cnt += adopt
        rs = _size(len(receipt)) if receipt else 0
        ss = _size(len(state))
        cs = _size(len(config)) if config is not None else 0
        big = rs if rs > ss else ss
        if cs > big:
            big = cs
        self._fit(rs + 2 * cs + ss, big, rs + ss - self._stsz + (2 * cs - self._cfgsz if cs else 0))
        recs = []
        if receipt:
            recs.append((RECEIPT, receipt, cnt, tag))
            cnt += 1
        if cnt - self.keep > lo:
            lo = cnt - self.keep
        span = cnt - lo
        if span > records.SPAN:
            span = records.SPAN
        if config is not None:
            config = bytes(config)
            recs.append((CONFIG, config, 0, 0))
            recs.append((CONFIG, config, 1, 0))
            old_config = self._config
            self._config = config       # the state record names the new config
            try:
                flags = self._flags()
            finally:
                self._config = old_config
        else:
            flags = self._flags()
        recs.append((STATE, state, cnt, span | flags))
        locs = self._write(recs)
        if config is not None:
            self._live += 2 * cs - self._cfgsz
            self._config = config
            self._cfg = locs[-2]
            self._cfg2 = locs[-3]
            self._cfgsz = 2 * cs
            self._cfix = False
        # Committed: the state record is whole.
        self._live += ss - self._stsz
        self._state = bytes(state)
        self._st = locs[-1]
        self._stsz = ss
        self._lo = lo
        rx = self._rx
        pend = self._pend
        first = self._count if first_index is None else first_index
        for i in pend:
            if first <= i < first + adopt:
                rx[i] = pend[i]
            else:
                self._live -= _size(self._hdr(pend[i])[2])
        self._pend = {}
        self._count = cnt
        if receipt:
            rx[cnt - 1] = locs[0]
            self._live += rs
        old = self._old()
        for j in range(old - adopt - 1, old):
            if j in rx and not self._retained(j, rx[j]):
                self._drop(j)

    def format(self, carry=None):
        """Wipe everything; keep `carry` (bytes, under 200, or None) as `store.carry`."""
        if carry is not None:
            carry = bytes(carry)
            if len(carry) >= _CARRY_MAX:
                raise ValueError("carry too large")
        if not self._mounted:
            self.mount()
        if self._fix == 1:
            try:
                self._repair()      # erase the spare, so the wipe record has a place
            except StoreError:
                pass
        if self._fix == 2:
            mark = self._wipe
        else:
            # A wipe record (newest generation) first: a cut from here on mounts empty.
            mark = -1
            w = b"" if carry is None else carry
            nx = (self._head + 1) % self._n
            if not self._fix and self._blank(nx, 0):
                mark = self._head = nx      # alone in its block
                self._app = 0
            elif self._app >= 0 and self._app + _size(len(w)) <= self._bs:
                mark = self._head
            if mark >= 0:
                try:
                    self._append(WIPE, w, 0, 0 if carry is None else 1)
                except _Bad:
                    mark = -1
        self._finish_format(mark, carry)

    def _finish_format(self, mark, carry):
        n = self._n
        for b in range(n):
            if b != mark and not self._blank(b, 0):
                self._erase(b)
        gen = self._gen
        c = loc = -1
        if carry is not None:
            # The carry goes into an erased block before the wipe record is erased.
            c = (mark + 1) % n if mark >= 0 else 0
            self._head = c
            self._app = 0
            try:
                loc = self._append(CARRY, carry, 0, 1)
            except _Bad:
                self._mounted = False
                raise StoreError("flash does not program")
            gen = self._gen
        if mark >= 0:
            self._erase(mark)
        self._clear()
        self._mounted = True
        if c >= 0:
            self._head = c
            self._gen = gen
            self._carry = carry
            self._cy = loc
            self._cysz = self._app = self._live = _size(len(carry))

    # -- reads -----------------------------------------------------------------------------
    def receipt(self, index):
        loc = self._rx.get(index)
        return None if loc is None else self._payload(loc)

    def find_receipt(self, tag):
        if not tag:
            return None
        best = -1
        rx = self._rx
        for i in rx:
            if i > best and self._hdr(rx[i])[5] == tag:
                best = i
        return None if best < 0 else self._payload(rx[best])
