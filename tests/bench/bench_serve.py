#!/usr/bin/env python3
"""Vending service benchmark (issue 13): `topup serve` under load, against in-process
issuance measured in the same run.

    .venv/bin/python tests/bench/bench_serve.py [--seconds 3] [--clients 1,16,128]
        [--workers 1,2] [--backends sqlite,postgresql] [--pg-url URL] [--receipts 20000]
        [--json]

Single-voucher requests: POST /v1/vouchers {device, amount} with a fresh Idempotency-Key,
one voucher each (a sequence reserved, signed, stored with its idempotency answer and
audit row in one durable transaction), from 1, 16 and 128 concurrent clients on
keep-alive connections, spread over 64 registered meters. The load generator runs in a
process of its own (raw asyncio HTTP/1.1, so that it costs little CPU and shares no GIL
with the server) for --seconds after a 1 s warm-up; requests/s counts the 201 answers
completed inside that window; latency is request written to answer read, p50 and p99 of
those answers. The server is `topup serve
--workers N` (N = 1 and 2) on a fresh database: SQLite (WAL, synchronous=FULL) and
PostgreSQL (a server this script starts with initdb/pg_ctl from /usr/lib/postgresql/*/bin,
fsync and synchronous_commit ON — durable, unlike the test fixture's — or --pg-url /
$TOPUP_BENCH_PG_URL, an empty database you own).

Baseline, same run, same database kind: host.issuer.issue of one voucher per transaction
in this process for --seconds; each HTTP figure is also given as a ratio to it.

Receipts: N receipts (the meter's signed top-ups, tests/bench/bench_reconcile.py) in one
export file, imported by `topup receipts import FILE` (the command, timed from start to
exit, interpreter start-up included), by host.reconcile.import_files in this process,
and by POST /v1/receipts over HTTP (application/cbor-seq, bodies of up to 10,000
receipts), each into a fresh copy of the same SQLite database; receipts per second and
the ratios HTTP / CLI and HTTP / in-process.

Bounded: with the defaults the whole run takes about 2 minutes on a 2-core machine.
Everything (the load generator included) shares the machine's cores.
"""
import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from tests import pg_server  # noqa: E402 - the same throw-away cluster as the tests'
from tests.serve_process import ServeProcess  # noqa: E402

PASS = "bench serve passphrase"
N_DEVICES = 64
TOPUP = os.path.join(os.path.dirname(sys.executable), "topup")


def _eui(i):
    return "70-b3-d5-f0-00-%02x-%02x-%02x" % (0xB0, i >> 8, i & 0xFF)


def _pct(sorted_values, p):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(round(p * (len(sorted_values) - 1))))]


# --- the load generator (its own process) --------------------------------------------------

async def _client(host, port, token, devices, k, clients, warm_at, stop_at, lat, counts):
    reader, writer = await asyncio.open_connection(host, port)
    i = k
    try:
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            body = json.dumps({"device": devices[i % len(devices)], "amount": 500}).encode()
            i += clients
            head = ("POST /v1/vouchers HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
                    "Content-Type: application/json\r\nIdempotency-Key: %s\r\n"
                    "Content-Length: %d\r\n\r\n" % (host, port, token, uuid.uuid4().hex,
                                                    len(body))).encode()
            writer.write(head + body)
            resp = await reader.readuntil(b"\r\n\r\n")
            status = int(resp[9:12])
            length = 0
            close = False
            for line in resp.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
            end = time.perf_counter()
            if warm_at <= end <= stop_at:       # answers completed inside the window
                if status == 201:
                    lat.append(end - start)
                    counts["ok"] += 1
                else:
                    counts[str(status)] = counts.get(str(status), 0) + 1
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def _load(host, port, token, devices, clients, seconds, warmup):
    lat, counts = [], {"ok": 0}
    t0 = time.perf_counter()
    warm_at, stop_at = t0 + warmup, t0 + warmup + seconds
    await asyncio.gather(*(_client(host, port, token, devices, k, clients, warm_at, stop_at,
                                   lat, counts) for k in range(clients)))
    return lat, counts


def loadgen(spec):
    lat, counts = asyncio.run(_load(spec["host"], spec["port"], spec["token"], spec["devices"],
                                    spec["clients"], spec["seconds"], spec["warmup"]))
    lat.sort()
    return {"clients": spec["clients"], "ok": counts["ok"], "errors": {
        k: v for k, v in counts.items() if k != "ok"}, "rps": counts["ok"] / spec["seconds"],
        "p50_ms": _pct(lat, 0.5) * 1000 if lat else None,
        "p99_ms": _pct(lat, 0.99) * 1000 if lat else None}


# --- databases -------------------------------------------------------------------------------

def start_postgres(durable):
    """A throw-away cluster (tests/pg_server.py), durable unless asked: fsync and
    synchronous_commit on, as a supplier would run it."""
    bin_dir = pg_server.bindir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin "
                           "(`make postgres`), and no --pg-url")
    return pg_server.PgServer(bin_dir, durable=durable, prefix="bench-pg-").start()


