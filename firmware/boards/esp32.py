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
import os
import time

_BLOCK = 4096
_UNIX_2000 = 946684800  # seconds from 1970-01-01 to 2000-01-01
_DEBOUNCE_MS = 50


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


class Board:
    name = "esp32"

    def __init__(self, *, uart_id=2, tx=17, rx=16, baudrate=115200, relay_pin=26,
                 wan_pin=27, button_pin=0, pulse_pin=35, partition="ledger"):
        # Port modules are imported here, not at module level: importing this module
        # anywhere (a host, the wasm VM, a static check) is harmless.
        import esp32
        import machine

        self._machine = machine
        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label=partition)
        if not found:
            raise OSError(2, "no data partition %r: see boards/esp32.py for the table" % partition)
        self.flash = Flash(found[0])
        if self.flash.ioctl(5, 0) != _BLOCK:
            raise OSError(22, "partition %r block size is not %d" % (partition, _BLOCK))
        # timeout=0: read() returns what is buffered (or None) without waiting.
        self.han = machine.UART(uart_id, baudrate=baudrate, tx=tx, rx=rx, timeout=0,
                                timeout_char=0, rxbuf=1024)
        self._relay = machine.Pin(relay_pin, machine.Pin.OUT, value=0)
        self._wan = machine.Pin(wan_pin, machine.Pin.IN, machine.Pin.PULL_DOWN)
        self._presses = 0
        self._pulses = 0
        self._last_press = time.ticks_ms()
        self._button = machine.Pin(button_pin, machine.Pin.IN, machine.Pin.PULL_UP)
        self._pulse = machine.Pin(pulse_pin, machine.Pin.IN)
        # Bound methods are made once here, not in the IRQ.
        self._button.irq(handler=self._on_button, trigger=machine.Pin.IRQ_FALLING)
        self._pulse.irq(handler=self._on_pulse, trigger=machine.Pin.IRQ_RISING)
        # The ESP32 port counts from 2000-01-01; report Unix seconds on any port.
        self._epoch = _UNIX_2000 if time.gmtime(0)[0] == 2000 else 0
        self._ticks_last = time.ticks_ms()
        self._ticks_total = 0

    # --- IRQ handlers: integer arithmetic only, no allocation -----------------------
    def _on_pulse(self, _pin):
        self._pulses += 1

    def _on_button(self, _pin):
        t = time.ticks_ms()
        if time.ticks_diff(t, self._last_press) > _DEBOUNCE_MS:
            self._presses += 1
        self._last_press = t

    # --- the board interface ---------------------------------------------------------
    def set_relay(self, on):
        self._relay.value(1 if on else 0)

    def button_presses(self):
        state = self._machine.disable_irq()
        n = self._presses
        self._presses = 0
        self._machine.enable_irq(state)
        return n

    def wan_up(self):
        return self._wan.value() == 1

    def pulses(self):
        state = self._machine.disable_irq()
        n = self._pulses
        self._pulses = 0
        self._machine.enable_irq(state)
        return n

    def time(self):
        return time.time() + self._epoch

    def ticks_ms(self):
        # time.ticks_ms() wraps (period 2**30); accumulate so the app sees a counter that
        # never goes backwards.  Called from the main loop far more often than every
        # 2**29 ms (6 days), the longest step ticks_diff can measure.
        now = time.ticks_ms()
        self._ticks_total += time.ticks_diff(now, self._ticks_last)
        self._ticks_last = now
        return self._ticks_total

    def random(self, n):
        return os.urandom(n)
