"""The customer's path on two boards (SPEC.md §8, §9): the PPMID (firmware/ppmid/) on a
second virtual board, its HAN joined to the meter's by the rig's cable; the rig presses
its keys and reads its display, and checks the meter over its own HAN port.

A code typed on the PPMID credits the meter by exactly its amount and reconciles; a typo
says so and does not count; five wrong codes lock code entry and the lock survives a power
cut of the meter (vouchers are still taken); a used code is "already used" with no credit;
an armed supply comes on only when the customer confirms; a PPMID whose meter does not
answer says so and keeps the typed code; garbage on the PPMID's USB serial changes nothing.
"""
import hashlib

import pytest

from protocol import errors, keycode, receipt as receipt_format, voucher

pytestmark = pytest.mark.hil

POUND = "\u00a3"
DASH = "\u2013"


def _grouped(code):
    return keycode.grouped(code)


def _typo(code, at=7):
    """The code with one digit changed: the check digit catches it (SPEC.md §8)."""
    d = (int(code[at]) + 3) % 10
    return code[:at] + str(d) + code[at + 1:]


def _wrong(code, k=1):
    """A code whose check digit fits but whose MAC does not (k-th variant)."""
    body = code[:19]
    last = (int(body[-1]) + k) % 10
    body = body[:-1] + str(last)
    for c in "0123456789":
        if keycode.damm(body + c) == 0:
            return body + c
    raise AssertionError("no check digit")


def _code_ref(code):
    return hashlib.sha256(b"OTU1 code " + code.encode()).digest()[:16]


def _new_receipts(board, han, since):
    return [board.issuer.verify_receipt(raw) for raw in han.receipts(since)]


