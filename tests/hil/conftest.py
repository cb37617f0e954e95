# The HIL suite's own fixtures. The board, its HAN client and the issuer come from the rig's
# pytest plugin (hil/pytest_plugin.py: one place for board set-up); here only the harness that
# drives a board together with its host-side model and books (hil/rig.py).
import pytest

from hil.rig import Harness


@pytest.fixture
def meter(board, han):
    """The board under test with its model and books: act through it, then `meter.settle()`."""
    h = Harness(board, han)
    h.settle()
    return h
