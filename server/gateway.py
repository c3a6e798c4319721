"""What every request passes before a route: request id, API key, body size limit, metrics, JSON errors.

A pure ASGI middleware (no BaseHTTPMiddleware) so that route handlers still see the client's real
``receive`` channel, which is how they notice a disconnect.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from reefcap.models.errors import (
    ImageError,
    ImageTooLargeError,
    ModelLoadError,
    ModelNotFoundError,
    ReefcapError,
    UnsupportedImageFormatError,
)

from .batcher import BatcherError, ClientDisconnectedError, DeadlineExceededError, QueueFullError, ShuttingDownError
from .feedback import UnknownRequestError

log = logging.getLogger("reefcap.server")
PUBLIC_PATHS = {"/", "/healthz", "/readyz", "/metrics"}  # no API key needed
ADMIN_PREFIX = "/v1/admin"  # every route under it needs the admin key, and is not mounted without one
# The framework's own refusals (routing, multipart parsing) by status.
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}
ENDPOINTS = {
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/models",
    "/v1/captions",
    "/v1/image-to-text",
    "/v1/feedback",
    "/v1/admin/reload",
}


# Headers a request may carry once: two Authorization (or Content-Type) headers are ambiguous, never merged.
SINGLE_HEADERS = (b"authorization", b"content-type")
# On every answer. JSON cannot be sniffed into HTML or framed; the page and /docs send their own, wider policy.
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
DEFAULT_CSP = b"default-src 'none'; frame-ancestors 'none'"


def with_security_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` plus :data:`SECURITY_HEADERS` and, unless the response set its own, :data:`DEFAULT_CSP`."""
    if not any(k.lower() == b"content-security-policy" for k, _ in headers):
        headers.append((b"content-security-policy", DEFAULT_CSP))
    headers.extend(SECURITY_HEADERS)
    return headers


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with the given status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class BodyTooLargeError(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class Gateway:
    """ASGI middleware: request id header, bearer key, request size limit, request metrics; with several workers,
    ``X-Reefcap-Worker`` names the one that answered."""

    def __init__(self, app: Any, settings: Any, metrics: Any, worker: int | None = None) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.worker_header = [] if worker is None else [(b"x-reefcap-worker", str(worker).encode())]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        rid = request_id.encode()
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        start = time.perf_counter()
        status_box = {"status": 500, "started": False}

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box["status"], status_box["started"] = message["status"], True
                headers = [*message.get("headers", ()), (b"x-request-id", rid), *self.worker_header]
                message["headers"] = with_security_headers(headers)
            await send(message)

        try:
            refusal = self._refuse(scope, path)
            if refusal is not None:
                await refusal(scope, receive, send_wrapped)
                return
            limit, seen = self.settings.max_request_bytes, 0

            async def receive_limited() -> dict:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise BodyTooLargeError(limit)
                return message

            try:
                await self.app(scope, receive_limited, send_wrapped)
            except Exception as exc:
                if status_box["started"]:
                    raise  # half a response is out: only closing the connection can end it
                await _crash_response(exc, path, request_id)(scope, receive, send_wrapped)
        finally:
            status = str(status_box["status"])
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.request_seconds.labels(endpoint, status).observe(time.perf_counter() - start)

    def _refuse(self, scope: dict, path: str) -> JSONResponse | None:
        raw = scope.get("headers", [])
        for name in SINGLE_HEADERS:
            count = sum(k.lower() == name for k, _ in raw)
            if count > 1:  # which one would count? Last-wins let a wrong key ride along with a right one
                title = name.decode().title()
                return error_response(400, "duplicate_header", f"send one {title} header, not {count}")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
        refusal = self._authorize(path, headers.get("authorization", ""), scope.get("method") == "OPTIONS")
        if refusal is not None:
            return refusal
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.settings.max_request_bytes:
            e = BodyTooLargeError(self.settings.max_request_bytes)
            return error_response(e.status, e.code, e.message)
        return None

    def _authorize(self, path: str, authorization: str, preflight: bool) -> JSONResponse | None:
        """A 401/404 refusal, or None. CORS preflights (OPTIONS) carry no credentials and need none."""
        if is_admin_path(path) and self.settings.admin_key:
            # Only the admin key opens admin routes, never the caption API key. Without an admin key they are not
            # mounted at all (create_app), so they answer exactly as a route that does not exist.
            if not preflight and not bearer_matches(authorization, self.settings.admin_key):
                return _unauthorized("missing or wrong admin key")
            return None
        key = self.settings.api_key
        if key and not preflight and path not in PUBLIC_PATHS and not bearer_matches(authorization, key):
            return _unauthorized("missing or wrong API key")
        return None


def is_admin_path(path: str) -> bool:
    """Whether ``path`` belongs to the admin surface (today's reload and any admin route added later)."""
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def _crash_response(exc: Exception, path: str, request_id: str) -> JSONResponse:
    """The answer to an exception that escaped the app before any response started.

    Answered here, not by Starlette's ServerErrorMiddleware, which re-raises after its 500 so that uvicorn
    drops the keep-alive connection without a ``Connection: close``. A complete JSON 500 keeps the connection
    usable for the client's next request, and carries X-Request-ID (the id the traceback is logged under).
    """
    if isinstance(exc, ClientDisconnect):  # gone while its body was read: nobody to answer, and no bug
        return error_response(499, "client_disconnected", "the client went away")
    log.exception("unhandled error on %s (request %s)", path, request_id, exc_info=exc)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__})")


