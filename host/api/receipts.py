"""Receipts in, reconciliation out: the head end's path into the service (issue 13).

    POST /v1/receipts          scope ingest   a CBOR sequence (application/cbor-seq, SPEC.md
                                              §6) or JSON Lines (application/jsonl,
                                              application/x-ndjson) of receipts
    GET  /v1/reconciliation    scope read     reconcile now (as `topup reconcile`), answer
                                              the summary as JSON
    GET  /v1/anomalies         scope read     the anomalies of the last reconciliation

The body is parsed and structure-checked by host/receipts_io.py and stored by
host/reconcile.py's import (`import_rows`), exactly as `topup receipts import` does: all
or nothing, a receipt identified by the SHA-256 of its bytes, so sending the same body
again stores nothing new (the endpoint is idempotent by nature: no Idempotency-Key
needed). A body that is not receipts answers 400 naming the item (or line) and byte, and
nothing of it is stored; a body over MAX_BODY bytes answers 413 before anything is parsed.

A meter's push (`?device=EUI64&first=N`, what `topup headend --to URL` sends): the body is
the receipts the meter pushed from index N, stored by host/headend.py's `handle_push`;
the answer adds `next` (the lowest index not yet held with a verified signature), `ack`
(the signed acknowledgement the meter needs to let its receipts go, base64; null when
nothing new is held) and `commands` (the meter's pending signed commands, base64: SPEC.md
§5.1 field 3). The head end relays these to the meter unchanged, so only what this
service holds is ever acknowledged. Acknowledgements are signed with the active issuer key:
the service needs its passphrase (TOPUP_PASSPHRASE) for that, as it does to issue.
"""
import base64
import threading

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from .. import receipts_io, registry
from .. import reconcile as recon
from ..db import transaction
from ..errors import TopupError
from . import metrics
from .auth import audit
from .deps import lend
from .problems import Problem, responses

router = APIRouter(tags=["receipts and reconciliation"])

# 16 MiB: about 60,000 receipts of ~270 bytes (a v1 receipt is < 300 bytes), far more than
# one head end push (4 receipts); a bigger export is sent in several requests. Checked on
# Content-Length and again while reading (host/api/app.py's BodyLimit holds the same bound
# for this path before the route runs).
MAX_BODY = 16 * 1024 * 1024

CBOR_TYPES = ("application/cbor-seq", "application/cbor")
JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines")

MALFORMED = "/problems/malformed-receipts"


async def _read_body(request, limit):
    """The request body, or Problem(413) as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise Problem(400, "Content-Length %r is not a number" % declared) from None
        if n > limit:
            raise Problem(413, "the body is %d bytes; at most %d are taken in one request: "
                          "send the receipts in several requests" % (n, limit), limit=limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "the body is over %d bytes: send the receipts in several "
                          "requests" % limit, limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _format_of(request, data):
    """'cbor' or 'jsonl' from the Content-Type (its parameters ignored); _Problem if the
    type is not one of ours or the body is plainly the other format."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in CBOR_TYPES:
        fmt = "cbor"
    elif ctype in JSONL_TYPES:
        fmt = "jsonl"
    else:
        raise Problem(415, "send receipts as application/cbor-seq (a CBOR sequence, SPEC.md §6) "
                       "or application/jsonl (JSON Lines with \"cose_base64\"), not %r"
                       % (ctype or "no Content-Type"))
    if data and receipts_io.detect(data) != fmt:
        raise Problem(400, "the Content-Type says %s but the body %s" % (
                           "a CBOR sequence" if fmt == "cbor" else "JSON Lines",
                           "starts like JSON" if fmt == "cbor" else "is not JSON Lines"),
                      type=MALFORMED, title="Malformed receipts", item=1, offset=0)
    return fmt


def _rows(data, fmt):
    """The receipts_io rows of the body, or Problem(400) naming the item/line and byte."""
    try:
        if fmt == "cbor":
            return receipts_io.parse_rows(data, "request body")
        return [receipts_io.row_of(r) for r in receipts_io.parse_items(data, "request body")]
    except receipts_io.ReceiptFileError as e:
        extra = {}
        if e.item is not None:
            extra["line" if fmt == "jsonl" else "item"] = e.item
        if e.offset is not None:
            extra["offset"] = e.offset
        raise Problem(400, str(e), type=MALFORMED, title="Malformed receipts",
                      **extra) from None


