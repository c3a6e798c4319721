"""One training run from typed configs: what `reefcap train` and `reefcap compare` both call.

The command line is turned into a :class:`~reefcap.training.config.Recipe`, a
:class:`~reefcap.training.config.TrainConfig` and :class:`RunInputs` once, by the CLI; this module never
sees argparse. On ``resume`` the run's saved ``reefcap_train.json`` (beside ``OUT/checkpoint``) is compared
with what is asked now: a difference that changes the results stops the run with a one-line error naming
the fields, unless ``override`` is set, in which case the new values apply and the run says so.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from reefcap.models.errors import ReefcapError

from .config import TRAIN_CONFIG_FILE, Recipe, TrainConfig, recipe_from_dict, train_config_from_dict

OVERRIDE_FLAG = "--resume-override"
# Settings that only say when to stop, checkpoint or what to log: a resume may change them silently.
# Everything else in the recipe, the run config and the inputs changes the weights or the selected model.
_NO_EFFECT = frozenset({"train.max_steps", "train.checkpoint_every", "train.grad_window", "recipe.description"})
_MAX_NAMED = 6  # keep the refusal one readable line


@dataclass(frozen=True)
class RunInputs:
    """What a run trains from: the start checkpoint and the caption files (paths or names as given)."""

    model: str
    data: str
    val: str | None = None
    preserve_data: str | None = None  # in-air captions; read only by recipes with preservation

    def identity(self) -> dict[str, str | None]:
        """Absolute paths where they are local files, so a resume from another folder compares equal."""

        def norm(value: str | None) -> str | None:
            return str(Path(value).resolve()) if value and Path(value).exists() else value

        return {k: norm(v) for k, v in asdict(self).items()}


def scaled_recipe(recipe: Recipe, epochs_scale: float = 1.0, lr_scale: float = 1.0) -> Recipe:
    """``recipe`` with every stage's epochs and lr multiplied (``--epochs-scale``, ``--lr-scale``)."""
    if epochs_scale != 1.0:
        recipe = recipe.scaled(epochs_scale)
    if lr_scale != 1.0:
        recipe = recipe.lr_scaled(lr_scale)
    return recipe


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        named = ((f"{prefix}.{key}" if prefix else key, item) for key, item in value.items())
        return {k: v for name, item in named for k, v in _flatten(item, name).items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _no_effect(key: str) -> bool:
    # Stage and recipe names are labels; a renamed copy of the same recipe trains the same weights.
    return key in _NO_EFFECT or key == "recipe.name" or (key.startswith("recipe.stages[") and key.endswith(".name"))


def setup_differences(saved: dict[str, Any], recipe: Recipe, config: TrainConfig, inputs: RunInputs) -> dict:
    """Fields that differ between a saved ``reefcap_train.json`` and the setup asked now and that change results.

    Returns ``{field: (saved, now)}``; a field missing on one side (a stage added or removed) shows as None.
    Runs saved before the inputs were recorded are compared on recipe and run config only.
    """
    try:
        before = {
            "recipe": asdict(recipe_from_dict(saved["recipe"])),
            "train": asdict(train_config_from_dict(saved["train"])),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ReefcapError(f"cannot read the saved run setup ({TRAIN_CONFIG_FILE}): {exc!r}") from None
    now = {"recipe": asdict(recipe), "train": asdict(config)}
    if saved.get("inputs"):
        before["inputs"], now["inputs"] = saved["inputs"], inputs.identity()
    old, new = _flatten(before, ""), _flatten(now, "")
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k) and not _no_effect(k)}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    named = [f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(changes.items())[:_MAX_NAMED]]
    more = len(changes) - len(named)
    return ", ".join(named) + (f" and {more} more" if more > 0 else "")


def _saved_setup(out: Path) -> dict[str, Any] | None:
    """The setup a resumable run was started with, or None when there is nothing to resume."""
    ckpt = out / "checkpoint"
    # The same condition as the trainer's: without state.json a resume starts afresh.
    if not (ckpt / "state.json").is_file() or not (ckpt / TRAIN_CONFIG_FILE).is_file():
        return None
    return json.loads((ckpt / TRAIN_CONFIG_FILE).read_text())


def check_resume(out: Path, recipe: Recipe, config: TrainConfig, inputs: RunInputs, override: bool) -> dict:
    """Compare a resume with the run's saved setup; refuse result-changing differences unless ``override``.

    Returns the differences that ``override`` lets through (empty when there are none or nothing to resume).
    """
    saved = _saved_setup(out)
    changes = setup_differences(saved, recipe, config, inputs) if saved is not None else {}
    if changes and not override:
        raise ReefcapError(
            f"--resume: {out} was started with a different setup: {_describe(changes)}; "
            f"rerun with the original options, or pass {OVERRIDE_FLAG} to continue with the new values"
        )
    return changes


def _note_override(out: Path, changes: dict[str, tuple[Any, Any]], step: int) -> None:
    print(f"reefcap: {OVERRIDE_FLAG}: continuing {out} with {_describe(changes)}", file=sys.stderr)
    entry = {"type": "resume_override", "step": step, "changed": {k: list(v) for k, v in changes.items()}}
    with (out / "log.jsonl").open("a") as log:
        log.write(json.dumps(entry) + "\n")


def run_training(
    recipe: Recipe,
    config: TrainConfig,
    inputs: RunInputs,
    out: str | Path,
    *,
    resume: bool = False,
    override: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``recipe`` from ``inputs.model`` into ``out``; returns the trainer's summary.

    With ``resume``, continues ``out/checkpoint`` exactly when the setup is unchanged (see
    :func:`check_resume`); with ``override`` as well, the new setup applies from the saved step on.
    """
    from .data import load_records
    from .trainer import Trainer

    out = Path(out)
    # In-air captions are read by preserving recipes (distillation) and GuiDG (the in-air expert's data) only:
    # for the others they are not part of the setup a resume compares.
    if recipe.preserve is None and recipe.experts is None:
        inputs = replace(inputs, preserve_data=None)
    changes = check_resume(out, recipe, config, inputs, override) if resume else {}
    train = load_records(inputs.data)
    val = load_records(inputs.val) if inputs.val else None
    air = load_records(inputs.preserve_data) if inputs.preserve_data else None
    trainer = Trainer(inputs.model, recipe, config, out, train, val, air, progress=progress, inputs=inputs.identity())
    if changes and trainer.acc.is_main_process:
        _note_override(out, changes, int(_saved_setup(out)["state"]["global_step"]))
    summary = trainer.run(resume=resume)
    if changes:
        summary["overridden"] = sorted(changes)
    return summary
