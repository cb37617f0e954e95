"""`topup serve`'s core (issue 13): issuing vouchers and codes with Idempotency-Key, look-up,
void, devices, tokens and scopes, RFC 9457 problems for every bad input, 503 with nothing
half-written when the database goes away. Storage-touching tests run on SQLite and on
PostgreSQL (the `target` fixture)."""
import base64
import concurrent.futures
import os
import re
import sqlite3
import threading
import time

import httpx
import pytest

from host import registry
from host.api import idempotency
from protocol import voucher as pv

from .conftest import DEVICE, DEVICE_BYTES, OTHER, PASSPHRASE, UNKNOWN

PROBLEM = "application/problem+json"


def is_problem(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM, r.headers
    doc = r.json()
    assert doc["status"] == status
    assert doc["type"].startswith("/problems/") and doc["title"] and doc["detail"]
    return doc


def issue(client, headers, key, **body):
    body.setdefault("device", DEVICE)
    body.setdefault("amount", 1050)
    return client.post("/v1/vouchers", json=body, headers={**headers, "Idempotency-Key": key})


# --- issuing ----------------------------------------------------------------------------------

def test_issued_voucher_verifies_with_the_cli_and_is_listed(supplier, client):
    token_id, h = supplier.token("issue")
    r = issue(client, h, "pay-1", amount="£10.50", count=2, expires_in_days=30)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["device"] == DEVICE and doc["amount"] == 1050 and doc["count"] == 2
    assert doc["expires"] == doc["issued"] + 30 * 86400
    assert [v["sequence"] for v in doc["vouchers"]] == [1, 2]
    first = doc["vouchers"][0]
    assert r.headers["location"] == "/v1/vouchers/%s" % first["reference"]
    raw = base64.b64decode(first["cose"])
    assert pv.to_text(raw) == first["text"] and pv.reference(raw).hex() == first["reference"]
    v = supplier.cli("verify", first["text"], "--device", DEVICE)
    assert "£10.50" in v.stdout + v.stderr
    listed = supplier.cli("vouchers", "list").stdout
    for v in doc["vouchers"]:
        assert v["reference"] in listed
    # audited with the token that asked, in the same transaction
    assert supplier.query("SELECT token, action, device, first_seq, last_seq, amount FROM audit "
                          "WHERE action = 'voucher'") == [(token_id, "voucher", DEVICE_BYTES,
                                                           1, 2, 1050)]


def test_retry_returns_the_same_answer_byte_for_byte(supplier, client):
    _, h = supplier.token("issue")
    first = issue(client, h, "pay-2", amount=1050)
    assert first.status_code == 201
    # The same request, the amount written differently, from a rotated token: replayed.
    _, h2 = supplier.token("issue")
    for again in (issue(client, h, "pay-2", amount=1050), issue(client, h2, "pay-2",
                                                                amount="10.50")):
        assert again.status_code == 201
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
    assert supplier.query("SELECT count(*) FROM vouchers") == [(1,)]
    assert supplier.query("SELECT next_sequence FROM devices WHERE device = ?",
                          (DEVICE_BYTES,)) == [(2,)]
    assert supplier.query("SELECT count(*) FROM idempotency") == [(1,)]


def test_same_key_other_body_is_409_and_issues_nothing(supplier, client):
    _, h = supplier.token("issue")
    assert issue(client, h, "pay-3", amount=1050).status_code == 201
    for body in ({"amount": 1051}, {"amount": 1050, "count": 2}, {"device": OTHER, "amount": 100}):
        doc = is_problem(issue(client, h, "pay-3", **body), 409)
        assert doc["type"] == "/problems/idempotency-conflict"
    # a code request under a voucher's key is another request too
    r = client.post("/v1/codes", json={"device": DEVICE, "amount": 1050},
                    headers={**h, "Idempotency-Key": "pay-3"})
    is_problem(r, 409)
    assert supplier.query("SELECT count(*) FROM vouchers") == [(1,)]


def test_idempotency_key_is_required_and_checked(supplier, client):
    _, h = supplier.token("issue")
    doc = is_problem(client.post("/v1/vouchers", json={"device": DEVICE, "amount": 100},
                                 headers=h), 400)
    assert "Idempotency-Key" in doc["detail"]
    is_problem(issue(client, h, "has space"), 400)
    is_problem(issue(client, h, "x" * 256), 400)
    assert supplier.query("SELECT count(*) FROM vouchers") == [(0,)]


def concurrent_requests_with_one_key_yield_one_voucher(supplier, server):
    _, h = supplier.token("issue")
    body = {"device": DEVICE, "amount": 700}
    go = threading.Barrier(12)

    def one(_):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            go.wait()
            return c.post("/v1/vouchers", json=body, headers={**h, "Idempotency-Key": "same"})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    assert {a.status_code for a in answers} == {201}
    assert len({a.content for a in answers}) == 1
    assert supplier.query("SELECT count(*) FROM vouchers") == [(1,)]
    assert supplier.query("SELECT count(*) FROM audit WHERE action = 'voucher'") == [(1,)]


def test_codes_are_issued_idempotently_and_verify(supplier, client):
    import nacl.bindings
    import nacl.utils
    from host import keystore
    conn = supplier.conn()
    try:
        ka_secret = nacl.utils.random(32)
        meter = registry.parse_eui64("10-20-30-40-50-60-70-80")
        registry.add_device(conn, meter, 10000, 50000, public_key=b"\x07" * 32,
                            ka_public=nacl.bindings.crypto_scalarmult_base(ka_secret),
                            code_kid=keystore.active_code_key(conn).kid)
    finally:
        conn.close()
    _, h = supplier.token("issue")
    body = {"device": "10-20-30-40-50-60-70-80", "amount": "£20"}
    r = client.post("/v1/codes", json=body, headers={**h, "Idempotency-Key": "code-1"})
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["form"] == "code" and doc["amount"] == 2000
    code = doc["codes"][0]["code"]
    assert len(code.replace(" ", "")) == 20
    again = client.post("/v1/codes", json=body, headers={**h, "Idempotency-Key": "code-1"})
    assert again.content == r.content
    got = client.get("/v1/vouchers/" + doc["codes"][0]["reference"], headers=supplier.token(
        "read")[1]).json()
    assert got["form"] == "code" and got["code"] == code
    v = supplier.cli("verify", code.replace(" ", ""), "--device", "10-20-30-40-50-60-70-80",
                     check=False)
    assert v.returncode == 0, v.stdout + v.stderr
    # a code over £655.35 is refused with the CLI's words
    doc = is_problem(client.post("/v1/codes", json={**body, "amount": 70000},
                                 headers={**h, "Idempotency-Key": "code-2"}), 422)
    assert "per-voucher maximum" in doc["detail"] or "keypad code" in doc["detail"]


# --- bad input ----------------------------------------------------------------------------

def test_unknown_device_is_404(supplier, client):
    _, h = supplier.token("issue", "read")
    doc = is_problem(issue(client, h, "k-unknown", device=UNKNOWN), 404)
    assert UNKNOWN in doc["detail"]
    is_problem(client.get("/v1/devices/" + UNKNOWN, headers=h), 404)
    is_problem(issue(client, h, "k-bad", device="not-a-device"), 422)


def test_over_limit_amount_is_422_with_the_cli_message(supplier, client):
    _, h = supplier.token("issue")
    doc = is_problem(issue(client, h, "k-over", device=OTHER, amount="£5.01"), 422)
    cli = supplier.cli("issue", OTHER, "5.01", check=False)
    assert cli.returncode == 2
    assert doc["detail"] in cli.stderr  # the CLI's own words
    for amount in (0, -5, "£0", "1.005", "ten pounds", True, 10**12):
        is_problem(issue(client, h, "k-over", amount=amount), 422)
    assert supplier.query("SELECT count(*) FROM vouchers") == [(0,)]
    assert supplier.query("SELECT count(*) FROM idempotency") == [(0,)]
    # a refusal is not stored: the same key works once the request is right
    assert issue(client, h, "k-over", device=OTHER, amount="£5").status_code == 201


def test_malformed_json_wrong_shapes_and_unknown_routes_are_problems(supplier, client):
    _, h = supplier.token("issue")
    hk = {**h, "Idempotency-Key": "k-json", "Content-Type": "application/json"}
    doc = is_problem(client.post("/v1/vouchers", content=b'{"device": ', headers=hk), 400)
    assert "JSON" in doc["detail"]
    is_problem(client.post("/v1/vouchers", content=b"[1, 2]", headers=hk), 400)
    doc = is_problem(client.post("/v1/vouchers", content=b'{"device": "%s"}' % DEVICE.encode(),
                                 headers=hk), 422)
    assert doc["errors"][0]["loc"] == ["body", "amount"]
    is_problem(client.post("/v1/vouchers", json={"device": DEVICE, "amount": 5, "x": 1},
                           headers=hk), 422)
    is_problem(client.get("/v1/nothing-here", headers=h), 404)
    is_problem(client.delete("/v1/vouchers", headers=h), 405)
    is_problem(client.get("/v1/vouchers/zz", headers=supplier.token("read")[1]), 400)


def test_body_over_the_bound_is_413_before_it_is_read(supplier, client):
    _, h = supplier.token("issue")
    hk = {**h, "Idempotency-Key": "k-big", "Content-Type": "application/json"}
    big = b'{"device": "%s", "amount": 5, "pad": "%s"}' % (DEVICE.encode(), b"x" * 70000)
    doc = is_problem(client.post("/v1/vouchers", content=big, headers=hk), 413)
    assert "65536" in doc["detail"]
    # no Content-Length (chunked): refused too
    is_problem(client.post("/v1/vouchers", content=iter([big[:40000], big[40000:]]),
                           headers=hk), 413)
    assert supplier.query("SELECT count(*) FROM vouchers") == [(0,)]


def _raw_request(url, head, chunks=(), read_after=0.0):
    """Send a request over a plain socket, chunk by chunk, until the server answers; the
    (status line, bytes of body sent before the answer came)."""
    import socket
    import select
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    try:
        s.sendall(head)
        sent = 0
        for chunk in chunks:
            if select.select([s], [], [], read_after)[0]:
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        s.settimeout(10)
        data = s.recv(65536)
        return data.split(b"\r\n", 1)[0].decode(), sent, data
    finally:
        s.close()


def body_bound_holds_on_the_wire_before_the_body_arrives(supplier, server):
    _, h = supplier.token("issue")
    auth_line = ("Authorization: %s\r\n" % h["Authorization"]).encode()
    # Content-Length over the bound: answered at once, no body sent at all.
    head = (b"POST /v1/vouchers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: wire-1\r\n" + auth_line + b"Content-Length: 10000000\r\n\r\n")
    status, sent, data = _raw_request(server.url, head)
    assert status.startswith("HTTP/1.1 413") and sent == 0
    assert b"application/problem+json" in data
    # Chunked with no length: answered once the bound is passed, long before the 1 MB end.
    head = (b"POST /v1/vouchers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: wire-2\r\n" + auth_line + b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"400\r\n" + b" " * 1024 + b"\r\n"
    status, sent, _ = _raw_request(server.url, head, [chunk] * 1024, read_after=0.01)
    assert status.startswith("HTTP/1.1 413"), status
    assert sent < 512 * 1024
    assert supplier.query("SELECT count(*) FROM idempotency WHERE key IN (?, ?)",
                          ("wire-1", "wire-2")) == [(0,)]


def test_tokens_scopes_and_revocation(supplier, client, monkeypatch):
    from host.api import deps
    monkeypatch.setattr(deps, "TOKEN_CACHE_S", 0.3)  # the bound on honouring a revocation
    is_problem(client.get("/v1/devices/" + DEVICE), 401)
    r = client.get("/v1/devices/" + DEVICE, headers={"Authorization": "Bearer nonsense"})
    assert is_problem(r, 401) and r.headers["www-authenticate"].startswith("Bearer")
    is_problem(client.get("/v1/devices/" + DEVICE, headers={
        "Authorization": "Bearer tk_0000000000000000." + "A" * 43}), 401)
    reader_id, reader = supplier.token("read")
    assert client.get("/v1/devices/" + DEVICE, headers=reader).status_code == 200
    doc = is_problem(issue(client, reader, "k-scope"), 403)
    assert "'issue'" in doc["detail"]
    is_problem(client.post("/v1/devices", json={"device": UNKNOWN}, headers=reader), 403)
    # made, listed and revoked with the CLI
    made = supplier.cli("token", "new", "--scope", "admin", "--label", "ops")
    secret = made.stdout.strip()
    admin = {"Authorization": "Bearer " + secret}
    r = client.post("/v1/devices", json={"device": UNKNOWN, "max_voucher": "£20"}, headers=admin)
    assert r.status_code == 201 and r.json()["max_voucher"] == 2000
    is_problem(client.post("/v1/devices", json={"device": UNKNOWN}, headers=admin), 409)
    listing = supplier.cli("token", "list").stdout
    assert secret.split(".")[0] in listing and reader_id in listing and secret not in listing
    assert supplier.query("SELECT count(*) FROM api_tokens WHERE hash = ?", (secret.encode(),)
                          ) == [(0,)]  # stored hashed
    supplier.cli("token", "revoke", reader_id)
    time.sleep(deps.TOKEN_CACHE_S)  # a verified token is remembered at most this long
    doc = is_problem(client.get("/v1/devices/" + DEVICE, headers=reader), 401)
    assert "revoked" in doc["detail"]
    assert supplier.cli("token", "revoke", reader_id, check=False).returncode == 2
    line = [x for x in supplier.cli("token", "list").stdout.splitlines()
            if x.startswith(reader_id)][0]
    assert re.match(r"tk_\w+ +read +\S+ \S+ +\d{4}-\d\d-\d\d \d\d:\d\d +test$", line), line


def test_look_up_and_void(supplier, client):
    _, h = supplier.token("issue", "read")
    doc = issue(client, h, "k-void", amount=300).json()
    ref = doc["vouchers"][0]["reference"]
    got = client.get("/v1/vouchers/" + ref, headers=h).json()
    assert got["status"] == "outstanding" and got["text"] == doc["vouchers"][0]["text"]
    r = client.post("/v1/vouchers/%s/void" % ref, json={"note": "payment failed"}, headers=h)
    assert r.status_code == 200 and r.json()["status"] == "void"
    assert r.json()["void_note"] == "payment failed"
    is_problem(client.post("/v1/vouchers/%s/void" % ref, headers=h), 409)
    is_problem(client.get("/v1/vouchers/" + "0" * 32, headers=h), 404)
    assert supplier.query("SELECT action, first_seq FROM audit WHERE action = 'void'") == [
        ("void", 1)]


def test_health_and_openapi(supplier, client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/vouchers", "/v1/codes", "/v1/vouchers/{reference}",
            "/v1/vouchers/{reference}/void", "/v1/devices", "/v1/devices/{eui64}",
            "/healthz"} <= set(spec["paths"])
    assert "Problem" in spec["components"]["schemas"]


# --- the database going away ----------------------------------------------------------------

def _db_error(supplier):
    if supplier.target.startswith("postgresql"):
        import psycopg
        return psycopg.OperationalError("server closed the connection unexpectedly")
    return sqlite3.OperationalError("disk I/O error")


def test_database_failing_mid_request_is_503_with_nothing_half_written(supplier, client,
                                                                       monkeypatch):
    _, h = supplier.token("issue")
    real_store = idempotency.store_many

    def broken(conn, *a, **kw):  # the vouchers are inserted; the answer's row fails
        raise _db_error(supplier)
    monkeypatch.setattr(idempotency, "store_many", broken)
    doc = is_problem(issue(client, h, "k-503", amount=900, count=3), 503)
    assert "nothing was changed" in doc["detail"]
    assert supplier.query("SELECT count(*) FROM vouchers") == [(0,)]
    assert supplier.query("SELECT count(*) FROM audit WHERE action = 'voucher'") == [(0,)]
    assert supplier.query("SELECT next_sequence FROM devices WHERE device = ?",
                          (DEVICE_BYTES,)) == [(1,)]
    monkeypatch.setattr(idempotency, "store_many", real_store)
    r = issue(client, h, "k-503", amount=900, count=3)  # the retry issues, once
    assert r.status_code == 201
    assert [v["sequence"] for v in r.json()["vouchers"]] == [1, 2, 3]


def test_database_file_removed_is_503_until_it_is_back(sqlite_target, tmp_path):
    from fastapi.testclient import TestClient
    from host.api.app import create_app
    from .conftest import Supplier
    supplier = Supplier(sqlite_target)
    _, h = supplier.token("issue")
    with TestClient(create_app(supplier.target, PASSPHRASE)) as client:
        assert issue(client, h, "k-gone-1").status_code == 201
        moved = str(tmp_path / "elsewhere.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(supplier.target + suffix):
                os.rename(supplier.target + suffix, moved + suffix)
        is_problem(client.get("/healthz"), 503)
        doc = is_problem(issue(client, h, "k-gone-2"), 503)
        assert r"retry" in doc["detail"]
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(moved + suffix):
                os.rename(moved + suffix, supplier.target + suffix)
        assert client.get("/healthz").status_code == 200
        r = issue(client, h, "k-gone-2")
        assert r.status_code == 201 and r.json()["vouchers"][0]["sequence"] == 2
    assert supplier.query("SELECT count(*) FROM vouchers") == [(2,)]


def test_service_without_a_database_refuses_to_start(tmp_path):
    from host.api.app import create_app
    from host.errors import TopupError
    with pytest.raises(TopupError):
        create_app(str(tmp_path / "missing.db"))


def test_serve_process(supplier, serve):
    """A real `topup serve` (one process for three checks: starting one is the slow part)."""
    server = serve()
    concurrent_requests_with_one_key_yield_one_voucher(supplier, server)
    body_bound_holds_on_the_wire_before_the_body_arrives(supplier, server)
    _, h = supplier.token("issue", "read")
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.post("/v1/vouchers", json={"device": DEVICE, "amount": 250},
                   headers={**h, "Idempotency-Key": "proc-1"})
        assert r.status_code == 201
        assert c.get("/v1/vouchers/" + r.json()["vouchers"][0]["reference"],
                     headers=h).json()["amount"] == 250
        assert c.get("/docs").status_code == 200
    assert supplier.query("SELECT count(*) FROM vouchers") == [(2,)]
    server.stop()
    assert server.proc.returncode in (0, -15)  # uvicorn re-raises the SIGTERM it handled


def test_cli_issuance_is_audited_as_cli(supplier):
    supplier.cli("issue", DEVICE, "1.00", "--count", "3")
    assert supplier.query("SELECT token, action, device, first_seq, last_seq, amount FROM "
                          "audit WHERE action = 'voucher'") == [("cli", "voucher", DEVICE_BYTES,
                                                                 1, 3, 100)]


def test_slow_body_is_408_problem():
    """A client that sends its body too slowly gets 408 (the middleware, with its clock
    shortened to 0.2 s)."""
    import asyncio
    from host.api.app import BodyLimit, BodyTooSlow

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    async def trickle():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"{", "more_body": True}

    scope = {"type": "http", "path": "/v1/vouchers", "headers": []}
    with pytest.raises(BodyTooSlow) as e:
        asyncio.run(BodyLimit(app, timeout=0.2)(scope, trickle, None))
    assert e.value.status_code == 408


def test_the_workers_listening_socket_sets_tcp_nodelay():
    """`topup serve --workers N`: the shared socket is made with proto IPPROTO_TCP and
    TCP_NODELAY (uvicorn's own has proto 0, so asyncio never set TCP_NODELAY on its
    connections: ~40 ms a request waiting for delayed ACKs)."""
    import socket
    from host.api.app import listening_socket
    sock = listening_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        sock.listen()
        with socket.create_connection(sock.getsockname()):
            conn, _ = sock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()
