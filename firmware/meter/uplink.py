# The WAN uplink (SPEC.md §5.1): while the WAN is up, push the receipts the head end has
# not acknowledged, a few at a time, and resend after a silence. Nothing from the head end
# can change credit: the only thing it can say is which receipts it holds, and that only in
# an acknowledgement signed by a key the meter trusts, naming this meter's receipt key and
# the hash of the last receipt it holds. One acknowledgement is checked per push: a bad one
# costs the link RETRY_MS, not a signature check per frame. The answer to a push may also
# carry signed commands (SPEC.md §10), which the ledger checks and applies exactly as if
# they came over the HAN: one per main-loop step, their receipts going up with the next push.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from protocol import ack as ack_format, han
from protocol.errors import Rejected

try:
    from time import ticks_diff
except ImportError:  # CPython: the fake board's ticks never wrap
    def ticks_diff(a, b):
        return a - b

RETRY_MS = const(5000)
_BATCH = const(4)
_READ_CHUNK = const(64)
_MAX_READ_PER_STEP = const(1088)


class Uplink:
    def __init__(self, ledger, stream, wan_up, ticks_ms):
        self.ledger = ledger
        self.stream = stream
        self.wan_up = wan_up
        self.ticks_ms = ticks_ms
        # A board without a WAN link holds no buffer for one.
        self.deframer = han.Deframer() if stream is not None else None
        self._pending = None      # [request id, ticks when sent, answer checked]
        self._next_id = 1
        self.pushed = 0
        self._commands = []       # command bytes the head end sent, applied one per step

    def poll(self):
        """Take acknowledgements, then push the next batch if one is due."""
        if self.stream is None:
            return
        if self._commands:
            try:
                self.ledger.submit_command(self._commands.pop(0))
            except Exception:  # noqa: BLE001 - refused (its reason is counted), or busy
                pass
        self._read_acks()
        if not self.wan_up():
            return
        if self._pending is not None:
            if ticks_diff(self.ticks_ms(), self._pending[1]) < RETRY_MS:
                return
            self._pending = None  # no answer: send again
        self._push()

    def _read_acks(self):
        read = 0
        while read < _MAX_READ_PER_STEP:    # bounded work per main-loop step
            data = self.stream.read(_READ_CHUNK)
            if not data:
                return
            read += len(data)
            for body in self.deframer.feed(data):
                try:
                    msg_type, msg_id, payload = han.decode_message(body)
                except Exception:  # noqa: BLE001 - untrusted link
                    continue
                pending = self._pending
                if (msg_type == han.PUSH | han.RESPONSE and pending is not None
                        and msg_id == pending[0] and not pending[2]):
                    pending[2] = True
                    if self._accept(payload):
                        self._pending = None
                    commands = payload.get(3)
                    if isinstance(commands, list):
                        for c in commands:
                            if isinstance(c, bytes) and len(self._commands) < _BATCH:
                                self._commands.append(c)

    def _accept(self, payload):
        """Check a push response's signed acknowledgement; move the acknowledged index."""
        ledger = self.ledger
        if not ledger.provisioned:
            return False
        try:
            a = ack_format.verify(payload.get(2), ledger.trust, ledger.device)
        except Rejected:
            return False
        except MemoryError:
            return False          # checked again after the next push
        except Exception:  # noqa: BLE001 - untrusted link: a payload of the wrong shape
            return False
        if a.meter_kid != ledger.signer.kid or payload.get(1) != a.next_index:
            return False
        # Only progress clears the way for the next push at once; an answer that holds
        # nothing new waits RETRY_MS like silence, so the link never spins.
        return ledger.acknowledge(a.next_index, a.last_hash)

    def _push(self):
        ledger = self.ledger
        if not ledger.provisioned:
            return
        store = ledger.store
        start = ledger.uploaded
        count = store.receipt_count
        # Receipts that left the ring during a long outage cannot be sent: the head end
        # sees the gap and reconciliation names it.
        while start < count and store.receipt(start) is None:
            start += 1
        if start >= count:
            return
        batch = []
        index = start
        while index < count and len(batch) < _BATCH:
            raw = store.receipt(index)
            if raw is None:
                break
            batch.append(raw)
            index += 1
        msg_id = self._next_id
        self._next_id = self._next_id % 0xFFFF + 1
        try:
            self.stream.write(han.encode_message(han.PUSH, msg_id, {1: ledger.device, 2: start, 3: batch}))
        except Exception:  # noqa: BLE001 - a failing link must not stop the meter
            return
        self._pending = [msg_id, self.ticks_ms(), False]
        self.pushed += len(batch)
