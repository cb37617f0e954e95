# MicroPython manifest (tools/manifestfile.py) for the board-support package `boards`.
# Pulled in by ../manifest.py with require("boards", library=...); usable on its own too.
#
# Options (keyword arguments of require()/include()):
#   board="esp32" | "pico"  freeze only that board's module (default: every hardware board)
#   test=True               also freeze the fake board and the NOR flash emulator
metadata(
    description="offline-topup board support: one Board class per board (HAN, flash, relay, I/O)",
    version="0.1.0",
)

options.defaults(board=None, test=False)

_files = ["__init__.py", "mcu.py",  # mcu: what the microcontroller boards share
          "keypad.py", "ssd1306.py", "textdisplay.py"]   # the PPMID's keypad and display
if options.board:
    _files.append(options.board + ".py")
else:
    _files += ["esp32.py", "pico.py"]
if options.test:
    _files += ["fake.py", "nor.py"]

# This manifest sits inside the package folder, so list the files (a bare package() would
# freeze this manifest.py as boards/manifest.py too).
package("boards", files=_files, base_path="..")
