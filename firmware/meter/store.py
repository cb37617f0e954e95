"""Power-safe record store on a raw flash partition (MicroPython block-device protocol).

Holds the meter's config blob (provisioning), its state blob (the ledger's CBOR) and a ring
of receipts, so that a power cut at any instant leaves either the old or the new state
whole, with every committed receipt readable.

On-flash format
---------------
The partition (N >= 3 blocks of B bytes) is a log of records. A record is a 20-byte header
and a payload, padded to a multiple of 4 bytes (padding stays 0xFF), never across a block::

    0  u8   magic 0xA7
    1  u8   type: 1 config, 2 state, 3 receipt, 4 wipe (format in progress)
    2  u16  payload length
    4  u32  generation: +1 for every record written, so the newest copy wins
    8  u32  receipt: its index; state: receipt_count (committed receipts); else 0
    12 u32  tag (receipts: e.g. the voucher sequence; else 0)
    16 u32  CRC-32 of bytes 0..15 and the payload
    (all little-endian)

Records are appended into the head block, into erased (0xFF) flash only, so programming
is safe on NOR (bits are only cleared); each is written in address order, one call per
256-byte page (no call crosses a page boundary). A block reads as: valid records, then either all
0xFF to its end (room to append) or the remains of one torn record (the block is then
closed: nothing more is appended to it).

Commit
------
`commit(state, receipt, tag)` makes room for both records in the head block first, writes
the receipt (index = receipt_count), then the state record carrying receipt_count + 1: the
state record is the commit point. A receipt whose state record never landed is an orphan:
mount ignores receipts with index >= the committed count, and a later commit writes a new
record with the same index and a higher generation, which wins.

Mount
-----
Reads every record and checks its CRC; a torn or corrupt record ends its block's scan.
The state and config are the valid records of highest generation; receipt i is the valid
record of highest generation with index i, for i < the committed receipt count. The head
is the block holding the highest generation. Mount itself never writes.

Ring, wear and reclaim
----------------------
Blocks are used in ring order; the block after the head (the "spare") is always erased.
When the head has no room, the spare becomes the head and the block after it (the oldest)
is reclaimed: whatever in it is still live -- config, latest state, the newest
`keep_receipts` receipts and those `retain(index, tag)` asks to keep -- is copied forward
into the new head with new generations, then the oldest block is erased and becomes the
spare. Every block is erased once per trip round the ring, so wear is even. A cut during a
reclaim is repaired by the first write after the next mount:

- the block after the head holds no valid record (torn erase, or a torn first copy): it
  is erased;
- it holds valid records and the head is clean (copies done, or a clean cut between
  copies): the rest of its live records are copied forward, then it is erased;
- it holds valid records and the head is closed by a torn copy: the head holds nothing
  but copies of records still whole in the old block, so the head is erased, the
  partition rescanned and the reclaim redone later.

Before anything is written, `commit` and `write_config` check that live data plus the new
records fit with room to spare ((N - 2) * (B - need) bytes); if not, `StoreError` is raised
and nothing has changed. `format()` writes a wipe record first, erases every other block,
then the wipe record's block: a cut mid-format mounts as empty and the next write finishes
the format.

RAM: two buffers made once (B / 2 and 64 bytes), the cached state and config blobs, and a
dict receipt index -> flash address, bounded by keep_receipts + retained receipts (after
a mount it holds every committed receipt found on flash until the first write prunes it,
since `retain` may need the ledger's state, which the ledger reads after mount).
"""
import binascii
import struct

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):
        return x

_MAGIC = const(0xA7)
_CONFIG = const(1)
_STATE = const(2)
_RECEIPT = const(3)
_WIPE = const(4)
_HDR = const(20)
_CHK = const(64)
_PAGE = const(256)
_FMT = "<BBHIII"        # header bytes 0..15; the CRC follows at 16
_FF = b"\xff" * 64


class StoreError(Exception):
    """Flash full or unusable: the operation is refused and nothing has changed."""


