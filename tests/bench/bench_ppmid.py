#!/usr/bin/env python3
"""Key press -> display update on the virtual PPMID (firmware/ppmid/ on the virtual board,
its HAN joined to a virtual meter's by the rig's cable), for the README.

    .venv/bin/python tests/bench/bench_ppmid.py [--presses N] [--json]

Each sample: read the display's generation, press one key through the rig's control channel,
wait (Atomics.waitAsync in the board's Node process) until the firmware has drawn a new
screen.  The keys alternate a digit and backspace, so every press changes the screen. The
figure is end to end: the control channel in, the firmware's main loop (5 ms idle sleep)
taking the key, laying the screen out, drawing it into the 128x64 framebuffer with
framebuf's text and the £ glyph, and handing text and pixels to the rig -- and the channel
back.  A `#` (send) is timed too: the key to the "Sending..." screen, and to the meter's
answer on the screen (a HAN round trip over the cable; the meter here is flashed but not
provisioned, so it answers at once, without a code check).
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


_STEP = """
import sys, time
sys.path[:0] = ["firmware"]
from boards.fake import PpmidBoard
from ppmid.app import Ppmid
b = PpmidBoard(); p = Ppmid(b)
p.status = {3: 1234560, 15: 1, 8: 0, 16: 0}
N = 400
t = time.ticks_ms()
for i in range(N):
    b.press(str(i % 10) if i % 2 == 0 else "*")
    p.step()
k = time.ticks_diff(time.ticks_ms(), t)
t = time.ticks_ms()
for i in range(N):
    p.step()
print("STEP", k * 1000 // N, time.ticks_diff(time.ticks_ms(), t) * 1000 // N)
"""


def firmware_step():
    """The firmware's own share, inside the wasm VM on the fake PPMID board: one main-loop
    pass that takes a key and redraws the screen (layout, framebuffer), and an idle pass."""
    import subprocess
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_STEP)
    try:
        r = subprocess.run(["node", str(REPO / "tools" / "mpy_run.mjs"), f.name], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    for line in r.stdout.splitlines():
        if line.startswith("STEP "):
            _, key_us, idle_us = line.split()
            return {"wasm_step_with_key_and_redraw_ms": int(key_us) / 1000,
                    "wasm_idle_step_ms": int(idle_us) / 1000}
    return {}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--presses", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from hil.two_board import TwoBoards
    out = {}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        rig = TwoBoards(d, flash_meter=True).start()
        out["start_and_flash_s"] = time.monotonic() - t0
        try:
            p, vb = rig.ppmid, rig.ppmid_board
            p.wait_for("Type code", 15)
            time.sleep(0.5)
            lat = []
            rnd = random.Random(1)
            for i in range(a.presses):
                key = str(i % 10) if i % 2 == 0 else "*"
                gen = vb.display()["gen"]
                # a person's key press comes at any point of the main loop's 5 ms idle sleep
                time.sleep(rnd.uniform(0, 0.011))
                want = key if key != "*" else "Type code, # OK"     # the entry line after it
                t = time.perf_counter()
                vb.press_keys(key)
                while True:                 # (a redraw for something else may come first)
                    d2 = vb.display_wait(gen, 2.0)
                    if d2["text"].split("\n")[3] == want:
                        break
                    if d2["gen"] <= gen:
                        raise SystemExit("no display update within 2 s of key %r" % key)
                    gen = d2["gen"]
                lat.append((time.perf_counter() - t) * 1000)
            # the control channel alone (no firmware): a round trip that reads the display
            chan = []
            for _ in range(50):
                t = time.perf_counter()
                vb.display()
                chan.append((time.perf_counter() - t) * 1000)
            # '#' with 20 digits typed: "Sending..." on screen, then the meter's answer
            send, answer = [], []
            for _ in range(10):
                vb.press_keys("D" + "1" * 19 + "2")
                p.wait_for("1111 1111 1111 1111 1112", 5)
                gen = vb.display()["gen"]
                t = time.perf_counter()
                vb.press_keys("#")
                vb.display_wait(gen, 2.0)
                send.append((time.perf_counter() - t) * 1000)
                p.wait_for("Sending", 5, gone=True)
                answer.append((time.perf_counter() - t) * 1000)
        finally:
            rig.stop()
    out.update(firmware_step())
    out.update({
        "presses": len(lat),
        "key_to_display_ms_median": statistics.median(lat),
        "key_to_display_ms_p90": pct(lat, 90),
        "key_to_display_ms_max": max(lat),
        "control_channel_round_trip_ms_median": statistics.median(chan),
        "send_key_to_sending_screen_ms_median": statistics.median(send),
        "send_key_to_meter_answer_on_screen_ms_median": statistics.median(answer),
    })
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print("virtual PPMID (%d presses): key -> display update median %.1f ms, p90 %.1f ms, max %.1f ms"
              % (out["presses"], out["key_to_display_ms_median"], out["key_to_display_ms_p90"],
                 out["key_to_display_ms_max"]))
        print("  (the rig's control channel alone: %.2f ms round trip; the firmware's share, wasm VM: "
              "%.2f ms for a pass that takes a key and redraws, %.3f ms idle, then a 5 ms sleep)"
              % (out["control_channel_round_trip_ms_median"],
                 out.get("wasm_step_with_key_and_redraw_ms", float("nan")),
                 out.get("wasm_idle_step_ms", float("nan"))))
        print("  # (send) -> 'Sending...' on screen: %.1f ms; -> the meter's answer on screen: %.1f ms"
              % (out["send_key_to_sending_screen_ms_median"],
                 out["send_key_to_meter_answer_on_screen_ms_median"]))
        print("  two boards started and flashed in %.1f s" % out["start_and_flash_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