def setup(target, devices=True, meter_public=None):
    """A supplier database at `target`: the issuer key, N_DEVICES meters, tokens. Returns
    (issue token, ingest token)."""
    from host import db, keystore, registry
    from host.api import auth
    conn = db.create(target)
    try:
        keystore.new_key(conn, PASS)
        if devices:
            for i in range(N_DEVICES):
                registry.add_device(conn, registry.parse_eui64(_eui(i)), max_voucher=10000,
                                    max_credit=10_000_000)
        if meter_public is not None:
            from bench_reconcile import DEVICE
            registry.add_device(conn, DEVICE, max_voucher=10000, max_credit=10000,
                                public_key=meter_public)
        _, issue = auth.new_token(conn, ["issue"])
        _, ingest = auth.new_token(conn, ["ingest"])
        return issue, ingest
    finally:
        conn.close()


def in_process(target, seconds):
    """One voucher per transaction, host.issuer in this process: (per second, p50, p99)."""
    from host import db, issuer, keystore, registry
    conn = db.open_db(target)
    try:
        signer = keystore.unlock_active(conn, PASS)
        devices = [registry.parse_eui64(_eui(i)) for i in range(N_DEVICES)]
        lat = []
        i = 0
        t0 = time.perf_counter()
        warm = t0 + 0.3
        stop = warm + seconds
        while True:
            t = time.perf_counter()
            if t >= stop:
                break
            issuer.issue(conn, signer, devices[i % N_DEVICES], 500, 1)
            i += 1
            if t >= warm:
                lat.append(time.perf_counter() - t)
        lat.sort()
        return {"rps": len(lat) / seconds, "p50_ms": _pct(lat, 0.5) * 1000,
                "p99_ms": _pct(lat, 0.99) * 1000, "ok": len(lat)}
    finally:
        conn.close()


class Serve(ServeProcess):
    """`topup serve --workers N` on `target` (tests/serve_process.py), its output in the
    run's directory."""
    count = 0

    def __init__(self, target, workers, work, pool_size=16):
        Serve.count += 1
        super().__init__(dict(os.environ, TOPUP_DB=target, TOPUP_PASSPHRASE=PASS),
                         os.path.join(work, "serve-%d.log" % Serve.count), "--workers",
                         str(workers), "--pool-size", str(pool_size))
        try:
            self.ready(timeout=60)
        except AssertionError as e:
            raise RuntimeError(str(e)) from None
        if workers > 1:
            time.sleep(1.0)  # let every worker finish starting


def run_load(port, token, clients, seconds):
    spec = {"host": "127.0.0.1", "port": port, "token": token, "clients": clients,
            "seconds": seconds, "warmup": 1.0, "devices": [_eui(i) for i in range(N_DEVICES)]}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--loadgen",
                        json.dumps(spec)], capture_output=True, text=True,
                       timeout=seconds + 120)
    if r.returncode:
        raise RuntimeError("load generator failed: %s" % r.stderr[-2000:])
    return json.loads(r.stdout)


# --- receipts ---------------------------------------------------------------------------------

