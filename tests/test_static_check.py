# The firmware static check (tools/check_firmware.py, `make check-firmware`) must fail on
# CPython-only APIs and pass MicroPython ones: run it on a temporary tree with known files.
import importlib.util
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "tools", "check_firmware.py")

BAD = '''\
import os
import itertools
import functools
import struct
import sys
import time

os.makedirs("data", exist_ok=True)
b"\\x01\\x02".hex(":", 2)
time.monotonic()
struct.Struct("<I")
sys.getsizeof(1)
int.from_bytes(b"\\xff", "big", signed=True)
"{a}".format_map({"a": 1})
"ab".removeprefix("a")
'''
# line numbers (1-based) of the findings BAD must produce
BAD_LINES = {2, 3, 8, 9, 10, 11, 12, 13, 14, 15}

GOOD = '''\
import asyncio
import os
import struct
import time

import machine
from micropython import const

_N = const(4)


def run():
    pin = machine.Pin(2, machine.Pin.OUT)
    pin.value(1)
    t0 = time.ticks_ms()
    time.sleep_ms(1)
    print(time.ticks_diff(time.ticks_ms(), t0), b"\\x01\\x02".hex(":"), os.urandom(_N))
    print(int.from_bytes(b"\\x01\\x02", "big"), (258).to_bytes(2, "little"), struct.pack("<I", 1))
    asyncio.run(asyncio.sleep_ms(1))

try:
    from hashlib import sha512  # absent on the ESP32: guarded, so allowed
except ImportError:
    sha512 = None
'''


def _run_check(root, *args):
    return subprocess.run([sys.executable, CHECK, "--root", str(root)] + list(args),
                          capture_output=True, text=True, timeout=600)


def test_cpython_only_apis_fail_the_check_and_micropython_ones_pass(tmp_path):
    meter = tmp_path / "firmware" / "meter"
    meter.mkdir(parents=True)
    (tmp_path / "protocol").mkdir()
    (meter / "__init__.py").write_text("")
    (meter / "bad.py").write_text(BAD)
    (meter / "good.py").write_text(GOOD)
    r = _run_check(tmp_path, "--port", "esp32")
    assert r.returncode == 1, r.stdout + r.stderr
    found = {}
    for line in r.stdout.splitlines():
        if line.startswith("firmware/meter/"):
            path, lineno = line.split(":")[:2]
            found.setdefault(path, set()).add(int(lineno))
    assert "firmware/meter/good.py" not in found, r.stdout
    assert found.get("firmware/meter/bad.py") == BAD_LINES, r.stdout


def _load_check():
    spec = importlib.util.spec_from_file_location("check_firmware", CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pruning_removes_cpython_methods_and_fails_loudly_when_stale():
    check = _load_check()
    stub = textwrap.dedent('''\
        class bytes:
            def __len__(self) -> int: ...
            def hex(self, sep: str = ..., bytes_per_sep: int = ...) -> str: ...
            def find(self, sub: bytes) -> int: ...
            if sys.version_info >= (3, 9):
                def removeprefix(self, prefix: bytes) -> bytes: ...
        ''')
    out = check.prune(stub, "bytes", {"find", "hex"}, {"hex": "def hex(self, sep: str = ..., /) -> str: ..."})
    assert "removeprefix" not in out and "bytes_per_sep" not in out
    assert "def find" in out and "def __len__" in out and "def hex(self, sep: str = ..., /)" in out
    try:
        check.prune(out, "bytes", {"find", "hex"}, {"zfill": "def zfill(self) -> bytes: ..."})
    except SystemExit as e:
        assert "no longer matches" in str(e)
    else:
        raise AssertionError("a stale pruning rule must stop the check")


def test_guarded_imports_are_recognised(tmp_path):
    check = _load_check()
    src = tmp_path / "m.py"
    src.write_text("try:\n    import itertools\nexcept ImportError:\n    itertools = None\nimport functools\n")
    assert check.guarded_import_lines(str(src)) == {2}
