# Board support: one small module per board, each with `class Board` (see firmware/README.md,
# "The board interface").  Importing this package, or any board module, touches no hardware:
# main.py does `boards.load().Board()` and hands the object to the app.
import sys

# sys.platform -> board module name.  The wasm VM is the virtual board only inside the HIL
# rig, whose VM worker registers the `_vboard` JS module (a bare wasm VM has no default).
_BY_PLATFORM = {"esp32": "esp32", "rp2": "pico", "webassembly": "virtual" if "_vboard" in sys.modules else None}


def load(name=None, platform=None):
    """Return the board module (not an instance) called `name`, or the one for a platform.

    name: "esp32", "pico", "fake" (or any other module in this package); None picks by
    `platform` (default sys.platform): "esp32" -> esp32, "rp2" -> pico.  Raises
    ValueError for a platform or name with no board module.
    """
    if name is None:
        platform = sys.platform if platform is None else platform
        name = _BY_PLATFORM.get(platform)
        if name is None:
            raise ValueError("no board module for platform %r: call boards.load(name)" % platform)
    if not name or "." in name:
        raise ValueError("bad board name %r" % name)
    return __import__("boards." + name, None, None, ["Board"])
