"""Issue 9, item 18: the voucher's sizes as README.md states them, measured: bytes, text
form characters and QR code version (alphanumeric mode, error correction M, as `topup`
draws them) over sequences 1 … 2^32 − 1, amounts 1p … £10,000, with and without expiry,
issue times before 2106 (4-byte) and up to 2^48 − 1."""
import nacl.signing

from host import delivery
from protocol import voucher as pv
from protocol.cose import kid_for

SK = nacl.signing.SigningKey(bytes(range(32)))
KID = kid_for(bytes(SK.verify_key))
DEVICE = bytes.fromhex("70b3d5f0000000a1")
SEQUENCES = (1, 23, 24, 255, 256, 65535, 65536, 2 ** 32 - 1)
AMOUNTS = (1, 23, 24, 255, 256, 65535, 65536, 1_000_000)
NOW = 1_760_000_000


def _measure(seq, amount, issued, expires):
    raw = pv.encode(KID, lambda m: SK.sign(m).signature, DEVICE, seq, amount, issued, expires)
    text = pv.to_text(raw)
    qr = delivery.qr(raw)
    assert qr.mode == "alphanumeric" and qr.error == "M"
    return len(raw), len(text), qr.version


def _table(issued=NOW):
    out = {}
    for seq in SEQUENCES:
        for amount in AMOUNTS:
            for expiry in (False, True):
                exp = min(issued + 30 * 86400, 2 ** 48 - 1) if expiry else None
                out[(seq, amount, expiry)] = _measure(seq, amount, issued, exp)
    return out


def _span(values):
    return min(values), max(values)


def test_sizes_and_qr_versions_as_the_readme_says():
    t = _table()
    no_exp = [v for (s, a, e), v in t.items() if not e]
    assert _span([b for b, _, _ in no_exp]) == (105, 114)
    assert _span([c for _, c, _ in no_exp]) == (163, 176)
    assert {q for _, _, q in no_exp} == {7}
    v8 = {(s, a) for (s, a, e), (_, _, q) in t.items() if e and q == 8}
    v7 = {(s, a) for (s, a, e), (_, _, q) in t.items() if e and q == 7}
    # version 8 exactly when the sequence reaches 256 and the amount £2.56, or the sequence
    # 65,536, or the amount £655.36
    assert v8 == {(s, a) for s in SEQUENCES for a in AMOUNTS
                  if (s >= 256 and a >= 256) or s >= 65536 or a >= 65536}
    assert _span([t[(s, a, True)][0] for s, a in v7]) == (112, 115)
    assert _span([t[(s, a, True)][1] for s, a in v7]) == (173, 178)
    assert _span([t[(s, a, True)][0] for s, a in v8]) == (116, 120)
    assert _span([t[(s, a, True)][1] for s, a in v8]) == (179, 185)
    assert _span([c for _, c, _ in t.values()]) == (163, 185)
    # a typical voucher: £10 with an expiry is version 7 up to sequence 255, then 8
    assert _measure(255, 1000, NOW, NOW + 86400)[2] == 7
    assert _measure(256, 1000, NOW, NOW + 86400)[2] == 8


def test_times_up_to_the_protocol_limit():
    t = _table(2 ** 48 - 2)
    assert max(b for b, _, _ in t.values()) == 128
    assert max(c for _, c, _ in t.values()) == 197
    assert {q for _, _, q in t.values()} <= {7, 8}


def test_the_readme_states_the_measured_figures():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for figure in ("| no expiry | 105–114 | 163–176 characters | version 7 (45×45) |",
                   "| 112–115 | 173–178 characters | version 7 (45×45) |",
                   "| 116–120 | 179–185 characters | version 8 (49×49) |",
                   "at most 128 bytes, 197 characters, still version 8"):
        assert figure in readme, figure
    assert "166–176" not in readme
