"""The supplier's head end for the meters' WAN uplink (SPEC.md §5.1): receive the receipts a
meter pushes once its WAN is back, store them as `topup receipts import` would, and answer
with a signed acknowledgement of what the supplier holds, so the meter can let those go.

Rules:
- Every structurally valid receipt of a push is stored, whatever its signature: a receipt
  that does not verify is evidence for reconciliation (`bad_signature`), never "held".
- A receipt is held when a stored copy's signature verified with the meter key of its
  index's span (host/registry.py key epochs): sig_ok = 1 and checked_kid = that key's kid.
- The answer is {1: next, 2: ack}: `next` is the lowest index at or after the push's first
  index that is not held (never below it: receipts below it are acknowledged already, or
  gone from the meter's ring for good, and reconciliation names the gap). `ack` is
  protocol.ack signed with the database's active issuer key, naming the device, the kid
  of the meter key whose span holds next - 1, `next` and SHA-256 of the held receipt
  next - 1; it is absent when next equals the push's first index (nothing to let go).
  A forged push therefore moves nothing: its receipts are stored and not held.
- The answer also carries field 3 = the meter's pending signed commands (SPEC.md §5.1,
  §10; host/commands.py pending_for: its current provisioning's), in number order, at
  most 4. They are signed for that meter
  alone, so sending them to whoever pushes in its name gives nothing away; the meter
  applies them one per main-loop step and their receipts (kind 5) come back with its next
  push, whose import marks them applied (commands.settle_from_receipts), so the next
  answer no longer carries them.
"""
import hashlib
import time

from protocol import ack as ack_format, errors, han

from . import receipts_io, registry
from .reconcile import import_raw, recheck

_READ = 512
_MAX_READ_PER_POLL = 8192  # so that a flood of frames cannot keep poll() from returning
MAX_COMMANDS = 4           # per answer: what a meter takes from one (firmware/meter/uplink.py)


def _held(conn, device, first):
    """{index: [hash of each held copy]} for indices >= first, and the device's keys."""
    epochs = registry.device_keys(conn, device)
    held = {}
    if not epochs:
        return held, epochs
    for idx, h, kid in conn.execute(
            "SELECT idx, hash, checked_kid FROM receipts WHERE device = ? AND idx >= ? AND "
            "sig_ok = 1 ORDER BY idx, hash", (device, first)):
        key = registry.span_key(epochs, idx)
        if key is not None and kid == key.kid:
            held.setdefault(idx, []).append(bytes(h))
    return held, epochs


def next_needed(conn, device, first):
    """The lowest receipt index at or after `first` that `device`'s meter has not had
    stored here with a signature verified by the key of its span."""
    held, _ = _held(conn, device, first)
    index = first
    while index in held:
        index += 1
    return index


def acknowledgement(conn, signer, device, first, pushed=()):
    """(next index needed, signed acknowledgement bytes or None) for a push of `device`
    from index `first`. `pushed`: the pushed receipts' hashes, preferred when two held
    receipts share index next - 1 (a fork: the meter holds the one it pushed)."""
    held, epochs = _held(conn, device, first)
    nxt = first
    while nxt in held:
        nxt += 1
    if nxt == first:
        return nxt, None
    copies = held[nxt - 1]
    last = next((h for h in copies if h in pushed), copies[0])
    key = registry.span_key(epochs, nxt - 1)
    return nxt, ack_format.encode(signer.kid, signer.sign, device, key.kid, nxt, last)


