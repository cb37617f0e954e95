# Test data for reconciliation (no tests here): an issuer database built with the real
# host.issuer, and meters that sign their receipts with PyNaCl exactly as the firmware
# does (protocol.receipt.encode with the meter's own Ed25519 key, chained by SHA-256),
# whose public keys are registered with their devices.
import nacl.signing

from host import db, issuer, keystore, registry
from protocol import receipt as pr
from protocol import voucher as pv
from protocol.cose import kid_for
from protocol.window import ReplayWindow

PASS = "reconcile test passphrase"
T0 = 1_760_000_000  # 2025-10-09T08:53:20Z: the day vouchers are issued
DAY = 86400
A = bytes.fromhex("70b3d5f0000000a1")
B = bytes.fromhex("70b3d5f0000000b2")
C = bytes.fromhex("70b3d5f0000000c3")  # never registered


class Meter:
    """A meter's receipt log: the ledger's arithmetic (balances in milli-pence, metering
    lowers the balance between receipts) and its signing, without the flash."""

    def __init__(self, device, seed_byte):
        self.device = device
        self.key = nacl.signing.SigningKey(bytes([seed_byte]) * 32)
        self.public = bytes(self.key.verify_key)
        self.kid = kid_for(self.public)
        self.index = 0
        self.prev = pr.GENESIS
        self.balance = 0
        self.window = ReplayWindow()
        self.floor = 0
        self.first_index = 0
        self.receipts = []

    def reset(self, seed_byte, floor=0, opening=0):
        """A factory reset and provisioning, as the firmware does them (SPEC.md §2.2, §4):
        a new key whose first receipt continues the index and starts a new chain, a fresh
        ledger (opening balance, empty window) and the larger of the old ledger's highest
        sequence and `floor` (the supplier's) as the sequence floor. Returns the floor."""
        self.key = nacl.signing.SigningKey(bytes([seed_byte]) * 32)
        self.public = bytes(self.key.verify_key)
        self.kid = kid_for(self.public)
        self.floor = max(self.floor, self.window.highest, floor)
        self.first_index = self.index
        self.prev = pr.GENESIS
        self.balance = opening
        self.window = ReplayWindow()
        return self.floor

    def _sign(self, msg):
        return self.key.sign(msg).signature

    def make(self, kind, t, before, after, index=None, prev=None, **extra):
        """A signed receipt (not added to the log)."""
        fields = {pr.K_DEVICE: self.device, pr.K_INDEX: self.index if index is None else index,
                  pr.K_KIND: kind, pr.K_TIME: t, pr.K_PREV: self.prev if prev is None else prev,
                  pr.K_BEFORE: before, pr.K_AFTER: after}
        for name, k in (("sequence", pr.K_SEQUENCE), ("voucher", pr.K_VOUCHER),
                        ("amount", pr.K_AMOUNT), ("rejections", pr.K_REJECTIONS),
                        ("faults", pr.K_FAULTS), ("form", pr.K_FORM), ("supply", pr.K_SUPPLY)):
            if name in extra:
                fields[k] = extra[name]
        return pr.encode(self.kid, self._sign, fields)

    def emit(self, kind, t, before, after, **extra):
        raw = self.make(kind, t, before, after, **extra)
        self.receipts.append(raw)
        self.index += 1
        self.prev = pr.chain_hash(raw)
        return raw

    def apply(self, voucher_raw, t, amount=None, check_window=True):
        """Apply a voucher as the ledger does; `amount` overrides what the receipt says."""
        v = pv.parse(voucher_raw)
        if check_window:
            assert v.sequence > self.floor and not self.window.is_used(v.sequence)
            self.window.mark(v.sequence)
        amount = v.amount if amount is None else amount
        before = self.balance
        self.balance += amount * 1000
        return self.emit(pr.TOPUP, t, before, self.balance, sequence=v.sequence,
                         voucher=v.ref, amount=amount)

    def apply_code(self, digits, sequence, amount, t, form=pr.FORM_CODE, supply=None):
        """Apply a keypad code as the ledger does (SPEC.md §8): its receipt names it by its
        reference (SHA-256 of "OTU1 code " and the 20 digits, first 16 bytes), form 2."""
        import hashlib
        assert sequence > self.floor and not self.window.is_used(sequence)
        self.window.mark(sequence)
        before = self.balance
        self.balance += amount * 1000
        extra = {} if supply is None else {"supply": supply}
        return self.emit(pr.TOPUP, t, before, self.balance, sequence=sequence,
                         voucher=hashlib.sha256(b"OTU1 code " + digits.encode()).digest()[:16],
                         amount=amount, form=form, **extra)

    def use(self, mp):
        self.balance -= mp

    def emergency(self, pence, t):
        return self.emit(pr.EMERGENCY, t, self.balance, self.balance, amount=pence)

    def rejections(self, counts, t):
        return self.emit(pr.REJECTIONS, t, self.balance, self.balance, rejections=counts)

    def faults(self, counts, t):
        """A fault receipt (kind 4): what the store found at start-up (SPEC.md §4.1)."""
        return self.emit(pr.FAULT, t, self.balance, self.balance, faults=counts)


class World:
    """A supplier database with two registered meters (keys registered) and vouchers."""

    def __init__(self, path, a_count=10, b_count=5, b_expires_days=30):
        self.path = str(path)
        self.conn = db.create(self.path)
        keystore.new_key(self.conn, PASS, seed=bytes(range(32)), now=T0 - DAY)
        self.signer = keystore.unlock_active(self.conn, PASS)
        self.a = Meter(A, 0xA1)
        self.b = Meter(B, 0xB2)
        registry.add_device(self.conn, A, public_key=self.a.public, label="1 Mill Lane",
                            now=T0 - DAY)
        registry.add_device(self.conn, B, public_key=self.b.public, label="2 Mill Lane",
                            now=T0 - DAY)
        self.va = issuer.issue(self.conn, self.signer, A, 1000, a_count, now=T0)
        self.vb = issuer.issue(self.conn, self.signer, B, 500, b_count, now=T0,
                               expires_in=b_expires_days * DAY)

    def forge(self, device, sequence, amount, issued=T0, expires=None):
        """A voucher signed by the issuer key but never recorded in the database."""
        return pv.encode(self.signer.kid, self.signer.sign, device, sequence, amount, issued,
                         expires)

    def close(self):
        self.conn.close()


def normal_life(w):
    """A's meter applies vouchers 1-6 over six days with metering, takes emergency credit
    and records rejections; B's applies vouchers 1-2. No anomalies."""
    a, b = w.a, w.b
    for i in range(6):
        t = T0 + (i + 1) * DAY
        a.use(650_500 if i else 0)
        if i == 3:
            a.use(a.balance - 100_000)  # run down to £1: below the emergency threshold
            a.emergency(500, t - 3600)
            a.use(120_000)
        a.apply(w.va[i].cose, t)
        if i == 4:
            a.rejections({4: 2, 8: 1}, t + 60)
    for i in range(2):
        b.use(777_000)
        b.apply(w.vb[i].cose, T0 + (i + 2) * DAY + 7200)
    return a.receipts + b.receipts
