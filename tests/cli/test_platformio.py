"""Issue 9, items 9 and 15 (platformio.ini): the upload runs the repository's own `topup`
(.venv/bin/topup after `make setup`) with nothing to build, the port falls back to
$TOPUP_PORT, and `-t provision` without custom_device stops with one clear line.
PlatformIO itself is not run here (its registry is not reachable from the tests): the
extra script runs against a stand-in for its SCons environment."""
import configparser
import os
import shlex
import sys
import types

import pytest

from .conftest import ROOT


def _ini():
    cp = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None)
    cp.read(ROOT / "platformio.ini")
    return cp


def test_upload_command_is_the_venv_topup():
    cp = _ini()
    env = cp["env"]
    assert "framework" in env and env["framework"] == ""  # no C framework, on purpose
    assert env["upload_protocol"] == "custom"
    words = shlex.split(env["upload_command"])
    assert words[:2] == ["$PROJECT_DIR/.venv/bin/topup", "flash"]
    assert words[2:] == ["--port", "$UPLOAD_PORT"]
    exe = ROOT / ".venv" / "bin" / "topup"
    assert os.access(exe, os.X_OK)  # what `make setup` installs
    assert env["extra_scripts"] == "pre:tools/pio_topup.py"
    for name in ("esp32", "pico"):
        assert cp["env:%s" % name]["platform"] in ("espressif32", "raspberrypi")


class _Exit(Exception):
    pass


class FakeEnv:
    """The bits of PlatformIO's SCons environment the script uses."""

    def __init__(self, project_dir, options, upload_port="", build_dir=None):
        self.vars = {"PROJECT_DIR": str(project_dir), "UPLOAD_PORT": upload_port,
                     "BUILD_DIR": str(build_dir or project_dir / ".pio" / "build" / "esp32")}
        self.options = options
        self.targets = {}

    def subst(self, text):
        for k, v in self.vars.items():
            text = text.replace("$" + k, str(v))
        return text

    def Replace(self, **kw):
        self.vars.update(kw)

    def GetProjectOption(self, name, default=None):
        return self.options.get(name, default)

    def AddCustomTarget(self, name, dependencies, actions, title=None, description=None):
        self.targets[name] = actions

    def Exit(self, code):
        raise _Exit(code)


def _run_script(tmp_path, targets, options=None, upload_port="", environ=None,
                venv=True, monkeypatch=None):
    project = tmp_path / "project"
    (project / ".venv" / "bin").mkdir(parents=True)
    if venv:
        exe = project / ".venv" / "bin" / "topup"
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    env = FakeEnv(project, options or {}, upload_port)
    scons = types.ModuleType("SCons")
    script = types.ModuleType("SCons.Script")
    script.COMMAND_LINE_TARGETS = list(targets)
    monkeypatch.setitem(sys.modules, "SCons", scons)
    monkeypatch.setitem(sys.modules, "SCons.Script", script)
    for k in ("TOPUP_PORT", "TOPUP_DEVICE", "TOPUP_HAN_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (environ or {}).items():
        monkeypatch.setenv(k, v)
    code = compile((ROOT / "tools" / "pio_topup.py").read_text(), "pio_topup.py", "exec")
    g = {"Import": lambda name: None, "env": env, "__name__": "pio_topup"}
    exec(code, g)
    return env, script.COMMAND_LINE_TARGETS


def test_upload_builds_nothing_and_takes_the_port_from_topup_port(tmp_path, monkeypatch,
                                                                   capsys):
    env, targets = _run_script(tmp_path, ["upload"], environ={"TOPUP_PORT": "/dev/ttyUSB7"},
                               monkeypatch=monkeypatch)
    assert env.vars["UPLOAD_PORT"] == "/dev/ttyUSB7"
    assert "nobuild" in targets  # the platforms then upload what is there: a placeholder
    assert os.path.exists(os.path.join(env.vars["BUILD_DIR"], "meter.bin"))
    assert env.vars["SRC_FILTER"] == ["-<*>"] and env.vars["PROGNAME"] == "meter"
    # an explicit --upload-port wins
    env, _ = _run_script(tmp_path / "b", ["upload"], upload_port="/dev/ttyACM0",
                         environ={"TOPUP_PORT": "/dev/ttyUSB7"}, monkeypatch=monkeypatch)
    assert env.vars["UPLOAD_PORT"] == "/dev/ttyACM0"


def test_missing_pieces_stop_with_one_clear_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(_Exit):
        _run_script(tmp_path, ["upload"], upload_port="/dev/ttyUSB0", venv=False,
                    monkeypatch=monkeypatch)
    assert "run `make setup`" in capsys.readouterr().err
    with pytest.raises(_Exit):
        _run_script(tmp_path / "b", ["provision"], upload_port="/dev/ttyUSB0",
                    monkeypatch=monkeypatch)
    assert "set custom_device = 70-B3-D5-" in capsys.readouterr().err


def test_provision_and_han_status_targets(tmp_path, monkeypatch):
    env, _ = _run_script(tmp_path, ["provision"], upload_port="/dev/ttyUSB0",
                         options={"custom_device": "70-B3-D5-F0-00-00-00-A1",
                                  "custom_han_port": "/dev/ttyUSB1"}, monkeypatch=monkeypatch)
    exe = str(tmp_path / "project" / ".venv" / "bin" / "topup")
    assert shlex.split(env.targets["provision"][0]) == [
        exe, "provision", "--port", "/dev/ttyUSB0", "--device", "70-B3-D5-F0-00-00-00-A1"]
    assert shlex.split(env.targets["han-status"][0]) == [exe, "han", "status", "--port",
                                                         "/dev/ttyUSB1"]
    env, _ = _run_script(tmp_path / "b", ["provision"], upload_port="/dev/ttyUSB0",
                         environ={"TOPUP_DEVICE": "70-B3-D5-F0-00-00-00-B2"},
                         monkeypatch=monkeypatch)
    assert shlex.split(env.targets["provision"][0])[-1] == "70-B3-D5-F0-00-00-00-B2"
