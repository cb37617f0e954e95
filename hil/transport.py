"""Board transports: one interface for the tests, whatever stands behind it.

    t = VirtualTransport(workdir)              # the virtual board (hil/virtual.py)
    t = SerialTransport("/dev/ttyUSB0", han_port="/dev/ttyUSB1", rig=load_rig("rig.json"))
    t.start(); t.flash(); t.provision(device, [issuer_key], limits, initial_credit=1000)
    with t.han() as han: han.status()
    t.require("power_cut")                     # raises Unsupported (a test skips) if the bench lacks it

Both give:

- ``repl_port``, ``han_port``; ``han(timeout)`` a new :class:`hil.han_client.HanClient`;
- ``flash()``, ``provision(...)`` (the engineer's path, hil/flashing.py);
- rig controls ``set_wan(up)``, ``press_button(n)``, ``add_pulses(n)``, ``advance_clock(s)``,
  ``power_cut_kill()`` (power away at whatever instant it is, then back on), ``power_cut_after(n,
  during)`` (a deterministic cut at the n-th flash erase/program, then back on), ``reboot()``,
  ``power_off()`` / ``power_on()``, ``edit_flash(edit)`` (change the flash image with the power
  off: bit flips), ``relay()`` (the supply relay if the bench can see it, else None);
- ``capabilities``: the controls this bench has.  A control the bench lacks raises
  :class:`Unsupported` with the reason, which the pytest plugin turns into a skip;
- ``clock_survives``: whether the board's clock runs through a power cut (a battery-backed
  RTC); the virtual board can be either (``set_clock_survives``), a bench board is what its
  rig file says (``"rtc": true``).

Every method that powers the board (start, power cuts, reboot, provision) returns only once
the meter answers on its HAN, so a test never has to wait for a boot itself.

Two clocks: ``clock()`` is the rig's time (the supplier's: vouchers are issued at it), which
the rig moves with ``advance_clock``; ``board_clock()`` is what the board's own clock reads.
On the virtual board both are frozen so that the standing charge is exact, and they are the
same unless the board clock was lost in a power cut (it then restarts from 2000-01-01 and
moves on with the rig's).  A real board's clock runs, so the rig provisions a real board with
a standing charge too small to accrue within a test (see hil/pytest_plugin.py).
"""
import json
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path

from hil.han_client import HanClient, HanError, HanTimeout

# The controls a bench may have.  Tests ask for them by these names.
POWER_CUT = "power_cut"        # cut the supply at any instant and restore it
FLASH_CUT = "flash_cut"        # cut after exactly n flash erase/program operations
WAN = "wan"                    # drive the WAN-status input
BUTTON = "button"              # press the customer button
PULSES = "pulses"              # inject n energy pulses (1 Wh each)
CLOCK = "clock"                # freeze and move the meter clock
RELAY = "relay"                # observe the supply relay
REBOOT = "reboot"              # restart the firmware (reset line, or soft reset over the REPL)
FLASH_EDIT = "flash_edit"      # change the flash image with the power off (bit flips)
ALL = frozenset((POWER_CUT, FLASH_CUT, WAN, BUTTON, PULSES, CLOCK, RELAY, REBOOT, FLASH_EDIT))

_WHY = {
    POWER_CUT: "cutting the board's power (rig file: \"power\": {\"off\": [...], \"on\": [...]})",
    FLASH_CUT: "a deterministic power cut at the n-th flash write (the virtual board only)",
    WAN: "driving the WAN-status input (rig file: \"wan\": {\"up\": [...], \"down\": [...]})",
    BUTTON: "pressing the customer button (rig file: \"button\": [...])",
    PULSES: "injecting energy pulses (rig file: \"pulses\": [... \"{n}\" ...])",
    CLOCK: "setting the meter clock (the virtual board only)",
    RELAY: "observing the supply relay (rig file: \"relay\": [...] printing on/off)",
    REBOOT: "rebooting the board",
    FLASH_EDIT: "editing the flash image with the power off (the virtual board only)",
    "rtc": "a clock that runs through power cuts (a battery-backed RTC such as a DS3231; "
           "rig file: \"rtc\": true)",
    "no_rtc": "a clock that is lost in a power cut (its rig file says \"rtc\": true)",
}


