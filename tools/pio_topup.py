# PlatformIO extra script (platformio.ini: extra_scripts = pre:tools/pio_topup.py).
#
# Nothing is compiled: the firmware is MicroPython. `upload` runs `topup flash` (the
# upload_command in platformio.ini) without building anything first; `provision` and
# `han-status` run `topup provision` / `topup han status`. The `topup` is the repository's
# own, .venv/bin/topup after `make setup`. The port: upload_port / --upload-port, else
# $TOPUP_PORT, else the only USB serial port connected.
import glob
import os
import sys

from SCons.Script import COMMAND_LINE_TARGETS  # noqa: E402  (PlatformIO's SCons)

Import("env")  # noqa: F821 - provided by PlatformIO's SCons
env = globals()["env"]  # what Import("env") put here
env.Replace(PROGNAME="meter", BUILD_FLAGS=[], SRC_FILTER=["-<*>"])

PROJECT_DIR = env.subst("$PROJECT_DIR")
VENV_TOPUP = os.path.join(PROJECT_DIR, ".venv", "bin", "topup")


def topup_executable():
    """The repository's topup (after `make setup`), or None."""
    return VENV_TOPUP if os.access(VENV_TOPUP, os.X_OK) else None


def usb_serial_port():
    """The one USB serial port connected, or None (none, or several to choose from)."""
    try:
        from serial.tools import list_ports
        ports = [p.device for p in list_ports.comports() if p.vid is not None]
    except Exception:  # pyserial missing: look at the usual device names
        ports = sorted(glob.glob("/dev/ttyUSB*") + glob.glob("/dev/ttyACM*")
                       + glob.glob("/dev/cu.usb*"))
    return ports[0] if len(ports) == 1 else None


def fail(message):
    sys.stderr.write("Error: %s\n" % message)
    env.Exit(1)


targets = set(COMMAND_LINE_TARGETS)
if targets & {"upload", "provision", "han-status"}:
    if not topup_executable():
        fail("no `topup` to run: run `make setup` in %s first (it installs .venv/bin/topup)"
             % PROJECT_DIR)
if targets & {"upload", "provision"}:
    if not env.subst("$UPLOAD_PORT"):
        port = os.environ.get("TOPUP_PORT") or usb_serial_port()
        if not port:
            fail("no board port: pass --upload-port PORT, set upload_port in platformio.ini, "
                 "or set TOPUP_PORT (several or no USB serial ports are connected)")
        env.Replace(UPLOAD_PORT=port)

if "upload" in targets:
    # Upload without building: the platforms take "nobuild" to mean "upload what is in the
    # build folder"; there is nothing to build, so an empty placeholder stands in.
    if "nobuild" not in COMMAND_LINE_TARGETS:
        COMMAND_LINE_TARGETS.append("nobuild")
    build_dir = env.subst("$BUILD_DIR")
    os.makedirs(build_dir, exist_ok=True)
    for ext in ("elf", "bin", "hex", "uf2"):
        path = os.path.join(build_dir, "meter.%s" % ext)
        if not os.path.exists(path):
            open(path, "wb").close()


def _quote(word):
    return '"%s"' % word.replace('"', '\\"')


def _topup(*args):
    return " ".join([_quote(VENV_TOPUP)] + [_quote(a) for a in args])


device = env.GetProjectOption("custom_device", "") or os.environ.get("TOPUP_DEVICE", "")
if "provision" in targets and not device:
    fail("`-t provision` needs the meter's EUI-64: set custom_device = 70-B3-D5-… in this "
         "env of platformio.ini, or TOPUP_DEVICE")
han_port = env.GetProjectOption("custom_han_port", "") or os.environ.get("TOPUP_HAN_PORT", "")

env.AddCustomTarget(
    name="provision",
    dependencies=None,
    actions=[_topup("provision", "--port", env.subst("$UPLOAD_PORT") or "$UPLOAD_PORT",
                    "--device", device or "(custom_device)")],
    title="Provision",
    description="Provision the meter (custom_device) and register its key (topup provision)",
)
env.AddCustomTarget(
    name="han-status",
    dependencies=None,
    actions=[_topup("han", "status", *(["--port", han_port] if han_port else []))],
    title="HAN status",
    description="Ask the meter for its status over the HAN (topup han status)",
)
