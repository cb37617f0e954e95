"""meter.store against flash damage that is not a power cut (CPython).

- Every bit of every record of small images flipped in turn (the dual-VM module
  tests/firmware/test_store_faults.py runs a subset of the same flips, also inside
  MicroPython): each mount holds exactly the committed contents and reports the repair.
- Random multi-bit damage (Hypothesis) on the image left by a random workload, checked
  against the history of what was committed, never against the store's internals: mount
  never raises; the store never returns bytes that were never committed; what it returns
  is the committed contents, or a fault code says what was lost; the one thing it may
  take silently is damage to the records written last, as a power cut in their write
  would have left them (those records are then as if never written); and it takes new
  commits after the damage.
`make soak` (TOPUP_SOAK) multiplies the example counts.
"""
import random

from hypothesis import HealthCheck, given, settings, strategies as st

import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)
from boards.nor import NorFlash
from meter.store import (FAULT_CONFIG, FAULT_LOST, FAULT_RECEIPT_LOST, FAULT_REPAIRED,
                         FAULT_STATE_LOST, Store, StoreError)
from tests.firmware import test_store_faults as F
from tests.firmware.test_store import Model, _config, _receipt, _retain, _state
from tests.soak import examples

KEEP = F.KEEP


def test_flip_every_bit_of_every_record():
    data, model = F.image()
    assert F.flip_every_bit(data, model, follow_every=97) > 10000


def test_flip_every_bit_with_the_config_written_last():
    # A receipt with every commit, and the config rewritten at the end: the newest
    # records are the two config copies (copy 1 last of all).
    data, model = F.build(commits=40, every=1, config_last=True)
    recs = F.parse(data)
    assert max(recs, key=lambda r: r[3])[1] == 1
    assert F.flip_every_bit(data, model, stride=2, phase=1, follow_every=97) > 5000


# -- random multi-bit damage ------------------------------------------------------------------

GEOMETRIES = [(5, 512, 64), (4, 1024, 256), (6, 512, 128)]


def _history(rng):
    """A workload: a format with a carry, a first receipt index, a config, then commits
    (with and without receipts, some tagged 7 and so retained) and now and then a new
    config. Returns the flash, the models after each op and the bytes each op programmed."""
    blocks, bsize, page = rng.choice(GEOMETRIES)
    f = NorFlash(blocks=blocks, block_size=bsize, page_size=page)
    s = Store(f, keep_receipts=KEEP)
    s.retain = _retain
    s.mount()
    models = [Model()]
    writes = [set()]
    receipts = {}
    first = rng.randint(0, 50)
    n = 0
    steps = rng.randint(3, 120)
    while len(models) <= steps:
        before = bytes(f.data)
        m = models[-1].copy()
        if len(models) == 1:
            s.format(b"carry %d" % first)
            m = Model(b"carry %d" % first)
        elif len(models) == 2:
            s.commit(_state(0), None, 0, first_index=first)
            m.count = first
            m.commit(_state(0))
        elif len(models) == 3 or rng.random() < 0.04:
            n += 1
            try:
                s.write_config(_config(n))
            except StoreError:
                continue
            m.config = _config(n)
        else:
            n += 1
            r = _receipt(n) if rng.random() < 0.5 else None
            tag = 7 if rng.random() < 0.05 else n
            try:
                s.commit(_state(n), r, tag)
            except StoreError:
                continue
            if r:
                receipts[m.count] = r
            m.commit(_state(n), r, tag)
        after = f.data
        writes.append(set(j for j in range(len(after)) if after[j] != before[j] and after[j] != 0xFF))
        models.append(m)
    return f, models, writes, receipts


def _spans(data, bsize):
    return [(r[0], r[0] + 20 + r[2]) for r in F.parse(data, bsize)]


