# A provisioned meter on a fake NOR flash, an issuer, a settable clock: the pieces every
# ledger test needs, for both VMs.
import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)

from boards.nor import NorFlash
from meter import provisioning
from meter.ledger import Ledger
from meter.store import Store
from protocol import cose, ed25519, receipt, voucher

DEVICE = b"\x70\xb3\xd5\xf0\x00\x00\x00\xa1"
OTHER_DEVICE = b"\x70\xb3\xd5\xf0\x00\x00\x00\xa2"
T0 = 1790000000
ISSUER_SEED = bytes(range(1, 33))
STRANGER_SEED = bytes(range(101, 133))
_keys = {}


def public(seed):
    if seed not in _keys:
        _keys[seed] = ed25519.public_key(seed)
    return _keys[seed]


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


class _ProvisioningBoard:
    def __init__(self, clock, seed=7):
        self.time = clock
        self._n = seed

    def random(self, n):
        self._n += 1
        return bytes((self._n * 37 + i * 11) & 0xFF for i in range(n))


def issue(seq, amount, device=DEVICE, expires=None, seed=ISSUER_SEED, issued=None):
    kid = cose.kid_for(public(seed))
    return voucher.encode(kid, lambda m: ed25519.sign(seed, m), device, seq, amount,
                          T0 - 60 if issued is None else issued, expires)


class Kit:
    """A provisioned meter: flash, store, ledger and clock; reboot() remounts the flash."""

    def __init__(self, initial=1000, limits=None, blocks=16, copy_of=None, seed=0):
        if copy_of is not None:
            # The same meter on a copy of its flash image (for power-cut runs).
            self.clock = Clock(copy_of.clock.now)
            self.public_key = copy_of.public_key
            self.flash = NorFlash(blocks=copy_of.flash.ioctl(4, 0),
                                  data=bytearray(copy_of.flash.data), seed=seed)
        else:
            self.clock = Clock()
            self.flash = NorFlash(blocks=blocks)
            store = Store(self.flash)
            store.mount()
            self.public_key = provisioning.provision(store, _ProvisioningBoard(self.clock), DEVICE,
                                                     [public(ISSUER_SEED)], limits, initial, T0)
        self.reboot()

    def copy(self, seed=0):
        return Kit(copy_of=self, seed=seed)

    def reboot(self):
        self.store = Store(self.flash)
        self.store.mount()
        self.ledger = Ledger(self.store, self.clock)
        return self.ledger

    def meter_keys(self):
        return {cose.kid_for(self.public_key): self.public_key}

    def receipts(self):
        """Every committed receipt still on flash, verified, with the chain checked."""
        out = []
        prev = None
        for index in range(self.store.receipt_count):
            raw = self.store.receipt(index)
            if raw is None:
                prev = None  # fell out of the ring: the chain restarts from what is kept
                continue
            r = receipt.verify(raw, self.meter_keys())
            assert r.index == index
            assert prev is None or r.prev == prev, "receipt chain broken at %d" % index
            prev = r.hash
            out.append(r)
        return out
