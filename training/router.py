"""Fitting and measuring the domain router (:mod:`reefcap.models.policy.routing`), and `reefcap router`.

The fit is a logistic regression (underwater = 1) on the router's features of the underwater and in-air
training images, by Newton's method with a small L2 penalty (deterministic: the same data gives the same file).

The threshold is chosen on validation images, never training ones. An in-air image routed underwater costs
more than the reverse: with router accuracy p in air, in-air quality kept is about p + (1 - p) r, r the share the
adapted model keeps in air (about 0.5 for plain DAMF), so keeping 95% allows about 10% of in-air images astray;
underwater, a gain of about 2.4 still gives 2x with about 30% astray. So each in-air error weighs
:data:`AIR_WEIGHT` = 0.30 / 0.10 = 3 underwater errors, and the threshold minimises
``AIR_WEIGHT * (share of in-air images routed underwater) + (share of underwater images routed in air)``
over thresholds in [0.5, 1); where a range of thresholds ties, its middle (in log-odds) is taken, the most
margin on both sides.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reefcap.models.errors import ReefcapError
from reefcap.models.policy.routing import FEATURES, IN_AIR, ROUTER_FILE, UNDERWATER, Router, feature_matrix

AIR_WEIGHT = 3.0
L2 = 1e-3
NEWTON_STEPS = 50
TOP = 0.999999  # thresholds stay below 1: a router must be able to route underwater


def record_features(records: Sequence) -> np.ndarray:
    """Router features of every record's image (decoded as the server decodes uploads)."""
    from reefcap.models.data.images import load_image

    return feature_matrix([load_image(r.path) for r in records])


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float]:
    """Weights and bias of an L2-penalised logistic regression of ``y`` (0/1) on standardised ``x``."""
    n, d = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, l2 * n)
    penalty[-1] = 0.0  # the bias is not pulled to zero
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -60, 60)))
        grad = a.T @ (p - y) + penalty * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def choose_threshold(p_underwater: np.ndarray, p_air: np.ndarray, air_weight: float = AIR_WEIGHT) -> dict[str, Any]:
    """The threshold by the module's rule, from validation probabilities of underwater and in-air images."""
    if not len(p_underwater) or not len(p_air):
        raise ReefcapError("choosing the router's threshold needs underwater and in-air validation images")
    probs = np.concatenate([p_underwater, p_air])
    # Cut c_i stands for every threshold in (c_(i-1), c_i]: they route the validation images alike. The last cut
    # stands for thresholds above every validation probability.
    cuts = np.unique(np.concatenate([[0.5], probs[(probs > 0.5) & (probs < TOP)], [TOP]]))
    costs = np.array([air_weight * (p_air >= t).mean() + (p_underwater < t).mean() for t in cuts])
    best = np.isclose(costs, costs.min())
    first = int(np.argmax(best))
    last = first
    while last + 1 < len(cuts) and best[last + 1]:
        last += 1
    low, high = (0.5 if first == 0 else float(cuts[first - 1])), float(cuts[last])
    threshold = float(_sigmoid((_logit(low) + _logit(high)) / 2))
    return {
        "threshold": round(min(max(threshold, 0.5), TOP), 6),
        "rule": f"minimise {air_weight:g} x share of in-air images routed underwater + share of underwater images "
        "routed in air, on validation; thresholds in [0.5, 1); the middle (log-odds) of the best range",
        "range": [round(low, 6), round(high, 6)],
        "validation_cost": round(float(costs.min()), 6),
    }


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def _sigmoid(z: float) -> float:
    return float(1 / (1 + np.exp(-z)))


def fit_router(train_uw: Sequence, train_air: Sequence, val_uw: Sequence, val_air: Sequence) -> Router:
    """Fit on the training records of both domains, choose the threshold on the validation ones."""
    if not train_uw or not train_air:
        raise ReefcapError("fitting a router needs underwater and in-air training images")
    x = np.vstack([record_features(train_uw), record_features(train_air)]).astype(np.float64)
    y = np.concatenate([np.ones(len(train_uw)), np.zeros(len(train_air))])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    weights, bias = logistic_fit((x - mean) / scale, y)
    draft = Router(tuple(mean), tuple(scale), tuple(weights), bias, 0.5)
    chosen = choose_threshold(
        draft.probabilities(record_features(val_uw)), draft.probabilities(record_features(val_air))
    )
    info = {"fit": {"underwater_images": len(train_uw), "in_air_images": len(train_air), "l2": L2}, **chosen}
    return Router(draft.mean, draft.scale, draft.weights, bias, chosen["threshold"], info)


