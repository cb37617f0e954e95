# SHA-512 (FIPS 180-4) for CPython and MicroPython.
# Runs unchanged on both.  `sha512(data)` uses hashlib where the VM has it (CPython, most
# MicroPython ports built with mbedTLS); the MicroPython WebAssembly port has only sha256,
# so `sha512_pure` is a pure-Python implementation written for MicroPython's bytecode VM,
# where the dispatch of each operation costs about as much as the arithmetic (a 24-bit and
# a 128-bit xor cost nearly the same there, so 32-bit halves would only double the work):
# locals only, no tuples or lists built per round, 16 rounds unrolled with rotating names
# (K and the schedule in locals), 64-bit masking on doubled words.

try:
    from hashlib import sha512 as _hl_sha512
    _hl_sha512(b"")
except (ImportError, AttributeError, ValueError):  # pragma: no cover - MicroPython wasm
    _hl_sha512 = None

_K = (
    0x428A2F98D728AE22, 0x7137449123EF65CD, 0xB5C0FBCFEC4D3B2F, 0xE9B5DBA58189DBBC,
    0x3956C25BF348B538, 0x59F111F1B605D019, 0x923F82A4AF194F9B, 0xAB1C5ED5DA6D8118,
    0xD807AA98A3030242, 0x12835B0145706FBE, 0x243185BE4EE4B28C, 0x550C7DC3D5FFB4E2,
    0x72BE5D74F27B896F, 0x80DEB1FE3B1696B1, 0x9BDC06A725C71235, 0xC19BF174CF692694,
    0xE49B69C19EF14AD2, 0xEFBE4786384F25E3, 0x0FC19DC68B8CD5B5, 0x240CA1CC77AC9C65,
    0x2DE92C6F592B0275, 0x4A7484AA6EA6E483, 0x5CB0A9DCBD41FBD4, 0x76F988DA831153B5,
    0x983E5152EE66DFAB, 0xA831C66D2DB43210, 0xB00327C898FB213F, 0xBF597FC7BEEF0EE4,
    0xC6E00BF33DA88FC2, 0xD5A79147930AA725, 0x06CA6351E003826F, 0x142929670A0E6E70,
    0x27B70A8546D22FFC, 0x2E1B21385C26C926, 0x4D2C6DFC5AC42AED, 0x53380D139D95B3DF,
    0x650A73548BAF63DE, 0x766A0ABB3C77B2A8, 0x81C2C92E47EDAEE6, 0x92722C851482353B,
    0xA2BFE8A14CF10364, 0xA81A664BBC423001, 0xC24B8B70D0F89791, 0xC76C51A30654BE30,
    0xD192E819D6EF5218, 0xD69906245565A910, 0xF40E35855771202A, 0x106AA07032BBD1B8,
    0x19A4C116B8D2D0C8, 0x1E376C085141AB53, 0x2748774CDF8EEB99, 0x34B0BCB5E19B48A8,
    0x391C0CB3C5C95A63, 0x4ED8AA4AE3418ACB, 0x5B9CCA4F7763E373, 0x682E6FF3D6B2B8A3,
    0x748F82EE5DEFB2FC, 0x78A5636F43172F60, 0x84C87814A1F0AB72, 0x8CC702081A6439EC,
    0x90BEFFFA23631E28, 0xA4506CEBDE82BDE9, 0xBEF9A3F7B2C67915, 0xC67178F2E372532B,
    0xCA273ECEEA26619C, 0xD186B8C721C0C207, 0xEADA7DD6CDE0EB1E, 0xF57D4F7FEE6ED178,
    0x06F067AA72176FBA, 0x0A637DC5A2C898A6, 0x113F9804BEF90DAE, 0x1B710B35131C471B,
    0x28DB77F523047D84, 0x32CAAB7B40C72493, 0x3C9EBE0A15C9BEBC, 0x431D67C49C100D4C,
    0x4CC5D4BECB3E42B6, 0x597F299CFC657E2A, 0x5FCB6FAB3AD6FAEC, 0x6C44198C4A475817,
)

_H0 = (
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
)

