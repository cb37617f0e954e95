# X25519 (RFC 7748 §5) for CPython and MicroPython; runs unchanged on both.
#
#   x25519(k, u) -> 32 bytes       the Montgomery ladder on Curve25519; ValueError if the
#                                   result is all zero (a small-order u: libsodium refuses it too)
#   public_key(k) -> 32 bytes      x25519(k, 9)
#
# Used once per meter at provisioning (the keypad-code key, SPEC.md §8), never per code, so
# it is written for clarity, not speed. Nothing here is constant-time.

P = (1 << 255) - 19
_A24 = 121665
BASE = b"\x09" + bytes(31)


def _scalar(k):
    k = bytearray(k)
    if len(k) != 32:
        raise ValueError("X25519 scalar must be 32 bytes")
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return int.from_bytes(bytes(k), "little")


def _u(u):
    u = bytearray(u)
    if len(u) != 32:
        raise ValueError("X25519 u-coordinate must be 32 bytes")
    u[31] &= 127                 # the top bit is ignored (RFC 7748 §5)
    return int.from_bytes(bytes(u), "little") % P


def x25519(k, u):
    """The shared secret of scalar k and u-coordinate u (both 32 bytes)."""
    n = _scalar(k)
    x1 = _u(u)
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    for t in range(254, -1, -1):
        bit = (n >> t) & 1
        if swap ^ bit:
            x2, x3 = x3, x2
            z2, z3 = z3, z2
        swap = bit
        a = (x2 + z2) % P
        aa = a * a % P
        b = (x2 - z2) % P
        bb = b * b % P
        e = (aa - bb) % P
        c = (x3 + z3) % P
        d = (x3 - z3) % P
        da = d * a % P
        cb = c * b % P
        s = (da + cb) % P
        x3 = s * s % P
        s = (da - cb) % P
        z3 = x1 * (s * s % P) % P
        x2 = aa * bb % P
        z2 = e * ((aa + _A24 * e) % P) % P
    if swap:
        x2, z2 = x3, z3
    out = x2 * pow(z2, P - 2, P) % P
    if out == 0:
        raise ValueError("X25519 result is zero (small-order point)")
    return out.to_bytes(32, "little")


def public_key(k):
    return x25519(k, BASE)
