"""A 4x4 matrix keypad scanned from the main loop (no IRQs): rows are driven low one at a
time, columns read with pull-ups (a pressed key reads 0).  A key is reported once when it
goes down and has stayed down for DEBOUNCE_MS; holding it repeats nothing.

    1 2 3 A        digits; * backspace, # enter, D clear,
    4 5 6 B        A emergency credit, B confirm the supply,
    7 8 9 C        C balance
    * 0 # D
"""
import time

KEYMAP = ("123A", "456B", "789C", "*0#D")
DEBOUNCE_MS = 20


class MatrixKeypad:
    def __init__(self, machine, row_pins, col_pins, keymap=KEYMAP, ticks_ms=None):
        """ticks_ms: a millisecond counter that never wraps (tests); default time.ticks_ms."""
        Pin = machine.Pin
        self._ticks = ticks_ms
        self._rows = [Pin(p, Pin.OUT, value=1) for p in row_pins]
        self._cols = [Pin(p, Pin.IN, Pin.PULL_UP) for p in col_pins]
        self._map = keymap
        n = len(row_pins) * len(col_pins)
        self._down = bytearray(n)        # 0 up, 1 seen down (not yet reported), 2 reported
        self._since = [0] * n

    def scan(self):
        """Keys that went down since the last scan, as a str (in scan order)."""
        out = ""
        now = self._ticks() if self._ticks is not None else time.ticks_ms()
        ncols = len(self._cols)
        for r, row in enumerate(self._rows):
            row.value(0)
            for c, col in enumerate(self._cols):
                i = r * ncols + c
                pressed = col.value() == 0
                state = self._down[i]
                if pressed:
                    if state == 0:
                        self._down[i] = 1
                        self._since[i] = now
                    elif state == 1 and self._elapsed(now, self._since[i]) >= DEBOUNCE_MS:
                        self._down[i] = 2
                        out += self._map[r][c]
                else:
                    self._down[i] = 0
            row.value(1)
        return out

    def _elapsed(self, now, then):
        return now - then if self._ticks is not None else time.ticks_diff(now, then)
