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


# --- provisioning with a keypad-code key (issue 11) ----------------------------------------

class FakeRepl:
    """Stands in for hil.flashing.Board at provisioning: runs what the tool sends through
    `answer(code)`, which returns the REPL's output or raises FlashError, as Board.run does."""
    answer = None
    sent = []

    def __init__(self, port, *a, **kw):
        self.port = port

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def run(self, code):
        FakeRepl.sent.append(code)
        return FakeRepl.answer(code)

    def soft_reset(self):
        pass


def _meter_repl(monkeypatch):
    """The real firmware's provision_board (CPython) on a NOR flash: what a board runs."""
    import contextlib
    import io
    import tests.firmware._fw  # noqa: F401
    from boards.nor import NorFlash
    from meter import provisioning
    from meter.store import Store
    from tests.firmware._meterkit import Clock, _ProvisioningBoard
    store = Store(NorFlash(blocks=16))
    store.mount()
    monkeypatch.setattr(provisioning, "_board_store",
                        lambda board: (_ProvisioningBoard(Clock(1790000000)), store))

    def answer(code):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, {})
        return out.getvalue()
    FakeRepl.answer, FakeRepl.sent = answer, []
    monkeypatch.setattr(flashing, "Board", FakeRepl)
    return store


def test_provision_installs_the_code_key_and_reads_the_meters_ka_key(monkeypatch):
    """Supplier and meter derive the same per-meter code key: the supplier's side with
    libsodium (host.keystore.CodeKey), the meter's with the pure-Python X25519 in its
    firmware, each from its own secret and the other's public key (SPEC.md §8)."""
    import nacl.utils
    from host.keystore import CodeKey
    from protocol.cose import kid_for
    store = _meter_repl(monkeypatch)
    from meter import config as cfg
    supplier = CodeKey(nacl.utils.random(32))
    device = bytes.fromhex("70b3d5f0000000a1")
    key = flashing.provision("/dev/ttyFAKE", device, [bytes(32)], now=1790000000,
                             code_key=supplier.public_key)
    config = cfg.decode(store.config)
    assert key.ka == config[cfg.C_KA_PUBLIC] and key.code_kid == kid_for(supplier.public_key)
    assert key.codes_note is None and (key.first_index, key.floor) == (0, 0)
    assert config[cfg.C_CODE_SUPPLIER] == supplier.public_key
    assert config[cfg.C_CODE_KEY] == supplier.code_key(device, key.ka)
    assert "code_key_hex='%s'" % supplier.public_key.hex() in FakeRepl.sent[-1]


def test_provision_without_a_code_key_registers_no_ka_key(monkeypatch):
    _meter_repl(monkeypatch)
    key = flashing.provision("/dev/ttyFAKE", bytes(8), [bytes(32)], now=1790000000)
    assert key.ka is None and key.code_kid is None and "takes no codes" in key.codes_note
    assert "code_key_hex" not in FakeRepl.sent[-1]


def test_old_firmware_is_provisioned_without_codes_and_says_so(monkeypatch):
    """Firmware from before keypad codes takes no code_key_hex and prints no KA: the board
    is provisioned all the same (the call failed before doing anything), and the result
    says that the meter takes no codes."""
    def answer(code):
        if "code_key_hex" in code:
            raise flashing.FlashError("board error: TypeError: unexpected keyword argument "
                                      "'code_key_hex'")
        return "PUBLIC %s FIRST 3 FLOOR 7\n" % ("ab" * 32)
    FakeRepl.answer, FakeRepl.sent = answer, []
    monkeypatch.setattr(flashing, "Board", FakeRepl)
    key = flashing.provision("/dev/ttyFAKE", bytes(8), [bytes(32)], code_key=bytes(range(32)))
    assert bytes(key) == bytes.fromhex("ab" * 32) and (key.first_index, key.floor) == (3, 7)
    assert key.ka is None and key.code_kid is None
    assert "predates keypad codes" in key.codes_note and "takes no codes" in key.codes_note
    assert len(FakeRepl.sent) == 2 and "code_key_hex" not in FakeRepl.sent[1]
    # firmware that takes the key but prints no KA: no codes either
    FakeRepl.answer = lambda code: "PUBLIC %s FIRST 0 FLOOR 0\n" % ("cd" * 32)
    key = flashing.provision("/dev/ttyFAKE", bytes(8), [bytes(32)], code_key=bytes(range(32)))
    assert key.ka is None and "printed no key-agreement key" in key.codes_note
    # any other error is not retried
    FakeRepl.answer = lambda code: (_ for _ in ()).throw(
        flashing.FlashError("board error: ValueError: nope"))
    with pytest.raises(flashing.FlashError, match="nope"):
        flashing.provision("/dev/ttyFAKE", bytes(8), [bytes(32)], code_key=bytes(range(32)))
