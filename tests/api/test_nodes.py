"""Two `topup serve` processes on one database (SQLite file or PostgreSQL) under concurrent
load from threads, one killed with SIGKILL mid-run (issue 13): no (device, sequence) is
reused or skipped, every 201 answer's voucher is stored, and retrying the killed node's
requests against the surviving node with the same Idempotency-Key returns the stored
voucher or issues one — never two for a key."""
import collections
import concurrent.futures
import json
import threading

import httpx

from .conftest import DEVICE, OTHER

THREADS = 8
PER_THREAD = 20
KILL_AFTER = 50  # answers received before node A is killed


def test_two_nodes_one_killed_mid_run(supplier, serve):
    a, b = serve(wait=False), serve(wait=False)
    a.ready(), b.ready()
    _, h = supplier.token("issue")
    answered = collections.Counter()
    lock = threading.Lock()
    enough = threading.Event()
    outcomes = {}  # key -> (body, node url, status or None, content or None)

    def worker(t):
        with httpx.Client(timeout=30) as c:
            for i in range(PER_THREAD):
                key = "n-%d-%d" % (t, i)
                body = {"device": DEVICE if i % 2 else OTHER, "amount": 100 + t * 10 + i % 7}
                node = a if (t + i) % 2 == 0 else b
                try:
                    r = c.post(node.url + "/v1/vouchers", json=body,
                               headers={**h, "Idempotency-Key": key})
                    outcomes[key] = (body, node, r.status_code, r.content)
                except httpx.HTTPError:
                    outcomes[key] = (body, node, None, None)  # no answer: the client retries
                with lock:
                    answered["n"] += 1
                    if answered["n"] >= KILL_AFTER:
                        enough.set()

    def killer():
        enough.wait(60)
        a.kill()

    with concurrent.futures.ThreadPoolExecutor(THREADS + 1) as pool:
        k = pool.submit(killer)
        list(pool.map(worker, range(THREADS)))
        k.result()
    assert a.proc.returncode == -9
    lost = [key for key, o in outcomes.items() if o[2] is None]
    assert lost, "the kill should have interrupted some requests to node A"
    assert all(o[2] in (201, None) for o in outcomes.values()), \
        {o[2] for o in outcomes.values()}

    # Retry everything sent to node A against node B with the same key.
    final = {key: o[3] for key, o in outcomes.items() if o[2] == 201}
    with httpx.Client(base_url=b.url, timeout=30) as c:
        for key, (body, node, status, content) in outcomes.items():
            if node is not a:
                continue
            r = c.post("/v1/vouchers", json=body, headers={**h, "Idempotency-Key": key})
            assert r.status_code == 201, r.text
            if status == 201:
                assert r.content == content  # answered before the kill: the same bytes
            final[key] = r.content
    assert len(final) == THREADS * PER_THREAD

    # The database: one voucher per key, no sequence reused or skipped, every answer stored.
    vouchers = {bytes(ref).hex(): (bytes(d), s) for d, s, ref in supplier.query(
        "SELECT device, sequence, ref FROM vouchers")}
    stored = {k: bytes(r) for k, r in supplier.query("SELECT key, response FROM idempotency")}
    assert set(stored) == set(final)
    assert len(vouchers) == len(final)
    for key, content in final.items():
        assert stored[key] == content
    seen = set()
    for content in final.values():
        v = json.loads(content)["vouchers"][0]
        assert v["reference"] in vouchers
        assert vouchers[v["reference"]][1] == v["sequence"]
        assert v["reference"] not in seen
        seen.add(v["reference"])
    for device, nxt in supplier.query("SELECT device, next_sequence FROM devices"):
        seqs = sorted(s for d, s in vouchers.values() if d == bytes(device))
        assert seqs == list(range(1, nxt)), (bytes(device).hex(), seqs[:5], nxt)