class TransportError(RuntimeError):
    """The board or the bench did not do what was asked (not started, no answer, rig command failed)."""


class Unsupported(TransportError):
    """This bench lacks a control a test needs; str() says which and how to add it."""

    def __init__(self, capability, bench):
        self.capability = capability
        super().__init__("%s cannot do this: needs %s" % (bench, _WHY.get(capability, capability)))


class CutResult:
    """What `power_cut_after` saw: did the power go, and what `during` returned or raised."""

    def __init__(self, cut, result=None, error=None):
        self.cut = cut
        self.result = result
        self.error = error

    def __repr__(self):
        return "CutResult(cut=%r, result=%r, error=%r)" % (self.cut, self.result, self.error)


class _Cancelled(Exception):
    pass


class _CancellableStream:
    """A HAN stream whose reads stop at once when the power goes (so a request in flight
    does not sit out its whole timeout)."""

    def __init__(self, stream):
        self.stream = stream
        self.cancelled = threading.Event()

    def read(self, n):
        if self.cancelled.is_set():
            raise _Cancelled("the board lost power")
        return self.stream.read(n)

    def write(self, data):
        if self.cancelled.is_set():
            raise _Cancelled("the board lost power")
        return self.stream.write(data)

    def close(self):
        self.stream.close()


def _stray_id():
    import random
    return random.randint(0xC000, 0xFF00)


class _InFlight:
    """`during(han)` on a thread, with a HAN client that gives up as soon as the power goes."""

    def __init__(self, port, during, timeout):
        import serial
        self.result = None
        self.error = None
        self.done = threading.Event()
        self.stream = _CancellableStream(serial.serial_for_url(port, timeout=0.02))
        client = HanClient(self.stream, timeout=timeout)
        client._next_id = _stray_id()

        def run():
            try:
                self.result = during(client)
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                self.error = e
            finally:
                self.done.set()
        threading.Thread(target=run, daemon=True, name="han-in-flight").start()

    def cancel(self, timeout=10.0):
        self.stream.cancelled.set()
        self.done.wait(timeout)
        try:
            self.stream.close()
        except Exception:  # noqa: BLE001
            pass
        if isinstance(self.error, _Cancelled):
            self.error = None


