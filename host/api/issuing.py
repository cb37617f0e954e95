# Vouchers, keypad codes, void and devices over HTTP. The host modules do the work (the
# same issuer, registry and void as the CLI, with the CLI's checks and messages); this
# module parses requests, maps refusals to problems and writes the idempotency answer and
# the audit row in the issuing transaction. Vouchers are stored by group commit (the
# requests that arrive together share one durable transaction: GroupCommit below).
#
# Amounts: an integer is pence (1050 = £10.50); a string is read as the CLI reads it
# ("10.50", "£10.50", "50p"). Devices: an EUI-64 as the CLI takes it. References: the
# voucher's or code's 32 hex digits. Scopes: issue (POST vouchers, codes, void), read
# (GET), admin (POST devices).
import asyncio
import base64
import json
import threading
import time
from typing import Optional, Union

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.responses import Response

from protocol import keycode
from protocol.voucher import MAX_AMOUNT, MAX_SEQUENCE

from .. import delivery, issuer, keystore, registry, vouchers as vq
from ..db import transaction
from ..errors import TopupError
from ..money import format_pence, parse_pence
from ..registry import format_eui64
from . import idempotency, metrics
from .auth import audit, audit_many
from .deps import authorise, is_db_unavailable, lend, unavailable
from .problems import Problem, responses

router = APIRouter(tags=["vouchers"])

MAX_COUNT = 100  # vouchers per request: one transaction, one answer


class IssueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"device": "00-11-22-33-44-55-66-77", "amount": "£10.50"}]})
    device: str = Field(description="EUI-64: 00-11-22-33-44-55-66-77, colons, or 16 hex")
    amount: Union[StrictInt, str] = Field(
        description="pence as an integer (1050), or text as the CLI takes it: 10.50, "
                    "£10.50, 50p")
    count: int = Field(1, ge=1, le=MAX_COUNT, description="how many (each its own sequence)")
    expires_in_days: Optional[int] = Field(None, ge=1, le=36500,
                                           description="vouchers expire this many days "
                                                       "after issue (default: never)")


class CodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"device": "00-11-22-33-44-55-66-77", "amount": 2000}]})
    device: str
    amount: Union[StrictInt, str]
    count: int = Field(1, ge=1, le=MAX_COUNT)


class VoidRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: Optional[str] = Field(None, max_length=1000)


class DeviceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"device": "00-11-22-33-44-55-66-77", "max_voucher": "£100",
                      "max_credit": "£500", "label": "flat 3"}]})
    device: str
    max_voucher: Optional[Union[StrictInt, str]] = Field(
        None, description="per-voucher maximum (default £100.00)")
    max_credit: Optional[Union[StrictInt, str]] = Field(
        None, description="maximum credit (default £500.00)")
    public_key: Optional[str] = Field(None, description="meter receipt key, 64 hex digits")
    label: Optional[str] = Field(None, max_length=200)


# --- helpers ----------------------------------------------------------------------------

def _unprocessable(e):
    return Problem(422, e.message if isinstance(e, TopupError) else str(e))


def _device(text):
    try:
        return registry.parse_eui64(text)
    except TopupError as e:
        raise _unprocessable(e) from None


def _pence(value, what="amount", maximum=MAX_AMOUNT, limit_name="the protocol maximum"):
    """Pence from an integer (pence) or text (the CLI's parse_pence), with its messages."""
    if isinstance(value, bool):
        raise Problem(422, "%s must be pence (an integer) or text like 10.50" % what)
    text = "%dp" % value if isinstance(value, int) and value >= 0 else value
    if isinstance(value, int) and value < 0:
        text = str(value)
    try:
        return parse_pence(text, maximum=maximum, what=what, limit_name=limit_name)
    except TopupError as e:
        raise _unprocessable(e) from None


def _known_device(conn, device):
    dev = registry.find_device(conn, device)
    if dev is None:
        raise Problem(404, "unknown device %s (register it with POST /v1/devices or "
                      "`topup device add`)" % format_eui64(device),
                      type="/problems/unknown-device", title="Unknown device")
    return dev


def _dumps(doc):
    return json.dumps(doc, separators=(",", ":")).encode()


