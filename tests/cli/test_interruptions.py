"""Issue 9, items 1 and 2: every interruption of `topup issue` — Ctrl-C, SIGTERM, a kill -9,
a write error on a file, a device, standard output or a full disk — leaves a report that is
exactly true (what is stored, what was written where, the one command that writes the
rest), output that is whole (never a partial line), and no traceback. Through the real
`topup` executable."""
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time

import pytest

from protocol import voucher as pv

from .conftest import DEVICE, DEVICE_BYTES, TOPUP, one_line_error


def _ranges(text):
    """The sequences of "sequences 1-3, 7, 9-10" (a set)."""
    out = set()
    for a, b in re.findall(r"(\d+)(?:-(\d+))?", text):
        out.update(range(int(a), int(b or a) + 1))
    return out


class Report:
    """What `topup issue` said on stderr after it stopped early."""

    def __init__(self, stderr):
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
        self.text = stderr
        m = re.search(r"stored in the database: (\d+) vouchers?, (sequences? [^£]*), £", stderr)
        assert m, stderr
        self.stored = _ranges(m.group(2))
        assert len(self.stored) == int(m.group(1))
        self.batch = int(re.search(r"\(batch (\d+)\)", stderr).group(1))
        self.written = {}
        for where, n, seqs in re.findall(r"written whole to (.+?): (\d+), (sequences? .*)",
                                          stderr):
            self.written[where] = _ranges(seqs)
            assert len(self.written[where]) == int(n)
        m = re.search(r"stored but not written: (\d+), (sequences? [\d, -]+)", stderr)
        self.unwritten = _ranges(m.group(2)) if m else set()
        if m:
            assert len(self.unwritten) == int(m.group(1))
            self.command = stderr.split("write them with:\n", 1)[1].splitlines()[0].strip()
        else:
            assert "every stored voucher was written" in stderr, stderr
            self.command = None


def _batch_sequences(topup, batch):
    c = topup.conn()
    try:
        return {s for (s,) in c.execute("SELECT sequence FROM vouchers WHERE batch = ?",
                                        (batch,))}
    finally:
        c.close()


def _json_sequences(path):
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "a partial last line"
    return [json.loads(line)["sequence"] for line in text.splitlines()]


def _text_sequences(text):
    assert text == "" or text.endswith("\n"), "a partial last line"
    return [pv.parse(pv.from_text(t)).sequence for t in text.splitlines()]


def _run_printed(topup, command, out=None):
    """Run the command `topup` printed (as a user pastes it), optionally writing elsewhere."""
    words = shlex.split(command)
    assert words[:5] == ["topup", "vouchers", "export", "--batch", words[4]], command
    if out is not None:
        if "-o" in words:
            words[words.index("-o") + 1] = str(out)
        else:
            words += ["-o", str(out)]
    return topup.ok(*words[1:])