class Transport:
    """The interface every board under test offers (see the module docstring)."""

    kind = "?"
    capabilities = frozenset()
    boot_timeout = 15.0
    clock_survives = False

    def __init__(self):
        self.repl_port = None
        self.han_port = None

    # -- capabilities ---------------------------------------------------------------------
    def has(self, *caps):
        return all(c in self.capabilities for c in caps)

    def require(self, *caps):
        for c in caps:
            if c not in self.capabilities:
                raise Unsupported(c, self.describe())

    def describe(self):
        return "this %s bench" % self.kind

    # -- lifecycle (subclasses) -----------------------------------------------------------
    def start(self):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the engineer's path ---------------------------------------------------------------
    def flash(self, **kw):
        """Put the meter firmware on the board (hil.flashing.flash); return its summary once
        the firmware answers on the HAN (provisioned or not)."""
        from hil.flashing import flash
        summary = flash(self.repl_port, **kw)
        if kw.get("reset", True):
            self.wait_meter()
        return summary

    def provision(self, device, issuer_keys, limits=None, initial_credit=0, factory_reset=True,
                  now=None, floor=0, first_index=0, before_reset=None):
        """Provision the board (hil.flashing.provision: the meter clock `now`, the supplier's
        sequence `floor` and `first_index`, a factory reset first); return the meter's key
        (a host.registry.MeterKey: public key, first receipt index, sequence floor) once the
        meter answers on the HAN with the new identity."""
        from hil.flashing import provision
        key = provision(self.repl_port, bytes(device), list(issuer_keys), limits, initial_credit,
                        factory_reset, now=now, floor=floor, first_index=first_index,
                        before_reset=before_reset)
        self.wait_meter(device=bytes(device))
        return key

    # -- HAN --------------------------------------------------------------------------------
    def han(self, timeout=5.0):
        """A new HAN client on the board's HAN port (close it, or use it in `with`)."""
        return HanClient.open(self.han_port, timeout=timeout)

    def wait_meter(self, timeout=None, device=None):
        """Wait until the meter answers a HAN status (and, given `device`, is that device);
        return the status."""
        timeout = self.boot_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                with self.han(timeout=0.5) as h:
                    h._next_id = _stray_id()    # a late answer must not match anyone's next id
                    st = h.status()
                if device is None or st["device"] == device:
                    return st
                last = "it is device %r" % (st["device"],)
            except (HanTimeout, HanError, OSError) as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise TransportError("the meter did not answer on %s within %.0f s (%s)"
                                     % (self.han_port, timeout, last))
            time.sleep(0.05)

    # -- rig controls (subclasses) -----------------------------------------------------------
    def set_wan(self, up):
        self.require(WAN)

    def press_button(self, n=1):
        self.require(BUTTON)

    def add_pulses(self, n):
        self.require(PULSES)

    def advance_clock(self, seconds):
        self.require(CLOCK)

    def clock(self):
        """The rig's clock (Unix seconds: the supplier's time, which `advance_clock` moves) if
        the rig controls the board's clock, else None."""
        return None

    def board_clock(self):
        """What the board's own clock reads (Unix seconds) if the rig can see it, else None.
        The same as clock() unless the board lost its clock in a power cut."""
        return None

    def set_clock_survives(self, on):
        """Make the board's clock run through power cuts (a battery-backed RTC) or not.  A
        bench board is what it is: asking it for the other raises Unsupported."""
        if bool(on) != self.clock_survives:
            raise Unsupported("rtc" if on else "no_rtc", self.describe())

    def power_cut_kill(self, during=None, delay=0.0):
        """Cut the power at whatever instant it is (`delay` s after starting `during(han)` on a
        thread, if given), power on again, return a CutResult once the meter answers."""
        self.require(POWER_CUT)

    def power_cut_after(self, n, during=None):
        """Cut the power as the (n+1)-th flash erase/program runs (n complete, that one torn),
        while `during(han)` runs; power on again; return a CutResult once the meter answers."""
        self.require(FLASH_CUT)

    def reboot(self):
        self.require(REBOOT)

    def power_off(self):
        """Take the power away (the board stays off until power_on)."""
        self.require(POWER_CUT)

    def power_on(self):
        """Power the board on again; return once the meter answers."""
        self.require(POWER_CUT)

    def edit_flash(self, edit):
        """With the power off, call edit(image) on the flash partition's bytes (a bytearray)
        and keep what it changed; then power on and return once the meter answers."""
        self.require(FLASH_EDIT)

    def relay(self):
        """The supply relay: True (supply on), False, or None if the bench cannot see it."""
        return None


