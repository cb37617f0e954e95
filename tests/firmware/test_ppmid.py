# The PPMID firmware (both VMs and CPython): keys, display text, the HAN to a real meter on
# the fake board (wired in-process), the USB voucher relay, and bad input from every side.
import tests.firmware._fw  # noqa: F401

from boards.fake import Board, PpmidBoard
from meter import provisioning
from meter.app import Meter
from meter.store import Store
from ppmid import screen
from ppmid.app import ENTRY_TIMEOUT_MS, Ppmid
from ppmid.link import TIMEOUT_MS, TRIES
from protocol import keycode, voucher, x25519
from tests.firmware._meterkit import COMMAND_SEED, DEVICE, ISSUER_SEED, command, issue, public

SUPPLIER_SECRET = bytes(range(40, 72))
_KEY = {}


def _wired(initial=1000, command_key=None):
    board = Board(now=1790000000)
    store = Store(board.flash)
    store.mount()
    provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, initial,
                           code_key=_supplier_public(), command_key=command_key)
    from meter import config as cfg
    ka = cfg.decode(store.config)[cfg.C_KA_PUBLIC]
    if ka not in _KEY:
        shared = x25519.x25519(SUPPLIER_SECRET, ka)
        _KEY[ka] = keycode.derive_key(shared, DEVICE, _supplier_public(), ka)
    return Pair(Meter(board), board, _KEY[ka])


def _supplier_public():
    if "pub" not in _KEY:
        _KEY["pub"] = x25519.public_key(SUPPLIER_SECRET)
    return _KEY["pub"]


class Pair:
    """A meter and a PPMID on one HAN cable (unplug() cuts it)."""

    def __init__(self, meter, board, key):
        self.meter = meter
        self.mboard = board
        self.key = key
        self.pboard = PpmidBoard()
        self.ppmid = Ppmid(self.pboard)
        self.plugged = True
        self.run()

    def code(self, seq, amount):
        return keycode.encode(self.key, DEVICE, amount, seq)

    def run(self, passes=6):
        for _ in range(passes):
            self.ppmid.step()
            out = self.pboard.han.take_output()
            if self.plugged and out:
                self.mboard.feed(out)
            self.meter.step()
            back = self.mboard.take_output()
            if self.plugged and back:
                self.pboard.han.feed(back)
            self.ppmid.step()
            self.pboard.advance_ms(10)

    def type(self, keys, passes=6):
        self.pboard.press(keys)
        self.run(passes)
        return self.text

    @property
    def text(self):
        return " ".join(self.pboard.text.split())

    @property
    def lines(self):
        return self.pboard.text.split("\n")

    @property
    def balance(self):
        return self.meter.ledger.balance_mp


def test_a_typed_code_is_grouped_and_credits_the_meter_by_its_amount():
    p = _wired()
    before = p.balance
    code = p.code(1, 1000)
    p.type(code[:6])
    assert p.lines[3] == code[:4] + " " + code[4:6]
    p.type("*")                                       # backspace
    assert p.lines[3] == code[:4] + " " + code[4:5]
    p.type(code[5:])
    assert p.lines[3] == screen.group(code[:12]) and p.lines[4] == screen.group(code[12:])
    text = p.type("#")
    assert "\u00a310.00 added" in text, text
    assert p.balance == before + 1000000
    assert "Credit \u00a320.00" in p.text and "Supply on" in p.text
    assert p.lines[3] == "Type code, # OK"            # the entry is cleared
    # typed again: already used, no credit
    text = p.type(code + "#")
    assert "Already used" in text and p.balance == before + 1000000


def test_a_typo_says_so_keeps_the_digits_and_does_not_count():
    p = _wired()
    code = p.code(1, 500)
    bad = code[:7] + str((int(code[7]) + 1) % 10) + code[8:]
    text = p.type(bad + "#")
    assert "Typo \u2013 check the code" in text, text
    assert p.meter.ledger.code_tries_left == 5
    assert p.lines[3] == screen.group(bad[:12])       # kept, to correct
    text = p.type("D" + "1234#")
    assert "Incomplete" in text and p.meter.ledger.code_tries_left == 5


