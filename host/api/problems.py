# RFC 9457 problem details: every error the service answers is `application/problem+json`
# {type, title, status, detail, instance} — never FastAPI's {"detail": ...} or an HTML page.
# `type` is a relative URI naming the kind of problem (stable; clients may switch on it),
# `title` its short English name, `detail` the one-line explanation (for a refusal by the
# host core, its TopupError message: the same words the CLI prints).
import json

from starlette.responses import Response

MEDIA_TYPE = "application/problem+json"

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Unprocessable request",
    500: "Internal server error",
    503: "Service unavailable",
}

TYPES = {
    400: "/problems/bad-request",
    401: "/problems/unauthorized",
    403: "/problems/forbidden",
    404: "/problems/not-found",
    405: "/problems/method-not-allowed",
    408: "/problems/request-timeout",
    409: "/problems/conflict",
    413: "/problems/body-too-large",
    415: "/problems/unsupported-media-type",
    422: "/problems/unprocessable",
    500: "/problems/internal",
    503: "/problems/unavailable",
}


class Problem(Exception):
    """Raise anywhere in a request: the answer is this problem. `type` defaults to the
    status's; `extra` adds members (e.g. `errors` for a validation failure); `headers`
    adds response headers (WWW-Authenticate, Retry-After)."""

    def __init__(self, status, detail, type=None, title=None, headers=None, **extra):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = type or TYPES.get(status, "about:blank")
        self.title = title or TITLES.get(status, "Error")
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance=None):
        doc = {"type": self.type, "title": self.title, "status": self.status,
               "detail": self.detail}
        if instance:
            doc["instance"] = instance
        doc.update(self.extra)
        return doc

    def response(self, instance=None):
        return problem_response(self.status, self.body(instance), self.headers)


def problem_response(status, doc, headers=None):
    return Response(json.dumps(doc, separators=(",", ":")).encode(), status_code=status,
                    media_type=MEDIA_TYPE, headers=headers)


def responses(*statuses):
    """OpenAPI `responses=` entries for the problems a route may answer."""
    return {s: {"description": TITLES.get(s, "Error"),
                "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for s in statuses}
