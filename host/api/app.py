# The application: `create_app(target, passphrase)` — what `topup serve` runs under uvicorn.
#
# Every answer that is not a success is an RFC 9457 problem (problems.py): FastAPI's own
# errors (unknown route 404, wrong method 405, validation) are re-dressed as problems.
# Malformed JSON is 400; a well-formed body with wrong or missing fields is 422 with the
# validation errors in `errors`. A request body over the bound (64 KiB; receipts 16 MiB)
# is refused with 413 as soon as its Content-Length says so, or as soon as that much has
# arrived, before the rest is read; one that has not arrived whole in 30 s is 408. A database that cannot be used is 503 and the
# transaction it interrupted rolled back: nothing half-written.
#
# The issuer key is unsealed once, at start-up, from the passphrase (TOPUP_PASSPHRASE for
# `topup serve`); without a passphrase the service reads, ingests and registers but
# answers 503 to issuing. Code keys are unsealed on the first code request for each.
import asyncio
import contextlib
import logging
import os
import socket

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import db, keystore
from ..errors import TopupError
from .deps import DB_ERRORS, GuardedPool, is_db_unavailable, unavailable
from .problems import Problem, problem_response
from . import issuing, metrics, receipts

log = logging.getLogger("topup.serve")

MAX_BODY = 64 * 1024
BODY_LIMITS = {"/v1/receipts": 16 * 1024 * 1024}  # path prefix -> bound (bytes)


class ProblemDoc(BaseModel):
    """RFC 9457 problem details."""
    type: str
    title: str
    status: int
    detail: str
    instance: str = None


BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit):
        super().__init__(413, "the request body is over the bound of %d bytes" % limit)


class BodyTooSlow(StarletteHTTPException):
    def __init__(self, timeout):
        super().__init__(408, "the request body did not arrive within %g s" % timeout,
                         headers={"Connection": "close"})


