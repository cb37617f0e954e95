"""The meter's heap budget, enforced on a MicroPython VM with a real collector and a fixed
heap: the unix port (`micropython -X heapsize=N`, pinned in the dev extras) runs the
firmware compiled to .mpy (as `topup flash` puts it on a board) through
tools/heap_scenario.py: boot on blank flash and provisioning over the REPL, then, after
the reset that ends provisioning, boot, 50 top-ups over the HAN, a metering checkpoint
and every receipt read out over the HAN -- in HEAP bytes, or the test fails.

A meter provisioned with a command key (SPEC.md §10) that applies a signed command after
its 50 top-ups is held to HEAP_COMMANDS: its smallest heap measured 168 KiB (2 KiB steps;
at 166 KiB the meter answers the command BUSY -- out of memory, nothing changed -- and
goes on), so applying a command is 8 KiB over the 160 KiB goal the rest of the firmware
meets (smallest 158 KiB). That is the command path's debt (frozen modules on a board pay
it: their bytecode stays in flash).

The flash image is a host file (tools/heap_scenario.py FileFlash), never on the heap.
The goal (issue 10) is 160 KiB on this 64-bit build, about 112 KiB on a 32-bit board
such as an ESP32 without PSRAM.  tests/bench/bench_heap.py finds the smallest heap the
scenario runs in and where the memory goes.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import unix_port  # noqa: E402

HEAP = 160 * 1024
HEAP_COMMANDS = 176 * 1024
RUNS = 3          # each run lays the heap out differently (address-space randomisation)

pytestmark = pytest.mark.skipif(unix_port.micropython() is None,
                                reason="the unix port comes with the dev extras (Linux x86_64)")


@pytest.fixture(scope="module")
def firmware(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heap")
    tree = unix_port.build_tree(str(tmp / "lib"), mpy=True)
    frames = unix_port.write_frames(str(tmp / "frames.bin"), count=50)
    return tree, frames


@pytest.fixture(scope="module")
def command_frames(tmp_path_factory):
    return unix_port.write_frames(str(tmp_path_factory.mktemp("heap") / "frames.bin"), count=50,
                                  with_command=True)


def test_the_firmware_is_loaded_as_mpy(firmware):
    tree, _ = firmware
    names = [n for _, _, files in os.walk(tree) for n in files]
    assert names and all(n.endswith(".mpy") for n in names), names


@pytest.mark.parametrize("run", range(RUNS))
def test_boot_provision_50_topups_checkpoint_and_readout_fit_the_heap(firmware, run):
    tree, frames = firmware
    ok, figures, output = unix_port.run_scenario(tree, HEAP, frames)
    assert ok, "the meter does not run in %d KiB:\n%s" % (HEAP // 1024, output[-3000:])
    assert len(figures["apply"]) == 50 and "checkpoint" in figures and "readout" in figures
    # nothing grows without bound: 50 receipts on flash cost the ledger a few hundred bytes
    assert figures["apply"][-1] - figures["apply"][0] < 4096, figures["apply"]


def test_a_meter_with_a_command_key_applies_a_command_within_its_budget(firmware, command_frames):
    tree, _ = firmware
    ok, figures, output = unix_port.run_scenario(tree, HEAP_COMMANDS, command_frames)
    assert ok, "the meter does not run in %d KiB:\n%s" % (HEAP_COMMANDS // 1024, output[-3000:])
    # 50 top-ups and the command, each answered with its receipt, all read out
    assert len(figures["apply"]) == 51 and "readout" in figures


def test_the_heap_size_is_enforced(firmware):
    # The same scenario in a heap far too small fails: the limit is real, not advisory.
    tree, frames = firmware
    ok, figures, output = unix_port.run_scenario(tree, 96 * 1024, frames)
    assert not ok
    assert "MemoryError" in output or "FAIL" in output, output[-2000:]


def test_x25519_and_the_code_check_stay_off_the_boot_and_voucher_path(tmp_path):
    # X25519 runs at provisioning only; the keypad-code check (meter.codes with
    # protocol.keycode) is loaded at the first code: neither is in a booted meter's heap,
    # and taking a code never loads X25519 either.
    import subprocess
    tree = unix_port.build_tree(str(tmp_path / "lib"), mpy=False)
    script = (
        "import sys\n"
        "import meter.app, meter.ledger, meter.han_server, meter.uplink\n"
        "print('BOOT', sorted(m for m in sys.modules if m.startswith(('meter', 'protocol'))))\n"
        "from meter import codes\n"
        "print('CODES', sorted(m for m in sys.modules if m.startswith(('meter', 'protocol'))))\n")
    out = subprocess.run([unix_port.micropython(), "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, MICROPYPATH=tree), timeout=60, check=True).stdout
    boot = [line for line in out.splitlines() if line.startswith("BOOT")][0]
    after = [line for line in out.splitlines() if line.startswith("CODES")][0]
    assert "protocol.ed25519" in boot and "meter.supply" in boot and "meter.lockout" in boot
    for name in ("protocol.x25519", "protocol.keycode", "meter.codes", "meter.provisioning"):
        assert "'%s'" % name not in boot, (name, boot)
    assert "'protocol.keycode'" in after and "'protocol.x25519'" not in after, after
