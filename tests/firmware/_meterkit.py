# A provisioned meter on a fake NOR flash, an issuer, a settable clock: the pieces every
# ledger test needs, for both VMs.
import tests.firmware._fw  # noqa: F401  (puts firmware/ on sys.path)

from boards.nor import NorFlash
from meter import provisioning
from meter.ledger import Ledger
from meter.store import Store
from protocol import cose, ed25519, keycode, receipt, voucher, x25519

DEVICE = b"\x70\xb3\xd5\xf0\x00\x00\x00\xa1"
OTHER_DEVICE = b"\x70\xb3\xd5\xf0\x00\x00\x00\xa2"
T0 = 1790000000
ISSUER_SEED = bytes(range(1, 33))
STRANGER_SEED = bytes(range(101, 133))
CODE_SECRET = bytes(range(201, 233))     # the supplier's X25519 code key (private)
COMMAND_SEED = bytes(range(151, 183))    # the supplier's command key (SPEC §10)
_keys = {}
_code_keys = {}


def public(seed):
    if seed not in _keys:
        _keys[seed] = ed25519.public_key(seed)
    return _keys[seed]


def code_public():
    """The supplier's code key (public), as provisioning installs it on a meter."""
    if "public" not in _code_keys:
        _code_keys["public"] = x25519.public_key(CODE_SECRET)
    return _code_keys["public"]


def supplier_code_key(ka_public, device=DEVICE):
    """The per-meter code key as the supplier derives it (SPEC §8) from its own private key
    and the meter's registered key-agreement public key: what the issuer signs codes with."""
    k = (ka_public, device)
    if k not in _code_keys:
        shared = x25519.x25519(CODE_SECRET, ka_public)
        _code_keys[k] = keycode.derive_key(shared, device, code_public(), ka_public)
    return _code_keys[k]


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

    def __init__(self, initial=1000, limits=None, blocks=16, copy_of=None, seed=0, codes=False,
                 floor=0, commands=False):
        """codes: provision with the supplier's code key (keypad codes, SPEC §8);
        floor: the supplier's highest issued sequence at provisioning; commands: provision
        with the supplier's command key (signed commands, SPEC §10)."""
        if copy_of is not None:
            # The same meter on a copy of its flash image (for power-cut runs).
            self.clock = Clock(copy_of.clock.now)
            self.public_key = copy_of.public_key
            self.ka_public = copy_of.ka_public
            self.flash = NorFlash(blocks=copy_of.flash.ioctl(4, 0),
                                  data=bytearray(copy_of.flash.data), seed=seed)
        else:
            self.clock = Clock()
            self.flash = NorFlash(blocks=blocks)
            store = Store(self.flash)
            store.mount()
            self.public_key = provisioning.provision(store, _ProvisioningBoard(self.clock), DEVICE,
                                                     [public(ISSUER_SEED)], limits, initial, T0,
                                                     floor, 0, code_public() if codes else None,
                                                     public(COMMAND_SEED) if commands else None)
            # the meter's key-agreement public key, as `topup provision` registers it
            from meter import config as cfg
            self.ka_public = cfg.decode(store.config)[cfg.C_KA_PUBLIC]
        self.reboot()

    def code(self, seq, amount, device=DEVICE):
        """A keypad code for this meter (or another device), as the supplier issues it,
        shown in groups of four as the customer reads it."""
        return keycode.grouped(keycode.encode(supplier_code_key(self.ka_public, device), device, amount, seq))

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


def command(number, kind, args, device=DEVICE, seed=COMMAND_SEED, issued=None, strict=True):
    """A signed command (SPEC §10) as the supplier makes it, by default with its command key."""
    from protocol import command as command_format
    return command_format.encode(cose.kid_for(public(seed)), lambda m: ed25519.sign(seed, m),
                                 device, number, kind, T0 - 60 if issued is None else issued,
                                 args, strict)
