"""FastAPI app: routes only parse, delegate to the CaptionService / pool / reloader, and format answers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reefcap.models.engine import EngineConfig
from reefcap.models.errors import ModelLoadError, ModelNotFoundError

from .feedback import FeedbackStore
from .gateway import ApiError, Gateway, install_error_handlers, parse_json
from .metrics import Metrics
from .page import PAGE
from .pool import ModelPool, checkpoint_manifest, load_model
from .reload import Reloader
from .service import CaptionService
from .settings import ServerSettings

log = logging.getLogger("reefcap.server")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_beams: int | None = None
    max_length: int | None = None
    min_length: int | None = None
    repetition_penalty: float | None = None
    prompt: str | None = Field(None, max_length=200)


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str


class CaptionsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[ImagePart]
    options: Options | None = None


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=64)
    index: int = Field(0, ge=0)
    references: list[str] = Field(min_length=1, max_length=20)


class ReloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


def build_pool(settings: ServerSettings, metrics: Metrics, log_if_any: bool = False) -> ModelPool:
    """Load primary and fallback; a primary that fails to load leaves the fallback serving alone.

    With ``log_if_any`` load failures are logged only when some model loaded (the caller reports the rest).
    """
    set_inference_threads(settings.inference_threads)
    config = EngineConfig(device=settings.device, dtype=settings.dtype, limits=settings.image_limits)
    primary = fallback = None
    primary_error = fallback_error = None
    try:
        primary = load_model(settings.model, settings.backend, config)
    except Exception as exc:  # missing or corrupt: say why in /readyz, serve with the fallback
        primary_error = f"{type(exc).__name__}: {exc}"
    if settings.fallback:
        try:
            fallback = load_model(settings.fallback, settings.backend, config)
        except Exception as exc:
            fallback_error = f"{type(exc).__name__}: {exc}"
    if primary_error and (fallback or not log_if_any):
        log.error("primary model %s not loaded: %s", settings.model, primary_error)
    if fallback_error and (primary or not log_if_any):
        log.error("fallback model %s not loaded: %s", settings.fallback, fallback_error)
    pool = ModelPool(
        primary,
        fallback,
        metrics,
        primary_timeout_s=settings.primary_timeout_s,
        breaker_failures=settings.breaker_failures,
        breaker_reset_s=settings.breaker_reset_s,
        primary_error=primary_error,
        manifests=(checkpoint_manifest(settings.model), checkpoint_manifest(settings.fallback or "")),
    )
    pool.fallback_error = fallback_error
    return pool


def set_inference_threads(threads: int) -> None:
    """Intra-op threads of PyTorch and (unless REEFCAP_ORT_THREADS says otherwise) of the ONNX backend:
    ``threads``, or with 0 one per core minus one (at least one)."""
    import os

    import torch

    n = threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(n)
    os.environ.setdefault("REEFCAP_ORT_THREADS", str(n))  # read by the onnx backend when it loads


def _b64(data: str, index: int) -> bytes:
    if data.startswith("data:"):  # a data URL from a browser: keep what follows the comma
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"image {index}: data is not valid base64") from None


async def _wait_disconnect(request: Request) -> None:
    """Completes when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(settings: ServerSettings | None = None, pool: ModelPool | None = None) -> FastAPI:
    """The caption server. Without ``pool``, models load in the background after startup (``/readyz``)."""
    settings = settings or ServerSettings()
    metrics = Metrics()
    state: dict[str, Any] = {"service": None, "reloader": None, "closing": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        store = FeedbackStore(settings.feedback_db, settings.feedback_retain)
        tasks: list[asyncio.Task] = []

        async def bring_up(p: ModelPool | None) -> None:
            p = p or await asyncio.to_thread(build_pool, settings, metrics)
            p.metrics = metrics
            p._publish_info()
            service = CaptionService(settings, p, metrics, store)
            service.start()
            config = EngineConfig(device=settings.device, dtype=settings.dtype, limits=settings.image_limits)
            state["reloader"] = Reloader(p, settings.model, settings.backend, config, metrics)
            state["service"] = service
            if settings.reload_poll_s > 0:
                tasks.append(asyncio.create_task(state["reloader"].watch(settings.reload_poll_s)))

        if pool is not None:
            await bring_up(pool)
        else:
            tasks.append(asyncio.create_task(bring_up(None)))
        try:
            yield
        finally:
            state["closing"] = True
            for t in tasks:
                t.cancel()
            if state["service"] is not None:
                await state["service"].close()  # drains queued work before the process exits
            store.close()

    app = FastAPI(title="reefcap", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.runtime = state
    install_error_handlers(app, settings.retry_after_s)

    def service() -> CaptionService:
        svc = state["service"]
        if svc is None or not svc.pool.ready:
            raise ApiError(503, "not_ready", "no model is loaded yet", {"Retry-After": str(settings.retry_after_s)})
        return svc

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        svc = state["service"]
        if svc is None:
            return JSONResponse({"ready": False, "serving": "none", "reason": "loading models"}, status_code=503)
        body = svc.pool.status()
        ok = body["ready"] and not state["closing"]
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": service().pool.models()}

    async def run(request: Request, uploads: list[bytes], options: dict[str, Any] | None) -> list[dict]:
        svc = service()
        if not uploads:
            raise ApiError(400, "no_images", "send at least one image")
        if len(uploads) > settings.max_images_per_request:
            raise ApiError(413, "too_many_images", f"at most {settings.max_images_per_request} images per request")
        decode_options = svc.options(options)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            return await svc.caption(uploads, decode_options, request.state.request_id, watcher)
        finally:
            watcher.cancel()

    @app.post("/v1/captions")
    async def captions(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "")
        options: dict[str, Any] | None = None
        if ctype.startswith("multipart/form-data"):
            form = await request.form(
                max_files=settings.max_images_per_request + 1, max_part_size=settings.max_image_bytes
            )
            uploads = [await f.read() for f in form.getlist("images") if hasattr(f, "read")]
            if isinstance(form.get("options"), str):
                options = _validated(Options, parse_json(form["options"].encode())).model_dump(exclude_none=True)
        elif ctype.startswith("application/json"):
            raw = parse_json(await request.body())
            if isinstance(raw, dict) and any(isinstance(i, dict) and "url" in i for i in raw.get("images") or []):
                raise ApiError(400, "urls_not_supported", "the server never fetches image URLs; send the bytes")
            body = _validated(CaptionsBody, raw)
            uploads = [_b64(part.data, i) for i, part in enumerate(body.images)]
            options = body.options.model_dump(exclude_none=True) if body.options else None
        else:
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data with 'images' parts, or JSON")
        results = await run(request, uploads, options)
        return {"request_id": request.state.request_id, "results": results}

    @app.post("/v1/image-to-text")
    async def image_to_text(request: Request) -> list[dict[str, str]]:
        """Hugging Face Inference API shape: raw image bytes in, ``[{"generated_text": ...}]`` out."""
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            raw = parse_json(body)  # the HF client sends {"inputs": base64, "parameters": {...}} with parameters
            if not isinstance(raw, dict) or not isinstance(raw.get("inputs"), str):
                raise ApiError(400, "invalid_request", 'JSON body must be {"inputs": "<base64 image>"}')
            body = _b64(raw["inputs"], 0)
        results = await run(request, [body], None)
        return [{"generated_text": results[0]["caption"]}]

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody) -> dict[str, Any]:
        refs = [" ".join(r.split()) for r in body.references]
        if not all(refs) or any(len(r) > 500 for r in refs):
            raise ApiError(400, "invalid_references", "references must be non-empty and at most 500 characters")
        result = await service().add_feedback(body.request_id, body.index, refs)
        return {"request_id": body.request_id, "index": body.index, "stored": len(refs), **result}

    @app.post("/v1/admin/reload")
    async def reload(request: Request) -> dict[str, Any]:
        service()
        raw = await request.body()
        body = _validated(ReloadBody, parse_json(raw)) if raw.strip() else ReloadBody()
        try:
            return await state["reloader"].reload(body.model)
        except (ModelLoadError, ModelNotFoundError) as exc:  # the candidate is broken; the server is fine
            raise ApiError(422, exc.code, str(exc)) from None

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])
    app.add_middleware(Gateway, settings=settings, metrics=metrics)
    return app


def _validated(model: type[BaseModel], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        raise ApiError(422, "invalid_request", "; ".join(parts)) from None
