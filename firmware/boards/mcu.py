"""What the microcontroller boards (esp32, pico) share: the relay and WAN pins, button and
pulse counters fed by pin IRQs, Unix time on any port epoch, a ticks counter that never
wraps, and the hardware random source. Each board module subclasses `McuBoard`, makes its
own UART and flash, and calls `_setup_io`. Nothing here touches hardware at import time."""
import os
import time

_UNIX_2000 = 946684800  # seconds from 1970-01-01 to 2000-01-01
_DEBOUNCE_MS = 50


class McuBoard:
    # Without a battery-backed RTC the clock restarts from the port's epoch after a power
    # cut; the meter then resumes its time from the floor kept with its state. A board
    # module for a bench with a battery-backed RTC sets this True.
    clock_survives_power_loss = False
    def _setup_io(self, machine, relay_pin, wan_pin, button_pin, pulse_pin, hard_irq):
        self._machine = machine
        self._relay = machine.Pin(relay_pin, machine.Pin.OUT, value=0)
        self._wan = machine.Pin(wan_pin, machine.Pin.IN, machine.Pin.PULL_DOWN)
        self._presses = 0
        self._pulses = 0
        self._last_press = time.ticks_ms()
        self._button = machine.Pin(button_pin, machine.Pin.IN, machine.Pin.PULL_UP)
        self._pulse = machine.Pin(pulse_pin, machine.Pin.IN)
        # Bound methods are made once here, not in the IRQ. `hard` only where the port has
        # hard pin IRQs (the ESP32 port's are always scheduled).
        kw = {"hard": True} if hard_irq else {}
        self._button.irq(handler=self._on_button, trigger=machine.Pin.IRQ_FALLING, **kw)
        self._pulse.irq(handler=self._on_pulse, trigger=machine.Pin.IRQ_RISING, **kw)
        # Some ports count from 2000-01-01; report Unix seconds on any port.
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

    def _take(self, name):
        state = self._machine.disable_irq()
        n = getattr(self, name)
        setattr(self, name, 0)
        self._machine.enable_irq(state)
        return n

    # --- the board interface ---------------------------------------------------------
    def set_relay(self, on):
        self._relay.value(1 if on else 0)

    def button_presses(self):
        return self._take("_presses")

    def wan_up(self):
        return self._wan.value() == 1

    def pulses(self):
        return self._take("_pulses")

    def time(self):
        return time.time() + self._epoch

    def set_time(self, unix):
        """Set the RTC (provisioning does): Unix seconds, on any port's epoch."""
        tm = time.gmtime(unix - self._epoch)
        # machine.RTC.datetime takes (year, month, day, weekday, hours, minutes, seconds, subseconds)
        self._machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6], tm[3], tm[4], tm[5], 0))

    def ticks_ms(self):
        # time.ticks_ms() wraps (period 2**30); accumulate so the app sees a counter that
        # never goes backwards. Called from the main loop far more often than every
        # 2**29 ms (6 days), the longest step ticks_diff can measure.
        now = time.ticks_ms()
        self._ticks_total += time.ticks_diff(now, self._ticks_last)
        self._ticks_last = now
        return self._ticks_total

    def random(self, n):
        return os.urandom(n)


# --- the PPMID (the customer's in-home device) -------------------------------------------
class UsbSerial:
    """The board's USB serial (the REPL's stdin/stdout) as a non-blocking byte stream, for
    the PPMID's voucher relay.  Ctrl-C still interrupts the program (the port handles it
    before stdin), so mpremote can always take the board back."""

    def __init__(self):
        import select
        import sys
        self._in = sys.stdin
        self._out = sys.stdout
        self._poll = select.poll()
        self._poll.register(sys.stdin, select.POLLIN)

    def read(self, n=-1):
        if n is None or n < 0:
            n = 256
        out = ""
        while len(out) < n and self._poll.poll(0):
            c = self._in.read(1)
            if not c:
                break
            out += c
        return out.encode() if out else None

    def write(self, buf):
        self._out.write(bytes(buf).decode())
        return len(buf)


class PpmidMcuBoard:
    """What the PPMID boards (esp32, pico) share: the keypad scan, the display, USB serial
    and a ticks counter that never wraps.  Each board module makes its own UART and I2C."""
    clock_survives_power_loss = False

    def _setup_ppmid(self, machine, i2c, row_pins, col_pins, addr=0x3C):
        from boards.keypad import MatrixKeypad
        from boards.ssd1306 import Ssd1306
        from boards.textdisplay import TextDisplay
        self._keypad = MatrixKeypad(machine, row_pins, col_pins)
        self._oled = Ssd1306(i2c, addr)
        self.display = TextDisplay(self._flush)
        self.usb = UsbSerial()
        self._ticks_last = time.ticks_ms()
        self._ticks_total = 0

    def _flush(self, _text, buf):
        self._oled.write(buf)

    def keys(self):
        """Keys pressed since the last call, as a str ("12#")."""
        return self._keypad.scan()

    def ticks_ms(self):
        now = time.ticks_ms()
        self._ticks_total += time.ticks_diff(now, self._ticks_last)
        self._ticks_last = now
        return self._ticks_total
