# boards.nor.NorFlash: the NOR semantics the store relies on (both VMs).
import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)
from boards.nor import PROG_FLIP, PROG_NOOP, NorFlash, PowerCut


def _raises_cut(fn, *args):
    try:
        fn(*args)
    except PowerCut:
        return True
    return False


def test_geometry_and_ioctl():
    f = NorFlash(blocks=4, block_size=1024, page_size=256)
    assert f.ioctl(4, 0) == 4
    assert f.ioctl(5, 0) == 1024
    for op in (1, 2, 3):
        assert f.ioctl(op, 0) == 0
    assert len(f.data) == 4096 and f.data == b"\xff" * 4096
    assert (f.erases, f.programs, f.ops) == (0, 0, 0)


def test_existing_bytearray_is_used_in_place():
    data = bytearray(b"\xff" * 2048)
    f = NorFlash(block_size=512, data=data)
    assert f.ioctl(4, 0) == 4
    f.writeblocks(1, b"\x00", 3)
    assert data[512 + 3] == 0
    try:
        NorFlash(block_size=512, data=bytearray(1000))
    except ValueError:
        pass
    else:
        raise AssertionError("partial block accepted")


def test_program_only_clears_bits():
    f = NorFlash(blocks=2, block_size=512, page_size=64)
    f.writeblocks(0, b"\xf0\x0f\xaa", 10)
    f.writeblocks(0, b"\x0f\xff\x55", 10)
    buf = bytearray(3)
    f.readblocks(0, buf, 10)
    assert buf == b"\x00\x0f\x00"           # AND: a bit once cleared stays cleared
    f.writeblocks(0, b"\xff\xff\xff", 10)   # programming 0xFF changes nothing
    f.readblocks(0, buf, 10)
    assert buf == b"\x00\x0f\x00"
    assert f.erases == 0


def test_erase_sets_the_block_to_ff_only():
    f = NorFlash(blocks=3, block_size=512, page_size=64)
    for b in range(3):
        f.writeblocks(b, b"\x00" * 512)
    assert f.ioctl(6, 1) == 0
    assert f.erases == 1
    assert f.data[0:512] == b"\x00" * 512
    assert f.data[512:1024] == b"\xff" * 512
    assert f.data[1024:] == b"\x00" * 512


def test_each_page_touched_is_one_program():
    f = NorFlash(blocks=2, block_size=512, page_size=64)
    f.writeblocks(0, b"\x01" * 10, 60)          # 60..69: pages 0 and 1
    assert f.programs == 2 and f.ops == 2
    f.writeblocks(0, b"\x02" * 64, 128)         # exactly page 2
    assert f.programs == 3
    f.writeblocks(0, b"\x03" * 200, 400)        # 400..599: pages 6, 7 and block 1's 8, 9
    assert f.programs == 7
    assert f.data[400:600] == b"\x03" * 200
    buf = bytearray(200)
    f.readblocks(0, buf, 400)                   # reads may span blocks too
    assert buf == b"\x03" * 200
    f.ioctl(6, 0)
    assert f.ops == 8 and f.erases == 1


def test_out_of_range_is_an_oserror():
    f = NorFlash(blocks=2, block_size=512)
    for fn in (f.readblocks, f.writeblocks):
        try:
            fn(1, bytearray(8), 508)
        except OSError:
            pass
        else:
            raise AssertionError("out of range access allowed")


def test_cut_after_counts_operations():
    f = NorFlash(blocks=4, block_size=512, page_size=64)
    f.cut_after(2)
    f.writeblocks(0, b"\x00" * 64)              # op 1
    f.ioctl(6, 1)                               # op 2
    assert _raises_cut(f.writeblocks, 0, b"\x00" * 64, 64)   # op 3 torn
    assert f.ops == 3
    f.writeblocks(0, b"\x00" * 64, 128)         # disarmed after the cut
    f.cut_after(0)
    assert _raises_cut(f.ioctl, 6, 2)
    f.cut_after(5)
    f.cut_after(None)
    for _ in range(10):
        f.writeblocks(3, b"\x00", 0)


