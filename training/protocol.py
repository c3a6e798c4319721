"""What a recipe trains, as a plug-in of the one training loop (:class:`~reefcap.training.trainer.Trainer`).

The trainer owns everything a run does the same way whatever it trains: Accelerate (devices, processes,
mixed precision), gradient accumulation and clipping, the optimizer and lr schedule per stage, when to
validate and checkpoint, patience, and the exact resume. A :class:`Protocol` owns the rest:

- ``build``: the model state (a BLIP, plus whatever else the protocol trains), fresh or from the checkpoint;
- ``stage_batches``: the training batches of each stage;
- ``begin_stage``: which parameters stage ``i`` trains (freezing, AdamW groups) and the module to wrap;
- ``train_mode``: train/eval mode of each part during stage ``i``;
- ``loss``: one micro-batch's loss, and the numbers to log (summed over micro-batches, see ``log_fields``);
- ``validate``: the metrics, the model-selection score and the value patience watches;
- ``end_stage`` / ``finish``: hooks at a stage's end and the run's end (e.g. GuiDG's per-expert selection);
- ``write_beside`` / ``save_state`` / ``load_state``: files beside the BLIP weights in every checkpoint
  folder, and what only an exact resume needs.

:class:`~reefcap.training.caption.CaptionProtocol` is BLIP's captioning loss with optional knowledge
preservation, :class:`~reefcap.training.experts.ExpertsProtocol` GuiDG's water-type experts;
:mod:`reefcap.training.protocols` picks one per recipe. Each protocol lists the
:class:`~reefcap.training.config.TrainConfig` fields it honours (``honours``); a run that sets any other field
away from its default is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from reefcap.models.registry import ResolvedModel

from .augment import TrainTransform
from .config import Recipe, TrainConfig
from .params import parameter_groups

ALL_FIELDS = frozenset(f.name for f in fields(TrainConfig))


@dataclass(frozen=True)
class Validation:
    """One validation's outcome.

    ``score`` selects ``OUT/best`` (higher is better; None: the protocol keeps best = last); ``watched`` is what
    patience watches (higher is better); ``metrics`` go into the ``eval`` log entry.
    """

    metrics: dict[str, Any]
    score: float | None
    watched: float


class Protocol:
    """The part of a run that depends on what is trained; see the module docstring for the lifecycle.

    Subclasses set ``model`` (the BLIP written as the checkpoint) and ``processor`` in :meth:`build`, and are
    constructed as ``cls(recipe, config, train, val, air)`` (:func:`~reefcap.training.protocols.protocol_for`):
    the constructor checks the recipe and data, so that a bad run fails before any model is loaded.
    """

    kind: ClassVar[str] = "protocol"
    honours: ClassVar[frozenset[str]] = ALL_FIELDS  # the TrainConfig fields this protocol acts on
    # Whether a --max-steps stop between scheduled validations validates too (an interim OUT/best for the
    # stopped run). A protocol whose validation changes the weights says no: an extra validation would make
    # the resumed run differ from an uninterrupted one.
    validate_at_stop: ClassVar[bool] = True

    def __init__(self, recipe: Recipe, config: TrainConfig) -> None:
        self.recipe, self.config = recipe, config
        self.model: Any = None
        self.processor: Any = None
        self.acc: Any = None

    @property
    def validates(self) -> bool:
        """Whether there is validation data (no data: no validation, no patience, best = last)."""
        return False

    def build(self, start: ResolvedModel, acc: Any, checkpoint: Path | None = None) -> None:
        """Load the model state: from the run's ``start`` model, or from ``checkpoint`` on a resume."""
        raise NotImplementedError

    def stage_batches(self, si: int, transform: TrainTransform, rank: int, world: int):
        """Stage ``si``'s batches: ``len()`` per epoch and ``batch(epoch, k)`` (a pure function of its args)."""
        raise NotImplementedError

    def begin_stage(self, si: int) -> tuple[torch.nn.Module, list[dict], dict[str, Any]]:
        """Freeze all but stage ``si``'s parameters; returns the module to wrap (``loss`` calls it), the AdamW
        parameter groups and fields for the ``stage`` log entry."""
        raise NotImplementedError

    def train_mode(self, si: int) -> None:
        """Set train/eval mode for stage ``si`` (at its start and after every validation)."""
        self.model.train()

    def extend_batch(self, batch: dict[str, torch.Tensor], draw: int) -> dict[str, torch.Tensor]:
        """Add inputs that do not come from the caption batches; ``draw`` counts micro-batches over the run."""
        return batch

    def loss(self, wrapped, batch: dict[str, torch.Tensor], last: bool, accum: int) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss (the trainer divides it by ``accum``), and log parts, summed by the trainer."""
        raise NotImplementedError

    def log_fields(self, parts: dict[str, float]) -> dict[str, Any]:
        """The ``train`` log entry's fields from one optimizer step's summed ``parts``; ``loss`` is required."""
        return dict(parts)

    def validate(self, si: int) -> Validation:
        """Score the current model on the validation data, during stage ``si`` (main process only)."""
        raise NotImplementedError

    def stale_reason(self, best: float, stale: int) -> str:
        """Why patience stopped the run, for the ``early_stop`` log entry."""
        return f"validation not above {best:.4f} for {stale} validations"

    def end_stage(self, si: int) -> None:
        """After stage ``si`` has run all its steps (or patience stopped it), before the next stage begins.

        Runs after the stage's last checkpoint was written, so a resume from that checkpoint runs it again: it
        must depend only on what the checkpoint holds.
        """

    def finish(self) -> dict[str, Any]:
        """Results of the finished run (main process only), for the summary and the ``end`` log entry."""
        return {}

    def write_beside(self, dest: Path) -> None:
        """Write what the protocol trains beyond the BLIP weights into a checkpoint folder being written."""

    def config_extra(self) -> dict[str, Any]:
        """Extra entries for ``reefcap_train.json``."""
        return {}

    def save_state(self, folder: Path) -> None:
        """Write protocol state only a resume needs (not the model's) into ``OUT/checkpoint``."""

    def load_state(self, folder: Path) -> None:
        """Read back what :meth:`save_state` wrote."""

    def grad_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters by the group name the gradient statistics are logged under."""
        return {g: [p for _, p in ps] for g, ps in parameter_groups(self.model).items()}
