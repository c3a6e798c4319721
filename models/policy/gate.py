"""The quality gate: may a candidate model replace the serving one? It measures instead of trusting.

1. The candidate's ``manifest.json`` must list the SHA-256 of its files and they must match what is on disk
   (its weights and config at least): numbers written for other weights are refused before anything runs.
2. Candidate and serving model caption the same gate set with the same decoding options, and both are scored
   here with the library's metrics (:mod:`reefcap.models.metrics`). A manifest's own numbers are never compared:
   they come from other data and the candidate wrote them itself.
3. Each metric has a declared direction (:data:`DIRECTIONS`): ``higher`` is better, ``lower`` is better, or
   ``neutral`` (reported, never decisive). The candidate passes a metric when it is no worse than the serving
   model by more than :attr:`GateConfig.tolerance` (absolute, in the metric's units), and it is refused
   outright when its captions collapse: ``repetition_rate`` or ``empty_or_one_word`` above its collapse
   ceiling, ``max(serving + collapse_margin, floor)`` with the floor ``max_repetition`` or ``max_empty``.
   The ceiling is relative because those rates depend on the gate set as much as on the model: on a set
   where the serving model itself gives 10% one-word captions, a fixed 5% ceiling refused every candidate,
   however good. The floor keeps a serving model that never repeats from making 1% repetition a
   "collapse", and is the whole ceiling when there is no serving model to compare with. The margin is
   separate from the tolerance so that widening ``tolerance`` (the server's ``gate_tolerance``) never lets
   a collapse through.
4. The :class:`GateReport` says, per metric, both values and why it passed or failed.
5. With the in-air model (the server's fallback) given, the gate judges each primary as it would be served:
   routed by the router saved with it (in-air images to the in-air model), on the underwater gate set and on
   an in-air one (``in_air/`` metrics; the ReefScenes in-air probe set unless another is given). A candidate
   that forgot the surface is refused unless its router sends in-air images around it; a router that sends
   them to it anyway shows as the same drop. Neither side gets the fallback's rules here (degenerate
   captions are not replaced), so a collapse is seen as it is.

Gate sets, in order of preference (:func:`choose_gate_set`): a configured COCO file; the held-out (``test``)
split of the feedback store once it has ``min_feedback_images`` images; else the ReefScenes probe set
(:func:`reefcap.models.reefscenes.probe.probe_set`). The gate is synchronous and slow (it captions the set
twice): callers run it on a worker thread, off the request path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions
from reefcap.models.metrics import coco_metrics, collapse_metrics
from reefcap.models.policy.routing import ROUTER_FILE, RoutedBatch, Router, find_router
from reefcap.models.registry import sha256_file

HIGHER, LOWER, NEUTRAL = "higher", "lower", "neutral"
DIRECTIONS = {
    "Bleu_1": HIGHER,
    "Bleu_2": HIGHER,
    "Bleu_3": HIGHER,
    "Bleu_4": HIGHER,
    "METEOR": HIGHER,
    "ROUGE_L": HIGHER,
    "CIDEr": HIGHER,
    "repetition_rate": LOWER,
    "empty_or_one_word": LOWER,
    # Vocabulary spread depends on the images as much as on the model: shown, never decisive.
    "distinct_2": NEUTRAL,
    "unique_captions": NEUTRAL,
    "images": NEUTRAL,
}
REQUIRED_FILES = ("config.json", "model.safetensors")
MANIFEST = "manifest.json"
GateItems = Sequence[tuple[bytes | str | Path, Sequence[str]]]  # (image, reference captions)
IN_AIR = "in_air/"  # prefix of the metrics measured on the in-air gate set


@dataclass(frozen=True)
class GateConfig:
    """How strict the gate is. Tolerances are absolute, in the metrics' units (pycocoevalcap fractions).

    A collapse rate (``repetition_rate``, ``empty_or_one_word``) is refused outright above
    ``max(serving rate + collapse_margin, floor)``, the floor being ``max_repetition`` or ``max_empty``;
    without a serving model the ceiling is the floor alone.
    """

    tolerance: float = 0.02  # a higher-is-better metric may drop (a lower-is-better one rise) this much
    max_repetition: float = 0.05  # collapse floor: repeated captions up to this share are never a collapse
    max_empty: float = 0.05  # collapse floor: empty or one-word captions up to this share are never a collapse
    collapse_margin: float = 0.05  # collapse: a rate this far above the serving model's is refused outright
    min_feedback_images: int = 30  # held-out feedback images needed before they replace the probe set
    batch_size: int = 16


@dataclass(frozen=True)
class MetricVerdict:
    """One metric's comparison: both values, its direction, and why it passed or failed."""

    metric: str
    direction: str
    candidate: float
    serving: float | None
    passed: bool
    reason: str


