"""Raspberry Pi Pico (RP2040/RP2350) board: HAN on UART0, the ledger on a raw region of flash.

Importing this module touches nothing (port modules are imported inside `Board.__init__`,
so off the port `Board()` raises ImportError); `Board(...)` creates every hardware object.

Requires MicroPython >= 1.20: `rp2.Flash(start=..., len=...)` (a block device over part of
the flash) first shipped in 1.20.0; built and checked against 1.27.

Flash region: `rp2.Flash` addresses the port's *filesystem storage area*, and the stock
`_boot.py` mounts littlefs over all of it.  The ledger needs a region the filesystem does
not own: by default the last 64 KiB (16 blocks of 4096 bytes) of the storage area.  The
firmware image must therefore mount its filesystem on the rest, i.e. freeze a `_boot.py`
whose first lines are::

    import rp2, vfs
    bdev = rp2.Flash()
    bdev = rp2.Flash(start=0, len=bdev.ioctl(4, 0) * 4096 - 64 * 1024)
    # ... then mount/mkfs VfsLfs2(bdev, progsize=256) as the stock _boot.py does

`Board` refuses to start (OSError EBUSY) if the mounted filesystem at "/" reaches into
the ledger region, so a board flashed with the stock image cannot have its files
overwritten by the store.  `flash_start` / `flash_len` (bytes from the start of the
storage area, multiples of 4096) move or resize the region.

`rp2.Flash.writeblocks(block, buf)` with three arguments erases first; `Flash` always
passes an offset (the 4-argument form programs only) and erases only via `ioctl(6, n)`.

Pins (keyword arguments of `Board`): HAN UART0 on GP0 (TX) / GP1 (RX) at 115200 baud;
relay GP15 (high = supply on); WAN status GP14 (high = up); button GP13 (active low);
energy pulses GP12 (rising edge per Wh).  Pulse and button counters are *hard* IRQ
handlers that only add to an int (no allocation), so no pulse is lost to a busy scheduler.
"""
import os

from boards.mcu import McuBoard, PpmidMcuBoard

_BLOCK = 4096
_PAGE = 256
_LEDGER_LEN = 64 * 1024


class Flash:
    """rp2.Flash as a program-only block device (see the module docstring)."""

    def __init__(self, dev):
        self._dev = dev

    def readblocks(self, block, buf, offset=0):
        self._dev.readblocks(block, buf, offset)

    def writeblocks(self, block, buf, offset=0):
        # The SDK's flash_range_program takes whole 256-byte pages only: pad the write
        # with 0xFF, which programming leaves unchanged (NOR only clears bits).
        start = offset & ~(_PAGE - 1)
        end = (offset + len(buf) + _PAGE - 1) & ~(_PAGE - 1)
        if start == offset and end == offset + len(buf):
            self._dev.writeblocks(block, buf, offset)
            return
        padded = bytearray(b"\xff" * (end - start))
        padded[offset - start:offset - start + len(buf)] = buf
        self._dev.writeblocks(block, padded, start)

    def ioctl(self, op, arg):
        return self._dev.ioctl(op, arg)


class Board(McuBoard):
    name = "pico"

    def __init__(self, *, uart_id=0, tx=0, rx=1, baudrate=115200, relay_pin=15, wan_pin=14,
                 button_pin=13, pulse_pin=12, flash_start=None, flash_len=_LEDGER_LEN):
        # Port modules are imported here, not at module level: importing this module
        # anywhere (a host, the wasm VM, a static check) is harmless.
        import machine
        import rp2

        whole = rp2.Flash().ioctl(4, 0) * _BLOCK
        if flash_start is None:
            flash_start = whole - flash_len
        try:
            st = os.statvfs("/")
            fs_end = st[1] * st[2]  # f_frsize * f_blocks, from the start of the storage area
        except OSError:
            fs_end = 0
        if fs_end > flash_start:
            raise OSError(16, "filesystem covers the ledger region: see boards/pico.py")
        self.flash = Flash(rp2.Flash(start=flash_start, len=flash_len))
        self.han = machine.UART(uart_id, baudrate=baudrate, tx=machine.Pin(tx),
                                rx=machine.Pin(rx), timeout=0, timeout_char=0, rxbuf=1024)
        self._setup_io(machine, relay_pin, wan_pin, button_pin, pulse_pin, hard_irq=True)


class PpmidBoard(PpmidMcuBoard):
    """The PPMID on a Pico: HAN UART0 (GP0 TX / GP1 RX, to the meter's HAN), a 4x4 keypad
    (rows GP2-GP5 driven; columns GP6-GP9 with pull-ups), an SSD1306 128x64 OLED on I2C 1
    (SDA GP14, SCL GP15, address 0x3C), USB serial for the voucher relay.  Needs no flash
    region: the PPMID keeps nothing."""
    name = "pico"

    def __init__(self, *, uart_id=0, tx=0, rx=1, baudrate=115200, rows=(2, 3, 4, 5),
                 cols=(6, 7, 8, 9), sda=14, scl=15, addr=0x3C):
        import machine
        self.han = machine.UART(uart_id, baudrate=baudrate, tx=machine.Pin(tx),
                                rx=machine.Pin(rx), timeout=0, timeout_char=0, rxbuf=1024)
        i2c = machine.I2C(1, sda=machine.Pin(sda), scl=machine.Pin(scl), freq=400000)
        self._setup_ppmid(machine, i2c, rows, cols, addr)
