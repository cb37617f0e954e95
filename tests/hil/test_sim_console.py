# The console of `topup sim` (issue 9 item 13): an engineer changes the WAN, presses the
# button, adds pulses, moves time and cuts power on a running virtual board by typing.
import os
import subprocess
import sys
import time

from hil import sim_console


class FakeBoard:
    """Records what the console asked of the board (the VirtualBoard methods it uses)."""

    def __init__(self):
        self.calls = []
        self.powered = True

    def status(self):
        return {"powered": self.powered, "relay": True, "wan": False, "clock": 1790000000.5,
                "erases": 1, "programs": 7}

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name,) + args)
            if name == "power_off":
                self.powered = False
            if name == "power_on":
                self.powered = True
        return call


def test_each_command_drives_the_board_and_answers_one_line():
    b = FakeBoard()
    out = []
    lines = ["wan up", "button", "button 3", "pulses 250", "advance 3600", "clock 1800000000",
             "power off", "power on", "reset", "status", "", "wan sideways", "pulses -4", "pulses x",
             "frobnicate", "quit", "wan down"]
    assert sim_console.run(b, lines, out.append) is True
    assert b.calls == [("set_wan", True), ("press_button", 1), ("press_button", 3), ("add_pulses", 250),
                       ("advance_clock", 3600), ("set_clock", 1800000000), ("power_off",), ("power_on",),
                       ("hard_reset",)]
    assert out[:9] == ["WAN up", "button pressed 1 time(s)", "button pressed 3 time(s)", "250 pulse(s) = 250 Wh",
                       "clock advanced 3600 s", "clock 1790000000", "power off", "power on", "reset"]
    assert out[9].startswith("power on, relay closed (supply on), WAN down, clock 1790000000")
    assert [o.split(":")[0] for o in out[10:]] == ["error"] * 4          # nothing run for those
    assert ("set_wan", False) not in b.calls                             # nothing after quit


def test_end_of_input_is_not_quit():
    assert sim_console.run(FakeBoard(), iter(["status"]), lambda s: None) is False


def test_topup_sim_takes_commands_on_stdin(tmp_path):
    # the real `topup sim`, its console on a pipe: the WAN comes back and the board says so
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "topup_cli", "sim", "--workdir", str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        seen = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("HAN port") for line in seen) and time.monotonic() < deadline:
            seen.append(proc.stdout.readline())
        proc.stdin.write("wan up\nstatus\nquit\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "WAN up" in rest and ", WAN up, clock " in rest, "".join(seen) + rest
    assert proc.returncode == 0