# ------------------------------------------------------------------------------------------
class VirtualTransport(Transport):
    """The virtual board (hil.virtual.VirtualBoard): every control; its clock frozen from the
    start (the rig moves it with ``advance_clock``), with or without a battery-backed RTC.

    Power cut by kill: SIGKILL the Node process, start it again on the same files; the rig's
    own state (the WAN input, its clock) is kept across it, as a bench's lines would be.  Power
    cut after n: NorFlash tears the (n+1)-th erase/program and the board is off until the rig
    powers it on again.  The board's clock runs through either (clock_survives=True, a
    battery-backed RTC) or restarts from 2000-01-01 at power-on (False: an ESP32 without one),
    and keeps its time through a reboot (the reset button) either way.
    """

    kind = "virtual board"
    capabilities = ALL

    def __init__(self, workdir, clock=None, wan=False, clock_survives=True, **board_options):
        super().__init__()
        from hil.virtual import VirtualBoard
        self.workdir = Path(workdir)
        self._clock = int(time.time()) if clock is None else int(clock)
        self._wan = bool(wan)
        # Frozen from the first instant: the firmware's first read of the clock is exact.
        self.board = VirtualBoard(self.workdir, wan=self._wan, clock=self._clock, freeze=True,
                                  clock_survives=clock_survives, **board_options)

    def describe(self):
        return "the virtual board"

    @property
    def clock_survives(self):
        return self.board.clock_survives

    def set_clock_survives(self, on):
        """A battery-backed RTC (True) or none: takes effect at the firmware's next start."""
        self.board.set_clock_survives(on)

    def start(self):
        b = self.board
        b._opts["wan"] = self._wan                 # VirtualBoard's options for the next start
        if not b.running:
            b.start()
        self._restore_rig()
        self.repl_port, self.han_port = b.repl_port, b.han_port
        return self

    def _restore_rig(self):
        self.board.set_wan(self._wan)

    def close(self):
        self.board.stop()
        self.repl_port = self.han_port = None

    def ensure_up(self):
        """Make sure the board runs and is powered (after a test left it off or dead)."""
        b = self.board
        if not b.running:
            self.start()
        elif not b.status()["powered"]:
            b.cut_after(None)
            b.power_on()
            self._restore_rig()

    # rig controls
    def set_wan(self, up):
        self._wan = bool(up)
        self.board.set_wan(self._wan)

    def press_button(self, n=1):
        self.board.press_button(n)

    def add_pulses(self, n):
        self.board.add_pulses(n)

    def pulses_pending(self):
        """Pulses the firmware has not taken yet (0: the meter has counted every one)."""
        return self.board.status()["pulses_pending"]

    def advance_clock(self, seconds):
        """Move the rig's clock forward, and the board's with it (whatever it reads)."""
        seconds = int(seconds)
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._clock += seconds
        self.board.advance_clock(seconds)

    def clock(self):
        return self._clock

    def board_clock(self):
        return int(self.board.status()["clock"])

    def relay(self):
        return self.board.relay

    def power_off(self):
        self.board.power_off()

    def power_on(self):
        self.board.cut_after(None)
        self.board.power_on()
        self._restore_rig()
        self.wait_meter()

    def edit_flash(self, edit):
        """Power off, edit(image) on the flash file's bytes, write back what changed, power on."""
        b = self.board
        if b.status()["powered"]:
            b.power_off()
        data = bytearray(b.flash_path.read_bytes())
        size = len(data)
        edit(data)
        if len(data) != size:
            raise ValueError("edit_flash: the partition is %d bytes; the edit made it %d" % (size, len(data)))
        b.flash_path.write_bytes(bytes(data))
        self.power_on()

    def power_cut_kill(self, during=None, delay=0.0):
        """Cut the power (SIGKILL) — `delay` seconds after starting `during(han)` on a thread,
        if given: a request in flight — then power on again; return once the meter answers.
        Return a CutResult (cut is always True)."""
        flight = _InFlight(self.han_port, during, 10.0) if during is not None else None
        if delay:
            time.sleep(delay)
        self.board.kill()
        if flight is not None:
            flight.cancel()
        self.start()
        self.wait_meter()
        return CutResult(True, flight and flight.result, flight and flight.error)

    def power_cut_after(self, n, during=None, timeout=10.0, linger=0.0):
        """Arm a cut that lets `n` more flash erase/program operations complete and tears the
        next one; run `during(han)` (a HanClient that gives up as soon as the power goes);
        then make sure the board is powered again and the meter answers.  Without `during`,
        wait up to `timeout` for whatever the meter writes next (a checkpoint due, say).
        `linger`: once `during` has its answer, keep the cut armed that many seconds more, for
        what the meter writes after answering (a rejections receipt, a checkpoint).

        Return a CutResult: cut (True if the power went), result / error of `during`.
        """
        b = self.board
        while any(e.get("event") == "poweroff" for e in b.events()):
            b.wait_event("poweroff", 1)          # an old one, not ours
        b.cut_after(n)
        res = CutResult(False)
        flight = _InFlight(self.han_port, during, timeout) if during is not None else None
        try:
            deadline = time.monotonic() + timeout
            answered_at = None
            while True:
                if any(e.get("event") == "poweroff" for e in b.events()):
                    b.wait_event("poweroff", 1)
                    res.cut = True
                    break
                if flight is not None and flight.done.is_set():
                    if answered_at is None:
                        answered_at = time.monotonic()
                    if time.monotonic() - answered_at >= linger:
                        break
                if time.monotonic() > deadline:
                    if flight is None or answered_at is not None:
                        break                    # nothing (more) was written: no cut
                    raise TransportError("power_cut_after(%d): neither a cut nor an answer in %.0f s"
                                         % (n, timeout))
                time.sleep(0.005)
            b.cut_after(None)
            if not res.cut and not b.status()["powered"]:   # the cut came as we disarmed
                b.wait_event("poweroff", 1)
                res.cut = True
            if flight is not None and res.cut:
                flight.cancel()
            if res.cut:
                b.power_on()
                self._restore_rig()
                self.wait_meter()
        finally:
            if flight is not None:
                flight.cancel()
                res.result, res.error = flight.result, flight.error
        return res

    def reboot(self):
        """Press the reset button: a fresh boot (the board keeps its clock, as an ESP32's RTC
        does through a reset); return once the meter answers."""
        self.board.hard_reset()
        self._restore_rig()
        self.wait_meter()


