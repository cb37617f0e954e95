# meter.store against flash damage that is not a power cut (both VMs): every bit of every
# record of a small image flipped in turn (a deterministic subset here, every 13th bit;
# all of them in tests/test_store_faults_cpython.py), flips in padding, erased flash, the
# spare and a cut format's wipe record; a config copy, the newest state, a dead record
# mid-block and a kept receipt destroyed; programs that do nothing or leave a bit set; and
# half-done erases, which are a power cut and so never a fault. The expectation comes from
# a model of what was committed and from this file's own reading of the on-flash format
# (meter/store.py's docstring), never from the store's internals.
import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)
from boards.nor import PROG_FLIP, PROG_NOOP, NorFlash, PowerCut
from meter.store import (FAULT_CONFIG, FAULT_LOST, FAULT_RECEIPT_LOST, FAULT_REPAIRED,
                         FAULT_STATE_LOST, Store, StoreError)
from tests.firmware.test_store import Model, _check, _config, _receipt, _retain, _state

BLOCKS = 5
BLOCK = 512
PAGE = 64
KEEP = 4
CARRY = b"carry: floor 12"


def _flash(image=None, blocks=BLOCKS):
    if image is None:
        return NorFlash(blocks=blocks, block_size=BLOCK, page_size=PAGE)
    return NorFlash(block_size=BLOCK, page_size=PAGE, data=bytearray(image))


def _mount(flash):
    s = Store(flash, keep_receipts=KEEP)
    s.retain = _retain
    s.mount()
    return s


def _u(data, at, n):
    v = 0
    for j in range(n):
        v |= data[at + j] << (8 * j)
    return v


