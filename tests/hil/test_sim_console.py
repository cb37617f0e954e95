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


class FakePpmid:
    """The PPMID the console drives (hil.two_board.Ppmid): keys pressed, a display."""

    def __init__(self):
        self.pressed = []
        self.text = "Credit \u00a35.00\nSupply on\n\nType code, # OK\n\n\n\n"
        self.board = self

    def display(self):
        return {"gen": len(self.pressed), "text": self.text}

    def display_wait(self, gen, timeout):
        return self.display()

    def press(self, keys):
        self.pressed.append(keys)


def test_key_and_display_drive_the_ppmid():
    p = FakePpmid()
    out = []
    lines = ["key 1234 5678-9", "key #", "key b", "display", "key 12x", "key", "help"]
    assert sim_console.run(FakeBoard(), lines, out.append, ppmid=p) is False
    assert p.pressed == ["123456789", "#", "B"]
    assert out[3].splitlines()[1] == "|Credit \u00a35.00    |" and len(out[3].splitlines()) == 10
    assert out[4].startswith("error: keys are") and out[5].startswith("error: keys are")
    assert "key KEYS" in out[6]
    # without a PPMID those are not commands
    out = []
    sim_console.run(FakeBoard(), ["key 1", "display"], out.append)
    assert all(o.startswith("error: unknown command") for o in out)


def test_topup_sim_ppmid_runs_both_boards_and_types_on_the_ppmid(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "topup_cli", "sim", "--ppmid", "--flash-firmware",
                             "--workdir", str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        seen = []
        deadline = time.monotonic() + 90
        while not any(line.startswith("workdir") for line in seen) and time.monotonic() < deadline:
            seen.append(proc.stdout.readline())
        proc.stdin.write("key 1234 5\nkey *\ndisplay\nquit\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    head = "".join(seen)
    for words in ("meter REPL port", "meter HAN port", "PPMID REPL port", "joined to the meter's HAN"):
        assert words in head, head
    assert "|1234            |" in rest and "|1234 5          |" in rest, head + rest
    assert proc.returncode == 0
