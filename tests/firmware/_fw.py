# Puts firmware/ on sys.path (as /lib is on a board), for pytest and the MicroPython VM alike.
import sys; _FW = __file__.rsplit("/", 3)[0] + "/firmware"; sys.path.insert(0, _FW) if _FW not in sys.path else None
