"""POST /v1/receipts, GET /v1/reconciliation, GET /v1/anomalies (issue 13): the same import
as `topup receipts import` (all or nothing, duplicates by their bytes), the same
reconciliation as `topup reconcile`, over HTTP with scoped tokens; a meter's push answered
with the acknowledgement the head end relays. Data: the real issuer and meters signing
receipts as the firmware does (tests/host/test_reconcile_data.py)."""
import base64
import hashlib
import json

import pytest
from fastapi.testclient import TestClient

from host import receipts_io, registry
from host.api import auth, receipts as api_receipts
from protocol import ack as ack_format
from tests.host.test_reconcile_data import A, DAY, PASS, T0, World, normal_life

NOW = T0 + 10 * DAY


def make_app(path, passphrase):
    """A's create_app when it is there; else the smallest app serving these routers."""
    try:
        from host.api.app import create_app
    except ImportError:
        create_app = None
    if create_app is not None:
        return create_app(path, passphrase=passphrase)
    from fastapi import FastAPI
    from host.api import metrics
    from host.api.deps import GuardedPool
    from host.api.problems import Problem
    app = FastAPI()
    app.state.pool = GuardedPool(path)
    app.state.passphrase = passphrase

    @app.exception_handler(Problem)
    def _problem(request, exc):
        return exc.response(request.url.path)
    app.include_router(api_receipts.router, prefix="/v1")
    app.include_router(metrics.router)
    metrics.instrument(app)
    return app


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPUP_INSECURE_FAST_KDF", "1")
    w = World(tmp_path / "topup.db")
    yield w
    w.close()


@pytest.fixture
def client(world):
    app = make_app(world.path, PASS)
    with TestClient(app) as c:
        yield c


def bearer(world, *scopes):
    _, token = auth.new_token(world.conn, scopes)
    return {"Authorization": "Bearer " + token}


CBOR = {"Content-Type": "application/cbor-seq"}
JSONL = {"Content-Type": "application/jsonl"}


def post(client, headers, body, ctype=CBOR, **params):
    return client.post("/v1/receipts", content=body, headers={**headers, **ctype},
                       params=params)


def test_ingest_counts_new_and_duplicates_and_matches_the_cli_import(world, client):
    raws = normal_life(world)
    h = bearer(world, "ingest")
    r = post(client, h, receipts_io.encode_cbor(raws[:6]))
    assert r.status_code == 200, r.text
    assert r.json() == {"received": 6, "new": 6, "duplicates": 0, "bad_signature": 0,
                        "unverified": 0}
    # The same receipts again and the rest, as JSON Lines: only the rest is new.
    r = post(client, h, receipts_io.encode_jsonl(raws), JSONL)
    assert r.status_code == 200, r.text
    assert (r.json()["received"], r.json()["new"], r.json()["duplicates"]) == (10, 4, 6)
    r = post(client, h, receipts_io.encode_cbor(raws))
    assert (r.json()["new"], r.json()["duplicates"]) == (0, 10)
    stored = world.conn.execute("SELECT count(*), sum(sig_ok) FROM receipts").fetchone()
    assert stored == (10, 10)
    # The import was the CLI's: one imports row per request that brought something new,
    # named after the token; and an audit row with the token.
    sources = [s for (s,) in world.conn.execute("SELECT source FROM imports ORDER BY batch")]
    assert len(sources) == 2 and all(s.startswith("api:tk_") for s in sources)
    audit = world.conn.execute("SELECT token, action, detail FROM audit WHERE action = 'ingest'"
                               " ORDER BY at").fetchall()
    assert [a[2] for a in audit] == ["received 6, new 6", "received 10, new 4"]
    assert all(a[0].startswith("tk_") for a in audit)


def test_a_bad_signature_is_stored_as_evidence_and_counted(world, client):
    raws = normal_life(world)
    bad = bytearray(raws[0])
    bad[-1] ^= 1
    r = post(client, bearer(world, "ingest"), receipts_io.encode_cbor([bytes(bad)]))
    assert r.status_code == 200 and r.json()["bad_signature"] == 1 and r.json()["new"] == 1


