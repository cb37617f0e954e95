# Runs on CPython (pytest) and on MicroPython (tools/mpy_test.mjs): plain asserts only.
from protocol import errors


def test_every_reason_has_a_distinct_name():
    codes = [v for k, v in errors.NAMES.items()]
    assert len(set(codes)) == len(codes)
    for code, name in errors.NAMES.items():
        assert getattr(errors, name) == code


def test_rejected_carries_reason_and_detail():
    e = errors.Rejected(errors.STALE, "seq 3 below window")
    assert e.reason == errors.STALE
    assert str(e) == "STALE: seq 3 below window"
    assert str(errors.Rejected(errors.EXPIRED)) == "EXPIRED"
    assert errors.name(999) == "UNKNOWN_999"
