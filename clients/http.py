"""Python clients for the reefcap server: ``ReefcapClient`` (blocking) and ``AsyncReefcapClient``.

Both send one image per request to ``POST /v1/captions`` (the server batches across requests), retry
with exponential backoff on 429/503 and on connection failures, honouring ``Retry-After``, and return
:class:`~reefcap.models.policy.results.CaptionResult` records, the library's one result type
(``result.model.name``, ``result.fallback``, ``result.quality``; ``result.request_id`` and ``result.index`` for
feedback). A 4xx answer raises :class:`ReefcapHTTPError` with the server's error code and message;
``caption_many`` returns such errors in place instead of raising.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import os
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from reefcap.models.engines.base import DecodeOptions
from reefcap.models.errors import ImageNotFoundError, NotAnImageError, ReefcapError
from reefcap.models.policy.results import CaptionResult

RETRY_STATUS = {429, 503}
# Failures before any answer: the request is safe to send again (captioning has no side effect to repeat).
RETRY_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)
ImageInput = str | os.PathLike | bytes | Image.Image


class ReefcapHTTPError(ReefcapError):
    """The server refused a request (or kept refusing it past the retry budget)."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before retrying a refused or failed request."""

    retries: int = 5
    backoff_s: float = 0.25
    max_backoff_s: float = 10.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based); ``Retry-After`` wins when present."""
        header = response.headers.get("retry-after") if response is not None else None
        if header:
            try:
                return min(self.max_backoff_s, max(0.0, float(header)))
            except ValueError:
                when = email.utils.parsedate_to_datetime(header)
                if when is not None:
                    return min(self.max_backoff_s, max(0.0, when.timestamp() - time.time()))
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return base * (0.5 + random.random() / 2)  # jitter: clients refused together should not return together


def image_bytes(image: ImageInput) -> tuple[str, bytes]:
    """A (filename, bytes) pair for an upload. PIL images are sent as PNG (lossless)."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "image.png", buf.getvalue()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    path = Path(image)
    return path.name, path.read_bytes()


def _request_parts(image: ImageInput, options: DecodeOptions | dict | None) -> dict[str, Any]:
    name, data = image_bytes(image)
    parts: dict[str, Any] = {"files": [("images", (name, data, "application/octet-stream"))]}
    if options is not None:
        opts = asdict(options) if isinstance(options, DecodeOptions) else dict(options)
        parts["data"] = {"options": json.dumps(opts)}
    return parts


def _parse(response: httpx.Response) -> CaptionResult:
    request_id = response.headers.get("x-request-id", "")
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
            code, message = err["code"], err["message"]
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", response.text[:200]
        raise ReefcapHTTPError(response.status_code, code, message, request_id)
    body = response.json()
    return CaptionResult.from_dict(body["results"][0], request_id=body.get("request_id", request_id))


