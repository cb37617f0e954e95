# MicroPython manifest (tools/manifestfile.py) for the meter firmware: the application
# (`meter`), board support (`boards`), the shared formats (`protocol`) and start-up files.
#
# Freeze it into a board build, e.g. for an ESP32:
#   make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/firmware/manifest.py
# Options (FROZEN_MANIFEST can't pass them; include() this file from a board manifest to):
#   board="esp32" | "pico"  only that board module (default: both)
#   startup=False           leave boot.py/main.py out (frozen ones run in preference to
#                           files of the same name on the filesystem)
#   app="meter" | "ppmid"   the meter (default) or the customer's in-home device (PPMID):
#                           ppmid/ instead of meter/, and ppmid/main.py frozen as main.py
metadata(
    description="offline-topup meter firmware: offline signed top-up vouchers over the HAN",
    version="0.1.0",
)

import os

options.defaults(board=None, startup=True, app="meter")

# require() gives each package its own metadata(); the library is this folder.
add_library("offline-topup", ".")
require("boards", library="offline-topup", board=options.board)

if options.app == "ppmid":
    package("ppmid", files=sorted(f for f in os.listdir("ppmid")
                                  if f.endswith(".py") and f != "main.py"))
elif os.path.exists("meter/manifest.py"):
    require("meter", library="offline-topup")
else:
    package("meter", files=sorted(f for f in os.listdir("meter") if f.endswith(".py")))

# protocol/ lives at the repository root (it is shared with the supplier side); its
# modules are the top-level .py files (vectors/ holds CPython-only generators).
if os.path.exists("../protocol/manifest.py"):
    add_library("offline-topup-protocol", "..")
    require("protocol", library="offline-topup-protocol")
else:
    package(
        "protocol",
        files=sorted(f for f in os.listdir("../protocol") if f.endswith(".py")),
        base_path="..",
    )

if options.startup:
    module("boot.py")
    if options.app == "ppmid":
        module("main.py", base_path="ppmid")
    else:
        module("main.py")