def route_accuracy(router: Router, records: Sequence, domain_of=None) -> dict[str, Any]:
    """How ``records`` are routed: per true domain (``underwater`` where the metadata names a water type, else
    ``in_air``) the share routed to it, and per water domain (``domain_of(metadata)``, e.g. the GuiDG grouping)."""
    probs = router.probabilities(record_features(records)) if records else np.zeros(0)
    groups: dict[str, list[bool]] = {}
    types: dict[str, list[bool]] = {}
    for rec, p in zip(records, probs, strict=True):
        underwater = (rec.metadata or {}).get("water_type") is not None
        right = router.decide(float(p)).underwater == underwater
        groups.setdefault(UNDERWATER if underwater else IN_AIR, []).append(right)
        label = domain_of(rec.metadata) if domain_of else None
        if label is not None:
            types.setdefault(label, []).append(right)
    share = lambda v: {"accuracy": round(sum(v) / len(v), 4), "images": len(v)}  # noqa: E731
    out: dict[str, Any] = {name: share(v) for name, v in groups.items()}
    every = [x for v in groups.values() for x in v]
    if every:
        out["all"] = share(every)
    if types:
        out["water_types"] = {name: share(v) for name, v in types.items()}
    return out


def water_domains():
    """The GuiDG grouping of Jerlov types (the ``guidg`` recipe's), as ``domain_of(metadata)``."""
    from reefcap.models.engines.experts import ExpertsConfig

    from .config import load_recipe

    return ExpertsConfig(domains=load_recipe("guidg").experts.domains).domain_of


def attach_router(folder: Path, data: dict[str, str], tests: dict[str, str] | None = None) -> dict[str, Any]:
    """Fit a router on ``data`` (``underwater``, ``air``, ``val_underwater``, ``val_air``: caption files) and save
    it in the checkpoint ``folder``; returns the manifest section saying how, with its accuracy per domain and
    water type on validation and on each of ``tests``. The caller rewrites the manifest (its file hashes)."""
    from .data import load_records

    if not (Path(folder) / "config.json").is_file():
        raise ReefcapError(f"{folder}: not a checkpoint folder (no config.json): the router is saved beside weights")
    sets = {k: load_records(data[k]) for k in ("underwater", "air", "val_underwater", "val_air")}
    router = fit_router(sets["underwater"], sets["air"], sets["val_underwater"], sets["val_air"])
    domain_of = water_domains()
    measured = {"val": route_accuracy(router, [*sets["val_underwater"], *sets["val_air"]], domain_of)}
    for name, path in (tests or {}).items():
        measured[name] = route_accuracy(router, load_records(path), domain_of)
    info = {**router.info, "accuracy": measured}
    Router(router.mean, router.scale, router.weights, router.bias, router.threshold, info).save(folder)
    return {
        "file": ROUTER_FILE,
        "threshold": router.threshold,
        "rule": router.info["rule"],
        "accuracy": measured,
        "data": dict(data),
    }


def _fit_command(args: argparse.Namespace) -> int:
    from .zoo import MANIFEST_FILE, write_manifest

    folder = Path(args.model)
    tests = {}
    for item in args.test or []:
        name, _, path = item.partition("=")
        if not name or not path:
            raise ReefcapError(f"--test takes NAME=FILE, got {item!r}")
        tests[name] = path
    data = {k: getattr(args, k) for k in ("underwater", "air", "val_underwater", "val_air")}
    section = attach_router(folder, data, tests)
    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"name": folder.name}
    manifest.pop("files", None)
    manifest["router"] = section
    write_manifest(folder, manifest)  # the router's hash joins the others, so the gate can check it
    print(json.dumps({"router": str(folder / ROUTER_FILE), **{k: section[k] for k in ("threshold", "accuracy")}}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="fit the underwater / in-air router saved with an adapted model")
    rsub = p.add_subparsers(dest="router_command", required=True)
    fit = rsub.add_parser("fit", help="fit a router on captioned images of both domains, threshold on validation")
    fit.add_argument("--model", required=True, help="the adapted checkpoint folder the router is saved in")
    fit.add_argument("--underwater", required=True, help="underwater training captions (any format reefcap reads)")
    fit.add_argument("--air", required=True, help="in-air training captions")
    fit.add_argument("--val-underwater", required=True, help="underwater validation captions (threshold)")
    fit.add_argument("--val-air", required=True, help="in-air validation captions (threshold)")
    fit.add_argument("--test", action="append", metavar="NAME=FILE", help="also report routing accuracy on FILE")
    fit.set_defaults(handler=_fit_command)


__all__ = ["AIR_WEIGHT", "FEATURES", "choose_threshold", "fit_router", "logistic_fit", "route_accuracy"]
