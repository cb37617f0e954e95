"""Issue 9, item 11: a database on a read-only mount is said to be read-only (not "not a
topup database, or is damaged"), and the commands that only read work on it. Through the
real `topup`, inside a private mount namespace with a read-only bind mount."""
import os
import shutil
import subprocess

import pytest

from .conftest import DEVICE, TOPUP


def _in_read_only_mount(store, src, script):
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1)")
    cmd = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    mnt = src.parent / "ro"
    mnt.mkdir()
    wrapper = ('mount --bind "$1" "$2" && mount -o remount,ro,bind "$2" || exit 99; '
               'cd "$2"; export TOPUP_DB="$2/supplier.db"; T="$3"; ' + script)
    r = subprocess.run(cmd + ["sh", "-c", wrapper, "sh", str(src), str(mnt), TOPUP],
                       capture_output=True, text=True, env=store.env, timeout=120)
    if r.returncode == 99:
        pytest.skip("cannot bind-mount read-only here: %s" % r.stderr)
    return r


def test_reading_commands_work_and_writing_ones_say_read_only(store, tmp_path):
    store.ok("issue", DEVICE, "3", "-n", "2")
    store.ok("reconcile")
    out = tmp_path / "out"
    out.mkdir()
    r = _in_read_only_mount(store, tmp_path, (
        '"$T" key list >/dev/null && echo key-list-ok; '
        '"$T" device list | grep -q %s && echo device-list-ok; '
        '"$T" vouchers list | grep -c "£3.00" ; '
        '"$T" report | grep -q "outstanding liability £6.00" && echo report-ok; '
        '"$T" vouchers export -o "%s/v.txt" && echo export-ok; '
        '"$T" issue %s 1; echo "issue-rc=$?"; '
        '"$T" device add 70-B3-D5-F0-00-00-00-B2; echo "add-rc=$?"') % (
            DEVICE, out, DEVICE))
    assert r.stdout.split() == ["key-list-ok", "device-list-ok", "2", "report-ok", "export-ok",
                                "issue-rc=2", "add-rc=2"], (r.stdout, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("topup: error:")]
    assert len(errors) == 2
    for line in errors:
        assert "is read-only (it is on a read-only file system)" in line, line
        assert "not a topup database" not in line and "damaged" not in line
    assert "not recorded as a delivery" in r.stderr
    assert len((out / "v.txt").read_text().splitlines()) == 2
