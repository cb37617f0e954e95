# The meter's side of the HAN (SPEC.md §5). The HAN is untrusted: every request is
# answered or dropped, nothing raised out of here can stop the main loop, and only a
# valid signed voucher or keypad code changes credit. Work per main-loop step is bounded
# (SPEC.md §5.2), so no traffic can hold up metering, the relay, the uplink or checkpoints.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from protocol import cbor, errors, han
from protocol.errors import Rejected
from meter import config as cfg

# Request types beside protocol.han's (SPEC.md §5): a keypad code (§8), a customer
# action (§9) and its two actions.
_CODE = const(5)
_ACTION = const(6)
_COMMAND = const(7)      # a signed command (§10)
# Ledger.admin's layout (meter/admin.py: KID, LAST, PENDING)
_KID = const(1)
_LAST = const(2)
_PENDING = const(8)
_ACTION_CONFIRM = const(1)
_ACTION_EMERGENCY = const(2)

_READ_CHUNK = const(64)
# Per step: read at most about one largest frame, answer at most this many requests, of
# which at most one may sign a receipt or check a signature (a submit: a voucher, a code or
# a customer action).
MAX_READ_PER_STEP = const(1088)
MAX_REQUESTS_PER_STEP = const(4)
# Complete frames waiting for a later step; more than this in one burst are dropped (the
# HAN is lossy anyway: a PPMID retries what it gets no answer to).
_QUEUE = const(4)


