"""Bounds on what slow or huge clients can hold: connections, read time, large bodies in flight, and draining.

Three layers, each cheap on the hot path (a timer per connection, a counter per request):

- :func:`bounded_protocol`: uvicorn's HTTP protocol with a connection cap (a request on a connection past
  ``max_connections`` is answered 503 with Retry-After, and far past it the answer comes on connect, so every
  client gets an answer and file descriptors stay bounded), a request head of at most :data:`MAX_HEAD_BYTES`
  (else 431), a request-head timeout (a connection whose next request head has not arrived ``read_timeout_s``
  after it opened or after its last response is closed: uvicorn itself closes only idle keep-alive
  connections, and a client trickling one byte every few seconds resets that timer), and JSON bodies on the
  parser's refusals of malformed HTTP (uvicorn's are text/plain).
- :class:`BodyLimits`: ASGI middleware; a request's body must arrive within ``read_timeout_s`` (else 408
  ``body_timeout``), and at most ``max_large_bodies`` requests with a body over :data:`LARGE_BODY` are in
  flight at once (else 503 ``overloaded`` with Retry-After), so eight 58 MB JSON bodies cannot take half a
  GB of memory together.
- :class:`DrainingServer`: on SIGTERM the batcher starts draining at once (not after uvicorn gave up on the
  open requests), so requests still queued at the drain deadline get a JSON 503 ``shutting_down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from http import HTTPStatus
from typing import Any

import uvicorn

from .gateway import ApiError, error_response, with_security_headers

log = logging.getLogger("reefcap.server")
LARGE_BODY = 1 << 20  # bytes; a caption request with one photo is far below this
MAX_HEAD_BYTES = 64 << 10  # request line and headers
# Connections past max_connections are answered 503 once their request head is in (its fd held until then, at
# most read_timeout_s); past (1 + OVERFLOW_FACTOR) x max_connections, at once on connect, so fds stay bounded.
OVERFLOW_FACTOR = 4
LINGER_S = 1.0  # after a refusal, how long the client's remaining bytes are read and dropped before the close
HEAD_TOO_LARGE = f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"
INVALID_HTTP = "malformed HTTP request (bad framing, a bad chunk size or a control character in a header)"


class _Bounds:
    """The bounds of :func:`bounded_protocol`, mixed into uvicorn's protocol class (settings as class attributes)."""

    max_connections: int
    read_timeout_s: float
    retry_after_s: int
    overloaded: Any  # the ASGI app of a connection past max_connections

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._answered, self._head_parsed, self._head_too_large = False, 0, False
        count = len(self.connections)
        if count > self.max_connections:
            _warn_overload(count, self.max_connections)
            # Far past the cap, even waiting for a head would hold too many descriptors: answered on connect.
            if count > self.max_connections * (1 + OVERFLOW_FACTOR):
                self._answer_and_close(503, "overloaded", overload_message(self.max_connections), self.retry_after_s)
                return
            self.app = self.overloaded  # this connection's request is answered 503 once its head is in
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._answered:  # the answer is out: what the client still sends is read and dropped
            return
        super().data_received(data)
        # Bytes that left the request head still incomplete are head bytes: bounded, as h11 bounds them
        # (httptools, uvicorn's default parser, takes megabytes of header lines).
        if not self._answered and self.cycle is self._head_cycle and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._answer_and_close(431, "headers_too_large", HEAD_TOO_LARGE)

    # httptools' callbacks (h11 never calls them): a head that arrived whole in one read is counted here.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_parsed = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_parsed += size
        if self._head_parsed > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise HeadTooLargeError  # stops the parser; uvicorn answers through send_400_response

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser refused, as JSON like every other answer."""
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # half an answer is out: only closing can end it
        elif self._head_too_large:
            self._answer_and_close(431, "headers_too_large", HEAD_TOO_LARGE)
        else:
            self._answer_and_close(400, "invalid_http", INVALID_HTTP)

    def _answer_and_close(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        """Write a complete JSON answer and close without a reset: the write side first, then the rest once
        the client is done or after LINGER_S. Closing with its unread bytes in the socket would send a reset,
        which can destroy the answer before the client reads it."""
        self._answered = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app, if it has this request, sees a disconnect; its sends are dropped
            cycle.message_event.set()
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        extra = [(b"retry-after", str(retry_after).encode())] if retry_after is not None else []
        self.transport.write(raw_answer(status, code, message, [*self.server_state.default_headers, *extra]))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        old = getattr(self, "_head_timer", None)
        if old is not None:
            old.cancel()
        cycle = self.cycle  # a new request head replaces the cycle: then the head arrived in time
        self._head_cycle, self._head_bytes = cycle, 0
        self._head_timer = self.loop.call_later(self.read_timeout_s, self._head_timeout, cycle)

    def _head_timeout(self, cycle: Any) -> None:
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def bounded_protocol(base: type, max_connections: int, read_timeout_s: float, retry_after_s: int = 1) -> type:
    """A subclass of uvicorn's HTTP protocol class ``base`` (h11 or httptools) with the bounds above, in which every
    refusal is an HTTP answer with a JSON error body (uvicorn's own are text/plain, or a closed socket)."""
    settings = {"max_connections": max_connections, "read_timeout_s": read_timeout_s, "retry_after_s": retry_after_s}
    overloaded = staticmethod(overloaded_app(max_connections, retry_after_s))
    return type("BoundedProtocol", (_Bounds, base), {**settings, "overloaded": overloaded})


class HeadTooLargeError(Exception):
    """Raised from a parser callback to stop parsing a request head over :data:`MAX_HEAD_BYTES`."""


def overload_message(max_connections: int) -> str:
    return f"more than {max_connections} connections are open; try again after Retry-After seconds"


def raw_answer(status: int, code: str, message: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response with the JSON error body every answer of the server has (``Connection: close``)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    fields = [
        *headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    lines += [name + b": " + value + b"\r\n" for name, value in with_security_headers(fields)]
    return b"".join(lines) + b"\r\n" + body


def overloaded_app(max_connections: int, retry_after_s: int) -> Any:
    """The ASGI app of a connection past ``max_connections``: a JSON 503 with Retry-After, then the close."""
    headers = {"Retry-After": str(retry_after_s), "Connection": "close"}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        # The body first (a small one, briefly): answering while the client still sends would reset the
        # connection under it, and it would never read the answer.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_drain_body(receive), LINGER_S)

        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = with_security_headers(list(message.get("headers", ())))
            await send(message)

        response = error_response(503, "overloaded", overload_message(max_connections), headers)
        await response(scope, receive, send_secured)

    return app


async def _drain_body(receive: Any) -> None:
    seen = 0
    while seen <= LARGE_BODY:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


_last_overload_log = [0.0]


def _warn_overload(count: int, max_connections: int) -> None:
    # At most once a second: a burst of hundreds of refused connections is one event, not hundreds of lines.
    now = time.monotonic()
    if now - _last_overload_log[0] >= 1.0:
        _last_overload_log[0] = now
        log.warning("%d connections open, more than max_connections %d: answering 503", count, max_connections)


class BodyLimits:
    """ASGI middleware: a deadline for reading the request body and a cap on large bodies in flight."""

    def __init__(self, app: Any, read_timeout_s: float, max_large_bodies: int, retry_after_s: int = 1) -> None:
        self.app, self.read_timeout_s, self.retry_after_s = app, read_timeout_s, retry_after_s
        self.max_large_bodies = max_large_bodies
        self.large_in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in scope.get("headers", []))
        large = chunked or (length is not None and length.isdigit() and int(length) > LARGE_BODY)
        if large and self.large_in_flight >= self.max_large_bodies:
            retry = {"Retry-After": str(self.retry_after_s)}
            message = f"{self.max_large_bodies} requests with bodies over {LARGE_BODY} bytes are already in flight"
            await error_response(503, "overloaded", message, retry)(scope, receive, send)
            return
        # One timer per request, not a wait_for per receive (that costs a task each): if the body is still
        # incomplete when it fires, the request's task is cancelled inside receive() and answered 408.
        no_body = not chunked and (length is None or length == b"0")
        if no_body:  # a GET: nothing to time
            await self.app(scope, receive, send)
            return
        task, state = asyncio.current_task(), {"body_done": False, "timed_out": False}

        def expire() -> None:
            if not state["body_done"] and task is not None:
                state["timed_out"] = True
                task.cancel()

        timer = asyncio.get_running_loop().call_later(self.read_timeout_s, expire)

        async def receive_timed() -> dict:
            try:
                message = await receive()
            except asyncio.CancelledError:
                if state["timed_out"] and task is not None and task.uncancel() == 0:
                    raise BodyTimeoutError(self.read_timeout_s) from None
                raise
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
                timer.cancel()
            return message

        self.large_in_flight += large
        try:
            await self.app(scope, receive_timed, send)
        finally:
            timer.cancel()
            self.large_in_flight -= large


class BodyTimeoutError(ApiError):
    """The client did not send its whole body within the read timeout (408; the connection is closed)."""

    def __init__(self, seconds: float) -> None:
        message = f"the request body did not arrive within {seconds:g} s"
        super().__init__(408, "body_timeout", message, {"Connection": "close"})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, starting the app's drain as soon as shutdown begins (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, runtime: Any, on_started: Any = None) -> None:
        super().__init__(config)
        self.runtime, self.on_started = runtime, on_started

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.on_started is not None and self.started:  # listening now (a worker tells its supervisor)
            self.on_started()

    async def shutdown(self, sockets: Any = None) -> None:
        self.runtime.closing = True  # /readyz answers 503 from now on
        service = self.runtime.service
        drain = asyncio.ensure_future(service.drain()) if service is not None else None
        try:
            await super().shutdown(sockets)
        finally:
            if drain is not None:
                with contextlib.suppress(Exception):
                    await drain


def run(app: Any, settings: Any, sockets: list | None = None, on_started: Any = None) -> None:
    """Serve ``app`` with uvicorn under the bounds in ``settings`` until SIGINT/SIGTERM, then drain; on ``sockets``
    (bound, not listening) when given, else on ``settings.host`` and ``port``; ``on_started()`` once listening."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_s,
        # Past the batcher's own drain: by then every queued request has its answer (or a JSON 503).
        timeout_graceful_shutdown=settings.drain_timeout_s + 5,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,  # h11 (if chosen) bounds a head as httptools does below
    )
    config.load()
    quiet_gc()
    config.http_protocol_class = bounded_protocol(
        config.http_protocol_class, settings.max_connections, settings.read_timeout_s, settings.retry_after_s
    )
    DrainingServer(config, app.state.runtime, on_started).run(sockets=sockets)


# Collections of the youngest generation run every GC_GEN0 container allocations instead of Python's 700. A request
# allocates a few hundred (headers, dicts, futures), so the default collected several times a request and,
# every ten of those, walked a heap that holds torch and transformers: 12% of the server's CPU per request
# and a p99 of 270 ms at 32 connections on the bundled model (2 vCPUs). With these and the loaded heap frozen:
# 375 -> 430 images/s, p99 110 ms. Reference cycles are still collected, only less often.
GC_THRESHOLDS = (50_000, 50, 1000)


def quiet_gc() -> None:
    """Move everything loaded so far (models, libraries) out of the collector's reach and collect rarely.

    Process-wide, so only ``reefcap serve`` calls it (an app embedded in someone else's process leaves their GC be).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
