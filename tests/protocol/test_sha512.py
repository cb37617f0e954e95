# Runs on CPython (pytest) and on MicroPython (tools/mpy_test.mjs): plain asserts only.
from protocol.sha512 import sha512, sha512_pure

VECTORS = (
    # FIPS 180-4 / NIST CSRC examples
    (b"", "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
          "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"),
    (b"abc", "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
             "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"),
    (b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq"
     b"klmnopqrlmnopqrsmnopqrstnopqrstu",
     "8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018"
     "501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909"),
    (b"a" * 1000, "67ba5535a46e3f86dbfbed8cbbaf0125c76ed549ff8b0b9e03e0c88cf90fa634"
                  "fa7b12b47d77b694de488ace8d9a65967dc96df599727d3292a8d9d447709c97"),
)


def test_known_vectors_pure():
    for msg, want in VECTORS:
        assert sha512_pure(msg).hex() == want


def test_known_vectors_default():
    for msg, want in VECTORS:
        assert sha512(msg).hex() == want


def test_padding_boundaries_agree():
    # lengths around the 111/112/128-byte padding edges; pure path vs the default path
    for n in (0, 1, 55, 56, 63, 64, 110, 111, 112, 113, 127, 128, 129, 239, 240, 255, 256):
        data = bytes((i * 7 + n) & 0xFF for i in range(n))
        assert sha512_pure(data) == sha512(data)
        assert len(sha512_pure(data)) == 64


def test_accepts_bytearray_and_memoryview():
    assert sha512_pure(bytearray(b"abc")) == sha512_pure(b"abc")
    assert sha512_pure(memoryview(b"abc")) == sha512_pure(b"abc")
