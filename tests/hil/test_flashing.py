"""topup flash's decisions, without a board: which files go where, the .mpy version chosen
for the board's MicroPython, and the clear refusals for a board it cannot serve."""
import pytest

from hil import flashing


class FakeBoard:
    """Stands in for hil.flashing.Board: answers info() as a given board would."""
    answer = None

    def __init__(self, port, *a, **kw):
        self.port = port

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def info(self):
        return dict(self.answer)


def _flash_with(monkeypatch, **answer):
    FakeBoard.answer = dict({"name": "micropython", "version": (1, 27, 0), "mpy": 0x306,
                             "platform": "esp32"}, **answer)
    monkeypatch.setattr(flashing, "Board", FakeBoard)
    with pytest.raises(flashing.FlashError) as e:
        flashing.flash("/dev/ttyFAKE")
    return str(e.value)


def test_firmware_files_go_where_a_board_imports_them():
    files = {dest: compiled for src, dest, compiled in flashing.firmware_files()}
    assert files["/boot.py"] is False and files["/main.py"] is False
    for dest in ("/lib/meter/ledger.py", "/lib/meter/store.py", "/lib/boards/esp32.py",
                 "/lib/boards/mcu.py", "/lib/protocol/ed25519.py", "/lib/protocol/voucher.py"):
        assert files[dest] is True, dest
    assert not any("manifest" in d or "vectors" in d for d in files)


def test_bytecode_version_from_sys_implementation_mpy():
    assert flashing.bytecode_version(0x306) == "6.3"    # MicroPython 1.23 … 1.27
    assert flashing.bytecode_version(0x206) == "6.2"
    assert flashing.bytecode_version(6) == "6.0"


def test_compiled_module_carries_the_boards_mpy_version(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("X = 1\n")
    data = flashing.compile_mpy(src, "6.3")
    assert data[:2] == b"M\x06"          # .mpy magic and version 6 (bytecode-only: no arch flags)
    assert data[2] == 0


def test_not_micropython_is_refused(monkeypatch):
    assert "not MicroPython" in _flash_with(monkeypatch, name="circuitpython")


def test_too_old_micropython_is_refused_with_the_version_needed(monkeypatch):
    msg = _flash_with(monkeypatch, version=(1, 19, 1), mpy=6)
    assert "MicroPython 1.19.1" in msg and "1.20.0 or newer" in msg


def test_unknown_bytecode_version_is_refused(monkeypatch):
    msg = _flash_with(monkeypatch, version=(1, 30, 0), mpy=0x007)
    assert "cannot compile for .mpy version 7.0" in msg


def test_a_busy_port_is_a_clear_error(tmp_path):
    import os
    import tty

    import serial

    master, slave = os.openpty()
    tty.setraw(slave)
    port = os.ttyname(slave)
    holder = serial.Serial(port, exclusive=True)       # another program has the port
    try:
        with pytest.raises(flashing.FlashError) as e:
            flashing.flash(port)
        assert "cannot open %s" % port in str(e.value) and "another program" in str(e.value)
    finally:
        holder.close()
        os.close(master)
        os.close(slave)