def test_cut_in_a_multi_page_write_stops_there():
    f = NorFlash(blocks=2, block_size=512, page_size=64)
    f.cut_after(1)                              # page 0 done, page 1 torn, page 2 untouched
    assert _raises_cut(f.writeblocks, 0, b"\x00" * 192)
    assert f.data[0:64] == b"\x00" * 64
    assert f.data[128:192] == b"\xff" * 64
    assert f.programs == 2


def _torn_program(seed, data):
    f = NorFlash(blocks=1, block_size=256, page_size=256, seed=seed)
    f.cut_after(0)
    assert _raises_cut(f.writeblocks, 0, data)
    return bytes(f.data)


def test_torn_program_is_prefix_partial_byte_then_untouched():
    data = bytes((i * 7 + 1) & 0x7F for i in range(200))   # every byte clears some bits
    prefixes = set()
    for seed in range(40):
        got = _torn_program(seed, data)
        k = 0
        while k < 200 and got[k] == data[k]:
            k += 1
        prefixes.add(k)
        if k < 200:
            b = got[k]
            assert b & data[k] == data[k]       # no bit cleared that the data keeps set
            assert b != data[k]
            assert got[k + 1:] == b"\xff" * (256 - k - 1)
        assert got == _torn_program(seed, data)    # deterministic per seed
    assert len(prefixes) > 10                   # and seeds tear in different places


def test_torn_erase_lies_between_old_and_ff():
    old = bytes((i * 13) & 0xFF for i in range(512))
    kinds = set()
    for seed in range(24):
        f = NorFlash(blocks=2, block_size=512, page_size=64, seed=seed)
        f.writeblocks(1, old)
        f.cut_after(0)
        assert _raises_cut(f.ioctl, 6, 1)
        got = f.data[512:]
        for i in range(512):
            assert got[i] & old[i] == old[i]    # only bits set, none cleared
        assert f.data[:512] == b"\xff" * 512
        kinds.add("old" if got == old else "ff" if got == b"\xff" * 512 else "mixed")
        g = NorFlash(blocks=2, block_size=512, page_size=64, seed=seed)
        g.writeblocks(1, old)
        g.cut_after(0)
        _raises_cut(g.ioctl, 6, 1)
        assert g.data == f.data
    assert kinds == {"old", "ff", "mixed"}


def test_flip_at_rest_is_no_operation():
    f = NorFlash(blocks=2, block_size=512, page_size=64)
    f.writeblocks(0, b"\x0f", 5)
    f.flip(5, 0)
    f.flip(700, 7)
    assert f.data[5] == 0x0e and f.data[700] == 0x7f
    f.flip(5, 0)
    assert f.data[5] == 0x0f
    assert (f.ops, f.programs, f.erases) == (1, 1, 0)


def test_bad_program_noop_skips_one_page_once():
    f = NorFlash(blocks=2, block_size=512, page_size=64)
    f.bad_program(1, PROG_NOOP)
    assert f.bad_armed
    f.writeblocks(0, b"\x00" * 192)            # pages 0, 1 (no-op), 2
    assert not f.bad_armed
    assert f.data[0:64] == b"\x00" * 64
    assert f.data[64:128] == b"\xff" * 64
    assert f.data[128:192] == b"\x00" * 64
    assert f.programs == 3
    f.writeblocks(0, b"\x00" * 64, 64)         # one-shot: programs again
    assert f.data[64:128] == b"\x00" * 64


def test_bad_program_flip_leaves_one_bit_set():
    for seed in range(8):
        f = NorFlash(blocks=1, block_size=256, page_size=64, seed=seed)
        data = bytes((i * 37 + seed) & 0x7F for i in range(64))
        f.bad_program(0, PROG_FLIP)
        f.writeblocks(0, data, 64)
        got = f.data[64:128]
        diff = [(j, got[j] ^ data[j]) for j in range(64) if got[j] != data[j]]
        assert len(diff) == 1, diff
        j, x = diff[0]
        assert x & (x - 1) == 0 and got[j] & x    # one bit, left set
        f.writeblocks(0, data, 64)                # reprogramming clears it
        assert f.data[64:128] == data


def test_bad_program_disarm():
    f = NorFlash(blocks=1, block_size=256, page_size=64)
    f.bad_program(0, PROG_NOOP)
    f.bad_program(None)
    f.writeblocks(0, b"\x00" * 4)
    assert f.data[0:4] == b"\x00" * 4
