"""The credit-integrity suite: the meter firmware on the board under test (the virtual board
in `make test`; a bench board with `--board /dev/ttyUSB0 --han-port … --rig …`), driven over
its HAN like a PPMID, with vouchers from the supplier's real code and `topup` CLI. After each
step the board's balance, supply, window and receipts must be what the host-side model
(hil/rig.py) says: credit = opening + Σ applied − metered, every receipt verified with the
meter key registered at provisioning, the chain intact, no voucher applied twice.

Every test runs twice: with a board clock that survives power cuts (a battery-backed RTC)
and with one that restarts from 2000-01-01 at every power-on (an ESP32 without a battery),
where meter time resumes from its floor (SPEC.md §7). A bench board runs the variant its rig
file says it is.

The board carries its receipt count and sequence floor across the factory reset each test
starts with, so indices and sequences are relative to what the meter reported at
provisioning (`board.public_key.first_index`, `.floor`).

Tests that need a control the bench lacks skip with the reason (`rig` marker)."""
import re
import time

import nacl.signing
import pytest

from hil.pytest_plugin import OTHER_DEVICE
from hil.rig import LOST_CLOCK, MAX_SIGNED_STEP, find_records, newest_record
from protocol import cbor, cose, errors, han as han_proto, receipt as receipt_format, voucher as pv

pytestmark = pytest.mark.hil


@pytest.fixture(params=["rtc", "no-rtc"])
def board_clock(request):
    """The board's clock through a power cut: kept (a battery-backed RTC) or lost."""
    return request.param


def _first(board):
    return board.public_key.first_index


def _seq0(board):
    """The sequence before this test's first voucher: the meter's floor."""
    return board.public_key.floor


def test_wan_down_voucher_from_topup_cli_is_applied_over_the_han(board, han, meter):
    """The whole story: WAN down, the supplier issues with `topup issue`, the PPMID submits
    over the HAN, credit and supply are right, the receipt verifies with the registered key."""
    if board.has("wan"):
        board.set_wan(False)
    st = han.status()
    first, seq0 = _first(board), _seq0(board)
    assert st["wan_up"] is False and st["device"] == board.device
    assert st["balance_mp"] == board.opening_mp and st["receipt_count"] == first
    assert st["floor"] == seq0 and st["highest_sequence"] == 0
    # the real CLI, on the supplier's database: text form on stdout
    v1, v2 = meter.issue(1250, count=2, cli=True)
    assert pv.parse(v1).sequence == seq0 + 1 and pv.parse(v2).sequence == seq0 + 2
    outcome, raw = meter.submit(v1)
    assert outcome == "applied"
    r = board.issuer.verify_receipt(raw)            # the meter key from `topup device show`
    assert (r.kind, r.index, r.sequence, r.amount) == (receipt_format.TOPUP, first, seq0 + 1, 1250)
    assert r.balance_after - r.balance_before == 1250000
    assert r.voucher == pv.reference(v1) and r.prev == bytes(32)    # a new key: a new epoch
    meter.submit(v2)
    st = meter.settle()
    assert st["balance_mp"] == board.opening_mp + 2500000 and st["supply_on"] is True
    assert st["highest_sequence"] == seq0 + 2 and st["receipt_count"] == first + 2
    assert st["wan_up"] is False
    if board.relay() is not None:
        assert board.relay() is True
    # the registry the CLI reads knows the meter's receipt key
    shown = board.issuer.cli("device", "show", board.issuer.eui)
    assert shown.exit_code == 0 and board.public_key.hex() in shown.stdout


