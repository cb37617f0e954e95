"""The engineer's commands through the real `topup` executable (a subprocess, as an engineer
runs it): flash, provision, han status|submit|receipts against the board under test, and
`topup sim`; clear one-line errors for an absent port, a board that does not answer, and a
board that is already provisioned."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol import receipt as receipt_format, voucher as pv

pytestmark = pytest.mark.hil

TOPUP = str(Path(sys.executable).parent / "topup")


def topup(issuer, *args, timeout=120):
    env = dict(os.environ, **issuer.env)
    env.pop("TOPUP_PORT", None)
    env.pop("TOPUP_HAN_PORT", None)
    return subprocess.run([TOPUP, *[str(a) for a in args]], capture_output=True, text=True,
                          env=env, timeout=timeout)


def ok(r):
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def one_line_error(r, code=None):
    assert r.returncode != 0, r.stdout
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("topup: error: "), r.stderr
    return lines[0]


_PROVISIONED = re.compile(r"key epoch (\d+): receipts from #(\d+); sequences up to (\d+) refused, "
                          r"next issued (\d+)\)")


def test_flash_provision_and_han_commands(hil_transport, issuer):
    t = hil_transport
    out = ok(topup(issuer, "flash", "--port", t.repl_port))
    m = re.search(r"flashed (\d+) files \((\d+) bytes, \.mpy ([\d.]+)\) to MicroPython ([\d.]+) on (\S+) "
                  r"in [\d.]+ s; all verified", out)
    assert m, out
    out = ok(topup(issuer, "provision", "--port", t.repl_port, "--device", issuer.eui,
                   "--initial-credit", "5.00", "--factory-reset"))
    assert "provisioned %s on %s" % (issuer.eui, t.repl_port) in out and "registered" in out
    key = issuer.record.public_key
    assert key is not None and key.hex() in out
    # A factory reset never restarts the receipt count or re-opens a sequence: the meter
    # carries both from whatever it did before this test (nothing, on a fresh board).
    epoch, first, floor, nxt = map(int, _PROVISIONED.search(out).groups())
    assert epoch == 1 and nxt == floor + 1 == issuer.record.next_sequence
    t.wait_meter(device=issuer.device)

    out = ok(topup(issuer, "han", "status", "--port", t.han_port))
    assert re.search(r"device\s+%s" % issuer.eui, out) and re.search(r"balance\s+£5\.00", out)
    assert re.search(r"highest sequence\s+0", out) and re.search(r"receipts\s+%d$" % first, out, re.M)
    assert re.search(r"sequence floor\s+%d" % floor, out)
    assert re.search(r"flash faults\s+none", out) and re.search(r"ledger\s+ok", out)
    assert re.search(r"meter time\s+\d{4}-\d\d-\d\dT", out)

    text = ok(topup(issuer, "issue", issuer.eui, "2.50")).strip()
    assert text.startswith("OTU1:")
    out = ok(topup(issuer, "han", "submit", "--port", t.han_port, text))
    assert ("APPLIED: receipt %d, sequence %d, £2.50 added, balance £5.00 → £7.50" % (first, nxt)
            in out)
    out = ok(topup(issuer, "han", "submit", "--port", t.han_port, text))
    assert out.startswith("ALREADY APPLIED (original receipt): receipt %d" % first)

    bad = bytearray(pv.from_text(text))
    bad[-1] ^= 1
    r = topup(issuer, "han", "submit", "--port", t.han_port, pv.to_text(bytes(bad)))
    assert "meter refused: BAD_SIGNATURE (4)" in one_line_error(r, code=1)

    export = Path(issuer.path).with_name("receipts.cbor")
    out = ok(topup(issuer, "han", "receipts", "--port", t.han_port, "--out", export))
    assert re.search(r"^\s*%d\s+top-up\s+seq %d, £2\.50" % (first, nxt), out, re.M)
    assert "wrote 1 receipts" in out
    out = ok(topup(issuer, "receipts", "import", export))
    from host.receipts_io import split_cbor
    ((raw, _, _),) = list(split_cbor(export.read_bytes(), str(export)))
    r0 = issuer.verify_receipt(raw)
    assert r0.kind == receipt_format.TOPUP and r0.sequence == nxt and r0.amount == 250

    # a second provisioning without --factory-reset is refused, and changes nothing
    r = topup(issuer, "provision", "--port", t.repl_port, "--device", issuer.eui)
    assert "already provisioned" in one_line_error(r) and "--factory-reset" in r.stderr
    assert issuer.record.public_key == key
    # the refusal restarts the meter (entering the REPL had stopped it): it answers at once
    assert re.search(r"balance\s+£7\.50", ok(topup(issuer, "han", "status", "--port", t.han_port)))

    # --- issue 8: a factory reset re-opens nothing, and the books follow it ---------------
    second = ok(topup(issuer, "issue", issuer.eui, "1.25")).strip()   # applied, never read out
    ok(topup(issuer, "han", "submit", "--port", t.han_port, second))
    unused = ok(topup(issuer, "issue", issuer.eui, "3.00")).strip()   # never applied
    out = ok(topup(issuer, "provision", "--port", t.repl_port, "--device", issuer.eui,
                   "--factory-reset"))
    # what the supplier did not hold was read out and stored before the wipe
    assert "read out 2 receipt(s) before the factory reset: 1 new, stored" in out, out
    assert "factory reset: the meter carried sequence floor %d and receipt index %d" % (
        nxt + 1, first + 2) in out
    epoch2, first2, floor2, nxt2 = map(int, _PROVISIONED.search(out).groups())
    assert (epoch2, first2, floor2, nxt2) == (2, first + 2, nxt + 2, nxt + 3)
    assert issuer.record.public_key != key and issuer.record.key_count == 2
    t.wait_meter(device=issuer.device)
    for old in (text, second, unused):           # applied or not, every one is refused now
        r = topup(issuer, "han", "submit", "--port", t.han_port, old)
        assert "meter refused: STALE (8)" in one_line_error(r, code=1)
    out = ok(topup(issuer, "han", "status", "--port", t.han_port))
    assert re.search(r"sequence floor\s+%d " % floor2, out) and re.search(r"receipts\s+%d$" % first2, out, re.M)
    fresh = ok(topup(issuer, "issue", issuer.eui, "4.00")).strip()
    out = ok(topup(issuer, "han", "submit", "--port", t.han_port, fresh))
    assert "APPLIED: receipt %d, sequence %d, £4.00 added" % (first2, nxt2) in out
    r = topup(issuer, "han", "receipts", "--port", t.han_port, "--from", first2, "--out", export)
    assert "already exists; use --force to replace it" in one_line_error(r)   # never silently
    ok(topup(issuer, "han", "receipts", "--port", t.han_port, "--from", first2, "--out", export, "--force"))
    ok(topup(issuer, "receipts", "import", export))
    r = topup(issuer, "reconcile")
    assert r.returncode == 0 and "no anomalies" in r.stdout, r.stdout + r.stderr
    st = dict(issuer.conn.execute("SELECT sequence, status FROM voucher_status"))
    assert st == {nxt: "redeemed", nxt + 1: "redeemed", nxt + 2: "stale", nxt2: "redeemed"}
    out = ok(topup(issuer, "device", "show", issuer.eui))
    assert re.search(r"meter keys\s+2 ", out) and "receipts from %d, sequence floor %d" % (first2, floor2) in out


def test_keypad_codes_through_provision_code_and_han(hil_transport, issuer):
    """Issue 11, the supplier's and engineer's path: provisioning installs this database's
    code key and registers the meter's key-agreement key; `topup code` makes a code this
    meter takes over the HAN (`han submit CODE`, spaces or dashes), once; the supply comes
    back armed and `han confirm` switches it on; refusals say what they mean; the receipt
    reconciles against the code; `han status --json` has every field."""
    import json
    t = hil_transport
    ok(topup(issuer, "flash", "--port", t.repl_port))
    out = ok(topup(issuer, "provision", "--port", t.repl_port, "--device", issuer.eui,
                   "--factory-reset", "--ec-threshold", "10.00", "--ec-amount", "2.00"))
    assert "keypad codes: yes" in out, out
    first = int(_PROVISIONED.search(out).group(2))     # the board may have served others
    epoch = issuer.conn.execute("SELECT ka_public, code_kid FROM device_keys ORDER BY epoch "
                                "DESC").fetchone()
    assert epoch[0] is not None and bytes(epoch[0]).hex() in out
    t.wait_meter(device=issuer.device)
    st = json.loads(ok(topup(issuer, "han", "status", "--port", t.han_port, "--json")))
    assert st["device"] == issuer.eui and st["balance_mp"] == 0 and st["takes_codes"] is True
    assert (st["supply_state"], st["supply"]) == (0, "interrupted")
    assert st["code_tries_left"] == 5 and st["code_locked_s"] == 0

    code = ok(topup(issuer, "code", issuer.eui, "3.25")).strip()
    assert re.fullmatch(r"\d{4}( \d{4}){4}", code)
    out = ok(topup(issuer, "han", "submit", "--port", t.han_port, code.replace(" ", "-")))
    assert re.search(r"^APPLIED \(keypad code\): receipt (\d+), sequence (\d+), £3\.25 added, "
                     r"balance £0\.00 → £3\.25; supply ARMED", out), out
    out = ok(topup(issuer, "han", "submit", "--port", t.han_port, *code.split()))  # unquoted
    assert out.startswith("ALREADY APPLIED (original receipt) (keypad code)")
    out = ok(topup(issuer, "han", "status", "--port", t.han_port))
    assert re.search(r"supply\s+ARMED", out) and re.search(r"balance\s+£3\.25", out)
    assert re.search(r"keypad codes\s+accepted \(5 wrong codes allowed", out)
    assert "the armed supply was confirmed" in ok(topup(issuer, "han", "confirm", "--port",
                                                        t.han_port))
    assert re.search(r"supply\s+on$", ok(topup(issuer, "han", "status", "--port", t.han_port)),
                     re.M)

    digits = code.replace(" ", "")
    typo = digits[:3] + str((int(digits[3]) + 1) % 10) + digits[4:]
    line = one_line_error(topup(issuer, "han", "submit", "--port", t.han_port, typo), code=1)
    assert "CODE_TYPO (20)" in line and "does not count" in line
    line = one_line_error(topup(issuer, "han", "submit", "--port", t.han_port, digits[:-1]),
                          code=1)
    assert "CODE_INCOMPLETE (21)" in line
    from protocol import keycode
    body = "%019d" % (int(digits[:19]) ^ 2)
    wrong = body + next(str(c) for c in range(10) if keycode.damm(body + str(c)) == 0)
    line = one_line_error(topup(issuer, "han", "submit", "--port", t.han_port, wrong), code=1)
    assert "CODE_WRONG (19)" in line and "4 wrong codes left" in line
    out = ok(topup(issuer, "han", "emergency", "--port", t.han_port))
    assert re.search(r"^EMERGENCY CREDIT: receipt \d+, £2\.00, balance £3\.25", out), out

    export = Path(issuer.path).with_name("codes.cbor")
    ok(topup(issuer, "han", "receipts", "--port", t.han_port, "--from", first, "--out", export))
    ok(topup(issuer, "receipts", "import", export))
    topup(issuer, "reconcile")
    # the only anomalies: receipts an earlier test left on the shared board, read out before
    # the factory reset, from before this database's first key for the meter
    odd = issuer.conn.execute("SELECT kind, receipt_index FROM anomalies").fetchall()
    assert all(k == "no_device_key" and i < first for k, i in odd), odd
    (status, form) = issuer.conn.execute(
        "SELECT s.status, v.form FROM voucher_status s JOIN vouchers v USING (device, sequence)"
        ).fetchone()
    assert (status, form) == ("redeemed", 2)
    out = ok(topup(issuer, "vouchers", "list", "--form", "code"))
    assert "1 code, £3.25: redeemed 1" in out


def test_status_and_receipt_lines_in_plain_words():
    """`topup han status` and `topup han receipts` wording, without a board: the status
    fields of SPEC.md §5 and a fault receipt (kind 4); money exact in pounds and pence."""
    from hil.commands import receipt_line, status_lines
    lines = status_lines({1: bytes.fromhex("70b3d5f0000000a1"), 2: "0.2.0", 3: 1234567, 4: True,
                          5: False, 6: 12, 7: 40, 8: 0, 9: {1: 2, 4: 1}, 10: 1790000000,
                          11: True, 12: 9, 13: True})
    text = "\n".join(lines)
    assert "balance           £12.34 + 0.567p" in text
    assert "sequence floor    9 (every voucher up to it is refused as stale)" in text
    assert ("meter time        2026-09-21T14:13:20Z (1790000000), resumed from its floor at "
            "start-up" in text)
    assert ("flash faults      found at start-up: 2 × record repaired (one bit was wrong) [1], "
            "1 × committed receipt lost [4]") in text
    assert "ledger            DAMAGED: every credit change is refused" in text
    healthy = "\n".join(status_lines({1: b"", 2: "0.2.0", 3: 500000, 9: {}, 10: 5, 11: False,
                                      12: 0, 13: False}))
    assert "(not provisioned)" in healthy and "flash faults      none" in healthy
    assert "ledger            ok" in healthy and "balance           £5.00" in healthy
    assert "resumed" not in healthy
    old = "\n".join(status_lines({1: b"", 2: "0.1.0", 3: 0}))    # an older meter: no new fields
    assert "sequence floor" not in old and "flash faults" not in old
    from tests.host.test_reconcile_data import Meter
    m = Meter(bytes.fromhex("70b3d5f0000000a1"), 0xA1)
    m.balance = -1500
    r = receipt_format.parse(m.faults({5: 1, 2: 3}, 1790000000))
    assert receipt_line(r) == ("   0  faults      flash: 3 × record lost (unrepairable, not a "
                               "torn write) [2], 1 × newest state record lost (rolled forward "
                               "from receipts, or back one checkpoint) [5] balance -£0.01 - 0.5p → "
                               "-£0.01 - 0.5p")


def test_status_supply_and_code_lockout_in_words_and_json():
    """Status fields 15-18 (issue 11): the supply armed/on/interrupted, the code lockout,
    and `--json` with every field (money in milli-pence, integers)."""
    import json
    from hil.commands import status_json, status_lines
    raw = {1: bytes.fromhex("70b3d5f0000000a1"), 2: "0.3.0", 3: 1234567, 4: False, 5: False,
           6: 12, 7: 40, 8: 250000, 9: {1: 2}, 10: 1790000000, 11: False, 12: 9, 13: False,
           14: 3, 15: 1, 16: 3541, 17: 0, 18: True}
    text = "\n".join(status_lines(raw))
    assert "supply            ARMED: credit is back" in text
    assert "keypad codes      LOCKED for 60 min more" in text
    armed_open = "\n".join(status_lines({**raw, 15: 2, 16: 0, 17: 1}))
    assert "supply            on" in armed_open
    assert "keypad codes      accepted (1 wrong code allowed before a lockout)" in armed_open
    assert "INTERRUPTED" in "\n".join(status_lines({**raw, 15: 0}))
    assert "not taken" in "\n".join(status_lines({**raw, 18: False}))
    j = json.loads(json.dumps(status_json(raw)))
    assert j == {"device": "70-B3-D5-F0-00-00-00-A1", "firmware": "0.3.0", "balance_mp": 1234567,
                 "supply_on": False, "wan_up": False, "highest_sequence": 12, "receipt_count": 40,
                 "emergency_mp": 250000, "faults": {"1": 2}, "meter_time": 1790000000,
                 "clock_resumed": False, "floor": 9, "damaged": False, "oldest_receipt": 3,
                 "supply_state": 1, "code_locked_s": 3541, "code_tries_left": 0,
                 "takes_codes": True, "supply": "armed"}
    old = status_json({1: b"", 2: "0.1.0", 3: 0, 4: True, 99: b"\x01"})
    assert old["supply"] == "on" and old["supply_state"] is None and old["field_99"] == "01"
    assert old["device"] == ""


def test_provision_registers_the_ka_key_or_says_why_the_meter_takes_no_codes(tmp_path,
                                                                           monkeypatch):
    """`topup provision` without a board (hil.flashing.provision stood in for): it passes
    the database's active code key, registers the meter's key-agreement key with it, and
    says plainly when the meter takes no codes (no code key here, or old firmware)."""
    from click.testing import CliRunner
    from hil import flashing
    from host import db, keystore, registry
    from host.registry import MeterKey
    from protocol.cose import kid_for
    from topup_cli import cli
    monkeypatch.setenv("TOPUP_INSECURE_FAST_KDF", "1")
    path = str(tmp_path / "s.db")
    conn = db.create(path)
    keystore.new_key(conn, "pw", code_key=False)        # a database from before codes
    device = bytes.fromhex("70b3d5f0000000d4")
    registry.add_device(conn, device)
    conn.close()
    given = []
    answer = {}

    def fake(port, dev, keys, limits, initial, reset, **kw):
        given.append(kw["code_key"])
        return answer["key"](kw["code_key"])
    monkeypatch.setattr(flashing, "provision", fake)
    env = {"TOPUP_DB": path, "TOPUP_PASSPHRASE": "pw"}

    def provision():
        return CliRunner().invoke(cli, ["provision", "--port", "/dev/null", "--device",
                                        registry.format_eui64(device)], env=env,
                                  catch_exceptions=False)

    def key(ka, note, seed):
        def make(code_key):
            k = MeterKey(bytes([seed]) * 32, 0, 0, ka,
                         None if ka is None else kid_for(code_key))
            k.reset, k.codes_note = None, note
            return k
        return make
    answer["key"] = key(None, "no supplier code key was installed: this meter takes no codes",
                        1)
    r = provision()
    assert r.exit_code == 0 and given == [None], r.output
    assert "keypad codes: no" in r.stderr and "`topup key new --code`" in r.stderr
    r = CliRunner().invoke(cli, ["key", "new", "--code"], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ka = bytes(range(32))
    answer["key"] = key(ka, None, 2)
    r = provision()
    conn = db.open_db(path)
    try:
        code = keystore.active_code_key(conn)
        assert given[-1] == code.public_key
        epoch = registry.device_keys(conn, device)[-1]
        assert (epoch.epoch, epoch.ka_public, epoch.code_kid) == (2, ka, code.kid)
    finally:
        conn.close()
    assert "keypad codes: yes (the meter's key-agreement key %s" % ka.hex() in r.stdout
    answer["key"] = key(None, "the firmware on the board predates keypad codes (it printed "
                              "no key-agreement key): this meter takes no codes", 3)
    r = provision()
    assert "keypad codes: no — the firmware on the board predates keypad codes" in r.stderr
    conn = db.open_db(path)
    try:
        assert not registry.device_keys(conn, device)[-1].takes_codes
        assert "cannot take keypad codes" in str(pytest.raises(
            Exception, registry.code_epoch, conn, device).value)
    finally:
        conn.close()


def test_absent_port_is_a_clear_error(issuer, tmp_path):
    missing = str(tmp_path / "ttyUSB9")
    for args in (("flash", "--port", missing),
                 ("provision", "--port", missing, "--device", issuer.eui),
                 ("han", "status", "--port", missing)):
        line = one_line_error(topup(issuer, *args))
        assert missing in line and ("cannot open" in line), line


def test_a_board_that_does_not_answer_is_a_clear_error(issuer):
    """A serial port with nothing behind it (a pty nobody serves): the REPL and the HAN both
    time out with a message naming the port."""
    master, slave = os.openpty()
    try:
        import tty
        tty.setraw(slave)
        port = os.ttyname(slave)
        t = time.monotonic()
        line = one_line_error(topup(issuer, "han", "status", "--port", port, "--timeout", "0.5"))
        assert "no answer from the meter within 0.5 s on the HAN port" in line
        assert "is the meter application running?" in line and "reset" in line   # issue 9 item 12
        r = topup(issuer, "flash", "--port", port)
        line = one_line_error(r)
        assert "no MicroPython REPL answers on %s" % port in line, line
        assert "not its HAN or WAN port" in line and r.stdout == "", r.stdout     # no stray b
        assert time.monotonic() - t < 60
    finally:
        os.close(master)
        os.close(slave)


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(d))
    return kids


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_topup_sim_prints_its_ports_serves_mpremote_and_stops_on_sigint(issuer, tmp_path):
    import shutil
    from hil import virtual
    if not shutil.which("node") or not virtual._package_entry().exists():
        pytest.skip("topup sim needs Node.js and the MicroPython npm package (make setup)")
    env = dict(os.environ, **issuer.env)
    p = subprocess.Popen([TOPUP, "sim", "--workdir", str(tmp_path / "sim"), "--flash-firmware"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ports = {}
        deadline = time.monotonic() + 60
        while len(ports) < 3 and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            m = re.match(r"(REPL|HAN|WAN) port\s+(\S+)", line)
            if m:
                ports[m.group(1)] = m.group(2)
        assert set(ports) == {"REPL", "HAN", "WAN"}, (ports, p.stderr.read() if p.poll() is not None else "")
        nodes = _children(p.pid)
        assert nodes, "no Node process under topup sim"
        # the flashed firmware runs: an unprovisioned meter answers on the HAN
        out = ok(topup(issuer, "han", "status", "--port", ports["HAN"]))
        assert "(not provisioned)" in out
        r = subprocess.run([sys.executable, "-m", "mpremote", "connect", ports["REPL"], "exec", "print(1)"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "1", (r.stdout, r.stderr)
        p.send_signal(signal.SIGINT)
        assert p.wait(15) == 0
        deadline = time.monotonic() + 5
        while any(_alive(n) for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(n) for n in nodes), "a Node process outlived topup sim"
        # a pty's /dev/pts entry is freed from a kernel work queue: give it a moment
        while any(os.path.exists(v) for v in ports.values()) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        assert not any(os.path.exists(v) for v in ports.values()), "a pty outlived topup sim"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- the bench's rig file (no board needed) -------------------------------------------------------
def _fake_rig(tmp_path, **extra):
    """Rig commands that append what they were asked to a log file."""
    log = tmp_path / "rig.log"

    def cmd(word):
        return [sys.executable, "-c", "import sys; open(%r, 'a').write(' '.join(sys.argv[1:]) + '\\n')"
                % str(log), word]
    rig = {"power": {"off": cmd("off"), "on": cmd("on")}, "wan": {"up": cmd("wan-up"), "down": cmd("wan-down")},
           "button": cmd("button"), "pulses": cmd("pulses") + ["{n}"],
           "relay": [sys.executable, "-c", "print('on')"]}
    rig.update(extra)
    path = tmp_path / "rig.json"
    import json
    path.write_text(json.dumps(rig))
    return path, log


def test_rig_file_drives_the_bench_lines_and_names_what_is_missing(tmp_path):
    from hil.transport import SerialTransport, TransportError, Unsupported, load_rig
    path, log = _fake_rig(tmp_path)
    t = SerialTransport("/dev/ttyUSB0", han_port="/dev/ttyUSB1", rig=load_rig(path))
    assert t.capabilities == {"power_cut", "wan", "button", "pulses", "relay", "reboot"}
    t.set_wan(True)
    t.set_wan(False)
    t.press_button(2)
    t.add_pulses(1234)
    assert t.relay() is True
    assert log.read_text().split("\n")[:-1] == ["wan-up", "wan-down", "button", "button", "pulses 1234"]
    for call, words in ((lambda: t.advance_clock(60), "setting the meter clock"),
                        (lambda: t.power_cut_after(0), "the n-th flash write")):
        with pytest.raises(Unsupported) as e:
            call()
        assert "the serial board on /dev/ttyUSB0 cannot do this: needs" in str(e.value) and words in str(e.value)
    bare = SerialTransport("/dev/ttyUSB0", han_port="/dev/ttyUSB1")
    assert bare.capabilities == {"reboot"} and bare.relay() is None
    with pytest.raises(Unsupported, match=r'rig file: "pulses"'):
        bare.add_pulses(1)
    failing = SerialTransport("/dev/ttyUSB0", han_port="/dev/ttyUSB1",
                              rig={"button": [sys.executable, "-c", "import sys; sys.exit('no relay board')"]})
    with pytest.raises(TransportError, match="rig command button .* exited 1: no relay board"):
        failing.press_button()
    with pytest.raises(TransportError, match="needs its HAN port"):
        SerialTransport("/dev/ttyUSB0")
    with pytest.raises(TransportError, match="no such port: /dev/ttyUSB0"):
        SerialTransport("/dev/ttyUSB0", han_port=str(path)).start()


@pytest.mark.parametrize("content, message", [
    ("{", "is not JSON"),
    ("[]", "must hold a JSON object"),
    ('{"power": {"off": ["x"]}}', 'power must be {"off": [...], "on": [...]}'),
    ('{"pulses": ["pulse"]}', "must contain {n}"),
    ('{"button": "press"}', "button must be a command"),
    ('{"fan": ["x"]}', "unknown entry 'fan'"),
])
def test_bad_rig_files_are_refused_before_anything_runs(tmp_path, content, message):
    from hil.transport import TransportError, load_rig
    path = tmp_path / "rig.json"
    path.write_text(content)
    with pytest.raises(TransportError, match=re.escape(message)):
        load_rig(path)


def test_the_example_rig_file_is_valid():
    from hil.transport import SerialTransport, load_rig
    rig = load_rig(Path(__file__).resolve().parents[2] / "docs" / "rig.example.json")
    t = SerialTransport("/dev/ttyUSB0", han_port="/dev/ttyUSB1", rig=rig)
    assert t.capabilities == {"power_cut", "wan", "button", "pulses", "relay", "reboot"}


def test_the_suite_runs_unchanged_against_a_board_on_serial_ports(tmp_path):
    """The serial transport end to end: a board known only by its REPL and HAN ports (here a
    virtual board's ptys, run as a separate program, as `topup sim` or a USB board would be),
    no rig file: the tests that need only the HAN, flashing, provisioning and a reboot pass;
    the others are skipped, each naming the control the bench lacks."""
    import shutil
    from hil import virtual
    if not shutil.which("node") or not virtual._package_entry().exists():
        pytest.skip("needs Node.js and the MicroPython npm package (make setup)")
    if os.environ.get("TOPUP_BOARD", "virtual") != "virtual":
        pytest.skip("already running against a serial board")
    p = subprocess.Popen([sys.executable, "-m", "hil.virtual", "--workdir", str(tmp_path / "vb")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    try:
        ports = {}
        while len(ports) < 2:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            m = re.match(r"(REPL|HAN)\s+(\S+)", line)
            if m:
                ports[m.group(1)] = m.group(2)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOPUP_")}
        r = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider",
                            "tests/hil/test_integrity.py", "--board", ports["REPL"], "--han-port", ports["HAN"],
                            "-k", "cli or out_of_order or resubmission or bad_vouchers or reboot or pulses"],
                           capture_output=True, text=True, env=env, timeout=300,
                           cwd=str(Path(__file__).resolve().parents[2]))
        assert r.returncode == 0, r.stdout[-3000:]
        assert re.search(r"\b5 passed\b", r.stdout) and re.search(r"\b[1-9]\d* skipped\b", r.stdout), r.stdout[-2000:]
        assert "the serial board on %s cannot do this: needs injecting energy pulses" % ports["REPL"] in r.stdout
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
