"""pytest plugin for the HIL rig (registered under `pytest11`): board options, the `hil`
marker, and fixtures that hand a test a flashed, provisioned board. Filled in below."""


def pytest_addoption(parser):
    group = parser.getgroup("offline-topup rig")
    group.addoption("--board", default=None, metavar="virtual|PORT",
                    help="board under test: 'virtual' or a serial port (env TOPUP_BOARD; default virtual)")
    group.addoption("--han-port", default=None, metavar="PORT",
                    help="the HAN serial port of a real board (env TOPUP_HAN_PORT)")
    group.addoption("--rig", default=None, metavar="FILE",
                    help="rig description file for a bench board (env TOPUP_RIG)")


def pytest_configure(config):
    config.addinivalue_line("markers", "hil: runs against the board under test (virtual or real)")
