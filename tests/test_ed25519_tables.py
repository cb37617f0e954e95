"""protocol/ed25519.py keeps its fixed-base tables as a bytes constant (`_TB`: no int
objects on the meter's heap, nothing built at import, in flash when frozen; issue 10).
This test builds them again from the curve's formulas and checks every byte; run as a
script it prints the constant, to paste into protocol/ed25519.py if the layout changes.

    .venv/bin/python tests/test_ed25519_tables.py > /tmp/tb.txt
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protocol import ed25519  # noqa: E402


def fixed_base_tables():
    buf = bytearray(ed25519._LEN_B)
    base = (ed25519.BX, ed25519.BY, 1, ed25519.BX * ed25519.BY % ed25519.P)
    ed25519._tables_into(buf, 0, base, ed25519._NPB, ed25519._NB)
    return bytes(buf)


def test_fixed_base_tables_are_the_multiples_of_b():
    assert ed25519._TB == fixed_base_tables()


def test_every_entry_is_an_odd_multiple_of_a_power_of_two_of_b():
    # entry d of table j is [(2d + 1) 2^(64j)]B as (y+x, y-x, 2d*x*y), checked against an
    # independent double-and-add in extended coordinates
    p = ed25519.P
    tb = ed25519._TB
    for j in range(ed25519._NPB):
        for d in range(ed25519._NB):
            n = (2 * d + 1) << (64 * j)
            acc = (0, 1, 1, 0)
            q = (ed25519.BX, ed25519.BY, 1, ed25519.BX * ed25519.BY % p)
            while n:
                if n & 1:
                    acc = ed25519._add(acc, q)
                q = ed25519._add(q, q)
                n >>= 1
            zi = ed25519._inv(acc[2])
            x = acc[0] * zi % p
            y = acc[1] * zi % p
            o = ed25519._SIZE_B * j + ed25519._ENTRY * d
            assert int.from_bytes(tb[o:o + 32], "little") == (y + x) % p, (j, d)
            assert int.from_bytes(tb[o + 32:o + 64], "little") == (y - x) % p, (j, d)
            assert int.from_bytes(tb[o + 64:o + 96], "little") == x * y % p * ed25519.D2 % p, (j, d)


def test_key_slots_are_one_preallocated_buffer():
    # a new key's tables are written in place: verifying with many keys allocates no table
    assert isinstance(ed25519._TA, bytearray) and len(ed25519._TA) == 2 * ed25519._LEN_A
    ta = ed25519._TA
    seeds = [bytes([i]) * 32 for i in range(1, 6)]
    for seed in seeds:
        pk = ed25519.public_key(seed)
        assert ed25519.verify(pk, b"m", ed25519.sign(seed, b"m"))
    assert ed25519._TA is ta


if __name__ == "__main__":
    blob = fixed_base_tables()
    for i in range(0, len(blob), 24):
        print('    b"' + "".join("\\x%02x" % c for c in blob[i:i + 24]) + '"')
