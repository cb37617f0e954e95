# Ed25519 (RFC 8032 section 5.1) for CPython and MicroPython; runs unchanged on both.
#
#   public_key(seed32) -> pk32
#   sign(seed32, msg) -> sig64            deterministic, byte-identical to libsodium
#   verify(pk, msg, sig) -> bool          never raises; libsodium's (PyNaCl's) verdict
#
# Verification semantics are libsodium's strict, cofactorless ones:
#   * S must be canonical (S < L);
#   * R and A must not be small-order points; the test is libsodium's: the 32 encoding
#     bytes with the sign bit ignored must not spell the y of a point of order 1, 2, 4
#     or 8, including the non-canonical spellings p and p+1 of y = 0 and y = 1;
#   * A must be a canonical encoding (y < p) of a point on the curve;
#   * the signature is valid iff the canonical encoding of R' = [S]B - [k]A equals the
#     32 bytes of R, where k = SHA-512(R || A || M) mod L.
#
# How it is computed (exactly the same answer, cheaper on a slow VM).  R' == R as
# encodings iff R is a canonical encoding (y < p) of a curve point and R' == R as points
# (the small-order check has already removed the only points with x = 0, whose sign bit
# could be set without changing the point).  The point equation is checked multiplied by
# an odd integer b with 0 < |b| < L, found by a half-extended Euclid on (8L, k) so that
# a = b*k mod 8L and |a|, |b| are about 2^128:
#       b*R' == [b*S mod L]B - [a]A      (B has order L; 8L kills every curve point)
# and multiplication by b is a bijection on the whole curve group (order 8L, gcd(b,8L)=1),
# so  [c0]B + [c1]B' - [a]A - [b]R == O  (c = b*S mod L = c0 + 2^128 c1, B' = [2^128]B)
# holds iff R' == R.  This is not the cofactored equation: torsion components in A or R
# are not multiplied away.  The four ~128-bit scalars share one run of ~128 doublings
# (Straus, width-5 NAF for A and R, width-7 NAF on precomputed affine tables for B, B').

try:
    from .sha512 import sha512
except ImportError:  # pragma: no cover - imported as a top-level module
    from sha512 import sha512

P = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFED  # 2^255 - 19
L = 0x1000000000000000000000000000000014DEF9DEA2F79CD65812631A5CF5D3ED  # group order
D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
D2 = 2 * D % P
SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_MASK255 = (1 << 255) - 1
_N8 = 8 * L
_HALF = 1 << 128          # stop the Euclid once a remainder is below this
_LOW128 = (1 << 128) - 1

# y values (sign bit ignored) of points of order 1, 2, 4, 8, and the non-canonical
# spellings p, p+1 of 0 and 1: libsodium's ge25519_has_small_order blacklist.
_Y8 = 2707385501144840649318225287225658788936804267575313519463743609750303402022
_SMALL_Y = (0, 1, _Y8, P - _Y8, P - 1, P, P + 1)

_W_VAR = 5                # NAF width for the per-signature points A and R
_W_FIX = 7                # NAF width for the fixed tables of B and [2^128]B


# ---------------------------------------------------------------- field helpers

def _sqn(x, n):
    p = P
    for _ in range(n):
        x = x * x % p
    return x


def _pow_2_250_1(z):
    # returns (z^(2^250 - 1), z^11)
    p = P
    z2 = z * z % p
    z9 = _sqn(z2, 2) * z % p
    z11 = z9 * z2 % p
    z5 = z11 * z11 % p * z9 % p            # 2^5 - 1
    z10 = _sqn(z5, 5) * z5 % p             # 2^10 - 1
    z20 = _sqn(z10, 10) * z10 % p          # 2^20 - 1
    z40 = _sqn(z20, 20) * z20 % p          # 2^40 - 1
    z50 = _sqn(z40, 10) * z10 % p          # 2^50 - 1
    z100 = _sqn(z50, 50) * z50 % p         # 2^100 - 1
    z200 = _sqn(z100, 100) * z100 % p      # 2^200 - 1
    z250 = _sqn(z200, 50) * z50 % p        # 2^250 - 1
    return z250, z11


def _inv(z):
    """z^(p-2) mod p by an addition chain (pow(z, -1, p) is unusable on MicroPython)."""
    z250, z11 = _pow_2_250_1(z)
    return _sqn(z250, 5) * z11 % P         # 2^255 - 21


