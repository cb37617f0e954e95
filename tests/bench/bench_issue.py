#!/usr/bin/env python3
"""Bulk issuance benchmark: durable `host.issuer` vs raw PyNaCl signing, same run.

    .venv/bin/python tests/bench/bench_issue.py [--count 100000] [--batch-size 1000] [--json]

Issues N vouchers to one device in a fresh database (WAL, synchronous=FULL, one fsync'd
COMMIT per batch: every voucher is on disk before it is handed out), then signs the very
same Sig_structure bytes with PyNaCl alone, and prints both rates and their ratio (goal:
>= 0.7). Issuance and raw signing alternate in rounds, so background load falls on both.
The raw rate is PyNaCl's ordinary API, SigningKey(seed).sign(msg).signature; the rate of
its lower-level binding (nacl.bindings.crypto_sign) is shown beside it, with
the ratio against it too, and so is the floor: libsodium's crypto_sign called through
PyNaCl's cffi module with a reused buffer, as the issuer calls it. Exit status 1 if the
ratio is below 0.7.
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

import nacl.bindings  # noqa: E402
import nacl.signing  # noqa: E402

from host import db, issuer, keystore, registry  # noqa: E402
from protocol import cose  # noqa: E402

SEED = bytes(range(32))
DEVICE = bytes.fromhex("0011223344556677")


def sign_api(msgs, sk):
    t = time.perf_counter()
    for m in msgs:
        sk.sign(m).signature
    return time.perf_counter() - t


def sign_binding(msgs, sk):
    sk64 = SEED + bytes(sk.verify_key)  # libsodium's secret key: seed || public
    crypto_sign = nacl.bindings.crypto_sign
    t = time.perf_counter()
    for m in msgs:
        crypto_sign(m, sk64)[:64]
    return time.perf_counter() - t


def sign_lib(msgs, sk):
    """The floor: libsodium's crypto_sign via PyNaCl's cffi module, buffer reused."""
    from nacl._sodium import ffi, lib
    sk64 = SEED + bytes(sk.verify_key)  # libsodium's secret key: seed || public
    out = ffi.new("unsigned char[]", 64 + 256)
    sig_of, whole = ffi.buffer(out, 64).__getitem__, slice(0, 64)
    c_sign, null = lib.crypto_sign, ffi.NULL
    t = time.perf_counter()
    for m in msgs:
        c_sign(out, null, m, len(m), sk64)
        sig_of(whole)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=issuer.DEFAULT_BATCH)
    ap.add_argument("--rounds", type=int, default=10,
                    help="alternate issuance and raw signing in this many rounds, so that "
                         "load from other processes falls on both alike")
    ap.add_argument("--dir", help="where to put the fresh database (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--profile", action="store_true", help="cProfile the issuance (to stderr)")
    args = ap.parse_args(argv)
    if args.count < args.rounds:
        args.rounds = 1

    prof = None
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
    work = tempfile.mkdtemp(prefix="bench-issue-", dir=args.dir)
    try:
        path = os.path.join(work, "bench.db")
        conn = db.create(path)
        keystore.new_key(conn, "bench", seed=SEED)
        registry.add_device(conn, DEVICE, max_voucher=10000, max_credit=10000)
        signer = keystore.unlock_active(conn, "bench")
        sk = nacl.signing.SigningKey(SEED)

        t_issue = t_api = t_bind = t_lib = 0.0
        n = 0
        per_round = [args.count // args.rounds] * args.rounds
        per_round[-1] += args.count - sum(per_round)
        for k in per_round:
            got = []
            t = time.perf_counter()
            if prof:
                prof.enable()
            for batch in issuer.issue_batches(conn, signer, DEVICE, 1050, k,
                                              expires_in=30 * 86400, batch_size=args.batch_size):
                got.append(batch)
            if prof:
                prof.disable()
            t_issue += time.perf_counter() - t
            # The same payloads: the Sig_structure of each voucher just issued, as signed.
            msgs = [cose.decode(v.cose).to_be_signed() for b in got for v in b]
            n += len(msgs)
            t_api += sign_api(msgs, sk)
            t_bind += sign_binding(msgs, sk)
            t_lib += sign_lib(msgs, sk)
        assert n == args.count
        stored = conn.execute("SELECT count(*), max(sequence) FROM vouchers").fetchone()
        assert stored == (n, n), stored
        conn.close()
        db_bytes = sum(os.path.getsize(os.path.join(work, f)) for f in os.listdir(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    issue_rate, api, binding, bare = n / t_issue, n / t_api, n / t_bind, n / t_lib
    result = {
        "count": n,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "issue_seconds": round(t_issue, 3),
        "issue_rate": round(issue_rate),
        "raw_sign_rate": round(api),
        "raw_sign_rate_binding": round(binding),
        "ratio": round(issue_rate / api, 3),
        "ratio_vs_binding": round(issue_rate / binding, 3),
        "raw_sign_rate_lib": round(bare),
        "ratio_vs_lib": round(issue_rate / bare, 3),
        "goal": 0.7,
        "database_bytes": db_bytes,
        "durable": "WAL, synchronous=FULL, one fsync'd COMMIT per batch",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print("bulk issuance: %d vouchers in %.2f s = %d vouchers/s (durable, batches of %d)"
              % (n, t_issue, issue_rate, args.batch_size))
        print("raw PyNaCl   : %d sig/s  SigningKey(seed).sign(msg).signature" % api)
        print("               %d sig/s  nacl.bindings.crypto_sign(msg, sk)[:64]" % binding)
        print("               %d sig/s  libsodium crypto_sign, reused buffer (what the issuer"
              " calls)" % bare)
        print("ratio        : %.3f of SigningKey.sign (goal >= 0.7); %.3f of the binding, %.3f"
              " of bare libsodium" % (result["ratio"], result["ratio_vs_binding"],
                                      result["ratio_vs_lib"]))
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(12)
    return 0 if result["ratio"] >= 0.7 else 1


if __name__ == "__main__":
    sys.exit(main())
