# Board support (both VMs): the fake board's behaviour, boards.load, and that the hardware
# board modules touch nothing at import time, wrap flash as program-only and count IRQs.
import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)

import sys

import boards
from boards import fake
from boards.nor import NorFlash

INTERFACE = ("han", "flash", "set_relay", "button_presses", "wan_up", "pulses", "time",
             "ticks_ms", "random", "name")


def _raises(exc, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as e:
        return e
    raise AssertionError("expected %s" % exc.__name__)


# --- the fake board -----------------------------------------------------------------------
def test_fake_board_has_the_whole_interface():
    b = fake.Board()
    for member in INTERFACE:
        assert hasattr(b, member), member
    assert b.name == "fake"
    assert isinstance(b.flash, NorFlash)
    assert b.flash.ioctl(4, 0) == 16 and b.flash.ioctl(5, 0) == 4096


def test_fake_han_stream_queues_input_and_records_output():
    b = fake.Board()
    assert b.han.read(16) is None                 # nothing queued: no blocking, None
    b.feed(b"\x01\x02\x03")
    b.han.feed(b"\x04")
    assert b.han.any() == 4
    assert b.han.read(2) == b"\x01\x02"
    buf = bytearray(8)
    assert b.han.readinto(buf) == 2 and bytes(buf[:2]) == b"\x03\x04"
    assert b.han.read(1) is None
    assert b.han.write(b"abc") == 3
    b.han.write(bytearray(b"de"))
    assert b.take_output() == b"abcde"
    assert b.take_output() == b""


def test_fake_relay_button_wan_and_pulses():
    b = fake.Board(wan=False)
    assert b.relay_on is False
    b.set_relay(True)
    b.set_relay(1)
    assert b.relay_on is True and b.relay_switches == 1
    b.set_relay(False)
    assert b.relay_on is False and b.relay_switches == 2
    assert b.button_presses() == 0
    b.press_button()
    b.press_button(2)
    assert b.button_presses() == 3 and b.button_presses() == 0
    assert b.wan_up() is False
    b.set_wan(True)
    assert b.wan_up() is True
    b.add_pulses(5)
    b.add_pulses(7)
    assert b.pulses() == 12 and b.pulses() == 0


def test_fake_clock_is_settable_and_ticks_follow_it():
    b = fake.Board(now=1800000000)
    assert b.time() == 1800000000 and b.ticks_ms() == 0
    b.advance(60)
    assert b.time() == 1800000060 and b.ticks_ms() == 60000
    b.advance_ms(1500)
    assert b.time() == 1800000061 and b.ticks_ms() == 61500
    b.advance_ms(500)
    assert b.time() == 1800000062 and b.ticks_ms() == 62000
    b.now = 1700000000                            # the wall clock may be set back ...
    assert b.time() == 1700000000 and b.ticks_ms() == 62000   # ... ticks never go back
    _raises(ValueError, b.advance_ms, -1)


def test_fake_random_is_deterministic_per_seed():
    a, a2, c = fake.Board(seed=7), fake.Board(seed=7), fake.Board(seed=8)
    first = a.random(32)
    assert isinstance(first, bytes) and len(first) == 32
    assert a2.random(32) == first
    assert c.random(32) != first
    assert a.random(32) != first                  # the stream moves on
    assert len(a.random(0)) == 0 and len(set(a.random(256))) > 100


def test_fake_board_reboots_on_the_same_flash():
    b = fake.Board()
    b.flash.ioctl(6, 3)
    b.flash.writeblocks(3, b"\x5a" * 4, 8)
    b2 = fake.Board(flash=b.flash)
    buf = bytearray(4)
    b2.flash.readblocks(3, buf, 8)
    assert bytes(buf) == b"\x5a" * 4


# --- boards.load ------------------------------------------------------------------------------
def test_load_picks_by_name_and_platform():
    assert boards.load("fake") is fake
    assert boards.load(platform="esp32").__name__ == "boards.esp32"
    assert boards.load(platform="rp2").__name__ == "boards.pico"
    assert hasattr(boards.load(platform="rp2"), "Board")
    _raises(ValueError, boards.load, platform="no-such-port")
    _raises(ValueError, boards.load, "a.b")
    if sys.platform not in ("esp32", "rp2"):
        _raises(ValueError, boards.load)          # a host or the wasm VM has no default


# --- hardware boards: nothing at import, program-only flash, IRQ counters ------------------
def test_hardware_board_modules_import_anywhere_and_fail_only_on_construction():
    from boards import esp32, pico
    for mod in (esp32, pico):
        for member in INTERFACE:
            if member not in ("han", "flash"):   # made in __init__
                assert hasattr(mod.Board, member), (mod.__name__, member)
    _raises(ImportError, esp32.Board)             # no `esp32` module here
    _raises(ImportError, pico.Board)              # no `rp2` module here
    if sys.implementation.name == "cpython":
        assert "machine" not in sys.modules and "esp32" not in sys.modules


class _Part:
    """Records the calls an esp32.Partition / rp2.Flash receives."""

    def __init__(self):
        self.calls = []

    def readblocks(self, *args):
        self.calls.append(("read",) + args[:1] + args[2:])

    def writeblocks(self, *args):
        self.calls.append(("write",) + args[:1] + args[2:])

    def ioctl(self, op, arg):
        self.calls.append(("ioctl", op, arg))
        return 4096 if op == 5 else 16


def test_hardware_flash_wrappers_never_use_the_erasing_write():
    # esp32.Partition.writeblocks(block, buf) -- three arguments -- erases first; only the
    # four-argument form programs without erasing.  The wrappers must always pass it.
    from boards import esp32, pico
    for mod in (esp32, pico):
        part = _Part()
        flash = mod.Flash(part)
        flash.writeblocks(2, b"\x00" * 16)
        flash.writeblocks(2, b"\x00" * 16, 256)
        flash.readblocks(1, bytearray(4))
        flash.ioctl(6, 2)
        assert part.calls == [("write", 2, 0), ("write", 2, 256), ("read", 1, 0), ("ioctl", 6, 2)]


class _Pin:
    OUT = 1
    IN = 0
    PULL_UP = 2
    PULL_DOWN = 3
    IRQ_FALLING = 4
    IRQ_RISING = 8

    def __init__(self, pin, mode=None, pull=None, value=None):
        self.pin = pin
        self.val = value or 0
        self.handler = None

    def value(self, v=None):
        if v is None:
            return self.val
        self.val = v

    def irq(self, handler=None, trigger=None, hard=False):
        self.handler = handler


class _UART:
    def __init__(self, uart_id, **kwargs):
        self.kwargs = kwargs


class _Machine:
    Pin = _Pin
    UART = _UART

    def __init__(self):
        self.irq_off = 0

    def disable_irq(self):
        self.irq_off += 1
        return 7

    def enable_irq(self, state):
        assert state == 7


class _Partition:
    TYPE_DATA = 1
    found = None

    @staticmethod
    def find(type_, label=None):
        return [_Partition.found] if label == "ledger" else []


class _Esp32:
    Partition = _Partition


class _Time:
    """MicroPython's time API over the host's, for CPython (the board module's `time`)."""

    def __init__(self, real):
        self.real = real

    def ticks_ms(self):
        return int(self.real.time() * 1000) & 0x3FFFFFFF

    def ticks_diff(self, a, b):
        return ((a - b + 0x20000000) & 0x3FFFFFFF) - 0x20000000

    def time(self):
        return int(self.real.time())

    def gmtime(self, t):
        return self.real.gmtime(t)


def test_esp32_board_with_stand_in_port_modules():
    # Construct boards.esp32.Board against stand-ins for `machine` and `esp32`, to check
    # what it does with them (the real modules exist only on the board).
    from boards import esp32
    machine = _Machine()
    _Partition.found = _Part()
    saved = {k: sys.modules.get(k) for k in ("machine", "esp32")}
    sys.modules["machine"] = machine
    sys.modules["esp32"] = _Esp32
    from boards import mcu
    real_time = mcu.time
    if not hasattr(real_time, "ticks_ms"):        # CPython
        mcu.time = _Time(real_time)
    try:
        b = esp32.Board()
        _raises(OSError, esp32.Board, partition="nope")
        _check_esp32_board(b, machine)
    finally:
        mcu.time = real_time
        for k, v in saved.items():
            if v is None:
                del sys.modules[k]
            else:
                sys.modules[k] = v


def _check_esp32_board(b, machine):
    assert b.name == "esp32"
    assert b.han.kwargs["timeout"] == 0          # HAN reads never block
    b.set_relay(True)
    assert b._relay.val == 1
    b.set_relay(False)
    assert b._relay.val == 0
    for _ in range(5):
        b._pulse.handler(b._pulse)                # the IRQ only bumps an int
    assert b.pulses() == 5 and b.pulses() == 0 and machine.irq_off == 2
    b._last_press -= 1000
    b._button.handler(b._button)
    b._button.handler(b._button)                  # a bounce inside 50 ms: not a press
    assert b.button_presses() == 1
    assert b.wan_up() is False
    t = b.ticks_ms()
    assert b.ticks_ms() >= t
    assert len(b.random(16)) == 16 if hasattr(__import__("os"), "urandom") else True
    assert b.time() > 1700000000                  # Unix seconds, whatever the port's epoch


class _Time2000(_Time):
    """A port whose epoch is 2000-01-01 (the ESP32's): time() counts from there."""

    def time(self):
        return 800000000

    def gmtime(self, t):
        return (2000, 1, 1, 0, 0, 0, 5, 1)


def test_esp32_board_reports_unix_seconds_on_a_2000_epoch_port():
    from boards import esp32
    import time
    _Partition.found = _Part()
    saved = {k: sys.modules.get(k) for k in ("machine", "esp32")}
    sys.modules["machine"] = _Machine()
    sys.modules["esp32"] = _Esp32
    from boards import mcu
    real_time = mcu.time
    mcu.time = _Time2000(time)
    try:
        b = esp32.Board()
        assert b.time() == 800000000 + 946684800
    finally:
        mcu.time = real_time
        for k, v in saved.items():
            if v is None:
                del sys.modules[k]
            else:
                sys.modules[k] = v


def test_pico_flash_programs_whole_pages_padded_with_ff():
    # The Pico SDK programs whole 256-byte pages only; 0xFF leaves NOR bits as they are.
    from boards import pico

    class Dev:
        def __init__(self):
            self.writes = []

        def writeblocks(self, block, buf, offset):
            self.writes.append((block, offset, bytes(buf)))

    dev = Dev()
    flash = pico.Flash(dev)
    flash.writeblocks(1, b"\x01\x02", 300)
    flash.writeblocks(1, bytes(512), 512)
    [(b, off, data), (b2, off2, data2)] = dev.writes
    assert (b, off, len(data)) == (1, 256, 256)
    assert data[44:46] == b"\x01\x02" and data[:44] == b"\xff" * 44 and data[46:] == b"\xff" * 210
    assert (b2, off2, data2) == (1, 512, bytes(512))