def _unauthorized(message: str) -> JSONResponse:
    return error_response(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="reefcap"'})


def bearer_matches(authorization: str, key: str) -> bool:
    """Whether an Authorization header carries ``Bearer <key>``, compared in constant time.

    The scheme is case-insensitive and may be followed by several spaces (RFC 7235 2.1, RFC 6750 2.1).
    """
    scheme, _, token = authorization.strip(" \t").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip(" ").encode("latin-1"), key.encode("utf-8"))


def _status_for(exc: Exception) -> tuple[int, str, dict[str, str]]:
    retry = {"Retry-After": "1"}
    if isinstance(exc, ImageTooLargeError):
        return 413, exc.code, {}
    if isinstance(exc, UnsupportedImageFormatError):
        return 415, exc.code, {}
    if isinstance(exc, ImageError):
        return 400, exc.code, {}
    if isinstance(exc, UnknownRequestError):
        return 404, exc.code, {}
    if isinstance(exc, QueueFullError):
        return 503, "overloaded", retry
    if isinstance(exc, ShuttingDownError):
        return 503, "shutting_down", retry
    if isinstance(exc, DeadlineExceededError):
        return 504, "deadline_exceeded", {}
    if isinstance(exc, ClientDisconnectedError):
        return 499, "client_disconnected", {}
    if isinstance(exc, (ModelLoadError, ModelNotFoundError)):
        return 503, "model_unavailable", retry
    if isinstance(exc, ReefcapError):
        # invalid_options: decoding options out of range (InvalidOptionsError), a 422.
        statuses = {"quality_gate": 409, "invalid_options": 422, "too_many_references": 409}
        if exc.code == "feedback_unavailable":
            return 503, exc.code, retry
        return statuses.get(exc.code, 400), exc.code, {}
    # Anything else, a bare ValueError included, is a bug of ours, not the client's request: 500.
    return 500, "internal_error", {}


def install_error_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    """Every error, ours or the framework's, leaves as ``{"error": {"code", "message"}}``."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # exc.headers carries Allow on a 405 (RFC 9110 15.5.6 requires it).
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5]]
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    async def _any(request: Request, exc: Exception) -> JSONResponse:
        status, code, headers = _status_for(exc)
        if "Retry-After" in headers:
            headers = {"Retry-After": str(retry_after_s)}
        if status >= 500 and status not in (503, 504):
            log.exception("unhandled error on %s", request.url.path, exc_info=exc)
            return error_response(status, code, f"internal error ({type(exc).__name__})")
        if code == "model_unavailable":  # the loader's message names paths: the log gets it, the client does not
            log.error("model unavailable on %s: %s", request.url.path, exc)
            return error_response(status, code, "a model could not be loaded; see the server log", headers)
        return error_response(status, code, str(exc), headers)

    # Known error families go to ExceptionMiddleware (answered, not re-raised); Exception is the last resort.
    for family in (ReefcapError, BatcherError, Exception):
        app.add_exception_handler(family, _any)


MAX_JSON_DEPTH = 32  # deeper than any request body needs; json.loads would recurse past Python's limit
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep in ``body`` (brackets in strings do not count).

    Each pass deletes the innermost level of the brackets left: at most ``limit`` passes, each at C speed."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        brackets, removed = _INNERMOST.subn(b"", brackets)
        if not brackets or not removed:
            return False
    return bool(brackets)


def parse_json(body: bytes) -> Any:
    # Counting openers is two C-speed passes; the depth is only worked out for bodies with many (never a
    # caption request's). RecursionError is still caught: json.loads raises it past Python's own limit.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and too_deep(body):
        raise ApiError(400, "invalid_json", f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON ({exc})") from None
