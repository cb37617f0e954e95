# Building and signing the meter's receipts (SPEC.md §4).
from protocol import cose, ed25519, receipt


class ReceiptSigner:
    def __init__(self, device, seed, public):
        self.device = device
        self._seed = seed
        self.kid = cose.kid_for(public)

    def _sign(self, message):
        return ed25519.sign(self._seed, message)

    def make(self, index, kind, time, prev, before, after, **extra):
        fields = {
            receipt.K_DEVICE: self.device,
            receipt.K_INDEX: index,
            receipt.K_KIND: kind,
            receipt.K_TIME: time,
            receipt.K_PREV: prev,
            receipt.K_BEFORE: before,
            receipt.K_AFTER: after,
        }
        if "sequence" in extra:
            fields[receipt.K_SEQUENCE] = extra["sequence"]
        if "voucher" in extra:
            fields[receipt.K_VOUCHER] = extra["voucher"]
        if "amount" in extra:
            fields[receipt.K_AMOUNT] = extra["amount"]
        if "rejections" in extra:
            fields[receipt.K_REJECTIONS] = extra["rejections"]
        if "faults" in extra:
            fields[receipt.K_FAULTS] = extra["faults"]
        if extra.get("form", receipt.FORM_VOUCHER) != receipt.FORM_VOUCHER:
            fields[receipt.K_FORM] = extra["form"]      # absent: a voucher (SPEC.md §4)
        if "supply" in extra:
            fields[receipt.K_SUPPLY] = extra["supply"]
        if "command_kind" in extra:
            fields[receipt.K_COMMAND_KIND] = extra["command_kind"]
        if "tariff" in extra:
            fields[receipt.K_TARIFF] = extra["tariff"]
        return receipt.encode(self.kid, self._sign, fields)
