"""Typed configuration for training: recipes (what to train, loaded from YAML) and runs (how to train).

A recipe is data: a list of stages, each naming its trainable parameter groups, learning rate, epochs,
schedule, warmup and weight decay, plus optional knowledge preservation. Recipe files hold only what differs
from the file they extend (``base: NAME``), so every protocol reads as a short diff of the official recipe.
A child's ``stages`` list is the recipe's stage list; its stage ``i`` overrides the parent's stage ``i`` key
by key (an empty ``{}`` keeps it as is).
Both configs are written next to every checkpoint (``reefcap_train.json``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from reefcap.models.errors import ReefcapError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
GROUPS = ("vision", "coupling", "decoder", "lm_head")
# Groups only GuiDG's recipe trains (its `experts:` section): the experts' context vectors, the fusion module.
EXPERT_GROUPS = ("prompts", "fusion")
SCHEDULES = ("cosine", "linear", "constant")
TRAIN_CONFIG_FILE = "reefcap_train.json"


@dataclass(frozen=True)
class StageConfig:
    """One stage of a recipe. ``epochs`` may be fractional; ``warmup`` is a fraction of the stage's steps."""

    name: str = "finetune"
    groups: tuple[str, ...] = GROUPS
    lr: float = 1e-5
    epochs: float = 5.0
    schedule: str = "cosine"
    warmup: float = 0.0
    weight_decay: float = 0.05

    def validate(self) -> StageConfig:
        bad = [g for g in self.groups if g not in GROUPS + EXPERT_GROUPS]
        if bad or not self.groups:
            raise ReefcapError(f"stage {self.name!r}: groups must be a non-empty subset of {GROUPS}, got {bad}")
        if self.schedule not in SCHEDULES:
            raise ReefcapError(f"stage {self.name!r}: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (self.lr > 0 and self.epochs > 0 and 0 <= self.warmup < 1 and self.weight_decay >= 0):
            raise ReefcapError(f"stage {self.name!r}: need lr > 0, epochs > 0, 0 <= warmup < 1, weight_decay >= 0")
        return self


@dataclass(frozen=True)
class PreserveConfig:
    """Knowledge preservation while adapting (the Infusing paper's two terms).

    ``air_fraction`` in-air images per underwater image are added to every batch; the student's image
    features on them are pulled to the frozen start model's (MSE, weight ``distill_weight``), and all
    weights are pulled to their start values (L2, weight ``l2_weight``).
    """

    air_fraction: float = 0.25
    distill_weight: float = 1.0
    l2_weight: float = 0.01


@dataclass(frozen=True)
class ExpertsRecipe:
    """GuiDG's water-type experts (``experts:`` in a recipe; see ``training/experts.py``).

    ``domains`` maps each expert's label to the Jerlov water types it is trained on (``in_air: []`` for the
    in-air images of ``--preserve-data``); ``context`` is each expert's number of learned context vectors;
    ``holdout`` the fraction of each domain's scenes kept out of stage 1 for stage 2; ``route_weight`` an
    optional cross-entropy pull of the fusion weights towards the true domain (0 = GuiDG's loss alone);
    ``select_on_val`` keeps each expert's best state of stage 1 by its domain's validation loss.
    """

    domains: dict[str, list[str]] = field(default_factory=dict)
    context: int = 4
    heads: int = 4
    holdout: float = 0.3
    fusion_lr: float = 1e-3  # the fusion starts from scratch; the stage's own lr is for the pretrained vision encoder
    route_weight: float = 0.0
    select_on_val: bool = False  # keep each expert's best stage-1 state by its domain's --val loss (GuiDG's selection)


@dataclass(frozen=True)
class Recipe:
    """A training protocol: stages run in order; optional knowledge preservation across all of them."""

    name: str
    stages: tuple[StageConfig, ...]
    label_smoothing: float = 0.1
    preserve: PreserveConfig | None = None
    description: str = ""
    experts: ExpertsRecipe | None = None

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every stage's epochs multiplied by ``factor`` (short runs, comparisons)."""
        return replace(self, stages=tuple(replace(s, epochs=s.epochs * factor) for s in self.stages))

    def lr_scaled(self, factor: float) -> Recipe:
        """The same recipe with every stage's lr multiplied by ``factor`` (models far from BLIP-base's size)."""
        return replace(self, stages=tuple(replace(s, lr=s.lr * factor) for s in self.stages))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AugmentConfig:
    """BLIP's official training augmentations, plus the underwater renderer as an optional extra."""

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    randaug_n: int = 2
    randaug_m: int = 5
    underwater_p: float = 0.0  # probability of re-rendering an in-air image as underwater


@dataclass(frozen=True)
class TrainConfig:
    """How a run executes; independent of the protocol."""

    batch_size: int = 16
    grad_accum: int = 1
    clip_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    device: str = "auto"  # auto (CUDA when available) | cpu
    seed: int = 0
    max_words: int = 30
    max_text_len: int = 40
    eval_every_epochs: float = 1.0
    eval_batch_size: int = 32
    eval_beams: int = 3
    eval_max_images: int | None = None
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke tests)
    patience: int | None = None  # stop after this many validations in a row without a better validation CIDEr
    checkpoint_every: int = 0  # optimizer steps between resume checkpoints; 0 = at every evaluation
    grad_window: int = 50  # steps over which gradient-norm variance is reported
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> TrainConfig:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ReefcapError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ReefcapError("batch_size and grad_accum must be >= 1")
        if self.patience is not None and self.patience < 1:
            raise ReefcapError(f"patience must be >= 1 validation, got {self.patience}")
        return self


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key == "stages":
            # Stage i of the child overrides stage i of the parent; extra stages start from the parent's first.
            parents = base.get("stages") or [{}]
            out["stages"] = [_merge(parents[i] if i < len(parents) else parents[0], s) for i, s in enumerate(value)]
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out


