"""The PPMID's side of the HAN (SPEC.md §5): requests to a meter over any byte stream.

The stream is anything with `read(n)` (returning what has arrived, possibly nothing) and
`write(data)`: a pyserial port on a USB-UART adapter, the virtual board's HAN pty, or a
test double. `topup han …` and the integrity suite both use this one client.
"""
import time

from protocol import errors, han, receipt as receipt_format

STATUS_FIELDS = {1: "device", 2: "firmware", 3: "balance_mp", 4: "supply_on", 5: "wan_up",
                 6: "highest_sequence", 7: "receipt_count", 8: "emergency_mp", 9: "faults",
                 10: "meter_time", 11: "clock_resumed", 12: "floor", 13: "damaged",
                 14: "oldest_receipt", 15: "supply_state", 16: "code_locked_s",
                 17: "code_tries_left", 18: "takes_codes", 19: "last_command",
                 20: "command_kid", 21: "pending_tariff"}

# Request types of keypad codes, customer actions and signed commands (SPEC.md §5, §8-10).
COMMAND = 7
CODE = 5
ACTION = 6
ACTION_CONFIRM = 1
ACTION_EMERGENCY = 2
SUPPLY_NAMES = {0: "interrupted", 1: "armed", 2: "on"}


class HanError(Exception):
    """The meter answered with a reason code (SPEC.md §2.1); for keypad codes with the
    seconds until code entry opens (`locked_s`, CODE_LOCKED) or the wrong codes left before
    a lockout (`tries_left`, CODE_WRONG), SPEC.md §5."""

    def __init__(self, reason, locked_s=None, tries_left=None):
        super().__init__(reason)
        self.reason = reason
        self.locked_s = locked_s if _uint(locked_s) else None
        self.tries_left = tries_left if _uint(tries_left) else None

    def __str__(self):
        text = "meter refused: %s (%d)" % (errors.name(self.reason), self.reason)
        why = self.explain()
        return "%s: %s" % (text, why) if why else text

    def explain(self):
        """What a keypad-code refusal means for the customer, in words ('' otherwise)."""
        r = self.reason
        if r == errors.CODE_WRONG:
            left = ("" if self.tries_left is None else
                    "; %d wrong code%s left before code entry locks" % (
                        self.tries_left, "" if self.tries_left == 1 else "s")
                    if self.tries_left else "; code entry is now locked")
            return "the code is wrong or not for this meter (it counts towards the lockout%s)" \
                % left
        if r == errors.CODE_LOCKED:
            if self.locked_s is None:
                return "code entry is locked after too many wrong codes"
            return ("code entry is locked after too many wrong codes for %s more "
                    "(vouchers are still accepted)" % minutes(self.locked_s))
        if r == errors.CODE_TYPO:
            return ("a digit is mistyped or two neighbours swapped (the check digit does not "
                    "fit): check the code and type it again; this does not count towards the "
                    "lockout")
        if r == errors.CODE_INCOMPLETE:
            return ("a code is 20 digits (spaces and dashes allowed, nothing else); this does "
                    "not count towards the lockout")
        return ""


def minutes(seconds):
    """Seconds left as the PPMID shows them: whole minutes, rounded up ('59 min')."""
    m = -(-int(seconds) // 60)
    if m >= 120:
        h, m = divmod(m, 60)
        return "%d h %02d min" % (h, m)
    return "%d min" % m


def _uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class HanTimeout(Exception):
    """No answer from the meter in time: not connected, not running, or not a meter."""


class HanClient:
    def __init__(self, stream, timeout=5.0):
        self.stream = stream
        self.timeout = timeout
        self.deframer = han.Deframer()
        self._next_id = 1

    @classmethod
    def open(cls, port, baudrate=115200, timeout=5.0):
        """A client on a serial port (a device path or any pyserial URL)."""
        import serial
        try:
            # Non-blocking reads: request() polls, so no read waits out a timeout.
            stream = serial.serial_for_url(port, baudrate=baudrate, timeout=0)
        except (serial.SerialException, OSError) as e:
            raise HanTimeout("cannot open HAN port %s: %s" % (port, e)) from None
        return cls(stream, timeout)

    def close(self):
        close = getattr(self.stream, "close", None)
        if close:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, msg_type, payload):
        """Send one request; return the response payload or raise HanError/HanTimeout."""
        msg_id = self._next_id
        self._next_id = self._next_id % 0xFFFF + 1
        # A leading delimiter flushes whatever partial frame the meter may be holding.
        self.stream.write(b"\x00" + han.encode_message(msg_type, msg_id, payload))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            data = self.stream.read(256)
            if not data:
                time.sleep(0.002)
                continue
            for body in self.deframer.feed(data):
                try:
                    rtype, rid, rpayload = han.decode_message(body)
                except errors.Rejected:
                    continue
                if rid != msg_id:
                    continue  # a late answer to an earlier request
                if rtype == han.ERROR:
                    raise HanError(rpayload.get(1, errors.BAD_REQUEST), rpayload.get(2),
                                   rpayload.get(3))
                if rtype != msg_type | han.RESPONSE:
                    continue
                return rpayload
        raise HanTimeout("no answer from the meter within %.1f s" % self.timeout)

    def status(self):
        raw = self.request(han.STATUS, {})
        return {name: raw.get(key) for key, name in STATUS_FIELDS.items()}

    def submit(self, voucher):
        """Submit voucher bytes; return (receipt bytes, duplicate)."""
        reply = self.request(han.SUBMIT, {1: bytes(voucher)})
        return reply[1], bool(reply.get(2))

    def submit_code(self, text):
        """Submit a keypad code as typed (SPEC.md §8); return (receipt bytes, duplicate)."""
        reply = self.request(CODE, {1: str(text)})
        return reply[1], bool(reply.get(2))

    def submit_command(self, command):
        """Submit a signed command's bytes (SPEC.md §10); return (receipt bytes, duplicate).
        A refusal is HanError (COMMAND_OUT_OF_ORDER, COMMAND_REPLAYED, COMMAND_REFUSED, ...)."""
        reply = self.request(COMMAND, {1: bytes(command)})
        return reply[1], bool(reply.get(2))

    def action(self, what):
        """A customer action (SPEC.md §9): ACTION_CONFIRM or ACTION_EMERGENCY. Returns
        (supply state, receipt bytes or None)."""
        reply = self.request(ACTION, {1: what})
        return reply.get(1), reply.get(2)

    def confirm(self):
        """Confirm an armed supply; return the supply state after it."""
        return self.action(ACTION_CONFIRM)[0]

    def emergency(self):
        """Take emergency credit; return (supply state, receipt bytes)."""
        return self.action(ACTION_EMERGENCY)

    def receipts(self, start=0):
        """Every receipt from index `start` to the newest, four per request."""
        out = []
        index = start
        # Receipt indices continue across factory resets: skip what the meter no longer
        # holds (status field 14; absent on older firmware) instead of asking four at a time.
        oldest = self.status().get("oldest_receipt")
        if isinstance(oldest, int) and oldest > index:
            index = oldest
        while True:
            reply = self.request(han.RECEIPTS, {1: index, 2: han.MAX_RECEIPTS_PER_READ})
            batch, total = reply[1], reply[2]
            out.extend(batch)
            if batch:
                index = receipt_format.parse(batch[-1]).index + 1
            else:
                index += han.MAX_RECEIPTS_PER_READ  # a stretch that left the ring
            if index >= total:
                return out
