"""The test board: every input is driven by the test, every output is recorded.

Runs on CPython and on MicroPython (the dual-VM tests).  Flash is `boards.nor.NorFlash`,
the NOR-faithful emulator with power-cut injection; pass your own with `flash=` (e.g. one
set to cut power after the N-th program, or the flash of a board that just "lost power",
to reboot on the same image).
"""

_MASK64 = 0xFFFFFFFFFFFFFFFF


class HanStream:
    """A HAN byte stream: the test `feed`s what the PPMID sends, and `take_output`s replies.

    `read(n)` returns up to n queued bytes, or None when nothing is queued (as a UART with
    timeout=0 does); it never blocks.
    """

    def __init__(self):
        self._in = bytearray()
        self._out = bytearray()

    # --- the test's side ---
    def feed(self, data):
        self._in.extend(data)

    def take_output(self):
        out = bytes(self._out)
        self._out = bytearray()
        return out

    def pending(self):
        return len(self._in)

    # --- the firmware's side (the shape of machine.UART) ---
    def any(self):
        return len(self._in)

    def read(self, n=-1):
        if not self._in:
            return None
        if n is None or n < 0 or n > len(self._in):
            n = len(self._in)
        data = bytes(self._in[:n])
        self._in = self._in[n:]
        return data

    def readinto(self, buf, n=-1):
        if not self._in:
            return None
        if n is None or n < 0 or n > len(buf):
            n = len(buf)
        if n > len(self._in):
            n = len(self._in)
        buf[:n] = self._in[:n]
        self._in = self._in[n:]
        return n

    def write(self, buf):
        self._out.extend(buf)
        return len(buf)


class Board:
    name = "fake"
    # The test drives the clock; it keeps running through a "power cut" unless a test says
    # otherwise (set False and move `now` back to the port epoch to play a board without a
    # battery-backed RTC).
    clock_survives_power_loss = True

    def __init__(self, *, flash=None, now=1767225600, seed=1, wan=False):
        """flash: a block device (default: a fresh `boards.nor.NorFlash()`, all 0xFF);
        now: the meter clock in Unix seconds (default 2026-01-01T00:00:00Z);
        seed: seeds `random(n)`, which is deterministic; wan: initial WAN status."""
        if flash is None:
            # Imported here, not at module level: the fake board module loads even where
            # the flash emulator is not wanted.
            from boards.nor import NorFlash
            flash = NorFlash()
        self.flash = flash
        self.han = HanStream()
        self.relay_on = False
        self.relay_switches = 0
        self.now = now
        self._ticks = 0
        self._sub_ms = 0
        self._wan = bool(wan)
        self._presses = 0
        self._pulses = 0
        self._rng = (seed * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) & _MASK64 or 1

    # --- what the test drives -----------------------------------------------------------
    def feed(self, data):
        self.han.feed(data)

    def take_output(self):
        return self.han.take_output()

    def press_button(self, times=1):
        self._presses += times

    def set_wan(self, up):
        self._wan = bool(up)

    def add_pulses(self, n):
        self._pulses += n

    def advance(self, seconds):
        """Move the clock on by whole seconds (ticks_ms moves with it)."""
        self.advance_ms(seconds * 1000)

    def advance_ms(self, ms):
        if ms < 0:
            raise ValueError("time only moves forward; set `now` to change the wall clock")
        self._ticks += ms
        self._sub_ms += ms
        self.now += self._sub_ms // 1000
        self._sub_ms %= 1000

    # --- the board interface --------------------------------------------------------------
    def set_relay(self, on):
        on = bool(on)
        if on != self.relay_on:
            self.relay_switches += 1
        self.relay_on = on

    def button_presses(self):
        n = self._presses
        self._presses = 0
        return n

    def wan_up(self):
        return self._wan

    def pulses(self):
        n = self._pulses
        self._pulses = 0
        return n

    def time(self):
        return self.now

    def set_time(self, t):
        """Provisioning sets the clock, as on a board with a settable RTC."""
        self.now = t

    def ticks_ms(self):
        return self._ticks

    def random(self, n):
        """n bytes from a seeded xorshift64* generator: the same seed, the same bytes."""
        out = bytearray(n)
        x = self._rng
        for i in range(n):
            x ^= (x << 13) & _MASK64
            x ^= x >> 7
            x ^= (x << 17) & _MASK64
            out[i] = ((x * 0x2545F4914F6CDD1D) & _MASK64) >> 56
        self._rng = x
        return bytes(out)


class PpmidBoard:
    """The PPMID test board: keys pressed by the test, the display's text recorded, the HAN
    and USB serial as HanStreams (the test feeds one side and takes the other), and a clock
    the test moves."""
    name = "fake"

    def __init__(self):
        from boards.textdisplay import TextDisplay
        self.han = HanStream()
        self.usb = HanStream()
        self.display = TextDisplay(self._flush)
        self.screens = 0
        self._keys = ""
        self._ticks = 0

    def _flush(self, text, buf):
        self.screens += 1

    # --- what the test drives ---
    def press(self, keys):
        self._keys += keys

    def advance_ms(self, ms):
        self._ticks += ms

    @property
    def text(self):
        return self.display.text

    # --- the board interface ---
    def keys(self):
        k = self._keys
        self._keys = ""
        return k

    def ticks_ms(self):
        return self._ticks
