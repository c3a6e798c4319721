"""The HTTP routes: each parses its request, delegates to the CaptionService / pool / reloader that the
app's :class:`~reefcap.server.app.Runtime` holds, and formats the answer. No captioning logic lives here."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, get_type_hints

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from reefcap.models.engines.base import DecodeOptions

from .admin import public_info
from .bodies import (
    JSON,
    MULTIPART,
    Text,
    b64_image,
    media_type,
    multipart_parts,
    parse_body_json,
    read_form,
    too_many_images,
    validated,
)
from .gateway import ApiError, parse_json
from .openapi import errors, json_body, request_body
from .page import PAGE, PAGE_HEADERS

router = APIRouter()


def _options_model() -> type[BaseModel]:
    """A request's decoding overrides: every :class:`DecodeOptions` field, each optional (unset keeps the server's
    default). Built from the dataclass so a decoding option is declared once; ``DecodeOptions.validate`` checks
    the ranges. Only the prompt gets a bound of its own here, on the size of what a client may send."""
    bounds = {"prompt": {"max_length": 200}}
    fields = {}
    for name, hint in get_type_hints(DecodeOptions).items():
        hint = Text if hint is str else hint  # a lone surrogate is the client's error, not the tokenizer's
        fields[name] = (hint | None, Field(None, **bounds.get(name, {})))
    # Not a decoding option: whether the answer carries the image's UIQM/UCIQE (they cost CPU per image).
    fields["quality"] = (bool | None, Field(None, description="add each image's UIQM and UCIQE to its result"))
    return create_model("Options", __config__=ConfigDict(extra="forbid"), **fields)


Options = _options_model()


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="the image file's bytes in base64 (a data: URL too)")


class CaptionsBody(BaseModel):
    """``POST /v1/captions`` as JSON."""

    model_config = ConfigDict(extra="forbid")
    images: list[ImagePart]
    options: Options | None = None


MAX_REFERENCE_CHARS = 500


def _reference(text: str) -> str:
    """A reference caption with its whitespace collapsed; empty or longer than the limit is a schema error (422,
    like every other field out of its rule)."""
    text = " ".join(text.split())
    if not text:
        raise ValueError("a reference must not be empty")
    if len(text) > MAX_REFERENCE_CHARS:
        raise ValueError(f"a reference is at most {MAX_REFERENCE_CHARS} characters")
    return text


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: Text = Field(min_length=1, max_length=64)
    index: int = Field(0, ge=0, le=2**31 - 1)  # an image's place in its request: bounded before SQLite sees it
    references: list[Annotated[Text, AfterValidator(_reference)]] = Field(min_length=1, max_length=20)


class HFBody(BaseModel):
    """``POST /v1/image-to-text`` as JSON, the Hugging Face Inference API's shape."""

    inputs: str = Field(description="the image file's bytes in base64")
    parameters: dict[str, Any] | None = None


# The request bodies the caption routes read themselves, for the OpenAPI schema (openapi.py).
CAPTION_BODIES = request_body(
    {
        MULTIPART: {
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "options": {"type": "string", "description": "JSON object of decoding options (Options)"},
                },
            },
            "encoding": {"options": {"contentType": "application/json, text/plain"}},
        },
        JSON: {"schema": {"$ref": "#/components/schemas/CaptionsBody"}},
    }
)
IMAGE_BODIES = request_body(
    {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        JSON: {"schema": {"$ref": "#/components/schemas/HFBody"}},
    }
)
SCHEMA_MODELS: list[type[BaseModel]] = [CaptionsBody, HFBody, FeedbackBody]
CAPTION_ERRORS = errors(400, 401, 405, 413, 415, 422, 499, 500, 503, 504)


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
        raise too_many_images(limit)
    options = dict(options or {})
    quality = bool(options.pop("quality", False))
    decode_options = svc.options(options)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        return await svc.caption(uploads, decode_options, request.state.request_id, watcher, quality=quality)
    finally:
        watcher.cancel()


async def _caption_request(request: Request) -> tuple[list[bytes], dict[str, Any] | None]:
    """The uploads and decoding options of a multipart or JSON ``/v1/captions`` request."""
    ctype = media_type(request.headers.get("content-type"))
    if ctype == MULTIPART:
        limits = request.app.state.settings
        form = await read_form(request, limits.max_images_per_request, limits.max_image_bytes)
        uploads, raw_options = await multipart_parts(form)
        options = None
        if raw_options is not None:
            options = validated(Options, parse_json(raw_options)).model_dump(exclude_none=True)
        return uploads, options
    if ctype == JSON:
        raw = parse_json(await request.body())
        if isinstance(raw, dict) and any(isinstance(i, dict) and "url" in i for i in _as_list(raw.get("images"))):
            raise ApiError(400, "urls_not_supported", "the server never fetches image URLs; send the bytes")
        body = validated(CaptionsBody, raw)
        uploads = [b64_image(part.data, i) for i, part in enumerate(body.images)]
        return uploads, body.options.model_dump(exclude_none=True) if body.options else None
    raise ApiError(415, "unsupported_media_type", f"send {MULTIPART} with 'images' parts, or {JSON}")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


