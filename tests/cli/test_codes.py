"""Issue 11: `topup code` through the real executable, with `topup issue`'s guarantees
(issue 9): a signal or a write error mid-run leaves a report that is exactly true (what is
stored, what was written where, the one command that writes the rest), whole lines only,
no traceback; a kill -9 leaves what is stored findable."""
import hashlib
import json
import re
import signal
import subprocess

import pytest

from protocol import x25519

from .conftest import DEVICE, one_line_error
from .test_interruptions import _full_device, _ranges, _run_printed, _wait_for

METER_KA = x25519.public_key(bytes(range(100, 132)))
CODE_LINE = re.compile(r"^\d{4} \d{4} \d{4} \d{4} \d{4}$")


@pytest.fixture
def codes(store):
    """The CLI store's meter, registered as provisioned with a key-agreement key."""
    store.ok("device", "add", "70-B3-D5-F0-00-00-00-C9", "--public-key", "ab" * 32,
             "--ka-key", METER_KA.hex(), "--max-voucher", "100")
    store.meter = "70-B3-D5-F0-00-00-00-C9"
    return store


class Report:
    """What `topup code` said on stderr after it stopped early."""

    def __init__(self, stderr):
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
        m = re.search(r"stored in the database: (\d+) codes?, (sequences? [^£]*), £", stderr)
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
        self.command = (stderr.split("write them with:\n", 1)[1].splitlines()[0].strip()
                        if m else None)
        if not m:
            assert "every stored code was written" in stderr, stderr


def _codes_by_sequence(topup, batch):
    c = topup.conn()
    try:
        return dict(c.execute("SELECT sequence, code FROM vouchers WHERE batch = ? AND form = 2",
                              (batch,)))
    finally:
        c.close()


def _grouped(d):
    return " ".join(d[i:i + 4] for i in range(0, 20, 4))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_bulk_code_run_leaves_an_exact_report(codes, tmp_path, sig, code):
    out = tmp_path / "codes.jsonl"
    p = codes.popen("code", codes.meter, "1", "-n", "16000", "--batch-size", "1", "-f", "json",
                    "-o", out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(codes, 300, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    rep = Report(err)
    stored = _codes_by_sequence(codes, rep.batch)
    assert rep.stored == set(stored) and 300 <= len(stored) < 16000
    text = out.read_text() if out.exists() else ""
    assert text == "" or text.endswith("\n")
    objs = [json.loads(ln) for ln in text.splitlines()]
    # each line is whole, and is the code stored under its sequence
    assert all(o["code"] == _grouped(stored[o["sequence"]]) for o in objs)
    in_file = {o["sequence"] for o in objs}
    assert rep.written == ({str(out): in_file} if in_file else {})
    assert rep.unwritten == set(stored) - in_file
    if rep.command:
        rest = tmp_path / "rest.jsonl"
        _run_printed(codes, rep.command, rest)
        got = [json.loads(ln) for ln in rest.read_text().splitlines()]
        assert {o["sequence"] for o in got} == rep.unwritten
        assert all(o["form"] == "code" for o in got)


def test_write_error_reports_and_the_printed_command_writes_the_rest(codes, tmp_path):
    full = _full_device(tmp_path)
    r = codes("code", codes.meter, "2", "-n", "5", "-f", "csv", "-o", full)
    assert r.returncode == 1, r.stderr
    rep = Report(r.stderr)
    assert "No space left on device" in r.stderr
    assert rep.stored == {1, 2, 3, 4, 5} == rep.unwritten and rep.written == {}
    assert rep.command.startswith("topup vouchers export --batch %d --undelivered -f csv"
                                  % rep.batch)
    rest = tmp_path / "rest.csv"
    _run_printed(codes, rep.command, rest)
    lines = rest.read_text().splitlines()
    assert lines[0].startswith("form,device,sequence") and len(lines) == 6
    stored = _codes_by_sequence(codes, rep.batch)
    assert [ln.split(",")[-1] for ln in lines[1:]] == [_grouped(stored[s]) for s in range(1, 6)]


def test_kill_9_leaves_the_stored_codes_findable(codes, tmp_path):
    out = tmp_path / "codes.txt"
    p = codes.popen("code", codes.meter, "1", "-n", "16000", "--batch-size", "1", "-o", out,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(codes, 200, p)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert not out.exists()                        # never a partial file under its name
    n = codes.count("SELECT count(*) FROM vouchers WHERE form = 2")
    listed = codes.ok("vouchers", "list", "--undelivered", "--form", "code")
    assert len(listed.stdout.splitlines()) == n + 2
    # the database is whole: an integrity check, and issuing goes on after it
    assert codes.count("SELECT count(*) FROM pragma_integrity_check WHERE integrity_check "
                       "!= 'ok'") == 0
    r = codes.ok("code", codes.meter, "1")
    assert CODE_LINE.match(r.stdout.strip())
    assert "sequence %d" % (n + 1) in r.stderr


def test_one_code_on_standard_output_and_clear_refusals(codes, tmp_path):
    r = codes.ok("code", codes.meter, "£5")
    assert CODE_LINE.match(r.stdout.strip()), r.stdout
    digits = r.stdout.replace(" ", "").strip()
    c = codes.conn()
    try:
        (ref,) = c.execute("SELECT ref FROM vouchers WHERE code = ?", (digits,)).fetchone()
    finally:
        c.close()
    assert ref == hashlib.sha256(b"OTU1 code " + digits.encode()).digest()[:16]
    assert "no expiry" in one_line_error(codes("code", codes.meter, "5", "--expires-in", "2"))
    assert "per-voucher maximum" in one_line_error(codes("code", codes.meter, "100.01"))
    assert "no meter key registered yet" in one_line_error(codes("code", DEVICE, "5"))
    assert "not one of" in one_line_error(codes("code", codes.meter, "5", "-f", "qr"))
    r = codes.ok("verify", r.stdout.strip())
    assert "ACCEPTED by device %s" % codes.meter in r.stdout
