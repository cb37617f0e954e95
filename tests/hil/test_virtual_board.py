# The virtual board (hil/virtual.py) as a USB-serial board: mpremote and pyserial on its REPL
# pty, the HAN pty, the NOR flash file, rig controls, both kinds of power cut, clean shutdown.
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

serial = pytest.importorskip("serial")
pytest.importorskip("mpremote")
from mpremote.transport_serial import SerialTransport  # noqa: E402

from hil import virtual  # noqa: E402
from hil.virtual import VirtualBoard, VirtualBoardError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

if not shutil.which("node") or not virtual._package_entry().exists():
    pytest.skip("Node.js or the MicroPython npm package is missing (make setup)",
                allow_module_level=True)


# --- helpers ---------------------------------------------------------------------------------
def workdir(tmp_path, name="vb"):
    """A board folder with firmware/boards/ in /lib/boards (what the rig's tests import)."""
    wd = tmp_path / name
    shutil.copytree(REPO / "firmware" / "boards", wd / "fs" / "lib" / "boards",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return wd


@pytest.fixture
def board(tmp_path):
    b = VirtualBoard(workdir(tmp_path))
    b.start()
    yield b
    b.stop()


def mpremote(port, *args, timeout=30):
    """The real mpremote CLI; returns stdout (raises on a non-zero exit)."""
    r = subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise AssertionError("mpremote %s failed (%d): %s%s" % (args, r.returncode, r.stdout, r.stderr))
    return r.stdout


class Raw:
    """mpremote's Python API on the REPL port (raw REPL, no soft reset)."""

    def __init__(self, port):
        self.t = SerialTransport(port)
        self.t.enter_raw_repl(soft_reset=False)

    def __call__(self, code):
        return self.t.exec(textwrap.dedent(code)).decode()

    def start(self, code):
        self.t.exec_raw_no_follow(textwrap.dedent(code))

    def close(self):
        try:
            self.t.exit_raw_repl()
        finally:
            self.t.close()


def read_until(ser, ending, timeout=15.0):     # a deadline: returns at `ending`
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(ending) and time.monotonic() < deadline:
        data += ser.read(ser.in_waiting or 1)
    return data


def interrupt_to_prompt(port, timeout=15.0):
    """Ctrl-C a running program from pyserial; return (output, seconds).  The timeout is only
    a deadline (a VM that has just been reset may still be loading on a busy machine)."""
    with serial.Serial(port, timeout=0.05) as s:
        t = time.monotonic()
        s.write(b"\x03")
        out = read_until(s, b">>> ", timeout)
        return out, time.monotonic() - t


# --- mpremote: exec, run, fs ----------------------------------------------------------------
def test_mpremote_exec_run_and_fs_round_trip(board, tmp_path):
    p = board.repl_port
    assert p.startswith("/dev/pts/") and os.path.realpath(p) == p
    assert mpremote(p, "exec", "print(1)").strip() == "1"
    assert mpremote(p, "exec", "import sys; print(sys.platform)").strip() == "webassembly"
    script = tmp_path / "s.py"
    script.write_text("x = 6 * 7\nprint('run', x)\n")
    assert mpremote(p, "run", str(script)).strip() == "run 42"
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(5000))
    mpremote(p, "fs", "mkdir", "d", "+", "fs", "cp", str(blob), ":d/blob.bin")
    assert (board.fs_dir / "d" / "blob.bin").read_bytes() == blob.read_bytes()   # the host folder
    ls = mpremote(p, "fs", "ls", "d")
    assert "5000 blob.bin" in ls                                                  # sizes: 4-tuples
    back = tmp_path / "back.bin"
    mpremote(p, "fs", "cp", ":d/blob.bin", str(back))
    assert back.read_bytes() == blob.read_bytes()
    (tmp_path / "t.txt").write_text("hello board\n")
    mpremote(p, "fs", "cp", str(tmp_path / "t.txt"), ":t.txt")
    assert mpremote(p, "fs", "cat", "t.txt") == "hello board\n"
    mpremote(p, "fs", "rm", "d/blob.bin", "+", "fs", "rmdir", "d")
    assert not (board.fs_dir / "d").exists()
    r = subprocess.run([sys.executable, "-m", "mpremote", "connect", p, "fs", "cat", "nope.txt"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "No such file" in r.stdout + r.stderr              # errno 2, not 44
    out = mpremote(p, "exec", "import os\ntry:\n os.stat('nope')\nexcept OSError as e:\n print(e.errno)")
    assert out.strip() == "2"


def test_files_persist_across_stop_and_start(tmp_path):
    wd = tmp_path / "vb"
    with VirtualBoard(wd) as b:
        mpremote(b.repl_port, "exec", "f = open('keep.txt', 'w'); f.write('kept'); f.close()")
        first_port = b.repl_port
    assert (wd / "fs" / "keep.txt").read_text() == "kept"
    with VirtualBoard(wd) as b:
        assert mpremote(b.repl_port, "exec", "print(open('keep.txt').read())").strip() == "kept"
    assert first_port


# --- resets and Ctrl-C -----------------------------------------------------------------------
BOOT_PY = "import machine\nBOOT_CAUSE = machine.reset_cause()\n"
MAIN_PY = "import time\nMAIN_RAN = True\nwhile True:\n    time.sleep_ms(5)\n"


def test_soft_and_hard_reset_run_boot_and_main(tmp_path):
    wd = tmp_path / "vb"
    (wd / "fs").mkdir(parents=True)
    (wd / "fs" / "boot.py").write_text(BOOT_PY)
    (wd / "fs" / "main.py").write_text(MAIN_PY)
    with VirtualBoard(wd) as b:
        # power-on: boot.py then main.py, which loops calling time.sleep_ms; Ctrl-C stops it
        out, secs = interrupt_to_prompt(b.repl_port)
        assert b"KeyboardInterrupt" in out and b'main.py", line 4' in out
        assert secs < 0.5, "Ctrl-C in a sleeping loop took %.2f s" % secs
        boots = b.status()["boots"]
        with serial.Serial(b.repl_port, timeout=0.05) as s:
            s.write(b"print(MAIN_RAN, BOOT_CAUSE)\r")
            assert b"True 1" in read_until(s, b">>> ")
            s.write(b"\x04")                                   # soft reset in the friendly REPL
            assert b"MPY: soft reboot" in read_until(s, b"soft reboot\r\n")
        out, _ = interrupt_to_prompt(b.repl_port)              # main.py ran again
        assert b"KeyboardInterrupt" in out
        with serial.Serial(b.repl_port, timeout=0.05) as s:
            s.write(b"print(MAIN_RAN, BOOT_CAUSE)\r")
            assert b"True 5" in read_until(s, b">>> ")          # SOFT_RESET
        # mpremote's soft reset (raw REPL): boot.py runs, main.py does not, as on a board
        assert mpremote(b.repl_port, "exec", "print('MAIN_RAN' in globals(), BOOT_CAUSE)").strip() == "False 5"
        # hard reset through machine.reset(), as `mpremote reset` does it: it soft-resets on
        # connecting, then sleeps 100 ms and resets.  A Ctrl-C before that reset would stop it,
        # so wait for the second VM start rather than a fixed time a busy machine may exceed.
        n = b.status()["boots"]
        mpremote(b.repl_port, "reset")
        deadline = time.monotonic() + 30
        while b.status()["boots"] < n + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        out, _ = interrupt_to_prompt(b.repl_port)
        assert b"KeyboardInterrupt" in out
        with serial.Serial(b.repl_port, timeout=0.05) as s:
            s.write(b"print(MAIN_RAN, BOOT_CAUSE)\r")
            assert b"True 2" in read_until(s, b">>> ")          # HARD_RESET
        assert b.status()["boots"] >= boots + 3


RESTARTED = b"the VM was restarted"     # in the watchdog's KeyboardInterrupt (worker.mjs)


def test_ctrl_c_interrupts_loops(board):
    # The timeouts are deadlines, not expectations: on a loaded machine a VM restart (the wasm
    # loaded again) can take seconds.  What each case proves is in the asserts.
    raw = Raw(board.repl_port)
    try:
        # a loop that calls into JS (the board, the clock): a KeyboardInterrupt in that VM, no
        # watchdog restart, promptly (some 10 ms; the bound leaves room for a loaded machine)
        raw.start("from boards.virtual import Board\nimport time\nwhile True:\n    time.ticks_ms()")
        time.sleep(0.2)
        t = time.monotonic()
        raw.t.serial.write(b"\x03")
        out, err = raw.t.follow(timeout=30)
        took = time.monotonic() - t
        assert b"KeyboardInterrupt" in err and RESTARTED not in err, err
        assert took < 2, took
        assert not any(e.get("event") == "watchdog" for e in board.events())
        # a pure loop never calls out: the watchdog restarts the VM once it has seen it busy
        # for a whole period (1 s) without taking the Ctrl-C, whenever the Ctrl-C came; the
        # REPL answers afterwards
        raw.start("while True:\n    pass")
        time.sleep(0.2)
        t = time.monotonic()
        raw.t.serial.write(b"\x03")
        out, err = raw.t.follow(timeout=30)
        took = time.monotonic() - t
        assert b"KeyboardInterrupt" in err and RESTARTED in err, err
        assert 0.9 < took < 30, took               # the watchdog waited its period
        assert raw("print(6 * 7)").strip() == "42"
    finally:
        raw.close()
    board.wait_event("watchdog", timeout=10)       # the control channel may lag the pty


# --- HAN -------------------------------------------------------------------------------------
def test_han_pty_echoes_frames_through_a_program_on_the_board(board):
    raw = Raw(board.repl_port)
    han = serial.Serial(board.han_port, timeout=10)     # a deadline, for a loaded machine
    try:
        raw.start("""
            from boards.virtual import Uart
            import _vboard, time
            h = Uart(_vboard.han_read, _vboard.han_write)
            while True:
                d = h.read(64)
                if d:
                    h.write(d)
                else:
                    time.sleep_ms(1)
            """)
        han.write(b"\x00")                     # the program runs (a loaded machine starts it late):
        assert han.read(1) == b"\x00"          # the timing below is the echo's alone
        frames = [bytes([i % 256]) * (1 + i * 7) + b"\x00" for i in range(20)]
        t = time.monotonic()
        for f in frames:
            han.write(f)
            assert han.read(len(f)) == f
        per_frame = (time.monotonic() - t) / len(frames)
        assert per_frame < 0.1, per_frame
        raw.t.serial.write(b"\x03")
        raw.t.follow(timeout=5)
    finally:
        han.close()
        raw.close()


def test_wan_link_is_a_third_pty_the_firmware_reaches_as_board_wan(board):
    raw = Raw(board.repl_port)
    wan = serial.Serial(board.wan_port, timeout=10)     # a deadline, for a loaded machine
    try:
        assert board.wan_port not in (board.han_port, board.repl_port)
        raw.start("""
            import boards, time
            b = boards.load().Board()
            while True:
                d = b.wan.read(64)
                if d:
                    b.wan.write(bytes(reversed(d)))
                else:
                    time.sleep_ms(1)
            """)
        time.sleep(0.2)
        wan.write(b"uplink\x00")
        assert wan.read(7) == b"\x00knilpu"
        raw.t.serial.write(b"\x03")
        raw.t.follow(timeout=5)
    finally:
        wan.close()
        raw.close()


# --- flash -----------------------------------------------------------------------------------
FLASH_PROBE = """
    from boards.virtual import Board
    b = Board()
    f = b.flash
    buf = bytearray(8)
    f.readblocks(1, buf, 0)
    print(bytes(buf).hex(), f.ioctl(4, 0), f.ioctl(5, 0))
    """


def test_flash_file_has_nor_semantics_and_survives_kill(tmp_path):
    wd = workdir(tmp_path)
    b = VirtualBoard(wd)
    b.start()
    try:
        raw = Raw(b.repl_port)
        out = raw("""
            from boards.virtual import Board
            f = Board().flash
            f.ioctl(6, 1)
            f.writeblocks(1, b'\\x0f\\xf0\\xaa\\x55', 0)
            f.writeblocks(1, b'\\xff\\x0f\\x0f\\xff', 0)     # programs only: old AND new
            buf = bytearray(4)
            f.readblocks(1, buf, 0)
            print(bytes(buf).hex())
            """)
        raw.close()
        assert out.strip() == "0f000a55"
        img = (wd / "flash.bin").read_bytes()
        assert img[4096:4100] == bytes.fromhex("0f000a55") and img[4100:8192] == b"\xff" * 4092
        assert len(img) == 16 * 4096
        s = b.status()
        assert (s["erases"], s["programs"]) == (1, 2)
        b.kill()                                      # power cut (a): SIGKILL
        assert not b.running
        assert (wd / "flash.bin").read_bytes() == img
        b.start()
        raw = Raw(b.repl_port)
        out = raw(FLASH_PROBE)
        raw.close()
        assert out.split() == ["0f000a55ffffffff", "16", "4096"]
    finally:
        b.stop()


def test_cut_after_tears_exactly_that_operation_and_the_board_is_off(tmp_path):
    wd = workdir(tmp_path)
    with VirtualBoard(wd) as b:
        raw = Raw(b.repl_port)
        raw("""
            from boards.virtual import Board
            f = Board().flash
            f.ioctl(6, 2)
            """)
        base = b.counters()
        b.cut_after(2)           # 2 more operations complete, the third is torn
        raw.start("""
            f.writeblocks(2, b'\\x00' * 256, 0)      # op 0: page 0
            f.writeblocks(2, b'\\x00' * 256, 256)    # op 1: page 1
            f.writeblocks(2, b'\\x00' * 256, 512)    # op 2: page 2, torn: power is lost here
            print('still running')
            """)
        b.wait_power_off(15)
        s = b.status()
        assert not s["powered"] and s["programs"] - base["programs"] == 3 and s["torn"] == 1
        assert s["cut_after"] is None
        img = (wd / "flash.bin").read_bytes()
        blk = img[2 * 4096:3 * 4096]
        assert blk[:512] == b"\x00" * 512                       # the two whole programs
        assert blk[768:] == b"\xff" * (4096 - 768)              # nothing after the torn page
        torn = blk[512:768]
        k = len(torn) - len(torn.lstrip(b"\x00"))              # a prefix programmed, one byte
        assert torn[k + 1:] == b"\xff" * len(torn[k + 1:])      # partly, the rest untouched
        # the board is off: the REPL does not answer, the program did not go on
        ser = raw.t.serial
        ser.reset_input_buffer()
        ser.write(b"\r\x03\r\x01")
        time.sleep(0.3)
        assert ser.in_waiting == 0
        raw.t.close()
        b.power_on()
        assert b.status()["powered"]
        raw = Raw(b.repl_port)
        out = raw("""
            from boards.virtual import Board
            buf = bytearray(256)
            Board().flash.readblocks(2, buf, 512)
            print(bytes(buf).hex())
            """)
        raw.close()
        assert bytes.fromhex(out.strip()) == torn               # the VM sees the torn page as is


# --- rig controls ----------------------------------------------------------------------------
def test_controls_reach_the_firmware_through_boards_virtual(board):
    board.set_wan(True)
    board.press_button(3)
    board.add_pulses(7)
    board.freeze_clock(True)
    board.set_clock(1767225600)
    board.advance_clock(90)
    raw = Raw(board.repl_port)
    try:
        out = raw("""
            import boards
            b = boards.load().Board()
            t0 = b.ticks_ms()
            print(b.name, b.wan_up(), b.button_presses(), b.button_presses(), b.pulses(), b.time())
            b.set_relay(True)
            print(len(b.random(16)), b.ticks_ms() >= t0)
            import machine
            print(machine.RTC().datetime()[:3])
            """).split()
        assert out[:6] == ["virtual", "True", "3", "0", "7", str(1767225600 + 90)]
        assert out[6:8] == ["16", "True"]
        assert board.relay is True
        board.set_wan(False)
        assert raw("import boards\nprint(boards.load().Board().wan_up())").strip() == "False"
    finally:
        raw.close()
    assert board.clock == 1767225690


def test_clock_without_a_battery_restarts_at_power_on_and_survives_resets(tmp_path):
    """clock_survives=False: every power-on after a power-off, a flash cut or a kill restarts
    the board clock from 2000-01-01 (an ESP32 without a battery-backed RTC); a reset keeps it;
    the firmware sees which it is in board.clock_survives_power_loss.  With a battery
    (clock_survives=True) the clock runs through all of them."""
    def board_time(b):
        raw = Raw(b.repl_port)
        try:
            out = raw("import boards\nb = boards.load().Board()\n"
                      "print(b.time(), b.clock_survives_power_loss)").split()
        finally:
            raw.close()
        return int(out[0]), out[1] == "True"

    t0 = 1767225600
    b = VirtualBoard(workdir(tmp_path), clock=t0, freeze=True, clock_survives=False)
    try:
        b.start()
        assert b.status()["clock_frozen"] is True
        assert board_time(b) == (t0, False)            # frozen from the very first read
        b.advance_clock(30)
        b.hard_reset()                                  # the reset button: the RTC keeps its time
        assert board_time(b) == (t0 + 30, False)
        b.power_off()
        b.power_on()                                    # a power-on: back to 2000, still frozen
        assert board_time(b) == (virtual.LOST_CLOCK, False)
        b.advance_clock(5)                              # and it runs on (here: the rig moves it)
        assert b.clock == virtual.LOST_CLOCK + 5
        b.set_clock(t0)
        b.cut_after(0)                                  # a flash cut, then power-on
        raw = Raw(b.repl_port)
        try:
            raw.start("import boards\nb = boards.load().Board()\nb.flash.ioctl(6, 0)\n")
            b.wait_power_off()
        finally:
            raw.t.close()
        b.power_on()
        assert b.clock == virtual.LOST_CLOCK
        b.set_clock(t0)
        b.kill()                                        # SIGKILL: a cut at any instant
        b.start()
        assert board_time(b) == (virtual.LOST_CLOCK, False) and b.status()["clock_frozen"]
        b.set_clock_survives(True)                      # fit a battery: the firmware sees it
        b.set_clock(t0)
        b.power_off()
        b.power_on()
        assert board_time(b) == (t0, True)
        b.kill()
        b.start()
        assert board_time(b) == (t0, True)
    finally:
        b.stop()


def test_the_firmware_runs_on_the_virtual_board(tmp_path):
    """The same files as on an ESP32: boot.py, main.py, /lib/{meter,boards,protocol}; main.py
    picks boards.virtual by sys.platform and runs the meter app; the HAN answers."""
    from protocol import han
    wd = tmp_path / "vb"
    fsd = wd / "fs"
    (fsd / "lib").mkdir(parents=True)
    shutil.copy(REPO / "firmware" / "boot.py", fsd)
    shutil.copy(REPO / "firmware" / "main.py", fsd)
    for src, name in ((REPO / "firmware" / "meter", "meter"), (REPO / "firmware" / "boards", "boards"),
                      (REPO / "protocol", "protocol")):
        shutil.copytree(src, fsd / "lib" / name, ignore=shutil.ignore_patterns("__pycache__", "vectors"))
    with VirtualBoard(wd) as b:
        deadline = time.monotonic() + 30                         # a loaded machine boots slowly
        while b.relay is None and time.monotonic() < deadline:   # Meter() sets the relay
            time.sleep(0.05)
        assert b.relay is False                                  # unprovisioned: no supply
        with serial.Serial(b.han_port, timeout=10) as h:
            d = han.Deframer()
            h.write(han.encode_message(han.STATUS, 7, {}))
            bodies = []
            while not bodies:
                chunk = h.read(h.in_waiting or 1)
                assert chunk, "no HAN reply"
                bodies = d.feed(chunk)
            msg_type, msg_id, _ = han.decode_message(bodies[0])
            assert msg_id == 7 and msg_type in (han.STATUS | han.RESPONSE, han.ERROR)
        out, _ = interrupt_to_prompt(b.repl_port)
        assert b"KeyboardInterrupt" in out and b"meter/" in out


# --- bad input and clean-up ------------------------------------------------------------------
def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(VirtualBoardError, match="Node.js not found"):
        VirtualBoard(tmp_path / "a", node="no-such-node-binary").start()
    monkeypatch.setattr(virtual, "_package_entry", lambda: tmp_path / "missing" / "micropython.mjs")
    with pytest.raises(VirtualBoardError, match="make setup"):
        VirtualBoard(tmp_path / "b").start()
    monkeypatch.undo()
    wd = tmp_path / "c"
    (wd / "fs").mkdir(parents=True)
    (wd / "fs" / "boot.py").write_text("while True:\n    pass\n")   # never gets to the REPL
    b = VirtualBoard(wd, timeout=1.5)
    with pytest.raises(VirtualBoardError, match="did not answer"):
        b.start()
    assert not b.running
    b.stop()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "flash.bin").write_bytes(b"\xff" * 100)
    with pytest.raises(VirtualBoardError, match="whole number"):
        VirtualBoard(tmp_path / "d").start()


def _gone(path, timeout=5.0):
    # The kernel frees a pty's /dev/pts entry from a work queue after the last close, so
    # under load it can outlive its processes for a moment.
    deadline = time.monotonic() + timeout
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is dead
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_no_stray_processes_or_ptys(tmp_path):
    b = VirtualBoard(tmp_path / "vb")
    b.start()
    pid, port = b.pid, b.repl_port
    b.kill()
    assert not _alive(pid)
    assert os.path.exists(port)          # a power cut keeps the ports (the USB adapter stays)
    b.start()
    pid2 = b.pid
    b.stop()
    assert not _alive(pid2) and _gone(port)
    # the launcher itself killed: Node sees its control channel close and exits
    code = ("import sys; sys.path.insert(0, %r)\nfrom hil.virtual import VirtualBoard\n"
            "b = VirtualBoard(%r); b.start(); print(b.pid, b.repl_port, flush=True)\n"
            "import time; time.sleep(60)\n" % (str(REPO), str(tmp_path / "vb2")))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        node_pid, port = p.stdout.readline().split()
        node_pid = int(node_pid)
        assert _alive(node_pid)
        p.send_signal(signal.SIGKILL)
        p.wait(5)
        deadline = time.monotonic() + 5
        while _alive(node_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(node_pid)
        assert _gone(port)
    finally:
        if p.poll() is None:
            p.kill()