@router.get("/healthz", responses=errors(405, 500))
async def healthz() -> dict[str, str]:
    """Alive (answers whether or not a model is loaded)."""
    return {"status": "ok"}


@router.get("/readyz", responses={**errors(405, 500), 503: {"description": "not ready: no model can answer yet"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready to caption: ``status`` is ``ok`` (the primary serves) or ``degraded`` (only the fallback can, or the
    circuit breaker is open); ``serving`` says which model answers. No paths: anyone may ask."""
    runtime = request.app.state.runtime
    if runtime.service is None:
        body = {"ready": False, "status": "loading", "serving": "none", "reason": "loading models"}
        return JSONResponse(body, status_code=503)
    pool = runtime.service.pool.status()
    ok = pool["ready"] and not runtime.closing
    reloader = runtime.reloader
    degraded = pool["serving"] != "primary" or pool["circuit_open"]
    body = {
        "ready": ok,
        "status": ("degraded" if degraded else "ok") if ok else ("shutting_down" if runtime.closing else "down"),
        "serving": pool["serving"],
        "primary": public_info(pool["primary"]),
        "fallback": public_info(pool["fallback"]),
        "circuit_open": pool["circuit_open"],
        # The shared generation the primary is (0: the configured primary, no reload yet), and which worker answered.
        "generation": reloader.generation if reloader is not None else 0,
        "worker": runtime.placement.worker,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request) -> Response:
    metrics = request.app.state.metrics
    # Shared metrics read every worker's files and the feedback store: off the event loop.
    text = await asyncio.to_thread(metrics.exposition) if metrics.shared_dir else metrics.exposition()
    return Response(text, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", responses=errors(401, 405, 500, 503))
async def models(request: Request) -> dict[str, Any]:
    """The loaded models (role, name, version, backend, device, dtype) with their manifest metrics."""
    listed = request.app.state.runtime.ready_service().pool.models()
    return {"models": [public_info(m) for m in listed]}


@router.post("/v1/captions", openapi_extra=CAPTION_BODIES, responses=CAPTION_ERRORS)
async def captions(request: Request) -> dict[str, Any]:
    """Caption up to ``max_images_per_request`` images, sent as multipart ``images`` files (with an optional
    ``options`` part of JSON, as a field or a file) or as JSON (:class:`CaptionsBody`)."""
    uploads, options = await _caption_request(request)
    results = await _run(request, uploads, options)
    return {"request_id": request.state.request_id, "results": results}


@router.post("/v1/image-to-text", openapi_extra=IMAGE_BODIES, responses=CAPTION_ERRORS)
async def image_to_text(request: Request) -> list[dict[str, str]]:
    """Hugging Face Inference API shape: raw image bytes in, ``[{"generated_text": ...}]`` out."""
    body = await request.body()
    if media_type(request.headers.get("content-type")) == JSON:
        raw = parse_json(body)  # the HF client sends {"inputs": base64, "parameters": {...}} with parameters
        if not isinstance(raw, dict) or not isinstance(raw.get("inputs"), str):
            raise ApiError(400, "invalid_request", 'JSON body must be {"inputs": "<base64 image>"}')
        body = b64_image(raw["inputs"], 0)
    results = await _run(request, [body], None)
    return [{"generated_text": results[0]["caption"]}]


@router.post(
    "/v1/feedback",
    openapi_extra=json_body("FeedbackBody"),
    responses=errors(400, 401, 404, 405, 413, 415, 422, 500, 503),
)
async def feedback(request: Request) -> dict[str, Any]:
    """Reference captions for a served image (``request_id`` and ``index`` from its caption answer)."""
    raw = await request.body()
    body = validated(FeedbackBody, parse_body_json(request.headers.get("content-type"), raw))
    refs = body.references  # whitespace collapsed, non-empty, at most MAX_REFERENCE_CHARS each (FeedbackBody)
    result = await request.app.state.runtime.ready_service().add_feedback(body.request_id, body.index, refs)
    return {"request_id": body.request_id, "index": body.index, "stored": len(refs), **result}