def _refused(e):
    """A TopupError from the host core: 503 for a busy database, else 422."""
    if is_db_unavailable(e):
        return unavailable(e)
    return _unprocessable(e)


def _voucher_items(batch):
    if batch.form == issuer.FORM_CODE:
        return [{"reference": ref.hex(), "sequence": seq, "code": keycode.grouped(digits)}
                for seq, ref, digits in batch.rows]
    return [{"reference": ref.hex(), "sequence": seq, "text": delivery.to_text(raw),
             "cose": base64.b64encode(raw).decode()} for seq, ref, raw in batch.rows]


def _issued_doc(batch):
    code = batch.form == issuer.FORM_CODE
    items = _voucher_items(batch)
    return {"device": format_eui64(batch.device), "form": "code" if code else "voucher",
            "amount": batch.amount, "amount_text": format_pence(batch.amount),
            "count": len(items), "issued": batch.issued,
            "expires": None if code else batch.expires, "kid": batch.kid.hex(),
            "batch": batch.batch, ("codes" if code else "vouchers"): items}


_code_keys_lock = threading.Lock()
# One issuing transaction at a time per process: the database takes one writer at a time
# anyway (BEGIN IMMEDIATE; PostgreSQL: host/pg.py's lock), and threads queued here are
# served in turn, where threads queued on SQLite's busy handler sleep and poll (tail
# latencies of a second under load). Other processes still wait on the database's lock.
_writer = threading.Lock()


def _code_key(request, conn, kid):
    state = request.app.state
    with _code_keys_lock:
        key = state.code_keys.get(kid)
        if key is None:
            if not state.passphrase:
                raise Problem(503, "this service was started without the issuer passphrase "
                              "(TOPUP_PASSPHRASE): it cannot issue")
            key = state.code_keys[kid] = keystore.unlock_code_key(conn, state.passphrase, kid)
    return key


def _signer(request, conn, reload=False):
    state = request.app.state
    if not state.passphrase:
        raise Problem(503, "this service was started without the issuer passphrase "
                      "(TOPUP_PASSPHRASE): it cannot issue")
    with _code_keys_lock:
        if reload or state.signer is None:
            state.signer = keystore.unlock_active(conn, state.passphrase)
        return state.signer


# app.state.device_limits: per-voucher maximum of a device as read lately, {device:
# (pence, monotonic time)}, used for _LIMITS_S to refuse early; the group commit's
# transaction checks the limit again.
_LIMITS_S = 2.0


def _device_row(conn, device):
    """(per-voucher maximum, next sequence) of a registered device, or Problem 404."""
    r = conn.execute("SELECT max_voucher, next_sequence FROM devices WHERE device = ?",
                     (device,)).fetchone()
    if r is None:
        raise Problem(404, "unknown device %s (register it with POST /v1/devices or "
                      "`topup device add`)" % format_eui64(device),
                      type="/problems/unknown-device", title="Unknown device")
    return r


def _created(body, ref):
    return Response(body, status_code=201, media_type="application/json",
                    headers={"Location": "/v1/vouchers/%s" % ref})