@pytest.mark.parametrize("cut", [1, 40])
def test_a_truncated_body_names_the_item_and_byte_and_stores_nothing(world, client, cut):
    raws = normal_life(world)
    body = receipts_io.encode_cbor(raws[:3])
    r = post(client, bearer(world, "ingest"), body[:-cut])
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/problem+json")
    p = r.json()
    assert p["status"] == 400 and p["type"].endswith("malformed-receipts")
    second = len(receipts_io.encode_cbor(raws[:2]))
    assert p["item"] == 3 and p["offset"] == second, p
    assert "item 3, byte %d" % second in p["detail"] and "nothing imported" in p["detail"]
    assert world.conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 0


def test_a_corrupt_json_line_is_named(world, client):
    raws = normal_life(world)
    lines = receipts_io.encode_jsonl(raws[:3]).split(b"\n")
    lines[1] = b'{"cose_base64": "not base64!"}'
    r = post(client, bearer(world, "ingest"), b"\n".join(lines), JSONL)
    assert r.status_code == 400 and r.json()["line"] == 2, r.json()
    assert "line 2" in r.json()["detail"]
    # not a receipt at all, though well-formed base64
    lines[1] = json.dumps({"cose_base64": base64.b64encode(b"\xa0hello").decode()}).encode()
    r = post(client, bearer(world, "ingest"), b"\n".join(lines), JSONL)
    assert r.status_code == 400 and r.json()["line"] == 2
    assert world.conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 0


def test_wrong_media_type_and_mismatched_body(world, client):
    raws = normal_life(world)
    h = bearer(world, "ingest")
    r = post(client, h, receipts_io.encode_cbor(raws), {"Content-Type": "application/json"})
    assert r.status_code == 415 and "application/cbor-seq" in r.json()["detail"]
    r = post(client, h, receipts_io.encode_jsonl(raws), CBOR)
    assert r.status_code == 400 and r.json()["item"] == 1
    r = post(client, h, b"")
    assert r.status_code == 200 and r.json()["received"] == 0


def test_a_body_over_the_bound_is_413_before_anything_is_read(world, client, monkeypatch):
    raws = normal_life(world)
    body = receipts_io.encode_cbor(raws)
    monkeypatch.setattr(api_receipts, "MAX_BODY", len(body) - 1)
    r = post(client, bearer(world, "ingest"), body)
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert world.conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 0

    def chunks():                                   # no Content-Length: counted as read
        yield body[:100]
        yield body[100:]
    r = client.post("/v1/receipts", content=chunks(),
                    headers={**bearer(world, "ingest"), **CBOR})
    assert r.status_code == 413
    monkeypatch.setattr(api_receipts, "MAX_BODY", len(body))
    assert post(client, bearer(world, "ingest"), body).status_code == 200


def test_scopes(world, client):
    raws = normal_life(world)
    body = receipts_io.encode_cbor(raws)
    assert post(client, {}, body).status_code == 401
    r = post(client, bearer(world, "read", "issue"), body)
    assert r.status_code == 403 and "ingest" in r.json()["detail"]
    assert client.get("/v1/reconciliation", headers=bearer(world, "ingest")).status_code == 403
    assert client.get("/v1/anomalies", headers=bearer(world, "ingest")).status_code == 403
    assert client.get("/v1/anomalies").status_code == 401
    assert world.conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 0


