"""The head end (SPEC.md §5.1). In one process against the meter's own uplink code: receipts
queued while the WAN was down reach the supplier's database and a signed acknowledgement
lets them go; a reset meter (new key, indices continuing) is served; a forged push is
stored and never acknowledged. Then the acknowledgement's contents against protocol.ack,
and `topup headend` through the real executable on a pseudo-terminal: --idle-exit ends it
under a continuous stream of pushes, and it needs the issuer passphrase."""
import os
import re
import select
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest

import tests.firmware._fw  # noqa: F401

from boards.fake import Board, HanStream
from host import db, headend, keystore, reconcile, registry
from meter import provisioning
from meter.app import Meter
from meter.store import Store
from protocol import ack, cose, ed25519, errors, han, receipt as pr
from tests.firmware._meterkit import DEVICE, ISSUER_SEED, STRANGER_SEED, issue, public

PASS = "head end test passphrase"
TOPUP = str(Path(sys.executable).parent / "topup")


class Link:
    """A byte pipe between the meter's WAN stream and the head end."""

    def __init__(self, meter_side):
        self.meter_side = meter_side

    def read(self, n):
        return self.meter_side.take_output()

    def write(self, data):
        self.meter_side.feed(data)


def _supplier(tmp_path):
    conn = db.create(str(tmp_path / "supplier.db"))
    keystore.new_key(conn, PASS, seed=ISSUER_SEED)    # the key the meters trust
    return conn, keystore.unlock_active(conn, PASS)


def _setup(tmp_path):
    conn, signer = _supplier(tmp_path)
    board = Board(now=1790000000)
    board.wan = HanStream()
    store = Store(board.flash)
    store.mount()
    key = provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 100)
    registry.add_device(conn, DEVICE, public_key=key)
    meter = Meter(board)
    return conn, signer, board, meter, headend.HeadEnd(conn, Link(board.wan), "wan:test", signer)


def _top_up(board, meter, seq, amount=50):
    board.feed(han.encode_message(han.SUBMIT, seq, {1: issue(seq, amount)}))
    meter.step()
    return board.take_output()


def _run(board, meter, head, steps=12):
    for _ in range(steps):
        meter.step()
        head.poll()
        board.advance(6)


def test_queued_receipts_reach_the_head_end_and_the_acknowledgement_lets_them_go(tmp_path):
    conn, signer, board, meter, head = _setup(tmp_path)
    for seq in range(1, 11):
        _top_up(board, meter, seq)
    meter.step()
    assert head.poll() == 0                            # WAN down: nothing comes
    board.set_wan(True)
    for _ in range(10):
        meter.step()
        head.poll()
    assert meter.ledger.uploaded == 10                 # the meter took every acknowledgement
    stored = conn.execute("SELECT count(*), min(idx), max(idx), sum(sig_ok) FROM receipts "
                          "WHERE device = ?", (DEVICE,)).fetchone()
    assert tuple(stored) == (10, 0, 9, 10)
    assert (head.pushes, head.stored, head.acks) == (3, 10, 3)    # 4 + 4 + 2


def test_a_repeated_push_changes_nothing_and_is_acknowledged_again(tmp_path):
    conn, signer, board, meter, head = _setup(tmp_path)
    _top_up(board, meter, 1)
    raw = meter.store.receipt(0)
    for _ in range(2):
        nxt, signed, result = headend.handle_push(conn, {1: DEVICE, 2: 0, 3: [raw]}, "x", signer)
        assert nxt == 1 and signed is not None
    assert conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 1


def test_acknowledgement_never_skips_a_missing_receipt_the_meter_could_send(tmp_path):
    conn, signer, board, meter, head = _setup(tmp_path)
    for seq in (1, 2, 3):
        _top_up(board, meter, seq)
    r0, r2 = meter.store.receipt(0), meter.store.receipt(2)
    assert headend.handle_push(conn, {1: DEVICE, 2: 0, 3: [r0]}, "x", signer)[0] == 1
    assert headend.handle_push(conn, {1: DEVICE, 2: 2, 3: [r2]}, "x", signer)[0] == 3
    # receipt 1 is still missing: a push starting there is asked for it, and gets no ack
    assert headend.next_needed(conn, DEVICE, 1) == 1
    assert headend.acknowledgement(conn, signer, DEVICE, 1) == (1, None)


