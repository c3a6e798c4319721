"""The one record of a captioned image: what the server answers per image, what ``reefcap caption`` writes per
line (local, on Ray, or through a server) and what the Python client returns.

Its JSON form (:meth:`CaptionResult.to_dict`) always has ``caption``, ``model`` (``{name, version, backend}``:
the engine that answered), ``fallback`` (``{used, reason}``), ``route`` (where the router sent the image:
``{domain, model, probability}``, plus ``water_type`` where the answering model estimates one; null when the
serving model has no router), ``confidence``, ``tokens``, ``water_type`` and ``quality``; where they apply,
also ``image`` (the input, offline), ``index`` (its position in a request), ``request_id`` and ``latency_ms``.
An input that cannot be captioned is a separate error record (``{"image", "error", "code"}``), never a result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from reefcap.models.engines.base import Caption, EngineInfo

# Where a result came from: set only where it applies, so they are left out of the JSON when None.
_PLACES = ("image", "index", "request_id", "latency_ms")


@dataclass(frozen=True)
class ModelRef:
    """Which engine answered: the model's own name, its weights' version, the backend it ran on."""

    name: str
    version: str
    backend: str

    @classmethod
    def of(cls, info: EngineInfo) -> ModelRef:
        return cls(info.name, info.version, info.backend)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "backend": self.backend}


@dataclass(frozen=True)
class Route:
    """Where the router sent an image: ``domain`` (``underwater`` or ``in_air``), the ``model`` that answered it,
    the router's ``probability`` that the image is underwater, and the answering model's water-type label where
    it estimates one (a water-type experts model)."""

    domain: str
    model: str
    probability: float
    water_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"domain": self.domain, "model": self.model, "probability": self.probability}
        if self.water_type is not None:
            out["water_type"] = self.water_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Route | None:
        if not isinstance(data, dict) or "domain" not in data:
            return None
        water = data.get("water_type")
        return cls(str(data["domain"]), str(data.get("model", "")), float(data.get("probability", 0.0)), water)


@dataclass(frozen=True)
class CaptionResult:
    """One captioned image (see the module docstring). ``fallback_reason`` is None when the primary answered."""

    caption: str
    model: ModelRef
    confidence: float
    tokens: int
    fallback_reason: str | None = None
    water_type: dict[str, Any] | None = None  # {"label", "probability"} from a water-type experts model
    quality: dict[str, Any] | None = None  # {"uiqm", "uciqe"} of the input, when measured
    route: Route | None = None  # where the router sent the image (None: the serving model has no router)
    image: str | None = None
    index: int | None = None
    request_id: str | None = None
    latency_ms: float | None = None

    @classmethod
    def of(cls, caption: Caption, info: EngineInfo, fallback_reason: str | None = None) -> CaptionResult:
        """The result for an engine's :class:`Caption`, answered by the engine ``info`` describes."""
        return cls(
            caption=caption.caption,
            model=ModelRef.of(info),
            confidence=caption.confidence,
            tokens=caption.tokens,
            fallback_reason=fallback_reason,
            water_type=caption.water_type,
        )

    @property
    def fallback(self) -> dict[str, Any]:
        """``{"used", "reason"}``: whether the fallback answered this image, and why."""
        return {"used": self.fallback_reason is not None, "reason": self.fallback_reason}

    def replace(self, **fields: Any) -> CaptionResult:
        return dataclasses.replace(self, **fields)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, the same from every entrypoint."""
        out: dict[str, Any] = {k: getattr(self, k) for k in ("image", "index") if getattr(self, k) is not None}
        out.update(
            caption=self.caption,
            model=self.model.to_dict(),
            fallback=self.fallback,
            route=self.route.to_dict() if self.route is not None else None,
            confidence=self.confidence,
            tokens=self.tokens,
            water_type=self.water_type,
            quality=self.quality,
        )
        out.update({k: getattr(self, k) for k in ("request_id", "latency_ms") if getattr(self, k) is not None})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **fields: Any) -> CaptionResult:
        """Read the JSON form back (a server's item, a results line); ``fields`` fill or replace values."""
        model, fallback = data.get("model") or {}, data.get("fallback") or {}
        values: dict[str, Any] = dict(
            caption=data["caption"],
            model=ModelRef(str(model.get("name", "")), str(model.get("version", "")), str(model.get("backend", ""))),
            confidence=float(data["confidence"]),
            tokens=int(data.get("tokens", 0)),
            fallback_reason=fallback.get("reason") if fallback.get("used") else None,
            water_type=data.get("water_type"),
            quality=data.get("quality"),
            route=Route.from_dict(data.get("route")),
        )
        values.update({k: data[k] for k in _PLACES if data.get(k) is not None})
        values.update(fields)
        return cls(**values)
