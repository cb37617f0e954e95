"""Generate tests/protocol/data/ed25519_edge.json: Ed25519 edge cases with libsodium's
verdict (PyNaCl's VerifyKey.verify) recorded for each.  CPython only; run once:

    .venv/bin/python tests/protocol/data/make_ed25519_edge.py

The point arithmetic used to *construct* cases (torsion points, a key with a torsion
component) is a tiny independent affine implementation here, not protocol.ed25519.
"""
import hashlib
import json
import os

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
BY = 4 * pow(5, P - 2, P) % P
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ed25519_edge.json")


def recover_x(y, sign):
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    x2 = u * pow(v, P - 2, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    if (x & 1) != sign:
        x = (P - x) % P
    return x


BX = recover_x(BY, 0)
B = (BX, BY)
O = (0, 1)


def add(p1, p2):
    x1, y1 = p1
    x2, y2 = p2
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P
    return x3, y3


def mul(n, pt):
    acc = O
    while n:
        if n & 1:
            acc = add(acc, pt)
        pt = add(pt, pt)
        n >>= 1
    return acc


def enc(pt):
    x, y = pt
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def dec(b):
    v = int.from_bytes(b, "little")
    y = v & ((1 << 255) - 1)
    x = recover_x(y % P, v >> 255)
    return None if x is None else (x, y % P)


def h_int(*parts):
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little")


def nacl_ok(pk, msg, sig):
    try:
        VerifyKey(pk).verify(msg, sig)
        return True
    except BadSignatureError:
        return False
    except Exception:  # e.g. wrong length
        return False


def torsion_points():
    # a point of order 8: clear the L-part of a random curve point until order 8
    y = 2
    while True:
        x = recover_x(y, 0)
        if x is not None:
            q = mul(L, (x, y))
            if mul(4, q) != O:
                break
        y += 1
    return [mul(i, q) for i in range(8)]  # O, order 8, 4, 8, 2, 8, 4, 8


def sign_with_scalar(a, prefix_seed, pk_bytes, msg, r_extra=None):
    """Signature with secret scalar a for the *given* pk bytes (which may carry a torsion
    part); R = [r]B (+ r_extra)."""
    r = h_int(prefix_seed, msg) % L
    R = mul(r, B)
    if r_extra is not None:
        R = add(R, r_extra)
    rb = enc(R)
    k = h_int(rb, pk_bytes, msg) % L
    s = (r + k * a) % L
    return rb, s, k


def main():
    cases = []

    def case(name, pk, msg, sig):
        cases.append({"name": name, "pk": pk.hex(), "msg": msg.hex(), "sig": sig.hex(),
                      "libsodium": nacl_ok(pk, msg, sig)})

    seed = bytes(range(1, 33))
    sk = SigningKey(seed)
    pk = bytes(sk.verify_key)
    msg = b"offline-topup edge cases"
    sig = sk.sign(msg).signature
    rb, s = sig[:32], int.from_bytes(sig[32:], "little")
    case("valid", pk, msg, sig)
    case("valid empty message", pk, b"", sk.sign(b"").signature)
    case("wrong message", pk, msg + b"!", sig)
    for bit in (0, 7, 100, 255, 256, 300, 511):
        bad = bytearray(sig)
        bad[bit // 8] ^= 1 << (bit % 8)
        case("sig bit %d flipped" % bit, pk, msg, bytes(bad))
    for bit in (0, 100, 254, 255):
        bad = bytearray(pk)
        bad[bit // 8] ^= 1 << (bit % 8)
        case("pk bit %d flipped" % bit, bytes(bad), msg, sig)

    # S out of range
    for name, s2 in (("S = L", L), ("S = L + 1", L + 1), ("S = s + L", s + L),
                     ("S = 2^253", 1 << 253), ("S = 2^256 - 1", (1 << 256) - 1),
                     ("S = L - 1", L - 1), ("S = 0", 0)):
        if s2 < 1 << 256:
            case(name, pk, msg, rb + s2.to_bytes(32, "little"))

    # non-canonical R: y + p encoding of the same R is impossible for valid R with y >= 19,
    # so build signatures whose honest R has y < 19 is infeasible; instead flip to y+p
    # spellings of small y (these are also small-order or off-curve) and a valid R with
    # its sign bit inverted.
    rbad = bytearray(rb)
    rbad[31] ^= 0x80
    case("R sign bit flipped", pk, msg, bytes(rbad) + sig[32:])

    # small-order points, canonical and non-canonical spellings
    tors = torsion_points()
    small_encs = []
    for i, t in enumerate(tors):
        e = enc(t)
        small_encs.append(("torsion[%d]" % i, e))
        e2 = bytearray(e)
        e2[31] ^= 0x80  # the other sign bit (x = 0 points: "negative zero")
        small_encs.append(("torsion[%d] sign flipped" % i, bytes(e2)))
        y = t[1]
        if y + P < 1 << 255:  # non-canonical y + p spelling
            v = (y + P) | ((t[0] & 1) << 255)
            small_encs.append(("torsion[%d] y+p" % i, v.to_bytes(32, "little")))
            small_encs.append(("torsion[%d] y+p sign flipped" % i,
                               (v ^ (1 << 255)).to_bytes(32, "little")))
    for name, e in small_encs:
        # small-order A with a signature that satisfies the equation for that A
        # (S = r, k*A contributes only torsion): libsodium must still refuse
        r = h_int(b"r", e) % L
        R = mul(r, B)
        case("A = " + name, e, msg, enc(R) + r.to_bytes(32, "little"))
        # small-order R with the real key
        k = h_int(e, pk, msg) % L
        a = int.from_bytes(hashlib.sha512(seed).digest()[:32], "little")
        a = (a & ((1 << 254) - 8)) | (1 << 254)
        case("R = " + name, pk, msg, e + ((k * a) % L).to_bytes(32, "little"))

    # non-canonical A: y + p spellings with y < 19 (on-curve or not)
    for y in range(19):
        for sign in (0, 1):
            v = (y + P) | (sign << 255)
            case("A non-canonical y=%d+p sign=%d" % (y, sign), v.to_bytes(32, "little"), msg, sig)
            v = y | (sign << 255)
            case("A canonical y=%d sign=%d" % (y, sign), v.to_bytes(32, "little"), msg, sig)

    # A not on the curve
    y = 2
    n = 0
    while n < 4:
        if recover_x(y, 0) is None:
            case("A not on curve y=%d" % y, y.to_bytes(32, "little"), msg, sig)
            case("R not on curve y=%d" % y, pk, msg, y.to_bytes(32, "little") + sig[32:])
            n += 1
        y += 1
    case("A = all ones", b"\xff" * 32, msg, sig)
    case("A = 2^255 - 1 - 0x80", bytes([0xFF] * 31 + [0x7F]), msg, sig)
    case("R = all ones", pk, msg, b"\xff" * 32 + sig[32:])

    # mixed-order keys: A' = A + T (T torsion of order 2, 4, 8).  The signature is made
    # with the secret scalar of A and k computed over A' bytes.  Then
    #   [S]B - [k]A' = R - [k]T  which equals R iff [k]T = O (k divisible by ord(T)),
    # while the cofactored check [8]([S]B - [k]A' - R) = O always passes.
    a = int.from_bytes(hashlib.sha512(seed).digest()[:32], "little")
    a = (a & ((1 << 254) - 8)) | (1 << 254)
    A = mul(a, B)
    for ti in (1, 2, 4):
        T = tors[ti]
        Ap = enc(add(A, T))
        found_bad = found_good = False
        for j in range(200):
            m = msg + b" torsion %d/%d" % (ti, j)
            rb2, s2, k = sign_with_scalar(a, b"prefix", Ap, m)
            order = {1: 8, 2: 4, 4: 2}[ti]
            cofactorless_ok = (k % order == 0)
            if not cofactorless_ok and not found_bad:
                case("A + torsion[%d], cofactored-only holds" % ti, Ap, m,
                     rb2 + s2.to_bytes(32, "little"))
                found_bad = True
            if cofactorless_ok and not found_good:
                case("A + torsion[%d], both equations hold" % ti, Ap, m,
                     rb2 + s2.to_bytes(32, "little"))
                found_good = True
            if found_bad and found_good:
                break
    # R with a torsion component (key is clean): R' = R - T never equals R
    for ti in (1, 4):
        m = msg + b" R torsion %d" % ti
        rb2, s2, k = sign_with_scalar(a, b"prefix", pk, m, r_extra=tors[ti])
        case("R + torsion[%d] (cofactored-only holds)" % ti, pk, m, rb2 + s2.to_bytes(32, "little"))
    # both R and A' carry torsion so that the cofactorless equation holds exactly:
    #   R = [r]B + [k]T  =>  [S]B - [k](A + T) = [r]B - [k]T ... choose R = [r]B - [k]T
    for ti in (1, 2):
        T = tors[ti]
        Ap = enc(add(A, T))
        m = msg + b" both torsion %d" % ti
        r = h_int(b"prefix", m) % L
        for extra in range(8):
            Rp = add(mul(r, B), mul(8 - extra, T)) if extra else mul(r, B)
            rb2 = enc(Rp)
            k = h_int(rb2, Ap, m) % L
            s2 = (r + k * a) % L
            # exact check of the cofactorless equation with the affine code
            lhs = mul(s2, B)
            rhs = add(Rp, mul(k, dec(Ap)))
            if lhs == rhs:
                case("R and A both with torsion[%d], cofactorless holds" % ti, Ap, m,
                     rb2 + s2.to_bytes(32, "little"))
                break
        else:
            case("R and A both with torsion[%d], no exact solution" % ti, Ap, m,
                 rb2 + s2.to_bytes(32, "little"))

    # wrong lengths are tested in the test module (PyNaCl raises before verifying)
    with open(OUT, "w") as f:
        json.dump({"generator": "tests/protocol/data/make_ed25519_edge.py",
                   "verdict": "libsodium via PyNaCl VerifyKey.verify",
                   "cases": cases}, f, indent=1)
        f.write("\n")
    acc = sum(1 for c in cases if c["libsodium"])
    print("%d cases, %d accepted by libsodium -> %s" % (len(cases), acc, OUT))


if __name__ == "__main__":
    main()
