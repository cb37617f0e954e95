"""Issue 13, end to end: the board's WAN uplink → `topup headend --to URL` (no database, no
passphrase) → a `topup serve` process on 127.0.0.1 → receipts stored in the supplier's
database, acknowledged to the meter with the service's signature, and reconciled over
GET /v1/reconciliation. And while the service is down: nothing acknowledged, the meter
keeps its receipts and they arrive once the service is back."""
import os
import threading

import httpx
import pytest
from click.testing import CliRunner

from tests.pg_server import free_port
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.hil


def _wan_port(board):
    port = getattr(getattr(board.transport, "board", None), "wan_port", None)
    if port is None:
        pytest.skip("%s has no WAN link port" % board.transport.describe())
    return port


def _token(issuer, *scopes):
    args = ["token", "new"]
    for s in scopes:
        args += ["--scope", s]
    r = issuer.cli(*args)
    assert r.exit_code == 0, r.stdout + r.stderr
    return r.stdout.strip().splitlines()[-1]


class Service(ServeProcess):
    """`topup serve` on the issuer's database, in its own process (tests/serve_process.py)."""

    def __init__(self, issuer, port, log_path):
        super().__init__(dict(os.environ, **issuer.env), log_path, port=port)
        self.ready(timeout=20)


def _relay(issuer, wan_port, url, token, idle):
    """`topup headend --port WAN --to URL` with only the token in its environment: no
    database, no passphrase."""
    try:
        from topup_cli import cli
    except ImportError:
        from host.cli import cli
    env = {"TOPUP_DB": os.devnull + ".nonexistent", "TOPUP_PASSPHRASE": None,
           "TOPUP_API_TOKEN": token}
    return CliRunner().invoke(cli, ["headend", "--port", wan_port, "--to", url,
                                    "--idle-exit", str(idle)], env=env,
                              catch_exceptions=False)


def _stored(issuer, first):
    """(receipts from index `first`, how many verified), read on a connection of its own:
    what the service process committed, whatever statement the rig's connection holds."""
    from host import db
    conn = db.open_db(issuer.path, write=False)
    try:
        (row,) = conn.execute("SELECT count(*), coalesce(sum(sig_ok), 0) FROM receipts "
                              "WHERE idx >= ?", (first,)).fetchall()
    finally:
        conn.close()
    return tuple(row)


def test_the_wan_uplink_reaches_the_service_through_the_relay(board, han, issuer, tmp_path):
    wan_port = _wan_port(board)
    first = board.public_key.first_index
    service = Service(issuer, free_port(), tmp_path / "serve.log")
    try:
        for v in issuer.issue(700, count=3):
            han.submit(v)
        token = _token(issuer, "ingest")
        threading.Timer(0.5, board.set_wan, [True]).start()
        r = _relay(issuer, wan_port, service.url, token, 3)
        board.set_wan(False)
        assert r.exit_code == 0, r.stdout + (r.stderr or "")
        out = r.stdout
        assert "relaying to %s/v1/receipts" % service.url in out, out
        assert "3 new receipt(s) stored by the service" in out, out
        assert "acknowledged #%d-#%d" % (first, first + 2) in out, out
        assert "0 push(es) refused, 0 while the service was unavailable" in out, out
        assert _stored(issuer, first) == (3, 3)
        # The meter let them go: with the WAN up again it has nothing left to push.
        threading.Timer(0.5, board.set_wan, [True]).start()
        again = _relay(issuer, wan_port, service.url, token, 2)
        board.set_wan(False)
        assert "0 push(es) relayed" in again.stdout, again.stdout
        read = _token(issuer, "read")
        s = httpx.get(service.url + "/v1/reconciliation", timeout=30,
                      headers={"Authorization": "Bearer " + read}).json()
        assert s["anomalies"] == 0, s
        assert s["statuses"]["redeemed"]["vouchers"] == 3
        assert s["statuses"]["redeemed"]["pence"] == 2100
    finally:
        service.stop()


def test_while_the_service_is_down_nothing_is_acknowledged_and_nothing_lost(board, han, issuer,
                                                                             tmp_path):
    wan_port = _wan_port(board)
    first = board.public_key.first_index
    port = free_port()
    for v in issuer.issue(500, count=2):
        han.submit(v)
    token = _token(issuer, "ingest")
    url = "http://127.0.0.1:%d" % port
    # Nothing listens on the port: each push is retried, then answered BUSY; the meter
    # keeps its receipts.
    threading.Timer(0.5, board.set_wan, [True]).start()
    r = _relay(issuer, wan_port, url, token, 4)
    assert r.exit_code == 0, r.stdout
    assert "service unavailable" in r.stdout and "0 push(es) relayed" in r.stdout, r.stdout
    assert _stored(issuer, first) == (0, 0)
    # The service comes up: the meter's next push (it resends after its retry interval)
    # brings both receipts.
    service = Service(issuer, port, tmp_path / "serve.log")
    try:
        r = _relay(issuer, wan_port, url, token, 7)
        board.set_wan(False)
        assert "2 new receipt(s) stored by the service" in r.stdout, r.stdout
        assert "acknowledged #%d-#%d" % (first, first + 1) in r.stdout, r.stdout
    finally:
        service.stop()
    assert _stored(issuer, first) == (2, 2)
