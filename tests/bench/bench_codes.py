#!/usr/bin/env python3
"""Bulk keypad-code issuance against bulk voucher issuance, same run (issue 11).

    .venv/bin/python tests/bench/bench_codes.py [--count 100000] [--batch-size 2000] [--json]

Issues N keypad codes (SPEC.md §8) and N vouchers through `host.issuer`, durably (WAL,
synchronous=FULL, one fsync'd COMMIT per batch: each one is on disk before it is handed
out), into one fresh database, and prints both rates and their ratio (codes per second over
vouchers per second; goal >= 1.0: a code needs an HMAC, no signature). A meter takes codes
at most 2^14 - 64 sequences ahead of what it is known to have applied, so the codes go to
several meters (at most 10,000 each, every meter provisioned with its own key-agreement
key), as a supplier's bulk run would; the vouchers go to as many other meters, the same
number each. Codes and vouchers alternate meter by meter (in turn first), so background
load falls on both alike. Also shown: the bare encoder's rate (HMAC, digits, check digit,
reference; no database). Exit status 1 if the ratio is below 1.0.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
os.environ.setdefault("TOPUP_INSECURE_FAST_KDF", "1")    # key sealing is not what is timed

import nacl.utils  # noqa: E402

from host import db, issuer, keystore, registry  # noqa: E402

PER_METER = 10_000
GOAL = 1.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=issuer.DEFAULT_BATCH)
    ap.add_argument("--dir", help="where to put the fresh database (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    meters = max(1, -(-args.count // PER_METER))
    share = [args.count // meters] * meters
    share[-1] += args.count - sum(share)

    work = tempfile.mkdtemp(prefix="bench-codes-", dir=args.dir)
    try:
        conn = db.create(os.path.join(work, "bench.db"))
        keystore.new_key(conn, "bench")                  # an issuer key and a code key
        signer = keystore.unlock_active(conn, "bench")
        code_info = keystore.active_code_key(conn)
        code_key = keystore.unlock_code_key(conn, "bench", code_info.kid)
        for i in range(meters):
            registry.add_device(conn, (0x70B3D5F000000000 | i).to_bytes(8, "big"),
                                max_voucher=10_000, max_credit=10_000)
            registry.add_device(conn, (0x70B3D5F100000000 | i).to_bytes(8, "big"),
                                max_voucher=10_000, max_credit=10_000,
                                public_key=nacl.utils.random(32),
                                ka_public=keystore.x25519_public(nacl.utils.random(32)),
                                code_kid=code_info.kid)
        t_voucher = t_code = 0.0
        n_voucher = n_code = 0
        for i, k in enumerate(share):
            vdev = (0x70B3D5F000000000 | i).to_bytes(8, "big")
            cdev = (0x70B3D5F100000000 | i).to_bytes(8, "big")

            def vouchers():
                return sum(len(b) for b in issuer.issue_batches(
                    conn, signer, vdev, 1050, k, batch_size=args.batch_size))

            def codes():
                return sum(len(b) for b in issuer.issue_code_batches(
                    conn, code_key, cdev, 1050, k, batch_size=args.batch_size))
            for what in ((vouchers, codes) if i % 2 == 0 else (codes, vouchers)):
                t = time.perf_counter()
                got = what()
                dt = time.perf_counter() - t
                if what is codes:
                    t_code, n_code = t_code + dt, n_code + got
                else:
                    t_voucher, n_voucher = t_voucher + dt, n_voucher + got
        assert n_code == n_voucher == args.count
        stored = conn.execute("SELECT sum(form = 1), sum(form = 2) FROM vouchers").fetchone()
        assert stored == (args.count, args.count), stored
        # the bare encoder, no database: what the durable path adds to it
        enc = issuer.CodeEncoder(code_key.code_key(cdev, registry.code_epoch(conn, cdev).ka_public),
                                 cdev)
        t = time.perf_counter()
        bare_n = 0
        while bare_n < args.count:
            bare_n += len(enc.encode_run(bare_n + 1, min(PER_METER, args.count - bare_n), 1050))
        t_bare = time.perf_counter() - t
        conn.close()
        db_bytes = sum(os.path.getsize(os.path.join(work, f)) for f in os.listdir(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    code_rate, voucher_rate = n_code / t_code, n_voucher / t_voucher
    result = {
        "count": args.count,
        "meters": meters,
        "batch_size": args.batch_size,
        "code_seconds": round(t_code, 3),
        "code_rate": round(code_rate),
        "voucher_seconds": round(t_voucher, 3),
        "voucher_rate": round(voucher_rate),
        "ratio": round(code_rate / voucher_rate, 3),
        "goal": GOAL,
        "bare_encoder_rate": round(bare_n / t_bare),
        "database_bytes": db_bytes,
        "durable": "WAL, synchronous=FULL, one fsync'd COMMIT per batch",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print("bulk codes   : %d codes in %.2f s = %d codes/s (durable, batches of %d, %d "
              "meters)" % (n_code, t_code, code_rate, args.batch_size, meters))
        print("bulk vouchers: %d vouchers in %.2f s = %d vouchers/s (same run, same batches)"
              % (n_voucher, t_voucher, voucher_rate))
        print("ratio        : %.3f codes per voucher per second (goal >= %.1f)"
              % (result["ratio"], GOAL))
        print("bare encoder : %d codes/s (HMAC, digits, check digit, reference; no database)"
              % result["bare_encoder_rate"])
    return 0 if result["ratio"] >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
