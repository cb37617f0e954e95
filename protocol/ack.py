# The head end's acknowledgement of receipts on the WAN uplink (SPEC.md §5.1): a COSE_Sign1
# signed by an issuer key the meter trusts, naming the meter, its receipt key, the next
# receipt index the head end needs and the hash of the receipt before it. The meter lets a
# receipt leave its flash only on such an acknowledgement, so nothing on the link can make
# it discard a receipt the supplier does not hold with a verified signature.
from . import cbor, cose
from .errors import Rejected, MALFORMED, UNKNOWN_KEY, BAD_SIGNATURE, WRONG_DEVICE

# Signed as external AAD: an acknowledgement's signature can never pass for a voucher's
# (whose AAD is empty), nor the other way round.
AAD = b"OTU1 receipt acknowledgement"

K_DEVICE = 1
K_METER_KID = 2
K_NEXT = 3
K_HASH = 4
_KEYS = (K_DEVICE, K_METER_KID, K_NEXT, K_HASH)


class Ack:
    def __init__(self, device, meter_kid, next_index, last_hash):
        self.device = device
        self.meter_kid = meter_kid
        self.next_index = next_index
        self.last_hash = last_hash


def _check(device, meter_kid, next_index, last_hash):
    if not isinstance(device, bytes) or len(device) != 8:
        raise Rejected(MALFORMED, "ack device must be 8 bytes")
    if not isinstance(meter_kid, bytes) or len(meter_kid) != cose.KID_LEN:
        raise Rejected(MALFORMED, "ack meter key id must be %d bytes" % cose.KID_LEN)
    if not isinstance(next_index, int) or isinstance(next_index, bool) or not 1 <= next_index <= 0xFFFFFFFF:
        raise Rejected(MALFORMED, "ack next index must be 1..2^32-1")
    if not isinstance(last_hash, bytes) or len(last_hash) != 32:
        raise Rejected(MALFORMED, "ack hash must be 32 bytes")


def encode(kid, sign, device, meter_kid, next_index, last_hash):
    """A signed acknowledgement: the head end holds, verified, every receipt of this meter
    key from the push's first index up to next_index - 1, whose hash is last_hash."""
    _check(device, meter_kid, next_index, last_hash)
    payload = cbor.encode({K_DEVICE: device, K_METER_KID: meter_kid, K_NEXT: next_index,
                           K_HASH: last_hash})
    return cose.encode(kid, payload, sign, AAD)


def verify(data, trusted, device, verify_sig=None):
    """Check an acknowledgement; return the Ack or raise Rejected.

    trusted: {kid: issuer public key}; device: this meter's EUI-64."""
    msg = cose.decode(data)
    public = trusted.get(msg.kid)
    if public is None:
        raise Rejected(UNKNOWN_KEY, "ack signed by an unknown key")
    if verify_sig is None:
        from .ed25519 import verify as verify_sig
    if not msg.verify(public, verify_sig, AAD):
        raise Rejected(BAD_SIGNATURE, "ack signature does not verify")
    fields = cbor.decode(msg.payload)
    if not isinstance(fields, dict) or len(fields) != len(_KEYS):
        raise Rejected(MALFORMED, "ack payload must be a map of %d fields" % len(_KEYS))
    for key in _KEYS:
        if key not in fields:
            raise Rejected(MALFORMED, "ack field %d missing" % key)
    a = Ack(fields[K_DEVICE], fields[K_METER_KID], fields[K_NEXT], fields[K_HASH])
    _check(a.device, a.meter_kid, a.next_index, a.last_hash)
    if a.device != device:
        raise Rejected(WRONG_DEVICE, "ack is for another meter")
    return a
