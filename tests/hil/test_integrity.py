"""The credit-integrity suite: the meter firmware on the board under test (the virtual board
in `make test`; a bench board with `--board /dev/ttyUSB0 --han-port … --rig …`), driven over
its HAN like a PPMID, with vouchers from the supplier's real code and `topup` CLI. After each
step the board's balance, supply, window and receipts must be what the host-side model
(hil/rig.py) says: credit = opening + Σ applied − metered, every receipt verified with the
meter key registered at provisioning, the chain intact, no voucher applied twice.

Tests that need a control the bench lacks skip with the reason (`rig` marker)."""
import time

import nacl.signing
import pytest

from hil.pytest_plugin import OTHER_DEVICE
from protocol import cose, errors, receipt as receipt_format, voucher as pv

pytestmark = pytest.mark.hil


def test_wan_down_voucher_from_topup_cli_is_applied_over_the_han(board, han, meter):
    """The whole story: WAN down, the supplier issues with `topup issue`, the PPMID submits
    over the HAN, credit and supply are right, the receipt verifies with the registered key."""
    if board.has("wan"):
        board.set_wan(False)
    st = han.status()
    assert st["wan_up"] is False and st["device"] == board.device
    assert st["balance_mp"] == board.opening_mp and st["receipt_count"] == 0
    # the real CLI, on the supplier's database: text form on stdout
    v1, v2 = meter.issue(1250, count=2, cli=True)
    assert pv.parse(v1).sequence == 1 and pv.parse(v2).sequence == 2
    outcome, raw = meter.submit(v1)
    assert outcome == "applied"
    r = board.issuer.verify_receipt(raw)            # the meter key from `topup device show`
    assert (r.kind, r.index, r.sequence, r.amount) == (receipt_format.TOPUP, 0, 1, 1250)
    assert r.balance_after - r.balance_before == 1250000
    assert r.voucher == pv.reference(v1)
    meter.submit(v2)
    st = meter.settle()
    assert st["balance_mp"] == board.opening_mp + 2500000 and st["supply_on"] is True
    assert st["highest_sequence"] == 2 and st["receipt_count"] == 2 and st["wan_up"] is False
    if board.relay() is not None:
        assert board.relay() is True
    # the registry the CLI reads knows the meter's receipt key
    shown = board.issuer.cli("device", "show", board.issuer.eui)
    assert shown.exit_code == 0 and board.public_key.hex() in shown.stdout


def test_topup_han_commands_submit_and_read_receipts(board, meter):
    """`topup han submit` / `han receipts` / `han status` against the board's HAN port."""
    (raw,) = meter.issue(700)
    text = pv.to_text(raw)
    model = meter.model.submit(raw)
    r = board.issuer.cli("han", "submit", "--port", board.han_port, text)
    assert r.exit_code == 0, r.stderr
    assert "APPLIED: receipt 0, sequence 1, £7.00 added" in r.stdout
    r = board.issuer.cli("han", "submit", "--port", board.han_port, text)
    assert r.exit_code == 0 and "ALREADY APPLIED (original receipt)" in r.stdout
    meter.model.submit(raw)
    assert model == ("applied", 0)
    r = board.issuer.cli("han", "receipts", "--port", board.han_port)
    assert r.exit_code == 0 and "top-up" in r.stdout and "seq 1, £7.00" in r.stdout
    r = board.issuer.cli("han", "status", "--port", board.han_port)
    assert r.exit_code == 0 and "highest sequence  1" in r.stdout and "receipts          1" in r.stdout
    meter.settle()


def test_out_of_order_inside_the_window(meter):
    vouchers = meter.issue(100, count=6)
    for i in (5, 2, 0, 4, 1, 3):
        assert meter.submit(vouchers[i])[0] == "applied"
    st = meter.settle()
    assert st["highest_sequence"] == 6 and st["receipt_count"] == 6
    assert sorted(meter.books.applied) == [1, 2, 3, 4, 5, 6]


def test_resubmission_returns_the_same_receipt_and_changes_nothing(meter, han):
    a, b = meter.issue(300, count=2)
    _, first = meter.submit(a)
    meter.submit(b)
    before = meter.settle()
    for _ in range(3):
        outcome, again = meter.submit(a)
        assert outcome == "duplicate" and again == first
    receipt, dup = han.submit(b)
    meter.model.submit(b)
    assert dup and receipt == meter.books.receipts[1].raw
    after = meter.settle()
    assert after == before