def handle_push(conn, payload, source, signer):
    """Store one push; return (next index needed, acknowledgement or None, ImportResult or
    None). Raises Rejected(BAD_REQUEST) for a push that is not of the right shape or holds
    something that is not a receipt (then nothing of it is stored)."""
    device, first, raws = payload.get(1), payload.get(2), payload.get(3)
    if (not isinstance(device, bytes) or len(device) != 8 or not isinstance(first, int)
            or isinstance(first, bool) or not 0 <= first <= 0xFFFFFFFF
            or not isinstance(raws, list) or not all(isinstance(r, bytes) for r in raws)):
        raise errors.Rejected(errors.BAD_REQUEST, "push needs {1: device, 2: first index, 3: [receipts]}")
    result = None
    if raws:
        try:
            result = import_raw(conn, raws, source)
        except receipts_io.ReceiptFileError as e:
            # Not a receipt at all: keep nothing of this push; the meter will send it again.
            raise errors.Rejected(errors.BAD_REQUEST, str(e)) from None
    if result is not None and result.new < len(raws):
        # Some were stored before, maybe checked with another key than their span's (the
        # meter's new key was registered since): check those again.
        recheck(conn, device, first)
    pushed = {hashlib.sha256(r).digest() for r in raws}
    nxt, ack = acknowledgement(conn, signer, device, first, pushed)
    return nxt, ack, result


def pending_commands(conn, device, limit=MAX_COMMANDS):
    """The bytes of `device`'s pending commands for its current provisioning (each signed
    by the command key in force at its number: host/commands.py signing_kid), in number
    order, at most `limit`: field 3 of the answer to its push."""
    from . import commands
    return [row.raw for row in commands.pending_for(conn, device)[:limit]]


class HeadEnd:
    """Serve one WAN link (a serial port or any byte stream with read/write).

    signer: the issuer key that signs acknowledgements (keystore.unlock_active)."""

    def __init__(self, conn, stream, source, signer, log=None):
        self.conn = conn
        self.stream = stream
        self.source = source
        self.signer = signer
        self.log = log or (lambda message: None)
        self.deframer = han.Deframer()
        self.pushes = 0
        self.stored = 0
        self.acks = 0
        self.refused = 0
        self.commands = 0         # command bytes sent in answers (repeats counted)

    def poll(self):
        """Handle what has arrived (a bounded amount per call); return the number of frames
        answered."""
        answered = 0
        read = 0
        while read < _MAX_READ_PER_POLL:
            data = self.stream.read(_READ)
            if not data:
                break
            read += len(data)
            for body in self.deframer.feed(data):
                answered += self._answer(body)
        return answered

    def _answer(self, body):
        try:
            msg_type, msg_id, payload = han.decode_message(body)
        except errors.Rejected:
            return 0
        if msg_type != han.PUSH:
            reply_type, reply = han.ERROR, {1: errors.UNKNOWN_REQUEST}
        else:
            try:
                next_index, ack, result = handle_push(self.conn, payload, self.source,
                                                      self.signer)
                reply_type, reply = han.PUSH | han.RESPONSE, {1: next_index}
                self.pushes += 1
                new = result.new if result else 0
                bad = result.bad if result else 0
                self.stored += new
                first = payload[2]
                if ack is not None:
                    reply[2] = ack
                    self.acks += 1
                    held = "acknowledged #%d-#%d" % (first, next_index - 1)
                else:
                    held = "nothing acknowledged (#%d not held verified)" % first
                sent = pending_commands(self.conn, payload[1])
                if sent:
                    reply[3] = sent
                    self.commands += len(sent)
                    held += "; %d pending command(s) sent" % len(sent)
                self.log("meter %s: %d receipt(s) from #%d, %d new%s; %s" % (
                    registry.format_eui64(payload[1]), len(payload[3]), first, new,
                    ", %d with a bad signature" % bad if bad else "", held))
            except errors.Rejected as e:
                reply_type, reply = han.ERROR, {1: e.reason}
                self.refused += 1
                self.log("refused a push: %s" % e)
        self.stream.write(han.encode_message(reply_type, msg_id, reply))
        return 1

    def serve(self, idle_exit=None, stop=None, sleep=0.01):
        """Serve until `stop()` is true or, with idle_exit, until idle_exit seconds pass in
        which no new receipt was stored (traffic alone does not keep it running). Returns
        the seconds served."""
        t0 = last = time.monotonic()
        stored = self.stored
        while stop is None or not stop():
            now = time.monotonic()
            if idle_exit is not None and now - last >= idle_exit:
                break
            if self.poll():
                if self.stored != stored:
                    stored = self.stored
                    last = time.monotonic()
            else:
                time.sleep(sleep)
        return time.monotonic() - t0
