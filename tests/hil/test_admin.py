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


# --- commands through power cuts (issue 12): applied once or not at all -------------------
def _command_receipts(issuer, han, number):
    """The board's kind-5 receipts for this meter and command number, each verified."""
    out = []
    for raw in han.receipts():
        r = pr.parse(raw)
        if r.kind == pr.COMMAND and r.device == bytes(issuer.device) and r.sequence == number:
            out.append(issuer.verify_receipt(raw))
    return out


def _check_once_or_not_at_all(issuer, meter, made, before, answered, probe=None):
    """After a cut while `made` (number before['last_command'] + 1) was in flight: the meter
    has applied it exactly once or not at all, moved no money, and a resubmission of the
    same bytes gives the original receipt (it landed) or applies it once (it did not)."""
    from host import commands as cmds
    number = made.number
    assert number == before["last_command"] + 1
    with meter.han() as han:
        st = han.status()
        assert st["last_command"] in (number - 1, number), (st, number)
        landed = st["last_command"] == number
        got = _command_receipts(issuer, han, number)
        assert len(got) == (1 if landed else 0), (landed, [r.index for r in got])
        if answered is not None:                       # an answer proves the commit
            assert landed, "answered %r but not applied" % (answered,)
            assert answered == got[0].raw
        assert st["balance_mp"] == before["balance_mp"], "a command moved money"
        assert st["receipt_count"] == before["receipt_count"] + (1 if landed else 0)
        moved = 0
        if probe is not None:                          # the command's effect: there or not
            moved = probe(han, landed)                 # (milli-pence a probe itself added)
        receipt, dup = han.submit_command(made.raw)
        assert dup is landed
        r = issuer.verify_receipt(receipt)
        assert (r.kind, r.sequence, r.voucher, r.command_kind) == (
            pr.COMMAND, number, cmds.reference(made.raw), made.kind)
        assert r.balance_before == r.balance_after
        if made.kind == cmds.SET_TARIFF:               # the tariff as signed; its effective
            signed = {int(k): v for k, v in made.args.items()}   # time as the meter takes it:
            taken = dict(r.tariff)                     # not before the signed one, nor after
            eff = taken.pop(1)                         # the receipt (metering already charged)
            assert signed.pop(1) <= eff <= r.time and taken == signed, (r.tariff, r.time)
        if landed:
            assert receipt == got[0].raw               # the original receipt, byte for byte
        after = han.status()
        assert after["last_command"] == number
        assert after["balance_mp"] == before["balance_mp"] + moved
        assert len(_command_receipts(issuer, han, number)) == 1
        again, dup = han.submit_command(made.raw)      # and once more: a duplicate
        assert dup and again == receipt
        return landed, han.status()


def _tariff_command(issuer, effective, ec_pence):
    from host import commands as cmds
    from hil.pytest_plugin import PASSPHRASE
    plan = cmds.plan_tariff(issuer.conn, [bytes(issuer.device)], {1: effective, 4: ec_pence})
    (made,) = cmds.make(issuer.conn, PASSPHRASE, plan)
    return made


def test_a_command_through_a_flash_cut_at_every_write_is_applied_once_or_not_at_all(meter,
                                                                                     issuer):
    """cut_after(n) for n = 0, 1, 2 … while a SET_TARIFF is submitted over the HAN, until
    one completes without a cut: after every power-on the meter has applied it exactly once
    or not at all (status field 19, at most one kind-5 receipt for its number, no money
    moved), and the same bytes again give the original receipt or apply it once."""
    try:
        meter.require("flash_cut")
    except Unsupported as e:
        pytest.skip(str(e))
    with meter.han() as han:
        t0 = han.status()["meter_time"]
    outcomes = []
    n = 0
    while True:
        with meter.han() as han:
            before = han.status()
        made = _tariff_command(issuer, t0, 500 + n)
        res = meter.power_cut_after(n, during=lambda h: h.submit_command(made.raw))
        if res.error is not None and not isinstance(res.error, HanError):
            if not res.cut:
                raise res.error
        if not res.cut:
            assert res.result is not None and not res.result[1], res
            r = issuer.verify_receipt(res.result[0])
            assert (r.kind, r.sequence) == (pr.COMMAND, made.number)
            break
        answered = res.result[0] if res.result is not None else None
        landed, _ = _check_once_or_not_at_all(issuer, meter, made, before, answered)
        outcomes.append(landed)
        n += 1
        assert n < 40, "a command that never stops writing"
    assert n >= 2, "a command writes a receipt and its config/state: at least two operations"
    assert False in outcomes, outcomes                # a cut before the commit: not applied
    with meter.han() as han:
        st = han.status()
    assert st["last_command"] == made.number


