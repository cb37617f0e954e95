# `topup key new --activate | key revoke | tariff set | commands list|export` as a supplier
# runs them (the installed console script, in a subprocess): the signed commands they make
# (SPEC.md §10), and bad input refused in one line with nothing changed.
import calendar
import hashlib
import os
import signal
import sqlite3
import time

import nacl.signing
import pytest

from protocol import command as pc

from .conftest import DEVICE, DEVICE_BYTES, one_line_error

OTHER = "70-B3-D5-F0-00-00-00-B2"
OTHER_BYTES = bytes.fromhex("70b3d5f0000000b2")


def register_provisioned(topup, device, with_command_key=True, seed=b"\x07" * 32):
    """What `topup provision` registers for a meter (the meter key epoch, the issuer keys
    it trusts, the command key it holds), written as the provisioning would."""
    from host import db, keystore, registry
    conn = db.open_db(topup.db_path)
    try:
        if registry.find_device(conn, device) is None:
            registry.add_device(conn, device, 10000, 50000)
        ck = keystore.active_command_key(conn) if with_command_key else None
        public = bytes(nacl.signing.SigningKey(seed).verify_key)
        registry.set_public_key(conn, device, registry.MeterKey(
            public, 0, 0, None, None, None if ck is None else ck.kid))
        return None if ck is None else ck.public_key
    finally:
        conn.close()


def rows(topup, sql, args=()):
    c = topup.conn()
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


@pytest.fixture
def fleet(store):
    """The store's meter provisioned with the command key, and a second meter provisioned
    by firmware without commands."""
    cmd_public = register_provisioned(store, DEVICE_BYTES)
    register_provisioned(store, OTHER_BYTES, with_command_key=False, seed=b"\x08" * 32)
    store.cmd_public = cmd_public
    return store


def test_rotation_makes_add_then_revoke_commands_and_lists_them(fleet):
    old = rows(fleet, "SELECT kid FROM keys")[0][0]
    r = fleet.ok("key", "new", "--activate")
    new_kid = r.stdout.split()[2]
    assert "1 command(s) to add issuer key %s" % new_kid in r.stdout
    assert OTHER in r.stderr                       # named: it takes no signed commands
    r = fleet.ok("key", "revoke", bytes(old).hex(), "--yes")
    assert "1 command(s) to revoke issuer key" in r.stdout
    listed = fleet.ok("commands", "list", "--pending").stdout.splitlines()
    assert [ln.split()[1:3] for ln in listed] == [["#1", "ADD_ISSUER_KEY"],
                                                  ["#2", "REVOKE_ISSUER_KEY"]]
    assert all(ln.startswith(DEVICE) for ln in listed)
    text = fleet.ok("commands", "export", "--device", DEVICE).stdout.splitlines()
    assert len(text) == 2 and all(t.startswith("OTC1:") for t in text)
    kid = hashlib.sha256(fleet.cmd_public).digest()[:8]
    first, second = (pc.verify(pc.from_text(t), {kid: fleet.cmd_public}, DEVICE_BYTES)
                     for t in text)
    new_public = bytes.fromhex(rows(fleet, "SELECT lower(hex(public_key)) FROM keys WHERE "
                                           "lower(hex(kid)) = ?", (new_kid,))[0][0])
    assert (first.number, first.kind, first.args) == (1, 1, {1: new_public})
    assert (second.number, second.kind, second.args) == (2, 2, {1: bytes(old)})
    # Before the meter confirms, reconciliation shows the exposure.
    r = fleet("reconcile")
    assert "exposure" in r.stdout and DEVICE in r.stdout and "still trusts revoked key" in r.stdout


def test_tariff_set_parses_money_exactly(fleet):
    r = fleet.ok("tariff", "set", "--device", DEVICE, "--unit-rate", "24.567",
                 "--standing", "60.1", "--ec-amount", "5.00", "--effective",
                 "2026-12-01T06:00Z")
    assert "1 SET_TARIFF" in r.stdout
    (raw,) = rows(fleet, "SELECT raw FROM commands")[0]
    c = pc.parse(raw)
    assert c.args == {1: calendar.timegm((2026, 12, 1, 6, 0, 0)), 2: 24567, 3: 60100, 4: 500}