def _decode(s):
    """32 bytes -> extended point (X, Y, Z, T), or None if y >= p or not on the curve.
    A zero x with the sign bit set is accepted (as libsodium does); callers exclude
    those points by the small-order test first."""
    p = P
    v = int.from_bytes(s, "little")
    y = v & _MASK255
    if y >= p:
        return None
    yy = y * y % p
    u = yy - 1
    w = (D * yy + 1) % p
    # x = u w^3 (u w^7)^((p-5)/8)
    w3 = w * w % p * w % p
    uw3 = u * w3 % p
    beta = uw3 * w3 % p * w % p            # u w^7
    z250, _ = _pow_2_250_1(beta)            # beta^(2^250 - 1)
    # beta^((p-5)/8) = beta^(2^252 - 3) = (beta^(2^250 - 1))^4 * beta
    x = uw3 * (_sqn(z250, 2) * beta % p) % p
    vxx = w * x % p * x % p
    if vxx != u % p:
        if vxx != (-u) % p:
            return None
        x = x * SQRT_M1 % p
    if (x & 1) != (v >> 255):
        x = (p - x) % p
    return (x, y, 1, x * y % p)


def _encode(X, Y, Z):
    p = P
    zi = _inv(Z)
    x = X * zi % p
    y = Y * zi % p
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


# ---------------------------------------------------------------- scalars

def _naf(n, w):
    """Width-w NAF digits of n >= 0, least significant first, as a list of small
    ints (odd digits in (-2^(w-1), 2^(w-1)), zeros elsewhere).  Works on bytes so
    the inner loop uses small ints only."""
    b = n.to_bytes(36, "little") + b"\x00\x00\x00"
    nbits = 288
    while nbits > 8 and b[(nbits >> 3) - 1] == 0:
        nbits -= 8
    out = [0] * (nbits + 1)
    width = 1 << w
    half = width >> 1
    mask = width - 1
    pos = 0
    carry = 0
    while pos < nbits:
        j = pos >> 3
        buf = ((b[j] | (b[j + 1] << 8) | (b[j + 2] << 16)) >> (pos & 7))
        if (buf & 1) == carry:
            pos += 1
            continue
        win = carry + (buf & mask)
        if win < half:
            carry = 0
            out[pos] = win
        else:
            carry = 1
            out[pos] = win - width
        pos += w
    if carry:
        out[nbits] = 1
    # trim trailing zeros so the length says where the top digit is
    n = len(out)
    while n and out[n - 1] == 0:
        n -= 1
    del out[n:]
    return out


# ---------------------------------------------------------------- point helpers

def _dbl(X, Y, Z):
    p = P
    a = X * X % p
    b = Y * Y % p
    c = 2 * Z * Z % p
    h = a + b
    e = h - (X + Y) * (X + Y) % p
    g = a - b
    f = c + g
    return e * f % p, g * h % p, f * g % p, e * h % p


def _add(P1, P2):
    """extended + extended (general, used off the hot path)."""
    p = P
    X1, Y1, Z1, T1 = P1
    X2, Y2, Z2, T2 = P2
    a = (Y1 - X1) * (Y2 - X2) % p
    b = (Y1 + X1) * (Y2 + X2) % p
    c = T1 * D2 % p * T2 % p
    d = 2 * Z1 * Z2 % p
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return e * f % p, g * h % p, f * g % p, e * h % p


def _cached(pt):
    """extended -> (Y+X, Y-X, 2Z, 2dT), the form the Straus loop adds."""
    X, Y, Z, T = pt
    p = P
    return ((Y + X) % p, (Y - X) % p, 2 * Z % p, T * D2 % p)


def _odd_multiples(pt, count):
    """[pt, 3pt, 5pt, ..., (2count-1)pt] in extended coordinates."""
    X, Y, Z, T = pt
    two = _dbl(X, Y, Z)
    out = [pt]
    for _ in range(count - 1):
        out.append(_add(out[-1], two))
    return out


def _affine_table(pt, count):
    """odd multiples of pt as affine cached entries (y+x, y-x, 2d*x*y), one inversion."""
    p = P
    pts = _odd_multiples(pt, count)
    # Montgomery batch inversion of the Z coordinates
    acc = [1] * (count + 1)
    for i in range(count):
        acc[i + 1] = acc[i] * pts[i][2] % p
    inv = _inv(acc[count])
    out = [None] * count
    for i in range(count - 1, -1, -1):
        zi = inv * acc[i] % p
        inv = inv * pts[i][2] % p
        X, Y, Z, T = pts[i]
        x = X * zi % p
        y = Y * zi % p
        out[i] = ((y + x) % p, (y - x) % p, x * y % p * D2 % p)
    return tuple(out)


_B = (BX, BY, 1, BX * BY % P)


def _mul_pow2(pt, n):
    X, Y, Z, T = pt
    for _ in range(n):
        X, Y, Z, T = _dbl(X, Y, Z)
    return (X, Y, Z, T)


_TB0 = _affine_table(_B, 1 << (_W_FIX - 2))
_TB1 = _affine_table(_mul_pow2(_B, 128), 1 << (_W_FIX - 2))