def test_reconciliation_is_the_clis_summary(world, client):
    raws = normal_life(world)
    post(client, bearer(world, "ingest"), receipts_io.encode_cbor(raws))
    read = bearer(world, "read")
    r = client.get("/v1/reconciliation", params={"now": NOW}, headers=read)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["receipts"] == 10 and s["vouchers"] == 15 and s["anomalies"] == 0
    assert s["as_of"] == NOW and s["expired_policy"] == "refund"
    assert s["statuses"]["redeemed"] == {"vouchers": 8, "pence": 6 * 1000 + 2 * 500}
    assert s["statuses"]["outstanding"] == {"vouchers": 7, "pence": 4 * 1000 + 3 * 500}
    assert s["liability_pence"] == 5500 and s["refunds_due_pence"] == 0
    assert s["anomalies_by_kind"] == {} and s["imported_since"] == 0
    # Twice: the same answer, a new run.
    again = client.get("/v1/reconciliation", params={"now": NOW}, headers=read).json()
    assert again["run"] == s["run"] + 1
    assert {k: v for k, v in again.items() if k not in ("run", "at")} == \
        {k: v for k, v in s.items() if k not in ("run", "at")}
    assert client.get("/v1/reconciliation", params={"expired": "never"},
                      headers=read).status_code in (400, 422)


def test_anomalies_are_listed_and_filtered(world, client):
    raws = normal_life(world)
    bad = bytearray(raws[2])
    bad[-1] ^= 1
    body = receipts_io.encode_cbor([r for i, r in enumerate(raws) if i != 2] + [bytes(bad)])
    post(client, bearer(world, "ingest"), body)
    read = bearer(world, "read")
    s = client.get("/v1/reconciliation", params={"now": NOW}, headers=read).json()
    assert s["anomalies_by_kind"] == {"bad_signature": 1}
    r = client.get("/v1/anomalies", headers=read)
    assert r.status_code == 200
    a = r.json()
    assert a["total"] == 1 and a["run"] == s["run"]
    (item,) = a["anomalies"]
    assert item["kind"] == "bad_signature" and item["device"] == registry.format_eui64(A)
    assert item["index"] == 2 and len(item["receipt"]) == 64 and item["meaning"]
    assert client.get("/v1/anomalies", params={"kind": "chain_gap"},
                      headers=read).json()["total"] == 0
    assert client.get("/v1/anomalies", params={"device": registry.format_eui64(A)},
                      headers=read).json()["total"] == 1
    assert client.get("/v1/anomalies", params={"kind": "nonsense"},
                      headers=read).status_code == 400
    assert client.get("/v1/anomalies", params={"device": "zz"}, headers=read).status_code == 400


def test_a_meters_push_is_answered_with_a_signed_acknowledgement(world, client):
    """What `topup headend --to URL` relays: the service stores the push, signs what it
    holds, and a push of a receipt that does not verify is stored but not acknowledged."""
    raws = normal_life(world)
    a_raws = [r for r in raws if receipts_io.parse(r).device == A]
    h = bearer(world, "ingest")
    dev = registry.format_eui64(A)
    r = post(client, h, receipts_io.encode_cbor(a_raws[:4]), device=dev, first=0)
    assert r.status_code == 200, r.text
    ans = r.json()
    assert (ans["new"], ans["next"], ans["first"], ans["commands"]) == (4, 4, 0, [])
    signed = base64.b64decode(ans["ack"])
    got = ack_format.verify(signed, {world.signer.kid: world.signer.public_key}, A)
    assert got.next_index == 4 and got.last_hash == hashlib.sha256(a_raws[3]).digest()
    # A forged receipt at index 4: stored, not held, nothing acknowledged.
    bad = bytearray(a_raws[4])
    bad[-1] ^= 1
    ans = post(client, h, receipts_io.encode_cbor([bytes(bad)]), device=dev, first=4).json()
    assert (ans["new"], ans["next"], ans["ack"], ans["bad_signature"]) == (1, 4, None, 1)
    # Both of device and first, or neither.
    assert post(client, h, b"", device=dev).status_code == 400
    assert post(client, h, b"", device="nonsense", first=0).status_code == 400


def test_a_push_needs_the_passphrase_to_be_acknowledged(world, tmp_path):
    raws = normal_life(world)
    app = make_app(world.path, None)
    with TestClient(app) as c:
        r = post(c, bearer(world, "ingest"), receipts_io.encode_cbor(raws[:1]),
                 device=registry.format_eui64(A), first=0)
        assert r.status_code == 503 and "TOPUP_PASSPHRASE" in r.json()["detail"]
        assert world.conn.execute("SELECT count(*) FROM receipts").fetchone()[0] == 0
        # Plain ingest needs no key.
        assert post(c, bearer(world, "ingest"), receipts_io.encode_cbor(raws)).json()["new"] == 10


