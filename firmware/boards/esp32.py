"""ESP32 board: HAN on a UART, the ledger on a raw flash partition, relay/WAN/button/pulses on GPIO.

Importing this module touches nothing (port modules are imported inside `Board.__init__`,
so off the port `Board()` raises ImportError); `Board(...)` creates every hardware object.

Requires MicroPython >= 1.19 (the 4-argument `esp32.Partition.writeblocks` that programs
without erasing); built and checked against 1.27.

Partition table: the firmware needs a data partition labelled ``ledger`` of 64 KiB (16
erase blocks of 4096 bytes), which the stock MicroPython partition tables do not have.
Build the firmware with a partitions CSV that takes it from the end of the ``vfs``
partition, e.g. (ESP-IDF CSV format; offsets left blank are packed by the tool)::

    # Name,   Type, SubType, Offset,   Size,    Flags
    nvs,      data, nvs,     0x9000,   0x6000,
    phy_init, data, phy,     0xf000,   0x1000,
    factory,  app,  factory, 0x10000,  0x1F0000,
    vfs,      data, fat,     ,         0x1F0000,
    ledger,   data, 0x40,    ,         0x10000,

Subtype 0x40 is in the range ESP-IDF leaves to applications, so no IDF component
(NVS, FAT, OTA) ever claims it; `Board` looks it up by type data and label only.

`flash` is program-only: `esp32.Partition.writeblocks(block, buf)` with three arguments
*erases* the range before writing, which would break the NOR discipline the store relies
on (a torn write must leave the old record intact).  `Flash` therefore always passes an
offset (the 4-argument form, which only programs); erasing happens only through
`ioctl(6, block)`.

Pins (keyword arguments of `Board`, defaults for an ESP32-DevKitC): HAN UART 2 on TX 17 /
RX 16 at 115200 baud; relay GPIO 26 (high = supply on); WAN status GPIO 27 (high = up);
customer button GPIO 0 (the BOOT button, active low); energy pulses GPIO 35 (input-only
pin, rising edge per Wh, external pull-up).

Pulse and button counts come from `Pin.irq` handlers that only add to an int.  On the
ESP32 port pin IRQs are always *soft* (scheduled), so a burst faster than the scheduler
queue can drain would drop counts; at 1 Wh per pulse that needs > 3.6 MW of load.
"""
from boards.mcu import McuBoard, PpmidMcuBoard

_BLOCK = 4096


class Flash:
    """esp32.Partition as a program-only block device (see the module docstring)."""

    def __init__(self, part):
        self._part = part

    def readblocks(self, block, buf, offset=0):
        self._part.readblocks(block, buf, offset)

    def writeblocks(self, block, buf, offset=0):
        # Always the 4-argument form: programs only, never erases.
        self._part.writeblocks(block, buf, offset)

    def ioctl(self, op, arg):
        return self._part.ioctl(op, arg)


class Board(McuBoard):
    name = "esp32"

    def __init__(self, *, uart_id=2, tx=17, rx=16, baudrate=115200, relay_pin=26,
                 wan_pin=27, button_pin=0, pulse_pin=35, partition="ledger"):
        # Port modules are imported here, not at module level: importing this module
        # anywhere (a host, the wasm VM, a static check) is harmless.
        import esp32
        import machine

        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label=partition)
        if not found:
            raise OSError(2, "no data partition %r: see boards/esp32.py for the table" % partition)
        self.flash = Flash(found[0])
        if self.flash.ioctl(5, 0) != _BLOCK:
            raise OSError(22, "partition %r block size is not %d" % (partition, _BLOCK))
        # timeout=0: read() returns what is buffered (or None) without waiting.
        self.han = machine.UART(uart_id, baudrate=baudrate, tx=tx, rx=rx, timeout=0,
                                timeout_char=0, rxbuf=1024)
        self._setup_io(machine, relay_pin, wan_pin, button_pin, pulse_pin, hard_irq=False)


class PpmidBoard(PpmidMcuBoard):
    """The PPMID on an ESP32: HAN UART 2 (TX 17 / RX 16, to the meter's HAN), a 4x4 keypad
    (rows GPIO 13, 12, 14, 27 driven; columns GPIO 26, 25, 33, 32 with pull-ups), an SSD1306
    128x64 OLED on I2C 0 (SCL 22, SDA 21, address 0x3C), USB serial for the voucher relay."""
    name = "esp32"

    def __init__(self, *, uart_id=2, tx=17, rx=16, baudrate=115200, rows=(13, 12, 14, 27),
                 cols=(26, 25, 33, 32), scl=22, sda=21, addr=0x3C):
        import machine
        self.han = machine.UART(uart_id, baudrate=baudrate, tx=tx, rx=rx, timeout=0,
                                timeout_char=0, rxbuf=1024)
        i2c = machine.I2C(0, scl=machine.Pin(scl), sda=machine.Pin(sda), freq=400000)
        self._setup_ppmid(machine, i2c, rows, cols, addr)
