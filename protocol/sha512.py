# SHA-512 (FIPS 180-4) for CPython and MicroPython.
# Runs unchanged on both.  `sha512(data)` uses hashlib where the VM has it (CPython, most
# MicroPython ports built with mbedTLS); the MicroPython WebAssembly port has only sha256,
# so `sha512_pure` is a compact pure-Python implementation with the hot loop written for
# MicroPython: locals only, no tuples or lists built per round, 64-bit masking.

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


def sha512_pure(data):
    """SHA-512 of `data` (bytes-like) in pure Python; returns 64 bytes."""
    data = bytes(data)
    n = len(data)
    # Padding: 0x80, zeros, 128-bit big-endian bit length; total a multiple of 128.
    pad = (111 - n) % 128
    msg = data + b"\x80" + bytes(pad) + (n * 8).to_bytes(16, "big")
    M = 0xFFFFFFFFFFFFFFFF
    D = 0x10000000000000001  # x * D == x | x << 64 for x < 2**64: a "doubled" word
    K = _K
    h0, h1, h2, h3, h4, h5, h6, h7 = _H0
    w = [0] * 80
    frm = int.from_bytes
    for off in range(0, len(msg), 128):
        for i in range(16):
            j = off + 8 * i
            w[i] = frm(msg[j:j + 8], "big")
        for i in range(16, 80):
            # sigma0/sigma1 on doubled words: a right shift of x|x<<64 is a rotation in
            # its low 64 bits; bits above 64 are left unmasked (they vanish in & M).
            x = w[i - 15]
            y = w[i - 2]
            xx = x * D
            yy = y * D
            w[i] = (w[i - 16] + w[i - 7] + ((xx >> 1) ^ (xx >> 8) ^ (x >> 7))
                    + ((yy >> 19) ^ (yy >> 61) ^ (y >> 6))) & M
        # Working variables are kept doubled (x|x<<64); only the low 64 bits matter.
        a = h0 * D
        b = h1 * D
        c = h2 * D
        d = h3 * D
        e = h4 * D
        f = h5 * D
        g = h6 * D
        h = h7 * D
        bc = b ^ c
        for i in range(80):
            t1 = h + ((e >> 14) ^ (e >> 18) ^ (e >> 41)) + (g ^ (e & (f ^ g))) + K[i] + w[i]
            ab = a ^ b
            t2 = ((a >> 28) ^ (a >> 34) ^ (a >> 39)) + (b ^ (ab & bc))
            bc = ab
            h = g
            g = f
            f = e
            e = ((d + t1) & M) * D
            d = c
            c = b
            b = a
            a = ((t1 + t2) & M) * D
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
