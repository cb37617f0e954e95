"""Issue 9, item 9: the README's commands work as printed. Its first screen (after `make
setup`) puts `topup` on PATH; the supplier's block runs line by line, in a fresh folder, as
a user pastes it; every other `topup` line (those needing a board, a port or a field file)
is parsed by the real command line, options, arguments and their checks included."""
import os
import re
import shlex
import subprocess

import pytest

from .conftest import ROOT


def _blocks():
    """[(heading, [lines])] of the README's sh code blocks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out, heading = [], None
    for m in re.finditer(r"^(#{2,3} [^\n]*)$|^```sh\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        else:
            body = m.group(2).replace("\\\n", " ")  # continuation lines joined
            out.append((heading, [ln for ln in body.splitlines() if ln.strip()]))
    return out


def _env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TOPUP_") and k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # no venv on it: the README must put it there
    env["TOPUP_INSECURE_FAST_KDF"] = "1"          # quick unlocks (tests only)
    return env


def _block(heading):
    found = [lines for h, lines in _blocks() if h == heading]
    assert found, heading
    return found[0]


def test_the_first_screen_puts_topup_on_path():
    lines = _block("Getting started")
    assert lines[0].startswith("make setup") and lines[1].startswith(". .venv/bin/activate")
    script = "\n".join(["set -e"] + [ln for ln in lines if not ln.startswith("make ")]
                       + ["command -v topup"])
    r = subprocess.run(["bash", "-c", script], cwd=str(ROOT), env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage: topup" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == str(ROOT / ".venv" / "bin" / "topup")


def test_the_supplier_block_runs_as_printed(tmp_path):
    lines = _block("For suppliers: issuing vouchers")
    script = "\n".join(["set -e", "cd %s" % shlex.quote(str(ROOT)), ". .venv/bin/activate",
                        "cd %s" % shlex.quote(str(tmp_path))]
                       + ["%s || { echo 'FAILED: %s' >&2; exit 1; }" % (ln, ln.replace("'", ""))
                          for ln in lines])
    r = subprocess.run(["bash", "-c", script], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    assert (tmp_path / "supplier.db").exists() and (tmp_path / "batch2.txt").exists()
    assert len((tmp_path / "batch.jsonl").read_text(encoding="utf-8").splitlines()) == 5000
    assert "5000 vouchers: 5000 accepted, 0 rejected" in r.stdout
    assert "cancelled voucher 1 of 70-B3-D5-F0-00-00-00-A1" in r.stdout


def _topup_lines():
    for heading, lines in _blocks():
        env = {}
        for ln in lines:
            words = shlex.split(ln, comments=True)
            if words[:1] == ["export"]:
                k, v = words[1].split("=", 1)
                env[k] = v
            elif words[:1] == ["topup"]:
                yield heading, words[1:], dict(env)


@pytest.mark.parametrize("heading, args, env", list(_topup_lines()),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_every_topup_line_parses(heading, args, env, monkeypatch):
    """Every `topup …` line of the README names real commands, options and valid values."""
    import click
    from topup_cli import cli
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    def rest(ctx):
        return list(getattr(ctx, "_protected_args", [])) + list(ctx.args)
    try:
        ctx = cli.make_context("topup", list(args))
        cmd = cli
        while isinstance(cmd, click.Group) and rest(ctx):
            words = rest(ctx)
            sub = cmd.get_command(ctx, words[0])
            assert sub is not None, (heading, args)
            ctx = sub.make_context(words[0], words[1:], parent=ctx)
            cmd = sub
    except click.exceptions.Exit as e:  # --help, --version
        assert e.exit_code == 0
        return
    assert not isinstance(cmd, click.Group) or not rest(ctx), args
