# Helpers for the dual-VM test modules (run by pytest and inside MicroPython).
import binascii
import json

from protocol.errors import Rejected, name

REPO = __file__.rsplit("/", 3)[0] if __file__.count("/") >= 3 else "."


def repo_path(relative):
    return REPO + "/" + relative


def load_vectors(filename):
    with open(repo_path("protocol/vectors/" + filename)) as f:
        return json.load(f)


def unhex(s):
    return binascii.unhexlify(s)


def expect_rejected(reason, fn, *args, **kwargs):
    """Call fn and require Rejected with `reason`; return the exception."""
    try:
        result = fn(*args, **kwargs)
    except Rejected as e:
        assert e.reason == reason, "expected %s, got %s (%s)" % (name(reason), name(e.reason), e)
        return e
    raise AssertionError("expected %s, got a result: %r" % (name(reason), result))
