# meter.store on the NOR fake: round trips, the ring, recovery, and power cuts at every
# erase/program of a commit, a config write, a reclaim and a format (both VMs).
import sys

import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)
from boards.nor import NorFlash, PowerCut
from meter.store import FAULT_REPAIRED, Store, StoreError

MPY = sys.implementation.name == "micropython"

# Small geometry for the exhaustive runs: 64-byte pages so records span pages.
BLOCKS = 6
BLOCK = 512
PAGE = 64
KEEP = 4


def _blob(kind, n, size):
    return bytes((n * 31 + i * 7 + kind * 101) & 0xFF for i in range(size))


def _state(n):
    return _blob(1, n, 24 + n % 9)


def _receipt(n):
    return _blob(2, n, 40 + n % 13)


def _config(n):
    return _blob(3, n, 90 + n % 5)


def _retain(i, tag):
    # The "ledger" in these tests keeps receipts tagged 7 beyond the newest KEEP.
    return tag == 7


class Model:
    """What the store must hold."""

    def __init__(self, carry=None):
        self.state = None
        self.config = None
        self.carry = carry
        self.count = 0
        self.receipts = {}
        self.tags = {}

    def copy(self):
        m = Model(self.carry)
        m.state, m.config, m.count = self.state, self.config, self.count
        m.receipts = dict(self.receipts)
        m.tags = dict(self.tags)
        return m

    def commit(self, state, receipt=None, tag=0):
        if receipt:
            self.receipts[self.count] = receipt
            self.tags[self.count] = tag
            self.count += 1
        self.state = state
        return self


def _flash(image=None, seed=0, blocks=BLOCKS, block=BLOCK, page=PAGE):
    if image is None:
        return NorFlash(blocks=blocks, block_size=block, page_size=page, seed=seed)
    return NorFlash(block_size=block, page_size=page, seed=seed, data=bytearray(image))


def _store(flash, keep=KEEP, retain=_retain, faults=None):
    """Mount a new Store; its faults must be `faults` ({} unless told: power cuts and
    clean runs are no fault)."""
    s = Store(flash, keep_receipts=keep)
    s.retain = retain
    s.mount()
    want = {} if faults is None else faults
    assert s.faults == want, (s.faults, want)
    return s


def _check(store, model, keep=KEEP, retain=_retain):
    assert store.state == model.state, (store.state, model.state)
    assert store.config == model.config
    assert store.carry == model.carry, (store.carry, model.carry)
    assert store.receipt_count == model.count, (store.receipt_count, model.count)
    for i in range(model.count):
        got = store.receipt(i)
        if i not in model.receipts:             # before a first_index
            assert got is None, "receipt %d invented" % i
            continue
        if i >= model.count - keep or (retain is not None and retain(i, model.tags[i])):
            assert got == model.receipts[i], "receipt %d lost or wrong" % i
        else:
            assert got is None or got == model.receipts[i], "receipt %d wrong" % i
    assert store.receipt(model.count) is None
    if retain is not None:
        for tag in (7,):
            want = [i for i in model.tags if model.tags[i] == tag]
            got = store.find_receipt(tag)
            if want:
                assert got == model.receipts[max(want)]


def _apply(model, op):
    kind, arg = op
    m = model.copy()
    if kind == "commit":
        m.commit(*arg)
    elif kind == "config":
        m.config = arg
    else:
        m = Model(arg)
    return m


def _do(store, op):
    kind, arg = op
    if kind == "commit":
        store.commit(*arg)
    elif kind == "config":
        store.write_config(arg)
    else:
        store.format(arg)


def _which(store, old, new):
    """The store after a cut must hold exactly the old or the new contents."""
    key = (store.state, store.config, store.carry, store.receipt_count)
    if key == (old.state, old.config, old.carry, old.count):
        _check(store, old)
        return old
    assert key == (new.state, new.config, new.carry, new.count), "neither old nor new: %r" % (key,)
    _check(store, new)
    return new


def _follow_op(n):
    return ("commit", (_state(900 + n), _receipt(900 + n), 7 if n % 2 else 11))


