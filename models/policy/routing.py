"""The domain router: is an image underwater or taken in air? Decided per image, before any model runs.

In-air images are served by the pretrained model (the policy's fallback) and underwater ones by the adapted
model (the primary), because each loses on the other's domain: the adapted models keep 50-90% of the pretrained
model's in-air CIDEr, and the pretrained model misses 40-60% of the adaptation underwater.

The router is a logistic regression on 18 colour and contrast statistics of a 32 x 32 thumbnail (what water does
to light: red absorbed within metres, blue-green cast, veiled low contrast, blur), in numpy, computed for a
whole batch at once: well under a millisecond an image (``make bench-server`` times it next to captioning), and
no torch on the serving path. It is fitted by
``reefcap router fit`` (:mod:`reefcap.training.router`), which also chooses its threshold on validation data, and
it is saved beside the adapted model's weights as :data:`ROUTER_FILE`, listed with the other files in the
checkpoint's ``manifest.json``; :func:`find_router` reads it from the checkpoint folder a loaded engine came from.

An image goes underwater only when the router's probability reaches the threshold (never below 0.5): an unsure
router answers with the pretrained model, since an in-air image on the adapted model loses more than an
underwater image on the pretrained model gains back.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reefcap.models.errors import ReefcapError
from reefcap.models.policy.results import CaptionResult, Route

log = logging.getLogger("reefcap.policy")

ROUTER_FILE = "reefcap_router.json"
ROUTER_FORMAT = "reefcap-router-2"  # 2: box-filtered thumbnail (1 was bilinear)
UNDERWATER, IN_AIR = "underwater", "in_air"
THUMB = 32  # the features are measured on a THUMB x THUMB copy: the colour cast survives any resolution
FEATURES = (
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
    "g_minus_r",
    "b_minus_r",
    "g_minus_b",
    "saturation",
    "min_channel",
    "max_minus_min",
    "grad_y",
    "grad_x",
    "range_r",
    "range_b",
    "dark_channel",
    "red_share",
)


def thumbnail(image: Image.Image) -> np.ndarray:
    """A ``THUMB x THUMB`` RGB copy of ``image`` as floats in [0, 1]: a box filter, shrinking by whole factors
    first (``reducing_gap=1``), so the photo is read once. The router's cost is this pass over the full image:
    a bilinear resample took 2-3x as long, for the same statistics of colour and contrast."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    small = rgb.resize((THUMB, THUMB), Image.Resampling.BOX, reducing_gap=1.0)
    return np.asarray(small, dtype=np.float32) / 255.0


def _spread(x: np.ndarray, low: float = 5, high: float = 95) -> np.ndarray:
    """Per row, the ``high`` minus the ``low`` percentile (numpy's linear rule) from one sort of each row (a
    vectorised sort of 1,024 floats is several times faster than ``np.percentile`` or ``np.partition`` here)."""
    ordered = np.sort(x, axis=1)
    n = x.shape[1]

    def at(q: float) -> np.ndarray:
        pos = q / 100 * (n - 1)
        lo, hi = int(pos), min(int(pos) + 1, n - 1)
        return ordered[:, lo] + (ordered[:, hi] - ordered[:, lo]) * (pos - lo)

    return at(high) - at(low)


def features(image: Image.Image) -> np.ndarray:
    """The router's :data:`FEATURES` of one decoded image (float32, in that order)."""
    return feature_matrix([image])[0]