# ------------------------------------------------------------------------------------------
def load_rig(path):
    """Read and check a rig description file (JSON; see docs/bench-rig.md)."""
    try:
        with open(path) as f:
            rig = json.load(f)
    except OSError as e:
        raise TransportError("cannot read the rig file %s: %s" % (path, e.strerror)) from None
    except ValueError as e:
        raise TransportError("the rig file %s is not JSON: %s" % (path, e)) from None
    if not isinstance(rig, dict):
        raise TransportError("the rig file %s must hold a JSON object" % path)

    def argv(where, value):
        if not (isinstance(value, list) and value and all(isinstance(a, str) for a in value)):
            raise TransportError("rig file %s: %s must be a command, a non-empty list of strings"
                                 % (path, where))
    known = {"power", "wan", "button", "pulses", "relay", "reset", "boot_seconds", "rtc", "comment"}
    for k in rig:
        if k not in known and not k.startswith("_"):
            raise TransportError("rig file %s: unknown entry %r (known: %s)"
                                 % (path, k, ", ".join(sorted(known))))
    for k, subs in (("power", ("off", "on")), ("wan", ("up", "down"))):
        if k in rig:
            if not isinstance(rig[k], dict) or set(rig[k]) - {"comment"} != set(subs):
                raise TransportError("rig file %s: %s must be {%s}" % (
                    path, k, ", ".join('"%s": [...]' % s for s in subs)))
            for s in subs:
                argv("%s.%s" % (k, s), rig[k][s])
    for k in ("button", "pulses", "relay", "reset"):
        if k in rig:
            argv(k, rig[k])
    if "rtc" in rig and not isinstance(rig["rtc"], bool):
        raise TransportError("rig file %s: rtc must be true (the board has a battery-backed RTC) "
                             "or false" % path)
    if "pulses" in rig and not any("{n}" in a for a in rig["pulses"]):
        raise TransportError("rig file %s: the pulses command must contain {n} (the count)" % path)
    return rig


