#!/usr/bin/env python3
"""Flash wear of the power-safe store (meter.store) on a realistic partition.

    .venv/bin/python tests/bench/bench_wear.py [--days 400] [--json]

A 64 KiB partition (16 blocks of 4 KiB, 256-byte pages, on the NOR fake), state blob
~100 bytes, receipts ~220 bytes, config ~400 bytes, keep_receipts=64. Measures, in steady
state (after the ring has wrapped), the erases and page programs per top-up (a commit with
a receipt) and per metering checkpoint (a commit without), each alone and in a realistic
day of 10 top-ups and one checkpoint every 15 minutes (96). Two cases for the receipts the
ledger holds beyond the newest 64: none (the ledger's replay-window retention covers the
same receipts when every receipt is a top-up), and `--held` more (default 100: ten days of
top-ups kept, e.g. until uploaded; 64 KiB holds about 210 receipts). From the per-block erase
counts of the day workload: the lifetime of a 100,000-cycle flash, and which block wears
most.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "firmware"))

from boards.nor import NorFlash  # noqa: E402
from meter.store import Store  # noqa: E402

BLOCKS, BLOCK, PAGE = 16, 4096, 256
STATE, RECEIPT, CONFIG = 100, 220, 400
KEEP = 64
CYCLES = 100_000
TOPUPS_PER_DAY = 10
CHECKPOINTS_PER_DAY = 96          # one every 15 minutes (meter.ledger CHECKPOINT_SECONDS)


class Meter:
    def __init__(self, held):
        self.flash = NorFlash(blocks=BLOCKS, block_size=BLOCK, page_size=PAGE)
        self.per_block = [0] * BLOCKS
        self.written = 0
        real_erase, real_write = self.flash.erase, self.flash.writeblocks

        def erase(b):
            self.per_block[b] += 1
            real_erase(b)

        def writeblocks(b, buf, off=0):
            self.written += len(buf)
            real_write(b, buf, off)

        self.flash.erase = erase
        self.flash.writeblocks = writeblocks
        self.store = Store(self.flash, keep_receipts=KEEP)
        self.store.mount()
        self.held = held
        self.store.retain = lambda i, tag: i >= self.store.receipt_count - KEEP - held
        self.n = 0
        self.store.write_config(bytes(range(256)) + bytes(CONFIG - 256))

    def topup(self):
        self.n += 1
        s = self.store
        s.commit(self._blob(STATE), self._blob(RECEIPT), self.n)

    def checkpoint(self):
        self.n += 1
        self.store.commit(self._blob(STATE))

    def _blob(self, size):
        return bytes((self.n * 7 + i) & 0xFF for i in range(size))

    def snapshot(self):
        return self.flash.erases, self.flash.programs, self.written, list(self.per_block)


def _rate(meter, op, count):
    e0, p0, w0, _ = meter.snapshot()
    for _ in range(count):
        op()
    e1, p1, w1, _ = meter.snapshot()
    return (e1 - e0) / count, (p1 - p0) / count, (w1 - w0) / count


def _day(meter):
    gap = CHECKPOINTS_PER_DAY // TOPUPS_PER_DAY
    for q in range(CHECKPOINTS_PER_DAY):
        meter.checkpoint()
        if q % gap == gap // 2 and q // gap < TOPUPS_PER_DAY:
            meter.topup()


def measure(held, days):
    m = Meter(held)
    while min(m.per_block) < 3:                # warm up: the ring has wrapped, live data settled
        _day(m)
    topup = _rate(m, m.topup, 2000)
    checkpoint = _rate(m, m.checkpoint, 5000)
    for _ in range(5):
        _day(m)
    _, _, _, before = m.snapshot()
    e0, p0, w0, _ = m.snapshot()
    for _ in range(days):
        _day(m)
    e1, p1, w1, after = m.snapshot()
    per_block = [(a - b) / days for a, b in zip(after, before)]
    worst = max(range(BLOCKS), key=lambda b: per_block[b])
    new_bytes = TOPUPS_PER_DAY * ((20 + RECEIPT) + (20 + STATE)) + CHECKPOINTS_PER_DAY * (20 + STATE)
    return {
        "held_receipts": held,
        "topup": {"erases": topup[0], "programs": topup[1], "bytes_written": topup[2]},
        "checkpoint": {"erases": checkpoint[0], "programs": checkpoint[1], "bytes_written": checkpoint[2]},
        "day": {
            "erases": (e1 - e0) / days,
            "programs": (p1 - p0) / days,
            "bytes_written": (w1 - w0) / days,
            "write_amplification": (w1 - w0) / days / new_bytes,
            "erases_per_block": per_block,
            "worst_block": worst,
            "worst_block_erases": per_block[worst],
            "lifetime_years": CYCLES / per_block[worst] / 365.25 if per_block[worst] else float("inf"),
        },
        "live_bytes": m.store._live,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=int, default=400, help="simulated days of the daily workload")
    ap.add_argument("--held", type=int, default=100, help="receipts held beyond the newest 64 (second case)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    results = {
        "partition": {"blocks": BLOCKS, "block_size": BLOCK, "page_size": PAGE},
        "blobs": {"state": STATE, "receipt": RECEIPT, "config": CONFIG, "keep_receipts": KEEP},
        "workload": {"topups_per_day": TOPUPS_PER_DAY, "checkpoints_per_day": CHECKPOINTS_PER_DAY,
                     "flash_cycles": CYCLES, "days": args.days},
        "cases": [measure(0, args.days), measure(args.held, args.days)],
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("meter.store flash wear: %d x %d B blocks, %d B pages; state %d B, receipt %d B, config %d B, keep %d"
          % (BLOCKS, BLOCK, PAGE, STATE, RECEIPT, CONFIG, KEEP))
    print("day = %d top-ups + %d checkpoints (every 15 min); flash rated %d erase cycles; %d days simulated"
          % (TOPUPS_PER_DAY, CHECKPOINTS_PER_DAY, CYCLES, args.days))
    print()
    print("%-34s %14s %14s" % ("", "receipts held:", ""))
    print("%-34s %14s %14s" % ("", "newest 64", "64 + %d" % args.held))
    a, b = results["cases"]
    rows = [
        ("erases per top-up", "topup", "erases", "%.4f"),
        ("page programs per top-up", "topup", "programs", "%.2f"),
        ("bytes programmed per top-up", "topup", "bytes_written", "%.0f"),
        ("erases per checkpoint", "checkpoint", "erases", "%.4f"),
        ("page programs per checkpoint", "checkpoint", "programs", "%.2f"),
        ("bytes programmed per checkpoint", "checkpoint", "bytes_written", "%.0f"),
        ("erases per day (all blocks)", "day", "erases", "%.2f"),
        ("write amplification (copy-forward)", "day", "write_amplification", "%.2f"),
        ("erases per day, most-worn block", "day", "worst_block_erases", "%.3f"),
        ("most-worn block", "day", "worst_block", "%d"),
        ("lifetime at 100k cycles (years)", "day", "lifetime_years", "%.0f"),
    ]
    for label, group, key, fmt in rows:
        print("%-34s %14s %14s" % (label, fmt % a[group][key], fmt % b[group][key]))
    print()
    spread = [max(c["day"]["erases_per_block"]) - min(c["day"]["erases_per_block"]) for c in results["cases"]]
    print("per-block erase rates differ by at most %.3f/day: the ring wears every block alike"
          % max(spread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