def parse(data, block=BLOCK):
    """The records of a clean image: [(offset, type, length, gen, index, size, last)],
    `last` if it is the last record of its block. Records are 4-byte aligned from each
    block's start: magic 0xA7, type, u16 length, u32 gen, u32 index, ...; 0xFF ends."""
    out = []
    for b in range(len(data) // block):
        pos = 0
        first = len(out)
        while pos + 20 <= block and data[b * block + pos] == 0xA7:
            o = b * block + pos
            ln = _u(data, o + 2, 2)
            size = (20 + ln + 3) & ~3
            out.append([o, data[o + 1], ln, _u(data, o + 4, 4), _u(data, o + 8, 4), size, False])
            pos += size
        if len(out) > first:
            out[-1][6] = True
    return out


def live_configs(recs):
    cfgs = sorted([r for r in recs if r[1] == 1], key=lambda r: r[3])
    return [r[0] for r in cfgs[-2:]]


def silent(data, rec, bit):
    """A torn write could leave this flip, so it is repaired without a report: a bit set
    that the record's write clears, and only 0xFF after that byte in the record (a record
    is programmed in address order; a cut leaves the byte it hit partly programmed and the
    rest erased)."""
    o, typ, ln = rec[0], rec[1], rec[2]
    at = bit >> 3
    if data[o + at] >> (bit & 7) & 1:
        return False
    for j in range(at + 1, 20 + ln):
        if data[o + j] != 0xFF:
            return False
    return True


def expected(data, rec, bit, cfgs):
    if silent(data, rec, bit):
        return {}
    want = {FAULT_REPAIRED: 1}
    if rec[0] in cfgs:
        want[FAULT_CONFIG] = 1
    return want


def build(commits=60, every=2, config_last=False):
    """A small image: a format with a carry, a first receipt index, a config, then
    commits (a receipt every `every`) until the ring has wrapped; then, if config_last,
    a new config."""
    f = _flash()
    s = _mount(f)
    m = Model(CARRY)
    s.format(CARRY)
    s.commit(_state(0), None, 0, first_index=5)
    m.count = 5
    m.commit(_state(0))
    s.write_config(_config(0))
    m.config = _config(0)
    e = f.erases
    for n in range(1, commits + 1):
        r = _receipt(n) if n % every == 0 else None
        tag = 7 if n % 23 == 0 else n + 1
        s.commit(_state(n), r, tag)
        m.commit(_state(n), r, tag)
    assert f.erases - e >= BLOCKS, f.erases - e     # the ring has wrapped
    if config_last:
        s.write_config(_config(1))
        m.config = _config(1)
    return bytes(f.data), m


_IMAGE = []


def image():
    if not _IMAGE:
        _IMAGE.append(build())
    return _IMAGE[0]


def follow(flash, model, n):
    # The store takes further commits after the damage and keeps them across a mount.
    s = _mount(flash)
    m = model.copy()
    for k in range(3):
        s.commit(_state(500 + n + k), _receipt(500 + n + k), 7)
        m.commit(_state(500 + n + k), _receipt(500 + n + k), 7)
    _check(s, m)
    t = _mount(flash)
    _check(t, m)
    assert FAULT_CONFIG not in t.faults, t.faults   # redundancy is back
    for code in t.faults:
        assert code in (FAULT_REPAIRED,), t.faults


def flip_every_bit(data, model, stride=1, phase=0, follow_every=0):
    """Flip bit k of the image's records, for every k = phase mod stride: each mount must
    hold exactly the committed contents and report the repair. Returns flips done."""
    recs = parse(data)
    cfgs = live_configs(recs)
    assert len(recs) > 20 and len(cfgs) == 2
    n = done = 0
    for rec in recs:
        o = rec[0]
        for bit in range(8 * (20 + rec[2])):
            n += 1
            if n % stride != phase:
                continue
            f = _flash(data)
            f.flip(o + (bit >> 3), bit & 7)
            s = _mount(f)
            want = expected(data, rec, bit, cfgs)
            assert s.faults == want, (o, bit, s.faults, want)
            _check(s, model)
            done += 1
            if follow_every and done % follow_every == 0:
                follow(f, model, done)
    return done


def test_flip_bits_of_every_record():
    data, model = image()
    assert flip_every_bit(data, model, stride=13, phase=5, follow_every=17) > 500


def test_flip_in_padding_is_no_fault():
    data, model = image()
    done = 0
    for rec in parse(data):
        o, ln, size = rec[0], rec[2], rec[5]
        for at in range(o + 20 + ln, o + size):
            for bit in range(0, 8, 3):
                f = _flash(data)
                f.flip(at, bit)
                s = _mount(f)
                assert s.faults == {}, s.faults
                _check(s, model)
                done += 1
    assert done > 20
    follow(f, model, 0)


def test_flip_in_erased_flash_and_the_spare_is_no_fault():
    data, model = image()
    recs = parse(data)
    ends = {}
    for rec in recs:
        b = rec[0] // BLOCK
        ends[b] = max(ends.get(b, 0), rec[0] + rec[5])
    spots = []
    for b in range(BLOCKS):
        end = ends.get(b, b * BLOCK)
        stop = (b + 1) * BLOCK
        spots += [a for a in (end, end + 1, end + 19, end + 20, stop - 1) if a < stop]
        spots += [end + j for j in range(37, stop - end, 61)]
    assert any(b not in ends for b in range(BLOCKS))    # a blank spare is among them
    for at in spots:
        for bit in (0, 5):
            f = _flash(data)
            f.flip(at, bit)
            s = _mount(f)
            assert s.faults == {}, (at, s.faults)
            _check(s, model)
            if at % 3 == 0:
                follow(f, model, at)


def _destroy(f, o, start, n):
    for j in range(start, start + n):
        f.data[o + j] ^= 0x5A


def test_config_copy_destroyed_keeps_the_meter_provisioned():
    data, model = image()
    for which in (0, 1):
        cfg = live_configs(parse(data))[which]
        for start, n in ((0, 20), (24, 40), (4, 1)):        # header, payload, generation
            f = _flash(data)
            _destroy(f, cfg, start, n)
            s = _mount(f)
            _check(s, model)                                # still provisioned
            assert s.faults.get(FAULT_CONFIG) == 1, s.faults
            assert s.faults.get(FAULT_LOST) == 1, s.faults
            assert FAULT_STATE_LOST not in s.faults, s.faults
            s.commit(_state(900), None, 0)                  # the next write rewrites both
            m = model.copy().commit(_state(900))
            t = _mount(f)
            _check(t, m)
            assert FAULT_CONFIG not in t.faults, t.faults
            # The other original copy can go now too: the rewritten pair holds.
            _destroy(f, live_configs(parse(data))[1 - which], 24, 40)
            _check(_mount(f), m)


def _commit_then(extra):
    # The image, a top-up (receipt + state), then `extra` more writes; the top-up's state.
    data, model = image()
    f = _flash(data)
    s = _mount(f)
    m = model.copy()
    s.commit(_state(800), _receipt(800), 77)
    m.commit(_state(800), _receipt(800), 77)
    recs = parse(bytes(f.data))
    st = max([r for r in recs if r[1] == 2], key=lambda r: r[3])
    if extra:
        s.write_config(_config(1))
        m.config = _config(1)
    return f, m, st


def test_destroyed_newest_state_leaves_its_receipt_to_adopt():
    for extra in (False, True):
        f, m, st = _commit_then(extra)
        _destroy(f, st[0], 20, st[2])                   # the state's payload
        s = _mount(f)
        before = m.count - 1
        assert s.receipt_count == before and s.state != _state(800)
        assert s.pending_receipts() == [(before, 77, _receipt(800))]
        if extra:       # written over: reported
            assert s.faults == {FAULT_LOST: 1, FAULT_STATE_LOST: 1}, s.faults
        else:           # the last record: what a torn write leaves
            assert s.faults == {}, s.faults
        s.commit(_state(801), None, 0, adopt=1)         # roll forward
        m.commit(_state(801))
        _check(s, m)
        t = _mount(f)
        _check(t, m)
        assert t.pending_receipts() == []
        t.commit(_state(802), _receipt(802), 78)
        m.commit(_state(802), _receipt(802), 78)
        _check(_mount(f), m)


def test_damage_in_an_older_block_hides_nothing_after_it():
    # A dead record in the middle of a block destroyed: the records after it in that
    # block are still read, and the loss is reported.
    data, model = image()
    recs = parse(data)
    head = max(recs, key=lambda r: r[3])[0] // BLOCK
    for rec in recs:
        if rec[1] == 2 and not rec[6] and rec[0] // BLOCK != head:
            break
    else:
        raise AssertionError("no dead state record mid-block")
    f = _flash(data)
    _destroy(f, rec[0], 8, 24)
    s = _mount(f)
    _check(s, model)
    assert s.faults == {FAULT_LOST: 1}, s.faults


def test_kept_receipt_destroyed_is_reported():
    data, model = image()
    recs = parse(data)
    newest = max([r for r in recs if r[1] == 3], key=lambda r: r[3])
    for rec in recs:
        if rec[1] == 3 and rec[4] == newest[4] - 1:
            break
    f = _flash(data)
    _destroy(f, rec[0], 24, 8)
    s = _mount(f)
    assert s.receipt(rec[4]) is None and s.receipt_count == model.count
    assert s.faults.get(FAULT_RECEIPT_LOST) == 1 and s.faults.get(FAULT_LOST) == 1, s.faults


def test_bad_program_is_written_again():
    # A page program that silently does nothing, or leaves a bit set, at every page of a
    # commit: the record is read back, written again in the next block, and the commit
    # stands; no fault is left behind.
    data, model = image()
    for mode in (PROG_NOOP, PROG_FLIP):
        k = 0
        while True:
            f = _flash(data)
            s = _mount(f)
            p = f.programs
            f.bad_program(k, mode)
            s.commit(_state(700), _receipt(700), 7)
            hit = not f.bad_armed
            f.bad_program(None)
            m = model.copy().commit(_state(700), _receipt(700), 7)
            _check(s, m)
            t = _mount(f)
            assert t.faults == {}, (mode, k, t.faults)
            _check(t, m)
            if not hit:
                break
            assert f.programs > p + k + 1       # written again
            k += 1
        assert k >= 3


def test_bad_program_in_a_reclaim_is_refused_then_redone():
    data, model = image()
    f = _flash(data)
    s = _mount(f)
    m = model.copy()
    n = 0
    while True:                                 # find a commit that reclaims a block
        e = f.erases
        image_before = bytes(f.data)
        s.commit(_state(600 + n), _receipt(600 + n), 7)
        if f.erases > e:
            break
        m.commit(_state(600 + n), _receipt(600 + n), 7)
        n += 1
    f = _flash(image_before)
    s = _mount(f)
    f.bad_program(0, PROG_FLIP)                 # the reclaim's first copy
    try:
        s.commit(_state(600 + n), _receipt(600 + n), 7)
    except StoreError:
        pass
    else:
        raise AssertionError("a bad copy went unnoticed")
    _check(_mount(f), m)                        # refused: nothing changed
    s.commit(_state(600 + n), _receipt(600 + n), 7)
    m.commit(_state(600 + n), _receipt(600 + n), 7)
    _check(s, m)
    t = _mount(f)
    _check(t, m)
    assert t.faults == {}, t.faults


def test_flip_in_the_wipe_record_of_a_cut_format():
    # A factory reset cut after its wipe record landed, then a bit of the wipe record
    # flipped: still an unfinished format holding the carry, finished by the next write.
    data, model = image()
    f = _flash(data)
    s = _mount(f)
    f.cut_after(1)                          # the wipe record lands, the first erase is torn
    try:
        s.format(b"carry after reset")
    except PowerCut:
        pass
    f.cut_after(None)
    cut = bytes(f.data)
    wipes = [r for r in parse(cut) if r[1] == 4]
    assert len(wipes) == 1
    o, ln = wipes[0][0], wipes[0][2]
    for bit in range(0, 8 * (20 + ln), 5):
        g = _flash(cut)
        g.flip(o + (bit >> 3), bit & 7)
        t = _mount(g)
        assert (t.state, t.config, t.receipt_count) == (None, None, 0)
        assert t.carry == b"carry after reset", (bit, t.carry)
    t.commit(_state(1), _receipt(1), 9, first_index=40)
    u = _mount(g)
    assert u.carry == b"carry after reset" and u.receipt(40) == _receipt(1)
    assert u.faults == {}, u.faults


def test_a_half_done_erase_is_never_a_fault():
    # A reclaim's erase cut half-way can leave any mix of its block's records whole,
    # damaged or erased (the NOR fake tears an erase more coarsely; here the damage is
    # done by hand: one record of the block erased, the rest left whole). Such a block is
    # always the one right after the head, which mount leaves out: no fault, and the old
    # or the new contents. Keep 1, so some reclaims find nothing live to copy.
    f = _flash()
    s = Store(f, keep_receipts=1)
    s.mount()
    s.commit(_state(0))
    states = [_state(0)]
    seen = 0
    for n in range(1, 160):
        image = bytes(f.data)
        e = f.erases
        s.commit(_state(n), _receipt(n) if n % 3 else None, n)
        states.append(_state(n))
        if f.erases == e:
            continue
        k = 0
        while True:
            g = _flash(image)
            t = Store(g, keep_receipts=1)
            t.mount()
            g.cut_after(k)
            try:
                t.commit(_state(n), _receipt(n) if n % 3 else None, n)
                break
            except PowerCut as cut:
                why = str(cut)
            k += 1
            if "erase" not in why:
                continue
            b = int(why.split()[-1])
            g.data[b * BLOCK:(b + 1) * BLOCK] = image[b * BLOCK:(b + 1) * BLOCK]
            recs = [r for r in parse(bytes(g.data)) if r[0] // BLOCK == b]
            for r in recs[1:2]:
                for j in range(r[0] + 20, r[0] + r[5]):
                    g.data[j] = 0xFF
            u = Store(g, keep_receipts=1)
            u.mount()
            assert u.faults == {}, (n, k, u.faults)
            assert u.state in states[-2:]
            seen += 1
    assert seen >= 10
