"""Signed commands on the board under test (SPEC.md §10, issue 12), through the supplier's
and the engineer's real commands: a meter provisioned with `topup provision` (which installs
the database's command key) has its issuer key rotated and the old one revoked with no
factory reset — the old key's vouchers refused KEY_REVOKED once the revocation is applied,
the new key's accepted — and `topup reconcile` shows the exposure before `topup han sync`
and none after; a tariff change delivered by `han sync` charges the new unit rate from its
effective time, exactly.

The meter is provisioned here (not by the `board` fixture, which installs no command key),
on the session's flashed board (`hil_transport`)."""
import hashlib
import json
import time

import pytest

from hil.han_client import HanError
from hil.transport import CLOCK, PULSES, Unsupported, VirtualTransport
from protocol import errors, receipt as pr

pytestmark = pytest.mark.hil

ADMIN_DEVICE = bytes.fromhex("70b3d5f000000ad1")


@pytest.fixture
def meter(hil_transport, issuer, request):
    """The session's board, factory-reset and provisioned by `topup provision` from the
    issuer's database (its command key included); WAN down."""
    from host import registry
    t = hil_transport
    # A meter id of each test's own: the receipts a test leaves on the board's flash are
    # then not the next test's meter's (its provisioning reads out only its own before the
    # factory reset, and would hold them unverifiable).
    device = ADMIN_DEVICE[:6] + hashlib.sha256(request.node.name.encode()).digest()[:2]
    record = issuer.record
    registry.add_device(issuer.conn, device, record.max_voucher, record.max_credit)
    issuer.device, issuer.eui = device, registry.format_eui64(device)
    if isinstance(t, VirtualTransport):
        t.set_clock_survives(True)
    if hasattr(t, "ensure_up"):
        t.ensure_up()
    r = issuer.cli("provision", "--port", t.repl_port, "--device", issuer.eui,
                   "--initial-credit", "10.00", "--factory-reset")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "signed commands: yes" in r.stdout, r.stdout + r.stderr
    t.wait_meter(device=bytes(issuer.device))
    return t


def _sync(issuer, t):
    r = issuer.cli("han", "sync", "--port", t.han_port)
    return r