@pytest.mark.meter(initial_credit=1000, max_voucher=5000, max_credit=6000)
def test_bad_vouchers_are_rejected_with_their_reason_and_no_credit_change(board, meter):
    iss = board.issuer
    # a sequence used, then vouchers that must each be refused for one reason
    vouchers = meter.issue(500, count=70)
    for raw in (vouchers[69], vouchers[10]):           # sequence 70; 11 still inside the window
        assert meter.submit(raw)[0] == "applied"
    before = meter.settle()
    good = vouchers[20]
    tampered = bytearray(good)
    tampered[-10] ^= 0x01                             # a bit of the signature
    payload_flip = bytearray(good)
    payload_flip[good.index(b"\x02\x15", 17) + 1] = 0x16   # the signed sequence 21 → 22
    stranger = nacl.signing.SigningKey(bytes(range(101, 133)))   # a key this meter does not trust
    foreign = pv.encode(cose.kid_for(bytes(stranger.verify_key)), lambda m: stranger.sign(m).signature,
                        board.device, 71, 100, int(time.time()))
    cases = [
        (bytes(tampered), errors.BAD_SIGNATURE),
        (bytes(payload_flip), errors.BAD_SIGNATURE),
        (b"\xd2\x84" + good[2:-1], errors.MALFORMED),  # truncated
        (foreign, errors.UNKNOWN_KEY),
        (iss.sign(72, 100, device=OTHER_DEVICE), errors.WRONG_DEVICE),
        (iss.sign(73, 5001), errors.OVER_VOUCHER_LIMIT),
        (vouchers[4], errors.STALE),                   # sequence 5 < 70 − 64
        (iss.sign(11, 400), errors.SEQUENCE_REUSED),   # a different voucher on a used sequence
        (iss.sign(74, 4600), errors.OVER_CREDIT_LIMIT),  # 10 + 10 + 46 > 60
    ]
    if board.has("clock"):
        cases.append((iss.sign(75, 100, expires=board.clock() - 1, issued=board.clock() - 100),
                      errors.EXPIRED))
    for raw, reason in cases:
        outcome, got = meter.submit(raw)
        assert (outcome, got) == ("rejected", reason), (errors.name(got) if outcome == "rejected" else outcome,
                                                       errors.name(reason))
        st = meter.settle()
        assert st == before, "a rejected voucher changed the meter"
    # the window's edge: sequence 6 = 70 − 64 is still inside it, and new
    assert meter.submit(vouchers[5])[0] == "applied"
    assert meter.settle()["balance_mp"] == before["balance_mp"] + 500000