# --- `topup headend --to URL` in one process: the meter's own uplink code, the relay, the
# service (TestClient is an httpx.Client, so the relay's ServiceLink talks to it directly).

def _relay_rig(tmp_path, monkeypatch):
    import tests.firmware._fw  # noqa: F401  (the firmware's import paths)
    from boards.fake import Board, HanStream
    from host import db, headend, keystore
    from meter import provisioning
    from meter.app import Meter
    from meter.store import Store
    from tests.firmware._meterkit import DEVICE, ISSUER_SEED, public
    from tests.host.test_headend import Link
    monkeypatch.setenv("TOPUP_INSECURE_FAST_KDF", "1")
    path = str(tmp_path / "supplier.db")
    conn = db.create(path)
    keystore.new_key(conn, PASS, seed=ISSUER_SEED)
    board = Board(now=1790000000)
    board.wan = HanStream()
    store = Store(board.flash)
    store.mount()
    key = provisioning.provision(store, board, DEVICE, [public(ISSUER_SEED)], None, 100)
    registry.add_device(conn, DEVICE, public_key=key)
    _, token = auth.new_token(conn, ["ingest"])
    return conn, path, token, board, Meter(board), Link(board.wan), DEVICE, headend


def _top_ups(board, meter, n):
    from protocol import han
    from tests.firmware._meterkit import issue
    for seq in range(1, n + 1):
        board.feed(han.encode_message(han.SUBMIT, seq, {1: issue(seq, 50)}))
        meter.step()
        board.take_output()


def test_the_relay_passes_the_services_acknowledgement_to_the_meter(tmp_path, monkeypatch):
    conn, path, token, board, meter, link, device, headend = _relay_rig(tmp_path, monkeypatch)
    _top_ups(board, meter, 6)
    with TestClient(make_app(path, PASS)) as c:
        service = headend.ServiceLink("http://testserver", token, client=c)
        relay = headend.RelayHeadEnd(link, "wan:test", service)
        board.set_wan(True)
        for _ in range(8):
            meter.step()
            relay.poll()
    assert meter.ledger.uploaded == 6                 # the service's acknowledgements taken
    assert (relay.pushes, relay.stored, relay.acks, relay.unavailable) == (2, 6, 2, 0)
    assert tuple(conn.execute("SELECT count(*), sum(sig_ok) FROM receipts").fetchone()) == (6, 6)


def test_while_the_service_is_unreachable_the_meter_keeps_its_receipts(tmp_path, monkeypatch):
    import httpx
    conn, path, token, board, meter, link, device, headend = _relay_rig(tmp_path, monkeypatch)
    _top_ups(board, meter, 2)
    calls = []

    def down(request):
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)
    client = httpx.Client(transport=httpx.MockTransport(down))
    slept = []
    service = headend.ServiceLink("http://service.invalid/", token, client=client, budget=0.2,
                                  sleep=slept.append)
    relay = headend.RelayHeadEnd(link, "wan:test", service)
    board.set_wan(True)
    for _ in range(3):
        meter.step()
        relay.poll()
    assert meter.ledger.uploaded == 0 and relay.unavailable >= 1 and relay.pushes == 0
    assert len(calls) > 1 and slept                   # retried, with a pause between tries
    assert calls[0].url.path == "/v1/receipts"
    assert calls[0].url.params["device"] == registry.format_eui64(device)
    # A refusal (here 401: a revoked token) is not retried and lets nothing go either.
    refused = httpx.Client(transport=httpx.MockTransport(
        lambda r: httpx.Response(401, json={"detail": "API token tk_x was revoked"})))
    service = headend.ServiceLink("http://service.invalid", token, client=refused)
    with pytest.raises(headend.ServiceRefused) as e:
        service.push(device, 0, [meter.store.receipt(0)])
    assert e.value.status == 401 and "revoked" in str(e.value)


