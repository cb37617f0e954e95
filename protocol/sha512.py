# SHA-512 (FIPS 180-4) for CPython and MicroPython.
# Runs unchanged on both.  `sha512(data)` uses hashlib where the VM has it (CPython, most
# MicroPython ports built with mbedTLS); the MicroPython WebAssembly port has only sha256,
# so `sha512_pure` is a pure-Python implementation written for MicroPython's bytecode VM,
# where the dispatch of each operation costs about as much as the arithmetic (a 24-bit and
# a 128-bit xor cost nearly the same there, so 32-bit halves would only double the work):
# locals only, no tuples or lists built per round, 16 rounds unrolled with rotating names
# (K and the schedule in locals), 64-bit masking on doubled words.

from struct import unpack, unpack_from

try:
    from hashlib import sha512 as _hl_sha512
    _hl_sha512(b"")
except (ImportError, AttributeError, ValueError):  # pragma: no cover - MicroPython wasm
    _hl_sha512 = None

# The round constants K[0..79] and the initial hash H0[0..7] (FIPS 180-4 4.2.3, 5.3.5) as
# 64-bit big-endian words in bytes constants, unpacked 16 (8) at a time where used: on
# MicroPython a 64-bit int is a heap object (on a 64-bit build those above 2^62), so 88
# held ints would cost ~5 KB of heap, and a bytes constant costs 704 bytes (none when
# the module is frozen).  K[i] = struct.unpack_from(">Q", _K, 8 * i)[0].
_K = (
    b"\x42\x8a\x2f\x98\xd7\x28\xae\x22" b"\x71\x37\x44\x91\x23\xef\x65\xcd"  # 0
    b"\xb5\xc0\xfb\xcf\xec\x4d\x3b\x2f" b"\xe9\xb5\xdb\xa5\x81\x89\xdb\xbc"  # 2
    b"\x39\x56\xc2\x5b\xf3\x48\xb5\x38" b"\x59\xf1\x11\xf1\xb6\x05\xd0\x19"  # 4
    b"\x92\x3f\x82\xa4\xaf\x19\x4f\x9b" b"\xab\x1c\x5e\xd5\xda\x6d\x81\x18"  # 6
    b"\xd8\x07\xaa\x98\xa3\x03\x02\x42" b"\x12\x83\x5b\x01\x45\x70\x6f\xbe"  # 8
    b"\x24\x31\x85\xbe\x4e\xe4\xb2\x8c" b"\x55\x0c\x7d\xc3\xd5\xff\xb4\xe2"  # 10
    b"\x72\xbe\x5d\x74\xf2\x7b\x89\x6f" b"\x80\xde\xb1\xfe\x3b\x16\x96\xb1"  # 12
    b"\x9b\xdc\x06\xa7\x25\xc7\x12\x35" b"\xc1\x9b\xf1\x74\xcf\x69\x26\x94"  # 14
    b"\xe4\x9b\x69\xc1\x9e\xf1\x4a\xd2" b"\xef\xbe\x47\x86\x38\x4f\x25\xe3"  # 16
    b"\x0f\xc1\x9d\xc6\x8b\x8c\xd5\xb5" b"\x24\x0c\xa1\xcc\x77\xac\x9c\x65"  # 18
    b"\x2d\xe9\x2c\x6f\x59\x2b\x02\x75" b"\x4a\x74\x84\xaa\x6e\xa6\xe4\x83"  # 20
    b"\x5c\xb0\xa9\xdc\xbd\x41\xfb\xd4" b"\x76\xf9\x88\xda\x83\x11\x53\xb5"  # 22
    b"\x98\x3e\x51\x52\xee\x66\xdf\xab" b"\xa8\x31\xc6\x6d\x2d\xb4\x32\x10"  # 24
    b"\xb0\x03\x27\xc8\x98\xfb\x21\x3f" b"\xbf\x59\x7f\xc7\xbe\xef\x0e\xe4"  # 26
    b"\xc6\xe0\x0b\xf3\x3d\xa8\x8f\xc2" b"\xd5\xa7\x91\x47\x93\x0a\xa7\x25"  # 28
    b"\x06\xca\x63\x51\xe0\x03\x82\x6f" b"\x14\x29\x29\x67\x0a\x0e\x6e\x70"  # 30
    b"\x27\xb7\x0a\x85\x46\xd2\x2f\xfc" b"\x2e\x1b\x21\x38\x5c\x26\xc9\x26"  # 32
    b"\x4d\x2c\x6d\xfc\x5a\xc4\x2a\xed" b"\x53\x38\x0d\x13\x9d\x95\xb3\xdf"  # 34
    b"\x65\x0a\x73\x54\x8b\xaf\x63\xde" b"\x76\x6a\x0a\xbb\x3c\x77\xb2\xa8"  # 36
    b"\x81\xc2\xc9\x2e\x47\xed\xae\xe6" b"\x92\x72\x2c\x85\x14\x82\x35\x3b"  # 38
    b"\xa2\xbf\xe8\xa1\x4c\xf1\x03\x64" b"\xa8\x1a\x66\x4b\xbc\x42\x30\x01"  # 40
    b"\xc2\x4b\x8b\x70\xd0\xf8\x97\x91" b"\xc7\x6c\x51\xa3\x06\x54\xbe\x30"  # 42
    b"\xd1\x92\xe8\x19\xd6\xef\x52\x18" b"\xd6\x99\x06\x24\x55\x65\xa9\x10"  # 44
    b"\xf4\x0e\x35\x85\x57\x71\x20\x2a" b"\x10\x6a\xa0\x70\x32\xbb\xd1\xb8"  # 46
    b"\x19\xa4\xc1\x16\xb8\xd2\xd0\xc8" b"\x1e\x37\x6c\x08\x51\x41\xab\x53"  # 48
    b"\x27\x48\x77\x4c\xdf\x8e\xeb\x99" b"\x34\xb0\xbc\xb5\xe1\x9b\x48\xa8"  # 50
    b"\x39\x1c\x0c\xb3\xc5\xc9\x5a\x63" b"\x4e\xd8\xaa\x4a\xe3\x41\x8a\xcb"  # 52
    b"\x5b\x9c\xca\x4f\x77\x63\xe3\x73" b"\x68\x2e\x6f\xf3\xd6\xb2\xb8\xa3"  # 54
    b"\x74\x8f\x82\xee\x5d\xef\xb2\xfc" b"\x78\xa5\x63\x6f\x43\x17\x2f\x60"  # 56
    b"\x84\xc8\x78\x14\xa1\xf0\xab\x72" b"\x8c\xc7\x02\x08\x1a\x64\x39\xec"  # 58
    b"\x90\xbe\xff\xfa\x23\x63\x1e\x28" b"\xa4\x50\x6c\xeb\xde\x82\xbd\xe9"  # 60
    b"\xbe\xf9\xa3\xf7\xb2\xc6\x79\x15" b"\xc6\x71\x78\xf2\xe3\x72\x53\x2b"  # 62
    b"\xca\x27\x3e\xce\xea\x26\x61\x9c" b"\xd1\x86\xb8\xc7\x21\xc0\xc2\x07"  # 64
    b"\xea\xda\x7d\xd6\xcd\xe0\xeb\x1e" b"\xf5\x7d\x4f\x7f\xee\x6e\xd1\x78"  # 66
    b"\x06\xf0\x67\xaa\x72\x17\x6f\xba" b"\x0a\x63\x7d\xc5\xa2\xc8\x98\xa6"  # 68
    b"\x11\x3f\x98\x04\xbe\xf9\x0d\xae" b"\x1b\x71\x0b\x35\x13\x1c\x47\x1b"  # 70
    b"\x28\xdb\x77\xf5\x23\x04\x7d\x84" b"\x32\xca\xab\x7b\x40\xc7\x24\x93"  # 72
    b"\x3c\x9e\xbe\x0a\x15\xc9\xbe\xbc" b"\x43\x1d\x67\xc4\x9c\x10\x0d\x4c"  # 74
    b"\x4c\xc5\xd4\xbe\xcb\x3e\x42\xb6" b"\x59\x7f\x29\x9c\xfc\x65\x7e\x2a"  # 76
    b"\x5f\xcb\x6f\xab\x3a\xd6\xfa\xec" b"\x6c\x44\x19\x8c\x4a\x47\x58\x17"  # 78
)
_H0 = (
    b"\x6a\x09\xe6\x67\xf3\xbc\xc9\x08" b"\xbb\x67\xae\x85\x84\xca\xa7\x3b"  # 0
    b"\x3c\x6e\xf3\x72\xfe\x94\xf8\x2b" b"\xa5\x4f\xf5\x3a\x5f\x1d\x36\xf1"  # 2
    b"\x51\x0e\x52\x7f\xad\xe6\x82\xd1" b"\x9b\x05\x68\x8c\x2b\x3e\x6c\x1f"  # 4
    b"\x1f\x83\xd9\xab\xfb\x41\xbd\x6b" b"\x5b\xe0\xcd\x19\x13\x7e\x21\x79"  # 6
)


def sha512_pure(data):
    """SHA-512 of `data` (bytes-like) in pure Python; returns 64 bytes."""
    data = bytes(data)
    n = len(data)
    # Padding: 0x80, zeros, 128-bit big-endian bit length; total a multiple of 128.
    msg = data + b"\x80" + bytes((111 - n) % 128) + (n * 8).to_bytes(16, "big")
    D = 0x10000000000000001  # x * D == x | x << 64 for x < 2**64: a "doubled" word
    M = 0xFFFFFFFFFFFFFFFF
    h0, h1, h2, h3, h4, h5, h6, h7 = unpack(">8Q", _H0)
    frm = int.from_bytes
    KB = _K
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
            k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13, k14, k15 = unpack_from(
                ">16Q", KB, 128 * grp)
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