def test_the_acknowledgement_is_signed_and_says_what_is_held(tmp_path):
    conn, signer, board, meter, head = _setup(tmp_path)
    for seq in (1, 2, 3):
        _top_up(board, meter, seq)
    raws = [meter.store.receipt(i) for i in range(3)]
    nxt, signed, _ = headend.handle_push(conn, {1: DEVICE, 2: 0, 3: raws}, "x", signer)
    assert nxt == 3
    trusted = {signer.kid: public(ISSUER_SEED)}
    a = ack.verify(signed, trusted, DEVICE)
    assert (a.device, a.meter_kid, a.next_index, a.last_hash) == (
        DEVICE, meter.ledger.signer.kid, 3, pr.chain_hash(raws[2]))
    # under any other key it does not verify
    with pytest.raises(errors.Rejected):
        ack.verify(signed, {signer.kid: public(STRANGER_SEED)}, DEVICE)


def test_a_forged_push_is_stored_as_evidence_and_never_acknowledged(tmp_path):
    conn, signer, board, meter, head = _setup(tmp_path)
    for seq in (1, 2):
        _top_up(board, meter, seq)
    # receipts at indices the meter never signed, and a genuine one with a flipped bit,
    # claiming the meter's own key id
    kid = meter.ledger.signer.kid

    def forged(index, prev):
        return pr.encode(kid, lambda m: ed25519.sign(STRANGER_SEED, m), {
            pr.K_DEVICE: DEVICE, pr.K_INDEX: index, pr.K_KIND: pr.EMERGENCY,
            pr.K_TIME: 1790000000, pr.K_PREV: prev, pr.K_BEFORE: 0, pr.K_AFTER: 0,
            pr.K_AMOUNT: 500})
    ahead = [forged(2, pr.chain_hash(meter.store.receipt(1))), forged(3, bytes(32))]
    flipped = bytearray(meter.store.receipt(0))
    flipped[-1] ^= 1
    for first, raws in ((2, ahead), (0, [bytes(flipped)])):
        nxt, signed, result = headend.handle_push(conn, {1: DEVICE, 2: first, 3: raws}, "x",
                                                  signer)
        assert (nxt, signed) == (first, None) and result.bad == len(raws)
    assert conn.execute("SELECT count(*), sum(sig_ok) FROM receipts").fetchone() == (3, 0)
    # the meter, on the same link, still holds everything and gets it acknowledged
    board.set_wan(True)
    _run(board, meter, head, 4)
    assert meter.ledger.uploaded == 2
    assert headend.next_needed(conn, DEVICE, 0) == 2       # the forgeries at 2, 3 are not held
    res = reconcile.reconcile(conn)       # (the vouchers were issued outside this database)
    assert sorted(a.kind for a in res.anomalies if a.kind != "not_issued") == ["bad_signature"] * 3


def test_an_answer_to_a_forged_push_moves_nothing_on_the_meter(tmp_path):
    """A push with a bad signature, with the meter's own request id, answered on the
    meter's link: the answer holds no acknowledgement, so the meter drops nothing."""
    conn, signer, board, meter, head = _setup(tmp_path)
    _top_up(board, meter, 1)
    board.set_wan(True)
    meter.step()
    (_, msg_id, payload), = [han.decode_message(b)
                             for b in han.Deframer().feed(board.wan.take_output())]
    bad = bytearray(payload[3][0])
    bad[-2] ^= 0x40
    payload[3] = [bytes(bad)]
    sent = []

    class Stream:
        def __init__(self):
            self.data = [han.encode_message(han.PUSH, msg_id, payload)]

        def read(self, n):
            return self.data.pop() if self.data else b""

        def write(self, data):
            sent.append(data)

    forged_link = headend.HeadEnd(conn, Stream(), "x", signer)
    assert forged_link.poll() == 1
    replies = [han.decode_message(b) for b in han.Deframer().feed(b"".join(sent))]
    assert replies == [(han.PUSH | han.RESPONSE, msg_id, {1: 0})]
    board.wan.feed(b"".join(sent))
    meter.step()
    assert meter.ledger.uploaded == 0 and meter.store.receipt(0) is not None


