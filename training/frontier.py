"""The comparison's frontier: every protocol as a point of underwater against in-air CIDEr, WiSE-FT merges swept
over ``a``, routed systems, a mixed survey, and the serving default chosen by a stated rule.

Candidates (one per protocol and seed, evaluated the same way):

- ``start`` (the pretrained model) and each trained recipe's selected model (``naive``, ``damf``, ...);
- ``--include LABEL=MODEL``: a model trained elsewhere (a bundled one), as a protocol of its own;
- ``merged NAME a=A`` for each ``--merge`` protocol and ``--merge-alphas`` value: the WiSE-FT merge
  ``(1 - A) start + A model`` (:mod:`reefcap.training.merge`);
- ``routed NAME`` with ``--route``: the serving policy with that model as primary, the start model for in-air
  images and the comparison's router (fitted once on ``--data`` vs ``--preserve-data``, threshold on the
  validation splits below: :mod:`reefcap.training.router`).

Each is scored on the underwater and in-air test splits, on a mixed survey (both test splits together, scored
as one set), and on the validation splits that choose the default (``--frontier-val``, default ``--val``, and
``--air-val``): the highest underwater validation CIDEr among candidates keeping at least ``keep_in_air`` (95%)
of the start model's in-air validation CIDEr. A ``--frontier-val`` none of the models was trained or selected
on (another generator seed) keeps models trained elsewhere (``--include``) from being judged on their own data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reefcap.models.errors import ReefcapError

from .evaluation import write_json

TEST_SPLITS = ("underwater", "in-air")
VAL_SPLITS = ("val-underwater", "val-in-air")
MIXED = "mixed"


@dataclass(frozen=True)
class FrontierConfig:
    """What the frontier adds to `reefcap compare` (all off by default)."""

    merge: tuple[str, ...] = ()  # protocols (recipes or include labels) to sweep with WiSE-FT
    merge_alphas: tuple[float, ...] = ()
    route: bool = False
    includes: tuple[tuple[str, str], ...] = ()  # (label, model)
    air_val: str | None = None
    val: str | None = None  # underwater validation for the router and the rule (default: the runs' --val)
    keep_in_air: float = 0.95

    @property
    def active(self) -> bool:
        return bool(self.merge_alphas or self.route or self.includes)


@dataclass(frozen=True)
class Candidate:
    """One point of the frontier: ``model`` answers underwater (and in air unless ``routed``)."""

    name: str
    family: str  # the plot's group: start, a recipe, experts, included, merged, routed
    model: str
    seed: int | None = None
    routed: bool = False
    parent: str | None = None  # merged: the protocol swept
    alpha: float | None = None


def parse_includes(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``--include LABEL=MODEL`` values, checked (a label once, not a recipe's name)."""
    out: list[tuple[str, str]] = []
    for item in items or []:
        label, sep, model = item.partition("=")
        if not sep or not label or not model or any(label == k for k, _ in out):
            raise ReefcapError(f"--include takes LABEL=MODEL, each label once; got {item!r}")
        out.append((label, model))
    return tuple(out)


def parse_alphas(text: str | None) -> tuple[float, ...]:
    """``--merge-alphas 0.25,0.5,0.75``: each in (0, 1) (0 and 1 are the two parents, already points)."""
    if not text:
        return ()
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ReefcapError(f"--merge-alphas takes numbers separated by commas, got {text!r}") from None
    if not values or not all(0 < a < 1 for a in values):
        raise ReefcapError(f"--merge-alphas: each a must be in (0, 1), got {text!r}")
    return values


def candidates(
    frontier: FrontierConfig, start: str, runs: dict[str, list[Path]], families: dict[str, str], work: Path
) -> list[Candidate]:
    """Every candidate, merges made on the way (``work/merged``); single models first, then merges, then
    routed versions of every adapted one."""
    from .merge import merge_checkpoints

    singles = [Candidate("start", "start", start)]
    for name, dirs in runs.items():
        singles += [Candidate(name, families[name], str(d / "best"), seed=i) for i, d in enumerate(dirs)]
    singles += [Candidate(label, "included", model) for label, model in frontier.includes]
    merged = []
    for parent in frontier.merge:
        for c in (c for c in singles if c.name == parent):
            for a in frontier.merge_alphas:
                out = work / "merged" / f"{parent}-seed{c.seed or 0}-a{a:g}"
                if not (out / "manifest.json").is_file():
                    merge_checkpoints(start, c.model, a, out, force=True)
                merged.append(Candidate(f"merged {parent} a={a:g}", "merged", str(out), c.seed, parent=parent, alpha=a))
    adapted = [c for c in singles + merged if c.name != "start"]
    routed = [Candidate(f"routed {c.name}", "routed", c.model, c.seed, True, c.parent, c.alpha) for c in adapted]
    return singles + merged + (routed if frontier.route else [])


