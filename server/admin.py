"""The admin surface: ``/v1/admin/*`` routes, off unless an admin key is configured, and how reload names resolve.

A reload names a model; it never passes a path or a hub id. The name is checked against a strict pattern and
then looked up only among the entries of the configured ``models_dir``, the bundled zoo and the configured
primary. Every name that does not resolve gets the same answer, whatever exists on disk under that name, so
the route cannot be used to probe the filesystem, and nothing is exported or loaded before the name resolves.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from reefcap.models.errors import ModelLoadError, ModelNotFoundError
from reefcap.models.registry import zoo_models

from .bodies import parse_body_json, validated
from .gateway import ApiError
from .openapi import errors, json_body

log = logging.getLogger("reefcap.server")
# One path component of plain ASCII: no separators, no leading dot (so no "..", no hidden entries), no NUL.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", re.ASCII)
UNKNOWN_MODEL = "no model of that name is available for reload (names: entries of the models directory, bundled models)"

admin_router = APIRouter()


class ReloadBody(BaseModel):
    """``model``: the name of the model to load; omitted, the current primary is re-read from disk."""

    model_config = ConfigDict(extra="forbid")
    # No length bound here: a name too long for MODEL_NAME is unknown like any other (404), not a schema error.
    model: str | None = Field(
        None,
        examples=["reef-v3"],
        description="letters, digits, '.', '_', '-', at most 100, not starting with '.'; other names are unknown",
    )


def _primary_name(configured: str) -> str | None:
    """The name under which the configured primary may be reloaded: its zoo name or its folder's name."""
    if configured in zoo_models():
        return configured
    path = Path(configured).expanduser()
    return path.name if path.is_dir() else None


def reload_target(name: str, models_dir: Path | None, primary: str) -> str:
    """What ``load_model`` gets for the reload name ``name``; :class:`ApiError` 404 ``unknown_model`` if none.

    Order: an entry of ``models_dir`` holding a ``config.json``, a bundled model, the configured primary's name.
    """
    unknown = ApiError(404, "unknown_model", UNKNOWN_MODEL)
    if not MODEL_NAME.fullmatch(name):
        raise unknown
    if models_dir is not None:
        candidate = models_dir.expanduser() / name
        try:
            if (candidate / "config.json").is_file():
                real = _inside(candidate, models_dir.expanduser())
                if real is None:
                    log.warning("reload of %r refused: it links out of the models directory", name)
                    raise unknown
                return str(real)
        except OSError:  # a name too long for the filesystem, a permission error: unknown like any other
            pass
    if name in zoo_models():
        return name
    if name == _primary_name(primary):
        return primary
    raise unknown


def _inside(candidate: Path, root: Path) -> Path | None:
    """``candidate``'s real path if it and every file and folder in it resolve inside ``root``, else None.

    Links inside ``models_dir`` are followed (``v4 -> releases/v4``); one that leads out of it, for the folder or
    any file in it, would load a model from wherever the link points, so the name is unknown. The real path is
    what loads: a link changed after this check is not followed again."""
    top = root.resolve()
    real = candidate.resolve()
    if not real.is_relative_to(top):
        return None
    for folder, dirs, files in os.walk(real):  # followlinks=False: a linked subfolder is checked as an entry
        if any(not (Path(folder) / entry).resolve().is_relative_to(top) for entry in (*dirs, *files)):
            return None
    return real


def public_info(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """A model's ``describe()`` without where it lives on disk (what /readyz, /v1/models and reload show)."""
    return None if info is None else {k: v for k, v in info.items() if k != "source"}


@admin_router.post(
    "/v1/admin/reload",
    summary="Load a new primary model by name and swap it in if it passes the quality gate",
    openapi_extra=json_body("ReloadBody", required=False),
    responses=errors(400, 401, 404, 409, 413, 415, 422, 500, 503),
)
async def reload(request: Request) -> dict[str, Any]:
    """Answers 404 ``unknown_model`` for a name that does not resolve, 409 ``quality_gate`` when the candidate's
    manifest metrics are worse, 422 ``model_load_failed`` when it resolves but cannot be loaded."""
    runtime = request.app.state.runtime
    runtime.ready_service()
    raw = await request.body()
    # No body at all (`curl -X POST`) re-reads the primary; any body must be JSON, so 5 MB of spaces is a 400.
    body = validated(ReloadBody, parse_body_json(request.headers.get("content-type"), raw)) if raw else ReloadBody()
    settings = request.app.state.settings
    target = None if body.model is None else reload_target(body.model, settings.models_dir, settings.model)
    try:
        result = await runtime.reloader.reload(target)
    except (ModelLoadError, ModelNotFoundError) as exc:  # the candidate is broken; the server is fine
        # The loader's message names paths: it goes to the log, the client gets the name it sent.
        log.warning("reload of %s failed: %s", body.model or "the primary", exc)
        what = repr(body.model) if body.model else "the current primary"
        raise ApiError(422, "model_load_failed", f"model {what} could not be loaded (see the server log)") from None
    return {**result, "primary": public_info(result.get("primary")), "previous": public_info(result.get("previous"))}
