"""Group commit of POST /v1/vouchers (host/api/issuing.py's GroupCommit) and connections
taken inside the one thread call that does a route's work (host/api/deps.py's `lend`), on
SQLite and PostgreSQL: a burst of concurrent requests (each served by a worker thread)
is stored in fewer transactions than requests, every 201 answer's voucher is stored,
each device's sequences are contiguous, a retry returns the same bytes, and a bad request
in the middle of the burst gets its own problem while the others succeed."""
import asyncio
import json
import sqlite3
import time

import httpx

from host import issuer
from host.api.app import create_app

from .conftest import DEVICE, OTHER, PASSPHRASE, UNKNOWN


def burst(app, requests):
    """Send [(method, path, json body or None, headers)] all at once; the answers."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://service", timeout=60) as c:
            return await asyncio.gather(*(c.request(m, p, json=b, headers=h)
                                          for m, p, b, h in requests))
    return asyncio.run(go())


def vouchers_of(supplier):
    return {bytes(ref).hex(): (bytes(d), s, a) for d, s, a, ref in supplier.query(
        "SELECT device, sequence, amount, ref FROM vouchers")}


def contiguous(supplier, stored):
    for device, nxt in supplier.query("SELECT device, next_sequence FROM devices"):
        seqs = sorted(s for d, s, _ in stored.values() if d == bytes(device))
        assert seqs == list(range(1, nxt)), (bytes(device).hex(), seqs, nxt)


def test_a_burst_is_group_committed_and_bad_requests_fail_alone(supplier):
    _, h = supplier.token("issue", "read")
    app = create_app(supplier.target, PASSPHRASE)
    reqs, expect = [], {}
    for i in range(48):
        key = "g-%d" % i
        body = {"device": DEVICE if i % 2 else OTHER, "amount": 100 + i, "count": 1 + i % 3}
        status = 201
        if i == 20:
            body["amount"] = 600          # over OTHER's £5 per-voucher maximum
            status = 422
        elif i == 21:
            body["device"] = UNKNOWN
            status = 404
        elif i == 22:
            body = {"device": DEVICE, "amount": "lots"}
            status = 422
        elif i == 30:
            key = "g-29"                  # the same key and body as request 29, at once
            body = dict(reqs[29][2])
        elif i == 31:
            key = "g-28"                  # request 28's key with another body
            body = dict(reqs[28][2], amount=450)
            status = expect[28] = (201, 409)  # the one stored first is 201, the other 409
        expect[i] = status
        reqs.append(("POST", "/v1/vouchers", body, {**h, "Idempotency-Key": key}))
    try:
        answers = burst(app, reqs)
        group = app.state.group_commit
        for i, r in enumerate(answers):
            ok = expect[i] if isinstance(expect[i], tuple) else (expect[i],)
            assert r.status_code in ok, (i, r.status_code, r.text)
            if r.status_code != 201:
                assert r.headers["content-type"] == "application/problem+json"
        assert answers[20].json()["detail"].startswith("amount £6.00 is over")
        assert answers[30].content == answers[29].content  # one voucher for one key
        assert {answers[28].status_code, answers[31].status_code} == {201, 409}
        assert group.jobs >= 43 and group.commits < group.jobs, (group.jobs, group.commits)

        stored = vouchers_of(supplier)
        issued = {}
        for i, r in enumerate(answers):
            if r.status_code == 201:
                for v in r.json()["vouchers"]:
                    issued[v["reference"]] = v["sequence"]
                    assert stored[v["reference"]][1] == v["sequence"]
        assert set(issued) == set(stored)               # nothing stored without an answer
        contiguous(supplier, stored)
        keys = dict(supplier.query("SELECT key, response FROM idempotency"))
        assert len(keys) == 43 and all(bytes(keys[r[3]["Idempotency-Key"]]) ==
                                       answers[i].content for i, r in enumerate(reqs)
                                       if answers[i].status_code == 201)
        assert supplier.query("SELECT count(*) FROM audit WHERE action = 'voucher'") == [(43,)]
        assert supplier.query("SELECT count(DISTINCT batch) FROM vouchers") == [(43,)]

        # retried after the burst: the same bytes, marked replayed; nothing new stored
        again = burst(app, [reqs[i] for i in (0, 1, 29, 47)])
        for i, r in zip((0, 1, 29, 47), again):
            assert r.status_code == 201 and r.content == answers[i].content
            assert r.headers["idempotent-replayed"] == "true"
        assert vouchers_of(supplier) == stored
    finally:
        app.state.pool.close()


def test_a_failing_batch_is_retried_one_request_at_a_time(supplier, monkeypatch):
    """Should a statement of a batch fail all the same, each request is stored alone."""
    real = issuer.issue_group
    failed = []

    def flaky(conn, signer, requests, now=None):
        if len(requests) > 1:
            failed.append(len(requests))
            raise sqlite3.IntegrityError("UNIQUE constraint failed (simulated)")
        return real(conn, signer, requests, now)
    monkeypatch.setattr(issuer, "issue_group", flaky)
    _, h = supplier.token("issue")
    app = create_app(supplier.target, PASSPHRASE)
    try:
        answers = burst(app, [("POST", "/v1/vouchers", {"device": DEVICE, "amount": 100 + i},
                               {**h, "Idempotency-Key": "r-%d" % i}) for i in range(24)])
        assert [r.status_code for r in answers] == [201] * 24, answers[0].text
        assert failed, "the burst should have formed at least one batch"
        stored = vouchers_of(supplier)
        assert len(stored) == 24
        contiguous(supplier, stored)
        assert sorted(a for _, _, a in stored.values()) == list(range(100, 124))
    finally:
        app.state.pool.close()


def test_a_burst_larger_than_a_bounded_pool_is_served(postgres_url):
    """100 requests at once (issuing and reading) on PostgreSQL with a pool of 2
    connections and FastAPI's 40 worker threads: every route takes and gives back its
    connection inside one thread call, so all are answered. (With the connection taken by
    a Depends() in one thread call and used in another, 40 threads waited for the 2
    connections held by requests queued for a thread: 503s after the pool's timeout.)"""
    from .conftest import Supplier
    supplier = Supplier(postgres_url)
    _, h = supplier.token("issue", "read")
    app = create_app(postgres_url, PASSPHRASE, pool_size=2)
    try:
        reqs = []
        for i in range(100):
            if i % 2:
                reqs.append(("GET", "/v1/devices/" + DEVICE, None, h))
            else:
                reqs.append(("POST", "/v1/vouchers", {"device": DEVICE, "amount": 100},
                             {**h, "Idempotency-Key": "p-%d" % i}))
        t0 = time.monotonic()
        answers = burst(app, reqs)
        assert [r.status_code for r in answers] == [201, 200] * 50, \
            sorted({(r.status_code, r.text[:200]) for r in answers})
        assert time.monotonic() - t0 < 8  # the pool's timeout is 10 s
        assert sorted(json.loads(r.content)["vouchers"][0]["sequence"]
                      for r in answers[::2]) == list(range(1, 51))
    finally:
        app.state.pool.close()


def test_a_key_rotated_under_the_service_is_picked_up(supplier):
    """`topup key new --activate` elsewhere: the next request's batch finds its key no
    longer active, unseals the new active key and issues with it."""
    from host import keystore
    _, h = supplier.token("issue")
    app = create_app(supplier.target, PASSPHRASE)
    try:
        first = burst(app, [("POST", "/v1/vouchers", {"device": DEVICE, "amount": 100},
                             {**h, "Idempotency-Key": "rot-1"})])[0]
        conn = supplier.conn()
        try:
            keystore.new_key(conn, PASSPHRASE, activate=True)
            active = bytes(conn.execute("SELECT kid FROM keys WHERE active = 1").fetchone()[0])
        finally:
            conn.close()
        second = burst(app, [("POST", "/v1/vouchers", {"device": DEVICE, "amount": 100},
                              {**h, "Idempotency-Key": "rot-2"})])[0]
        assert (first.status_code, second.status_code) == (201, 201), second.text
        assert first.json()["kid"] != second.json()["kid"] == active.hex()
        assert second.json()["vouchers"][0]["sequence"] == 2
    finally:
        app.state.pool.close()