def _wait_for(topup, n, p, deadline=60):
    end = time.monotonic() + deadline
    while topup.count("SELECT count(*) FROM vouchers") < n:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < end
        time.sleep(0.02)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_bulk_issue_leaves_an_exact_report_and_whole_output(store, tmp_path, sig,
                                                                        code):
    out = tmp_path / "r.jsonl"
    p = store.popen("issue", DEVICE, "1", "-n", "1000000", "--batch-size", "500", "-f", "json",
                    "-o", out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(store, 3000, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    rep = Report(err)
    stored = _batch_sequences(store, rep.batch)
    assert rep.stored == stored and 3000 <= len(stored) < 1000000
    in_file = _json_sequences(out)
    assert rep.written == ({str(out): set(in_file)} if in_file else {})
    assert len(in_file) == len(set(in_file))
    assert rep.unwritten == stored - set(in_file)
    # what the database says matches, and the printed command writes exactly the rest
    listed = store.ok("vouchers", "list", "--batch", rep.batch, "--undelivered")
    assert {int(ln.split()[1]) for ln in listed.stdout.splitlines()[1:-1]} == rep.unwritten
    if rep.command:
        rest = tmp_path / "rest.jsonl"
        _run_printed(store, rep.command, rest)
        assert set(_json_sequences(rest)) == rep.unwritten


def test_sigterm_with_standard_output_redirected_to_a_file(store, tmp_path):
    path = tmp_path / "out.txt"
    with open(path, "w") as f:
        p = store.popen("issue", DEVICE, "1", "-n", "1000000", "--batch-size", "700",
                        stdout=f, stderr=subprocess.PIPE, text=True)
        _wait_for(store, 2100, p)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    rep = Report(err)
    seqs = _text_sequences(path.read_text())
    assert rep.stored == _batch_sequences(store, rep.batch)
    assert rep.written == {"standard output": set(seqs)}
    assert rep.unwritten == rep.stored - set(seqs)


def _full_device(tmp_path):
    """A private /dev/full (a character device whose writes fail with ENOSPC)."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    path = tmp_path / "full"
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    return path


def test_write_error_on_a_device_reports_and_keeps_the_device(store, tmp_path):
    full = _full_device(tmp_path)
    r = store("issue", DEVICE, "2", "-n", "5", "-f", "json", "-o", full)
    assert r.returncode == 1, r.stderr
    rep = Report(r.stderr)
    assert "No space left on device" in r.stderr
    assert rep.stored == {1, 2, 3, 4, 5} == rep.unwritten and rep.written == {}
    assert stat.S_ISCHR(os.stat(full).st_mode)  # written in place, never replaced
    assert rep.command.startswith("topup vouchers export --batch %d --undelivered -f json"
                                  % rep.batch)
    rest = tmp_path / "rest.jsonl"
    _run_printed(store, rep.command, rest)
    assert _json_sequences(rest) == [1, 2, 3, 4, 5]
    assert store.ok("vouchers", "list", "--undelivered").stderr.startswith("no vouchers match")


def test_write_error_on_standard_output(store, tmp_path):
    full = _full_device(tmp_path)
    with open(full, "w") as f:
        r = store("issue", DEVICE, "2", "-n", "3", stdout=f)
    assert r.returncode == 1, r.stderr
    rep = Report(r.stderr)
    assert rep.stored == rep.unwritten == {1, 2, 3}
    assert "cannot write standard output: No space left on device" in r.stderr
    assert rep.command == "topup vouchers export --batch %d --undelivered -f text" % rep.batch


def _unshare():
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1)")
    cmd = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    if subprocess.run(cmd + ["true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace here")
    return cmd


def test_a_full_disk_leaves_a_file_of_whole_vouchers_and_an_exact_report(store, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = ('mount -t tmpfs -o size=64k tmpfs "$1" || exit 99; '
              '"$2" issue %s 1 -n 3000 --batch-size 50 -f json -o "$1/b.jsonl"; echo "rc=$?"; '
              'cat "$1/b.jsonl" > "$3"; ls -A "$1"' % DEVICE)
    r = subprocess.run(_unshare() + ["sh", "-c", script, "sh", str(mnt), TOPUP,
                                     str(tmp_path / "copy.jsonl")],
                       capture_output=True, text=True, env=store.env, cwd=str(tmp_path),
                       timeout=120)
    assert "rc=1" in r.stdout, (r.stdout, r.stderr)
    assert r.stdout.split("rc=1", 1)[1].split() == ["b.jsonl"]  # no temporary file left
    rep = Report(r.stderr)
    assert "No space left on device" in r.stderr
    seqs = _json_sequences(tmp_path / "copy.jsonl")      # whole lines only
    assert seqs and len(seqs) % 50 == 0                  # whole transactions, as written
    assert rep.written == {str(mnt / "b.jsonl"): set(seqs)}
    assert rep.stored == _batch_sequences(store, rep.batch)
    assert rep.unwritten == rep.stored - set(seqs) and rep.unwritten
    assert "-o %s" % (mnt / "b-rest.jsonl") in rep.command


def test_proc_version_is_refused_before_anything_is_issued(store):
    msg = one_line_error(store("issue", DEVICE, "1", "-o", "/proc/version"))
    assert msg == "/proc/version already exists; use --force to replace it"
    msg = one_line_error(store("issue", DEVICE, "1", "-o", "/proc/version", "--force"))
    assert msg.startswith("cannot write /proc/version")
    assert store.count("SELECT count(*) FROM vouchers") == 0


def test_report_and_receipts_export_to_a_full_device(store, tmp_path):
    from host.receipts_io import write_receipts
    from tests.host.test_reconcile_data import Meter
    full = _full_device(tmp_path)
    store.ok("issue", DEVICE, "1")
    receipt = tmp_path / "r.cbor"
    write_receipts(receipt, [Meter(DEVICE_BYTES, 0xA1).make(2, 1_800_000_000, 0, 0, amount=5)])
    store.ok("receipts", "import", receipt)
    store("reconcile")
    msg = one_line_error(store("report", "--csv", full), code=1)
    assert msg == "cannot write %s: No space left on device" % full
    msg = one_line_error(store("receipts", "export", full), code=1)
    assert msg == "cannot write %s: No space left on device" % full
    assert stat.S_ISCHR(os.stat(full).st_mode)  # never replaced by a regular file
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp") or "anomalies" in f]


def test_receipts_export_to_a_fifo_writes_in_place(store, tmp_path):
    import threading
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    from host.receipts_io import write_receipts
    from tests.host.test_reconcile_data import Meter
    receipt = tmp_path / "r.cbor"
    write_receipts(receipt, [Meter(DEVICE_BYTES, 0xA1).make(2, 1_800_000_000, 0, 0, amount=5)])
    store.ok("receipts", "import", receipt)

    def read():
        with open(fifo, "rb") as f:
            got.append(f.read())
    t = threading.Thread(target=read, daemon=True)
    t.start()
    store.ok("receipts", "export", fifo, "-f", "jsonl")
    t.join(10)
    if t.is_alive():  # nobody wrote to the FIFO (it was replaced): unblock the reader
        with open(fifo, "wb") if stat.S_ISFIFO(os.stat(fifo).st_mode) else open(os.devnull, "wb"):
            pass
    assert len(got) == 1 and json.loads(got[0])["device"] == DEVICE
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
