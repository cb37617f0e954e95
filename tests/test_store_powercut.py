"""meter.store under random power cuts (CPython, Hypothesis).

Each example is a seeded random workload of thousands of operations on a random geometry:
commits with and without receipts, config writes, remounts, the odd format, and a "ledger"
that holds some receipts (retain) and later lets them go. Before an operation, power is
now and then set to fail at its n-th flash operation (a torn page program or a torn block
erase, whichever comes). After every cut a new Store is mounted on the same flash and
checked against a model: exactly the old or the new contents, every receipt the ledger
needs intact, find_receipt consistent, no fault reported (a power cut is not one), and
the workload goes on from there.
`make soak` (TOPUP_SOAK) multiplies the example counts.
"""
import random

from hypothesis import HealthCheck, given, settings, strategies as st

import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)
from boards.nor import NorFlash, PowerCut
from meter.store import Store, StoreError
from tests.soak import examples

GEOMETRIES = [(3, 1024, 256), (4, 512, 64), (5, 512, 128), (8, 512, 64), (4, 1024, 256), (6, 4096, 256)]


def _blob(kind, n, size):
    head = b"%d:%d:" % (kind, n)                   # unique per (kind, n): maps content back
    return head + bytes((n * 29 + i * 11 + kind) & 0xFF for i in range(size - len(head)))


class Model:
    def __init__(self):
        self.state = None
        self.config = None
        self.count = 0
        self.receipts = {}
        self.tags = {}
        self.where = {}              # op number in the receipt's content -> receipt index

    def copy(self):
        m = Model()
        m.state, m.config, m.count = self.state, self.config, self.count
        m.receipts, m.tags, m.where = dict(self.receipts), dict(self.tags), dict(self.where)
        return m

    def key(self):
        return (self.state, self.config, self.count)


