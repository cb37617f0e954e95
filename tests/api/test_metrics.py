"""GET /metrics (issue 13): Prometheus text with per-route request counts and latency
histograms (route templates, never raw paths), issuance counters and receipts ingested;
no token needed; several worker processes summed in multiprocess mode."""
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from host import receipts_io
from host.api import auth, metrics
from tests.api.test_receipts import make_app
from tests.host.test_reconcile_data import PASS, World, normal_life


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPUP_INSECURE_FAST_KDF", "1")
    w = World(tmp_path / "topup.db")
    yield w
    w.close()


def scrape(client):
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_requests_are_counted_per_route_template_and_timed(world):
    with TestClient(make_app(world.path, PASS)) as c:
        before = scrape(c)
        _, token = auth.new_token(world.conn, ["read"])
        h = {"Authorization": "Bearer " + token}
        for _ in range(3):
            assert c.get("/v1/anomalies", headers=h).status_code == 200
        assert c.get("/v1/anomalies").status_code == 401
        c.get("/no/such/thing/12345")
        after = scrape(c)
    key = dict(method="GET", route="/v1/anomalies")
    assert value(after, "topup_http_requests_total", status="200", **key) - \
        value(before, "topup_http_requests_total", status="200", **key) == 3
    assert value(after, "topup_http_requests_total", status="401", **key) - \
        value(before, "topup_http_requests_total", status="401", **key) == 1
    assert value(after, "topup_http_request_duration_seconds_count", **key) - \
        value(before, "topup_http_request_duration_seconds_count", **key) == 4
    assert value(after, "topup_http_request_duration_seconds_bucket", le="+Inf", **key) >= 4
    # A path no route matches is 'unmatched', never the path itself.
    assert not any("/no/such" in str(k) for k in after)
    assert value(after, "topup_http_requests_total", method="GET", route="unmatched",
                 status="404") >= 1


def test_issuance_and_ingest_counters(world):
    with TestClient(make_app(world.path, PASS)) as c:
        before = scrape(c)
        metrics.issued("voucher", 3, 1500)
        metrics.issued("code", 1, 250)
        _, token = auth.new_token(world.conn, ["ingest"])
        raws = normal_life(world)
        body = receipts_io.encode_cbor(raws)
        for _ in range(2):
            c.post("/v1/receipts", content=body, headers={
                "Authorization": "Bearer " + token, "Content-Type": "application/cbor-seq"})
        after = scrape(c)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert value(d, "topup_issued_total", kind="voucher") == 3
    assert value(d, "topup_issued_pence_total", kind="voucher") == 1500
    assert value(d, "topup_issued_total", kind="code") == 1
    assert value(d, "topup_issued_pence_total", kind="code") == 250
    assert value(d, "topup_receipts_ingested_total", result="new") == 10
    assert value(d, "topup_receipts_ingested_total", result="duplicate") == 10
    with pytest.raises(ValueError):
        metrics.issued("coupon", 1, 1)


def test_metrics_needs_no_token(world):
    with TestClient(make_app(world.path, PASS)) as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and "topup_http_requests_total" in r.text


def test_multiprocess_mode_sums_the_workers(tmp_path):
    """Two processes counting into one PROMETHEUS_MULTIPROC_DIR (what `topup serve
    --workers 2` does through setup_multiprocess): a scrape shows their sum."""
    directory = tmp_path / "prom"
    cleanup = metrics.setup_multiprocess(str(directory))
    try:
        code = ("from host.api import metrics; metrics.issued('voucher', %d, 100); "
                "metrics.ingested(2, 0)")
        env = dict(os.environ)
        for n in (1, 2):
            subprocess.run([sys.executable, "-c", code % n], env=env, check=True, timeout=30)
        out = subprocess.run(
            [sys.executable, "-c", "from host.api import metrics; "
             "import sys; sys.stdout.write(metrics._exposition().decode())"],
            env=env, check=True, timeout=30, capture_output=True, text=True).stdout
    finally:
        cleanup()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    samples = {}
    for family in text_string_to_metric_families(out):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert value(samples, "topup_issued_total", kind="voucher") == 3
    assert value(samples, "topup_issued_pence_total", kind="voucher") == 200
    assert value(samples, "topup_receipts_ingested_total", result="new") == 4


def test_a_body_refused_on_its_content_length_is_counted(world):
    """instrument() is the outermost middleware: the 413s that the body bound answers
    before any route runs are counted too (route 'unmatched': no route was reached)."""
    with TestClient(make_app(world.path, PASS)) as c:
        before = scrape(c)
        r = c.post("/v1/vouchers", content=b"x" * (70 * 1024),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        after = scrape(c)
    key = dict(method="POST", route="unmatched", status="413")
    assert value(after, "topup_http_requests_total", **key) - \
        value(before, "topup_http_requests_total", **key) == 1
