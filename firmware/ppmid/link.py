# The PPMID's side of the HAN (SPEC.md §5): one request at a time to the meter, never
# blocking the main loop. `send` writes a frame (after a 0x00 that flushes any partial
# frame at the meter); `poll` reads a bounded amount and returns the answer once it comes,
# or a timeout once every try has had its time. A try that gets no answer is sent again
# with the same id, so a late answer to an earlier try still counts (a code or voucher
# resubmitted is idempotent at the meter: the original receipt comes back).
#
# Nothing that arrives can raise out of here: frames that do not decode, answers to other
# ids (the engineer's tool on the same HAN), wrong types are all dropped.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from protocol import han

TIMEOUT_MS = const(1500)      # a try of a status, code or action: the meter answers in ms
SIGNED_TIMEOUT_MS = const(4000)   # a voucher: an Ed25519 check takes up to ~1 s on a Pico
TRIES = const(2)
_READ_PER_POLL = const(512)
_READ_CHUNK = const(128)
# Ids 0x4000-0x7FFF: apart from the engineer's HAN client (from 1) and the rig's (0xC000+).
_ID_BASE = const(0x4000)
_ID_SPAN = const(0x4000)

# What poll() returns
ANSWER = const(1)      # (ANSWER, tag, response type, payload, tries used)
TIMEOUT = const(2)     # (TIMEOUT, tag, None, None, tries used)


class Link:
    def __init__(self, stream, timeout_ms=TIMEOUT_MS, tries=TRIES):
        self.stream = stream
        self.timeout_ms = timeout_ms
        self.tries = tries
        self.deframer = han.Deframer()
        self._seq = 0
        self._frame = None
        self._type = 0
        self._id = 0
        self._tag = None
        self._sent = 0
        self._try = 0
        self._timeout = timeout_ms
        self.answered = 0
        self.timeouts = 0

    @property
    def busy(self):
        return self._frame is not None

    @property
    def tag(self):
        return self._tag

    def send(self, msg_type, payload, tag, now, timeout_ms=None):
        """Send a request (dropping any not yet answered); its answer comes from poll().
        timeout_ms: per try (default: the link's)."""
        self._timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        self._seq = (self._seq + 1) % _ID_SPAN
        self._id = _ID_BASE + self._seq
        self._type = msg_type
        self._tag = tag
        self._frame = b"\x00" + han.encode_message(msg_type, self._id, payload)
        self._try = 0
        self._write(now)

    def cancel(self):
        self._frame = None
        self._tag = None

    def _write(self, now):
        self._try += 1
        self._sent = now
        try:
            self.stream.write(self._frame)
        except Exception:  # noqa: BLE001 - a failing UART is a meter that does not answer
            pass

    def poll(self, now):
        """Read what has arrived (bounded); return the outcome of the pending request once
        there is one, else None."""
        got = None
        read = 0
        while read < _READ_PER_POLL:
            try:
                data = self.stream.read(_READ_CHUNK)
            except Exception:  # noqa: BLE001
                data = None
            if not data:
                break
            read += len(data)
            for body in self.deframer.feed(data):
                if got is None and self._frame is not None:
                    got = self._match(body)
        if got is not None:
            return got
        if self._frame is not None and now - self._sent >= self._timeout:
            if self._try < self.tries:
                self._write(now)
                return None
            out = (TIMEOUT, self._tag, None, None, self._try)
            self.timeouts += 1
            self.cancel()
            return out
        return None

    def _match(self, body):
        try:
            rtype, rid, payload = han.decode_message(body)
        except Exception:  # noqa: BLE001 - not a message
            return None
        if rid != self._id:
            return None          # someone else's answer, or a late one to a dropped request
        if rtype != han.ERROR and rtype != (self._type | han.RESPONSE):
            return None
        out = (ANSWER, self._tag, rtype, payload, self._try)
        self.answered += 1
        self.cancel()
        return out
