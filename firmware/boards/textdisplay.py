"""A text display on a 128x64 monochrome framebuffer (an SSD1306's layout): 8 lines of 16
characters in framebuf's 8x8 font.  The PPMID writes whole screens as text lines; this
renders them into the framebuffer and hands it (and the text) to the board's flush.

framebuf's font has ASCII only: the pound sign and the dashes the PPMID uses are drawn
from the small glyph table below; any other character shows as '?'.  Memory: one 1 KiB
buffer, made once.
"""
try:
    import framebuf
except ImportError:      # CPython (the firmware's logic tests): text only, no pixels
    framebuf = None

WIDTH = 128
HEIGHT = 64
COLS = 16
ROWS = 8

# 8x8 glyphs, one byte per row, most significant bit leftmost.
_GLYPHS = {
    "\u00a3": b"\x1c\x22\x20\x78\x20\x20\x7e\x00",   # £
    "\u2013": b"\x00\x00\x00\x7e\x00\x00\x00\x00",   # – (en dash)
    "\u2014": b"\x00\x00\x00\xff\x00\x00\x00\x00",   # — (em dash)
    "\u2026": b"\x00\x00\x00\x00\x00\x00\x92\x00",   # …
}


class TextDisplay:
    """show(lines) draws up to ROWS lines (each cut to COLS characters) and flushes."""

    cols = COLS
    rows = ROWS

    def __init__(self, flush):
        self.buf = bytearray(WIDTH * HEIGHT // 8)
        self.fb = None if framebuf is None else framebuf.FrameBuffer(self.buf, WIDTH, HEIGHT,
                                                                     framebuf.MONO_VLSB)
        self._flush = flush
        self.text = ""

    def _glyph(self, ch, x, y):
        fb = self.fb
        if fb is None:
            return
        rows = _GLYPHS.get(ch)
        if rows is None:
            fb.text("?", x, y, 1)
            return
        for r in range(8):
            bits = rows[r]
            for c in range(8):
                if bits & (0x80 >> c):
                    fb.pixel(x + c, y + r, 1)

    def show(self, lines):
        fb = self.fb
        out = []
        for row in range(ROWS):
            line = lines[row] if row < len(lines) else ""
            if len(line) > COLS:
                line = line[:COLS]
            out.append(line)
        self.text = "\n".join(out)
        if fb is None:
            self._flush(self.text, self.buf)
            return
        fb.fill(0)
        for row in range(ROWS):
            line = out[row]
            y = row * 8
            ascii_only = True
            for ch in line:
                if ord(ch) > 126 or ord(ch) < 32:
                    ascii_only = False
                    break
            if ascii_only:
                fb.text(line, 0, y, 1)
            else:
                x = 0
                for ch in line:
                    o = ord(ch)
                    if 32 <= o <= 126:
                        fb.text(ch, x, y, 1)
                    else:
                        self._glyph(ch, x, y)
                    x += 8
        self._flush(self.text, self.buf)