# the round constants in 5 groups of 16, unpacked into locals once per group
_KG = tuple(_K[16 * g:16 * g + 16] for g in range(5))


def sha512_pure(data):
    """SHA-512 of `data` (bytes-like) in pure Python; returns 64 bytes."""
    data = bytes(data)
    n = len(data)
    # Padding: 0x80, zeros, 128-bit big-endian bit length; total a multiple of 128.
    msg = data + b"\x80" + bytes((111 - n) % 128) + (n * 8).to_bytes(16, "big")
    D = 0x10000000000000001  # x * D == x | x << 64 for x < 2**64: a "doubled" word
    M = 0xFFFFFFFFFFFFFFFF
    h0, h1, h2, h3, h4, h5, h6, h7 = _H0
    frm = int.from_bytes
    KG = _KG
    for off in range(0, len(msg), 128):
        blk = frm(msg[off:off + 128], "big")
        w0 = (blk >> 960) & M
        w1 = (blk >> 896) & M
        w2 = (blk >> 832) & M
        w3 = (blk >> 768) & M
        w4 = (blk >> 704) & M
        w5 = (blk >> 640) & M
        w6 = (blk >> 576) & M
        w7 = (blk >> 512) & M
        w8 = (blk >> 448) & M
        w9 = (blk >> 384) & M
        w10 = (blk >> 320) & M
        w11 = (blk >> 256) & M
        w12 = (blk >> 192) & M
        w13 = (blk >> 128) & M
        w14 = (blk >> 64) & M
        w15 = blk & M
        # Working variables are kept doubled (x|x<<64); only the low 64 bits matter, so a
        # right shift is a rotation and the bits left above 64 vanish in the next & M.
        a = h0 * D
        b = h1 * D
        c = h2 * D
        d = h3 * D
        e = h4 * D
        f = h5 * D
        g = h6 * D
        h = h7 * D
        x1 = b ^ c
        # 5 groups of 16 rounds; the names rotate within a group instead of moving values
        for grp in range(5):
            k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13, k14, k15 = KG[grp]
            if grp:
                # message schedule in place: w[t] for t = 16 grp .. 16 grp + 15
                # sigma0 = rotr1 ^ rotr8 ^ shr7, sigma1 = rotr19 ^ rotr61 ^ shr6, on doubled words
                xx = w1 * D
                yy = w14 * D
                w0 = (w0 + w9 + (((xx ^ (xx >> 7)) >> 1) ^ (w1 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w14 >> 6))) & M
                xx = w2 * D
                yy = w15 * D
                w1 = (w1 + w10 + (((xx ^ (xx >> 7)) >> 1) ^ (w2 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w15 >> 6))) & M
                xx = w3 * D
                yy = w0 * D
                w2 = (w2 + w11 + (((xx ^ (xx >> 7)) >> 1) ^ (w3 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w0 >> 6))) & M
                xx = w4 * D
                yy = w1 * D
                w3 = (w3 + w12 + (((xx ^ (xx >> 7)) >> 1) ^ (w4 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w1 >> 6))) & M
                xx = w5 * D
                yy = w2 * D
                w4 = (w4 + w13 + (((xx ^ (xx >> 7)) >> 1) ^ (w5 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w2 >> 6))) & M
                xx = w6 * D
                yy = w3 * D
                w5 = (w5 + w14 + (((xx ^ (xx >> 7)) >> 1) ^ (w6 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w3 >> 6))) & M
                xx = w7 * D
                yy = w4 * D
                w6 = (w6 + w15 + (((xx ^ (xx >> 7)) >> 1) ^ (w7 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w4 >> 6))) & M
                xx = w8 * D
                yy = w5 * D
                w7 = (w7 + w0 + (((xx ^ (xx >> 7)) >> 1) ^ (w8 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w5 >> 6))) & M
                xx = w9 * D
                yy = w6 * D
                w8 = (w8 + w1 + (((xx ^ (xx >> 7)) >> 1) ^ (w9 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w6 >> 6))) & M
                xx = w10 * D
                yy = w7 * D
                w9 = (w9 + w2 + (((xx ^ (xx >> 7)) >> 1) ^ (w10 >> 7))
                     + (((yy ^ (yy >> 42)) >> 19) ^ (w7 >> 6))) & M
                xx = w11 * D
                yy = w8 * D
                w10 = (w10 + w3 + (((xx ^ (xx >> 7)) >> 1) ^ (w11 >> 7))
                      + (((yy ^ (yy >> 42)) >> 19) ^ (w8 >> 6))) & M
                xx = w12 * D
                yy = w9 * D
                w11 = (w11 + w4 + (((xx ^ (xx >> 7)) >> 1) ^ (w12 >> 7))
                      + (((yy ^ (yy >> 42)) >> 19) ^ (w9 >> 6))) & M
                xx = w13 * D
                yy = w10 * D
                w12 = (w12 + w5 + (((xx ^ (xx >> 7)) >> 1) ^ (w13 >> 7))
                      + (((yy ^ (yy >> 42)) >> 19) ^ (w10 >> 6))) & M
                xx = w14 * D
                yy = w11 * D
                w13 = (w13 + w6 + (((xx ^ (xx >> 7)) >> 1) ^ (w14 >> 7))
                      + (((yy ^ (yy >> 42)) >> 19) ^ (w11 >> 6))) & M
                xx = w15 * D
                yy = w12 * D
                w14 = (w14 + w7 + (((xx ^ (xx >> 7)) >> 1) ^ (w15 >> 7))
                      + (((yy ^ (yy >> 42)) >> 19) ^ (w12 >> 6))) & M
                xx = w0 * D
                yy = w13 * D
                w15 = (w15 + w8 + (((xx ^ (xx >> 7)) >> 1) ^ (w0 >> 7))
                      + (((yy ^ (yy >> 42)) >> 19) ^ (w13 >> 6))) & M
            h += ((e >> 14) ^ (e >> 18) ^ (e >> 41)) + (g ^ (e & (f ^ g))) + k0 + w0
            x0 = a ^ b
            d = ((d + h) & M) * D
            h = ((h + ((a >> 28) ^ (a >> 34) ^ (a >> 39)) + (b ^ (x0 & x1))) & M) * D
            g += ((d >> 14) ^ (d >> 18) ^ (d >> 41)) + (f ^ (d & (e ^ f))) + k1 + w1
            x1 = h ^ a
            c = ((c + g) & M) * D
            g = ((g + ((h >> 28) ^ (h >> 34) ^ (h >> 39)) + (a ^ (x1 & x0))) & M) * D
            f += ((c >> 14) ^ (c >> 18) ^ (c >> 41)) + (e ^ (c & (d ^ e))) + k2 + w2
            x0 = g ^ h
            b = ((b + f) & M) * D
            f = ((f + ((g >> 28) ^ (g >> 34) ^ (g >> 39)) + (h ^ (x0 & x1))) & M) * D
            e += ((b >> 14) ^ (b >> 18) ^ (b >> 41)) + (d ^ (b & (c ^ d))) + k3 + w3
            x1 = f ^ g
            a = ((a + e) & M) * D
            e = ((e + ((f >> 28) ^ (f >> 34) ^ (f >> 39)) + (g ^ (x1 & x0))) & M) * D
            d += ((a >> 14) ^ (a >> 18) ^ (a >> 41)) + (c ^ (a & (b ^ c))) + k4 + w4
            x0 = e ^ f
            h = ((h + d) & M) * D
            d = ((d + ((e >> 28) ^ (e >> 34) ^ (e >> 39)) + (f ^ (x0 & x1))) & M) * D
            c += ((h >> 14) ^ (h >> 18) ^ (h >> 41)) + (b ^ (h & (a ^ b))) + k5 + w5
            x1 = d ^ e
            g = ((g + c) & M) * D
            c = ((c + ((d >> 28) ^ (d >> 34) ^ (d >> 39)) + (e ^ (x1 & x0))) & M) * D
            b += ((g >> 14) ^ (g >> 18) ^ (g >> 41)) + (a ^ (g & (h ^ a))) + k6 + w6
            x0 = c ^ d
            f = ((f + b) & M) * D
            b = ((b + ((c >> 28) ^ (c >> 34) ^ (c >> 39)) + (d ^ (x0 & x1))) & M) * D
            a += ((f >> 14) ^ (f >> 18) ^ (f >> 41)) + (h ^ (f & (g ^ h))) + k7 + w7
            x1 = b ^ c
            e = ((e + a) & M) * D
            a = ((a + ((b >> 28) ^ (b >> 34) ^ (b >> 39)) + (c ^ (x1 & x0))) & M) * D
            h += ((e >> 14) ^ (e >> 18) ^ (e >> 41)) + (g ^ (e & (f ^ g))) + k8 + w8
            x0 = a ^ b
            d = ((d + h) & M) * D
            h = ((h + ((a >> 28) ^ (a >> 34) ^ (a >> 39)) + (b ^ (x0 & x1))) & M) * D
            g += ((d >> 14) ^ (d >> 18) ^ (d >> 41)) + (f ^ (d & (e ^ f))) + k9 + w9
            x1 = h ^ a
            c = ((c + g) & M) * D
            g = ((g + ((h >> 28) ^ (h >> 34) ^ (h >> 39)) + (a ^ (x1 & x0))) & M) * D
            f += ((c >> 14) ^ (c >> 18) ^ (c >> 41)) + (e ^ (c & (d ^ e))) + k10 + w10
            x0 = g ^ h
            b = ((b + f) & M) * D
            f = ((f + ((g >> 28) ^ (g >> 34) ^ (g >> 39)) + (h ^ (x0 & x1))) & M) * D
            e += ((b >> 14) ^ (b >> 18) ^ (b >> 41)) + (d ^ (b & (c ^ d))) + k11 + w11
            x1 = f ^ g
            a = ((a + e) & M) * D
            e = ((e + ((f >> 28) ^ (f >> 34) ^ (f >> 39)) + (g ^ (x1 & x0))) & M) * D
            d += ((a >> 14) ^ (a >> 18) ^ (a >> 41)) + (c ^ (a & (b ^ c))) + k12 + w12
            x0 = e ^ f
            h = ((h + d) & M) * D
            d = ((d + ((e >> 28) ^ (e >> 34) ^ (e >> 39)) + (f ^ (x0 & x1))) & M) * D
            c += ((h >> 14) ^ (h >> 18) ^ (h >> 41)) + (b ^ (h & (a ^ b))) + k13 + w13
            x1 = d ^ e
            g = ((g + c) & M) * D
            c = ((c + ((d >> 28) ^ (d >> 34) ^ (d >> 39)) + (e ^ (x1 & x0))) & M) * D
            b += ((g >> 14) ^ (g >> 18) ^ (g >> 41)) + (a ^ (g & (h ^ a))) + k14 + w14
            x0 = c ^ d
            f = ((f + b) & M) * D
            b = ((b + ((c >> 28) ^ (c >> 34) ^ (c >> 39)) + (d ^ (x0 & x1))) & M) * D
            a += ((f >> 14) ^ (f >> 18) ^ (f >> 41)) + (h ^ (f & (g ^ h))) + k15 + w15
            x1 = b ^ c
            e = ((e + a) & M) * D
            a = ((a + ((b >> 28) ^ (b >> 34) ^ (b >> 39)) + (c ^ (x1 & x0))) & M) * D
        h0 = (h0 + a) & M
        h1 = (h1 + b) & M
        h2 = (h2 + c) & M
        h3 = (h3 + d) & M
        h4 = (h4 + e) & M
        h5 = (h5 + f) & M
        h6 = (h6 + g) & M
        h7 = (h7 + h) & M
    return ((h0 << 448) | (h1 << 384) | (h2 << 320) | (h3 << 256)
            | (h4 << 192) | (h5 << 128) | (h6 << 64) | h7).to_bytes(64, "big")


if _hl_sha512 is not None:
    def sha512(data):
        """SHA-512 of `data`; returns 64 bytes (hashlib)."""
        return _hl_sha512(data).digest()
else:  # pragma: no cover - MicroPython wasm
    sha512 = sha512_pure

HAVE_HASHLIB = _hl_sha512 is not None