def test_a_reset_meter_is_served(tmp_path):
    """Issue 8, defect 2: after a factory reset the meter's receipts continue the index
    under a new key; the head end verifies them with the key of their span, acknowledges
    them, and never asks for what the old key signed."""
    conn, signer, board, meter, head = _setup(tmp_path)
    for seq in range(1, 6):
        _top_up(board, meter, seq)
    board.set_wan(True)
    _run(board, meter, head, 4)
    assert meter.ledger.uploaded == 5
    old_kid = meter.ledger.signer.kid
    # topup provision --factory-reset, as hil/commands.py does it
    store = Store(board.flash)
    store.mount()
    carry = provisioning.factory_reset(store)
    floor = registry.issued_floor(conn, DEVICE)
    first = registry.next_first_index(conn, DEVICE)
    key = provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 20,
                                 floor=floor, first_index=first)
    c = provisioning.cfg.decode(store.config)
    st = provisioning.cfg.decode(store.state)
    assert (c[provisioning.cfg.C_FIRST_RECEIPT], st[provisioning.cfg.S_FLOOR]) == (5, 5)
    assert carry[provisioning.cfg.K_NEXT_RECEIPT] == 5
    meter = Meter(board)
    head = headend.HeadEnd(conn, Link(board.wan), "wan:test", signer)
    # the new key is not registered yet: its receipts are kept, not held, not acknowledged
    reply = _top_up(board, meter, 3)                     # a voucher from before the reset
    (_, _, refused), = [han.decode_message(b) for b in han.Deframer().feed(reply)]
    assert refused == {1: errors.STALE}
    _top_up(board, meter, 6)
    _top_up(board, meter, 7)
    _run(board, meter, head, 3)
    assert meter.ledger.uploaded == 5 and head.acks == 0 and head.pushes >= 1
    registry.set_public_key(conn, DEVICE, registry.MeterKey(key, 5, 5))
    _run(board, meter, head, 3)
    assert meter.ledger.uploaded == 7
    kids = dict(conn.execute("SELECT idx, checked_kid FROM receipts WHERE sig_ok = 1"))
    assert [kids[i] for i in range(7)] == [old_kid] * 5 + [meter.ledger.signer.kid] * 2
    res = reconcile.reconcile(conn)      # (the vouchers were issued outside this database)
    assert {a.kind for a in res.anomalies} == {"not_issued"}
    assert headend.next_needed(conn, DEVICE, 5) == 7


# --- handle_push's edges (no meter needed) ------------------------------------------------

def test_garbage_and_bad_pushes_are_refused_without_storing(tmp_path):
    conn, signer = _supplier(tmp_path)
    link_in, replies = [], []

    class Stream:
        def read(self, n):
            return link_in.pop(0) if link_in else b""

        def write(self, data):
            replies.append(data)

    head = headend.HeadEnd(conn, Stream(), "x", signer)
    link_in.append(b"noise\x00" + han.encode_message(han.PUSH, 5, {1: DEVICE, 2: 0, 3: [b"junk"]})
                   + han.encode_message(han.STATUS, 6, {})
                   + han.encode_message(han.PUSH, 7, {1: DEVICE, 2: -1, 3: []}))
    assert head.poll() == 3
    got = [han.decode_message(b) for b in han.Deframer().feed(b"".join(replies))]
    assert got == [(han.ERROR, 5, {1: errors.BAD_REQUEST}), (han.ERROR, 6, {1: errors.UNKNOWN_REQUEST}),
                   (han.ERROR, 7, {1: errors.BAD_REQUEST})]
    assert conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 0
    assert head.refused == 2


def test_poll_does_a_bounded_amount_of_work(tmp_path):
    """A link that never falls silent cannot keep poll() from returning."""
    conn, signer = _supplier(tmp_path)
    frame = han.encode_message(han.STATUS, 1, {})

    class Endless:
        def read(self, n):
            return frame * 8

        def write(self, data):
            pass

    head = headend.HeadEnd(conn, Endless(), "x", signer)
    t = time.monotonic()
    assert head.poll() > 0
    assert time.monotonic() - t < 5