def _feedback_body(request_id: str, index: int, references: str | Sequence[str]) -> dict[str, Any]:
    refs = [references] if isinstance(references, str) else list(references)
    if not isinstance(request_id, str) or not request_id:
        raise ReefcapError(f"feedback needs the request_id of a served caption, got {request_id!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ReefcapError(f"feedback index must be a non-negative integer, got {index!r}")
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise ReefcapError("feedback needs at least one non-empty reference caption")
    return {"request_id": request_id, "index": index, "references": refs}


def _json_or_raise(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        _parse(response)  # raises ReefcapHTTPError with the server's code and message
    return response.json()


class _Base:
    """What the blocking and asyncio clients share: settings, the httpx client, the retry decision. Only the
    loops that wait differ (``time.sleep`` or ``await asyncio.sleep``)."""

    _client_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("REEFCAP_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._http = self._client_class(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    def _wait_before_retry(self, attempt: int, outcome: httpx.Response | Exception) -> float | None:
        """Seconds to wait before trying again, or None when ``outcome`` is final (a failure is re-raised)."""
        response = outcome if isinstance(outcome, httpx.Response) else None
        if attempt < self.retry.retries and (response is None or response.status_code in RETRY_STATUS):
            return self.retry.delay(attempt, response)
        if response is None:
            raise outcome
        return None


class ReefcapClient(_Base):
    """Blocking client. ``caption_many`` runs up to ``concurrency`` requests at once on threads."""

    _client_class = httpx.Client
    _http: httpx.Client

    def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                outcome: httpx.Response | Exception = self._http.post(path, **kwargs)
            except RETRY_ERRORS as exc:
                outcome = exc
            wait = self._wait_before_retry(attempt, outcome)
            if wait is None:
                return outcome
            time.sleep(wait)
            attempt += 1

    def caption(self, image: ImageInput, options: DecodeOptions | dict | None = None) -> CaptionResult:
        """Caption one image (a path, encoded bytes or a PIL image)."""
        return _parse(self._post("/v1/captions", **_request_parts(image, options)))

    def caption_many(
        self, images: Sequence[ImageInput], options: DecodeOptions | dict | None = None, concurrency: int = 8
    ) -> list[CaptionResult | ReefcapHTTPError]:
        """Caption many images with at most ``concurrency`` requests in flight; results in input order."""

        def one(image: ImageInput) -> CaptionResult | ReefcapHTTPError:
            try:
                return self.caption(image, options)
            except ReefcapHTTPError as exc:
                if exc.status >= 500:
                    raise
                return exc

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            return list(pool.map(one, images))

    def feedback(self, request_id: str, index: int, references: str | Sequence[str]) -> dict[str, Any]:
        """Post reference captions for image ``index`` of a served request (``CaptionResult.request_id``);
        the server keeps them for ``reefcap feedback export`` and its rolling scores. Returns its answer."""
        return _json_or_raise(self._post("/v1/feedback", json=_feedback_body(request_id, index, references)))

    def get(self, path: str) -> Any:
        """GET a JSON endpoint (``/healthz``, ``/readyz``, ``/v1/models``)."""
        return _json_or_raise(self._http.get(path))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ReefcapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_server(client: ReefcapClient) -> None:
    """Raise :class:`ReefcapError` (one line naming the URL) unless the server at ``client.base_url`` answers and
    takes the client's key. One ``GET /v1/models``, no retries: a batch run calls it before its first image, so a
    mistyped URL or key stops it at once, not once per image (429/503 pass: the per-image retries wait those out)."""
    url = client.base_url
    try:
        response = client._http.get("/v1/models")
    except httpx.TimeoutException:
        raise ReefcapError(f"the server at {url} did not answer within {client.timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise ReefcapError(f"cannot reach the server at {url} ({type(exc).__name__}: {exc})") from None
    if response.status_code == 401:
        given = "refused the API key given" if client.headers else "needs an API key"
        raise ReefcapError(f"the server at {url} {given} (pass --api-key or set REEFCAP_API_KEY)")
    if response.status_code >= 300 and response.status_code not in RETRY_STATUS:
        raise ReefcapError(f"{url} does not answer like a reefcap server (GET /v1/models: HTTP {response.status_code})")


class AsyncReefcapClient(_Base):
    """asyncio client with the same behaviour as :class:`ReefcapClient`."""

    _client_class = httpx.AsyncClient
    _http: httpx.AsyncClient

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                outcome: httpx.Response | Exception = await self._http.post(path, **kwargs)
            except RETRY_ERRORS as exc:
                outcome = exc
            wait = self._wait_before_retry(attempt, outcome)
            if wait is None:
                return outcome
            await asyncio.sleep(wait)
            attempt += 1

    async def caption(self, image: ImageInput, options: DecodeOptions | dict | None = None) -> CaptionResult:
        """Caption one image (a path, encoded bytes or a PIL image)."""
        parts = await asyncio.to_thread(_request_parts, image, options)
        return _parse(await self._post("/v1/captions", **parts))

    async def caption_many(
        self, images: Iterable[ImageInput], options: DecodeOptions | dict | None = None, concurrency: int = 8
    ) -> list[CaptionResult | ReefcapHTTPError]:
        """Caption many images with at most ``concurrency`` requests in flight; results in input order."""
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(image: ImageInput) -> CaptionResult | ReefcapHTTPError:
            async with gate:
                try:
                    return await self.caption(image, options)
                except ReefcapHTTPError as exc:
                    if exc.status >= 500:
                        raise
                    return exc

        return list(await asyncio.gather(*(one(im) for im in images)))

    async def feedback(self, request_id: str, index: int, references: str | Sequence[str]) -> dict[str, Any]:
        """Post reference captions for image ``index`` of a served request (see :meth:`ReefcapClient.feedback`)."""
        return _json_or_raise(await self._post("/v1/feedback", json=_feedback_body(request_id, index, references)))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncReefcapClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def run_on_server(
    client: ReefcapClient,
    names: Iterable[str],
    options: DecodeOptions,
    batch_size: int,
    concurrency: int,
    quality: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """The batch CLI's server mode: records per chunk of ``batch_size`` names, same shape as local mode (with
    ``quality``, the server measures each image's UIQM/UCIQE: ``options.quality`` on every request)."""
    from .batch import batched

    sent: DecodeOptions | dict = {**asdict(options), "quality": True} if quality else options
    for chunk in batched(names, batch_size):
        readable, records = [], {}
        for name in chunk:
            try:
                readable.append((name, image_bytes(name)[1]))
            except FileNotFoundError:  # the same code local mode gives (ImageNotFoundError)
                records[name] = {"image": name, "error": f"{name}: no such file", "code": ImageNotFoundError.code}
            except OSError as exc:
                error = f"{name}: cannot read ({exc.strerror or exc})"
                records[name] = {"image": name, "error": error, "code": NotAnImageError.code}
        answers = client.caption_many([data for _, data in readable], sent, concurrency)
        for (name, _), answer in zip(readable, answers, strict=True):
            if isinstance(answer, ReefcapHTTPError):
                records[name] = {"image": name, "error": answer.message, "code": answer.code}
            else:  # the same record as local mode, with what `reefcap feedback post` needs: request_id, index
                records[name] = answer.replace(image=name).to_dict()
        yield [records[name] for name in chunk]
