"""Policy: what answers a batch, and whether a model may serve.

- :mod:`.captioning`: the captioning policy (primary, fallback, circuit breaker, degenerate-caption
  replacement), the one object every entrypoint captions through, with its lanes and breaker (:mod:`.lanes`);
- :mod:`.routing`: the per-image router (underwater or in air) saved beside an adapted model, and the split
  of a batch by route;
- :mod:`.results`: :class:`CaptionResult`, the one record of a captioned image every entrypoint answers with;
- :mod:`.loading`: the default models and opening a policy for an entrypoint;
- :mod:`.gate`: the quality gate a candidate passes before it replaces the serving model;
- :mod:`.rolling`: rolling BLEU-4/CIDEr over served images' references;
- :mod:`.agreement`: measuring how often int8 gives fp32's greedy caption (``reefcap agreement``).
"""

from reefcap.models.policy.captioning import (
    DEFAULT_BREAKER_FAILURES,
    DEFAULT_BREAKER_RESET_S,
    CaptionPolicy,
    CircuitBreaker,
    PolicyObserver,
    as_policy,
)
from reefcap.models.policy.loading import (
    DEFAULT_FALLBACK,
    DEFAULT_MAX_LENGTH,
    DEFAULT_NUM_BEAMS,
    DEFAULT_PRIMARY,
    LoadedModels,
    fallback_name,
    load_models,
    open_policy,
)
from reefcap.models.policy.results import CaptionResult, ModelRef

__all__ = [
    "DEFAULT_BREAKER_FAILURES",
    "DEFAULT_BREAKER_RESET_S",
    "DEFAULT_FALLBACK",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_NUM_BEAMS",
    "DEFAULT_PRIMARY",
    "CaptionPolicy",
    "CaptionResult",
    "CircuitBreaker",
    "LoadedModels",
    "ModelRef",
    "PolicyObserver",
    "as_policy",
    "fallback_name",
    "load_models",
    "open_policy",
]