def check_merge_names(frontier: FrontierConfig, recipes: tuple[str, ...]) -> None:
    """Before any training: every ``--merge`` name must be a listed recipe or an include label."""
    known = set(recipes) | {label for label, _ in frontier.includes}
    for name in frontier.merge:
        if name not in known:
            raise ReefcapError(f"--merge: {name!r} is neither in --recipes nor an --include label")
    if frontier.merge and not frontier.merge_alphas:
        raise ReefcapError("--merge needs --merge-alphas (the values of a to sweep)")


def fit_compare_router(train: str, air: str, val: str, air_val: str, tests: dict[str, Path], work: Path):
    """The comparison's router (reused from ``work/router`` when its inputs are unchanged) and its accuracy per
    domain and water type on validation and every test split."""
    from reefcap.models.policy.routing import Router

    from .data import load_records
    from .router import fit_router, route_accuracy, water_domains

    folder = work / "router"
    key = {"train": train, "air": air, "val": val, "air_val": air_val, "tests": {k: str(v) for k, v in tests.items()}}
    saved = folder / "inputs.json"
    if saved.is_file() and json.loads(saved.read_text()) == key:
        return Router.load(folder), json.loads((folder / "accuracy.json").read_text())
    router = fit_router(*(load_records(p) for p in (train, air, val, air_val)))
    domain_of = water_domains()
    accuracy = {"val": route_accuracy(router, [*load_records(val), *load_records(air_val)], domain_of)}
    for name, path in tests.items():
        accuracy[name] = route_accuracy(router, load_records(path), domain_of)
    folder.mkdir(parents=True, exist_ok=True)
    router = Router(
        router.mean,
        router.scale,
        router.weights,
        router.bias,
        router.threshold,
        {**router.info, "data": key, "accuracy": accuracy},
    )
    router.save(folder)  # ready to copy beside a chosen model's weights
    write_json(folder / "accuracy.json", accuracy)
    write_json(saved, key)
    return router, accuracy


def evaluate_candidate(c: Candidate, start_engine, router, splits: dict[str, Path], cache: Path) -> dict[str, Any]:
    """Scores of ``c`` on every split and the mixed survey, cached in ``cache`` (redone when the splits change)."""
    key = {k: str(v) for k, v in splits.items()}
    what = {"model": c.model, "routed": c.routed}  # a label reused for another model must not reuse its scores
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("splits") == key and cached.get("candidate") == what:
            return cached
    from reefcap.models.engines.loader import load_engine
    from reefcap.models.policy import CaptionPolicy

    from .data import load_records
    from .evaluation import evaluate

    engine = start_engine if c.name == "start" else load_engine(c.model, backend="torch")
    policy = CaptionPolicy(engine, start_engine if c.routed else None, router=router if c.routed else None)
    out: dict[str, Any] = {"splits": key, "candidate": what}
    predictions: dict[str, tuple[list, list]] = {}
    for name, path in splits.items():
        records = load_records(path)
        out[name], preds = evaluate(policy, records, meteor=False)
        predictions[name] = (records, preds)
        if c.routed:
            out[f"{name}/routes"] = dict(policy.route_counts)
            policy.route_counts.clear()
    if engine is not start_engine:
        engine.close()
    out[MIXED] = mixed_metrics([predictions[s] for s in TEST_SPLITS if s in predictions])
    write_json(cache, out)
    return out


def mixed_metrics(parts: list[tuple[list, list]]) -> dict[str, float]:
    """The test splits scored as one survey (ids made unique per split; CIDEr's document frequencies are the
    whole survey's, as they would be for a real mixed dive)."""
    from reefcap.models.metrics import coco_metrics

    preds, refs = {}, {}
    for i, (records, predictions) in enumerate(parts):
        by_id = {p["image_id"]: p["caption"] for p in predictions}
        for r in records:
            preds[(i, r.image_id)] = by_id[r.image_id]
            refs[(i, r.image_id)] = list(r.captions)
    keys = {k: n for n, k in enumerate(preds)}
    metrics = coco_metrics({keys[k]: v for k, v in preds.items()}, {keys[k]: refs[k] for k in preds}, meteor=False)
    metrics["images"] = len(preds)
    return metrics
