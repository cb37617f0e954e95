"""The supplier's head end for the meters' WAN uplink (SPEC.md §5.1): receive the receipts a
meter pushes once its WAN is back, store them as `topup receipts import` would, and
acknowledge what is held so the meter can stop resending."""
import time

from protocol import errors, han

from . import receipts_io
from .reconcile import import_raw

_READ = 512


def next_needed(conn, device, first):
    """The lowest receipt index at or after `first` that is not stored for `device`.

    Receipts below the push's first index are either acknowledged already or gone from
    the meter's ring for good; asking for those again would stall the uplink, and
    reconciliation names the gap anyway."""
    index = first
    for (idx,) in conn.execute("SELECT DISTINCT idx FROM receipts WHERE device = ? AND idx >= ? "
                               "ORDER BY idx", (device, first)):
        if idx != index:
            break
        index += 1
    return index


def handle_push(conn, payload, source):
    """Store one push; return (next index needed, ImportResult or None)."""
    device, first, raws = payload.get(1), payload.get(2), payload.get(3)
    if (not isinstance(device, bytes) or len(device) != 8 or not isinstance(first, int)
            or isinstance(first, bool) or first < 0 or not isinstance(raws, list)
            or not all(isinstance(r, bytes) for r in raws)):
        raise errors.Rejected(errors.BAD_REQUEST, "push needs {1: device, 2: first index, 3: [receipts]}")
    result = None
    if raws:
        try:
            result = import_raw(conn, raws, source)
        except receipts_io.ReceiptFileError as e:
            # Not a receipt at all: keep nothing of this push; the meter will send it again.
            raise errors.Rejected(errors.BAD_REQUEST, str(e)) from None
    return next_needed(conn, device, first), result


class HeadEnd:
    """Serve one WAN link (a serial port or any byte stream with read/write)."""

    def __init__(self, conn, stream, source, log=None):
        self.conn = conn
        self.stream = stream
        self.source = source
        self.log = log or (lambda message: None)
        self.deframer = han.Deframer()
        self.pushes = 0
        self.stored = 0

    def poll(self):
        """Handle whatever has arrived; return the number of frames answered."""
        answered = 0
        while True:
            data = self.stream.read(_READ)
            if not data:
                return answered
            for body in self.deframer.feed(data):
                answered += self._answer(body)

    def _answer(self, body):
        try:
            msg_type, msg_id, payload = han.decode_message(body)
        except errors.Rejected:
            return 0
        if msg_type != han.PUSH:
            reply_type, reply = han.ERROR, {1: errors.UNKNOWN_REQUEST}
        else:
            try:
                next_index, result = handle_push(self.conn, payload, self.source)
                reply_type, reply = han.PUSH | han.RESPONSE, {1: next_index}
                self.pushes += 1
                new = result.new if result else 0
                self.stored += new
                self.log("meter %s: %d receipt(s) from #%d, %d new; acknowledged up to #%d"
                         % (payload[1].hex(), len(payload[3]), payload[2], new, next_index - 1))
            except errors.Rejected as e:
                reply_type, reply = han.ERROR, {1: e.reason}
                self.log("refused a push: %s" % e)
        self.stream.write(han.encode_message(reply_type, msg_id, reply))
        return 1

    def serve_forever(self, idle=0.01, stop=None):
        while stop is None or not stop():
            if not self.poll():
                time.sleep(idle)
