# The meter's side of the HAN (SPEC.md §5). The HAN is untrusted: every request is
# answered or dropped, nothing raised out of here can stop the main loop, and only a
# valid signed voucher changes credit.
from protocol import cbor, errors, han
from protocol.errors import Rejected
from meter import config as cfg

_READ_CHUNK = 64


class HanServer:
    def __init__(self, ledger, stream, wan_up=None):
        self.ledger = ledger
        self.stream = stream
        self.wan_up = wan_up or (lambda: False)
        self.deframer = han.Deframer()
        self.handled = 0
        self.failed = 0

    def poll(self):
        """Read what has arrived, answer every complete request. Return requests handled."""
        count = 0
        while True:
            data = self.stream.read(_READ_CHUNK)
            if not data:
                return count
            for body in self.deframer.feed(data):
                self._answer(body)
                count += 1

    def _answer(self, body):
        msg_id = None
        try:
            msg_type, msg_id, payload = han.decode_message(body)
            reply_type, reply = self.handle(msg_type, payload)
        except Rejected as e:
            self.failed += 1
            reply_type, reply = han.ERROR, {1: e.reason}
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
        except Exception:  # noqa: BLE001 - a failing link must not stop the meter
            pass

    def handle(self, msg_type, payload):
        if msg_type == han.STATUS:
            return han.STATUS | han.RESPONSE, self.status()
        if msg_type == han.SUBMIT:
            data = payload.get(1)
            if not isinstance(data, bytes):
                raise Rejected(errors.BAD_REQUEST, "submit needs {1: voucher bytes}")
            receipt, duplicate = self.ledger.submit(data)
            return han.SUBMIT | han.RESPONSE, {1: receipt, 2: duplicate}
        if msg_type == han.RECEIPTS:
            return han.RECEIPTS | han.RESPONSE, self.receipts(payload)
        raise Rejected(errors.UNKNOWN_REQUEST, "unknown request type %d" % msg_type)

    def status(self):
        ledger = self.ledger
        return {
            1: ledger.device if ledger.provisioned else b"",
            2: cfg.FIRMWARE_VERSION,
            3: ledger.balance_mp,
            4: ledger.supply_on(),
            5: bool(self.wan_up()),
            6: ledger.highest,
            7: ledger.receipt_count,
            8: ledger.emergency_mp,
        }

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


def _peek_id(body):
    # A body that is not [type, id, payload] may still carry a usable id: answer it if so.
    try:
        msg = cbor.decode(body)
        if isinstance(msg, list) and len(msg) >= 2 and isinstance(msg[1], int) and 0 <= msg[1] <= 0xFFFF:
            return msg[1]
    except Exception:  # noqa: BLE001
        pass
    return None
