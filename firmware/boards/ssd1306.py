"""SSD1306 128x64 OLED over I2C: initialisation and a full-screen write of a MONO_VLSB
framebuffer (boards.textdisplay.TextDisplay draws into it)."""

_INIT = (
    0xAE,              # display off
    0x20, 0x00,        # horizontal addressing
    0x40,              # start line 0
    0xA1,              # segment remap (column 127 is SEG0)
    0xA8, 63,          # multiplex: 64 lines
    0xC8,              # COM scan from COM[N-1]
    0xD3, 0x00,        # no display offset
    0xDA, 0x12,        # COM pins: alternative, no remap
    0xD5, 0x80,        # clock divide
    0xD9, 0xF1,        # pre-charge (internal charge pump)
    0xDB, 0x30,        # VCOMH
    0x81, 0xFF,        # contrast
    0xA4,              # output follows RAM
    0xA6,              # not inverted
    0x8D, 0x14,        # charge pump on
    0xAF,              # display on
)


class Ssd1306:
    def __init__(self, i2c, addr=0x3C):
        self.i2c = i2c
        self.addr = addr
        self._cmd = bytearray(2)
        for c in _INIT:
            self.command(c)

    def command(self, c):
        self._cmd[0] = 0x80
        self._cmd[1] = c
        self.i2c.writeto(self.addr, self._cmd)

    def write(self, buf):
        for c in (0x21, 0, 127, 0x22, 0, 7):
            self.command(c)
        self.i2c.writevto(self.addr, (b"\x40", buf))