def test_a_command_through_kills_at_random_instants_is_applied_once_or_not_at_all(meter,
                                                                                  issuer):
    """The power killed at random instants while commands (an issuer key added, tariff
    changes) are submitted: the same rule after every power-on. The added key is trusted
    exactly when its command landed."""
    import random
    import nacl.signing
    from host import commands as cmds
    from hil.pytest_plugin import PASSPHRASE
    from protocol import cose, voucher as pv
    try:
        meter.require("power_cut")
    except Unsupported as e:
        pytest.skip(str(e))
    rng = random.Random(12)
    with meter.han() as han:
        t0 = han.status()["meter_time"]
    extra = nacl.signing.SigningKey(bytes(range(40, 72)))
    kid = cose.kid_for(bytes(extra.verify_key))
    landed_any = []
    for i in range(8):
        with meter.han() as han:
            before = han.status()
        if i == 0:
            plan = cmds.plan_add_key(issuer.conn, kid, bytes(extra.verify_key),
                                     devices=[bytes(issuer.device)])
            (made,) = cmds.make(issuer.conn, PASSPHRASE, plan)
        else:
            made = _tariff_command(issuer, t0, 600 + i)
        res = meter.power_cut_kill(during=lambda h: h.submit_command(made.raw),
                                   delay=rng.uniform(0.0, 0.03))
        answered = res.result[0] if res.result is not None else None
        probe = None
        if i == 0:
            v = pv.encode(kid, lambda m: extra.sign(m).signature, bytes(issuer.device),
                          issuer.floor() + 1, 100, int(time.time()))

            def probe(han, landed):
                """The added key's voucher: taken iff the command landed."""
                if landed:
                    receipt, dup = han.submit(v)
                    assert not dup and pr.parse(receipt).amount == 100
                    return 100000
                with pytest.raises(HanError) as e:
                    han.submit(v)
                assert e.value.reason == errors.UNKNOWN_KEY
                return 0
        landed, _ = _check_once_or_not_at_all(issuer, meter, made, before, answered, probe)
        landed_any.append(landed)
        if i == 0:                                   # applied now either way: the key is trusted
            with meter.han() as han:
                receipt, dup = han.submit(v)
            assert pr.parse(receipt).amount == 100 and dup is landed
    assert len(landed_any) == 8


def test_the_head_end_delivers_a_tariff_change_over_the_wan_without_han_sync(meter, issuer):
    """Issue 12: `topup headend` answers the meter's push with its pending command (SPEC.md
    §5.1 field 3); the meter applies it, its receipt comes up with the next push and marks
    it applied — no `topup han sync`. The new unit rate then charges."""
    import threading
    try:
        meter.require(PULSES)
    except Unsupported as e:
        pytest.skip(str(e))
    wan_port = getattr(getattr(meter, "board", None), "wan_port", None)
    if wan_port is None:
        pytest.skip("%s has no WAN link port" % meter.describe())
    first = issuer.next_first_index()
    (v,) = issuer.issue(300, count=1)
    with meter.han() as han:
        han.submit(v)                                  # a receipt to push
        t0 = han.status()["meter_time"]
    r = issuer.cli("tariff", "set", "--device", issuer.eui, "--standing", "0",
                   "--unit-rate", "49", "--effective", str(t0))
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "pending" in issuer.cli("commands", "list").stdout
    threading.Timer(0.5, meter.set_wan, [True]).start()
    r = issuer.cli("headend", "--port", wan_port, "--idle-exit", 3)
    meter.set_wan(False)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "1 pending command(s) sent" in r.stdout, r.stdout
    assert "0 push(es) refused" in r.stdout, r.stdout
    listing = issuer.cli("commands", "list").stdout
    assert "applied" in listing and "pending" not in listing, listing
    rows = issuer.conn.execute("SELECT tariff FROM receipts WHERE kind = 5 AND command_kind = 4 "
                               "AND idx >= ? ORDER BY idx", (first,)).fetchall()
    assert [json.loads(t) for (t,) in rows] == [{"1": t0, "2": 49000, "3": 0}], rows
    with meter.han() as han:
        st = han.status()
        assert st["last_command"] == 1 and st["pending_tariff"] == 0
        start = st["balance_mp"]
        meter.add_pulses(1000)                         # 1 kWh at the new rate
        _wait_balance(han, start - 49000)


def test_command_key_rotation_and_a_new_code_key_on_the_board(meter, issuer):
    """Issue 12: `topup key rotate-commands` (signed by the old command key) and `topup key
    new --code --activate` (SET_CODE_KEY) delivered by `han sync`; the next command is
    signed by the new command key and applies, numbering going on; a keypad code issued
    once the change is confirmed is derived with the new code key and accepted."""
    with meter.han() as han:
        st = han.status()
    old_ck = st["command_kid"]
    r = issuer.cli("key", "rotate-commands")
    assert r.exit_code == 0, r.stdout + r.stderr
    new_ck = r.stdout.split()[3]
    assert "1 command(s) to rotate the command key" in r.stdout, r.stdout
    r = issuer.cli("key", "new", "--code", "--activate")
    assert r.exit_code == 0, r.stdout + r.stderr
    code_takers = "1 command(s) to set code key" in r.stdout
    assert code_takers == bool(st.get("takes_codes")), (st, r.stdout)
    r = issuer.cli("tariff", "set", "--device", issuer.eui, "--standing", "0",
                   "--effective", "now")
    assert r.exit_code == 0, r.stdout + r.stderr
    r = _sync(issuer, meter)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "command 1 (ROTATE_COMMAND_KEY) APPLIED" in r.stdout, r.stdout
    if code_takers:
        assert "command 2 (SET_CODE_KEY) APPLIED" in r.stdout, r.stdout
    assert "(SET_TARIFF) APPLIED" in r.stdout and "0 pending" in r.stdout, r.stdout
    with meter.han() as han:
        st = han.status()
        assert bytes(st["command_kid"]).hex() == new_ck != bytes(old_ck).hex()
        assert st["last_command"] == (3 if code_takers else 2)
    if not code_takers:
        return
    r = issuer.cli("code", issuer.eui, "2.00")
    assert r.exit_code == 0, r.stdout + r.stderr
    code = r.stdout.strip().splitlines()[-1]
    new_code_kid = issuer.conn.execute(
        "SELECT lower(hex(kid)) FROM code_keys WHERE active = 1").fetchone()[0]
    assert issuer.conn.execute("SELECT lower(hex(code_kid)) FROM vouchers WHERE code_kid IS "
                               "NOT NULL ORDER BY sequence DESC LIMIT 1").fetchone()[0] == \
        new_code_kid
    with meter.han() as han:
        receipt, dup = han.submit_code(code.replace(" ", ""))
        assert not dup and pr.parse(receipt).amount == 200