def test_on_postgresql_ingest_push_reconciliation_and_anomalies(postgres_url, monkeypatch):
    """The same routes on a PostgreSQL database (tests/conftest.py's server)."""
    monkeypatch.setenv("TOPUP_INSECURE_FAST_KDF", "1")
    w = World(postgres_url)
    try:
        raws = normal_life(w)
        a_raws = [r for r in raws if receipts_io.parse(r).device == A]
        bad = bytearray(raws[-1])
        bad[-1] ^= 1
        ingest, read = bearer(w, "ingest"), bearer(w, "read")
        with TestClient(make_app(postgres_url, PASS)) as c:
            ans = post(c, ingest, receipts_io.encode_cbor(a_raws[:3]),
                       device=registry.format_eui64(A), first=0).json()
            assert (ans["new"], ans["next"]) == (3, 3) and ans["ack"]
            body = receipts_io.encode_cbor(raws[:-1] + [bytes(bad)])
            ans = post(c, ingest, body).json()
            assert (ans["received"], ans["new"], ans["duplicates"], ans["bad_signature"]) == \
                (10, 7, 3, 1)
            assert post(c, ingest, body).json()["new"] == 0
            s = c.get("/v1/reconciliation", params={"now": NOW}, headers=read).json()
            assert s["receipts"] == 10 and s["anomalies_by_kind"] == {"bad_signature": 1}
            a = c.get("/v1/anomalies", headers=read).json()
            assert a["total"] == 1 and a["anomalies"][0]["kind"] == "bad_signature"
    finally:
        w.close()


def test_a_burst_larger_than_the_pool_is_served_without_deadlock(world):
    """100 requests at once, a pool that lends at most 2 connections (PostgreSQL's pool is
    bounded) and FastAPI's 40 worker threads: these routes take and give back their
    connection within one thread call, so no request holds a connection while it waits
    for a thread, and every request is answered (Depends(connection) would leave 40
    threads waiting for the 2 connections that requests queued for a thread hold)."""
    import asyncio
    import contextlib
    import threading
    import time

    import httpx
    from host.errors import TopupError
    app = make_app(world.path, PASS)
    real = app.state.pool

    class Bounded:
        def __init__(self):
            self.slots = threading.BoundedSemaphore(2)

        @contextlib.contextmanager
        def connection(self):
            if not self.slots.acquire(timeout=5):
                raise TopupError("database is busy: no pooled connection within 5 s")
            try:
                with real.connection() as conn:
                    yield conn
            finally:
                self.slots.release()

        def close(self):
            real.close()
    app.state.pool = Bounded()
    h = bearer(world, "read")

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://service") as c:
            answers = await asyncio.gather(*(c.get("/v1/anomalies", headers=h)
                                             for _ in range(100)))
        return [r.status_code for r in answers]
    t0 = time.monotonic()
    codes = asyncio.run(burst())
    assert codes == [200] * 100 and time.monotonic() - t0 < 5
    real.close()


def test_headend_to_needs_a_token_and_an_http_url_not_a_database(tmp_path):
    from click.testing import CliRunner
    from host.cli import cli
    env = {"TOPUP_DB": str(tmp_path / "none.db"), "TOPUP_PASSPHRASE": None,
           "TOPUP_API_TOKEN": None}
    r = CliRunner().invoke(cli, ["headend", "--port", "/dev/null", "--to",
                                 "http://127.0.0.1:9"], env=env)
    assert r.exit_code == 2 and "TOPUP_API_TOKEN" in r.output and "ingest" in r.output
    r = CliRunner().invoke(cli, ["headend", "--port", "/dev/null", "--to", "ftp://x",
                                 "--token-env", "MY_TOKEN"], env=dict(env, MY_TOKEN="tk_x"))
    assert r.exit_code == 2 and "http://" in r.output
    assert not (tmp_path / "none.db").exists()          # no database opened or made
