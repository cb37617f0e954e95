# The heap-budget scenario, run on the MicroPython unix port (tools/unix_port.py starts it
# with `-X heapsize=N`, the firmware as .mpy or as source).  Two runs, as on a board:
#
#   micropython -X heapsize=N -m heap_scenario provision FRAMES FLASH
#       the meter boots on blank flash, then the engineer provisions it over the REPL
#       (meter.provisioning, with the application loaded), as `topup provision` does;
#   micropython -X heapsize=N -m heap_scenario run FRAMES FLASH [--peak]
#       after the soft reset that ends provisioning: the meter boots, applies every
#       voucher of FRAMES over the HAN and then any signed command, takes a metering
#       checkpoint and has every receipt read out over the HAN.
#
# Every answer is checked; anything short of the whole scenario (a MemoryError, a BUSY, a
# missing reply) ends the run with FAIL.  FRAMES (written by tools/unix_port.py): the
# issuer key, the device id, the command key (empty: none; installed at provisioning, as
# `topup provision` does), then one SUBMIT frame per voucher and, with a command key, a
# COMMAND frame, each a 2-byte big-endian length and the bytes.  FLASH: a host file that is the meter's 64 KiB flash partition
# (FileFlash below), so the flash image is never on the heap -- as on a board, where it is
# flash, not RAM.
#
# The run prints `BASE n usable` (bytes in use before the meter boots: the interpreter
# and this script; and the heap's usable bytes), then, at quiet points (after
# gc.collect()), the bytes in use beyond BASE: `HELD boot N`, `HELD apply I N`, `HELD
# checkpoint N`, `HELD readout N`; `TIME apply I us` (the main-loop step that applied the
# voucher), and `OK` at the end.  With --peak, before each apply the free heap is cut
# down to one contiguous hole (everything else filled) and the apply is tried again with
# a bigger hole until it passes: `NEED apply I N` is the smallest hole (to 512 bytes)
# it ran in.
import gc
import sys
import time

_BLOCK = 4096
_PAGE = 256


