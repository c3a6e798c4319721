"""What the OpenAPI schema says beyond FastAPI's defaults: request bodies the routes read themselves
(multipart, JSON, raw image bytes) and the JSON error responses of every route.

The caption routes parse their bodies by hand (to accept several content types and keep errors in one shape),
so FastAPI cannot infer their request bodies; they are declared here, with the pydantic models they are
validated against added to ``components/schemas``, so third-party tools can build requests from the schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_request"], description="stable, machine-readable reason")
    message: str = Field(description="what was wrong, for a person")


class ErrorBody(BaseModel):
    """Every error the server answers, whatever its status."""

    error: ErrorDetail


DESCRIPTIONS = {
    400: "bad request: undecodable image, bad base64, invalid JSON, a malformed part, two Authorization headers",
    401: "missing or wrong API key (admin routes: admin key)",
    404: "no such route, unknown request id or model name (admin routes: also when no admin key is configured)",
    405: "method not allowed (the Allow header lists those that are)",
    409: "the candidate model failed the quality gate",
    413: "too large: request bytes, image bytes or pixels, images per request",
    415: "content type or image format not accepted",
    422: "the body does not match the schema (references: 1 to 500 characters), or decoding options are out of range",
    499: "the client went away before its captions were ready",
    500: "a bug of the server's (the X-Request-ID header names the request in the log)",
    503: "overloaded, not ready yet, or shutting down (Retry-After says when to try again)",
    504: "the request deadline passed",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for these statuses, each a JSON :class:`ErrorBody`."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS[status]} for status in statuses}


def json_body(schema: str, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` declaring a JSON request body validated against the component ``schema``."""
    content = {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}
    return {"requestBody": {"required": required, "content": content}}


def request_body(content: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"requestBody": {"required": required, "content": content}}


def install_openapi(app: FastAPI, models: list[type[BaseModel]], api_key: bool, public: set[str]) -> None:
    """Make ``app.openapi()`` also carry ``models`` (and the models they use) in ``components/schemas``, and
    say which key each operation needs: the admin key under /v1/admin, the API key elsewhere when one is set
    (``api_key``), none on the ``public`` paths."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
            components = doc.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=REF)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            components["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "REEFCAP_API_KEY"},
                "adminKey": {"type": "http", "scheme": "bearer", "description": "REEFCAP_ADMIN_KEY"},
            }
            for path, operations in doc.get("paths", {}).items():
                scheme = "adminKey" if path.startswith("/v1/admin/") else "apiKey" if api_key else None
                for operation in operations.values():
                    if scheme and path not in public:
                        operation["security"] = [{scheme: []}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
