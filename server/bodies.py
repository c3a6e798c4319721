"""Reading request bodies: content types, JSON, pydantic validation, multipart parts, base64 images.

Every refusal is an :class:`~reefcap.server.gateway.ApiError`, so it leaves as a JSON 4xx naming what was wrong.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .gateway import ApiError, parse_json

JSON = "application/json"
MULTIPART = "multipart/form-data"
MAX_OPTIONS_PART = 64 * 1024  # an options part is a small JSON object; a file part is read only up to this


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header: parameters dropped, lower-cased (RFC 9110 8.3.1).

    So ``APPLICATION/JSON; charset=utf-8`` is ``application/json``, and ``application/jsonx`` stays itself.
    """
    return (content_type or "").split(";", 1)[0].strip(" \t").lower()


def parse_body_json(content_type: str | None, raw: bytes) -> Any:
    """``raw`` parsed as JSON, refusing (415) a body sent with another content type."""
    if media_type(content_type) != JSON:
        raise ApiError(415, "unsupported_media_type", f"send the body as {JSON}")
    return parse_json(raw)


def _no_lone_surrogates(text: str) -> str:
    # JSON's \ud800 escapes decode to unpaired surrogates, which no encoder (SQLite, the tokenizer) accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
"""A string field that must be encodable as UTF-8 (422 ``invalid_request`` otherwise)."""


def validated(model: type[BaseModel], raw: Any) -> Any:
    """``raw`` validated as ``model``; a 422 ``invalid_request`` naming the first problems otherwise."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        raise ApiError(422, "invalid_request", "; ".join(parts)) from None


def b64_image(data: str, index: int) -> bytes:
    """The bytes of a base64 image (a browser's ``data:`` URL too)."""
    if data.startswith("data:"):  # a data URL from a browser: keep what follows the comma
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"image {index}: data is not valid base64") from None


def too_many_images(limit: int) -> ApiError:
    """The one answer to a request with more than ``limit`` images, whatever its content type."""
    return ApiError(413, "too_many_images", f"at most {limit} images per request")


async def read_form(request: Any, max_images: int, max_field_bytes: int) -> Any:
    """The multipart form of ``request``, its refusals in the server's words.

    Starlette stops counting at ``max_files`` (the images and an ``options`` file) and says so in its own words,
    with a 400: past that, the same 413 as a JSON body with too many images; a text field over
    ``max_field_bytes`` is a 413 too, as every size limit is."""
    try:
        return await request.form(max_files=max_images + 1, max_part_size=max_field_bytes)
    except StarletteHTTPException as exc:
        detail = str(exc.detail)
        if detail.startswith("Too many files"):
            raise too_many_images(max_images) from None
        if detail.startswith(("Part exceeded", "Field exceeded")):
            raise ApiError(413, "request_too_large", f"a form field exceeds {max_field_bytes} bytes") from None
        raise ApiError(400, "invalid_multipart", detail) from None


async def multipart_parts(form: Any) -> tuple[list[bytes], bytes | None]:
    """The ``images`` files and the raw ``options`` JSON of a multipart form.

    ``options`` may be a text field or a file (``curl -F options=@opts.json``); any other part, an ``images``
    part that is not a file, or a second ``options`` part is refused rather than silently ignored.
    """
    uploads: list[bytes] = []
    options: bytes | None = None
    for name, value in form.multi_items():
        if name == "images":
            if not isinstance(value, UploadFile):
                raise ApiError(400, "invalid_part", "each 'images' part must be a file (with a filename)")
            uploads.append(await value.read())
        elif name == "options":
            if options is not None:
                raise ApiError(400, "invalid_part", "send at most one 'options' part")
            options = await _options_bytes(value)
        else:
            raise ApiError(400, "unknown_part", "unexpected form part; send 'images' files and one 'options' part")
    return uploads, options


async def _options_bytes(value: Any) -> bytes:
    if not isinstance(value, UploadFile):
        return value.encode("utf-8", "surrogatepass")
    data = await value.read(MAX_OPTIONS_PART + 1)
    if len(data) > MAX_OPTIONS_PART:
        raise ApiError(413, "request_too_large", f"the 'options' part exceeds {MAX_OPTIONS_PART} bytes")
    return data