def test_a_code_typed_on_the_ppmid_credits_exactly_its_amount_and_reconciles(board, han, ppmid, tmp_path):
    st = han.status()
    assert st["takes_codes"] is True
    before, count = st["balance_mp"], st["receipt_count"]
    code = board.issuer.code_cli("12.34")                      # the supplier reads it out
    screen = ppmid.type(_grouped(code) + "#", expect="%s12.34 added" % POUND)
    after = han.status()
    assert after["balance_mp"] == before + 1234 * 1000, (screen, after)
    assert after["receipt_count"] == count + 1
    (r,) = _new_receipts(board, han, count)
    assert r.kind == receipt_format.TOPUP and r.amount == 1234 and r.form == receipt_format.FORM_CODE
    assert r.voucher == _code_ref(code) and r.balance_after == before + 1234000
    ppmid.wait_for("Credit %s%d.%02d" % ((POUND,) + divmod(after["balance_mp"] // 1000, 100)))
    # the text the rig reads is what the firmware drew into its 128x64 framebuffer
    shown = ppmid.board.display(pixels=True)                  # text and pixels of one screen
    px = bytes.fromhex(shown["pixels"])
    assert len(px) == 1024
    lines = shown["text"].split("\n")
    for row in range(8):                     # page `row` of the SSD1306 layout is text line `row`
        assert any(px[row * 128:(row + 1) * 128]) == (lines[row].strip() != ""), (row, lines)
    # the receipts go back to the supplier: the code is redeemed, no anomalies
    out = tmp_path / "r.cbor"
    res = board.issuer.cli("han", "receipts", "--port", board.han_port, "--out", out)
    assert res.exit_code == 0, res.stdout + res.stderr
    res = board.issuer.cli("receipts", "import", out)
    assert res.exit_code == 0, res.stdout + res.stderr
    res = board.issuer.cli("reconcile")
    assert res.exit_code == 0, res.stdout + res.stderr
    status = board.issuer.conn.execute(
        "SELECT status FROM voucher_status WHERE device = ? AND sequence = ?",
        (board.device, r.sequence)).fetchone()
    assert status is not None and status[0] == "redeemed", status


def test_a_typo_shows_the_typo_message_keeps_the_digits_and_does_not_count(board, han, ppmid):
    before = han.status()["balance_mp"]
    (code,) = board.issuer.issue_codes(700)
    screen = ppmid.type(_typo(code) + "#", expect="Typo %s check the code" % DASH)
    assert _grouped(_typo(code))[:14] in screen                # kept on the display, to correct
    st = han.status()
    assert st["code_tries_left"] == 5 and st["balance_mp"] == before
    ppmid.type("D1234#", expect="Incomplete")                  # cleared, 4 digits sent
    assert han.status()["code_tries_left"] == 5
    ppmid.type("D" + code + "#", expect="%s7.00 added" % POUND)
    assert han.status()["balance_mp"] == before + 700000


@pytest.mark.rig("power_cut", "clock")
def test_five_wrong_codes_lock_and_the_lock_survives_a_power_cut_of_the_meter(board, han, ppmid):
    before = han.status()["balance_mp"]
    (good,) = board.issuer.issue_codes(500)
    for k, left in zip(range(1, 5), (4, 3, 2, 1)):
        ppmid.type(_wrong(good, k) + "#", expect="Wrong code %s %d tr" % (DASH, left))
    ppmid.type(_wrong(good, 5) + "#", expect="locked")
    st = han.status()
    assert st["code_tries_left"] == 0 and 3500 < st["code_locked_s"] <= 3600, st
    board.power_cut_kill()                                     # a power cut never resets it
    st = han.status()
    assert 3500 < st["code_locked_s"] <= 3600, st
    ppmid.type(good + "#", expect="Locked 60 min")
    assert han.status()["balance_mp"] == before
    (raw,) = board.issuer.issue(300)                           # vouchers are never locked out
    receipt, dup = han.submit(raw)
    assert not dup and han.status()["balance_mp"] == before + 300000
    board.advance_clock(3600)
    ppmid.type(good + "#", expect="%s5.00 added" % POUND)
    st = han.status()
    standing = board.settings["standing"] * 3600 // 86400      # an hour's standing charge
    assert st["balance_mp"] == before + 800000 - standing and st["code_locked_s"] == 0
    assert st["code_tries_left"] == 5                           # a good code ends the series


def test_a_used_code_shows_already_used_and_adds_nothing(board, han, ppmid):
    (code,) = board.issuer.issue_codes(250)
    ppmid.type(code + "#", expect="%s2.50 added" % POUND)
    st = han.status()
    ppmid.type(code + "#", expect="Already used")
    again = han.status()
    assert again["balance_mp"] == st["balance_mp"] and again["receipt_count"] == st["receipt_count"]


@pytest.mark.meter(initial_credit=0)
def test_a_top_up_from_zero_arms_the_supply_and_b_on_the_ppmid_switches_it_on(board, han, ppmid):
    st = han.status()
    assert st["supply_state"] == 0 and st["supply_on"] is False
    ppmid.wait_for("Supply off")
    (code,) = board.issuer.issue_codes(1000)
    ppmid.type(code + "#", expect="%s10.00 added" % POUND)
    screen = ppmid.wait_for("Press B to switch on")
    assert "Supply armed" in screen
    st = han.status()
    assert st["supply_state"] == 1 and st["supply_on"] is False
    if board.relay() is not None:
        assert board.relay() is False                          # armed: the relay stays open
    ppmid.type("B", expect="Supply on")
    st = han.status()
    assert st["supply_state"] == 2 and st["supply_on"] is True
    if board.relay() is not None:
        import time
        deadline = time.monotonic() + 5
        while board.relay() is not True and time.monotonic() < deadline:
            time.sleep(0.01)
        assert board.relay() is True


def test_a_ppmid_whose_meter_does_not_answer_says_so_and_keeps_the_code(board, han, ppmid):
    before = han.status()["balance_mp"]
    (code,) = board.issuer.issue_codes(400)
    ppmid.cable.unplug()
    screen = ppmid.type(_grouped(code) + "#", expect="Meter not answering", timeout=15)
    assert _grouped(code[:12]) in screen and _grouped(code[12:]) in screen   # still there
    assert han.status()["balance_mp"] == before
    ppmid.cable.plug()
    ppmid.type("#", expect="%s4.00 added" % POUND)               # sent again as it stands
    assert han.status()["balance_mp"] == before + 400000


def test_garbage_on_the_ppmid_serial_gets_an_error_and_changes_nothing(board, han, ppmid):
    st = han.status()
    for junk in ("hello", "OTU1:not base45 at all!", "12ab 3456", "x" * 600):
        assert ppmid.usb(junk).startswith("ERROR "), junk
    assert ppmid.usb(b"\xff\xfe\x80garbage\x01\r\n").startswith("ERROR ")
    assert ppmid.usb("1234 5678").startswith("REFUSED CODE_INCOMPLETE")
    after = han.status()
    assert (after["balance_mp"], after["receipt_count"]) == (st["balance_mp"], st["receipt_count"])
    # ...and the relay still works: a voucher given on USB serial is applied
    (raw,) = board.issuer.issue(150)
    line = ppmid.usb(voucher.to_text(raw))
    assert line.startswith("OK %s1.50 added" % POUND), line
    assert han.status()["balance_mp"] == st["balance_mp"] + 150000
    assert ppmid.usb("status").startswith("STATUS credit")
    ppmid.type("C", expect="Credit %s" % POUND)


def test_the_meters_two_han_ports_never_garble_each_other(board, han):
    """The cable's end (the HAN's second port) and the rig's HAN port at once: every request
    on either is answered (frames from the two are never interleaved)."""
    import threading
    from hil.han_client import HanClient
    from hil.transport import VirtualTransport
    if not isinstance(board.transport, VirtualTransport):
        pytest.skip("the virtual board's HAN has a second port")
    other = HanClient.open(board.transport.board.link_port, timeout=5)
    other._next_id = 30000
    errors_seen = []

    def hammer(client, n):
        try:
            for _ in range(n):
                assert client.status()["device"] == board.device
        except Exception as e:  # noqa: BLE001
            errors_seen.append(e)
    try:
        t = threading.Thread(target=hammer, args=(other, 150))
        t.start()
        hammer(han, 150)
        t.join(60)
    finally:
        other.close()
    assert not errors_seen, errors_seen[:3]


@pytest.mark.meter(initial_credit=50)
def test_emergency_credit_is_taken_with_a_on_the_ppmid(board, han, ppmid):
    ppmid.type("A", expect="Emergency credit %s5.00 on" % POUND)
    st = han.status()
    assert st["emergency_mp"] == 500000 and st["balance_mp"] == 50000
    ppmid.wait_for("Emergency %s5.00" % POUND)
    (r,) = _new_receipts(board, han, st["receipt_count"] - 1)
    assert r.kind == receipt_format.EMERGENCY and r.amount == 500
    ppmid.type("A", expect="Emergency credit not available")   # already in use
    assert han.status()["receipt_count"] == st["receipt_count"]


def test_topup_flash_ppmid_puts_the_ppmid_firmware_on_a_board_that_then_runs_it(board, ppmid):
    """The engineer's command for the customer's device: the same checked copy as the
    meter's, with the PPMID's files; the board boots into the PPMID (its display, its
    status from the meter over the cable)."""
    import contextlib
    import io

    from topup_cli import main
    vb = ppmid.board
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["flash", "--ppmid", "--port", vb.repl_port])
    assert code == 0, out.getvalue()
    assert "all verified" in out.getvalue()
    assert (vb.fs_dir / "lib" / "ppmid" / "app.mpy").is_file()
    assert not (vb.fs_dir / "lib" / "meter").exists()        # a PPMID carries no meter ledger
    gen = vb.display()["gen"]
    vb.hard_reset()
    ppmid.wait_for("Credit " + POUND, timeout=15, since=gen)