class Run:
    def __init__(self, seed):
        self.rng = rng = random.Random(seed)
        blocks, bsize, page = rng.choice(GEOMETRIES)
        self.flash = NorFlash(blocks=blocks, block_size=bsize, page_size=page, seed=rng.randrange(1 << 16))
        self.keep = rng.randint(1, 8)
        self.model = Model()
        self.held = set()            # receipts the "ledger" needs kept beyond the newest `keep`
        self.n = 0
        self.cuts = self.refusals = 0
        self.store = self.mount()

    def retain(self, i, tag):
        return i in self.held

    def mount(self):
        s = Store(self.flash, keep_receipts=self.keep)
        s.retain = self.retain
        s.mount()
        assert s.faults == {}, s.faults          # a power cut is never a fault
        return s

    def required(self, m):
        return set(i for i in range(max(0, m.count - self.keep), m.count)) | set(i for i in self.held if i < m.count)

    def check(self, s, m, full=False):
        assert (s.state, s.config, s.receipt_count) == m.key()
        for i in self.required(m):
            assert s.receipt(i) == m.receipts[i], "needed receipt %d lost" % i
        others = range(m.count) if full else [self.rng.randrange(m.count)] if m.count else []
        for i in others:
            got = s.receipt(i)
            assert got is None or got == m.receipts[i], "receipt %d wrong" % i
        assert s.receipt(m.count) is None
        tag = self.rng.randint(0, 12)
        got = s.find_receipt(tag)
        if tag == 0:
            assert got is None
            return
        need = [i for i in self.required(m) if m.tags[i] == tag]
        if got is None:
            assert not need, "find_receipt(%d) missed a needed receipt" % tag
        else:
            i = m.where.get(int(got.split(b":")[1]))
            assert i is not None and m.receipts[i] == got and m.tags[i] == tag and i < m.count
            assert not need or i >= max(need)

    def op(self):
        rng = self.rng
        r = rng.random()
        self.n += 1
        n = self.n
        if r < 0.45:
            receipt = _blob(2, n, rng.randint(20, 120))
            return ("commit", (_blob(1, n, rng.randint(10, 60)), receipt, rng.randint(0, 12)))
        if r < 0.85:
            return ("commit", (_blob(1, n, rng.randint(10, 60)), None, 0))
        if r < 0.90:
            # Two copies go into one block: at most a quarter of one each.
            return ("config", _blob(3, n, rng.randint(50, min(200, self.flash.block_size // 4 - 24))))
        if r < 0.96:
            return ("remount", None)
        if r < 0.99:
            return ("release", None)
        return ("format", None)

    def expect(self, op):
        kind, arg = op
        m = self.model.copy()
        if kind == "commit":
            state, receipt, tag = arg
            if receipt:
                m.receipts[m.count] = receipt
                m.tags[m.count] = tag
                m.where[int(receipt.split(b":")[1])] = m.count
                m.count += 1
            m.state = state
        elif kind == "config":
            m.config = arg
        elif kind == "format":
            m = Model()
        return m

    def step(self):
        rng = self.rng
        op = self.op()
        kind, arg = op
        if kind == "remount":
            self.store = self.mount()
            self.check(self.store, self.model, full=True)
            return
        if kind == "release":
            self.held.clear()
            return
        new = self.expect(op)
        f = self.flash
        armed = rng.random() < 0.2
        if armed:
            f.cut_after(rng.randrange(0, 3) if rng.random() < 0.7 else rng.randrange(0, 16))
        try:
            if kind == "commit":
                self.store.commit(*arg)
            elif kind == "config":
                self.store.write_config(arg)
            else:
                self.store.format()
                self.held.clear()
        except PowerCut:
            f.cut_after(None)
            self.cuts += 1
            self.store = s = self.mount()
            if (s.state, s.config, s.receipt_count) == self.model.key():
                self.check(s, self.model, full=True)
            else:
                self.check(s, new, full=True)
                self.model = new
                self._hold(op)
            return
        except StoreError:
            f.cut_after(None)
            self.refusals += 1
            self.check(self.store, self.model)       # refused: nothing changed
            self.held.clear()                        # the ledger uploads and lets go
            return
        f.cut_after(None)
        self.model = new
        self._hold(op)
        self.check(self.store, new)

    def _hold(self, op):
        kind, arg = op
        if kind == "commit" and arg[1] and len(self.held) < 4 and self.rng.random() < 0.1:
            self.held.add(self.model.count - 1)


def _run(seed, steps):
    run = Run(seed)
    torn = []
    flash = run.flash
    real_erase, real_write = flash.erase, flash.writeblocks

    def erase(b):
        try:
            real_erase(b)
        except PowerCut:
            torn.append("erase")
            raise

    def writeblocks(b, buf, off=0):
        try:
            real_write(b, buf, off)
        except PowerCut:
            torn.append("program")
            raise

    flash.erase = erase
    flash.writeblocks = writeblocks
    for _ in range(steps):
        run.step()
    run.store = run.mount()
    run.check(run.store, run.model, full=True)
    return run, torn


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_random_workload_with_random_power_cuts(seed):
    run, torn = _run(seed, 1500)
    assert run.cuts >= 20, run.cuts


def test_cuts_hit_both_programs_and_erases():
    erases = programs = 0
    for seed in range(6):
        run, torn = _run(seed, 3000)
        erases += torn.count("erase")
        programs += torn.count("program")
    assert erases >= 10 and programs >= 100, (erases, programs)


@settings(max_examples=examples(200), deadline=None)
@given(st.sampled_from(GEOMETRIES[:3]), st.binary(min_size=64, max_size=64), st.integers(0, 255))
def test_any_flash_image_mounts_and_then_works(geometry, pattern, seed):
    blocks, bsize, page = geometry
    image = bytearray((pattern * (blocks * bsize // 64 + 1))[:blocks * bsize])
    rng = random.Random(seed)
    for _ in range(rng.randint(0, 40)):             # sprinkle plausible record headers
        at = rng.randrange(0, len(image) - 4) & ~3
        image[at] = 0xA7
        image[at + 1] = rng.randint(1, 4)
    flash = NorFlash(block_size=bsize, page_size=page, data=image)
    s = Store(flash, keep_receipts=3)
    s.mount()                                       # never raises
    for n in range(30):
        s.commit(b"state %d" % n, b"receipt %d" % n if n % 2 else None, n)
    t = Store(flash, keep_receipts=3)
    t.mount()
    assert t.state == b"state 29"
    assert t.receipt(t.receipt_count - 1) == b"receipt 29"


@settings(max_examples=examples(100), deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 10**6), min_size=1, max_size=8))
def test_bit_rot_never_crashes_mount(seed, flips):
    run, torn = _run(seed, 200)
    data = run.flash.data
    for x in flips:
        data[x % len(data)] ^= 1 << (x % 8)
    s = Store(run.flash, keep_receipts=run.keep)
    s.mount()
    s.commit(b"after rot", b"r", 1)
    t = Store(run.flash, keep_receipts=run.keep)
    t.mount()
    assert t.state == b"after rot"