class BodyLimit:
    """ASGI middleware: refuse a request body over the bound before reading it all (413),
    and one that does not arrive in time (408: a slow client holds a socket, never a
    database connection — the body is read before a route takes one)."""

    def __init__(self, app, default=MAX_BODY, limits=None, timeout=BODY_TIMEOUT_S):
        self.app = app
        self.default = default
        self.limits = dict(BODY_LIMITS if limits is None else limits)
        self.timeout = timeout

    def limit_for(self, path):
        for prefix, limit in self.limits.items():
            if path == prefix or path.startswith(prefix + "/"):
                return limit
        return self.default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope.get("path", ""))
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.strip().isdigit():
                    response = problem_response(400, Problem(400, "Content-Length is not a "
                                                             "number").body(scope.get("path")))
                    return await response(scope, receive, send)
                if int(value) > limit:
                    p = Problem(413, "the request body is %d bytes, over the bound of %d bytes"
                                % (int(value), limit), limit=limit)
                    response = p.response(scope.get("path"))
                    response.headers["Connection"] = "close"
                    return await response(scope, receive, send)
        seen, done = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def bounded():
            nonlocal seen, done
            if done:  # the body is in; later calls wait for a disconnect: no deadline
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise BodyTooSlow(self.timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
                done = not message.get("more_body", False)
            return message

        return await self.app(scope, bounded, send)


def _instance(request):
    return request.url.path


def create_app(target, passphrase=None, pool_size=8, max_body=MAX_BODY):
    """The service on database `target` (an SQLite path or a postgresql:// URL). Raises
    TopupError for a database that cannot be opened or a passphrase that does not unseal
    the active issuer key."""
    pool = GuardedPool(target, pool_size)
    signer = None
    if passphrase:
        try:
            with pool.connection() as conn:
                signer = keystore.unlock_active(conn, passphrase)
        except BaseException:
            pool.close()
            raise

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(title="topup vending service", version="1",
                  description="Offline top-up vouchers and keypad codes for payment channels; "
                              "receipts from the head end. Errors are RFC 9457 problem "
                              "details (application/problem+json). Authenticate with "
                              "`Authorization: Bearer <token>` (`topup token new`).",
                  docs_url="/docs", lifespan=lifespan)
    app.state.pool = pool
    app.state.target = target
    app.state.passphrase = passphrase
    app.state.signer = signer
    app.state.code_keys = {}
    app.state.group_commit = issuing.GroupCommit(pool)
    app.state.device_limits = {}

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem):
        return exc.response(_instance(request))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such resource: %s %s" % (request.method, request.url.path)
        elif exc.status_code == 405:
            detail = "%s is not allowed on %s" % (request.method, request.url.path)
        return Problem(exc.status_code, detail, headers=dict(exc.headers or {})
                       ).response(_instance(request))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                ctx = e.get("ctx") or {}
                return Problem(400, "the request body is not valid JSON (%s)"
                               % ctx.get("error", "malformed")).response(_instance(request))
        clean = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", ""),
                  "type": e.get("type", "")} for e in errors]
        if any(e.get("type") == "model_attributes_type" or
               (e.get("loc") == ("body",) and e.get("type") == "missing") for e in errors):
            return Problem(400, "the request body must be a JSON object", errors=clean
                           ).response(_instance(request))
        first = clean[0] if clean else {"loc": [], "msg": "invalid"}
        where = ".".join(x for x in first["loc"] if x != "body") or "body"
        return Problem(422, "%s: %s" % (where, first["msg"]), errors=clean
                       ).response(_instance(request))

    @app.exception_handler(TopupError)
    async def on_topup_error(request: Request, exc: TopupError):
        if is_db_unavailable(exc):
            return unavailable(exc).response(_instance(request))
        return Problem(422, exc.message).response(_instance(request))

    async def on_db_error(request: Request, exc: Exception):
        if is_db_unavailable(exc):
            return unavailable(exc).response(_instance(request))
        log.exception("database error on %s %s", request.method, request.url.path)
        return Problem(500, "internal error (%s); nothing was changed"
                       % type(exc).__name__).response(_instance(request))

    for error in DB_ERRORS:
        app.add_exception_handler(error, on_db_error)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return Problem(500, "internal error (%s)" % type(exc).__name__
                       ).response(_instance(request))

    @app.get("/healthz", tags=["service"], summary="Liveness and database reachability",
             responses={503: {"model": ProblemDoc, "description": "database unavailable"}})
    def healthz():
        """200 when the database answers; 503 (a problem) when it does not."""
        try:
            with pool.connection() as conn:
                conn.execute("SELECT 1").fetchone()
        except Exception as e:
            if isinstance(e, TopupError) or is_db_unavailable(e):
                raise unavailable(e) from None
            raise
        return {"status": "ok", "schema": db.SCHEMA_VERSION,
                "issuing": app.state.signer is not None}

    app.include_router(issuing.router, prefix="/v1")
    app.include_router(receipts.router, prefix="/v1")
    app.include_router(metrics.router)
    app.add_middleware(BodyLimit, default=max_body)
    metrics.instrument(app)  # last, so outermost: it counts what BodyLimit refuses (413)
    _document_problems(app)
    return app


def _document_problems(app):
    """Add the Problem schema to the OpenAPI components (the routes refer to it)."""
    original = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = \
            ProblemDoc.model_json_schema()
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def listening_socket(host, port):
    """The listening socket of `topup serve --workers N`, made here rather than by uvicorn:
    uvicorn makes it with socket.socket(family), proto 0, and asyncio sets TCP_NODELAY on
    an accepted connection only when the listening socket's proto is IPPROTO_TCP
    (asyncio.base_events._set_nodelay); without it an answer written in two sends (head,
    body) waits for the client's delayed ACK, ~40 ms a request. This socket is made with
    proto IPPROTO_TCP (the workers receive it so), and has TCP_NODELAY set itself, which
    Linux passes on to the connections it accepts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_workers(host, port, workers, **kw):
    """`topup serve --workers N` (N > 1): uvicorn's supervisor running N processes of
    app_from_env on one listening socket of ours (listening_socket: TCP_NODELAY). One
    process needs none of this: uvicorn binds through asyncio there, which sets it."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config("host.api.app:app_from_env", factory=True, host=host, port=port,
                            workers=workers, **kw)
    try:
        sock = listening_socket(host, port)
    except OSError as e:
        raise TopupError("cannot listen on %s:%d: %s" % (host, port, e.strerror or e)) from None
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()


def app_from_env():
    """The factory uvicorn's workers call (`topup serve --workers N`): TOPUP_DB and
    TOPUP_PASSPHRASE, which `topup serve` sets for them."""
    return create_app(os.environ["TOPUP_DB"], os.environ.get("TOPUP_PASSPHRASE") or None,
                      int(os.environ.get("TOPUP_POOL_SIZE", "8")))