class FileFlash:
    """A NOR flash partition in a host file (block-device protocol, the semantics of
    boards.nor.NorFlash without power cuts): erase sets a block to 0xFF, a program ANDs.
    Holds one page buffer on the heap, never the image."""

    def __init__(self, path, blocks=16):
        self.blocks = blocks
        self._page = bytearray(_PAGE)
        try:
            self._f = open(path, "r+b")
        except OSError:
            self._f = open(path, "w+b")
            for b in range(blocks):
                self.ioctl(6, b)

    def readblocks(self, block, buf, offset=0):
        f = self._f
        f.seek(block * _BLOCK + offset)
        f.readinto(buf)

    def writeblocks(self, block, buf, offset=0):
        f = self._f
        a = block * _BLOCK + offset
        page = memoryview(self._page)
        i = 0
        n = len(buf)
        while i < n:
            c = _PAGE - (a + i) % _PAGE
            if c > n - i:
                c = n - i
            pm = page[:c]
            f.seek(a + i)
            f.readinto(pm)
            for j in range(c):
                pm[j] &= buf[i + j]
            f.seek(a + i)
            f.write(pm)
            i += c
        f.flush()

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return _BLOCK
        if op == 6:
            f = self._f
            page = self._page
            for j in range(_PAGE):
                page[j] = 0xFF
            f.seek(arg * _BLOCK)
            for _ in range(_BLOCK // _PAGE):
                f.write(page)
            f.flush()
            return 0
        if op in (1, 2, 3):
            return 0
        return None


def _fail(why):
    print("FAIL", why)
    sys.exit(1)


def _records(path):
    f = open(path, "rb")
    hdr = bytearray(2)
    while f.readinto(hdr) == 2:
        yield f.read((hdr[0] << 8) | hdr[1])
    f.close()


def _reply(han, out, what):
    # exactly one frame: the bytes before its 0x00 delimiter
    if not out or out.find(b"\x00") != len(out) - 1:
        _fail("%s: %d bytes of replies" % (what, len(out)))
    return han.decode_message(han.decode_frame(out[:-1]))


def _squeeze(hole):
    """Fill the free heap but one contiguous hole of `hole` bytes; return the ballast
    (give it to _release to free the heap again)."""
    gc.collect()
    gap = bytearray(hole)             # first fit: the hole sits in the biggest free run
    ballast = None
    for size in (16384, 1024, 64, 1):
        try:
            while True:
                ballast = [ballast, bytearray(size)]
        except MemoryError:
            pass
    del gap
    gc.collect()
    return ballast


def _release(ballast):
    # Break the chain link by link: a stale pointer the collector finds on the C stack
    # then keeps one link alive, not the whole ballast.
    while ballast is not None:
        nxt = ballast[0]
        ballast[0] = ballast[1] = None
        ballast = nxt
    gc.collect()


def _apply_in_hole(board, meter, frame):
    """The smallest hole (in 512-byte steps) in which this frame is applied."""
    before = meter.ledger.receipt_count
    hole = 0
    while True:
        ballast = _squeeze(hole)
        board.feed(frame)
        for _ in range(8):            # what a step left queued is served in the hole too
            try:
                meter.step()
            except MemoryError:
                pass
            if not (board.han.pending() or meter.han.backlog):
                break
        _release(ballast)
        ballast = None
        if meter.ledger.receipt_count != before:
            return hole
        # not applied: drop what is left of the frame and the BUSY (the PPMID retries)
        board.han._in[:] = b""
        meter.han._queue[:] = []
        meter.han.deframer.feed(b"\x00")
        board.take_output()
        hole += 512


def provision(frames, flash):
    from boards.fake import Board
    board = Board(flash=FileFlash(flash), now=1790000000)
    from meter.app import Meter
    meter = Meter(board, log=lambda m: None)
    if meter.ledger.provisioned:
        _fail("the flash is provisioned already")
    meter = None
    # the engineer's tool stops the app and provisions over the REPL (hil/flashing.py)
    from meter import provisioning
    issuer = next(frames)
    device = next(frames)
    command_key = next(frames)
    provisioning.provision_board(device.hex(), [issuer.hex()], board=board,
                                 command_key_hex=command_key.hex() if command_key else None)
    print("OK provisioned")


def run(frames, flash, peak):
    base = gc.mem_alloc()
    print("BASE", base, base + gc.mem_free())     # interpreter + this script; usable heap
    from boards.fake import Board
    board = Board(flash=FileFlash(flash), now=1790000000 + 60)
    from meter.app import Meter
    meter = Meter(board, log=lambda m: None)
    from protocol import han
    gc.collect()
    print("HELD boot", gc.mem_alloc() - base)
    ledger = meter.ledger
    if not ledger.provisioned:
        _fail("not provisioned")

    # ---- top-ups over the HAN, one frame at a time
    count = 0
    for frame in frames:
        count += 1
        if peak:
            print("NEED apply", count, _apply_in_hole(board, meter, frame))
        else:
            board.feed(frame)
            t = time.ticks_us()
            meter.step()
            print("TIME apply", count, time.ticks_diff(time.ticks_us(), t))
        t, i, p = _reply(han, board.take_output(), "apply %d" % count)
        if t not in (han.SUBMIT | han.RESPONSE, han.COMMAND | han.RESPONSE) or p.get(2):
            _fail("apply %d: answer %r" % (count, p))
        board.advance(60)
        gc.collect()
        print("HELD apply", count, gc.mem_alloc() - base)
    if ledger.receipt_count != count:
        _fail("%d receipts after %d applies" % (ledger.receipt_count, count))

    # ---- a metering checkpoint: 15 minutes and some energy later
    board.add_pulses(500)
    board.advance(901)
    programs = meter.store.programs
    meter.step()
    if meter.store.programs == programs or ledger._dirty:
        _fail("no metering checkpoint")
    gc.collect()
    print("HELD checkpoint", gc.mem_alloc() - base)

    # ---- every receipt read out over the HAN, four at a time
    got = 0
    for start in range(0, count, han.MAX_RECEIPTS_PER_READ):
        board.feed(han.encode_message(han.RECEIPTS, start, {1: start}))
        meter.step()
        t, i, p = _reply(han, board.take_output(), "read-out at %d" % start)
        if t != (han.RECEIPTS | han.RESPONSE):
            _fail("read-out at %d: answer %r" % (start, p))
        got += len(p[1])
    if got != count:
        _fail("read out %d receipts of %d" % (got, count))
    gc.collect()
    print("HELD readout", gc.mem_alloc() - base)
    print("OK", count)


def main():
    args = sys.argv[1:]
    frames = _records(args[1])
    if args[0] == "provision":
        provision(frames, args[2])
    else:
        next(frames)                  # the issuer key, device id, command key: provisioning's
        next(frames)
        next(frames)
        gc.collect()
        run(frames, args[2], "--peak" in args)


main()
