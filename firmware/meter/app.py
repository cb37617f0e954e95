# The main loop: one `step` reads the board's inputs, meters, serves the HAN and the uplink
# (each a bounded amount of work), and drives the relay from the supply state (closed only
# when on: SPEC.md §9). `run` repeats it forever. Hardware comes in as a board object.
import gc
import time

# While the application's code loads and the meter boots, collect each time an eighth of
# the heap (as free now) has been allocated, not only when an allocation fails: garbage
# is then freed while it is still low in the heap, so what stays (the code, the ledger,
# the store's buffers) packs low and the free space stays in long runs for the big
# buffers an apply needs later.  Booted, the meter goes back to collecting only when
# memory runs out (kept on, the threshold made an apply ~3x slower in a tight heap).  On
# the unix port this lowers the smallest heap the meter runs in by ~15 KiB
# (tests/bench/bench_heap.py).
try:
    _THRESHOLD = gc.threshold()
    gc.threshold(gc.mem_free() // 8)
except AttributeError:  # CPython
    _THRESHOLD = None

from protocol.errors import Rejected
from meter import supply
from meter.clock import MeterClock
from meter.han_server import HanServer
from meter.ledger import Ledger
from meter.store import Store
from meter.uplink import Uplink

_IDLE_MS = 5


def _log(message):
    print(message)    # the REPL log: what an engineer sees on the board's USB serial


class Meter:
    def __init__(self, board, log=_log):
        self.board = board
        self.store = Store(board.flash)
        self.store.mount()
        # A board says whether its clock runs through a power cut (a battery-backed RTC);
        # those that do not say are taken not to.
        clock = MeterClock(board.time, getattr(board, "clock_survives_power_loss", False))
        self.ledger = Ledger(self.store, clock, log)
        self.han = HanServer(self.ledger, board.han, board.wan_up)
        self.uplink = Uplink(self.ledger, getattr(board, "wan", None), board.wan_up, board.ticks_ms)
        board.set_relay(self.ledger.supply_on())
        if _THRESHOLD is not None:
            gc.threshold(_THRESHOLD)   # booted (see above)

    def step(self):
        board = self.board
        ledger = self.ledger
        try:
            now = ledger.clock()
            ledger.meter(board.pulses(), now)
            if board.button_presses():
                # One action per step however many presses came: a press confirms an armed
                # supply, else takes emergency credit -- never both from one burst.
                try:
                    supply.press(ledger)
                except Rejected:
                    pass  # not available now: the press is ignored, as on any meter
            board.set_relay(ledger.supply_on())
            self.han.poll()
            self.uplink.poll()
            ledger.record_rejections(ledger.clock())
            ledger.settle()    # an interruption found this step is committed before the relay opens
        except MemoryError:
            # Nothing was half-changed (a commit that fails re-reads the flash); free what
            # this step held and carry on: the relay decision below still runs.
            gc.collect()
        board.set_relay(ledger.supply_on())


def run(board):
    meter = Meter(board)
    while True:
        meter.step()
        time.sleep_ms(_IDLE_MS)
