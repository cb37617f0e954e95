"""A NOR-faithful fake flash partition for tests (and the virtual board's backing store).

It speaks the MicroPython block-device protocol (`readblocks`, `writeblocks`, `ioctl`, as
`esp32.Partition` and `rp2.Flash` do) with the semantics of real NOR flash:

- erase (`ioctl(6, block)`) sets a whole block to 0xFF; it is one "erase" operation;
- `writeblocks` only programs: every byte becomes old AND new, so bits can be cleared but
  never set; it never erases. A write may span pages and blocks; every page it touches is
  one "program" operation, done in ascending address order;
- power can be cut at any operation: `cut_after(n)` lets n more operations complete and
  tears the one after (n = 0 tears the very next), which raises `PowerCut` and leaves the
  torn state in `data`:
  - a torn program has a prefix of that page's bytes programmed, the byte at the tear point
    only partly programmed (a random subset of the bits it was clearing), the rest untouched;
  - a torn erase leaves every byte of the block at old OR (random bits): anywhere between
    its old contents and 0xFF (sometimes exactly the old contents, sometimes all 0xFF).
  The randomness comes from a small generator keyed by (seed, operation number), so a
  given seed tears the same operation the same way every time, on CPython and MicroPython.

Faults other than power cuts, for the store's fault tests:

- bits flipped at rest (retention loss, disturb): `flip(offset, bit)`, not an operation;
- bad programs, as littlefs's emulated block device has them: `bad_program(n, mode)` makes
  the program operation after the next n misbehave, once, while reporting success:
  PROG_NOOP leaves the page as it was, PROG_FLIP programs it but leaves one of the bits it
  should clear set.

Counters: `erases`, `programs` (pages), `ops` (both). `data` is the whole partition as a
bytearray; pass your own (for example one mapped from a file) with `data=`, in which case
the block count is `len(data) // block_size`.
"""


PROG_NOOP = 1
PROG_FLIP = 2


class PowerCut(Exception):
    """Power was cut during a flash operation; the flash keeps the torn state."""


class NorFlash:
    def __init__(self, blocks=16, block_size=4096, page_size=256, seed=0, data=None):
        if block_size % page_size:
            raise ValueError("block size must be a multiple of the page size")
        if data is None:
            data = bytearray(b"\xff" * (blocks * block_size))
        else:
            if len(data) % block_size:
                raise ValueError("data is not a whole number of blocks")
            blocks = len(data) // block_size
        self.data = data
        self.blocks = blocks
        self.block_size = block_size
        self.page_size = page_size
        self.seed = seed
        self.erases = 0
        self.programs = 0
        self.ops = 0
        self._cut = None
        self._bad = None            # (programs to let through, mode)
        self._mv = memoryview(data)
        self._ff = b"\xff" * block_size
        self._x = 1

    # -- power-cut injection ---------------------------------------------------------------
    def cut_after(self, n):
        """Let n more erase/program operations complete, tear the next one (None disarms)."""
        self._cut = n

    def _tick(self):
        # Count one operation; True if this one is to be torn.
        self.ops += 1
        c = self._cut
        if c is None:
            return False
        if c == 0:
            self._cut = None
            # Key the generator by (seed, op number): deterministic per seed.
            self._x = (self.seed * 7919 + self.ops * 104729 + 1) % 65537 or 1
            return True
        self._cut = c - 1
        return False

    # -- faults other than power cuts ------------------------------------------------------
    def flip(self, offset, bit=0):
        """Flip one bit of the partition at rest (not a flash operation)."""
        self.data[offset] ^= 1 << bit

    def bad_program(self, n, mode=PROG_NOOP):
        """Let n more page programs work, then make the next one misbehave (mode PROG_NOOP
        or PROG_FLIP) while reporting success; None disarms."""
        self._bad = None if n is None else (n, mode)

    @property
    def bad_armed(self):
        """True while a bad_program() has not happened yet."""
        return self._bad is not None

    def _bad_tick(self):
        # The mode of this program if it is to misbehave, else 0.
        b = self._bad
        if b is None:
            return 0
        if b[0] > 0:
            self._bad = (b[0] - 1, b[1])
            return 0
        self._bad = None
        return b[1]

    def _rand(self):
        # ZX81-style LCG (period 65536): small integers only, same on every VM.
        self._x = (75 * (self._x + 1)) % 65537 - 1
        return self._x

    # -- block-device protocol -------------------------------------------------------------
    def _span(self, block, offset, n):
        a = block * self.block_size + offset
        if block < 0 or offset < 0 or a + n > len(self.data):
            raise OSError(22)  # EINVAL
        return a

    def readblocks(self, block, buf, offset=0):
        n = len(buf)
        a = self._span(block, offset, n)
        buf[:] = self._mv[a:a + n]

    def writeblocks(self, block, buf, offset=0):
        n = len(buf)
        a = self._span(block, offset, n)
        d = self.data
        ps = self.page_size
        i = 0
        while i < n:
            c = ps - (a + i) % ps
            if c > n - i:
                c = n - i
            torn = self._tick()
            self.programs += 1
            base = a + i
            bad = self._bad_tick()
            if bad == PROG_NOOP and not torn:
                i += c
                continue
            if bad == PROG_FLIP and not torn:
                # Program the page, but one bit it should clear stays set.
                start = self._rand() % c
                at = bit = 0
                for j in range(c):
                    at = base + (start + j) % c
                    clear = d[at] & ~buf[at - a] & 0xFF
                    if clear:
                        bit = clear & -clear
                        break
                for j in range(c):
                    d[base + j] &= buf[i + j]
                d[at] |= bit
                i += c
                continue
            if torn:
                k = self._rand() % (c + 1)   # bytes fully programmed
            else:
                k = c
            for j in range(k):
                d[base + j] &= buf[i + j]
            if torn:
                if k < c:
                    old = d[base + k]
                    clear = old & ~buf[i + k] & self._rand()
                    d[base + k] = old & ~clear & 0xFF
                raise PowerCut("program torn at 0x%x+%d" % (base, k))
            i += c

    def erase(self, block):
        a = self._span(block, 0, self.block_size)
        d = self.data
        torn = self._tick()
        self.erases += 1
        if not torn:
            self._mv[a:a + self.block_size] = self._ff
            return
        mode = self._rand() & 3
        for j in range(a, a + self.block_size):
            if mode == 0:
                break               # nothing changed yet
            elif mode == 1:
                d[j] = 0xFF         # erased, but the cut came before it was reported
            else:
                r = self._rand() & 0xFF
                if mode == 3:
                    r &= self._rand() & 0xFF
                d[j] |= r
        raise PowerCut("erase torn in block %d" % block)

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.block_size
        if op == 6:
            self.erase(arg)
            return 0
        if op in (1, 2, 3):
            return 0
        return None