def _straus(var_terms, c):
    """[c]B + sum of [n]Q for (n, Q) in var_terms (n >= 0, Q extended), with c < 2^256.
    Returns the result in projective (X, Y, Z)."""
    p = P
    terms = []
    for n, pt in var_terms:
        dig = _naf(n, _W_VAR)
        tab = [_cached(q) for q in _odd_multiples(pt, 1 << (_W_VAR - 2))]
        terms.append((dig, tab, 0))
    terms.append((_naf(c & _LOW128, _W_FIX), _TB0, 1))
    terms.append((_naf(c >> 128, _W_FIX), _TB1, 1))
    top = 0
    for dig, _, _ in terms:
        if len(dig) > top:
            top = len(dig)
    X = 0
    Y = 1
    Z = 1
    T = 0
    for i in range(top - 1, -1, -1):
        # doubling (a = -1): 4S + 3M, T only when an addition follows
        a = X * X % p
        b = Y * Y % p
        cc = Z * Z * 2 % p
        h = a + b
        e = h - (X + Y) * (X + Y) % p
        g = a - b
        f = cc + g
        X = e * f % p
        Y = g * h % p
        Z = f * g % p
        T = e * h % p
        for dig, tab, aff in terms:
            if i >= len(dig):
                continue
            k = dig[i]
            if not k:
                continue
            if aff:
                if k > 0:
                    qp, qm, qt = tab[k >> 1]
                else:
                    qm, qp, qt = tab[(-k) >> 1]
                    qt = -qt
                dd = Z + Z
            else:
                if k > 0:
                    qp, qm, qz, qt = tab[k >> 1]
                else:
                    qm, qp, qz, qt = tab[(-k) >> 1]
                    qt = -qt
                dd = Z * qz % p
            a = (Y - X) * qm % p
            b = (Y + X) * qp % p
            cc = T * qt % p
            e = b - a
            f = dd - cc
            g = dd + cc
            h = b + a
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
            T = e * h % p
    return X, Y, Z


def _var_table(pt):
    """cached odd multiples [1, 3, .., 15]pt for the width-5 NAF."""
    return [_cached(q) for q in _odd_multiples(pt, 1 << (_W_VAR - 2))]


def _pad(dig, n):
    if len(dig) < n:
        dig.extend([0] * (n - len(dig)))
    return dig


def _check4(d1, t1, d2, t2, d3, d4):
    """True iff sum of NAF-digit multiples is the identity: d1/t1, d2/t2 are
    per-signature points (cached extended tables), d3/d4 use the affine tables of B
    and [2^128]B.  All digit lists have the same length.  T = e*h is computed only
    when an addition needs it."""
    p = P
    tb0 = _TB0
    tb1 = _TB1
    X = 0
    Y = 1
    Z = 1
    e = 0
    h = 0
    for i in range(len(d1) - 1, -1, -1):
        # doubling, a = -1 (dbl-2008-hwcd with signs flipped pairwise): 4S + 3M
        a = X * X % p
        b = Y * Y % p
        c = Z * Z * 2 % p
        h = a + b
        e = h - (X + Y) * (X + Y) % p
        g = a - b
        f = c + g
        X = e * f % p
        Y = g * h % p
        Z = f * g % p
        k = d1[i]
        if k:
            T = e * h % p
            if k > 0:
                qp, qm, qz, qt = t1[k >> 1]
                c = T * qt % p
            else:
                qm, qp, qz, qt = t1[(-k) >> 1]
                c = -(T * qt % p)
            a = (Y - X) * qm % p
            b = (Y + X) * qp % p
            dd = Z * qz % p
            e = b - a
            f = dd - c
            g = dd + c
            h = b + a
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
        k = d2[i]
        if k:
            T = e * h % p
            if k > 0:
                qp, qm, qz, qt = t2[k >> 1]
                c = T * qt % p
            else:
                qm, qp, qz, qt = t2[(-k) >> 1]
                c = -(T * qt % p)
            a = (Y - X) * qm % p
            b = (Y + X) * qp % p
            dd = Z * qz % p
            e = b - a
            f = dd - c
            g = dd + c
            h = b + a
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
        k = d3[i]
        if k:
            T = e * h % p
            if k > 0:
                qp, qm, qt = tb0[k >> 1]
                c = T * qt % p
            else:
                qm, qp, qt = tb0[(-k) >> 1]
                c = -(T * qt % p)
            a = (Y - X) * qm % p
            b = (Y + X) * qp % p
            dd = Z + Z
            e = b - a
            f = dd - c
            g = dd + c
            h = b + a
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
        k = d4[i]
        if k:
            T = e * h % p
            if k > 0:
                qp, qm, qt = tb1[k >> 1]
                c = T * qt % p
            else:
                qm, qp, qt = tb1[(-k) >> 1]
                c = -(T * qt % p)
            a = (Y - X) * qm % p
            b = (Y + X) * qp % p
            dd = Z + Z
            e = b - a
            f = dd - c
            g = dd + c
            h = b + a
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
    return X % p == 0 and (Y - Z) % p == 0


