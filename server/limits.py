"""Bounds on what slow or huge clients can hold: connections, read time, large bodies in flight, and draining.

Three layers, each cheap on the hot path (a timer per connection, a counter per request):

- :func:`bounded_protocol`: uvicorn's HTTP protocol with a connection cap (connections past
  ``max_connections`` are closed as they are accepted, so file descriptors stay bounded), a request head of
  at most :data:`MAX_HEAD_BYTES`, and a request-head timeout (a connection whose next request head has not
  arrived ``read_timeout_s`` after it opened or after its last response is closed: uvicorn itself closes only
  idle keep-alive connections, and a client trickling one byte every few seconds resets that timer).
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
import logging
from typing import Any

import uvicorn

from .gateway import ApiError, error_response

log = logging.getLogger("reefcap.server")
LARGE_BODY = 1 << 20  # bytes; a caption request with one photo is far below this
MAX_HEAD_BYTES = 64 << 10  # request line and headers


def bounded_protocol(base: type, max_connections: int, read_timeout_s: float) -> type:
    """A subclass of uvicorn's HTTP protocol class ``base`` (h11 or httptools) with the two bounds above."""

    class BoundedProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("%d connections open: closing a new one", len(self.connections) - 1)
                transport.close()
                return
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Bytes that left the request head still incomplete are head bytes: bounded, as h11 bounds them
            # (httptools, uvicorn's default parser, takes megabytes of header lines).
            if self.cycle is self._head_cycle and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
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
            self._head_timer = self.loop.call_later(read_timeout_s, self._head_timeout, cycle)

        def _head_timeout(self, cycle: Any) -> None:
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

    return BoundedProtocol


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

    def __init__(self, config: uvicorn.Config, runtime: Any) -> None:
        super().__init__(config)
        self.runtime = runtime

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


def run(app: Any, settings: Any) -> None:
    """Serve ``app`` with uvicorn under the bounds in ``settings`` until SIGINT/SIGTERM, then drain."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_s,
        # Past the batcher's own drain: by then every queued request has its answer (or a JSON 503).
        timeout_graceful_shutdown=settings.drain_timeout_s + 5,
    )
    config.load()
    quiet_gc()
    config.http_protocol_class = bounded_protocol(
        config.http_protocol_class, settings.max_connections, settings.read_timeout_s
    )
    DrainingServer(config, app.state.runtime).run()


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
