# meter.store on the NOR fake: round trips, the ring, recovery, and power cuts at every
# erase/program of a commit, a config write, a reclaim and a format (both VMs).
import sys

import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)
from boards.nor import NorFlash, PowerCut
from meter.store import Store, StoreError

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

    def __init__(self):
        self.state = None
        self.config = None
        self.count = 0
        self.receipts = {}
        self.tags = {}

    def copy(self):
        m = Model()
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


def _store(flash, keep=KEEP, retain=_retain):
    s = Store(flash, keep_receipts=keep)
    s.retain = retain
    s.mount()
    return s


def _check(store, model, keep=KEEP, retain=_retain):
    assert store.state == model.state, (store.state, model.state)
    assert store.config == model.config
    assert store.receipt_count == model.count, (store.receipt_count, model.count)
    for i in range(model.count):
        got = store.receipt(i)
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
        m = Model()
    return m


def _do(store, op):
    kind, arg = op
    if kind == "commit":
        store.commit(*arg)
    elif kind == "config":
        store.write_config(arg)
    else:
        store.format()


def _which(store, old, new):
    """The store after a cut must hold exactly the old or the new contents."""
    key = (store.state, store.config, store.receipt_count)
    if key == (old.state, old.config, old.count):
        _check(store, old)
        return old
    assert key == (new.state, new.config, new.count), "neither old nor new: %r" % (key,)
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


def test_corrupt_latest_state_falls_back_to_the_previous_one():
    f, s, m = _prepared(5)
    before = m.copy()
    s.commit(_state(77))
    loc = s._st
    f.data[loc + 25] ^= 0x01          # a bit flipped in the newest state record
    t = _store(f)
    _check(t, before)


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
    assert f.data == b"\xff" * (BLOCKS * BLOCK)
    t = _store(f)
    assert t.state is None and t.receipt_count == 0
    t.commit(b"fresh", b"r0", 3)
    u = _store(f)
    assert u.state == b"fresh" and u.receipt(0) == b"r0"


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
    _cut_everywhere(image, model, op, SEEDS[:1], depth=2, follow_op=lambda n: ("format", None))