@pytest.mark.rig("pulses")
@pytest.mark.meter(initial_credit=50)
def test_supply_interrupted_at_zero_credit_and_restored_by_a_topup(board, meter):
    rate = board.settings["unit_rate"]
    wh = -(-50 * 1000 * 1000 // rate)                 # the first Wh count that exhausts 50 p
    meter.pulses(wh - 1)
    st = meter.settle()
    assert st["supply_on"] is True and 0 < st["balance_mp"] <= rate // 1000 + 1
    meter.pulses(1)
    st = meter.settle()
    assert st["supply_on"] is False and st["balance_mp"] <= 0
    if board.relay() is not None:
        assert board.relay() is False
    (raw,) = meter.issue(200)
    meter.submit(raw)
    st = meter.settle()
    assert st["supply_on"] is True and st["balance_mp"] > 0
    if board.relay() is not None:
        assert board.relay() is True


@pytest.mark.rig("pulses", "button")
@pytest.mark.meter(initial_credit=50)
def test_emergency_credit_by_button_keeps_the_supply_on_until_repaid(board, meter):
    meter.button()                                   # 50 p < £1: granted
    st = meter.settle()
    assert st["emergency_mp"] == 500000 and st["receipt_count"] == 1
    assert meter.books.receipts[0].kind == receipt_format.EMERGENCY
    meter.button()                                   # already in use: refused, nothing written
    assert meter.settle()["receipt_count"] == 1
    meter.pulses(5000)                               # 122.5 p: balance −72.5 p, supply still on
    st = meter.settle()
    assert st["balance_mp"] < 0 and st["supply_on"] is True
    (raw,) = meter.issue(100)                        # repays the hole: emergency credit cleared
    meter.submit(raw)
    st = meter.settle()
    assert st["balance_mp"] > 0 and st["emergency_mp"] == 0


@pytest.mark.rig("pulses")
def test_metering_from_pulses_is_exact_to_the_milli_penny(board, meter):
    rate = board.settings["unit_rate"]
    total = 0
    for n in (1, 3, 7, 40, 1234):
        meter.pulses(n)
        total += n
        st = meter.settle()
        standing = meter.model.metered_mp - total * rate // 1000     # 0 unless the clock moved
        assert st["balance_mp"] == board.opening_mp - total * rate // 1000 - standing
    assert total * rate // 1000 == 1285 * 24500 // 1000 == 31482


@pytest.mark.rig("pulses", "clock")
def test_standing_charge_and_checkpoint_survive_a_reboot(board, meter):
    meter.advance(3600)                               # 2.5 p of standing charge: checkpointed (15 min)
    st = meter.settle()
    assert st["balance_mp"] == board.opening_mp - 3600 * board.settings["standing"] // 86400
    meter.pulses(100)                                 # 2.45 p, unsaved (under 20 p, no time passed)
    meter.settle()
    meter.reboot()                                    # loses the unsaved pulses, never the standing charge
    st = meter.settle()
    assert st["balance_mp"] == board.opening_mp - 3600 * board.settings["standing"] // 86400
    meter.pulses(900)                                 # 22.05 p: checkpointed at once
    meter.settle()
    meter.reboot()
    meter.settle()


@pytest.mark.rig("wan")
def test_wan_state_is_reported_and_vouchers_work_either_way(board, meter, han):
    for up in (True, False, True):
        board.set_wan(up)
        deadline = time.monotonic() + 3
        while han.status()["wan_up"] is not up and time.monotonic() < deadline:
            time.sleep(0.01)
        assert han.status()["wan_up"] is up
        (raw,) = meter.issue(100)
        assert meter.submit(raw)[0] == "applied"
        meter.settle()
    board.set_wan(False)


@pytest.mark.rig("reboot")
def test_credit_and_receipts_survive_a_reboot(meter):
    for raw in meter.issue(150, count=3):
        meter.submit(raw)
    before = meter.settle()
    meter.reboot()
    assert meter.settle() == before
    meter.check(full=True)


@pytest.mark.rig("power_cut")
def test_power_cut_by_kill_mid_traffic_credit_is_old_or_new_never_twice(meter):
    vouchers = meter.issue(100, count=8)
    landed = []
    for i, raw in enumerate(vouchers):
        ok, res = meter.power_cut("kill", action=("submit", raw), delay=0.008 * i)
        landed.append(ok)
        # the PPMID retries whatever it did not see answered: applied exactly once
        outcome, _ = meter.submit(raw)
        assert outcome == ("duplicate" if ok else "applied")
        meter.settle()
    meter.check(full=True)
    assert sorted(meter.books.applied) == list(range(1, 9))


@pytest.mark.rig("flash_cut")
def test_power_cut_at_every_flash_write_of_a_topup(meter):
    """cut_after(n) for n = 0, 1, 2 … until the top-up completes without a cut: at every
    write the credit comes back old or new, and a retry applies it exactly once."""
    n = 0
    while True:
        (raw,) = meter.issue(100 + n)
        landed, res = meter.power_cut("flash", n=n, action=("submit", raw))
        if not res.cut:
            break
        outcome, _ = meter.submit(raw)
        assert outcome == ("duplicate" if landed else "applied")
        meter.settle()
        n += 1
        assert n < 40, "a top-up that never stops writing"
    assert n >= 2, "a top-up writes a receipt and a state record: at least two flash operations"
    meter.check(full=True)


@pytest.mark.rig("flash_cut", "pulses")
def test_power_cut_during_a_metering_checkpoint_loses_only_unsaved_metering(meter):
    for n in range(3):
        meter.power_cut("flash", n=n, action=("pulses", 1000))   # 24.5 p: a checkpoint
    meter.pulses(10)
    meter.settle()
    meter.check(full=True)


@pytest.mark.rig("flash_cut", "button")
@pytest.mark.meter(initial_credit=50)
def test_power_cut_at_every_flash_write_of_emergency_credit_and_of_a_rejection(board, meter):
    for n in range(4):                                # the emergency-credit receipt and state
        landed, res = meter.power_cut("flash", n=n, action=("button",))
        if not res.cut:
            break
    st = meter.settle()
    assert st["emergency_mp"] == 500000 and meter.books.receipts[st["receipt_count"] - 1].kind == 2
    bad = board.issuer.sign(5, 99999)                  # refused: no flash write, no credit change
    landed, res = meter.power_cut("flash", n=0, action=("submit", bad))
    assert not res.cut
    meter.check(full=True)


@pytest.mark.rig("power_cut")
@pytest.mark.meter(initial_credit=0, max_credit=100000)
def test_topups_through_flash_ring_reclaims_with_power_cuts(board, meter):
    """Enough top-ups for the store's ring of erase blocks to wrap and reclaim blocks (live
    receipts copied forward, the oldest block erased), with power cuts among them — a flash cut where the
    bench has one, else a kill: every receipt still verifies, the chain is unbroken, and the
    credit is the sum of what was applied."""
    vb = getattr(board.transport, "board", None)        # the virtual board's flash counters
    erases0 = vb.counters()["erases"] if vb is not None else None
    vouchers = meter.issue(1, count=240)
    for i, raw in enumerate(vouchers):
        if i % 37 == 36:
            if board.has("flash_cut"):
                landed, _ = meter.power_cut("flash", n=i % 5, action=("submit", raw))
            else:
                landed, _ = meter.power_cut("kill", action=("submit", raw), delay=0.01 * (i % 5))
            if not landed:
                assert meter.submit(raw)[0] == "applied"
        else:
            assert meter.submit(raw)[0] == "applied"
        if i % 8 == 7:
            meter.settle()
    st = meter.settle()
    assert st["balance_mp"] == 240 * 1000 and st["highest_sequence"] == pv.parse(vouchers[-1]).sequence
    assert st["receipt_count"] == 240 and len(meter.books.applied) == 240
    if erases0 is not None:
        assert vb.counters()["erases"] - erases0 >= 4, "no block of the ring was reclaimed"
    meter.reboot()
    meter.check(full=True)
