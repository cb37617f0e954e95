# The main loop: one `step` reads the board's inputs, serves the HAN, meters, and drives
# the relay. `run` repeats it forever. Hardware comes in as a board object.
import time

from protocol.errors import Rejected
from meter.han_server import HanServer
from meter.ledger import Ledger
from meter.store import Store
from meter.uplink import Uplink

_IDLE_MS = 5


class Meter:
    def __init__(self, board):
        self.board = board
        self.store = Store(board.flash)
        self.store.mount()
        self.ledger = Ledger(self.store, board.time)
        self.han = HanServer(self.ledger, board.han, board.wan_up)
        self.uplink = Uplink(self.ledger, getattr(board, "wan", None), board.wan_up, board.ticks_ms)
        board.set_relay(self.ledger.supply_on())

    def step(self):
        board = self.board
        ledger = self.ledger
        now = board.time()
        ledger.meter(board.pulses(), now)
        for _ in range(board.button_presses()):
            try:
                ledger.take_emergency_credit()
            except Rejected:
                pass  # not available now: the press is ignored, as on any meter
        self.han.poll()
        self.uplink.poll()
        ledger.record_rejections(now)
        board.set_relay(ledger.supply_on())


def run(board):
    meter = Meter(board)
    while True:
        meter.step()
        time.sleep_ms(_IDLE_MS)
