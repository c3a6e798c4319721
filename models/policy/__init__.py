"""Policy: what answers a batch, and whether a model may serve.

- :mod:`.captioning`: the captioning policy (primary, fallback, circuit breaker, degenerate-caption
  replacement), the one object every entrypoint captions through;
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
    Served,
    as_policy,
)
from reefcap.models.policy.loading import (
    DEFAULT_FALLBACK,
    DEFAULT_PRIMARY,
    LoadedModels,
    fallback_name,
    load_models,
    open_policy,
)

__all__ = [
    "DEFAULT_BREAKER_FAILURES",
    "DEFAULT_BREAKER_RESET_S",
    "DEFAULT_FALLBACK",
    "DEFAULT_PRIMARY",
    "CaptionPolicy",
    "CircuitBreaker",
    "LoadedModels",
    "PolicyObserver",
    "Served",
    "as_policy",
    "fallback_name",
    "load_models",
    "open_policy",
]