async def _issue_vouchers(request, key, device, pence, count, expires_days):
    """POST /v1/vouchers: checked here (token, device, limit; a key already answered is
    answered at once), then stored by the process's group commit (GroupCommit) with the
    requests that arrive with it."""
    fp = idempotency.fingerprint("POST", request.url.path,
                                 ["voucher", device.hex(), pence, count, expires_days])
    for attempt in (0, 1):
        # With the token verified and the device's limit read in the last seconds (and
        # the signer unsealed), the request joins the group commit without taking a
        # connection of its own: the transaction checks the key, device and limits again
        # under the write lock, and answers a key stored meanwhile with its stored bytes.
        caller = authorise(request, None, "issue")
        limits = request.app.state.device_limits.get(device)
        signer = request.app.state.signer
        if caller is None or limits is None or signer is None or attempt or \
                time.monotonic() - limits[1] > _LIMITS_S:
            ready = await run_in_threadpool(_prepare, request, key, fp, device, count,
                                            attempt)
            if isinstance(ready, Response):
                return ready
            caller, max_voucher, signer = ready
        else:
            max_voucher = limits[0]
        pence = _pence("%dp" % pence, maximum=max_voucher,
                       limit_name="device %s's per-voucher maximum" % format_eui64(device))
        job = _Job(key, fp, caller.token_id, signer, device, pence, count,
                   None if expires_days is None else expires_days * 86400)
        await request.app.state.group_commit.submit(job)
        if job.stored is not None:
            return idempotency.answer(job.stored, fp, key)
        e = job.error
        if e is None:
            metrics.issued("voucher", count, pence * count)
            return _created(job.body, job.ref)
        if isinstance(e, Problem):
            raise e
        if isinstance(e, TopupError):
            if attempt == 0 and "no longer the active key" in e.message:
                continue  # the issuer key was rotated: unlock the new one, once
            raise _refused(e)
        if not is_db_unavailable(e):
            # Stored alone after its batch failed, and failed again (a unique-key
            # violation: another node stored the key meanwhile): the key's answer, if any.
            stored = await run_in_threadpool(_lookup, request, key)
            if stored is not None:
                return idempotency.answer(stored, fp, key)
        raise e


def _prepare(request, key, fp, device, count, attempt):
    """The checks that need the database (in a worker thread): the stored answer of a key
    already used, or (caller, the device's per-voucher maximum, signer)."""
    with lend(request, "issue") as (conn, caller):
        stored = idempotency.lookup(conn, key)
        if stored is not None:
            return idempotency.answer(stored, fp, key)
        max_voucher, next_sequence = _device_row(conn, device)
        if next_sequence + count - 1 > MAX_SEQUENCE:
            raise Problem(422, "device %s has only %d sequence numbers left" % (
                format_eui64(device), MAX_SEQUENCE - next_sequence + 1))
        request.app.state.device_limits[device] = (max_voucher, time.monotonic())
        return caller, max_voucher, _signer(request, conn, reload=attempt > 0)


def _lookup(request, key):
    with lend(request) as (conn, _):
        return idempotency.lookup(conn, key)


class _Job:
    """One POST /v1/vouchers waiting for the group commit: in, what to issue; out, the
    answer body and first reference, the stored answer of a key used meanwhile, or the
    error that refused it."""

    __slots__ = ("key", "fp", "token", "signer", "device", "pence", "count", "expires_in",
                 "body", "ref", "stored", "error", "future")

    def __init__(self, key, fp, token, signer, device, pence, count, expires_in):
        self.key, self.fp, self.token, self.signer = key, fp, token, signer
        self.device, self.pence, self.count, self.expires_in = device, pence, count, expires_in
        self.future = None
        self.reset()

    def reset(self):
        self.body = self.ref = self.stored = self.error = None


