"""Running out of memory on a MicroPython VM with a real collector (the unix port,
`micropython -X heapsize=N`): a valid voucher submitted over the HAN while the heap is
nearly full is answered BUSY (or not at all), never refused as forged, never counted as a
rejection, and changes nothing; once memory is back the same voucher applies.

The wasm VM grows its heap and cannot show this (DESIGN.md, "The virtual board"). Each run
squeezes the heap to a different spare size, so the MemoryError lands in different places:
reading the frame, decoding, the issuer key's tables, verifying, signing the receipt,
committing. Before the fix, `ed25519.verify` swallowed the MemoryError and the meter
answered BAD_SIGNATURE and counted it."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICROPYTHON = shutil.which("micropython", path=os.path.dirname(sys.executable))

SCRIPT = r"""
import sys, gc
sys.path[:0] = [%(root)r + "/firmware", %(root)r]
from boards.fake import Board
from boards.nor import NorFlash
from meter import provisioning
from meter.app import Meter
from meter.store import Store
from protocol import cose, ed25519, errors, han, voucher

T0 = 1790000000
SEED = bytes(range(1, 33))
PUB = ed25519.public_key(SEED)
DEVICE = b"\x70\xb3\xd5\xf0\x00\x00\x00\xa1"
board = Board(now=T0, flash=NorFlash(blocks=8))
store = Store(board.flash)
store.mount()
provisioning.provision(store, board, DEVICE, [PUB], None, 0)
meter = Meter(board, log=lambda m: None)
v = voucher.encode(cose.kid_for(PUB), lambda m: ed25519.sign(SEED, m), DEVICE, 1, 250, T0 - 60)
frame = han.encode_message(han.SUBMIT, 7, {1: v})
ed25519._KEY_CACHE[0] = ed25519._KEY_CACHE[2] = None   # the meter builds the key's tables itself
ed25519._KEY_CACHE[1] = ed25519._KEY_CACHE[3] = None
board.feed(frame)
gc.collect()
# Fill the heap with a chain of small blocks (a growing list would fail on its own
# reallocation with much still free), then free `spare` of the 256-byte links.
ballast = None
for size in (256, 16):
    try:
        while True:
            ballast = (ballast, bytearray(size), size)
    except MemoryError:
        pass
freed = 0
node = ballast
while node is not None and freed < %(spare)d:
    if node[2] == 256:
        freed += 1
    node = node[0]
ballast = node
node = None
try:
    meter.step()
except MemoryError:
    ballast = None
    gc.collect()
    print("STEP RAISED")
ballast = None
gc.collect()
replies = han.Deframer().feed(board.take_output())
first = [han.decode_message(b) for b in replies]
ledger = meter.ledger
print("FIRST", [(t, p.get(1) if t == han.ERROR else "ok") for t, i, p in first])
print("AFTER", ledger.balance_mp, ledger.receipt_count, sorted(ledger.pending_rejections.items()))
while board.han.pending() or meter.han.backlog:
    meter.step()
drained = [han.decode_message(b) for b in han.Deframer().feed(board.take_output())]
print("DRAINED", [(t, p.get(1) if t == han.ERROR else "ok") for t, i, p in drained], ledger.balance_mp)
board.feed(frame)
meter.step()
second = [han.decode_message(b) for b in han.Deframer().feed(board.take_output())]
print("SECOND", [(t, p.get(2) if t != han.ERROR else p.get(1)) for t, i, p in second], ledger.balance_mp, ledger.receipt_count)
"""

# heap for the whole process; spare 256-byte blocks left free when the voucher arrives
HEAP = 1024 * 1024
SPARES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]


@pytest.mark.skipif(MICROPYTHON is None, reason="the unix port comes with the dev extras (Linux x86_64)")
@pytest.mark.parametrize("spare", SPARES)
def test_a_full_heap_is_busy_never_a_forged_voucher(tmp_path, spare):
    script = tmp_path / "squeeze.py"
    script.write_text(SCRIPT % {"root": ROOT, "spare": spare})
    out = subprocess.run([MICROPYTHON, "-X", "heapsize=%d" % HEAP, str(script)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    first = eval(lines["FIRST"])
    after = eval("(" + lines["AFTER"].replace(" [", ", [").replace(" ", ", ", 1) + ")")
    # The first answer: BUSY, nothing (the reply itself did not fit), or -- if this spare was
    # enough -- applied. Never a refusal of the voucher itself.
    for msg_type, what in first:
        assert what == "ok" or what == 13, (spare, first)          # 13: BUSY
    applied_first = first == [(0x82, "ok")]
    balance, count, rejections = after
    assert rejections == [], (spare, rejections)
    assert (balance, count) == ((250000, 1) if applied_first else (0, 0)), (spare, after)
    # the rest of a frame cut short by the squeeze may still arrive and be answered
    drained, balance_now = lines["DRAINED"].rsplit(" ", 1)
    for msg_type, what in eval(drained):
        assert what == "ok", (spare, out.stdout)
    applied = int(balance_now) == 250000
    # once memory is back, the same voucher applies (or is the duplicate of the first)
    second = eval(lines["SECOND"].rsplit(" ", 2)[0])
    assert second == [(0x82, applied)], (spare, out.stdout)
    assert lines["SECOND"].endswith(" 250000 1"), lines["SECOND"]


@pytest.mark.skipif(MICROPYTHON is None, reason="the unix port comes with the dev extras (Linux x86_64)")
def test_some_squeeze_lands_in_the_voucher_check():
    # Proof that the runs above exercise the path: at some spare size the meter answered
    # BUSY (the MemoryError hit while checking the voucher), not only "no answer".
    busy = 0
    for spare in SPARES:
        script_path = os.path.join(ROOT, ".pytest_cache", "squeeze_%d.py" % spare)
        os.makedirs(os.path.dirname(script_path), exist_ok=True)
        with open(script_path, "w") as f:
            f.write(SCRIPT % {"root": ROOT, "spare": spare})
        out = subprocess.run([MICROPYTHON, "-X", "heapsize=%d" % HEAP, script_path], capture_output=True,
                             text=True, timeout=120)
        if "(255, 13)" in out.stdout:
            busy += 1
    assert busy >= 1
