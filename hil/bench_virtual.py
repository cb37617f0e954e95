"""Figures for the virtual board: start, mpremote round trips, fs cp throughput, HAN round trips.

    .venv/bin/python -m hil.bench_virtual
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import serial
from mpremote.transport_serial import SerialTransport

from hil.virtual import REPO, VirtualBoard


def _median_ms(xs):
    return "%.1f ms (median of %d, min %.1f)" % (statistics.median(xs) * 1e3, len(xs), min(xs) * 1e3)


def _deploy_firmware(fsd):
    (fsd / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "firmware" / "boot.py", fsd)
    shutil.copy(REPO / "firmware" / "main.py", fsd)
    for src, name in ((REPO / "firmware" / "meter", "meter"), (REPO / "firmware" / "boards", "boards"),
                      (REPO / "protocol", "protocol")):
        shutil.copytree(src, fsd / "lib" / name, ignore=shutil.ignore_patterns("__pycache__", "vectors"),
                        dirs_exist_ok=True)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="vboard-bench-"))
    try:
        starts = []
        for i in range(5):
            b = VirtualBoard(tmp / ("s%d" % i))
            t = time.monotonic()
            b.start()
            starts.append(time.monotonic() - t)
            b.stop()
        print("start() to a ready REPL, empty board:", _median_ms(starts))

        wd = tmp / "main"
        _deploy_firmware(wd / "fs")
        b = VirtualBoard(wd)
        t = time.monotonic()
        b.start()
        print("start() with the firmware (boot.py run, main.py starting): %.1f ms" % ((time.monotonic() - t) * 1e3))
        t = time.monotonic()
        while b.relay is None:
            time.sleep(0.005)
        print("  ... until the meter app has set the relay: %.1f ms" % ((time.monotonic() - t) * 1e3))
        port = b.repl_port

        # HAN round trip to the real firmware: a STATUS request, answered by meter.han_server
        sys.path.insert(0, str(REPO))
        from protocol import han
        rtts = []
        with serial.Serial(b.han_port, timeout=2) as h:
            for i in range(30):
                d = han.Deframer()
                t = time.monotonic()
                h.write(han.encode_message(han.STATUS, i, {}))
                bodies = []
                while not bodies:
                    bodies = d.feed(h.read(h.in_waiting or 1))
                rtts.append(time.monotonic() - t)
        print("HAN STATUS round trip to the running firmware:", _median_ms(rtts))

        # mpremote CLI: a whole `mpremote exec` (process start, soft reset, exec)
        cli = []
        for _ in range(5):
            t = time.monotonic()
            subprocess.run([sys.executable, "-m", "mpremote", "connect", port, "exec", "print(1)"],
                           check=True, capture_output=True)
            cli.append(time.monotonic() - t)
        print("`mpremote connect PORT exec 'print(1)'` (whole command):", _median_ms(cli))

        tr = SerialTransport(port)
        tr.enter_raw_repl(soft_reset=False)
        ex = []
        for _ in range(30):
            t = time.monotonic()
            tr.exec("print(1)")
            ex.append(time.monotonic() - t)
        print("mpremote API exec('print(1)') round trip (raw-paste):", _median_ms(ex))
        data = os.urandom(64 * 1024)
        for paste in (True, False):
            tr.use_raw_paste = paste
            t = time.monotonic()
            tr.fs_writefile("bench.bin", data)
            dt = time.monotonic() - t
            print("fs cp 64 KiB to the board (%s): %.2f s, %.1f KB/s"
                  % ("raw-paste" if paste else "plain raw REPL", dt, len(data) / dt / 1e3))
        t = time.monotonic()
        back = tr.fs_readfile("bench.bin")
        dt = time.monotonic() - t
        assert back == data
        print("fs cp 64 KiB from the board: %.2f s, %.1f KB/s" % (dt, len(data) / dt / 1e3))

        # HAN echo through a tiny program on the board
        tr.exec_raw_no_follow("from boards.virtual import Uart\nimport _vboard, time\nh = Uart(_vboard.han_read, _vboard.han_write)\n"
                              "while True:\n d = h.read(64)\n if d:\n  h.write(d)\n else:\n  time.sleep_ms(1)\n")
        time.sleep(0.2)
        echo = []
        with serial.Serial(b.han_port, timeout=2) as h:
            for _ in range(50):
                t = time.monotonic()
                h.write(b"0123456789abcdef\x00")
                assert h.read(17) == b"0123456789abcdef\x00"
                echo.append(time.monotonic() - t)
        print("HAN echo round trip, 17 bytes, through a program on the board:", _median_ms(echo))
        tr.serial.write(b"\x03")
        tr.follow(5)
        tr.exit_raw_repl()
        tr.close()
        b.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