class GroupCommit:
    """Group commit of voucher requests, one per process (create_app makes it).

    Each commit is a durable flush (SQLite: synchronous=FULL; PostgreSQL: the WAL flush)
    and writers take turns, so one transaction per request caps a node at one flush per
    voucher. Here the requests that arrive while a transaction is in flight are stored
    together in the next one, with a handful of statements for all of them
    (host/issuer.issue_group): each request still gets its own sequence reservation,
    issue batch, idempotency row and audit row. Everything is checked under the write
    lock before anything is written; a request refused there (a limit changed meanwhile,
    its key stored meanwhile by another node or by an earlier request of the batch) is
    answered alone and the others commit. Should a statement fail all the same, the
    transaction rolls back and each request of the batch is retried alone, in a
    transaction of its own. Nobody is answered before COMMIT has returned; if the database
    goes away, every request of the batch gets the 503 and nothing of it is stored.

    In the event loop: a request awaits its turn and holds neither a worker thread nor a
    connection meanwhile; one drain task per process runs each transaction in a worker
    thread, with the connection taken and given back inside that one thread call.
    """

    MAX_JOBS = 64  # requests per transaction

    def __init__(self, pool):
        self.pool = pool
        self._queue = []
        self._drainer = None
        self.commits = 0  # transactions committed, requests in them (the tests look)
        self.jobs = 0

    async def submit(self, job):
        """Store `job`: returns once its transaction has committed or failed."""
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        self._queue.append(job)
        drainer = self._drainer
        if drainer is None or drainer.done() or drainer.get_loop() is not loop:
            self._drainer = loop.create_task(self._drain())
        await job.future

    async def _drain(self):
        """While requests wait: the next MAX_JOBS of them in one transaction, run in a
        worker thread; the event loop goes on taking requests meanwhile."""
        batch = []
        try:
            while self._queue:
                batch = self._queue[:self.MAX_JOBS]
                del self._queue[:self.MAX_JOBS]
                await run_in_threadpool(self._run, batch)
                for job in batch:
                    if not job.future.done():
                        job.future.set_result(None)
                batch = []
        except BaseException as e:  # never leave a request waiting
            for job in batch + self._queue:
                job.reset()
                job.error = e if isinstance(e, Exception) else RuntimeError(repr(e))
                if not job.future.done():
                    job.future.set_result(None)
            del self._queue[:]
            raise
        finally:
            if self._drainer is asyncio.current_task():
                self._drainer = None

    def _run(self, batch):
        try:
            try:
                self._transaction(batch)
            except Exception as e:
                if is_db_unavailable(e) or len(batch) == 1:
                    raise
                for job in batch:  # a statement failed: each request alone
                    job.reset()
                    try:
                        self._transaction([job])
                    except Exception as e:
                        job.reset()
                        job.error = e
        except BaseException as e:
            for job in batch:  # nothing of the batch was stored
                job.reset()
                job.error = e
            if not isinstance(e, Exception):
                raise

    def _transaction(self, batch):
        try:
            with self.pool.connection() as conn, _writer:
                with transaction(conn):
                    self._store(conn, batch)
        except TopupError as e:  # the pool could not open the database, or busy
            raise unavailable(e) if is_db_unavailable(e) else e
        self.commits += 1
        self.jobs += len(batch)

    @staticmethod
    def _store(conn, batch):
        keys = sorted({job.key for job in batch})
        stored = {r[0]: (bytes(r[1]), r[2], bytes(r[3])) for r in conn.execute(
            "SELECT key, request, status, response FROM idempotency WHERE key IN (%s)"
            % ",".join("?" * len(keys)), keys)}
        first = {}  # key -> the request of this batch that issues for it
        by_signer = {}
        for job in batch:
            if job.key in stored:
                job.stored = stored[job.key]
            elif job.key in first:
                continue  # answered below with what the first request stores
            else:
                first[job.key] = job
                by_signer.setdefault(id(job.signer), []).append(job)
        answers, audits = [], []
        for jobs in by_signer.values():
            results = issuer.issue_group(conn, jobs[0].signer, [
                (job.device, job.pence, job.count, job.expires_in) for job in jobs])
            for job, result in zip(jobs, results):
                if isinstance(result, TopupError):
                    job.error = result
                    continue
                body = _dumps(_issued_doc(result))
                job.body, job.ref = body, result.rows[0][1].hex()
                answers.append((job.key, job.token, job.fp, 201, body, result.issued))
                audits.append((result.issued, job.token, "voucher", job.device,
                               result.rows[0][0], result.rows[-1][0], result.amount,
                               "idempotency-key %s; batch %s; %d vouchers" % (
                                   job.key, result.batch, len(result.rows))))
        if answers:
            idempotency.store_many(conn, answers)
            audit_many(conn, audits)
        for job in batch:  # a key sent twice in one batch: the first one's answer
            twin = first.get(job.key)
            if twin is not None and twin is not job:
                if twin.body is not None:
                    job.stored = (twin.fp, 201, twin.body)
                else:
                    job.error = twin.error