def test_topup_han_commands_submit_and_read_receipts(board, meter):
    """`topup han submit` / `han receipts` / `han status` against the board's HAN port."""
    first, seq = _first(board), _seq0(board) + 1
    (raw,) = meter.issue(700)
    text = pv.to_text(raw)
    r = board.issuer.cli("han", "submit", "--port", board.han_port, text)
    assert r.exit_code == 0, r.stderr
    assert "APPLIED: receipt %d, sequence %d, £7.00 added" % (first, seq) in r.stdout
    meter.follow_submit(raw, ("applied", first))
    r = board.issuer.cli("han", "submit", "--port", board.han_port, text)
    assert r.exit_code == 0 and "ALREADY APPLIED (original receipt)" in r.stdout
    meter.follow_submit(raw, ("duplicate", first))
    r = board.issuer.cli("han", "receipts", "--port", board.han_port)
    assert r.exit_code == 0 and "top-up" in r.stdout and "seq %d, £7.00" % seq in r.stdout
    r = board.issuer.cli("han", "status", "--port", board.han_port)
    assert r.exit_code == 0
    assert re.search(r"highest sequence\s+%d$" % seq, r.stdout, re.M), r.stdout
    assert re.search(r"receipts\s+%d$" % (first + 1), r.stdout, re.M), r.stdout
    meter.settle()


def test_out_of_order_inside_the_window(board, meter):
    vouchers = meter.issue(100, count=6)
    for i in (5, 2, 0, 4, 1, 3):
        assert meter.submit(vouchers[i])[0] == "applied"
    st = meter.settle()
    seq0 = _seq0(board)
    assert st["highest_sequence"] == seq0 + 6 and st["receipt_count"] == _first(board) + 6
    assert sorted(meter.books.applied) == [seq0 + i for i in range(1, 7)]


def test_resubmission_returns_the_same_receipt_and_changes_nothing(meter, han):
    a, b = meter.issue(300, count=2)
    _, first = meter.submit(a)
    meter.submit(b)
    before = meter.settle()
    for _ in range(3):
        outcome, again = meter.submit(a)
        assert outcome == "duplicate" and again == first
    receipt, dup = han.submit(b)
    index = receipt_format.parse(receipt).index
    meter.follow_submit(b, ("duplicate", index))
    assert dup and receipt == meter.books.receipts[index].raw
    after = meter.settle()
    assert after == before


def _resigned_payload(raw, **changes):
    """The voucher's signature over a payload with other fields: BAD_SIGNATURE."""
    msg = cose.decode(raw)
    v = pv.parse(raw)
    fields = {"device": v.device, "sequence": v.sequence, "amount": v.amount, "issued": v.issued,
              "expires": v.expires}
    fields.update(changes)
    payload = pv.encode_payload(fields["device"], fields["sequence"], fields["amount"],
                                fields["issued"], fields["expires"])
    return cbor.encode(cbor.Tag(cose.TAG_SIGN1, [msg.protected, {}, payload, msg.signature]))


