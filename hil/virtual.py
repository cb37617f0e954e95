"""The virtual board: the pinned MicroPython wasm build under Node.js, as a USB-serial board.

    with VirtualBoard("/tmp/vb") as board:
        print(board.repl_port, board.han_port)    # /dev/pts/N: mpremote / pyserial use them
        board.set_wan(False); board.add_pulses(10); board.cut_after(3)

Processes and channels:

- this launcher owns four pseudo-terminals (REPL, HAN, WAN and the HAN's second port `link`;
  slave sides in raw mode, held open for the board's lifetime, so their /dev/pts paths
  survive power cuts and restarts).  The HAN UART takes what either HAN port sends, frame by
  frame, and sends on both (a HAN several devices have joined): the rig's cable to a PPMID
  board uses `link_port` (hil/two_board.py) while tests talk to the meter on `han_port`;
- one Node process (hil/vboard/main.mjs, its own process group) gets the two pty masters; its
  stdin/stdout are the control channel (JSON lines); its stderr goes to <workdir>/node.log;
- inside it, the VM runs in a worker thread (hil/vboard/worker.mjs) fed from a
  SharedArrayBuffer, so the REPL stays responsive while firmware runs;
- files in <workdir>: ``fs/`` is the board's filesystem (what mpremote's ``fs`` commands see),
  ``flash.bin`` the raw flash partition (NOR semantics, see firmware/boards/virtual.py).

A PPMID (firmware/ppmid/ on this board: boards.virtual.PpmidBoard): the rig presses keys
(`press_keys`) and reads the display's text and framebuffer (`display`, `display_wait`); its
USB serial is the REPL pty.

Power cuts: `kill()` SIGKILLs the Node process at whatever instant it is (then `start()` again
on the same files); `cut_after(n)` lets n more flash erase/program operations complete and tears
the next (boards.nor.NorFlash.cut_after semantics), after which the board is off until
`power_on()`, which boots it as a power-on does.

The board clock (what the firmware's `board.time()` reads): host time, or frozen and moved by
the rig.  `clock_survives=True` (the default) is a board with a battery-backed RTC: the clock
runs through every power cut (a kill and start() included).  `clock_survives=False` is an
ESP32 without one: every power-on after a power-off, a flash cut or a kill restarts the clock
from 2000-01-01T00:00:00Z (`LOST_CLOCK`), from where it runs on (or stays frozen, if the rig
froze it); a reset (`hard_reset()`, machine.reset, a soft reset) keeps it, as an ESP32's RTC
survives a reset.  The firmware reads which it is from `board.clock_survives_power_loss`.

Run one by hand: ``python -m hil.virtual --workdir DIR`` prints the ports and runs until Ctrl-C.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tty
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VBOARD = Path(__file__).resolve().parent / "vboard"
NPM_PACKAGE = "@micropython/micropython-webassembly-pyscript"
BLOCK_SIZE = 4096
LOST_CLOCK = 946684800      # 2000-01-01T00:00:00Z: a clock without a battery after a power cut


class VirtualBoardError(RuntimeError):
    """The virtual board could not be started, or did not answer."""


def _package_entry():
    return REPO / "node_modules" / NPM_PACKAGE / "micropython.mjs"


def _find_node(node):
    found = shutil.which(node)
    if not found:
        raise VirtualBoardError(
            "Node.js not found (looked for %r on PATH): install Node.js 18 or later, "
            "or pass node=/path/to/node" % node)
    return found


def _cleanup(res):
    """Kill the Node process group and close the ptys (finalizer and atexit safe)."""
    proc = res.get("proc")
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    res["proc"] = None
    for key in ("fds",):
        for fd in res.get(key, ()):
            try:
                os.close(fd)
            except OSError:
                pass
        res[key] = []


class VirtualBoard:
    """A virtual meter board: REPL and HAN ptys, a flash file, rig controls."""

    def __init__(self, workdir, *, flash_blocks=16, wan=False, clock=None, freeze=False,
                 clock_survives=True, seed=0, node="node", timeout=10.0, heapsize=1024 * 1024):
        """workdir: folder for the board's files (created; reused across runs: the board's
        filesystem is <workdir>/fs, the flash partition <workdir>/flash.bin);
        flash_blocks: partition size in 4 KiB blocks for a new flash file (default 16 = 64 KiB);
        wan: initial WAN-status input; clock: initial board clock (Unix seconds; None = host
        time); freeze: start with the clock frozen there (the firmware's first read of it is
        exact); clock_survives: the clock runs through power cuts (a battery-backed RTC), or
        restarts from 2000-01-01 at every power-on (see the module docstring);
        seed: NorFlash seed for torn operations; node: the Node.js executable;
        timeout: seconds to wait for the board to answer; heapsize: initial VM heap."""
        self.workdir = Path(workdir)
        self.fs_dir = self.workdir / "fs"
        self.flash_path = self.workdir / "flash.bin"
        self.log_path = self.workdir / "node.log"
        self.flash_blocks = flash_blocks
        self.timeout = timeout
        self._node = node
        self._opts = {"wan": wan, "clock": clock, "freeze": bool(freeze), "seed": seed,
                      "heapsize": heapsize, "clock_survives": bool(clock_survives)}
        self._resume = None          # (clock, frozen, host time) when the Node process went
        self._res = {"proc": None, "fds": []}
        self._finalizer = weakref.finalize(self, _cleanup, self._res)
        self._ptys = None            # (repl, han, wan, link) × (master, slave)
        self.repl_port = None
        self.han_port = None
        self.wan_port = None
        self.link_port = None        # the HAN's second port: a cable to a PPMID (hil/two_board.py)
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._replies = {}
        self._events = []
        self._next_id = 0
        self._reader = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self):
        """Start Node and the VM; return once the board is up (boot.py has run and its REPL
        takes input; main.py, if any, is running).  Raises VirtualBoardError."""
        if self.running:
            raise VirtualBoardError("the virtual board is already running")
        node = _find_node(self._node)
        entry = _package_entry()
        if not entry.exists():
            raise VirtualBoardError(
                "the MicroPython VM is not installed (%s missing): run 'make setup'" % entry)
        self._prepare_files()
        if self._ptys is None:
            self._open_ptys()
        repl_master, _, han_master, _, wan_master, _, link_master, _ = self._ptys
        cmd = [node, str(VBOARD / "main.mjs"),
               "--repl-fd", str(repl_master), "--han-fd", str(han_master), "--wan-fd", str(wan_master),
               "--link-fd", str(link_master),
               "--fs", str(self.fs_dir), "--flash", str(self.flash_path), "--entry", str(entry),
               "--wan", "1" if self._opts["wan"] else "0", "--seed", str(self._opts["seed"]),
               "--heapsize", str(self._opts["heapsize"]),
               "--clock-survives", "1" if self._opts["clock_survives"] else "0"]
        clock, frozen = self._start_clock()
        if clock is not None:
            cmd += ["--clock", repr(float(clock))]
        if frozen:
            cmd += ["--frozen", "1"]
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log,
                                    pass_fds=(repl_master, han_master, wan_master, link_master),
                                    start_new_session=True)
        self._res["proc"] = proc
        with self._cv:
            self._events = []
            self._replies = {}
        self._reader = threading.Thread(target=self._read_loop, args=(proc,), daemon=True,
                                        name="vboard-control")
        self._reader.start()
        try:
            self.wait_event("ready")
        except VirtualBoardError:
            self._kill_proc()
            raise
        return self

    def _start_clock(self):
        # (clock, frozen) for a Node start.  The first start takes the options; a start after
        # kill() or stop() is a power-on: the clock ran on (or stayed frozen) through the cut,
        # or, on a board whose clock does not survive one, restarts from LOST_CLOCK.
        if self._resume is None:
            return self._opts["clock"], self._opts["freeze"]
        clock, frozen, at = self._resume
        if not self._opts["clock_survives"]:
            return LOST_CLOCK, frozen
        return (clock if frozen else clock + time.time() - at), frozen

    def _remember_clock(self):
        if not self.running:
            return
        try:
            st = self._request("status", timeout=2)
        except VirtualBoardError:
            return
        self._resume = (st["clock"], st["clock_frozen"], time.time())

    def stop(self):
        """Stop the board and release everything (process, ptys)."""
        self._remember_clock()
        proc = self._res.get("proc")
        if proc is not None and proc.poll() is None:
            try:
                self._request("quit", timeout=3)
            except VirtualBoardError:
                pass
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        self._kill_proc()
        _cleanup(self._res)
        self._ptys = None
        self.repl_port = self.han_port = self.wan_port = self.link_port = None

    def kill(self):
        """Power cut (a): SIGKILL the Node process now.  The ptys stay (start() again).  The
        board clock is read first (from the Node main thread: the VM does not notice), so that
        start() can run it on through the cut, or lose it, as `clock_survives` says."""
        self._remember_clock()
        self._kill_proc()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self):
        proc = self._res.get("proc")
        return proc is not None and proc.poll() is None

    @property
    def pid(self):
        proc = self._res.get("proc")
        return proc.pid if proc is not None else None

    # -- rig controls -----------------------------------------------------------------------
    def status(self):
        """powered, erases, programs, torn, cut_after, wan, relay, clock, clock_frozen,
        clock_survives, pulses_pending, buttons_pending, boots, ..."""
        return self._request("status")

    @property
    def powered(self):
        return self.running and self.status()["powered"]

    def counters(self):
        s = self.status()
        return {"erases": s["erases"], "programs": s["programs"], "torn": s["torn"]}

    @property
    def relay(self):
        """The relay as last set by the firmware: True (supply on), False, or None."""
        return self.status()["relay"]

    def set_wan(self, up):
        self._request("set_wan", up=bool(up))

    def press_button(self, n=1):
        self._request("press_button", n=int(n))

    def add_pulses(self, n):
        self._request("add_pulses", n=int(n))

    # -- a PPMID's keypad and display (boards.virtual.PpmidBoard) -----------------------------
    def press_keys(self, keys):
        """Press keypad keys ("0"-"9", "*", "#", "A"-"D"), in order."""
        self._request("press_keys", keys=str(keys))

    def keys_pending(self):
        """Keys pressed that the firmware has not taken yet."""
        return self._request("keys_pending")

    def display(self, pixels=False):
        """The display as the firmware last drew it: {"gen": n, "text": lines joined by
        newlines, "pixels": the 128x64 MONO_VLSB framebuffer as hex (pixels=True), or None}."""
        # The board reads the display between two of the firmware's writes; on a loaded
        # machine the firmware's thread can be paused mid-write for longer than that read
        # spins ("being written"): ask again for up to 2 s.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                return self._request("display", pixels=bool(pixels))
            except VirtualBoardError as e:
                if "being written" not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def display_wait(self, gen, timeout=1.0):
        """Wait until the display is redrawn after generation `gen` (or `timeout` s pass);
        return it as display() does."""
        return self._request("display_wait", timeout=timeout + 2, gen=int(gen), ms=int(timeout * 1000))

    def set_clock(self, t):
        """Set the meter clock to Unix time t (it runs on from there unless frozen)."""
        self._request("clock_set", t=float(t))

    def advance_clock(self, seconds):
        """Move the meter clock (and the board's ticks_ms) forward."""
        self._request("clock_advance", s=float(seconds))

    def freeze_clock(self, on=True):
        self._request("clock_freeze", on=bool(on))

    @property
    def clock_survives(self):
        return self._opts["clock_survives"]

    def set_clock_survives(self, on):
        """A battery-backed RTC (True) or none (False: the clock restarts from 2000-01-01 at
        each power-on).  The firmware reads it at its next start."""
        self._opts["clock_survives"] = bool(on)
        if self.running:
            self._request("clock_survives", on=bool(on))

    @property
    def clock(self):
        return self.status()["clock"]

    def cut_after(self, n):
        """Power cut (b): let n more flash erase/program operations complete, tear the next one
        (NorFlash.cut_after: n = 0 tears the very next), then the board is off.  None disarms."""
        self._request("cut_after", n=None if n is None else int(n))

    def set_seed(self, seed):
        """NorFlash seed for how a torn operation tears (takes effect at the next VM start)."""
        self._request("set_seed", seed=int(seed))

    def wait_power_off(self, timeout=None):
        """Wait until a flash cut has taken the power away."""
        self.wait_event("poweroff", timeout)

    def power_on(self, wait=True):
        """Power the board on again (after a flash cut or power_off): a fresh boot."""
        with self._cv:
            self._events = [e for e in self._events if e.get("event") != "ready"]
        self._request("power_on")
        if wait:
            self.wait_event("ready")

    def power_off(self):
        """Take the power away now, wherever the VM is (the flash keeps completed operations)."""
        self._request("power_off")

    def hard_reset(self, wait=True):
        """Press the reset button: a fresh boot, as at power-on."""
        with self._cv:
            self._events = [e for e in self._events if e.get("event") != "ready"]
        self._request("reset")
        if wait:
            self.wait_event("ready")

    def events(self):
        """Events seen so far (ready, poweroff, watchdog, crash), oldest first."""
        with self._cv:
            return list(self._events)

    def wait_event(self, name, timeout=None):
        """Wait for (and consume) the next event called `name`."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for i, e in enumerate(self._events):
                    if e.get("event") == name:
                        del self._events[i]
                        return e
                    if e.get("event") == "crash":
                        raise VirtualBoardError("the virtual board crashed: %s%s"
                                                % (e.get("error"), self._log_tail()))
                if not self.running:
                    raise VirtualBoardError("the virtual board's Node process exited (code %s)%s"
                                            % (self._res["proc"] and self._res["proc"].poll(),
                                               self._log_tail()))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VirtualBoardError("the virtual board did not answer within %.1f s "
                                            "(waiting for %r)%s" % (timeout, name, self._log_tail()))
                self._cv.wait(min(left, 0.2))

    # -- internals --------------------------------------------------------------------------
    def _prepare_files(self):
        self.fs_dir.mkdir(parents=True, exist_ok=True)
        size = self.flash_blocks * BLOCK_SIZE
        if not self.flash_path.exists():
            tmp = self.flash_path.with_suffix(".tmp")
            tmp.write_bytes(b"\xff" * size)
            os.replace(tmp, self.flash_path)
        else:
            have = self.flash_path.stat().st_size
            if have == 0 or have % BLOCK_SIZE:
                raise VirtualBoardError("%s is %d bytes, not a whole number of %d-byte blocks"
                                        % (self.flash_path, have, BLOCK_SIZE))

    def _open_ptys(self):
        fds = []
        try:
            for _ in range(4):
                master, slave = os.openpty()
                fds += [master, slave]
                tty.setraw(slave)       # no echo, no line discipline: bytes as a UART has them
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        os.set_blocking(fds[2], False)  # the HAN master: non-blocking reads in the VM
        os.set_blocking(fds[4], False)  # the WAN master, likewise
        os.set_blocking(fds[6], False)  # the HAN's second port (link), likewise
        self._ptys = tuple(fds)
        self._res["fds"] = list(fds)
        self.repl_port = os.ttyname(fds[1])
        self.han_port = os.ttyname(fds[3])
        self.wan_port = os.ttyname(fds[5])
        self.link_port = os.ttyname(fds[7])

    def _kill_proc(self):
        proc = self._res.get("proc")
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2)
        self._res["proc"] = None

    def _read_loop(self, proc):
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cv:
                if "id" in msg:
                    self._replies[msg["id"]] = msg
                else:
                    self._events.append(msg)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def _request(self, op, timeout=None, **args):
        proc = self._res.get("proc")
        if proc is None or proc.poll() is not None:
            raise VirtualBoardError("the virtual board is not running (start() it)")
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            try:
                proc.stdin.write((json.dumps(dict(args, id=rid, op=op)) + "\n").encode())
                proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                raise VirtualBoardError("the virtual board's Node process is gone" + self._log_tail())
        deadline = time.monotonic() + timeout
        with self._cv:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    raise VirtualBoardError("no answer to %r from the virtual board%s"
                                            % (op, self._log_tail()))
                self._cv.wait(min(left, 0.2))
            reply = self._replies.pop(rid)
        if not reply.get("ok"):
            raise VirtualBoardError("%s: %s" % (op, reply.get("error")))
        return reply.get("result")

    def _log_tail(self, n=15):
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return ("\n--- %s (last lines) ---\n" % self.log_path + "\n".join(lines)) if lines else ""


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hil.virtual",
                                 description="Run a virtual meter board until Ctrl-C.")
    ap.add_argument("--workdir", required=True, help="folder for the board's fs/ and flash.bin")
    ap.add_argument("--blocks", type=int, default=16, help="flash blocks of 4 KiB for a new flash file")
    ap.add_argument("--wan", action="store_true", help="start with the WAN up")
    ap.add_argument("--no-rtc", action="store_true",
                    help="the clock restarts from 2000-01-01 at every power-on (no battery-backed RTC)")
    ap.add_argument("--node", default="node", help="Node.js executable")
    a = ap.parse_args(argv)
    board = VirtualBoard(a.workdir, flash_blocks=a.blocks, wan=a.wan, node=a.node,
                         clock_survives=not a.no_rtc)
    try:
        board.start()
    except VirtualBoardError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    print("REPL  %s" % board.repl_port)
    print("HAN   %s" % board.han_port)
    print("WAN   %s" % board.wan_port)
    print("LINK  %s  (the HAN's second port)" % board.link_port)
    print("flash %s" % board.flash_path)
    print("fs    %s" % board.fs_dir)
    print("e.g.  mpremote connect %s exec \"print(1)\"" % board.repl_port, flush=True)
    def _stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, _stop)       # also when started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    try:
        while board.running:
            time.sleep(0.5)
        print("error: the virtual board stopped%s" % board._log_tail(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        board.stop()


if __name__ == "__main__":
    sys.exit(main())
