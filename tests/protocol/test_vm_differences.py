# Runs on CPython (pytest) and on MicroPython, both the wasm VM (tools/mpy_test.mjs) and the
# unix port (tools/mpy_unix_test.py): plain asserts only.
#
# Pins of behaviour that differs between the three VMs and that this code base relies on
# (or works around).  Each test states what each VM does today, so an upgrade that changes
# one shows up here, by name, rather than as a wrong answer somewhere else; and it checks
# that the code gives the same answer on every VM regardless.
import struct
import sys

from protocol import cbor, ed25519, receipt, voucher

MICROPYTHON = sys.implementation.name == "micropython"
VERSION = tuple(sys.implementation.version[:2])
WASM = sys.platform == "webassembly"


def _raises(exc, fn, *args):
    try:
        fn(*args)
    except exc:
        return True
    return False


def test_negative_to_bytes_raises_except_on_micropython_before_1_29():
    # MicroPython 1.27 (the wasm VM) writes two's complement without a word; 1.29 (the unix
    # port) raises, as CPython does.  So every to_bytes() here gets a value already reduced
    # to its range (ed25519: `% p`, `% L`; sha512: lengths), never one it would truncate.
    if MICROPYTHON and VERSION < (1, 29):
        assert (-1).to_bytes(4, "little") == b"\xff\xff\xff\xff"
    else:
        assert _raises(OverflowError, (-1).to_bytes, 4, "little")
    # too big raises everywhere
    assert _raises(OverflowError, (1 << 40).to_bytes, 4, "little")
    # what the code does with a negative coordinate: reduce first, the same bytes everywhere
    assert ed25519._encode(-ed25519.BX, ed25519.BY, 1) == ed25519._encode(
        ed25519.P - ed25519.BX, ed25519.BY, 1)


def test_ticks_us_granularity():
    # The wasm VM's microsecond clock advances in whole milliseconds; the unix port's in
    # microseconds; CPython has none.  The benchmarks time batches on the wasm VM
    # (tests/bench/bench_ed25519.py) and single calls on the unix port.
    import time
    if not MICROPYTHON:
        assert not hasattr(time, "ticks_us")
        return
    steps = []
    last = time.ticks_us()
    spins = 0
    while len(steps) < 20 and spins < 10 ** 7:
        now = time.ticks_us()
        spins += 1
        if now != last:
            steps.append(time.ticks_diff(now, last))
            last = now
    assert len(steps) == 20, spins
    if WASM:
        assert all(s % 1000 == 0 for s in steps), steps
    else:
        assert min(steps) < 1000, steps


def test_pow_with_exponent_minus_one():
    # CPython's pow(x, -1, m) is the modular inverse (ValueError if there is none);
    # MicroPython returns 0, silently.  Ed25519 inverts with its own _inv.
    if MICROPYTHON:
        assert pow(3, -1, 7) == 0
        assert pow(0, -1, 7) == 0
    else:
        assert pow(3, -1, 7) == 5
        assert _raises(ValueError, pow, 0, -1, 7)
    z = ed25519.BX
    assert ed25519._inv(z) * z % ed25519.P == 1
    assert ed25519._inv(0) == 0


def test_struct_pack_out_of_range():
    # CPython raises struct.error for a value that does not fit; MicroPython keeps the low
    # bits without a word.  So the code checks ranges itself before it packs: CBOR heads,
    # record headers (store.commit refuses a tag above 2^32 - 1 on every VM).
    if MICROPYTHON:
        assert struct.pack("<H", 65536) == b"\x00\x00"
        assert struct.pack("<I", -1) == b"\xff\xff\xff\xff"
        buf = bytearray(2)
        struct.pack_into("<H", buf, 0, 70000)
        assert bytes(buf) == b"\x70\x11"
    else:
        assert _raises(struct.error, struct.pack, "<H", 65536)
        assert _raises(struct.error, struct.pack, "<I", -1)
    assert cbor.encode(0xFFFFFFFFFFFFFFFF) == b"\x1b" + b"\xff" * 8
    assert _raises(ValueError, cbor.encode, 1 << 64)
    assert cbor.encode(-(1 << 64)) == b"\x3b" + b"\xff" * 8
    assert _raises(ValueError, cbor.encode, -(1 << 64) - 1)


def test_bool_is_an_int_only_on_cpython():
    # isinstance(True, int) is True on CPython (bool subclasses int) and False on
    # MicroPython.  So every integer check here excludes bool explicitly, and the CBOR
    # encoder tests for bool before int: the same verdict on every VM.
    if MICROPYTHON:
        assert not isinstance(True, int)
        assert not issubclass(bool, int)
    else:
        assert isinstance(True, int)
        assert issubclass(bool, int)
    assert True + 1 == 2 and True == 1       # arithmetic and equality agree everywhere
    assert cbor.encode(True) == b"\xf5" and cbor.encode(1) == b"\x01"
    assert cbor.encode({1: False}) == b"\xa1\x01\xf4"
    assert not voucher._uint(True) and voucher._uint(1)
    assert not receipt._uint(False) and receipt._uint(0)
    assert _raises(ValueError, cbor.encode, {True: 1})


def test_from_bytes_takes_no_signed_argument():
    # MicroPython accepts and ignores a third positional argument of int.from_bytes (and
    # has no signed=); CPython refuses it.  Nothing here converts signed bytes.
    if MICROPYTHON:
        assert int.from_bytes(b"\xff", "little", True) == 255
    else:
        assert _raises(TypeError, int.from_bytes, b"\xff", "little", True)
    assert int.from_bytes(b"\xff\x00", "little") == 255