def test_wrong_codes_count_down_then_lock():
    p = _wired()
    other = keycode.encode(bytes(32), DEVICE, 500, 1)   # a code under another key
    for left in (4, 3, 2, 1):
        text = p.type(other + "#")
        assert "Wrong code \u2013 %s" % screen.tries(left) in text, text
    text = p.type(other + "#")
    assert "locked" in text.lower(), text
    text = p.type(p.code(1, 500) + "#")
    assert "Locked 60 min" in text, text
    assert p.balance == 1000000


def test_an_armed_supply_is_confirmed_with_b():
    p = _wired(initial=0)
    assert "Supply off" in p.text
    p.type(p.code(1, 700) + "#")
    assert "Supply armed" in p.text and "Press B to switch on" in p.text, p.text
    assert p.mboard.relay_on is False
    text = p.type("B")
    assert "Supply on" in text and p.mboard.relay_on is True


def test_emergency_credit_with_a_and_the_balance_with_c():
    p = _wired(initial=50)
    text = p.type("A")
    assert "Emergency credit \u00a35.00 on" in text, text
    assert "Emergency \u00a35.00" in p.text
    text = p.type("A")
    assert "Emergency credit not available" in text
    assert "Credit \u00a30.50" in p.type("C")


def test_a_meter_that_does_not_answer_is_named_and_the_code_kept():
    p = _wired()
    p.plugged = False
    code = p.code(1, 1000)
    p.type(code + "#")
    for _ in range(TRIES + 1):
        p.pboard.advance_ms(TIMEOUT_MS)
        p.run(2)
    assert "Meter not answering" in p.text, p.text
    assert p.lines[3] == screen.group(code[:12])
    p.plugged = True
    text = p.type("#")
    assert "\u00a310.00 added" in text, text
    assert p.balance == 2000000


def test_the_typed_code_is_cleared_after_the_entry_timeout():
    p = _wired()
    p.type("1234")
    p.pboard.advance_ms(ENTRY_TIMEOUT_MS)
    p.run(1)
    assert p.lines[3] == "Type code, # OK" and "Entry timed out" in p.text


def test_usb_relay_takes_a_voucher_and_a_code_and_refuses_garbage():
    p = _wired()
    p.pboard.usb.feed((voucher.to_text(issue(1, 250)) + "\n").encode())
    p.run()
    out = p.pboard.usb.take_output().decode()
    assert out.startswith("OK \u00a32.50 added, receipt 0"), out
    p.pboard.usb.feed((screen.group(p.code(2, 100)) + "\r\n").encode())
    p.run()
    assert p.pboard.usb.take_output().decode().startswith("OK \u00a31.00 added, receipt 1")
    balance = p.balance
    for junk in (b"hello\n", b"OTU1:!!!\n", b"\xff\xfe\x00\x01\n", b"x" * 2000 + b"\n",
                 b"12a4\n", b"status\n"):
        p.pboard.usb.feed(junk)
        p.run()
        out = p.pboard.usb.take_output().decode()
        assert out.startswith("ERROR ") or out.startswith("STATUS ") or out.startswith("REFUSED"), (junk, out)
    assert p.balance == balance
    p.pboard.usb.feed(b"0000-0000\n")
    p.run()
    assert p.pboard.usb.take_output().decode().startswith("REFUSED CODE_INCOMPLETE (21)")