def _read_recipe_dict(name_or_file: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    import yaml

    path = Path(name_or_file)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_file}.yaml"
    if not path.is_file():
        known = ", ".join(recipe_names())
        raise ReefcapError(f"recipe {name_or_file!r}: no such file or bundled recipe (bundled: {known})")
    if str(path) in seen:
        raise ReefcapError(f"recipe {path}: circular 'base' chain")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ReefcapError(f"recipe {path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ReefcapError(f"recipe {path}: expected a mapping at the top level")
    parent = data.pop("base", None)
    data.setdefault("name", path.stem)
    if parent:
        base_path = parent if Path(parent).suffix else parent
        if Path(parent).suffix and not Path(parent).is_absolute():
            base_path = str(path.parent / parent)
        data = _merge(_read_recipe_dict(base_path, (*seen, str(path))), data)
    return data


def recipe_names() -> list[str]:
    """Bundled recipe names (files in ``training/recipes``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ReefcapError(f"{where}: unknown keys {unknown} (allowed: {sorted(known)})")
    return cls(**data)


def load_recipe(name_or_file: str) -> Recipe:
    """Load a bundled recipe by name or a YAML file by path, following ``base:`` chains."""
    data = _read_recipe_dict(name_or_file)
    stages = []
    for i, s in enumerate(data.pop("stages", None) or []):
        s = dict(s)
        if "groups" in s:
            s["groups"] = tuple(s["groups"])
        stages.append(_build(StageConfig, s, f"recipe {name_or_file} stage {i}").validate())
    if not stages:
        raise ReefcapError(f"recipe {name_or_file}: no stages")
    preserve = data.pop("preserve", None)
    preserve_cfg = _build(PreserveConfig, preserve, f"recipe {name_or_file} preserve") if preserve else None
    experts = data.pop("experts", None)
    experts_cfg = _build(ExpertsRecipe, experts, f"recipe {name_or_file} experts") if experts else None
    if experts_cfg is None and any(g in EXPERT_GROUPS for s in stages for g in s.groups):
        raise ReefcapError(f"recipe {name_or_file}: groups {EXPERT_GROUPS} need an `experts:` section")
    parts = {"stages": tuple(stages), "preserve": preserve_cfg, "experts": experts_cfg}
    return _build(Recipe, {**data, **parts}, f"recipe {name_or_file}")


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a recipe saved with :meth:`Recipe.to_dict` (resume)."""
    stages = tuple(StageConfig(**{**s, "groups": tuple(s["groups"])}) for s in data["stages"])
    preserve = PreserveConfig(**data["preserve"]) if data.get("preserve") else None
    experts = ExpertsRecipe(**data["experts"]) if data.get("experts") else None
    return Recipe(**{**data, "stages": stages, "preserve": preserve, "experts": experts})


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    aug = data.get("augment") or {}
    aug = AugmentConfig(**{**aug, "crop_scale": tuple(aug.get("crop_scale", (0.5, 1.0)))})
    return TrainConfig(**{**data, "augment": aug})


def save_configs(out: Path, recipe: Recipe, train: TrainConfig, extra: dict[str, Any] | None = None) -> None:
    """Write the recipe and run config next to a checkpoint."""
    payload = {"recipe": recipe.to_dict(), "train": asdict(train), **(extra or {})}
    (out / TRAIN_CONFIG_FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def write_checkpoint(
    dest: Path,
    model: Any,
    processor: Any,
    start: Path,
    configs: tuple[Recipe, TrainConfig, dict[str, Any]],
    also: Callable[[Path], None] | None = None,
) -> None:
    """Save ``model`` and ``processor`` (safetensors) as an HF folder at ``dest``, with the start model's
    ``reefcap_factory.json``, whatever ``also`` writes, and the run's configs (:func:`save_configs`).

    Written to ``dest.tmp`` first and renamed, so a crash never leaves a half-written checkpoint at ``dest``.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    factory = start / "reefcap_factory.json"
    if factory.is_file():
        shutil.copy(factory, tmp / factory.name)
    if also is not None:
        also(tmp)
    save_configs(tmp, *configs)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
