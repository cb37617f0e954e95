#!/usr/bin/env python3
"""Reconciliation benchmark: import + reconcile of N receipts vs raw PyNaCl verification.

    .venv/bin/python tests/bench/bench_reconcile.py [--count 100000] [--rounds 10] [--json]

Set-up (not timed): a fresh supplier database (WAL, synchronous=FULL) with one meter whose
public key is registered, N vouchers issued to it with host.issuer, and N receipts the
meter signs as the firmware does (protocol.receipt.encode, PyNaCl): top-ups of every
voucher in turn, metering between them, emergency credit now and then.

Timed: the receipts are exported to files (SPEC.md §6) and imported file by file
(`host.reconcile.import_files`: parse and structure check, signature check against the
registered key, one fsync'd transaction per file), then `host.reconcile.reconcile` runs
once (hash chain, balance continuity, matching of every receipt to a voucher and a status
for every voucher, all written in one fsync'd transaction). Raw: PyNaCl's ordinary API,
VerifyKey(public).verify(message, signature), over the very same signed messages,
prepared beforehand; the import of each file and the raw verification of its receipts
alternate, so background load falls on both. The ratio (goal >= 0.7) is the reconcile
rate over the raw rate. Also shown: libsodium's crypto_sign_open called through PyNaCl's
cffi module with reused buffers (what the importer calls), the floor. Exit 1 if the
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

import nacl.signing  # noqa: E402

from host import db, issuer, keystore, reconcile, receipts_io, registry  # noqa: E402
from protocol import receipt as pr  # noqa: E402
from protocol import voucher as pv  # noqa: E402
from protocol.cose import kid_for  # noqa: E402

ISSUER_SEED = bytes(range(32))
METER_SEED = bytes([0xA1]) * 32
DEVICE = bytes.fromhex("70b3d5f0000000a1")
T0 = 1_760_000_000


def make_receipts(vouchers, meter_key):
    """The meter's receipts for applying every voucher in order (and some emergency credit)."""
    kid = kid_for(bytes(meter_key.verify_key))

    def sign(msg):
        return meter_key.sign(msg).signature
    out, prev, balance, t = [], pr.GENESIS, 0, T0
    for n, v in enumerate(vouchers):
        if n % 97 == 96:  # emergency credit now and then (balance unchanged)
            fields = {pr.K_DEVICE: DEVICE, pr.K_INDEX: len(out), pr.K_KIND: pr.EMERGENCY,
                      pr.K_TIME: t, pr.K_PREV: prev, pr.K_BEFORE: balance,
                      pr.K_AFTER: balance, pr.K_AMOUNT: 500}
            raw = pr.encode(kid, sign, fields)
            out.append(raw)
            prev = pr.chain_hash(raw)
        t += 600
        balance -= 1_234_567  # metering between receipts
        ref = pv.reference(v.cose)
        before, balance = balance, balance + v.amount * 1000
        fields = {pr.K_DEVICE: DEVICE, pr.K_INDEX: len(out), pr.K_KIND: pr.TOPUP,
                  pr.K_TIME: t, pr.K_PREV: prev, pr.K_BEFORE: before, pr.K_AFTER: balance,
                  pr.K_SEQUENCE: v.sequence, pr.K_VOUCHER: ref, pr.K_AMOUNT: v.amount}
        raw = pr.encode(kid, sign, fields)
        out.append(raw)
        prev = pr.chain_hash(raw)
    return out


def raw_api(items, public):
    """PyNaCl's ordinary API, as a supplier script would call it."""
    t = time.perf_counter()
    for msg, sig in items:
        nacl.signing.VerifyKey(public).verify(msg, sig)
    return time.perf_counter() - t