def _neg(pt):
    p = P
    X, Y, Z, T = pt
    return ((p - X) % p, Y, Z, (p - T) % p)


def _halfsize(k):
    """(a, b) with a = b*k (mod 8L), b odd, |a| and |b| about 2^128."""
    r0 = _N8
    r1 = k
    t0 = 0
    t1 = 1
    half = _HALF
    while r1 >= half:
        q = r0 // r1
        r0, r1 = r1, r0 - q * r1
        t0, t1 = t1, t0 - q * t1
    if t1 & 1:
        return r1, t1          # r1 >= 0
    # consecutive t are coprime: t0 is odd; try the nearby lattice vectors with odd t
    q = r0 // r1 if r1 else 0
    best = None
    for r, t in ((r0, t0), (r0 - q * r1, t0 - q * t1), (r0 - r1, t0 - t1)):
        m = abs(r) if abs(r) > abs(t) else abs(t)
        if best is None or m < best[0]:
            best = (m, r, t)
    return best[1], best[2]    # every candidate has r >= 0 (r0 > r1 >= r2)


# ---------------------------------------------------------------- public API

def _scalarmult_base(n):
    X, Y, Z = _straus((), n % L)
    return X, Y, Z


def _expand(seed):
    h = sha512(bytes(seed))
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def public_key(seed):
    """32-byte seed -> 32-byte public key (RFC 8032 5.1.5)."""
    if len(seed) != 32:
        raise ValueError("seed must be 32 bytes")
    a, _ = _expand(seed)
    X, Y, Z = _scalarmult_base(a)
    return _encode(X, Y, Z)


def sign(seed, msg):
    """Deterministic Ed25519 signature (RFC 8032 5.1.6) of msg under the 32-byte seed."""
    if len(seed) != 32:
        raise ValueError("seed must be 32 bytes")
    msg = bytes(msg)
    a, prefix = _expand(seed)
    X, Y, Z = _scalarmult_base(a)
    pk = _encode(X, Y, Z)
    r = int.from_bytes(sha512(prefix + msg), "little") % L
    X, Y, Z = _scalarmult_base(r)
    rb = _encode(X, Y, Z)
    k = int.from_bytes(sha512(rb + pk + msg), "little") % L
    s = (r + k * a) % L
    return rb + s.to_bytes(32, "little")


def verify(public, msg, sig):
    """True iff sig is a valid Ed25519 signature of msg under public, with libsodium's
    strict cofactorless rules.  Never raises: any bad input gives False."""
    try:
        return _verify(public, msg, sig)
    except Exception:
        return False


def _verify(public, msg, sig):
    if not isinstance(public, (bytes, bytearray, memoryview)):
        return False
    if not isinstance(sig, (bytes, bytearray, memoryview)):
        return False
    if not isinstance(msg, (bytes, bytearray, memoryview)):
        return False
    public = bytes(public)
    sig = bytes(sig)
    if len(public) != 32 or len(sig) != 64:
        return False
    rb = sig[:32]
    s = int.from_bytes(sig[32:], "little")
    if s >= L:
        return False
    rv = int.from_bytes(rb, "little")
    if (rv & _MASK255) in _SMALL_Y:
        return False
    av = int.from_bytes(public, "little")
    if (av & _MASK255) in _SMALL_Y:
        return False
    cache = _KEY_CACHE
    if cache[0] == public:
        tab_a = cache[1]
    else:
        A = _decode(public)
        if A is None:
            return False
        tab_a = _var_table(_neg(A))        # the Euclid remainder a is >= 0: use -A
        cache[0] = None
        cache[1] = tab_a
        cache[0] = public
    R = _decode(rb)
    if R is None:
        return False
    k = int.from_bytes(sha512(rb + public + bytes(msg)), "little") % L
    a, b = _halfsize(k)
    c = b * s % L
    # [c0]B + [c1]B' + [a](-A) + [b](-R) == O
    if b >= 0:
        tab_r = _var_table(_neg(R))
    else:
        tab_r = _var_table(R)
        b = -b
    d1 = _naf(a, _W_VAR)
    d2 = _naf(b, _W_VAR)
    d3 = _naf(c & _LOW128, _W_FIX)
    d4 = _naf(c >> 128, _W_FIX)
    n = len(d1)
    for d in (d2, d3, d4):
        if len(d) > n:
            n = len(d)
    return _check4(_pad(d1, n), tab_a, _pad(d2, n), tab_r, _pad(d3, n), _pad(d4, n))


# one-entry cache of the last public key's decoded table (a meter verifies vouchers of
# one or two issuer keys): [public bytes, cached odd multiples of -A]
_KEY_CACHE = [None, None]
