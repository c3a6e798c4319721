"""The HTTP routes: each parses its request, delegates to the CaptionService / pool / reloader that the
app's :class:`~reefcap.server.app.Runtime` holds, and formats the answer. No captioning logic lives here."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any, get_type_hints

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from reefcap.models.engine import DecodeOptions
from reefcap.models.errors import ModelLoadError, ModelNotFoundError

from .gateway import ApiError, parse_json
from .page import PAGE

router = APIRouter()


def _options_model() -> type[BaseModel]:
    """A request's decoding overrides: every :class:`DecodeOptions` field, each optional (unset keeps the server's
    default). Built from the dataclass so a decoding option is declared once; ``DecodeOptions.validate`` checks
    the ranges. Only the prompt gets a bound of its own here, on the size of what a client may send."""
    bounds = {"prompt": {"max_length": 200}}
    fields = {
        name: (hint | None, Field(None, **bounds.get(name, {}))) for name, hint in get_type_hints(DecodeOptions).items()
    }
    return create_model("Options", __config__=ConfigDict(extra="forbid"), **fields)


Options = _options_model()


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
    index: int = Field(0, ge=0, le=2**31 - 1)  # an image's place in its request: bounded before SQLite sees it
    references: list[str] = Field(min_length=1, max_length=20)


class ReloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


def _validated(model: type[BaseModel], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        raise ApiError(422, "invalid_request", "; ".join(parts)) from None


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


async def _run(request: Request, uploads: list[bytes], options: dict[str, Any] | None) -> list[dict]:
    svc = request.app.state.runtime.ready_service()
    limit = request.app.state.settings.max_images_per_request
    if not uploads:
        raise ApiError(400, "no_images", "send at least one image")
    if len(uploads) > limit:
        raise ApiError(413, "too_many_images", f"at most {limit} images per request")
    decode_options = svc.options(options)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        return await svc.caption(uploads, decode_options, request.state.request_id, watcher)
    finally:
        watcher.cancel()


async def _caption_request(request: Request) -> tuple[list[bytes], dict[str, Any] | None]:
    """The uploads and decoding options of a multipart or JSON ``/v1/captions`` request."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        limit = request.app.state.settings.max_images_per_request
        form = await request.form(max_files=limit + 1, max_part_size=request.app.state.settings.max_image_bytes)
        uploads = [await f.read() for f in form.getlist("images") if hasattr(f, "read")]
        options = None
        if isinstance(form.get("options"), str):
            options = _validated(Options, parse_json(form["options"].encode())).model_dump(exclude_none=True)
        return uploads, options
    if ctype.startswith("application/json"):
        raw = parse_json(await request.body())
        if isinstance(raw, dict) and any(isinstance(i, dict) and "url" in i for i in raw.get("images") or []):
            raise ApiError(400, "urls_not_supported", "the server never fetches image URLs; send the bytes")
        body = _validated(CaptionsBody, raw)
        uploads = [_b64(part.data, i) for i, part in enumerate(body.images)]
        return uploads, body.options.model_dump(exclude_none=True) if body.options else None
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data with 'images' parts, or JSON")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    runtime = request.app.state.runtime
    if runtime.service is None:
        return JSONResponse({"ready": False, "serving": "none", "reason": "loading models"}, status_code=503)
    body = runtime.service.pool.status()
    ok = body["ready"] and not runtime.closing
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"models": request.app.state.runtime.ready_service().pool.models()}


@router.post("/v1/captions")
async def captions(request: Request) -> dict[str, Any]:
    uploads, options = await _caption_request(request)
    results = await _run(request, uploads, options)
    return {"request_id": request.state.request_id, "results": results}


@router.post("/v1/image-to-text")
async def image_to_text(request: Request) -> list[dict[str, str]]:
    """Hugging Face Inference API shape: raw image bytes in, ``[{"generated_text": ...}]`` out."""
    body = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        raw = parse_json(body)  # the HF client sends {"inputs": base64, "parameters": {...}} with parameters
        if not isinstance(raw, dict) or not isinstance(raw.get("inputs"), str):
            raise ApiError(400, "invalid_request", 'JSON body must be {"inputs": "<base64 image>"}')
        body = _b64(raw["inputs"], 0)
    results = await _run(request, [body], None)
    return [{"generated_text": results[0]["caption"]}]


@router.post("/v1/feedback")
async def feedback(request: Request, body: FeedbackBody) -> dict[str, Any]:
    refs = [" ".join(r.split()) for r in body.references]
    if not all(refs) or any(len(r) > 500 for r in refs):
        raise ApiError(400, "invalid_references", "references must be non-empty and at most 500 characters")
    result = await request.app.state.runtime.ready_service().add_feedback(body.request_id, body.index, refs)
    return {"request_id": body.request_id, "index": body.index, "stored": len(refs), **result}


@router.post("/v1/admin/reload")
async def reload(request: Request) -> dict[str, Any]:
    runtime = request.app.state.runtime
    runtime.ready_service()
    raw = await request.body()
    body = _validated(ReloadBody, parse_json(raw)) if raw.strip() else ReloadBody()
    try:
        return await runtime.reloader.reload(body.model)
    except (ModelLoadError, ModelNotFoundError) as exc:  # the candidate is broken; the server is fine
        raise ApiError(422, exc.code, str(exc)) from None
