"""How often a checkpoint's int8 export gives the same greedy caption as PyTorch fp32, on this CPU.

``reefcap serve`` runs a checkpoint in int8 by default only where its ``manifest.json`` records this figure
at >= 95% for the current export scheme on this kind of CPU (:mod:`reefcap.models.engines.precision`). This module
measures it and writes that record, so a checkpoint of your own (BLIP-base saved to a folder, an adapted
model) can earn int8 the way the bundled models did: ``reefcap agreement --model DIR --images PHOTOS --write``.

Two guards keep the record honest. A figure from few images cannot tell 95% from 90% (one caption is a point
of a hundred), so writing needs at least :data:`MIN_IMAGES` images. And identical captions only mean
something when the fp32 captions do: a model whose fp32 captions are mostly empty, or all the same (random
weights, a collapsed model), agrees with any precision, so no record is written for it.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reefcap.models.engines.precision import AGREEMENT_KEY, cpu_flags
from reefcap.models.errors import ReefcapError

MIN_IMAGES = 100
# ORT's u8s8 kernel families, most specific first: VNNI accumulates in int32; AVX2 alone sums pairs in int16.
KERNEL_FLAGS = ("avx512_vnni", "avx_vnni", "avx2")
MANIFEST = "manifest.json"


def cpu_kind(flags: set[str] | None = None) -> str | None:
    """The int8 kernel family this CPU runs, as the CPU flag that selects it; None for none of them."""
    flags = cpu_flags() if flags is None else flags
    return next((flag for flag in KERNEL_FLAGS if flag in flags), None)


@dataclass
class Agreement:
    """Greedy captions of the same images from fp32 and int8, compared."""

    images: list[str] = field(default_factory=list)
    fp32: list[str] = field(default_factory=list)
    int8: list[str] = field(default_factory=list)

    @property
    def identical(self) -> int:
        return sum(a == b for a, b in zip(self.fp32, self.int8, strict=True))

    @property
    def fraction(self) -> float:
        return self.identical / len(self.fp32) if self.fp32 else 0.0

    def differences(self, limit: int = 10) -> list[dict[str, str]]:
        """The first ``limit`` images whose captions differ, with both captions."""
        pairs = zip(self.images, self.fp32, self.int8, strict=True)
        return [{"image": i, "fp32": a, "int8": b} for i, a, b in pairs if a != b][:limit]

    def uninformative(self) -> str | None:
        """Why identical captions say nothing about this model (empty or all-alike fp32 captions), else None."""
        empty = sum(not c.strip() for c in self.fp32)
        if empty * 2 > len(self.fp32):
            return f"{empty} of {len(self.fp32)} fp32 captions are empty"
        if len(self.fp32) > 1 and len(set(self.fp32)) == 1:
            return f"all {len(self.fp32)} fp32 captions are the same ({self.fp32[0]!r})"
        return None


def measure(
    model: str, images: Sequence[Path], batch_size: int = 16, log: Callable[[str], None] | None = None
) -> Agreement:
    """Caption ``images`` greedily with PyTorch fp32 and with the int8 ONNX export of ``model`` (made on first
    use, as the server makes it) and keep both captions of each image."""
    from reefcap.models.data.images import load_image
    from reefcap.models.engines.base import DecodeOptions, EngineConfig
    from reefcap.models.engines.loader import load_engine

    # The one loader, with the thread policy serve applies; backend and dtype fixed: they are what is compared.
    engines = (
        load_engine(model, EngineConfig(backend="torch", device="cpu", dtype="fp32")),
        load_engine(model, EngineConfig(backend="onnx", device="cpu", dtype="int8")),
    )
    result, options = Agreement(), DecodeOptions.greedy()
    for start in range(0, len(images), batch_size):
        paths = images[start : start + batch_size]
        decoded = [load_image(path) for path in paths]  # an unreadable image ends the run, named in the error
        result.images += [str(p) for p in paths]
        result.fp32 += [c.caption for c in engines[0].caption(decoded, options)]
        result.int8 += [c.caption for c in engines[1].caption(decoded, options)]
        if log:
            log(f"{len(result.images)}/{len(images)} images")
    return result


def record(result: Agreement, kind: str, weights: str, data: str) -> dict[str, Any]:
    """The manifest entry :func:`reefcap.models.engines.precision.auto_dtype` reads."""
    from reefcap import __version__
    from reefcap.models.engines.onnx_format import INT8_SCHEME

    today = datetime.date.today().isoformat()
    run = {"cpu_flag": kind, "identical": round(result.fraction, 4), "images": len(result.fp32), "date": today}
    return {
        "identical": run["identical"],
        "images": run["images"],
        "data": data,
        "int8_scheme": INT8_SCHEME,
        "cpu_flags": [kind],
        "weights": weights,
        "runs": [run],
        "measured": f"{today}, reefcap {__version__} `reefcap agreement`, greedy, against PyTorch fp32 on this CPU",
    }


def merged(old: Any, new: dict[str, Any]) -> dict[str, Any]:
    """``new``, or, when ``old`` measured the same weights with the same scheme on other kinds of CPU, one record
    for all of them: every kind's run kept and the lowest figure stated (a figure must hold on each kind)."""
    same = isinstance(old, dict) and all(old.get(k) == new[k] for k in ("weights", "int8_scheme"))
    if not same or not isinstance(old.get("runs"), list):
        return new
    runs = [r for r in old["runs"] if isinstance(r, dict) and r.get("cpu_flag") != new["cpu_flags"][0]]
    runs += new["runs"]
    worst = min(runs, key=lambda r: r["identical"])
    kinds = sorted({r["cpu_flag"] for r in runs})
    return {**new, "identical": worst["identical"], "images": worst["images"], "cpu_flags": kinds, "runs": runs}


def write_record(folder: Path, entry: dict[str, Any]) -> Path:
    """Put ``entry`` into ``folder``'s manifest.json (created if absent), keeping every other key; the file is
    replaced whole, so a crash leaves the old manifest."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ReefcapError(f"{path}: cannot read the manifest to add the record to: {exc}") from None
    if not isinstance(manifest, dict):
        raise ReefcapError(f"{path}: the manifest is not a JSON object")
    manifest[AGREEMENT_KEY] = merged(manifest.get(AGREEMENT_KEY), entry)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=folder)
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    return path