@pytest.mark.meter(initial_credit=1000, max_voucher=5000, max_credit=6000)
def test_bad_vouchers_are_rejected_with_their_reason_and_no_credit_change(board, meter):
    iss = board.issuer
    s0 = _seq0(board)
    # a sequence used, then vouchers that must each be refused for one reason
    vouchers = meter.issue(500, count=70)
    for raw in (vouchers[69], vouchers[10]):           # sequence 70; 11 still inside the window
        assert meter.submit(raw)[0] == "applied"
    before = meter.settle()
    good = vouchers[20]
    tampered = bytearray(good)
    tampered[-10] ^= 0x01                             # a bit of the signature
    payload_flip = _resigned_payload(good, sequence=s0 + 22)   # the signed sequence 21 → 22
    stranger = nacl.signing.SigningKey(bytes(range(101, 133)))   # a key this meter does not trust
    foreign = pv.encode(cose.kid_for(bytes(stranger.verify_key)), lambda m: stranger.sign(m).signature,
                        board.device, s0 + 71, 100, int(time.time()))
    cases = [
        (bytes(tampered), errors.BAD_SIGNATURE),
        (payload_flip, errors.BAD_SIGNATURE),
        (b"\xd2\x84" + good[2:-1], errors.MALFORMED),  # truncated
        (foreign, errors.UNKNOWN_KEY),
        (iss.sign(s0 + 72, 100, device=OTHER_DEVICE), errors.WRONG_DEVICE),
        (iss.sign(s0 + 73, 5001), errors.OVER_VOUCHER_LIMIT),
        (vouchers[4], errors.STALE),                   # sequence 5 < 70 − 64
        (iss.sign(s0 + 11, 400), errors.SEQUENCE_REUSED),   # another voucher on a used sequence
        (iss.sign(s0 + 74, 4600), errors.OVER_CREDIT_LIMIT),  # 10 + 10 + 46 > 60
    ]
    if s0:
        cases.append((iss.sign(s0, 100), errors.STALE))        # at the floor: never again
    if board.has("clock"):
        cases.append((iss.sign(s0 + 75, 100, expires=board.clock() - 1, issued=board.clock() - 100),
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
    assert st["supply_state"] == 0                    # interrupted (SPEC §9)
    (raw,) = meter.issue(200)
    outcome, receipt = meter.submit(raw)
    st = meter.settle()
    # a top-up from zero arms the supply; it does not come on by itself
    assert st["supply_state"] == 1 and st["supply_on"] is False and st["balance_mp"] > 0
    assert board.issuer.verify_receipt(receipt).supply == 1
    if board.relay() is not None:
        assert board.relay() is False
    meter.pulses(10)                                  # metering goes on; still armed
    assert meter.settle()["supply_state"] == 1
    if board.has("button"):
        meter.button()                                # the customer confirms: on
    else:
        meter.action(1)
    st = meter.settle()
    assert st["supply_state"] == 2 and st["supply_on"] is True
    if board.relay() is not None:
        assert board.relay() is True


@pytest.mark.meter(initial_credit=0)
def test_a_meter_provisioned_without_credit_starts_interrupted_and_the_ppmid_confirms(board, meter):
    st = meter.settle()
    assert st["supply_state"] == 0 and st["supply_on"] is False
    assert meter.action(1) == ("supply", 0)           # nothing armed: nothing changes
    (raw,) = meter.issue(100)
    meter.submit(raw)
    assert meter.settle()["supply_state"] == 1
    assert meter.action(1) == ("supply", 2)           # the PPMID's confirm (HAN action 1)
    st = meter.settle()
    assert st["supply_on"] is True
    if board.relay() is not None:
        assert board.relay() is True


@pytest.mark.rig("pulses", "button")
@pytest.mark.meter(initial_credit=50)
def test_emergency_credit_by_button_keeps_the_supply_on_until_repaid(board, meter):
    first = _first(board)
    meter.button()                                   # 50 p < £1: granted
    st = meter.settle()
    assert st["emergency_mp"] == 500000 and st["receipt_count"] == first + 1
    assert meter.books.receipts[first].kind == receipt_format.EMERGENCY
    meter.button()                                   # already in use: refused, nothing written
    assert meter.settle()["receipt_count"] == first + 1
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
    after = meter.settle()
    if meter.board.clock() is None:
        # A bench's clock runs: a voucher issued in the second after the meter's clock read
        # moves meter time past it (SPEC §7), and a reboot inside that second finds the board
        # clock behind the floor and resumes from it -- as the rules say; the model follows.
        for k in ("meter_time", "clock_resumed"):
            before.pop(k, None)
            after.pop(k, None)
    assert after == before
    meter.check(full=True)


@pytest.mark.rig("power_cut")
def test_power_cut_by_kill_mid_traffic_credit_is_old_or_new_never_twice(board, meter):
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
    assert sorted(meter.books.applied) == [_seq0(board) + i for i in range(1, 9)]


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
    bad = board.issuer.sign(_seq0(board) + 5, 99999)   # refused: no flash write, no credit change
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
    assert st["receipt_count"] == _first(board) + 240 and len(meter.books.applied) == 240
    if erases0 is not None:
        assert vb.counters()["erases"] - erases0 >= 4, "no block of the ring was reclaimed"
    meter.reboot()
    meter.check(full=True)


# --- issue 8: faults that are not clean power cuts ------------------------------------------
@pytest.mark.rig("clock", "power_cut")
def test_meter_time_across_a_cut_and_a_voucher_issued_ahead_of_it(board, board_clock, meter):
    """SPEC.md §7: with a battery-backed RTC the time across a cut is charged; without one
    the board's clock restarts from 2000-01-01, meter time resumes at the floor (the time of
    the last commit) and what it cannot account for is not charged.  A voucher issued ahead
    of meter time moves it on, at most 7 days, uncharged; the receipt has the time before."""
    standing = board.settings["standing"]
    meter.advance(3600)                               # an hour: charged, checkpointed (15 min)
    saved = meter.settle()
    assert saved["balance_mp"] == board.opening_mp - 3600 * standing // 86400
    meter.advance(600)                                # ten minutes more, not yet saved
    unsaved = meter.settle()
    assert unsaved["balance_mp"] == board.opening_mp - 4200 * standing // 86400
    meter.power_cut("kill")
    st = meter.settle()
    if board_clock == "no-rtc":
        assert board.board_clock() == LOST_CLOCK         # the board's clock is back in 2000
        assert st["clock_resumed"] is True and st["meter_time"] == saved["meter_time"]
        assert st["balance_mp"] == saved["balance_mp"]   # the ten minutes are not charged
    else:
        assert st["clock_resumed"] is False and st["meter_time"] == board.board_clock()
        assert st["balance_mp"] == unsaved["balance_mp"]  # the time across the cut is charged
    # a voucher issued ten days ahead of meter time (the supplier's clock is right)
    iss = board.issuer
    saved, ahead = iss.clock, st["meter_time"] + 10 * 86400
    iss.clock = lambda: ahead
    try:
        (raw,) = meter.issue(100)
    finally:
        iss.clock = saved
    outcome, receipt = meter.submit(raw)
    assert outcome == "applied"
    assert board.issuer.verify_receipt(receipt).time == st["meter_time"]
    after = meter.settle()
    assert after["meter_time"] == st["meter_time"] + MAX_SIGNED_STEP       # on by 7 days, no more
    assert after["balance_mp"] == st["balance_mp"] + 100000                 # and not charged
    meter.power_cut("kill")                           # the step was saved with the next commit:
    st = meter.settle()                               # the board's clock is behind it now
    assert st["clock_resumed"] is True and st["meter_time"] == after["meter_time"]
    assert st["balance_mp"] == after["balance_mp"]


@pytest.mark.rig("clock")
def test_bad_signatures_pause_signature_checks_and_busy_is_never_counted(board, meter):
    """SPEC.md §5.2: from the 3rd bad signature in a row, signature checks pause for 1, 2, 4
    … s; meanwhile a voucher under a trusted key is answered BUSY, which is not a verdict
    (not counted), and an applied voucher still gets its original receipt; a signature that
    verifies ends the run."""
    good, other = meter.issue(100, count=2)
    assert meter.submit(good)[0] == "applied"
    forged = [_resigned_payload(other, amount=2000 + i) for i in range(4)]
    for raw in forged[:3]:
        assert meter.submit(raw) == ("rejected", errors.BAD_SIGNATURE)
    assert meter.submit(other) == ("rejected", errors.BUSY)        # paused 1 s; the clock stands still
    assert meter.submit(forged[3]) == ("rejected", errors.BUSY)
    assert meter.submit(good)[0] == "duplicate"                    # the original receipt, even now
    meter.advance(1)
    assert meter.submit(forged[3]) == ("rejected", errors.BAD_SIGNATURE)   # the 4th: 2 s
    assert meter.submit(other) == ("rejected", errors.BUSY)
    meter.advance(2)
    assert meter.submit(other)[0] == "applied"                     # it verifies: the run is over
    for raw in forged[:2]:
        assert meter.submit(raw) == ("rejected", errors.BAD_SIGNATURE)
    (third,) = meter.issue(100)
    assert meter.submit(third)[0] == "applied"                     # 2 in a row: no pause
    meter.advance(3600)                                            # the hourly rejections receipt
    st = meter.settle()
    r = meter.books.receipts[st["receipt_count"] - 1]
    assert r.kind == receipt_format.REJECTIONS and r.rejections == {errors.BAD_SIGNATURE: 6}


@pytest.mark.rig("pulses")
def test_a_factory_reset_then_old_vouchers_replayed_are_refused_and_reconcile(board, meter):
    """Vouchers applied and vouchers never applied before a factory reset are all STALE after
    it (the floor, SPEC.md §2.2); receipt indices go on under the new key, its first receipt
    opens a new chain; the supplier reconciles both epochs with zero anomalies."""
    from host import reconcile
    iss = board.issuer
    applied = meter.issue(300, count=3)
    for raw in applied:
        assert meter.submit(raw)[0] == "applied"
    unused = meter.issue(200, count=2)                # issued, never applied
    meter.pulses(500)
    st = meter.settle()
    old_first, old_key = board.public_key.first_index, bytes(board.public_key)
    key = meter.factory_reset(initial_credit=400)     # hil.flashing.provision: a new key epoch
    top = max(pv.parse(r).sequence for r in applied + unused)
    assert key.floor == top and key.first_index == st["receipt_count"] == old_first + 3
    assert bytes(key) != old_key and iss.record.key_count == 2
    for raw in applied + unused:                      # every one refused, nothing written
        assert meter.submit(raw) == ("rejected", errors.STALE)
    st = meter.settle()
    assert st["receipt_count"] == key.first_index and st["floor"] == top
    assert st["balance_mp"] == 400000 and st["highest_sequence"] == 0
    (fresh,) = meter.issue(500)
    assert pv.parse(fresh).sequence == top + 1
    outcome, raw = meter.submit(fresh)
    r = iss.verify_receipt(raw)                       # with the new key: its span
    assert outcome == "applied" and r.index == key.first_index and r.prev == bytes(32)
    assert r.kid == cose.kid_for(bytes(key))
    meter.check(full=True)
    # the supplier imports every receipt of both epochs and reconciles: clean
    receipts = [meter.books.receipts[i].raw for i in sorted(meter.books.receipts)]
    reconcile.import_raw(iss.conn, receipts, "reset test")
    reconcile.reconcile(iss.conn)
    assert iss.conn.execute("SELECT kind, receipt_index, detail FROM anomalies").fetchall() == []
    status = dict(iss.conn.execute("SELECT sequence, status FROM voucher_status"))
    want = {pv.parse(v).sequence: "redeemed" for v in applied + [fresh]}
    want.update({pv.parse(v).sequence: "stale" for v in unused})
    assert status == want


def _flip(kind, byte_at=None, bit=4):
    """An edit of the flash image: one bit of the newest record of this kind, in the middle
    of its payload (firmware/meter/records.py's format)."""
    def edit(image):
        off, ln = newest_record(image, kind)
        image[off + 20 + (ln // 2 if byte_at is None else byte_at)] ^= 1 << bit
    return edit


@pytest.mark.rig("flash_edit")
def test_a_flipped_bit_in_state_and_in_config_is_reported_and_the_credit_kept(board, meter):
    """One bit of the newest state record, then of a configuration copy, flipped with the
    power off: the meter repairs it, reports it (status field 9, a kind-4 receipt), keeps
    its credit and its identity, and goes on taking top-ups (SPEC.md §4.1)."""
    for raw in meter.issue(250, count=2):
        assert meter.submit(raw)[0] == "applied"
    before = meter.settle()
    meter.expect_faults = {1: 1}                      # a record repaired
    meter.power_cycle(_flip("state"))
    st = meter.settle()
    assert st["faults"] == {1: 1} and st["damaged"] is False and st["device"] == board.device
    assert st["balance_mp"] == before["balance_mp"]
    r = meter.books.receipts[st["receipt_count"] - 1]
    assert r.kind == receipt_format.FAULT and r.faults == {1: 1}
    (raw,) = meter.issue(100)
    assert meter.submit(raw)[0] == "applied"
    meter.reboot()                                    # reported again, recorded once
    st = meter.settle()
    assert st["faults"] == {1: 1}
    count = st["receipt_count"]
    meter.expect_faults = None                        # whatever the store finds: checked below
    meter.power_cycle(_flip("config", bit=1))
    st = meter.settle()
    # the config copy repaired (1) and reported as a config fault (3); the state record
    # flipped before is still on the flash, repaired again at each start (1)
    assert st["faults"] == {1: 2, 3: 1}, st["faults"]
    assert st["damaged"] is False and st["device"] == board.device
    r = meter.books.receipts[st["receipt_count"] - 1]
    assert st["receipt_count"] == count + 1 and r.kind == receipt_format.FAULT and r.faults == st["faults"]
    (raw,) = meter.issue(100)
    assert meter.submit(raw)[0] == "applied"
    meter.check(full=True)


@pytest.mark.rig("flash_edit")
def test_a_receipt_lost_to_flash_damage_is_reported_and_its_voucher_never_applies_again(board, meter):
    """A top-up receipt destroyed on the flash (beyond a one-bit repair): the meter reports
    it (fault 4, a kind-4 receipt), keeps its credit, and answers that voucher RECEIPT_LOST,
    never applying it again (SPEC.md §2.1, §4.1)."""
    raws = meter.issue(300, count=3)
    for raw in raws:
        assert meter.submit(raw)[0] == "applied"
    before = meter.settle()
    first = _first(board)

    def destroy(image):
        hit = [off for off, kind, _, idx, _ in find_records(image) if kind == "receipt" and idx == first]
        assert hit, "receipt %d is not on the flash" % first
        for off in hit:
            image[off + 30:off + 46] = bytes(16)
    meter.expect_faults = None
    meter.power_cycle(destroy)
    meter.receipts_lost(first)
    st = meter.settle()
    assert st["faults"] == {2: 1, 4: 1}, st["faults"]              # a record lost: a kept receipt
    assert st["damaged"] is False
    assert st["balance_mp"] == before["balance_mp"]
    r = meter.books.receipts[st["receipt_count"] - 1]
    assert r.kind == receipt_format.FAULT and r.faults == st["faults"]
    assert meter.submit(raws[0]) == ("rejected", errors.RECEIPT_LOST)
    assert meter.submit(raws[1])[0] == "duplicate"                  # the others: their receipts
    (fresh,) = meter.issue(100)
    assert meter.submit(fresh)[0] == "applied"
    meter.reboot()                                                  # reported again, recorded once
    assert meter.settle()["faults"] == st["faults"]


@pytest.mark.rig("pulses", "clock", "relay")
@pytest.mark.meter(initial_credit=200)
def test_a_han_flood_holds_up_neither_metering_nor_the_supply_cut(board, meter):
    """While a second HAN connection floods the meter with submits of forged vouchers under
    the trusted key (plus status requests and garbage), pulses and an hour and more of meter
    time drain the credit: the supply is cut at zero as the model says, the balance is exact
    afterwards, and the signature back-off kept the checks few (SPEC.md §5.2)."""
    iss = board.issuer
    s0 = _seq0(board)
    forged = [_resigned_payload(iss.sign(s0 + 100 + i, 100), amount=2000 + i) for i in range(8)]
    frames = [b"\x00" + han_proto.encode_message(han_proto.SUBMIT, 0xF000 + i, {1: raw})
              for i, raw in enumerate(forged)]
    frames.append(b"\x00" + han_proto.encode_message(han_proto.STATUS, 0xF100, {}))
    frames.append(b"\x00" + b"\x07" * 60)             # a frame that fails its CRC
    steps = 0
    with meter.flood(frames) as flood:
        blob = len(b"".join(frames))
        flood.wait_sent(16 * blob)                      # the meter is under the flood
        started = flood.sent
        while meter.model.supply_on():
            steps += 1
            assert steps < 40, "the model's credit never ran out"
            flood.wait_sent(flood.sent + blob)          # the flood goes on at every step
            meter.advance(600)                          # ten minutes of standing charge
            meter.pulses(1000)                          # and 24.5 p of energy
            deadline = time.monotonic() + 15
            while board.pulses_pending() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not board.pulses_pending(), "the flood held up metering"
            want = meter.model.supply_on()
            while board.relay() is not want and time.monotonic() < deadline:
                time.sleep(0.01)
            assert board.relay() is want, "relay %s, the model says %s" % (board.relay(), want)
        assert flood.sent >= started + steps * blob
    assert board.relay() is False
    rejections = meter.adopt_flood_receipts()
    st = meter.settle()                               # the balance is exact
    assert st["supply_on"] is False and st["balance_mp"] <= 0
    assert rejections, "an hour of forged vouchers and no rejections receipt"
    checked = sum(r.rejections.get(errors.BAD_SIGNATURE, 0) for r in rejections)
    assert 0 < checked <= 3 + steps, "%d signatures checked in %d clock steps" % (checked, steps)