@dataclass
class GateReport:
    """The gate's answer. ``accepted`` only when the manifest checks out and every verdict passed."""

    accepted: bool
    gate_set: str
    images: int
    verdicts: list[MetricVerdict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # refusals not tied to one metric (manifest, hashes)
    air_set: str | None = None  # the in-air gate set, when the routed systems were judged on both domains
    routed: dict[str, bool] = field(default_factory=dict)  # whether candidate / serving had a router

    def reasons(self) -> list[str]:
        """Every reason for a refusal, one short line each (empty when accepted)."""
        return self.problems + [f"{v.metric}: {v.reason}" for v in self.verdicts if not v.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": self.reasons()}


def verify_manifest(folder: str | Path) -> list[str]:
    """Why the manifest in ``folder`` cannot be trusted to describe these weights; empty when its hashes match."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"no {MANIFEST}: the model's provenance and file hashes are unknown"]
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST} is unreadable ({exc})"]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return [f"{MANIFEST} lists no file hashes"]
    problems = [f"{MANIFEST} does not list {name}" for name in REQUIRED_FILES if name not in files]
    if (folder / ROUTER_FILE).is_file() and ROUTER_FILE not in files:  # a router added after the manifest
        problems.append(f"{MANIFEST} does not list {ROUTER_FILE}, which the folder holds")
    for name, digest in sorted(files.items()):
        path = folder / str(name)
        if Path(str(name)).name != name or not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST} but not in the model folder")
        elif sha256_file(path) != digest:
            problems.append(
                f"{name}: SHA-256 differs from {MANIFEST} (the file changed after the manifest was written)"
            )
    return problems


def measure(
    engine: CaptionEngine | RoutedSystem, items: GateItems, options: DecodeOptions, batch_size: int = 16
) -> tuple[dict[str, float], list[str]]:
    """Caption ``items`` with ``engine`` and score them (no METEOR: no Java on a server); (metrics, captions)."""
    captions: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = [image for image, _ in items[start : start + batch_size]]
        captions += [c.caption for c in engine.caption(chunk, options)]
    refs = {i: list(r) for i, (_, r) in enumerate(items)}
    metrics = coco_metrics(dict(enumerate(captions)), refs, meteor=False)
    metrics.update(collapse_metrics(captions))
    metrics["images"] = len(items)
    return metrics, captions


class RoutedSystem:
    """``engine`` as the routed policy serves it: the images ``router`` calls in air captioned by ``in_air``
    (the rest by ``engine``), each part as one batch, answers in order. No router: ``engine`` alone."""

    def __init__(self, engine: CaptionEngine, in_air: CaptionEngine | None, router: Router | None) -> None:
        self.engine, self.in_air, self.router = engine, in_air, router

    def caption(self, images: Sequence, options: DecodeOptions) -> list[Caption]:
        if self.router is None or self.in_air is None:
            return self.engine.caption(images, options)
        decoded = [im if isinstance(im, Image.Image) and im.mode == "RGB" else self.engine.decode(im) for im in images]
        batch = RoutedBatch.split(self.router.route(decoded), in_air_model=True)
        out: list[Caption | None] = [None] * len(decoded)
        for idx, engine in ((batch.underwater, self.engine), (batch.in_air, self.in_air)):
            if idx:
                for i, caption in zip(idx, engine.caption([decoded[i] for i in idx], options), strict=True):
                    out[i] = caption
        return [c for c in out if c is not None]


def collapse_ceiling(metric: str, serving: float | None, config: GateConfig) -> float | None:
    """The highest ``metric`` rate a candidate may have before it counts as collapsed (None: not a collapse
    metric): ``max(serving + collapse_margin, floor)``, or the floor alone with no serving model."""
    floors = {"repetition_rate": config.max_repetition, "empty_or_one_word": config.max_empty}
    metric = metric.removeprefix(IN_AIR)
    if metric not in floors:
        return None
    if serving is None:
        return floors[metric]
    # Rounded as the metrics are (6 places), so a rate exactly at serving + margin is not refused by float noise.
    return max(round(serving + config.collapse_margin, 6), floors[metric])


def _verdict(metric: str, new: float, old: float | None, config: GateConfig) -> MetricVerdict:
    direction = DIRECTIONS.get(metric.removeprefix(IN_AIR), NEUTRAL)
    tol = config.tolerance
    ceiling = collapse_ceiling(metric, old, config)
    if ceiling is not None and new > ceiling:
        if old is None:
            why = f"{new:.4f} > {ceiling} (collapse)"
        else:
            floor = collapse_ceiling(metric, None, config)
            why = f"{new:.4f} > {ceiling:.4f} = max(serving {old:.4f} + {config.collapse_margin}, {floor}) (collapse)"
        return MetricVerdict(metric, direction, new, old, False, why)
    if direction == NEUTRAL or old is None:
        return MetricVerdict(metric, direction, new, old, True, "not compared (neutral)")
    if direction == HIGHER:
        ok = new >= old - tol
        why = f"{new:.4f} vs serving {old:.4f}: " + ("within" if ok else "below by more than") + f" {tol}"
    else:
        ok = new <= old + tol
        why = f"{new:.4f} vs serving {old:.4f}: " + ("within" if ok else "above by more than") + f" {tol}"
    return MetricVerdict(metric, direction, new, old, ok, why)


def compare(candidate: dict[str, float], serving: dict[str, float] | None, config: GateConfig) -> list[MetricVerdict]:
    """A verdict for every metric the candidate was measured on (``serving`` None: no serving model to beat)."""
    return [_verdict(m, float(v), (serving or {}).get(m), config) for m, v in candidate.items()]


def run_gate(
    candidate: CaptionEngine,
    candidate_folder: str | Path,
    serving: CaptionEngine | None,
    items: GateItems,
    gate_set: str,
    options: DecodeOptions | None = None,
    config: GateConfig | None = None,
    *,
    in_air: CaptionEngine | None = None,
    air_items: GateItems | None = None,
    air_set: str | None = None,
) -> GateReport:
    """Check ``candidate``'s manifest hashes, then measure it and ``serving`` on ``items`` and compare. With
    ``in_air`` (the in-air model), both are judged routed, also on ``air_items`` (default: the in-air probe set)."""
    config = config or GateConfig()
    options = options or DecodeOptions.greedy()
    problems = verify_manifest(candidate_folder)
    if problems:  # nothing is measured for a model whose files are not the ones described
        return GateReport(False, gate_set, len(items), problems=problems)
    if not items:
        return GateReport(False, gate_set, 0, problems=["the gate set is empty"])
    routers = {"candidate": find_router(candidate), "serving": find_router(serving) if serving else None}
    new_system = RoutedSystem(candidate, in_air, routers["candidate"])
    old_system = RoutedSystem(serving, in_air, routers["serving"]) if serving is not None else None
    new, _ = measure(new_system, items, options, config.batch_size)
    old = measure(old_system, items, options, config.batch_size)[0] if old_system is not None else None
    verdicts = compare(new, old, config)
    report = GateReport(True, gate_set, len(items), verdicts)
    if in_air is not None:
        if air_items is None:
            from reefcap.models.reefscenes.probe import probe_set

            air_items, air_set = probe_set(domain="surface"), "ReefScenes in-air probe set"
        new_air = {IN_AIR + k: v for k, v in measure(new_system, air_items, options, config.batch_size)[0].items()}
        old_air = None
        if old_system is not None:
            old_air = {IN_AIR + k: v for k, v in measure(old_system, air_items, options, config.batch_size)[0].items()}
        report.verdicts += compare(new_air, old_air, config)
        report.air_set = air_set or "in-air gate set"
        report.routed = {k: v is not None for k, v in routers.items()}
    report.accepted = all(v.passed for v in report.verdicts)
    return report


def choose_gate_set(
    coco_file: str | Path | None, held_out: GateItems | None, config: GateConfig
) -> tuple[str, GateItems]:
    """(description, items): the configured COCO file, else the held-out feedback when there is enough, else
    the ReefScenes probe set."""
    if coco_file:
        from reefcap.models.data.datasets import load_dataset

        records = load_dataset(Path(coco_file))
        return f"COCO file {coco_file}", [(r.path, r.captions) for r in records]
    if held_out is not None and len(held_out) >= config.min_feedback_images:
        return f"held-out feedback ({len(held_out)} images)", held_out
    from reefcap.models.reefscenes.probe import probe_set

    reason = f"{len(held_out or ())} held-out feedback images < {config.min_feedback_images}"
    return f"ReefScenes probe set ({reason})", probe_set()