def feature_matrix(images: Sequence[Image.Image]) -> np.ndarray:
    """``(N, len(FEATURES))``: the features of every image, computed on the stacked thumbnails at once (numpy's
    per-call overhead, paid per image, was most of the router's cost)."""
    if not images:
        return np.zeros((0, len(FEATURES)), dtype=np.float32)
    a = np.stack([thumbnail(im) for im in images])  # (N, THUMB, THUMB, 3)
    n = len(a)
    r, g, b = a[..., 0].reshape(n, -1), a[..., 1].reshape(n, -1), a[..., 2].reshape(n, -1)
    planes = a[..., 0], a[..., 1], a[..., 2]
    # (N, THUMB, THUMB); element-wise over the three planes: a reduction over the length-3 axis was 5x slower
    hi, lo = np.maximum(np.maximum(*planes[:2]), planes[2]), np.minimum(np.minimum(*planes[:2]), planes[2])
    # Dark channel (He et al.): the minimum over colours and a 4 x 4 patch is near 0 in clear air and lifted by
    # the veiling light of water; red's share of the light is what absorption removes first.
    dark = lo.reshape(n, THUMB // 4, 4, THUMB // 4, 4).min(axis=(2, 4)).mean(axis=(1, 2))
    per_image = (1, 2)
    columns = (
        r.mean(1),
        g.mean(1),
        b.mean(1),
        r.std(1),
        g.std(1),
        b.std(1),
        (g - r).mean(1),
        (b - r).mean(1),
        (g - b).mean(1),
        ((hi - lo) / (hi + 1e-3)).mean(per_image),
        lo.mean(per_image),
        hi.mean(per_image) - lo.mean(per_image),
        np.abs(np.diff(a, axis=1)).mean(axis=(1, 2, 3)),
        np.abs(np.diff(a, axis=2)).mean(axis=(1, 2, 3)),
        _spread(r),
        _spread(b),
        dark,
        r.sum(1) / (a.sum(axis=(1, 2, 3)) + 1e-3),
    )
    return np.stack(columns, axis=1).astype(np.float32)


@dataclass(frozen=True)
class RouteDecision:
    """The router's answer for one image: its domain and the probability that it is underwater."""

    domain: str
    probability: float

    @property
    def underwater(self) -> bool:
        return self.domain == UNDERWATER


@dataclass(frozen=True)
class Router:
    """A fitted router: feature standardisation, logistic weights, and the threshold chosen on validation.

    ``info`` carries what the fit measured and how the threshold was chosen (kept in the JSON file as is).
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = len(FEATURES)
        if not (len(self.mean) == len(self.scale) == len(self.weights) == n):
            raise ReefcapError(f"router: expected {n} features, got {len(self.weights)} weights")
        if not 0.5 <= self.threshold < 1.0 or not all(math.isfinite(v) for v in (*self.weights, self.bias)):
            raise ReefcapError(f"router: threshold must be in [0.5, 1) and weights finite, got {self.threshold}")

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """P(underwater) for each row of a feature matrix."""
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        logit = z @ np.asarray(self.weights) + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(logit, -60, 60)))

    def decide(self, probability: float) -> RouteDecision:
        """The route for one probability: underwater from the threshold up, in air below it."""
        domain = UNDERWATER if probability >= self.threshold else IN_AIR
        return RouteDecision(domain, round(float(probability), 4))

    def route(self, images: Sequence[Image.Image]) -> list[RouteDecision]:
        """One :class:`RouteDecision` per decoded image, in order."""
        return [self.decide(p) for p in self.probabilities(feature_matrix(images))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ROUTER_FORMAT,
            "features": list(FEATURES),
            "thumbnail": THUMB,
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "bias": self.bias,
            "threshold": self.threshold,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Router:
        """Read :meth:`to_dict`'s form back; :class:`ReefcapError` naming the problem if it is not one."""
        if not isinstance(data, dict) or data.get("format") != ROUTER_FORMAT:
            raise ReefcapError(f"not a {ROUTER_FORMAT} file")
        if list(data.get("features", [])) != list(FEATURES) or data.get("thumbnail") != THUMB:
            raise ReefcapError("router: made for other features than this reefcap computes")
        try:
            return cls(
                mean=tuple(float(v) for v in data["mean"]),
                scale=tuple(float(v) for v in data["scale"]),
                weights=tuple(float(v) for v in data["weights"]),
                bias=float(data["bias"]),
                threshold=float(data["threshold"]),
                info=dict(data.get("info") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReefcapError(f"router: malformed ({exc!r})") from None

    def save(self, folder: str | Path) -> Path:
        """Write :data:`ROUTER_FILE` in ``folder`` (a checkpoint's manifest should then list its hash)."""
        path = Path(folder) / ROUTER_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Router:
        """The router in ``path`` (a :data:`ROUTER_FILE`, or a folder holding one)."""
        path = Path(path)
        path = path / ROUTER_FILE if path.is_dir() else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReefcapError(f"{path}: cannot read the router ({exc})") from None
        try:
            return cls.from_dict(data)
        except ReefcapError as exc:
            raise ReefcapError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class RoutedBatch:
    """One batch split by route: the indices of its underwater part and of its in-air part."""

    decisions: list[RouteDecision]
    underwater: list[int]
    in_air: list[int]

    @classmethod
    def split(cls, decisions: list[RouteDecision], in_air_model: bool) -> RoutedBatch:
        """Split by the decisions; without an in-air model to send them to, every image is in the first part."""
        if not in_air_model:
            return cls(decisions, list(range(len(decisions))), [])
        wet = [i for i, d in enumerate(decisions) if d.underwater]
        return cls(decisions, wet, [i for i, d in enumerate(decisions) if not d.underwater])

    def underwater_part(self, images: Sequence[Any]) -> list[Any]:
        return [images[i] for i in self.underwater]

    def in_air_part(self, images: Sequence[Any]) -> list[Any]:
        return [images[i] for i in self.in_air]

    def merged(self, wet: Sequence[CaptionResult], dry: Sequence[CaptionResult]) -> list[CaptionResult]:
        """The parts' answers back in the batch's order, each naming its route."""
        out: list[CaptionResult | None] = [None] * len(self.decisions)
        for idx, answers in ((self.underwater, wet), (self.in_air, dry)):
            for i, result in zip(idx, answers, strict=True):
                d = self.decisions[i]
                water = (result.water_type or {}).get("label")
                out[i] = result.replace(route=Route(d.domain, result.model.name, d.probability, water))
        return [r for r in out if r is not None]


@functools.lru_cache(maxsize=32)
def _cached(path: str, size: int, mtime_ns: int) -> Router | None:
    try:
        return Router.load(path)
    except ReefcapError as exc:  # a damaged router must not stop serving: the model answers unrouted
        log.error("%s; this model's images are not routed", exc)
        return None


def find_router(engine: Any) -> Router | None:
    """The router saved with the checkpoint ``engine`` was loaded from (its ``checkpoint``, set by the loader,
    else its ``describe().source``: a checkpoint folder, or an ONNX export folder whose manifest names one);
    None when it has none."""
    from reefcap.models.engines.manifests import checkpoint_folder

    folder = getattr(engine, "checkpoint", None) or checkpoint_folder(engine.describe().source)
    path = Path(folder) / ROUTER_FILE if folder is not None else None
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return _cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