def _size(n):
    return (_HDR + n + 3) & ~3


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
        self._config = None
        self._cfg = -1          # flash address of the latest config record, or -1
        self._cfgsz = 0
        self._state = None
        self._st = -1
        self._stsz = 0
        self._count = 0
        self._rx = {}           # receipt index -> flash address
        self._live = 0          # bytes of live records (config + state + receipts)
        self._gen = 0           # generation of the next record
        self._head = 0
        self._app = 0           # append offset in the head block; -1 if it is closed
        self._fix = 0           # pending repair: 1 spare not erased, 2 format unfinished
        self._nxv = False       # the block after the head holds valid records
        self._wipe = -1         # block of the wipe record
        self._pruned = True

    # -- public state ----------------------------------------------------------------------
    @property
    def config(self):
        return self._config

    @property
    def state(self):
        return self._state

    @property
    def receipt_count(self):
        return self._count

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
        # Read the record at (b, pos) into the buffer. None: erased header; False: not a
        # valid record; else (type, length, gen, index, tag, size).
        mv = self._mv
        cb = self._cb
        self._bd.readblocks(b, self._cmv[0:_HDR], pos)
        if cb[0] == 0xFF:       # a record starts with the magic, never 0xFF
            for j in range(1, _HDR):
                if cb[j] != 0xFF:
                    return False
            return None
        magic, typ, ln, gen, idx, tag = struct.unpack_from(_FMT, cb, 0)
        size = _size(ln)
        if magic != _MAGIC or typ < _CONFIG or typ > _WIPE or size > len(mv) or pos + size > self._bs:
            return False
        mv[0:_HDR] = self._cmv[0:_HDR]
        if ln:
            self._bd.readblocks(b, mv[_HDR:_HDR + ln], pos + _HDR)
        crc = binascii.crc32(mv[_HDR:_HDR + ln], binascii.crc32(mv[0:16]))
        if crc != struct.unpack_from("<I", cb, 16)[0]:
            return False
        return typ, ln, gen, idx, tag, size

    def _payload(self, loc):
        bs = self._bs
        r = self._rec(loc // bs, loc % bs)
        if not r:
            return None
        return bytes(self._mv[_HDR:_HDR + r[1]])

    def _put(self, size):
        # Write buffer[0:size] (a finished record) at the head; return its address.
        bs = self._bs
        if self._app < 0 or self._app + size > bs:
            raise StoreError("no room in the head block")
        off = self._app
        loc = self._head * bs + off
        # One call per 256-byte page, in address order: no write crosses a page boundary
        # (a board whose flash programs whole pages can pad each call with 0xFF).
        i = 0
        while i < size:
            c = _PAGE - (off + i) % _PAGE
            if c > size - i:
                c = size - i
            self._programs += 1
            self._bd.writeblocks(self._head, self._mv[i:i + c], off + i)
            i += c
        self._app = off + size
        self._gen += 1
        return loc

    def _seal(self, ln, size):
        # Stamp the generation and CRC into the record in the buffer; pad with 0xFF.
        buf = self._buf
        mv = self._mv
        struct.pack_into("<I", buf, 4, self._gen)
        for j in range(_HDR + ln, size):
            buf[j] = 0xFF
        struct.pack_into("<I", buf, 16, binascii.crc32(mv[_HDR:_HDR + ln], binascii.crc32(mv[0:16])))

    def _append(self, typ, payload, idx, tag):
        ln = len(payload)
        size = _size(ln)
        struct.pack_into(_FMT, self._buf, 0, _MAGIC, typ, ln, 0, idx, tag)
        self._mv[_HDR:_HDR + ln] = payload
        self._seal(ln, size)
        return self._put(size)

    def _copy(self, loc):
        bs = self._bs
        r = self._rec(loc // bs, loc % bs)
        if not r:
            raise StoreError("live record unreadable")
        self._seal(r[1], r[5])
        return self._put(r[5])

    # -- mount -----------------------------------------------------------------------------
    def mount(self):
        self._clear()
        n = self._n
        bs = self._bs
        gens = [-1] * n
        apps = [0] * n
        stg = cfg = -1
        stloc = cfloc = -1
        stcount = 0
        rx = {}
        for b in range(n):
            pos = 0
            app = -1
            while pos + _HDR <= bs:
                r = self._rec(b, pos)
                if r is None:
                    if self._blank(b, pos):
                        app = pos
                    break
                if r is False:
                    break
                typ, ln, gen, idx, tag, size = r
                loc = b * bs + pos
                if gen > gens[b]:
                    gens[b] = gen
                if typ == _STATE:
                    if gen > stg:
                        stg, stloc, stcount = gen, loc, idx
                elif typ == _CONFIG:
                    if gen > cfg:
                        cfg, cfloc = gen, loc
                elif typ == _RECEIPT:
                    old = rx.get(idx)
                    if old is None or self._hdr(old)[3] < gen:
                        rx[idx] = loc
                else:
                    self._wipe = b
                pos += size
            else:
                app = pos
            apps[b] = app
        self._mounted = True
        self._pruned = False
        if self._wipe >= 0:
            self._fix = 2           # a format was cut short: the store is empty
            return
        head = 0
        top = -1
        for b in range(n):
            if gens[b] > top:
                top, head = gens[b], b
        self._gen = top + 1
        self._head = head
        self._app = apps[head]
        nx = (head + 1) % n
        if apps[nx] != 0:
            self._fix = 1
            self._nxv = gens[nx] >= 0
        if stloc >= 0:
            self._state = self._payload(stloc)
            self._st = stloc
            self._stsz = _size(len(self._state))
            self._count = stcount
        if cfloc >= 0:
            self._config = self._payload(cfloc)
            self._cfg = cfloc
            self._cfgsz = _size(len(self._config))
        live = self._stsz + self._cfgsz
        for i in [i for i in rx if i >= stcount]:
            del rx[i]
        for i in rx:
            live += _size(self._hdr(rx[i])[2])
        self._rx = rx
        self._live = live

    # -- receipts kept in RAM --------------------------------------------------------------
    def _retained(self, i, loc):
        r = self.retain
        return r is not None and bool(r(i, self._hdr(loc)[5]))

    def _drop(self, i):
        loc = self._rx.pop(i)
        self._live -= _size(self._hdr(loc)[2])

    def _prune(self):
        old = self._count - self.keep
        rx = self._rx
        for i in [i for i in rx if i < old and not self._retained(i, rx[i])]:
            self._drop(i)
        self._pruned = True

    # -- repair, room, reclaim -------------------------------------------------------------
    def _ready(self):
        if not self._mounted:
            self.mount()
        if self._fix == 2:
            self._finish_format(self._wipe)
            return
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
                self.mount()
        if not self._pruned:
            self._prune()

    def _move_live(self, b):
        # Copy the live records held in block b to the head.
        bs = self._bs
        lo = b * bs
        hi = lo + bs
        if lo <= self._cfg < hi:
            self._cfg = self._copy(self._cfg)
        if lo <= self._st < hi:
            self._st = self._copy(self._st)
        rx = self._rx
        old = self._count - self.keep
        for i in [i for i in rx if lo <= rx[i] < hi]:
            if i < old and not self._retained(i, rx[i]):
                self._drop(i)
            else:
                rx[i] = self._copy(rx[i])

    def _advance(self):
        n = self._n
        s = (self._head + 1) % n
        o = (s + 1) % n
        self._head = s
        self._app = 0
        self._move_live(o)
        if not self._blank(o, 0):
            self._erase(o)

    def _room(self, need):
        # Make room for `need` bytes in the head; the caller has checked capacity.
        guard = self._n
        while self._app < 0 or self._app + need > self._bs:
            guard -= 1
            if guard < 0:
                raise StoreError("flash full")
            self._advance()

    def _fit(self, need, biggest):
        if biggest > len(self._buf) or need > self._bs // 2:
            raise StoreError("record too large")
        cap = (self._n - 2) * (self._bs - need)
        if self._live + need > cap:
            self._prune()
            if self._live + need > cap:
                raise StoreError("flash full: %d live bytes" % self._live)

    # -- writes ----------------------------------------------------------------------------
    def write_config(self, blob):
        self._ready()
        size = _size(len(blob))
        self._fit(size, size)
        self._room(size)
        loc = self._append(_CONFIG, blob, 0, 0)
        self._live += size - self._cfgsz
        self._config = bytes(blob)
        self._cfg = loc
        self._cfgsz = size

    def commit(self, state, receipt=None, tag=0):
        if tag < 0 or tag > 0xFFFFFFFF:
            raise ValueError("tag")
        self._ready()
        rs = _size(len(receipt)) if receipt else 0
        ss = _size(len(state))
        self._fit(rs + ss, rs if rs > ss else ss)
        self._room(rs + ss)
        cnt = self._count
        if receipt:
            rloc = self._append(_RECEIPT, receipt, cnt, tag)
            cnt += 1
        sloc = self._append(_STATE, state, cnt, 0)
        # Committed: the state record is whole.
        self._live += ss - self._stsz
        self._state = bytes(state)
        self._st = sloc
        self._stsz = ss
        if receipt:
            rx = self._rx
            rx[cnt - 1] = rloc
            self._live += rs
            self._count = cnt
            j = cnt - 1 - self.keep
            if j >= 0 and j in rx and not self._retained(j, rx[j]):
                self._drop(j)

    def format(self):
        if not self._mounted:
            self.mount()
        if self._fix == 1:
            try:
                self._ready()       # erase the spare, so the wipe record has a place
            except StoreError:
                pass
        if self._fix == 2:
            mark = self._wipe
        else:
            # A wipe record (newest generation) first: a cut from here on mounts empty.
            mark = -1
            if self._app >= 0 and self._app + _HDR <= self._bs:
                mark = self._head
            elif not self._fix:
                mark = self._head = (self._head + 1) % self._n  # the spare is erased
                self._app = 0
            if mark >= 0:
                self._append(_WIPE, b"", 0, 0)
        self._finish_format(mark)

    def _finish_format(self, mark):
        for b in range(self._n):
            if b != mark and not self._blank(b, 0):
                self._erase(b)
        if mark >= 0:
            self._erase(mark)
        self._clear()
        self._mounted = True

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
