# Board support: one small module per board, each with `class Board` (see firmware/README.md,
# "The board interface").  Importing this package, or any board module, touches no hardware:
# main.py does `boards.load().Board()` and hands the object to the app.
import sys

# sys.platform -> board module name.  The wasm VM (the virtual board) is driven by hil/,
# which passes its own board object, so it needs no entry here.
_BY_PLATFORM = {"esp32": "esp32", "rp2": "pico"}


def load(name=None):
    """Return the board module (not an instance) called `name`, or the one for this port.

    name: "esp32", "pico", "fake" (or any module in this package); None picks by sys.platform ("esp32" -> esp32,
    "rp2" -> pico).  Raises ValueError for a platform or name with no board module.
    """
    if name is None:
        name = _BY_PLATFORM.get(sys.platform)
        if name is None:
            raise ValueError("no board module for platform %r: call boards.load(name)" % sys.platform)
    if not name or "." in name:
        raise ValueError("bad board name %r" % name)
    return __import__("boards." + name, None, None, ["Board"])