def receipts_bench(work, n):
    import httpx
    import nacl.signing
    from bench_reconcile import METER_SEED, T0, DEVICE, make_receipts
    from host import db, issuer, keystore, receipts_io
    meter = nacl.signing.SigningKey(METER_SEED)
    base = os.path.join(work, "receipts-base.db")
    setup(base, devices=False, meter_public=bytes(meter.verify_key))
    conn = db.open_db(base)
    signer = keystore.unlock_active(conn, PASS)
    vouchers = issuer.issue(conn, signer, DEVICE, 1050, max(1, n * 96 // 97),
                            now=T0 - 86400, batch_size=10000)
    conn.close()
    raws = make_receipts(vouchers, meter)
    path = os.path.join(work, "receipts.cbor")
    receipts_io.write_receipts(path, raws)
    # the CLI
    cli_db = os.path.join(work, "receipts-cli.db")
    shutil.copy(base, cli_db)
    env = dict(os.environ, TOPUP_DB=cli_db, TOPUP_PASSPHRASE=PASS)
    t = time.perf_counter()
    r = subprocess.run([TOPUP, "receipts", "import", path], env=env, capture_output=True,
                       text=True)
    cli_s = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError("topup receipts import failed: %s" % r.stderr)
    # the same import in this process (no interpreter start-up)
    lib_db = os.path.join(work, "receipts-lib.db")
    shutil.copy(base, lib_db)
    from host import reconcile
    conn = db.open_db(lib_db)
    t = time.perf_counter()
    reconcile.import_files(conn, [path])
    lib_s = time.perf_counter() - t
    conn.close()
    # over HTTP, into a copy of the same database
    http_db = os.path.join(work, "receipts-http.db")
    shutil.copy(base, http_db)
    conn = db.open_db(http_db)
    from host.api import auth
    _, token = auth.new_token(conn, ["ingest"])
    conn.close()
    server = Serve(http_db, 1, work)
    try:
        chunk = 10000
        bodies = [receipts_io.encode_cbor(raws[i:i + chunk]) for i in range(0, len(raws), chunk)]
        with httpx.Client(timeout=120, headers={"Authorization": "Bearer " + token,
                                                "Content-Type": "application/cbor-seq"}) as c:
            t = time.perf_counter()
            new = 0
            for body in bodies:
                resp = c.post(server.url + "/v1/receipts", content=body)
                if resp.status_code != 200:
                    raise RuntimeError("POST /v1/receipts: %d %s" % (resp.status_code,
                                                                     resp.text[:500]))
                new += resp.json()["new"]
            http_s = time.perf_counter() - t
    finally:
        server.stop()
    if new != len(raws):
        raise RuntimeError("HTTP import stored %d of %d receipts" % (new, len(raws)))
    return {"receipts": len(raws), "cli_s": cli_s, "cli_rps": len(raws) / cli_s,
            "http_s": http_s, "http_rps": len(raws) / http_s,
            "ratio": cli_s / http_s, "in_process_s": lib_s,
            "in_process_rps": len(raws) / lib_s, "ratio_in_process": lib_s / http_s}


# --- main -------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per point")
    ap.add_argument("--clients", default="1,16,128")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--pg-url", default=os.environ.get("TOPUP_BENCH_PG_URL"),
                    help="an empty PostgreSQL database to use instead of starting a server "
                         "(env TOPUP_BENCH_PG_URL)")
    ap.add_argument("--pg-no-fsync", action="store_true",
                    help="start PostgreSQL with fsync and synchronous_commit off (NOT durable: "
                         "shows what the disk's flushes cost)")
    ap.add_argument("--pool-size", type=int, default=16,
                    help="topup serve --pool-size (database connections per process)")
    ap.add_argument("--receipts", type=int, default=20000, help="0: skip the receipts part")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loadgen:
        print(json.dumps(loadgen(json.loads(args.loadgen))))
        return 0
    os.environ.setdefault("TOPUP_INSECURE_FAST_KDF", "1")  # the throw-away key's unlock
    clients = [int(c) for c in args.clients.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    backends = args.backends.split(",")
    work = tempfile.mkdtemp(prefix="bench-serve-")
    out = {"machine": "%s, %d cores, Python %s" % (platform.machine(), os.cpu_count(),
                                                    platform.python_version()),
           "seconds": args.seconds, "issue": [], "receipts": None}
    pg = None
    t_all = time.perf_counter()
    say = (lambda *a: None) if args.json else (lambda s: print(s, flush=True))
    try:
        for backend in backends:
            if backend == "sqlite":
                def target_factory(k=[0]):
                    k[0] += 1
                    return os.path.join(work, "issue-%d.db" % k[0])
            elif backend == "postgresql":
                if args.pg_url:
                    urls = [args.pg_url]

                    def target_factory():
                        if not urls:
                            raise RuntimeError("--pg-url gives one database: use "
                                               "--workers with one value")
                        return urls.pop()
                else:
                    if pg is None:
                        pg = start_postgres(durable=not args.pg_no_fsync)

                    def target_factory():
                        return pg.url(pg.create_database("bench_" + uuid.uuid4().hex[:8]))
            else:
                raise SystemExit("unknown backend %r" % backend)
            target = target_factory()
            setup(target)
            base = in_process(target, args.seconds)
            say("%-10s in-process, one voucher per transaction: %7.0f /s  p50 %6.2f ms  "
                "p99 %6.2f ms" % (backend, base["rps"], base["p50_ms"], base["p99_ms"]))
            row = {"backend": backend, "in_process": base, "http": []}
            out["issue"].append(row)
            for w in workers:
                target = target_factory()
                token, _ = setup(target)
                server = Serve(target, w, work, args.pool_size)
                try:
                    for c in clients:
                        r = run_load(server.port, token, c, args.seconds)
                        r["workers"] = w
                        r["ratio"] = r["rps"] / base["rps"]
                        row["http"].append(r)
                        say("%-10s %d worker%s %3d client%s: %7.0f req/s  p50 %7.2f ms  p99 "
                            "%7.2f ms  ratio %.2f%s" % (
                                backend, w, " " if w == 1 else "s", c, " " if c == 1 else "s",
                                r["rps"], r["p50_ms"] or 0, r["p99_ms"] or 0, r["ratio"],
                                "  errors %s" % r["errors"] if r["errors"] else ""))
                finally:
                    server.stop()
        if args.receipts:
            rec = receipts_bench(work, args.receipts)
            out["receipts"] = rec
            say("receipts   %d: `topup receipts import` %.2f s (%.0f /s), POST /v1/receipts "
                "%.2f s (%.0f /s): ratio %.2f; import_files in-process %.2f s (%.0f /s): "
                "ratio %.2f" % (rec["receipts"], rec["cli_s"], rec["cli_rps"], rec["http_s"],
                                rec["http_rps"], rec["ratio"], rec["in_process_s"],
                                rec["in_process_rps"], rec["ratio_in_process"]))
    finally:
        if pg is not None:
            try:
                pg.stop()
            except Exception as e:  # noqa: BLE001 - say so; the figures are still good
                print("bench_serve: could not stop PostgreSQL: %s" % e, file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    out["total_s"] = time.perf_counter() - t_all
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print("(%s; %.0f s in all)" % (out["machine"], out["total_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