# --- the acknowledgement signer (push mode) ---------------------------------------------

_signers_lock = threading.Lock()


def _signer(request, conn):
    """The issuer key that signs acknowledgements: the active one. create_app unsealed it
    at start-up (app.state.signer); after `topup key activate` elsewhere the new active
    key is unsealed once (an argon2id derivation) and kept in its place."""
    from .. import keystore
    state = request.app.state
    row = conn.execute("SELECT kid FROM keys WHERE active = 1").fetchone()
    kid = bytes(row[0]) if row else None
    current = getattr(state, "signer", None)
    if current is not None and current.kid == kid:
        return current
    with _signers_lock:
        current = getattr(state, "signer", None)
        if current is not None and current.kid == kid:
            return current
        passphrase = getattr(state, "passphrase", None)
        if not passphrase:
            raise Problem(503, "this service was started without the issuer keys' "
                          "passphrase (TOPUP_PASSPHRASE), so it cannot sign "
                          "acknowledgements; nothing was stored, the meter keeps its receipts")
        try:
            state.signer = keystore.unlock_active(conn, passphrase)
        except TopupError as e:
            raise Problem(503, str(e)) from None
        return state.signer


def _b64(b):
    return base64.b64encode(bytes(b)).decode("ascii")


# --- POST /v1/receipts ------------------------------------------------------------------

def _ingest(request, conn, caller, rows, device, first):
    source = "api:%s" % caller.token_id
    if device is None:
        res = recon.import_rows(conn, [(source, rows)])
        answer = {"received": res.total, "new": res.new, "duplicates": res.duplicates,
                  "bad_signature": res.bad, "unverified": res.unverified}
    else:
        from .. import headend
        from protocol import errors as perr
        signer = _signer(request, conn)
        raws = [bytes(r[receipts_io.ROW_VALUES][10]) for r in rows]
        try:
            nxt, ack, res = headend.handle_push(conn, {1: device, 2: first, 3: raws},
                                                "wan-api:%s" % caller.token_id, signer)
        except perr.Rejected as e:
            raise Problem(400, e.detail or str(e), type=MALFORMED,
                          title="Malformed receipts") from None
        new = res.new if res else 0
        answer = {"received": len(raws), "new": new, "duplicates": len(raws) - new,
                  "bad_signature": res.bad if res else 0,
                  "unverified": res.unverified if res else 0,
                  "device": registry.format_eui64(device), "first": first, "next": nxt,
                  "ack": None if ack is None else _b64(ack),
                  "commands": [_b64(c) for c in headend.pending_commands(conn, device)]}
    if answer["new"]:
        with transaction(conn):
            audit(conn, caller.token_id, "ingest", device=device,
                  detail="received %d, new %d" % (answer["received"], answer["new"]))
    metrics.ingested(answer["new"], answer["duplicates"])
    return answer


@router.post(
    "/receipts", summary="Ingest receipts (CBOR sequence or JSON Lines)",
    responses=responses(400, 401, 403, 413, 415, 503),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/cbor-seq": {"schema": {"type": "string", "format": "binary"}},
        "application/jsonl": {"schema": {"type": "string"}},
        "application/x-ndjson": {"schema": {"type": "string"}}}}})
async def post_receipts(request: Request,
                        device: str = Query(None, description="a meter's push: its EUI-64"),
                        first: int = Query(None, ge=0, le=0xFFFFFFFF,
                                           description="a meter's push: its first index")):
    """Store receipts as `topup receipts import` does (all or nothing; duplicates skipped
    by their bytes' hash; signatures checked against the registered meter keys, a bad one
    kept as evidence). With `device` and `first`: a meter's WAN push, answered with the
    signed acknowledgement and pending commands the head end passes back to it.

    Needs a token with scope 'ingest' (checked before the body is read). No database
    connection is held while the body arrives: a slow client costs a connection only for
    the moment its receipts are stored."""
    caller = await run_in_threadpool(_authorise, request)
    if (device is None) != (first is None):
        raise Problem(400, "a meter's push needs both device and first")
    eui = None
    if device is not None:
        try:
            eui = registry.parse_eui64(device)
        except TopupError as e:
            raise Problem(400, str(e)) from None
    data = await _read_body(request, MAX_BODY)
    fmt = _format_of(request, data)
    rows = await run_in_threadpool(_rows, data, fmt)
    return await run_in_threadpool(_store, request, caller, rows, eui, first)