def _wait_balance(han, expected, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        b = han.status()["balance_mp"]
        if b == expected or time.monotonic() > deadline:
            assert b == expected
            return b
        time.sleep(0.05)


def test_issuer_key_rotation_without_a_factory_reset(meter, issuer):
    old_kid = issuer.signer.kid.hex()
    v_old = issuer.issue(500, count=2)                 # under the old key
    with meter.han() as han:
        han.submit(v_old[0])                           # applied while trusted
    r = issuer.cli("key", "new", "--activate")
    assert r.exit_code == 0 and "1 command(s) to add issuer key" in r.stdout, r.stdout
    r = issuer.cli("key", "revoke", old_kid, "--yes")
    assert r.exit_code == 0 and "1 command(s) to revoke issuer key" in r.stdout, r.stdout
    # Not delivered yet: the meter still takes the old key's vouchers, and reconciliation
    # shows the exposure (no receipt read yet: both old vouchers could still be applied).
    r = issuer.cli("reconcile")
    assert "still trusts revoked key %s" % old_kid in r.stdout, r.stdout
    assert "2 outstanding vouchers under it, £10.00" in r.stdout, r.stdout
    r = _sync(issuer, meter)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "command 1 (ADD_ISSUER_KEY) APPLIED" in r.stdout, r.stdout
    assert "command 2 (REVOKE_ISSUER_KEY) APPLIED" in r.stdout, r.stdout
    assert "0 pending" in r.stdout
    with meter.han() as han:
        st = han.status()
        assert st["last_command"] == 2
        with pytest.raises(HanError) as e:
            han.submit(v_old[1])
        assert e.value.reason == errors.KEY_REVOKED
        # The new key's vouchers (through `topup issue`, which signs with the active key).
        (v_new,) = issuer.issue_cli("7.00")
        receipt, dup = han.submit(v_new)
        assert not dup and pr.parse(receipt).amount == 700
        # A second sync: nothing pending, nothing sent; the commands stay applied.
    r = _sync(issuer, meter)
    assert r.exit_code == 0 and "0 command(s) applied, 0 pending" in r.stdout, r.stdout
    listing = issuer.cli("commands", "list").stdout
    assert listing.count("applied") == 2, listing
    r = issuer.cli("reconcile")
    assert "still trusts" not in r.stdout and "exposure: none" in r.stdout, r.stdout
    assert "applied_after_revocation" not in r.stdout


def test_tariff_change_charges_from_its_effective_time(meter, issuer):
    try:
        meter.require(PULSES, CLOCK)
    except Unsupported as e:
        pytest.skip(str(e))
    first = issuer.next_first_index()
    with meter.han() as han:
        t0 = han.status()["meter_time"]
    # 1. From now: no standing charge (so only pulses move the balance); 2. from an hour
    # on: 49 p/kWh instead of 24.5 p/kWh.
    r = issuer.cli("tariff", "set", "--device", issuer.eui, "--standing", "0",
                   "--effective", str(t0))
    assert r.exit_code == 0, r.stdout + r.stderr
    r = issuer.cli("tariff", "set", "--device", issuer.eui, "--unit-rate", "49",
                   "--effective", str(t0 + 3600))
    assert r.exit_code == 0, r.stdout + r.stderr
    r = _sync(issuer, meter)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert r.stdout.count("(SET_TARIFF) APPLIED") == 2, r.stdout
    with meter.han() as han:
        st = han.status()
        assert st["pending_tariff"] == t0 + 3600
        start = st["balance_mp"]
        meter.add_pulses(1000)                         # 1 kWh at the old rate
        after_old = _wait_balance(han, start - 24500)
        meter.advance_clock(3700)                      # past the effective time
        meter.add_pulses(1000)                         # 1 kWh at the new rate
        _wait_balance(han, after_old - 49000)
    # The receipts show the change as applied.
    # (Receipts of earlier tests on this board come too: read out before the factory reset.)
    rows = issuer.conn.execute("SELECT tariff FROM receipts WHERE kind = 5 AND command_kind = 4 "
                               "AND idx >= ? ORDER BY idx", (first,)).fetchall()
    assert [json.loads(t) for (t,) in rows] == [{"1": t0, "3": 0},
                                                 {"1": t0 + 3600, "2": 49000}], rows


def test_a_refused_command_is_said_in_one_line_and_the_next_takes_its_number(meter, issuer):
    """A tariff effective more than 7 days before meter time (the supplier's own check let
    through here, as a late delivery would) is refused COMMAND_REFUSED; nothing changes on
    the meter, and the command after it is signed again with the freed number and applied."""
    from host import commands as cmds
    from hil.pytest_plugin import PASSPHRASE
    with meter.han() as han:
        st = han.status()
    t0 = st["meter_time"]
    late = cmds.plan_tariff(issuer.conn, [bytes(issuer.device)], {1: t0 - 8 * 86400, 2: 30000})
    cmds.make(issuer.conn, PASSPHRASE, late)
    r = issuer.cli("tariff", "set", "--device", issuer.eui, "--ec-amount", "6.00",
                   "--effective", "now")
    assert r.exit_code == 0, r.stdout + r.stderr
    r = _sync(issuer, meter)
    assert r.exit_code == 1, r.stdout + r.stderr
    refusals = [ln for ln in r.stderr.splitlines() if "REFUSED" in ln]
    assert len(refusals) == 1 and "command 1 (SET_TARIFF) REFUSED: COMMAND_REFUSED (26)" in \
        refusals[0], r.stderr
    assert "command 1 (SET_TARIFF) APPLIED" in r.stdout, r.stdout     # the renumbered one
    assert "Traceback" not in r.stderr
    statuses = sorted((row.number, row.status, row.reason) for row in
                      cmds.list_commands(issuer.conn, bytes(issuer.device)))
    assert statuses == [(1, "applied", None), (1, "refused", 26), (2, "superseded", None)]
    with meter.han() as han:
        assert han.status()["last_command"] == 1


def test_change_of_supplier_end_to_end(meter, issuer, tmp_path):
    """The old supplier hands the meter over (`supplier change`, delivered by `han sync`):
    its vouchers are refused STALE from then on and its reconciliation counts the one never
    applied as a refund due; the new supplier adopts the meter (`supplier adopt`), its
    ledger opening at the balance the change receipt confirms, issues a voucher and a
    tariff the meter takes (its command numbering starts at 1), and reconciles with no
    anomaly."""
    from click.testing import CliRunner
    from host import keystore
    from topup_cli import cli
    new_path = str(tmp_path / "new-supplier.db")
    new_env = {"TOPUP_DB": new_path, "TOPUP_PASSPHRASE": "the new supplier's passphrase",
               keystore.FAST_KDF_ENV: "1"}

    def new(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], env=new_env,
                                  catch_exceptions=False)

    assert new("init").exit_code == 0 and new("key", "new").exit_code == 0
    v_old = issuer.issue(400, count=2)
    with meter.han() as han:
        han.submit(v_old[0])
    r = issuer.cli("supplier", "change", issuer.eui, "--to", new_path)
    assert r.exit_code == 0 and "CHANGE_SUPPLIER command 1" in r.stdout, r.stdout + r.stderr
    r = new("supplier", "adopt", issuer.eui, "--from", issuer.path)     # not confirmed yet
    assert r.exit_code == 2 and "no confirmed change of supplier" in r.stderr, r.stderr
    r = _sync(issuer, meter)
    assert r.exit_code == 0 and "(CHANGE_SUPPLIER) APPLIED" in r.stdout, r.stdout + r.stderr
    with meter.han() as han:
        with pytest.raises(HanError) as e:
            han.submit(v_old[1])
        assert e.value.reason == errors.STALE
        balance = han.status()["balance_mp"]
    # The old supplier's view: the voucher never applied is a refund due.
    r = issuer.cli("reconcile")
    assert "refunds due £4.00" in r.stdout and "no anomalies" in r.stdout, r.stdout
    # The new supplier's view.
    (confirmed,) = issuer.conn.execute(
        "SELECT balance_after FROM receipts WHERE kind = 5 AND command_kind = 6").fetchone()
    assert confirmed == balance
    r = new("supplier", "adopt", issuer.eui, "--from", issuer.path)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "ledger opens at £14.00, the meter's balance confirmed by receipt" in r.stdout
    r = new("issue", issuer.eui, "3.00")
    assert r.exit_code == 0, r.stderr
    r = new("han", "submit", "--port", meter.han_port, r.stdout.strip())
    assert r.exit_code == 0 and "APPLIED" in r.stdout, r.stdout + r.stderr
    r = new("tariff", "set", "--device", issuer.eui, "--ec-amount", "6.00", "--effective", "now")
    assert r.exit_code == 0, r.stderr
    r = new("han", "sync", "--port", meter.han_port)
    assert r.exit_code == 0 and "command 1 (SET_TARIFF) APPLIED" in r.stdout, r.stdout + r.stderr
    r = new("reconcile")
    assert r.exit_code == 0 and "no anomalies" in r.stdout, r.stdout
    assert "redeemed £3.00" in r.stdout


def test_a_command_relayed_in_its_text_form(meter, issuer):
    """`topup commands export` gives the OTC1: text a PPMID relays; `topup han submit` hands
    it to the meter; a second submission gets the original receipt back."""
    r = issuer.cli("tariff", "set", "--device", issuer.eui, "--ec-amount", "6.00",
                   "--effective", "now")
    assert r.exit_code == 0, r.stderr
    (text,) = issuer.cli("commands", "export", "--pending").stdout.splitlines()
    assert text.startswith("OTC1:")
    r = issuer.cli("han", "submit", "--port", meter.han_port, text)
    assert r.exit_code == 0 and r.stdout.startswith("COMMAND APPLIED"), r.stdout + r.stderr
    assert "#1 SET_TARIFF" in r.stdout
    r = issuer.cli("han", "submit", "--port", meter.han_port, text)
    assert r.exit_code == 0 and r.stdout.startswith("ALREADY APPLIED"), r.stdout + r.stderr
    r = _sync(issuer, meter)           # reads the receipt back: the command is applied
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "applied (receipt" in issuer.cli("commands", "list").stdout