def _issue_codes(request, key, device, pence, count):
    """POST /v1/codes: one transaction per request (codes are the phone channel's, far
    fewer than vouchers), under the process's writer lock."""
    path = request.url.path
    fp = idempotency.fingerprint("POST", path, ["code", device.hex(), pence, count, None])
    with lend(request, "issue") as (conn, caller):
        stored = idempotency.lookup(conn, key)
        if stored is not None:
            return idempotency.answer(stored, fp, key)
        dev = _known_device(conn, device)
        top = min(keycode.MAX_AMOUNT, dev.max_voucher)
        limit = ("device %s's per-voucher maximum" % dev.name if top < keycode.MAX_AMOUNT
                 else "the most a keypad code carries (SPEC §8; issue a voucher for more)")
        pence = _pence("%dp" % pence, maximum=top, limit_name=limit)
        answer = {}

        def also(conn, batch):
            body = _dumps(_issued_doc(batch))
            idempotency.store(conn, key, caller.token_id, fp, 201, body, batch.issued)
            audit(conn, caller.token_id, "code", device, batch.rows[0][0], batch.rows[-1][0],
                  batch.amount, "idempotency-key %s; batch %s; %d codes" % (
                      key, batch.batch, len(batch.rows)), at=batch.issued)
            answer["body"], answer["ref"] = body, batch.rows[0][1].hex()

        try:
            epoch, _ = issuer._check_code_request(conn, dev, pence, count)
            ck = _code_key(request, conn, epoch.code_kid)
            with _writer:
                issuer.issue_codes(conn, ck, device, pence, count, batch_size=count,
                                   also=also)
        except idempotency.Replayed:
            return idempotency.answer(idempotency.lookup(conn, key), fp, key)
        except TopupError as e:
            raise _refused(e) from None
        except Exception as e:
            if not is_db_unavailable(e) and idempotency.lookup(conn, key) is not None:
                return idempotency.answer(idempotency.lookup(conn, key), fp, key)
            raise
    metrics.issued("code", count, pence * count)
    return _created(answer["body"], answer["ref"])


# --- routes -------------------------------------------------------------------------------

_ISSUE_ERRORS = responses(400, 401, 403, 404, 409, 413, 422, 503)


@router.post("/vouchers", status_code=201, responses=_ISSUE_ERRORS,
             summary="Issue vouchers for a device (idempotent by Idempotency-Key)")
async def issue_vouchers(body: IssueRequest, request: Request,
                   idempotency_key: Optional[str] = Header(None, alias="Idempotency-Key")):
    """Issue `count` signed vouchers of `amount` for `device`. The answer (201) carries each
    voucher's reference, sequence, text form (for SMS or a QR code) and COSE bytes (base64).
    A retry with the same Idempotency-Key and body returns the same answer byte for byte
    (header `Idempotent-Replayed: true`); the same key with another body is 409."""
    key = idempotency.check_key(idempotency_key)
    device = _device(body.device)
    pence = _pence(body.amount, maximum=None)
    return await _issue_vouchers(request, key, device, pence, body.count,
                                 body.expires_in_days)


@router.post("/codes", status_code=201, responses=_ISSUE_ERRORS,
             summary="Issue keypad codes for a device (idempotent by Idempotency-Key)")
def issue_codes(body: CodeRequest, request: Request,
                idempotency_key: Optional[str] = Header(None, alias="Idempotency-Key")):
    """Issue `count` 20-digit keypad codes (SPEC §8) of `amount` (1p..£655.35) for a meter
    provisioned with a code key. Idempotent as POST /v1/vouchers."""
    key = idempotency.check_key(idempotency_key)
    device = _device(body.device)
    pence = _pence(body.amount, maximum=None)
    return _issue_codes(request, key, device, pence, body.count)


def _ref(reference):
    t = reference.strip().lower()
    if len(t) != 32 or any(c not in "0123456789abcdef" for c in t):
        raise Problem(400, "a voucher reference is 32 hex digits (as issuing answered it)")
    return bytes.fromhex(t)


def _find(conn, reference):
    ref = _ref(reference)
    r = conn.execute("SELECT device, sequence FROM vouchers WHERE ref = ?", (ref,)).fetchone()
    rows = [] if r is None else list(vq.select(conn, device=bytes(r[0]), seq=(r[1], r[1])))
    if not rows:
        raise Problem(404, "no voucher or code with reference %s" % ref.hex())
    return rows[0]