@pytest.mark.parametrize("args, words", [
    (["--device", DEVICE, "--unit-rate", "0"], "unit rate"),
    (["--device", DEVICE, "--unit-rate", "1000.001"], "unit rate"),
    (["--device", DEVICE, "--unit-rate", "24.5678"], "three decimals"),
    (["--device", DEVICE, "--unit-rate", "-3"], "not pence"),
    (["--device", DEVICE, "--standing", "100000.01"], "standing"),
    (["--device", DEVICE, "--max-credit", "20000"], "max credit £20,000.00 is outside"),
    (["--device", DEVICE], "at least one"),
    (["--unit-rate", "20"], "--device EUI64 or --all"),
    (["--device", "70-B3-D5-F0-00-00-00-FF", "--unit-rate", "20"], "unknown device"),
    (["--device", OTHER, "--unit-rate", "20"], "takes no signed commands"),
    (["--device", DEVICE, "--unit-rate", "20", "--effective-x"], None),
])
def test_tariff_bad_input_is_one_line_and_changes_nothing(fleet, args, words):
    before = rows(fleet, "SELECT count(*) FROM commands")
    extra = [] if "--effective-x" in args else ["--effective", "now"]
    r = fleet("tariff", "set", *[a for a in args if a != "--effective-x"], *extra)
    if words is None:   # --effective missing: click's own usage error
        assert r.returncode == 2 and "Traceback" not in r.stderr
    else:
        assert words in one_line_error(r)
    assert rows(fleet, "SELECT count(*) FROM commands") == before


def test_effective_time_too_far_back_or_not_a_time(fleet):
    assert "7 days" in one_line_error(fleet("tariff", "set", "--device", DEVICE, "--unit-rate",
                                            "20", "--effective", "2020-01-01"))
    assert "not a time" in one_line_error(fleet("tariff", "set", "--device", DEVICE,
                                                "--unit-rate", "20", "--effective", "soon"))
    assert "not a time" in one_line_error(fleet("tariff", "set", "--device", DEVICE,
                                                "--unit-rate", "20", "--effective",
                                                "2026-02-30"))


def test_revoke_leaving_a_meter_without_an_issuer_key_is_refused(fleet):
    (kid,) = rows(fleet, "SELECT lower(hex(kid)) FROM keys")[0]
    before = rows(fleet, "SELECT kid, revoked FROM keys")
    msg = one_line_error(fleet("key", "revoke", kid, "--yes"))
    assert "no issuer key" in msg and DEVICE in msg
    assert rows(fleet, "SELECT kid, revoked FROM keys") == before
    assert rows(fleet, "SELECT count(*) FROM commands") == [(0,)]


def test_commands_list_for_an_unknown_device_and_nothing_to_export(fleet):
    assert "unknown device" in one_line_error(fleet("commands", "list", "--device",
                                                    "70-B3-D5-F0-00-00-00-FF"))
    assert "no commands" in one_line_error(fleet("commands", "export"))
    r = fleet.ok("commands", "list")
    assert r.stdout == "" and "no commands" in r.stderr


def test_wrong_passphrase_makes_nothing(fleet):
    r = fleet("key", "new", "--activate", env={"TOPUP_PASSPHRASE": "wrong"})
    assert "wrong passphrase" in one_line_error(r)
    assert rows(fleet, "SELECT count(*) FROM keys") == [(1,)]
    assert rows(fleet, "SELECT count(*) FROM commands") == [(0,)]


def test_a_killed_tariff_run_leaves_the_database_whole(fleet):
    """kill -9 at random points of many `tariff set` runs: every command stored is whole and
    numbered 1..n without a gap, and the database passes its integrity check."""
    for delay in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4):
        p = fleet.popen("tariff", "set", "--device", DEVICE, "--unit-rate", "20",
                        "--effective", "now", stdout=open(os.devnull, "w"),
                        stderr=open(os.devnull, "w"))
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
    fleet.ok("tariff", "set", "--device", DEVICE, "--unit-rate", "21", "--effective", "now")
    c = sqlite3.connect(fleet.db_path)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        numbers = [n for (n,) in c.execute("SELECT number FROM commands ORDER BY number")]
        assert numbers == list(range(1, len(numbers) + 1))
        for (raw,) in c.execute("SELECT raw FROM commands"):
            assert pc.parse(raw).kind == pc.SET_TARIFF
    finally:
        c.close()


def test_supplier_change_from_the_new_suppliers_database(fleet, tmp_path):
    from .conftest import Topup
    newdir = tmp_path / "new"
    newdir.mkdir()
    new = Topup(newdir)
    new.ok("init")
    new.ok("key", "new", env={"TOPUP_PASSPHRASE": "the new supplier's"})
    assert "no database at" in one_line_error(fleet("supplier", "change", DEVICE, "--to",
                                                    tmp_path / "nope.db"))
    assert "own command key" in one_line_error(fleet("supplier", "change", DEVICE, "--to",
                                                     fleet.db_path))
    assert "unknown device" in one_line_error(fleet("supplier", "change",
                                                    "70-B3-D5-F0-00-00-00-FF", "--to",
                                                    new.db_path))
    assert "takes no signed commands" in one_line_error(fleet("supplier", "change", OTHER,
                                                              "--to", new.db_path))
    assert rows(fleet, "SELECT count(*) FROM commands") == [(0,)]
    r = fleet.ok("supplier", "change", DEVICE, "--to", new.db_path)
    assert "CHANGE_SUPPLIER command 1" in r.stdout
    (raw,) = rows(fleet, "SELECT raw FROM commands")[0]
    c = pc.parse(raw)
    theirs = rows(new, "SELECT public_key FROM command_keys")[0][0]
    assert c.kind == pc.CHANGE_SUPPLIER and c.args[1] == bytes(theirs)
    # No more commands from us for that meter.
    assert "changing supplier" in one_line_error(fleet("tariff", "set", "--device", DEVICE,
                                                       "--unit-rate", "20", "--effective",
                                                       "now"))


