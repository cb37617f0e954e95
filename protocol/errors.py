# Reason codes (SPEC.md §2.1) and the one exception every codec raises on bad input.

OK = 0
MALFORMED = 1
BAD_HEADER = 2
UNKNOWN_KEY = 3
BAD_SIGNATURE = 4
WRONG_DEVICE = 5
OVER_VOUCHER_LIMIT = 6
EXPIRED = 7
STALE = 8
SEQUENCE_REUSED = 9
OVER_CREDIT_LIMIT = 10
BAD_REQUEST = 11
UNKNOWN_REQUEST = 12
BUSY = 13
NOT_PROVISIONED = 14
STORAGE = 15
EC_UNAVAILABLE = 16
RECEIPT_LOST = 17
DAMAGED = 18
CODE_WRONG = 19
CODE_TYPO = 20
CODE_INCOMPLETE = 21
CODE_LOCKED = 22
KEY_REVOKED = 23
COMMAND_OUT_OF_ORDER = 24
COMMAND_REPLAYED = 25
COMMAND_REFUSED = 26

NAMES = {
    OK: "OK",
    MALFORMED: "MALFORMED",
    BAD_HEADER: "BAD_HEADER",
    UNKNOWN_KEY: "UNKNOWN_KEY",
    BAD_SIGNATURE: "BAD_SIGNATURE",
    WRONG_DEVICE: "WRONG_DEVICE",
    OVER_VOUCHER_LIMIT: "OVER_VOUCHER_LIMIT",
    EXPIRED: "EXPIRED",
    STALE: "STALE",
    SEQUENCE_REUSED: "SEQUENCE_REUSED",
    OVER_CREDIT_LIMIT: "OVER_CREDIT_LIMIT",
    BAD_REQUEST: "BAD_REQUEST",
    UNKNOWN_REQUEST: "UNKNOWN_REQUEST",
    BUSY: "BUSY",
    NOT_PROVISIONED: "NOT_PROVISIONED",
    STORAGE: "STORAGE",
    EC_UNAVAILABLE: "EC_UNAVAILABLE",
    RECEIPT_LOST: "RECEIPT_LOST",
    DAMAGED: "DAMAGED",
    CODE_WRONG: "CODE_WRONG",
    CODE_TYPO: "CODE_TYPO",
    CODE_INCOMPLETE: "CODE_INCOMPLETE",
    CODE_LOCKED: "CODE_LOCKED",
    KEY_REVOKED: "KEY_REVOKED",
    COMMAND_OUT_OF_ORDER: "COMMAND_OUT_OF_ORDER",
    COMMAND_REPLAYED: "COMMAND_REPLAYED",
    COMMAND_REFUSED: "COMMAND_REFUSED",
}


def name(code):
    return NAMES.get(code, "UNKNOWN_%d" % code)


class Rejected(Exception):
    """Input refused by a protocol rule. `reason` is a code above; `detail` says why."""

    def __init__(self, reason, detail=""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self):
        if self.detail:
            return "%s: %s" % (name(self.reason), self.detail)
        return name(self.reason)