class SerialTransport(Transport):
    """A real board: its REPL on a USB-serial port, its HAN UART on a second port (a USB-UART
    adapter powered independently of the board), and the bench's lines driven by the
    commands of a rig description file (docs/bench-rig.md).

    Without a rig file only the HAN, flashing, provisioning and a soft-reset reboot work;
    each rig entry adds a capability.
    """

    kind = "serial board"

    def __init__(self, port, han_port=None, rig=None, boot_seconds=None):
        super().__init__()
        if not han_port:
            raise TransportError("a serial board needs its HAN port too (--han-port or TOPUP_HAN_PORT)")
        self.repl_port = port
        self.han_port = han_port
        self.rig = rig or {}
        self.boot_seconds = float(boot_seconds if boot_seconds is not None
                                  else self.rig.get("boot_seconds", 2.0))
        caps = {REBOOT}
        for key, cap in (("power", POWER_CUT), ("wan", WAN), ("button", BUTTON),
                         ("pulses", PULSES), ("relay", RELAY)):
            if key in self.rig:
                caps.add(cap)
        self.capabilities = frozenset(caps)
        # A battery-backed RTC on the bench (docs/bench-rig.md): the clock survives a cut.
        self.clock_survives = bool(self.rig.get("rtc", False))

    def describe(self):
        return "the serial board on %s" % self.repl_port

    def start(self):
        for p in (self.repl_port, self.han_port):
            if "://" not in p and not os.path.exists(p):
                raise TransportError("no such port: %s (is the board plugged in?)" % p)
        if "power" in self.rig:
            self._run("power.on", self.rig["power"]["on"])
        return self

    def _run(self, what, argv, n=None, capture=False, timeout=60):
        subst = {"{n}": str(n) if n is not None else "", "{repl_port}": self.repl_port,
                 "{han_port}": self.han_port}
        cmd = []
        for a in argv:
            for k, v in subst.items():
                a = a.replace(k, v)
            cmd.append(a)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TransportError("rig command %s (%s) failed: %s" % (what, shlex.join(cmd), e)) from None
        if r.returncode:
            raise TransportError("rig command %s (%s) exited %d: %s" % (
                what, shlex.join(cmd), r.returncode, (r.stderr or r.stdout).strip()[-300:]))
        return r.stdout

    def _wait_port(self):
        deadline = time.monotonic() + self.boot_timeout
        while "://" not in self.repl_port and not os.path.exists(self.repl_port):
            if time.monotonic() > deadline:
                raise TransportError("%s did not come back after power-on" % self.repl_port)
            time.sleep(0.1)

    def set_wan(self, up):
        self.require(WAN)
        self._run("wan.up" if up else "wan.down", self.rig["wan"]["up" if up else "down"])

    def press_button(self, n=1):
        self.require(BUTTON)
        for _ in range(int(n)):
            self._run("button", self.rig["button"])

    def add_pulses(self, n):
        self.require(PULSES)
        # The I/O board sends about 500 pulses a second (docs/bench-rig.md): allow for it.
        self._run("pulses", self.rig["pulses"], n=int(n), timeout=60 + int(n) / 250)

    def relay(self):
        if RELAY not in self.capabilities:
            return None
        out = self._run("relay", self.rig["relay"]).strip().lower()
        if out in ("1", "on", "true", "closed"):
            return True
        if out in ("0", "off", "false", "open"):
            return False
        raise TransportError("rig command relay printed %r (expected on/off or 1/0)" % out)

    def power_cut_kill(self, during=None, delay=0.0):
        self.require(POWER_CUT)
        flight = _InFlight(self.han_port, during, 10.0) if during is not None else None
        if delay:
            time.sleep(delay)
        self._run("power.off", self.rig["power"]["off"])
        if flight is not None:
            flight.cancel()
        time.sleep(0.5)      # let the board's capacitors drain
        self._run("power.on", self.rig["power"]["on"])
        time.sleep(self.boot_seconds)
        self._wait_port()
        self.wait_meter()
        return CutResult(True, flight and flight.result, flight and flight.error)

    def power_off(self):
        self.require(POWER_CUT)
        self._run("power.off", self.rig["power"]["off"])

    def power_on(self):
        self.require(POWER_CUT)
        self._run("power.on", self.rig["power"]["on"])
        time.sleep(self.boot_seconds)
        self._wait_port()
        self.wait_meter()

    def reboot(self):
        """The rig's reset line if it has one, else a soft reset over the REPL (main.py runs
        again and remounts the store, as at power-on)."""
        if "reset" in self.rig:
            self._run("reset", self.rig["reset"])
            time.sleep(self.boot_seconds)
        else:
            from hil.flashing import Board
            with Board(self.repl_port) as board:
                board.soft_reset()
        self.wait_meter()


def open_transport(board="virtual", han_port=None, rig=None, workdir=None):
    """The transport the options name: 'virtual' (a VirtualTransport in `workdir`) or a serial
    port (a SerialTransport; `rig` a rig file path or dict)."""
    if board in (None, "", "virtual"):
        if workdir is None:
            raise TransportError("a virtual board needs a work folder")
        return VirtualTransport(workdir)
    if isinstance(rig, (str, os.PathLike)):
        rig = load_rig(rig)
    return SerialTransport(board, han_port=han_port, rig=rig)
