"""The virtual board: the official MicroPython wasm VM run by the HIL rig (hil/virtual.py).

Importing this module touches nothing; `Board()` needs the `_vboard` JS module that the rig's
VM worker (hil/vboard/worker.mjs) registers, so elsewhere it raises ImportError.

- `han`: the HAN UART, a pseudo-terminal on the host (the rig opens it with pyserial like a
  USB-UART adapter); `read(n)` never blocks. `wan`: the WAN link to the head end (SPEC.md
  §5.1), a third pseudo-terminal, the same way.
- `flash`: the raw partition, a host file with the NOR semantics of `boards.nor.NorFlash` —
  it *is* a NorFlash over the file's image, and each erase and each page program is written
  through to the file as it completes, so a kill of the process between two operations leaves
  an image real NOR flash could hold.  When the rig arms a cut (`VirtualBoard.cut_after(n)`),
  NorFlash tears that operation, the torn state is written through, and the board loses power
  there: the VM stops at once (the firmware never sees `PowerCut`), until the rig powers it on.
- relay, WAN, button, pulses and the meter clock are rig controls (shared memory in the rig).
"""
from binascii import hexlify, unhexlify

_BLOCK = 4096
_PAGE = 256


class Uart:
    """A byte stream on a host pty (the HAN, or the WAN link): a UART with timeout=0."""

    def __init__(self, read, write):
        self._read = read
        self._write = write

    def read(self, n=-1):
        h = self._read(n if n is not None else -1)
        return unhexlify(h) if h else None

    def readinto(self, buf, n=-1):
        if n is None or n < 0 or n > len(buf):
            n = len(buf)
        data = self.read(n)
        if not data:
            return None
        buf[:len(data)] = data
        return len(data)

    def any(self):
        return 0   # unknown without reading; read() is non-blocking

    def write(self, buf):
        if not buf:
            return 0
        return self._write(hexlify(buf).decode())


class Flash:
    """boards.nor.NorFlash over the rig's flash file, written through per operation."""

    def __init__(self, hw):
        from boards.nor import NorFlash
        self._hw = hw
        data = bytearray(unhexlify(hw.flash_read_all()))
        self._nor = NorFlash(block_size=_BLOCK, page_size=_PAGE, seed=hw.flash_seed(), data=data)
        self._data = self._nor.data
        self.blocks = self._nor.blocks

    def _cut(self, kind):
        # Ask the rig whether this operation is the one to tear; if so, let NorFlash tear it.
        if self._hw.flash_op(kind):
            self._nor.cut_after(0)

    def _lost_power(self, a, n):
        self._hw.flash_write(a, hexlify(self._data[a:a + n]).decode())
        self._hw.power_cut()   # does not return

    def readblocks(self, block, buf, offset=0):
        self._nor.readblocks(block, buf, offset)

    def writeblocks(self, block, buf, offset=0):
        from boards.nor import PowerCut
        n = len(buf)
        a = block * _BLOCK + offset
        if block < 0 or offset < 0 or a + n > len(self._data):
            raise OSError(22)  # EINVAL
        mv = memoryview(buf)
        i = 0
        while i < n:                      # one page program at a time, as NorFlash counts them
            c = _PAGE - (a + i) % _PAGE
            if c > n - i:
                c = n - i
            p = a + i
            self._cut(0)
            try:
                self._nor.writeblocks(p // _BLOCK, mv[i:i + c], p % _BLOCK)
            except PowerCut:
                self._lost_power(p, c)
            self._hw.flash_write(p, hexlify(self._data[p:p + c]).decode())
            i += c

    def ioctl(self, op, arg):
        if op == 6:
            from boards.nor import PowerCut
            if arg < 0 or arg >= self.blocks:
                raise OSError(22)
            self._cut(1)
            try:
                self._nor.erase(arg)
            except PowerCut:
                self._lost_power(arg * _BLOCK, _BLOCK)
            self._hw.flash_erased(arg * _BLOCK, _BLOCK)
            return 0
        return self._nor.ioctl(op, arg)


class Board:
    name = "virtual"

    def __init__(self):
        # Registered by the rig's VM worker (a JS module); ImportError anywhere else.
        import _vboard  # pyright: ignore[reportMissingImports]
        self._hw = _vboard
        self.han = Uart(_vboard.han_read, _vboard.han_write)
        self.wan = Uart(_vboard.wan_read, _vboard.wan_write)
        self.flash = Flash(_vboard)

    def set_relay(self, on):
        self._hw.set_relay(bool(on))

    def button_presses(self):
        return self._hw.take_buttons()

    def wan_up(self):
        return self._hw.wan()

    def pulses(self):
        return self._hw.take_pulses()

    def time(self):
        return int(self._hw.clock())

    def set_time(self, t):
        """Set the meter clock (provisioning does), as on a board with a settable RTC."""
        self._hw.clock_set(str(int(t)))

    @property
    def clock_survives_power_loss(self):
        # The rig decides: the host clock runs through a cut (a battery-backed RTC), or the
        # clock restarts from 2000-01-01 at power-on, as on an ESP32 without one.
        keeps = getattr(self._hw, "clock_survives", None)
        return True if keeps is None else bool(keeps())

    def ticks_ms(self):
        return int(self._hw.ticks_ms())

    def random(self, n):
        return unhexlify(self._hw.random_hex(n))


class PpmidBoard:
    """The PPMID on the virtual board: its HAN UART a pty (the rig joins it to a meter's
    like a cable), the keypad a queue the rig presses keys into, the display a framebuffer
    (boards.textdisplay) whose text and pixels the rig reads, USB serial the REPL pty."""
    name = "virtual"

    def __init__(self):
        import _vboard  # pyright: ignore[reportMissingImports]
        from boards.textdisplay import TextDisplay
        self._hw = _vboard
        self.han = Uart(_vboard.han_read, _vboard.han_write)
        self.usb = Uart(_vboard.usb_read, _vboard.usb_write)
        self.display = TextDisplay(self._flush)

    def _flush(self, text, buf):
        self._hw.display(text, hexlify(buf).decode())

    def keys(self):
        return self._hw.take_keys() or ""

    def ticks_ms(self):
        return int(self._hw.ticks_ms())