def test_device_show_says_what_the_meter_trusts_and_what_is_pending(fleet):
    (old,) = rows(fleet, "SELECT lower(hex(kid)) FROM keys")[0]
    new_kid = fleet.ok("key", "new", "--activate").stdout.split()[2]
    out = fleet.ok("device", "show", DEVICE).stdout
    assert "signed commands      yes: command key %s, 1 pending" % hashlib.sha256(
        fleet.cmd_public).digest()[:8].hex() in out, out
    line = [ln for ln in out.splitlines() if ln.startswith("issuer keys trusted")][0]
    assert "%s (pending)" % new_kid in line and old in line and "%s (pending)" % old not in line
    assert "no: provisioned without a command key" in fleet.ok("device", "show", OTHER).stdout


def test_key_rotate_commands_makes_a_rotation_per_meter_signed_by_the_old_key(fleet):
    old_kid = hashlib.sha256(fleet.cmd_public).digest()[:8]
    r = fleet.ok("key", "rotate-commands")
    new_kid = r.stdout.split()[3]
    assert "1 command(s) to rotate the command key to %s" % new_kid in r.stdout, r.stdout
    assert OTHER in r.stderr                       # named: it takes no signed commands
    assert rows(fleet, "SELECT lower(hex(kid)) FROM command_keys WHERE active = 1") == [
        (new_kid,)]
    new_public = bytes(rows(fleet, "SELECT public_key FROM command_keys WHERE active = 1")[0][0])
    (text,) = fleet.ok("commands", "export", "--device", DEVICE).stdout.splitlines()
    c = pc.verify(pc.from_text(text), {old_kid: fleet.cmd_public}, DEVICE_BYTES)
    assert (c.number, c.kind, c.args) == (1, pc.ROTATE_COMMAND_KEY, {1: new_public})
    assert "(rotating to %s)" % new_kid in fleet.ok("device", "show", DEVICE).stdout
    # The next command is signed by the new key, numbering going on.
    fleet.ok("tariff", "set", "--device", DEVICE, "--unit-rate", "20", "--effective", "now")
    texts = fleet.ok("commands", "export", "--device", DEVICE).stdout.splitlines()
    t = pc.verify(pc.from_text(texts[-1]), {bytes.fromhex(new_kid): new_public}, DEVICE_BYTES)
    assert (t.number, t.kind) == (2, pc.SET_TARIFF)


def test_key_new_code_activate_sets_the_code_key_on_meters_taking_codes(fleet):
    from host import db, keystore, registry
    import nacl.bindings
    conn = db.open_db(fleet.db_path)
    try:
        old_code = keystore.active_code_key(conn)
        ck = keystore.active_command_key(conn)
        # A provisioning again (a new receipt key), by firmware that takes codes.
        public = bytes(nacl.signing.SigningKey(b"\x09" * 32).verify_key)
        ka = nacl.bindings.crypto_scalarmult_base(b"\x33" * 32)
        registry.set_public_key(conn, DEVICE_BYTES, registry.MeterKey(
            public, 0, 0, ka, old_code.kid, ck.kid))
    finally:
        conn.close()
    r = fleet.ok("key", "new", "--code", "--activate")
    new_kid = r.stdout.split()[3]
    assert "1 command(s) to set code key %s" % new_kid in r.stdout, r.stdout
    assert "derived with their old code key until a receipt confirms" in r.stderr
    (text,) = fleet.ok("commands", "export", "--device", DEVICE).stdout.splitlines()
    kid = hashlib.sha256(fleet.cmd_public).digest()[:8]
    c = pc.verify(pc.from_text(text), {kid: fleet.cmd_public}, DEVICE_BYTES)
    new_public = bytes(rows(fleet, "SELECT public_key FROM code_keys WHERE active = 1")[0][0])
    assert (c.number, c.kind, c.args) == (1, pc.SET_CODE_KEY, {1: new_public})
    # Not confirmed yet: `topup code` still derives with the old key (its kid stored).
    fleet.ok("code", DEVICE, "1.00")
    assert rows(fleet, "SELECT lower(hex(code_kid)) FROM vouchers WHERE code_kid IS NOT NULL"
                ) == [(old_code.kid.hex(),)]
    # Without --activate: a spare code key, no command.
    fleet.ok("key", "new", "--code")
    assert rows(fleet, "SELECT count(*) FROM commands") == [(1,)]