# --- `topup headend` through the real executable -----------------------------------------

def _cli_supplier(tmp_path):
    """A database with the meter registered and a few genuine receipts to push."""
    conn, signer = _supplier(tmp_path)
    board = Board(now=1790000000)
    store = Store(board.flash)
    store.mount()
    key = provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 100)
    registry.add_device(conn, DEVICE, public_key=key)
    meter = Meter(board)
    for seq in (1, 2):
        _top_up(board, meter, seq)
    raws = [meter.store.receipt(i) for i in range(2)]
    conn.close()
    return raws, {"TOPUP_DB": str(tmp_path / "supplier.db"), "TOPUP_PASSPHRASE": PASS}


def _pty():
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


def _replies(master, buf):
    while select.select([master], [], [], 0)[0]:
        try:
            buf.extend(os.read(master, 4096))
        except OSError:
            break


def test_idle_exit_ends_the_head_end_under_a_continuous_stream_of_pushes(tmp_path):
    """Issue 8, defect 2: a meter that pushes again and again (here every 50 ms, far more
    often than a real one) keeps the head end busy but stores nothing new: --idle-exit ends
    it all the same, with a one-line summary; the receipts are acknowledged."""
    raws, env = _cli_supplier(tmp_path)
    master, slave, port = _pty()
    stop = threading.Event()
    buf = bytearray()

    def meter():
        n = 0
        while not stop.is_set():
            n = n % 60000 + 1
            os.write(master, han.encode_message(han.PUSH, n, {1: DEVICE, 2: 0, 3: raws}))
            _replies(master, buf)
            time.sleep(0.05)
    p = subprocess.Popen([TOPUP, "headend", "--port", port, "--idle-exit", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, **env))
    th = threading.Thread(target=meter, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        out, err = p.communicate(timeout=60)
    finally:
        stop.set()
        th.join(5)
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
        os.close(slave)
    took = time.monotonic() - t0
    assert p.returncode == 0, (out, err)
    assert took < 20, took
    last = out.strip().splitlines()[-1]
    assert re.match(r"head end stopped \(no new receipt for 2 s\): \d+ push\(es\), 2 new "
                    r"receipt\(s\) stored, \d+ acknowledgement\(s\) signed, 0 push\(es\) "
                    r"refused, 0 command\(s\) sent$", last), out
    assert int(re.search(r"(\d+) push\(es\),", last).group(1)) >= 10   # it was busy
    replies = [han.decode_message(b) for b in han.Deframer().feed(bytes(buf))]
    assert replies and all(r[0] == han.PUSH | han.RESPONSE and r[2][1] == 2 for r in replies)
    a = ack.verify(replies[-1][2][2], {cose.kid_for(public(ISSUER_SEED)): public(ISSUER_SEED)},
                   DEVICE)
    assert (a.next_index, a.last_hash) == (2, pr.chain_hash(raws[1]))


def test_headend_needs_the_passphrase(tmp_path):
    raws, env = _cli_supplier(tmp_path)
    env = dict(os.environ, **env)
    env.pop("TOPUP_PASSPHRASE")
    r = subprocess.run([TOPUP, "headend", "--port", "/dev/null", "--idle-exit", "1"],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                       timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.splitlines() == [
        "topup: error: no passphrase: the head end signs its acknowledgements with the active "
        "issuer key; set TOPUP_PASSPHRASE (or run it on a terminal to type it)"], r.stderr
    env["TOPUP_PASSPHRASE"] = "wrong"
    r = subprocess.run([TOPUP, "headend", "--port", "/dev/null", "--idle-exit", "1"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "passphrase" in r.stderr, r.stderr


# --- signed commands in the answer to a push (SPEC.md §5.1, §10) ---------------------------

def _setup_commands(tmp_path):
    """As _setup, but the meter is provisioned with the database's command key (made with
    its first issuer key) and registered with it, as `topup provision` does."""
    conn, signer = _supplier(tmp_path)
    ck = keystore.active_command_key(conn)
    board = Board(now=1790000000)
    board.wan = HanStream()
    store = Store(board.flash)
    store.mount()
    key = provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 100,
                                 command_key=bytes(ck.public_key))
    registry.add_device(conn, DEVICE)
    registry.set_public_key(conn, DEVICE, key, first_index=0, floor=0,
                            command_kid=ck.kid, trust=[signer.kid])
    meter = Meter(board)
    return conn, signer, board, meter, headend.HeadEnd(conn, Link(board.wan), "wan:test", signer)


class Pipe:
    """A head end's stream in a test: what it reads is fed in, what it writes is kept."""

    def __init__(self):
        self.inbox, self.outbox = bytearray(), bytearray()

    def read(self, n):
        data, self.inbox[:] = bytes(self.inbox[:n]), self.inbox[n:]
        return data

    def write(self, data):
        self.outbox += data

    def answer(self, msg_id, payload):
        self.inbox += han.encode_message(han.PUSH, msg_id, payload)
        return msg_id


def _answer(head, pipe, msg_id, payload):
    pipe.answer(msg_id, payload)
    assert head.poll() == 1
    (body,) = han.Deframer().feed(bytes(pipe.outbox))
    pipe.outbox.clear()
    t, got_id, reply = han.decode_message(body)
    assert (t, got_id) == (han.PUSH | han.RESPONSE, msg_id)
    return reply


def _tariff(conn, unit_rate_mp, device=DEVICE):
    from host import commands as cmds
    args = cmds.tariff_args(1790000000, now=1790000000, unit_rate_mp=unit_rate_mp)
    return cmds.make(conn, PASS, cmds.plan_tariff(conn, [device], args), now=1790000000)


def test_the_answer_to_a_push_carries_the_pending_commands_until_their_receipts_come(tmp_path):
    from host import commands as cmds
    from protocol import command as pc
    conn, signer, board, meter, head = _setup_commands(tmp_path)
    made = [m for rate in (30000, 31000, 32000, 33000, 34000) for m in _tariff(conn, rate)]
    assert [m.number for m in made] == [1, 2, 3, 4, 5]
    _top_up(board, meter, 1)
    raw = meter.store.receipt(0)
    # Pure host: the pending ones in number order, at most 4, for this meter only.
    assert headend.pending_commands(conn, DEVICE) == [m.raw for m in made[:4]]
    assert headend.pending_commands(conn, bytes(8)) == []
    # Through the head end's framing: field 3 of the answer.
    pipe = Pipe()
    h2 = headend.HeadEnd(conn, pipe, "wan:x", signer)
    payload = _answer(h2, pipe, 77, {1: DEVICE, 2: 0, 3: [raw]})
    assert payload[1] == 1
    assert payload[3] == [m.raw for m in made[:4]]
    assert [pc.parse(c).number for c in payload[3]] == [1, 2, 3, 4]
    assert h2.commands == 4
    # The real meter over the WAN: it takes them, applies them one per step, and their
    # receipts (kind 5) come back with its next pushes and mark them applied.
    board.set_wan(True)
    _run(board, meter, head, steps=30)
    rows = cmds.list_commands(conn, DEVICE)
    assert [(r.number, r.status) for r in rows] == [(n, "applied") for n in range(1, 6)]
    assert meter.ledger.unit_rate == 34000
    kinds = [k for (k,) in conn.execute("SELECT kind FROM receipts WHERE device = ? ORDER BY "
                                        "idx", (DEVICE,))]
    assert kinds.count(5) == 5
    assert meter.ledger.uploaded == meter.store.receipt_count     # all acknowledged
    # Nothing pending any more: an answer carries no field 3.
    assert headend.pending_commands(conn, DEVICE) == []
    nxt = meter.store.receipt_count - 1
    payload = _answer(h2, pipe, 78, {1: DEVICE, 2: nxt, 3: [meter.store.receipt(nxt)]})
    assert payload[1] == nxt + 1 and 3 not in payload


def test_a_meter_without_a_command_key_gets_no_commands_in_its_answers(tmp_path):
    conn, signer, board, meter, head = _setup(tmp_path)
    _top_up(board, meter, 1)
    assert headend.pending_commands(conn, DEVICE) == []
    board.set_wan(True)
    _run(board, meter, head, steps=4)
    assert head.commands == 0 and meter.ledger.uploaded == 1