def _cut_everywhere(image, old, op, seeds, depth=1, follow_op=_follow_op):
    """Cut power at operation 0, 1, 2, ... of `op` on a fresh mount of `image` until the
    operation completes uncut; after each cut remount a new Store and check it holds the
    old or the new contents, then that a further commit works (itself cut everywhere when
    depth > 1). Returns the number of flash operations the op took."""
    new = _apply(old, op)
    n = 0
    while True:
        done = False
        for seed in seeds:
            f = _flash(image, seed)
            s = _store(f)
            _check(s, old)
            f.cut_after(n)
            try:
                _do(s, op)
                done = True
            except PowerCut:
                pass
            f.cut_after(None)
            got = _which(_store(f), old, new)
            follow = follow_op(n)
            if depth > 1 and not done:
                _cut_everywhere(bytes(f.data), got, follow, seeds[:1], depth - 1)
            else:
                s2 = _store(f)
                _do(s2, follow)
                want = _apply(got, follow)
                _check(s2, want)
                _check(_store(f), want)
        if done:
            return n + 1
        n += 1


def _workload(store, model, start, count, every=3):
    # Commits with a receipt every `every`, tags 7 now and then (kept by _retain).
    for n in range(start, start + count):
        r = _receipt(n) if n % every == 0 else None
        tag = 7 if n % 37 == 0 else n + 1
        store.commit(_state(n), r, tag)
        model.commit(_state(n), r, tag)


def _prepared(commits=10):
    f = _flash()
    s = _store(f)
    m = Model()
    s.write_config(_config(0))
    m.config = _config(0)
    _workload(s, m, 0, commits)
    return f, s, m


# -- plain behaviour -------------------------------------------------------------------------

def test_blank_partition_mounts_empty():
    s = _store(_flash())
    assert s.state is None and s.config is None and s.receipt_count == 0
    assert s.receipt(0) is None and s.find_receipt(5) is None


def test_round_trip_and_remount():
    f = _flash()
    s = _store(f)
    m = Model()
    s.write_config(_config(1))
    m.config = _config(1)
    s.commit(_state(1))
    m.commit(_state(1))
    assert s.receipt_count == 0
    s.commit(_state(2), _receipt(2), 42)
    m.commit(_state(2), _receipt(2), 42)
    s.commit(_state(3), _receipt(3), 43)
    m.commit(_state(3), _receipt(3), 43)
    _check(s, m)
    assert s.find_receipt(42) == _receipt(2) and s.find_receipt(43) == _receipt(3)
    assert s.find_receipt(44) is None
    s2 = _store(f)
    _check(s2, m)
    assert s2.find_receipt(43) == _receipt(3)
    s2.write_config(_config(2))
    m.config = _config(2)
    _check(_store(f), m)


def test_find_receipt_latest_and_tag_zero_never_matches():
    f = _flash()
    s = _store(f)
    s.commit(b"a", b"first", 9)
    s.commit(b"b", b"untagged", 0)
    s.commit(b"c", b"second", 9)
    assert s.find_receipt(9) == b"second"
    assert s.find_receipt(0) is None
    assert _store(f).find_receipt(0) is None


def test_state_and_receipt_may_be_any_bytes():
    f = _flash()
    s = _store(f)
    s.commit(b"", b"\xff" * 30, 1)
    s.commit(b"\xff" * 33, bytearray(b"\x00" * 7), 2)
    t = _store(f)
    assert t.state == b"\xff" * 33
    assert t.receipt(0) == b"\xff" * 30 and t.receipt(1) == b"\x00" * 7


def test_orphan_receipt_is_ignored_and_superseded():
    f, s, m = _prepared(6)
    n = s.receipt_count
    # A receipt record whose state record never landed (the cut came in between).
    s._room(64)
    s._append(3, b"orphan receipt", n, 7)
    t = _store(f)
    _check(t, m)
    assert t.receipt(n) is None
    t.commit(_state(50), _receipt(50), 7)
    m.commit(_state(50), _receipt(50), 7)
    _check(t, m)
    _check(_store(f), m)
    assert _store(f).find_receipt(7) == _receipt(50)


