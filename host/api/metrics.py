"""Prometheus metrics of the service (issue 13): `GET /metrics` in the text exposition
format, `instrument(app)` for per-route request counts and latencies, and counters the
issuing and ingest code call.

    topup_http_requests_total{method, route, status}        requests answered
    topup_http_request_duration_seconds{method, route}      latency histogram (seconds,
                                                            request in to last byte out)
    topup_issued_total{kind}                                vouchers / codes issued
    topup_issued_pence_total{kind}                          their amounts, in pence
    topup_receipts_ingested_total{result}                   receipts received: new, duplicate

`route` is the route's template (`/v1/vouchers/{reference}`), never the raw path, so a
scanner cannot blow up the number of series; a path no route matches counts as
`unmatched`.

Auth: none. /metrics holds counts and latencies, never a token, voucher or device, and
Prometheus scrapes each node directly on its private address; the reverse proxy in front of
the service does not pass /metrics from outside (docs/deploy/nginx.conf). A deployment that
exposes the nodes' port beyond the scraper must firewall it.

Several processes: each uvicorn worker keeps its own counters, so a scrape would show
whichever worker answered it. `topup serve --workers N` (N > 1) therefore calls
`setup_multiprocess()` before starting the workers: prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, one file per worker), and /metrics then sums every worker of
that node. Two nodes are two scrape targets; Prometheus adds them up (`sum by (route)`).
"""
import os
import shutil
import tempfile
import time

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               ProcessCollector, generate_latest)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Metrics live in the module's own registry (not prometheus_client's global one): importing
# this module twice in one process (tests) never registers a name twice.
REGISTRY = CollectorRegistry(auto_describe=True)
if not os.environ.get(MULTIPROC_ENV):
    ProcessCollector(registry=REGISTRY)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("topup_http_requests", "HTTP requests answered",
                   ("method", "route", "status"), registry=REGISTRY)
LATENCY = Histogram("topup_http_request_duration_seconds",
                    "Time from the request arriving to the last byte of its answer",
                    ("method", "route"), buckets=_BUCKETS, registry=REGISTRY)
ISSUED = Counter("topup_issued", "Vouchers or keypad codes issued", ("kind",),
                 registry=REGISTRY)
ISSUED_PENCE = Counter("topup_issued_pence", "Amount issued, in pence", ("kind",),
                       registry=REGISTRY)
INGESTED = Counter("topup_receipts_ingested", "Receipts received over POST /v1/receipts",
                   ("result",), registry=REGISTRY)

KINDS = ("voucher", "code")


def issued(kind, count, pence):
    """Count `count` vouchers (kind 'voucher') or codes ('code') issued, `pence` in all.
    Call it once the transaction that stored them has committed."""
    if kind not in KINDS:
        raise ValueError("kind must be one of %s" % ", ".join(KINDS))
    ISSUED.labels(kind).inc(count)
    ISSUED_PENCE.labels(kind).inc(pence)


def ingested(new, duplicates):
    """Count receipts received over the API: `new` stored, `duplicates` already held."""
    if new:
        INGESTED.labels("new").inc(new)
    if duplicates:
        INGESTED.labels("duplicate").inc(duplicates)


# --- several worker processes ------------------------------------------------------------

def setup_multiprocess(directory=None):
    """Switch this process and the workers it starts to prometheus_client's multiprocess
    mode: call it BEFORE prometheus_client (or this module) is imported in the workers,
    i.e. before uvicorn starts them. Makes a fresh directory (or empties `directory`),
    sets PROMETHEUS_MULTIPROC_DIR and returns a function that removes it (call it when the
    server stops)."""
    made = directory is None
    directory = directory or tempfile.mkdtemp(prefix="topup-metrics-")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))
    os.environ[MULTIPROC_ENV] = directory

    def cleanup():
        if os.environ.get(MULTIPROC_ENV) == directory:
            del os.environ[MULTIPROC_ENV]
        if made:
            shutil.rmtree(directory, ignore_errors=True)
    return cleanup


def _exposition():
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                             "description": "Prometheus text format 0.0.4"}})
def get_metrics():
    """Request counts and latencies per route, vouchers and codes issued (count and
    pence), receipts ingested. No token needed: keep it off the public side of the proxy
    (docs/deploy/nginx.conf)."""
    return Response(_exposition(), media_type=CONTENT_TYPE_LATEST)


# --- the middleware ------------------------------------------------------------------------

class _Instrument:
    """A plain ASGI middleware (cheaper than BaseHTTPMiddleware: no extra task per
    request): count each HTTP request by method, route template and status, and time it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = _template(scope)
            method = scope.get("method", "")
            REQUESTS.labels(method, path, str(status[0])).inc()
            LATENCY.labels(method, path).observe(time.perf_counter() - t0)


def _template(scope):
    """The matched route's template with the prefix it was included under
    (`/v1/vouchers/{reference}`), or 'unmatched'. FastAPI leaves the route object in the
    scope; its own path may lack the router's prefix, which is then the part of the
    request path before the route's pattern matches."""
    route = scope.get("route")
    fmt = getattr(route, "path_format", None) or getattr(route, "path", None)
    if fmt is None:
        return "unmatched"
    path = scope.get("path", "")
    regex = getattr(route, "path_regex", None)
    if regex is None or path == fmt:
        return fmt
    i = 0
    while i >= 0:
        if regex.match(path[i:]):
            return path[:i] + fmt
        i = path.find("/", i + 1)
    return fmt


def instrument(app):
    """Count and time every request of `app` (call once, in create_app)."""
    app.add_middleware(_Instrument)
    return app