def _row_doc(row):
    doc = {"reference": row.ref.hex(), "device": format_eui64(row.device),
           "sequence": row.sequence, "form": row.form_name, "amount": row.amount,
           "amount_text": format_pence(row.amount), "issued": row.issued,
           "expires": row.expires, "kid": row.kid.hex(), "batch": row.batch,
           "status": row.status, "voided": row.voided, "void_note": row.void_note,
           "delivery": row.delivery}
    if row.is_code:
        doc["code"] = keycode.grouped(row.code)
    else:
        doc["text"] = delivery.to_text(row.cose)
        doc["cose"] = base64.b64encode(row.cose).decode()
    return doc


@router.get("/vouchers/{reference}", responses=responses(400, 401, 403, 404, 503),
            summary="One voucher or code by reference, with its status")
def get_voucher(reference: str, request: Request):
    """Status as `topup vouchers list` shows it: outstanding, redeemed, stale, expired or
    void."""
    with lend(request, "read") as (conn, _):
        return _row_doc(_find(conn, reference))


@router.post("/vouchers/{reference}/void", responses=responses(400, 401, 403, 404, 409, 503),
             summary="Cancel a voucher or code")
def void_voucher(reference: str, request: Request, body: Optional[VoidRequest] = None):
    """From now on reconciliation counts it void (no liability, no refund) unless a meter
    applies it. 409 for one already void or redeemed."""
    with lend(request, "issue") as (conn, caller):
        return _void(conn, caller, reference, body)


def _void(conn, caller, reference, body):
    row = _find(conn, reference)
    note = body.note if body is not None else None

    def also(conn):
        audit(conn, caller.token_id, "void", row.device, row.sequence, row.sequence, row.amount,
              "reference %s%s" % (row.ref.hex(), "; %s" % note if note else ""))
    try:
        vq.void(conn, row, note=note, also=also)
    except TopupError as e:
        if is_db_unavailable(e):
            raise unavailable(e) from None
        if "already void" in e.message or "was redeemed" in e.message:
            raise Problem(409, e.message) from None
        raise _unprocessable(e) from None
    return _row_doc(_find(conn, reference))


def _device_doc(dev):
    return {"device": dev.name, "label": dev.label, "max_voucher": dev.max_voucher,
            "max_credit": dev.max_credit, "next_sequence": dev.next_sequence,
            "issued": dev.issued_count, "keys": dev.key_count, "created": dev.created,
            "public_key": None if dev.public_key is None else dev.public_key.hex()}


@router.post("/devices", status_code=201, tags=["devices"],
             responses=responses(400, 401, 403, 409, 422, 503),
             summary="Register a meter")
def add_device(body: DeviceRequest, request: Request):
    with lend(request, "admin") as (conn, caller):
        return _add_device(conn, caller, body)


def _add_device(conn, caller, body):
    device = _device(body.device)
    mv = (registry.DEFAULT_MAX_VOUCHER if body.max_voucher is None
          else _pence(body.max_voucher, "per-voucher maximum"))
    mc = (registry.DEFAULT_MAX_CREDIT if body.max_credit is None
          else _pence(body.max_credit, "maximum credit", maximum=None))
    try:
        public_key = (None if body.public_key is None
                      else registry.parse_public_key(body.public_key))
        dev = registry.add_device(conn, device, mv, mc, public_key=public_key,
                                  label=body.label)
    except TopupError as e:
        if is_db_unavailable(e):
            raise unavailable(e) from None
        if "already registered" in e.message:
            raise Problem(409, e.message) from None
        raise _unprocessable(e) from None
    # Registration is not issuance: its audit row is its own transaction.
    try:
        with transaction(conn):
            audit(conn, caller.token_id, "device", device, detail="registered")
    except TopupError:
        pass
    return Response(_dumps(_device_doc(dev)), status_code=201, media_type="application/json",
                    headers={"Location": "/v1/devices/%s" % dev.name})


@router.get("/devices/{eui64}", tags=["devices"], responses=responses(401, 403, 404, 422, 503),
            summary="One registered meter")
def get_device(eui64: str, request: Request):
    with lend(request, "read") as (conn, _):
        return _device_doc(_known_device(conn, _device(eui64)))