def _damage(rng, f, kind, k):
    """Damage the image; returns the byte offsets changed."""
    data = f.data
    spans = _spans(bytes(data), f.block_size)
    hit = set()
    if kind == 0 or not spans:                          # bits anywhere
        for _ in range(k):
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
            hit.add(at)
    elif kind in (1, 2):                                # bits in one or two records
        i = rng.randrange(len(spans))
        lo, hi = spans[i][0], spans[min(len(spans) - 1, i + kind - 1)][1]
        for _ in range(k + 1):
            at = rng.randrange(lo, hi)
            data[at] ^= 1 << rng.randrange(8)
            hit.add(at)
    else:                                               # a run of bytes overwritten
        lo, hi = spans[rng.randrange(len(spans))]
        a = rng.randrange(lo, hi)
        for at in range(a, min(hi, a + k * 3)):
            data[at] = rng.randrange(256) if kind == 3 else 0
            hit.add(at)
    return set(at for at in hit if data[at] != f.orig[at])


def _mount(f):
    s = Store(f, keep_receipts=KEEP)
    s.retain = _retain
    s.mount()                                           # never raises
    return s


def _era(models, s):
    """The newest op after which the store's contents were committed: its state and count,
    and if they match too its config and carry; -1 if no op's state matches."""
    found = -1
    for j in range(len(models) - 1, -1, -1):
        m = models[j]
        if (m.state, m.count) == (s.state, s.receipt_count):
            if (m.config, m.carry) == (s.config, s.carry):
                return j
            if found < 0:
                found = j
    return found


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(0, 4), st.integers(1, 10))
def test_random_damage_is_repaired_or_reported(seed, kind, k):
    rng = random.Random(seed)
    f, models, writes, receipts = _history(rng)
    f.orig = bytes(f.data)
    hit = _damage(rng, f, kind, k)
    s = _mount(f)
    faults = s.faults
    cur = models[-1]
    # Never bytes that were never committed.
    assert s.state is None or s.state in [m.state for m in models]
    assert s.config is None or s.config in [m.config for m in models]
    assert s.carry is None or s.carry in [m.carry for m in models]
    for i in range(s.receipt_count):
        got = s.receipt(i)
        assert got is None or got == receipts.get(i), "receipt %d invented" % i
    for i, tag, raw in s.pending_receipts():
        assert raw == receipts.get(i) and i >= s.receipt_count
    # Damage outside every record (erased flash, padding) is no fault and changes nothing.
    inside = [a for a in hit if any(lo <= a < hi for lo, hi in _spans(f.orig, f.block_size))]
    if not inside:
        assert faults == {}, faults
    # The contents are the committed ones, or what was lost is reported; the only loss that
    # may go unreported is of the records written last (as a power cut would leave them).
    j = _era(models, s)
    assert j >= 0 or s.state is None
    silent = j == len(models) - 1 or all(writes[i] & hit for i in range(j + 1, len(models)))
    if s.state != cur.state or s.receipt_count != cur.count:
        assert silent or FAULT_STATE_LOST in faults, (faults, j, len(models))
    if s.config != cur.config:
        assert FAULT_CONFIG in faults or (silent and s.config == models[j].config), faults
    if s.carry != cur.carry:
        assert FAULT_LOST in faults, faults
    if j == len(models) - 1:
        for i in range(max(0, cur.count - KEEP), cur.count):
            if i in receipts and s.receipt(i) is None:
                assert FAULT_RECEIPT_LOST in faults, (i, faults)
        for i in cur.receipts:
            if cur.tags[i] == 7 and s.receipt(i) is None:
                assert FAULT_LOST in faults or FAULT_RECEIPT_LOST in faults, (i, faults)
    bits = sum(bin(f.data[a] ^ f.orig[a]).count("1") for a in hit)
    if bits == 1:                                       # one flipped bit: repaired
        assert j == len(models) - 1 and s.config == cur.config and s.carry == cur.carry
        assert set(faults) <= set([FAULT_REPAIRED, FAULT_CONFIG]), faults
    # And it takes new commits.
    try:
        s.commit(b"after damage", b"receipt after damage", 3)
    except StoreError:
        return
    t = _mount(f)
    assert t.state == b"after damage" and t.receipt(t.receipt_count - 1) == b"receipt after damage"
