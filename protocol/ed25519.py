# Ed25519 (RFC 8032 section 5.1) for CPython and MicroPython; runs unchanged on both.
#
#   public_key(seed32) -> pk32
#   sign(seed32, msg) -> sig64            deterministic, byte-identical to libsodium
#   verify(pk, msg, sig) -> bool          libsodium's (PyNaCl's) verdict; raises only MemoryError
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
# How it is computed: exactly as libsodium does it, R' = [S]B + [k](-A) in projective
# coordinates, then one inversion to encode R' and a comparison of 32 bytes with R (so R
# is never decoded: a non-canonical or off-curve R can never equal a canonical encoding).
# S = sum S_j 2^(64j) and k = sum k_j 2^(64j) are cut into four 64-bit pieces each, on
# affine tables of B_j = [2^(64j)]B (built at import, width-6 NAF) and of
# -A_j = -[2^(64j)]A (built once per public key, two keys cached, width-5 NAF), so all
# eight pieces share one run of ~64 doublings (Straus) with ~36 + ~42 mixed additions.
#
# Signing and public_key() compute [n]B with the same B_j tables: 4 pieces of 64 bits,
# ~64 doublings and ~36 mixed additions.  sign() keeps the last seed's expanded key (the
# secret scalar and prefix) and public key in _SIGN_CACHE (a meter signs with one key),
# so a signature costs one [r]B, one inversion and two SHA-512 calls.  Inversions use the
# extended Euclidean algorithm.  Nothing here is constant-time (pure Python big integers
# never are); the meter signs its own receipts, not attacker-chosen data under secret
# timing.
#
# Memory (MicroPython, 32-bit): the B_j tables are 64 affine points, ~11 KB held after
# import; each cached public key (up to two) adds 32 points, ~6 KB.  Wider tables were measured:
# width-7 B tables (+10 KB), width-6 A tables (+5 KB per key), or 43- and 51-bit pieces
# (+5 KB and +3 KB per key, ~20 fewer doublings) each changed sign or verify by less
# than the noise of a loaded machine (~5%).

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

# y values (sign bit ignored) of points of order 1, 2, 4, 8, and the non-canonical
# spellings p, p+1 of 0 and 1: libsodium's ge25519_has_small_order blacklist.
_Y8 = 2707385501144840649318225287225658788936804267575313519463743609750303402022
_SMALL_Y = (0, 1, _Y8, P - _Y8, P - 1, P, P + 1)

_SPAN = 64                # scalars are cut into 64-bit pieces: ~64 shared doublings
_NPB = (255 + _SPAN - 1) // _SPAN   # pieces of a scalar < 2^255 on the B_j tables (4)
_NPA = (253 + _SPAN - 1) // _SPAN   # pieces of k < L on the A_j tables (4)
_W_B = 6                  # NAF width for the fixed tables of B_j = [2^(64j)]B, j = 0..3
_W_A = 5                  # NAF width for the cached tables of A_j = [2^(64j)]A, j = 0..3
_NB = 1 << (_W_B - 2)     # entries per B_j table
_NA = 1 << (_W_A - 2)     # entries per A_j table


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
    """1/z mod p (0 for z = 0 mod p) by the extended Euclidean algorithm: ~150 steps of
    short divisions, 5x faster than the z^(p-2) addition chain on MicroPython (whose
    pow(z, -1, p) silently returns 0).  Variable-time, like everything here."""
    a = P
    b = z % P
    ta = 0
    tb = 1
    while True:
        # invariant: a = ta*z, b = tb*z (mod p)
        if not b:
            return ta % P
        q = a // b
        a -= q * b
        ta -= q * tb
        if not a:
            return tb % P
        q = b // a
        b -= q * a
        tb -= q * ta


def _compact(v):
    """v (0 <= v < 2^256) as a freshly sized int.  On MicroPython a remainder keeps the
    dividend's digit buffer (64 bytes held instead of 48): use this for stored tables."""
    return int.from_bytes(v.to_bytes(32, "little"), "little")


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

