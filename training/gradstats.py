"""Per-step gradient statistics by parameter group: the cross-modal gradient instability DAMF describes shows
up as a large, noisy gradient norm on the coupling and decoder groups early in naive fine-tuning.

For each group the logger reports the step's gradient norm and the variance of that norm over the last
``window`` steps (and since the start of the stage).
"""

from __future__ import annotations

from collections import deque

import torch

from .params import parameter_groups


class GradStats:
    """Gradient norms per parameter group: BLIP's groups of ``model``, or the ``groups`` given (name -> tensors)."""

    def __init__(
        self, model: torch.nn.Module, window: int = 50, groups: dict[str, list[torch.nn.Parameter]] | None = None
    ) -> None:
        if groups is None:
            groups = {g: [p for _, p in ps] for g, ps in parameter_groups(model).items()}
        self.groups = groups
        self.window = window
        self.recent = {g: deque(maxlen=window) for g in self.groups}
        # Welford running mean/variance of the norm since the stage started.
        self.count = dict.fromkeys(self.groups, 0)
        self.mean = dict.fromkeys(self.groups, 0.0)
        self.m2 = dict.fromkeys(self.groups, 0.0)

    def reset(self) -> None:
        for g in self.groups:
            self.recent[g].clear()
            self.count[g], self.mean[g], self.m2[g] = 0, 0.0, 0.0

    @torch.no_grad()
    def update(self, scale: float = 1.0) -> dict[str, float]:
        """Record the current gradients (divided by ``scale``, the AMP loss scale); returns log fields."""
        out: dict[str, float] = {}
        for g, params in self.groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.float()) for x in grads])))
            norm /= scale
            self.recent[g].append(norm)
            self.count[g] += 1
            delta = norm - self.mean[g]
            self.mean[g] += delta / self.count[g]
            self.m2[g] += delta * (norm - self.mean[g])
            window = list(self.recent[g])
            mean_w = sum(window) / len(window)
            out[f"grad_norm/{g}"] = norm
            out[f"grad_var/{g}"] = sum((x - mean_w) ** 2 for x in window) / len(window)
            out[f"grad_var_stage/{g}"] = self.m2[g] / self.count[g]
        return out