def raw_lib(items, public):
    """The floor: libsodium's crypto_sign_open via PyNaCl's cffi module, buffers reused."""
    from nacl._sodium import ffi, lib
    out = ffi.new("unsigned char[]", 4096)
    mlen = ffi.new("unsigned long long *")
    c_open = lib.crypto_sign_open
    t = time.perf_counter()
    for msg, sig in items:
        sm = sig + msg
        if c_open(out, mlen, sm, len(sm), public) != 0:
            raise AssertionError("bad signature in the benchmark data")
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000, help="receipts (about; one "
                    "emergency-credit receipt per 96 top-ups comes on top of the vouchers)")
    ap.add_argument("--rounds", type=int, default=10,
                    help="import in this many files, alternating with raw verification")
    ap.add_argument("--dir", help="where to put the fresh database (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the import and reconcile (to stderr)")
    args = ap.parse_args(argv)
    n_vouchers = max(1, args.count * 96 // 97)
    args.rounds = max(1, min(args.rounds, n_vouchers))

    prof = None
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
    work = tempfile.mkdtemp(prefix="bench-reconcile-", dir=args.dir)
    try:
        t_setup = time.perf_counter()
        path = os.path.join(work, "bench.db")
        conn = db.create(path)
        keystore.new_key(conn, "bench", seed=ISSUER_SEED)
        meter = nacl.signing.SigningKey(METER_SEED)
        public = bytes(meter.verify_key)
        registry.add_device(conn, DEVICE, max_voucher=10000, max_credit=10000,
                            public_key=public)
        signer = keystore.unlock_active(conn, "bench")
        vouchers = issuer.issue(conn, signer, DEVICE, 1050, n_vouchers, now=T0 - 86400,
                                batch_size=10000)
        raws = make_receipts(vouchers, meter)
        n = len(raws)
        per = [n // args.rounds] * args.rounds
        per[-1] += n - sum(per)
        files, start = [], 0
        for k, m in enumerate(per):
            f = os.path.join(work, "receipts-%02d.cbor" % k)
            receipts_io.write_receipts(f, raws[start:start + m])
            files.append((f, [(p.tbs, p.sig) for p in
                              (receipts_io.parse(r) for r in raws[start:start + m])]))
            start += m
        del raws, vouchers
        t_setup = time.perf_counter() - t_setup

        t_import = t_api = t_lib = 0.0
        for f, items in files:
            if prof:
                prof.enable()
            t = time.perf_counter()
            res = reconcile.import_files(conn, [f])
            t_import += time.perf_counter() - t
            if prof:
                prof.disable()
            assert res.new == len(items) and res.bad == 0, (res.new, res.bad)
            t_api += raw_api(items, public)
            t_lib += raw_lib(items, public)
        if prof:
            prof.enable()
        t = time.perf_counter()
        result = reconcile.reconcile(conn, now=T0)
        t_reconcile = time.perf_counter() - t
        if prof:
            prof.disable()
        assert result.anomalies == [], result.anomalies[:5]
        assert result.count["redeemed"] == n_vouchers and result.receipts == n
        conn.close()
        db_bytes = sum(os.path.getsize(os.path.join(work, f)) for f in os.listdir(work)
                       if f.startswith("bench.db"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    t_total = t_import + t_reconcile
    rate, api, bare = n / t_total, n / t_api, n / t_lib
    out = {
        "receipts": n,
        "vouchers": n_vouchers,
        "rounds": args.rounds,
        "import_seconds": round(t_import, 3),
        "reconcile_seconds": round(t_reconcile, 3),
        "reconcile_rate": round(rate),
        "import_rate": round(n / t_import),
        "raw_verify_rate": round(api),
        "ratio": round(rate / api, 3),
        "raw_verify_rate_lib": round(bare),
        "ratio_vs_lib": round(rate / bare, 3),
        "goal": 0.7,
        "setup_seconds": round(t_setup, 1),
        "database_bytes": db_bytes,
        "durable": "WAL, synchronous=FULL; one fsync'd COMMIT per imported file and one "
                   "for the reconciliation",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print("reconcile : %d receipts in %.2f s = %d receipts/s (import %.2f s with signature "
              "check, in %d files; reconcile %.2f s; durable)"
              % (n, t_total, rate, t_import, args.rounds, t_reconcile))
        print("raw PyNaCl: %d verifies/s  VerifyKey(public).verify(msg, sig)" % api)
        print("            %d verifies/s  libsodium crypto_sign_open, reused buffers (what "
              "the importer calls)" % bare)
        print("ratio     : %.3f of VerifyKey.verify (goal >= 0.7); %.3f of bare libsodium"
              % (out["ratio"], out["ratio_vs_lib"]))
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    return 0 if out["ratio"] >= 0.7 else 1


if __name__ == "__main__":
    sys.exit(main())
