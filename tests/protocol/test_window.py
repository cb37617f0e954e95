# Replay window (SPEC.md §2.2) and the credit ceiling.
from protocol import window
from protocol.errors import STALE, SEQUENCE_REUSED, OVER_CREDIT_LIMIT
from tests.protocol._support import expect_rejected


class _V:
    def __init__(self, seq, ref):
        self.sequence = seq
        self.ref = ref


def test_in_order_and_out_of_order_inside_the_window():
    w = window.ReplayWindow()
    for seq in (1, 2, 5, 3):
        assert not w.is_used(seq)
        w.mark(seq)
    assert w.highest == 5
    for seq in (1, 2, 3, 5):
        assert w.is_used(seq)
    assert not w.is_used(4)
    assert not w.is_used(6)


def test_window_edges_and_stale():
    w = window.ReplayWindow()
    w.mark(100)
    assert not w.is_used(100 - 64)      # lowest sequence still inside the window
    w.mark(36)
    assert w.is_used(36)
    expect_rejected(STALE, w.is_used, 35)
    w.mark(200)                          # jump beyond the window: everything older is stale
    assert w.bitmap == 0
    expect_rejected(STALE, w.is_used, 100)
    assert not w.is_used(199)


def test_window_matches_a_set_model():
    # Deterministic pseudo-random walk checked against an explicit set of applied sequences.
    w = window.ReplayWindow()
    applied = set()
    x = 12345
    for _ in range(2000):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        seq = max(1, w.highest + (x % 90) - 70)
        try:
            used = w.is_used(seq)
        except Exception:
            assert seq < w.highest - 64
            continue
        assert used == (seq in applied)
        if not used:
            w.mark(seq)
            applied.add(seq)
        assert w.highest == max(applied)


def test_admit_resubmission_and_reuse():
    w = window.ReplayWindow()
    stored = {}
    v = _V(3, b"A" * 16)
    assert window.admit(w, v, stored.get) is True
    w.mark(3)
    stored[3] = v.ref
    assert window.admit(w, v, stored.get) is False          # same voucher: idempotent
    expect_rejected(SEQUENCE_REUSED, window.admit, w, _V(3, b"B" * 16), stored.get)


def test_credit_ceiling_is_never_truncated():
    window.check_credit(0, 5000, 5000)
    window.check_credit(-250000, 5000, 5000)      # repaying emergency credit
    expect_rejected(OVER_CREDIT_LIMIT, window.check_credit, 1, 5000, 5000)
    expect_rejected(OVER_CREDIT_LIMIT, window.check_credit, 4000000, 1001, 5000)