def test_usb_relay_takes_a_signed_command_once_and_refuses_a_bad_one():
    """A supplier's signed command given to the PPMID as text (SPEC.md §10) reaches the
    meter: applied once (its receipt), the same again is the original receipt; a command
    whose text does not decode is refused on the PPMID and nothing is sent."""
    from protocol import command as C
    p = _wired(command_key=public(COMMAND_SEED))
    tariff = {C.A_EFFECTIVE: 1790000000 + 3600, C.A_UNIT_RATE: 30000}
    text = C.to_text(command(1, C.SET_TARIFF, tariff, issued=1790000000 - 60))
    p.pboard.usb.feed((text + "\n").encode())
    p.run()
    out = p.pboard.usb.take_output().decode()
    assert out.startswith("OK command 1 applied, receipt "), out
    assert "Meter updated" in p.text
    p.pboard.usb.feed((text + "\n").encode())
    p.run()
    assert "already applied" in p.pboard.usb.take_output().decode()
    sent = []
    p.pboard.usb.feed(b"OTC1:!!!not base45\n")
    p.ppmid.step()
    sent.append(p.pboard.han.take_output())
    assert p.pboard.usb.take_output().decode().startswith("ERROR not a command")
    assert sent == [b""] or sent == [None]
    # out of order: the meter's reason comes back on the USB line
    p.pboard.usb.feed((C.to_text(command(3, C.SET_TARIFF, tariff, issued=1790000000 - 60)) + "\n").encode())
    p.run()
    assert p.pboard.usb.take_output().decode().startswith("REFUSED COMMAND_OUT_OF_ORDER (24)")


def test_garbage_on_the_han_and_on_the_keys_never_stops_it():
    p = _wired()
    pb = p.pboard
    from protocol import han
    junk = [b"\x00\xff" * 300, bytes(range(256)), han.encode_message(0x85, 0x4001, {1: b"xx", 2: 3}),
            han.encode_message(0xFF, 0x4002, {1: "x", 2: [], 3: None}),
            han.encode_message(0x81, 0x4003, {3: "lots", 15: 9, 8: -1}), b"\x01" * 5000]
    p.type("12")
    for j in junk:
        pb.han.feed(j)
        pb.press("#*D9ABC\x00\xff")
        p.ppmid.step()
    p.run()
    assert p.ppmid.errors == 0
    assert "Credit \u00a310.00" in p.type("C")
    code = p.code(1, 300)
    assert "\u00a33.00 added" in p.type(code + "#")


def test_memory_stays_bounded_under_a_stream_of_garbage():
    """On the unix port (a real collector): what the PPMID holds does not grow with the
    garbage it is fed from every side (the wasm VM collects only between top-level calls,
    CPython has no gc.mem_alloc: skipped there)."""
    import gc
    import sys
    if sys.implementation.name != "micropython" or sys.platform != "linux":
        return
    pb = PpmidBoard()
    p = Ppmid(pb)

    def feed(n):
        for i in range(n):
            pb.press("1234567890*#DABC"[i % 16])
            pb.han.feed(b"\x00\x07" + bytes((i * 7 + j) & 0xFF for j in range(150)))
            pb.usb.feed(b"line of junk %d\n" % i if i % 3 else b"x" * 700)
            p.step()
            pb.han.take_output()
            pb.usb.take_output()
            pb.advance_ms(400)
    feed(100)
    gc.collect()
    held = gc.mem_alloc()
    feed(1000)
    gc.collect()
    assert gc.mem_alloc() - held < 2048, (held, gc.mem_alloc())
    assert p.errors == 0


def test_ppmid_boards_import_anywhere_and_fail_only_on_construction():
    from boards import esp32, pico, virtual
    for mod in (esp32, pico, virtual):
        try:
            mod.PpmidBoard()
        except (ImportError, AttributeError):    # no `machine` (or, on the unix port, no UART)
            pass
        else:
            raise AssertionError("%s.PpmidBoard() made hardware off its port" % mod.__name__)
    b = PpmidBoard()
    for member in ("han", "usb", "display", "keys", "ticks_ms", "name"):
        assert hasattr(b, member), member