def test_garbage_partitions_mount_empty_and_work():
    junk = bytes((i * 197 + (i >> 7) * 13) & 0xFF for i in range(BLOCKS * BLOCK))
    magic = bytes(0xA7 if i % 4 == 0 else (i * 31) & 0xFF for i in range(BLOCKS * BLOCK))
    for image in (junk, b"\x00" * (BLOCKS * BLOCK), magic):
        f = _flash(image)
        s = _store(f)
        assert s.state is None and s.config is None and s.receipt_count == 0
        m = Model()
        s.write_config(_config(5))
        m.config = _config(5)
        _workload(s, m, 0, 60)
        _check(s, m)
        _check(_store(f), m)


def _newest(data, typ):
    # Offset of the newest record of type typ on the image (a parse independent of the
    # store's: magic 0xA7, type, u16 length, u32 generation; records 4-byte aligned).
    best = at = -1
    for b in range(len(data) // BLOCK):
        pos = 0
        while pos + 20 <= BLOCK:
            o = b * BLOCK + pos
            if data[o] != 0xA7:
                break
            ln = data[o + 2] | data[o + 3] << 8
            gen = data[o + 4] | data[o + 5] << 8 | data[o + 6] << 16 | data[o + 7] << 24
            if data[o + 1] == typ and gen > best:
                best, at = gen, o
            pos += (20 + ln + 3) & ~3
    return at


def test_flipped_bit_in_the_newest_state_is_repaired():
    f, s, m = _prepared(5)
    s.commit(_state(77))
    m.commit(_state(77))
    at = _newest(f.data, 2) + 25
    bit = 0
    while not f.data[at] >> bit & 1:
        bit += 1
    f.flip(at, bit)                 # a bit flipped in the newest state record
    t = _store(f, faults={FAULT_REPAIRED: 1})
    _check(t, m)
    t.commit(_state(78))
    m.commit(_state(78))
    _check(_store(f, faults={FAULT_REPAIRED: 1}), m)


def test_destroyed_newest_state_reads_as_a_torn_write():
    # Beyond repair, and nothing written after it: exactly what a cut in its write
    # leaves, so the previous state is used and no fault can be told (the limit).
    f, s, m = _prepared(5)
    before = m.copy()
    s.commit(_state(77))
    at = _newest(f.data, 2)
    for j in (24, 26, 29):
        f.data[at + j] ^= 0x11
    t = _store(f)
    _check(t, before)
    t.commit(_state(78))
    before.commit(_state(78))
    _check(_store(f), before)


def test_thousands_of_commits_wrap_the_ring():
    per_block = [0] * BLOCKS

    class Counting(NorFlash):
        def erase(self, b):
            per_block[b] += 1
            NorFlash.erase(self, b)

    f = Counting(blocks=BLOCKS, block_size=BLOCK, page_size=PAGE)
    s = _store(f)
    m = Model()
    total = 1500 if MPY else 4000
    for n in range(total):
        if n % 400 == 0:
            s.write_config(_config(n))
            m.config = _config(n)
        r = _receipt(n) if n % 3 == 0 else None
        tag = 7 if n % 101 == 0 and n < 500 else n + 1    # a few kept for ever
        s.commit(_state(n), r, tag)
        m.commit(_state(n), r, tag)
        if n % 250 == 0:
            _check(s, m)
            s = _store(f)
            _check(s, m)
    _check(s, m)
    _check(_store(f), m)
    laps = min(per_block)
    assert laps >= 20, per_block                   # wrapped the ring many times
    assert max(per_block) - laps <= 1, per_block   # and wore every block alike
    assert len(s._rx) <= KEEP + len([t for t in m.tags.values() if t == 7])


def test_retain_keeps_old_receipts_until_released():
    f = _flash()
    s = _store(f, retain=None)
    held = set([3, 8])
    s.retain = lambda i, tag: i in held
    m = Model()
    for n in range(200):
        s.commit(_state(n), _receipt(n), n + 1)
        m.commit(_state(n), _receipt(n), n + 1)
    for i in held:
        assert s.receipt(i) == _receipt(i)
        assert s.find_receipt(i + 1) == _receipt(i)
    t = _store(f, retain=None)
    t.retain = lambda i, tag: i in held
    assert t.receipt(3) == _receipt(3) and t.receipt(8) == _receipt(8)
    held.clear()                                   # uploaded: no longer needed
    for n in range(200, 400):
        t.commit(_state(n), _receipt(n), n + 1)
    assert t.receipt(3) is None and t.receipt(8) is None
    assert len(t._rx) == KEEP


def test_store_error_when_retained_receipts_cannot_fit():
    f = _flash()
    s = _store(f, retain=lambda i, tag: True)      # the ledger needs every receipt kept
    m = Model()
    n = 0
    try:
        while True:
            s.commit(_state(n), _receipt(n), n + 1)
            m.commit(_state(n), _receipt(n), n + 1)
            n += 1
            assert n < 500, "never filled up"
    except StoreError:
        pass
    everything = lambda i, tag: True
    _check(s, m, retain=everything)                # refused: nothing changed
    _check(_store(f, retain=everything), m, retain=everything)
    try:
        s.write_config(_config(1))                 # still full
    except StoreError:
        pass
    else:
        raise AssertionError("config written into a full store")
    s.retain = lambda i, tag: False                # receipts uploaded: room again
    s.commit(_state(n), _receipt(n), n + 1)
    m.commit(_state(n), _receipt(n), n + 1)
    _check(s, m, retain=None)
    _check(_store(f, retain=None), m, retain=None)


def test_record_too_large_is_refused():
    f, s, m = _prepared(3)
    for bad in ((b"x" * BLOCK,), (b"x" * 200, b"y" * 200)):
        try:
            s.commit(*bad)
        except StoreError:
            pass
        else:
            raise AssertionError("oversized commit accepted")
    _check(s, m)


def test_format_empties_the_store():
    f, s, m = _prepared(20)
    s.format()
    assert s.state is None and s.config is None and s.receipt_count == 0
    assert s.carry is None
    assert f.data == b"\xff" * (BLOCKS * BLOCK)
    t = _store(f)
    assert t.state is None and t.receipt_count == 0
    t.commit(b"fresh", b"r0", 3)
    u = _store(f)
    assert u.state == b"fresh" and u.receipt(0) == b"r0"


def test_format_keeps_a_carry_until_the_next_format():
    f, s, m = _prepared(20)
    s.format(b"carry: floor 12, next receipt 7")
    m = Model(b"carry: floor 12, next receipt 7")
    _check(s, m)
    _check(_store(f), m)
    s = _store(f)
    s.commit(_state(0), None, 0, first_index=7)
    m.count = 7
    m.commit(_state(0))
    s.write_config(_config(1))
    m.config = _config(1)
    _workload(s, m, 8, 300)                         # the carry is copied forward
    _check(s, m)
    _check(_store(f), m)
    s.format(b"")
    _check(_store(f), Model(b""))
    s.format()
    _check(_store(f), Model())
    try:
        s.format(b"x" * 200)
    except ValueError:
        pass
    else:
        raise AssertionError("oversized carry accepted")


def test_first_index_continues_the_numbering():
    f = _flash()
    s = _store(f)
    s.commit(_state(0), _receipt(0), 5, first_index=41)
    assert s.receipt_count == 42 and s.receipt(41) == _receipt(0) and s.receipt(40) is None
    t = _store(f)
    assert t.receipt_count == 42 and t.receipt(41) == _receipt(0)
    for n in range(1, 30):
        t.commit(_state(n), _receipt(n), n + 5)
    u = _store(f)
    assert u.receipt_count == 71
    for i in range(71 - KEEP, 71):
        assert u.receipt(i) == _receipt(i - 41)
    try:
        u.commit(_state(99), first_index=3)
    except ValueError:
        pass
    else:
        raise AssertionError("first_index accepted with a state present")
    assert _store(f).receipt_count == 71


def test_config_is_written_twice():
    f = _flash()
    s = _store(f)
    s.write_config(_config(1))
    assert f.data.count(_config(1)) == 2
    assert _store(f).config == _config(1)


def test_pending_receipt_is_adopted_or_superseded():
    f, s, m = _prepared(6)
    n = s.receipt_count
    assert s.pending_receipts() == []
    s._room(128)
    s._append(3, b"pending receipt", n, 9)          # its state record never landed
    t = _store(f)
    _check(t, m)
    assert t.pending_receipts() == [(n, 9, b"pending receipt")]
    try:
        t.commit(_state(60), adopt=2)
    except ValueError:
        pass
    else:
        raise AssertionError("adopted more than pending")
    t.commit(_state(60), _receipt(60), 7, adopt=1)
    m.commit(_state(60), b"pending receipt", 9)
    m.commit(_state(60), _receipt(60), 7)
    _check(t, m)
    assert t.pending_receipts() == []
    _check(_store(f), m)
    u = _store(f)
    u._room(128)
    u._append(3, b"orphan", m.count, 9)
    v = _store(f)
    assert v.pending_receipts() == [(m.count, 9, b"orphan")]
    v.commit(_state(61))                            # not adopted: superseded
    m.commit(_state(61))
    assert v.pending_receipts() == []
    _check(_store(f), m)
    assert _store(f).pending_receipts() == []


def test_counters_pass_through():
    f, s, m = _prepared(4)
    assert s.erases == f.erases and s.programs == f.programs


# -- power cuts at every flash operation ------------------------------------------------------

SEEDS = (0, 1, 2) if MPY else (0, 1, 2, 3, 4, 5, 6, 7)


def test_powercut_commit_with_receipt():
    f, s, m = _prepared(8)
    ops = _cut_everywhere(bytes(f.data), m, ("commit", (_state(100), _receipt(100), 7)), SEEDS)
    assert ops >= 4                                 # records span pages: several programs


def test_powercut_commit_without_receipt():
    f, s, m = _prepared(9)
    _cut_everywhere(bytes(f.data), m, ("commit", (_state(101), None, 0)), SEEDS)


def test_powercut_config_write():
    f, s, m = _prepared(7)
    _cut_everywhere(bytes(f.data), m, ("config", _config(9)), SEEDS)


def test_powercut_format():
    f, s, m = _prepared(12)
    _cut_everywhere(bytes(f.data), m, ("format", None), SEEDS)


def test_powercut_format_with_a_carry():
    # Old contents (with their carry) or empty with the new carry, never anything else;
    # also a format over a store that already holds a carry.
    f, s, m = _prepared(12)
    _cut_everywhere(bytes(f.data), m, ("format", b"carry one"), SEEDS)
    s.format(b"carry one")
    m = Model(b"carry one")
    _workload(s, m, 0, 40)
    _cut_everywhere(bytes(f.data), m, ("format", b"carry two: " + bytes(range(150))), SEEDS)
    _cut_everywhere(bytes(f.data), m, ("format", None), SEEDS[:2])


def _reclaim_point():
    """A store whose next commit must reclaim a block holding live config and receipts."""
    f, s, m = _prepared(0)
    n = 200
    while True:
        image = bytes(f.data)
        before = m.copy()
        cfg, erases = s._cfg, f.erases
        op = ("commit", (_state(n), _receipt(n), 7 if n % 4 == 0 else n + 1))
        _do(s, op)
        m = _apply(m, op)
        if f.erases > erases and s._cfg != cfg and n > 230:
            return image, before, op
        n += 1
        assert n < 400


def test_powercut_reclaim_copy_forward():
    image, model, op = _reclaim_point()
    ops = _cut_everywhere(image, model, op, SEEDS)
    assert ops >= 6                                 # copies, an erase, then the commit


def test_powercut_twice_during_reclaim_and_its_repair():
    # A cut in the reclaim, then another at every point of the repair and the next commit.
    image, model, op = _reclaim_point()
    _cut_everywhere(image, model, op, SEEDS[:1], depth=2)


def test_powercut_during_format_after_a_cut_reclaim():
    # The reclaim is cut (the spare may be left unerased), then the factory reset is cut
    # at every point: the store is the pre-format contents or empty, never a mixture.
    image, model, op = _reclaim_point()
    _cut_everywhere(image, model, op, SEEDS[:1], depth=2, follow_op=lambda n: ("format", b"c%d" % n))