def _pieces(first, size, count):
    """(bases, starts) indexed by bit position // _SPAN of a scalar below 2^264: the
    offset of the first slot of the table of that piece and the piece's first bit
    (positions past the last piece stay in the last piece and its table)."""
    bases = []
    starts = []
    for j in range(264 // _SPAN + 2):
        if j >= count:
            j = count - 1
        bases.append(first + size * j)
        starts.append(_SPAN * j)
    return tuple(bases), tuple(starts)


def _naf(n, w, stride, pieces, sched):
    """Width-w NAF of n >= 0 (n < 2^264), cut into pieces (see _pieces), added to the
    Straus schedule: the digit d != 0 at bit position i, in piece j = i // _SPAN, goes
    to the list sched[i - start_j] as the table offset +(base_j + stride*(d >> 1)) if
    d > 0, or -(base_j + stride*(-d >> 1)) if d < 0.  Returns the highest schedule
    index written (-1 if none).  Works on bytes so the inner loop uses small ints."""
    if n >> 128:
        nbits = 264
    elif n >> 64:
        nbits = 136
    else:
        nbits = 72
    b = n.to_bytes(nbits >> 3, "little") + b"\x00\x00\x00"
    while nbits > 8 and b[(nbits >> 3) - 1] == 0:
        nbits -= 8
    bases, starts = pieces
    width = 1 << w
    half = width >> 1
    mask = width - 1
    sp = _SPAN
    top = -1
    pos = 0
    carry = 0
    while True:
        if pos < nbits:
            j = pos >> 3
            buf = ((b[j] | (b[j + 1] << 8) | (b[j + 2] << 16)) >> (pos & 7))
            if (buf & 1) == carry:
                pos += 1
                continue
            win = carry + (buf & mask)
        elif carry:
            win = 1               # the final carry: digit 1 at position nbits
        else:
            break
        j = pos // sp
        if win < half:
            carry = 0
            off = bases[j] + stride * (win >> 1)
        else:
            carry = 1
            off = -(bases[j] + stride * ((width - win) >> 1))
        i = pos - starts[j]
        q = sched[i]
        if q is None:
            sched[i] = [off]
        else:
            q.append(off)
        if i > top:
            top = i
        pos += w
    return top


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


def _odd_multiples(pt, count):
    """[pt, 3pt, 5pt, ..., (2count-1)pt] in extended coordinates."""
    X, Y, Z, T = pt
    two = _dbl(X, Y, Z)
    out = [pt]
    for _ in range(count - 1):
        out.append(_add(out[-1], two))
    return out


def _mul_pow2(pt, n):
    """[2^n]pt for n >= 1 (extended in and out; T only at the end)."""
    p = P
    X, Y, Z, T = pt
    for _ in range(n):
        # the doubling of _straus: all outputs negated, same projective point
        a = X * X % p
        b = Y * Y % p
        c = Z * Z * 2 % p
        h = a + b
        g = b - a
        f = c - g
        e = (X + X) * Y % p
        X = e * f % p
        Y = g * h % p
        Z = f * g % p
    return (X, Y, Z, e * h % p)


def _affine_tables(pt, pieces, count, out):
    """Append to the list out, for j = 0..pieces-1, the odd multiples [1, 3, ..,
    2count-1][2^(64j)]pt as affine entries y+x, y-x, 2d*x*y (3 slots each); one
    inversion for all of them."""
    p = P
    pts = []
    for j in range(pieces):
        if j:
            pt = _mul_pow2(pt, _SPAN)
        pts.extend(_odd_multiples(pt, count))
    n = len(pts)
    acc = [1] * (n + 1)
    for i in range(n):
        acc[i + 1] = acc[i] * pts[i][2] % p
    inv = _inv(acc[n])
    flat = [0] * (3 * n)
    for i in range(n - 1, -1, -1):
        X, Y, Z, T = pts[i]
        zi = inv * acc[i] % p
        inv = inv * Z % p
        x = X * zi % p
        y = Y * zi % p
        flat[3 * i] = _compact((y + x) % p)
        flat[3 * i + 1] = _compact((y - x) % p)
        flat[3 * i + 2] = _compact(x * y % p * D2 % p)
    out.extend(flat)
    return out


def _neg(pt):
    p = P
    X, Y, Z, T = pt
    return ((p - X) % p, Y, Z, (p - T) % p)


# B_j = [2^(64j)]B, j = 0..3, odd multiples as affine entries after 3 zero slots (an
# offset of 0 means "no addition"); entry d of table j sits at 3 + 3*(_NB*j + (d >> 1)).
_TB = tuple(_affine_tables((BX, BY, 1, BX * BY % P), _NPB, _NB, [0, 0, 0]))
_SIZE_B = 3 * _NB         # slots per B_j table
_SIZE_A = 3 * _NA         # slots per A_j table
_PIECES_B = _pieces(3, _SIZE_B, _NPB)
_PIECES_A = _pieces(3 + _NPB * _SIZE_B, _SIZE_A, _NPA)
_SCHED = 266 - _SPAN * (min(_NPA, _NPB) - 1)  # steps: the last piece of n < 2^264


def _straus(sched, tab):
    """Run the shared doublings adding, at step i (from the top down to 0), the affine
    entry tab[|k|..] (negated if k < 0) for every k in the list sched[i] (None: no
    addition).  Returns the projective (X, Y, Z) of the sum.  T = e*h is computed only
    when an addition needs it."""
    p = P
    X = 0
    Y = 1
    Z = 1
    e = 0
    h = 0
    n = len(sched)
    while n and sched[n - 1] is None:
        n -= 1
    for i in range(n - 1, -1, -1):
        # doubling for a = -1, all four outputs negated (same projective point):
        # 4M + 3S with E = 2XY, G = B - A, -F = C - G, -H = A + B
        a = X * X % p
        b = Y * Y % p
        c = Z * Z * 2 % p
        h = a + b
        g = b - a
        f = c - g
        e = (X + X) * Y % p
        X = e * f % p
        Y = g * h % p
        Z = f * g % p
        q = sched[i]
        if q is None:
            continue
        for k in q:
            # mixed addition of (y+x, y-x, 2dxy), a = -1: 7M
            T = e * h % p
            if k > 0:
                qp = tab[k]
                qm = tab[k + 1]
                c = T * tab[k + 2] % p
            else:
                k = -k
                qm = tab[k]
                qp = tab[k + 1]
                c = -(T * tab[k + 2] % p)
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
    return X, Y, Z


# ---------------------------------------------------------------- public API

def _scalarmult_base(n):
    """[n]B for 0 <= n < 2^256 as projective (X, Y, Z): 4 pieces of 64 bits on the
    B_j tables, ~64 doublings."""
    sched = [None] * _SCHED
    _naf(n, _W_B, 3, _PIECES_B, sched)
    return _straus(sched, _TB)


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
    return _signing_key(bytes(seed))[3]


def _signing_key(seed):
    """[seed, a, prefix, public key] for the last seed used (one-entry cache)."""
    c = _SIGN_CACHE
    if c[0] != seed:
        a, prefix = _expand(seed)
        X, Y, Z = _scalarmult_base(a)
        c[0] = None
        c[1] = a
        c[2] = prefix
        c[3] = _encode(X, Y, Z)
        c[0] = seed
    return c


def sign(seed, msg):
    """Deterministic Ed25519 signature (RFC 8032 5.1.6) of msg under the 32-byte seed."""
    if len(seed) != 32:
        raise ValueError("seed must be 32 bytes")
    msg = bytes(msg)
    _, a, prefix, pk = _signing_key(bytes(seed))
    r = int.from_bytes(sha512(prefix + msg), "little") % L
    X, Y, Z = _scalarmult_base(r)
    rb = _encode(X, Y, Z)
    k = int.from_bytes(sha512(rb + pk + msg), "little") % L
    s = (r + k * a) % L
    return rb + s.to_bytes(32, "little")


def verify(public, msg, sig):
    """True iff sig is a valid Ed25519 signature of msg under public, with libsodium's
    strict cofactorless rules.  Any bad input gives False; the one exception that passes
    through is MemoryError, because running out of memory says nothing about the signature
    (a meter answers BUSY and the voucher can be retried, SPEC.md §2.1)."""
    try:
        return _verify(public, msg, sig)
    except MemoryError:
        raise
    except Exception:
        return False


def _key_table(A):
    """_TB followed by the affine tables of [2^(64j)](-A), j = 0..3."""
    return tuple(_affine_tables(_neg(A), _NPA, _NA, list(_TB)))


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
        tab = cache[1]
    elif cache[2] == public:
        tab = cache[3]
        cache[2] = cache[0]        # most recent first
        cache[3] = cache[1]
        cache[0] = public
        cache[1] = tab
    else:
        A = _decode(public)
        if A is None:
            return False
        tab = _key_table(A)
        cache[2] = cache[0]        # the older entry is dropped
        cache[3] = cache[1]
        cache[0] = public
        cache[1] = tab
    k = int.from_bytes(sha512(rb + public + bytes(msg)), "little") % L
    # R' = sum [S_j]B_j + sum [k_j](-A_j)
    sched = [None] * _SCHED
    _naf(s, _W_B, 3, _PIECES_B, sched)
    _naf(k, _W_A, 3, _PIECES_A, sched)
    X, Y, Z = _straus(sched, tab)
    return _encode(X, Y, Z) == rb


# tables of the two most recently used public keys (a meter verifies vouchers of one or
# two issuer keys; a new key costs about one more verify): [public bytes, _TB + affine
# tables of -[2^(64j)]A] for the most recent, then the same for the one before
_KEY_CACHE = [None, None, None, None]
# one-entry cache of the signing key: [seed, a, prefix, public key]
_SIGN_CACHE = [None, 0, b"", b""]