def test_the_display_draws_text_and_the_pound_sign_into_its_framebuffer():
    from boards.textdisplay import TextDisplay
    got = []
    d = TextDisplay(lambda text, buf: got.append((text, bytes(buf))))
    d.show(["Credit \u00a310.00", "Wrong code \u2013 3 tries left", "x" * 40])
    text, buf = got[-1]
    lines = text.split("\n")
    assert len(lines) == 8 and lines[0] == "Credit \u00a310.00" and lines[2] == "x" * 16
    if d.fb is None:
        return                                   # CPython: no framebuf, text only
    assert len(buf) == 1024 and any(buf)
    # the pound sign is column 7 of line 0: its 8 pixel columns are not blank
    assert any(buf[7 * 8 + c] for c in range(8))
    d.show([""])
    assert not any(got[-1][1])


class _Matrix:
    """A fake `machine` with a 4x4 keypad wired to its pins: a held key joins its row and
    column, so a column reads 0 while its row is driven low."""

    def __init__(self):
        self.held = set()          # (row, col)
        self.level = {}
        outer = self

        class Pin:
            OUT = 1
            IN = 0
            PULL_UP = 1

            def __init__(self, pin, mode=0, pull=None, value=None):
                self.pin = pin
                if value is not None:
                    outer.level[pin] = value

            def value(self, v=None):
                if v is not None:
                    outer.level[self.pin] = v
                    return None
                c = self.pin - 10                   # columns are pins 10-13, rows 0-3
                for r, cc in outer.held:
                    if cc == c and outer.level.get(r, 1) == 0:
                        return 0
                return 1
        self.Pin = Pin


def test_the_matrix_keypad_reports_a_key_once_after_its_debounce():
    from boards.keypad import DEBOUNCE_MS, MatrixKeypad
    m = _Matrix()
    now = [0]
    k = MatrixKeypad(m, (0, 1, 2, 3), (10, 11, 12, 13), ticks_ms=lambda: now[0])
    assert k.scan() == ""
    m.held.add((3, 2))                              # '#'
    assert k.scan() == ""                           # down, not yet for long enough
    now[0] += DEBOUNCE_MS
    assert k.scan() == "#"
    now[0] += 100
    assert k.scan() == ""                           # held: no repeat
    m.held.clear()
    k.scan()
    m.held.update({(0, 0), (1, 3)})                 # '1' and 'B' together
    k.scan()
    now[0] += DEBOUNCE_MS
    assert sorted(k.scan()) == ["1", "B"]
    m.held = {(0, 0)}
    now[0] += 5
    m.held.clear()                                  # a bounce shorter than the debounce
    k.scan()
    m.held.add((2, 1))
    k.scan()
    now[0] += 5
    m.held.clear()
    assert k.scan() == ""                           # '8' for 5 ms: not a press


def test_the_ssd1306_driver_initialises_and_writes_the_whole_framebuffer():
    from boards.ssd1306 import Ssd1306

    class I2C:
        def __init__(self):
            self.calls = []

        def writeto(self, addr, buf):
            self.calls.append(("cmd", addr, bytes(buf)))

        def writevto(self, addr, bufs):
            self.calls.append(("data", addr, b"".join(bytes(b) for b in bufs)))
    i2c = I2C()
    oled = Ssd1306(i2c)
    assert i2c.calls[0] == ("cmd", 0x3C, b"\x80\xae") and i2c.calls[-1] == ("cmd", 0x3C, b"\x80\xaf")
    assert ("cmd", 0x3C, b"\x80\x8d") in i2c.calls                 # the charge pump
    i2c.calls = []
    oled.write(bytearray(1024))
    kind, addr, data = i2c.calls[-1]
    assert kind == "data" and data[0] == 0x40 and len(data) == 1025
    assert [c[2][1] for c in i2c.calls[:-1]] == [0x21, 0, 127, 0x22, 0, 7]
