"""Opening a policy for an entrypoint: the default models, loading primary and fallback, ``--fallback none``.

The server and the offline commands load the same defaults (:data:`DEFAULT_PRIMARY`, :data:`DEFAULT_FALLBACK`) so
that an offline survey and the service answer alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from reefcap.models.engines.base import CaptionEngine, EngineConfig
from reefcap.models.engines.loader import load_engine
from reefcap.models.errors import ModelLoadError, ModelNotFoundError
from reefcap.models.policy.captioning import CaptionPolicy
from reefcap.models.registry import check_model_name

log = logging.getLogger("reefcap.policy")

# The server's defaults too (server/settings.py reads these), so offline and served answers agree.
DEFAULT_PRIMARY = "reefscenes-tiny-underwater"
DEFAULT_FALLBACK = "reefscenes-tiny"
# The server's default decoding (greedy: the fastest, and the same caption whatever batch an image lands in);
# `reefcap eval` without --model decodes so too, to measure what `reefcap serve` answers by default.
DEFAULT_NUM_BEAMS = 1
DEFAULT_MAX_LENGTH = 20


@dataclass
class LoadedModels:
    """What :func:`load_models` could load, and the exception where it could not."""

    primary: CaptionEngine | None = None
    fallback: CaptionEngine | None = None
    primary_exc: Exception | None = None
    fallback_exc: Exception | None = None

    @property
    def primary_error(self) -> str | None:
        """Why the primary is not loaded (``"Type: message"``), for ``/readyz`` and messages."""
        return _why(self.primary_exc)

    @property
    def fallback_error(self) -> str | None:
        return _why(self.fallback_exc)


def _why(exc: Exception | None) -> str | None:
    return f"{type(exc).__name__}: {exc}" if exc is not None else None


def load_models(model: str, fallback: str | None, config: EngineConfig | None = None, load=None) -> LoadedModels:
    """Load the primary and (unless ``fallback`` is None) the fallback with the one loader (``load``: another
    loader, for tests); a failure is recorded, not raised, so the caller decides whether one model is enough
    (the server: yes, with the fallback)."""
    load = load or (lambda name: load_engine(name, config))
    loaded = LoadedModels()
    try:
        loaded.primary = load(model)
    except Exception as exc:  # missing or corrupt: the fallback may still answer
        loaded.primary_exc = exc
    if fallback:
        try:
            loaded.fallback = load(fallback)
        except Exception as exc:
            loaded.fallback_exc = exc
    return loaded


def fallback_name(value: str | None) -> str | None:
    """A ``--fallback`` value: ``none`` (any case) or empty means no fallback."""
    return None if value is None or value.strip().lower() in ("", "none") else value


def open_policy(
    model: str, fallback: str | None, config: EngineConfig | None = None, load=None, **policy_options: Any
) -> CaptionPolicy:
    """The policy an offline entrypoint (``reefcap caption``, ``reefcap eval``, the Ray runner) captions with:
    both models loaded by :func:`~reefcap.models.engines.loader.load_engine` with ``config``, as the server
    loads them.

    Like the server, a primary that exists but cannot load (corrupt weights, say) leaves the fallback
    answering every image (a warning says so). Unlike the server, which keeps serving, a run stops at once
    (exit status 2) when the primary names nothing (:class:`ModelNotFoundError`: a typo, never a silent
    fallback), when no model can answer, or when the fallback it was asked for cannot load: a typo in
    ``--fallback`` should not surface only when the primary first fails, hours into a survey.
    """
    check_model_name(model)  # a typo ends here, before either model (and torch) loads
    if fallback:
        try:
            check_model_name(fallback)
        except ModelNotFoundError as exc:
            raise ModelLoadError(
                f"fallback model {fallback!r} could not be loaded ({exc}); pass --fallback none to run without one"
            ) from None
    loaded = load_models(model, fallback, config, load)
    if isinstance(loaded.primary_exc, ModelNotFoundError):
        # A name or path that names nothing is a typo to fix, not a model that failed: never a silent fallback.
        if loaded.fallback is not None:
            loaded.fallback.close()
        raise loaded.primary_exc
    if loaded.primary is None and loaded.fallback is None:
        why = f"; fallback {fallback!r}: {loaded.fallback_error}" if fallback else " and no fallback is set"
        raise ModelLoadError(f"model {model!r} could not be loaded ({loaded.primary_error}){why}")
    if loaded.fallback_error:
        if loaded.primary is not None:
            loaded.primary.close()
        raise ModelLoadError(
            f"fallback model {fallback!r} could not be loaded ({loaded.fallback_error}); "
            "pass --fallback none to run without one"
        )
    if loaded.primary is None:
        log.warning(
            "model %s not loaded (%s): the fallback %s answers every image", model, loaded.primary_error, fallback
        )
    return CaptionPolicy(loaded.primary, loaded.fallback, **policy_options)