class HanServer:
    def __init__(self, ledger, stream, wan_up=None):
        self.ledger = ledger
        self.stream = stream
        self.wan_up = wan_up or (lambda: False)
        self.deframer = han.Deframer()
        self._queue = []
        self.handled = 0
        self.failed = 0
        self.dropped = 0

    @property
    def backlog(self):
        """Complete requests read but not yet answered (they wait for the next steps)."""
        return len(self._queue)

    def poll(self):
        """One step's share of the HAN: read a bounded amount, answer a bounded number of
        requests (at most one submit). Return the number of requests handled."""
        queue = self._queue
        read = 0
        while len(queue) < _QUEUE and read < MAX_READ_PER_STEP:
            data = self.stream.read(_READ_CHUNK)
            if not data:
                break
            read += len(data)
            for body in self.deframer.feed(data):
                if len(queue) < _QUEUE:
                    queue.append(body)
                else:
                    self.dropped += 1
        count = 0
        submits = 0
        while queue and count < MAX_REQUESTS_PER_STEP:
            if _is_submit(queue[0]):
                if submits:
                    break             # one signature check per step
                submits += 1
            self._answer(queue.pop(0))
            count += 1
        return count

    def _answer(self, body):
        msg_id = None
        try:
            msg_type, msg_id, payload = han.decode_message(body)
            reply_type, reply = self.handle(msg_type, payload)
        except Rejected as e:
            self.failed += 1
            reply_type, reply = han.ERROR, {1: e.reason}
            fields = getattr(e, "fields", None)     # CODE_LOCKED: {2: s}; CODE_WRONG: {3: n}
            if fields:
                reply.update(fields)
        except MemoryError:
            # Not the request's fault: the PPMID may retry (SPEC.md §2.1, BUSY).
            self.failed += 1
            reply_type, reply = han.ERROR, {1: errors.BUSY}
        except Exception:  # noqa: BLE001 - untrusted input must never stop the meter
            self.failed += 1
            reply_type, reply = han.ERROR, {1: errors.BAD_REQUEST}
        if msg_id is None:
            msg_id = _peek_id(body)
            if msg_id is None:
                return  # not even an id to answer to: dropped
        self.handled += 1
        try:
            self.stream.write(han.encode_message(reply_type, msg_id, reply))
        except Exception:  # noqa: BLE001 - a failing link (or memory) must not stop the meter
            pass

    def handle(self, msg_type, payload):
        if msg_type == han.STATUS:
            return han.STATUS | han.RESPONSE, self.status()
        if msg_type == han.SUBMIT or msg_type == _COMMAND:
            data = payload.get(1)
            if not isinstance(data, bytes):
                raise Rejected(errors.BAD_REQUEST, "submit needs {1: voucher or command bytes}")
            if msg_type == _COMMAND:
                receipt, duplicate = self.ledger.submit_command(data)
            else:
                receipt, duplicate = self.ledger.submit(data)
            return msg_type | han.RESPONSE, {1: receipt, 2: duplicate}
        if msg_type == han.RECEIPTS:
            return han.RECEIPTS | han.RESPONSE, self.receipts(payload)
        if msg_type == _CODE:
            text = payload.get(1)
            if not isinstance(text, str):
                raise Rejected(errors.BAD_REQUEST, "a code needs {1: the code as typed (text)}")
            receipt, duplicate = self.ledger.submit_code(text)
            return _CODE | han.RESPONSE, {1: receipt, 2: duplicate}
        if msg_type == _ACTION:
            return _ACTION | han.RESPONSE, self.action(payload.get(1))
        raise Rejected(errors.UNKNOWN_REQUEST, "unknown request type %d" % msg_type)

    def status(self):
        ledger = self.ledger
        out = {
            1: ledger.device if ledger.provisioned else b"",
            2: cfg.FIRMWARE_VERSION,
            3: ledger.balance_mp,
            4: ledger.supply_on(),
            5: bool(self.wan_up()),
            6: ledger.highest,
            7: ledger.receipt_count,
            8: ledger.emergency_mp,
            9: dict(ledger.faults),
            10: ledger.clock(),
            11: ledger.clock.reset_at_boot,
            12: ledger.floor,
            13: bool(ledger.damaged),
            14: ledger.store.oldest_receipt,
            15: ledger.supply_state,
            16: ledger.code_locked_for,
            17: ledger.code_tries_left,
            18: ledger.provisioned and ledger.code_key is not None,
        }
        a = ledger.admin
        if a is not None:
            # Signed commands (SPEC.md §10): only a meter with a command key says these.
            out[19] = a[_LAST]
            out[20] = a[_KID]
            out[21] = a[_PENDING][0][0] if a[_PENDING] else 0
        return out

    def action(self, what):
        """The customer's action from the PPMID (SPEC.md §9): confirm an armed supply (a
        confirm when it is not armed changes nothing and says the state), or take
        emergency credit (its receipt comes back)."""
        ledger = self.ledger
        if what == _ACTION_CONFIRM and not isinstance(what, bool):
            return {1: ledger.confirm_supply()}
        if what == _ACTION_EMERGENCY:
            receipt = ledger.take_emergency_credit()
            return {1: ledger.supply_state, 2: receipt}
        raise Rejected(errors.BAD_REQUEST, "an action is {1: 1 (confirm) or 2 (emergency credit)}")

    def receipts(self, payload):
        start = payload.get(1, 0)
        count = payload.get(2, han.MAX_RECEIPTS_PER_READ)
        if (not isinstance(start, int) or not isinstance(count, int) or isinstance(start, bool)
                or isinstance(count, bool) or start < 0 or not 1 <= count <= han.MAX_RECEIPTS_PER_READ):
            raise Rejected(errors.BAD_REQUEST, "read receipts needs {1: from >= 0, 2: count 1..4}")
        total = self.ledger.receipt_count
        out = []
        for index in range(start, min(start + count, total)):
            raw = self.ledger.store.receipt(index)
            if raw is not None:
                out.append(raw)
        return {1: out, 2: total}


def _is_submit(body):
    # [2, id, {...}] starts 0x83 0x02 in deterministic CBOR (0x05 a code, 0x06 an action,
    # 0x07 a command): the requests that may sign a receipt, check a signature or write flash.
    return len(body) > 1 and body[0] == 0x83 and (body[1] == han.SUBMIT or body[1] == _CODE
                                                  or body[1] == _ACTION or body[1] == _COMMAND)


def _peek_id(body):
    # A body that is not [type, id, payload] may still carry a usable id: answer it if so.
    try:
        msg = cbor.decode(body)
        if isinstance(msg, list) and len(msg) >= 2 and isinstance(msg[1], int) and 0 <= msg[1] <= 0xFFFF:
            return msg[1]
    except Exception:  # noqa: BLE001
        pass
    return None