# The database connection is taken and given back inside ONE thread-pool call each
# (host/api/deps.py's `lend`): no request holds a pooled connection while it waits for a
# thread or for its body.
def _authorise(request):
    with lend(request, "ingest") as (_, caller):
        return caller


def _store(request, caller, rows, device, first):
    with lend(request) as (conn, _):
        return _ingest(request, conn, caller, rows, device, first)


# --- GET /v1/reconciliation, GET /v1/anomalies --------------------------------------------

def _summary(conn, now, policy):
    from .. import commands, report
    recon.reconcile(conn, now=now, expired_policy=policy)
    s = report.load(conn)
    kinds = {k: s.by_kind[k] for k in recon.ANOMALY_KINDS if k in s.by_kind}
    return {
        "run": s.run, "at": s.at, "as_of": s.as_of, "expired_policy": s.policy,
        "receipts": s.receipts, "vouchers": s.vouchers,
        "statuses": {st: {"vouchers": s.count[st], "pence": s.pence[st] or 0}
                     for st in recon.STATUSES},
        "liability_pence": s.liability or 0,
        "redeemed_pence": s.pence["redeemed"] or 0,
        "refunds_due_pence": s.refunds_due or 0,
        "anomalies": len(s.anomalies),
        "anomalies_by_kind": kinds,
        "exposure": [e.line() for e in commands.exposure(conn)],
        "imported_since": s.imported_since,
    }


@router.get("/reconciliation", summary="Reconcile now and answer the summary",
            responses=responses(401, 403, 503))
def get_reconciliation(request: Request,
                       now: int = Query(None, ge=0, description="judge expiry at this Unix "
                                                                 "time (default: now)"),
                       expired: str = Query("refund", pattern="^(refund|void)$",
                                            description="expired vouchers: refund due or void")):
    """What `topup reconcile` does and shows: verify every stored receipt, match them to
    the issued vouchers, store the result (voucher statuses, anomalies) and answer the
    summary. Reconciliation only rewrites what it derives, the same way each time: calling
    it twice gives the same answer (a new run number), and it changes nothing issued."""
    with lend(request, "read") as (conn, _):
        return _summary(conn, now, expired)


@router.get("/anomalies", summary="The anomalies of the last reconciliation",
            responses=responses(400, 401, 403, 503))
def get_anomalies(request: Request,
                  kind: str = Query(None, description="only this kind"),
                  device: str = Query(None, description="only this meter (EUI-64)"),
                  limit: int = Query(100, ge=1, le=10000), offset: int = Query(0, ge=0)):
    """Anomalies stored by the last reconciliation (GET /v1/reconciliation or `topup
    reconcile`), in (device, index) order: kind, meaning, meter, receipt index and hash,
    sequence, detail. `total` counts all that match the filters."""
    with lend(request, "read") as (conn, _):
        return _anomalies(conn, kind, device, limit, offset)


def _anomalies(conn, kind, device, limit, offset):
    where, args = [], []
    if kind is not None:
        if kind not in recon.ANOMALY_KINDS:
            raise Problem(400, "kind must be one of %s" % ", ".join(recon.ANOMALY_KINDS))
        where.append("kind = ?")
        args.append(kind)
    if device is not None:
        try:
            where.append("device = ?")
            args.append(registry.parse_eui64(device))
        except TopupError as e:
            raise Problem(400, str(e)) from None
    cond = (" WHERE " + " AND ".join(where)) if where else ""
    total = conn.execute("SELECT count(*) FROM anomalies" + cond, args).fetchone()[0]
    run = conn.execute("SELECT run, at FROM reconciliations ORDER BY run DESC LIMIT 1"
                       ).fetchone()
    items = []
    for i, k, dev, idx, h, seq, detail in conn.execute(
            "SELECT id, kind, device, receipt_index, receipt, sequence, detail FROM anomalies"
            + cond + " ORDER BY device, receipt_index, kind, detail, id LIMIT ? OFFSET ?",
            args + [limit, offset]):
        items.append({"id": i, "kind": k, "meaning": recon.ANOMALY_KINDS.get(k),
                      "device": registry.format_eui64(bytes(dev)) if dev is not None else None,
                      "index": idx, "receipt": bytes(h).hex() if h is not None else None,
                      "sequence": seq, "detail": detail})
    return {"run": run[0] if run else None, "at": run[1] if run else None, "total": total,
            "offset": offset, "limit": limit, "anomalies": items}
