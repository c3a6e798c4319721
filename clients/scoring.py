"""Score batch captioning results against COCO-captions references (``reefcap caption --references``).

Predictions are matched to references by dataset image id when the inputs came from a COCO manifest, else
by the image file's resolved path. The metrics are the library's (:mod:`reefcap.models.metrics`), the ones
``reefcap eval`` reports, so a batch run and an evaluation give the same numbers; METEOR among them needs
pycocoevalcap and Java (the ``train`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reefcap.models.data.datasets import load_dataset
from reefcap.models.errors import ReefcapError
from reefcap.models.metrics import coco_metrics, collapse_metrics


def score_results(results: list[dict[str, Any]], ids: dict[str, Any], references: Path) -> dict[str, float]:
    """Caption metrics of the captioned records in ``results`` against the references' captions."""
    records = load_dataset(references)
    by_id = {r.image_id: r for r in records}
    by_path = {Path(r.path).resolve(): r for r in records}
    predictions: dict[Any, str] = {}
    for result in results:
        if "caption" not in result:
            continue
        ref = by_id.get(ids.get(result["image"])) or by_path.get(Path(result["image"]).resolve())
        if ref is not None:
            predictions[ref.image_id] = result["caption"]
    if not predictions:
        raise ReefcapError(f"{references}: none of the captioned images is in the references")
    metrics = coco_metrics(predictions, {r.image_id: list(r.captions) for r in records})
    metrics.update(collapse_metrics(list(predictions.values())))
    metrics["images"] = len(predictions)
    return metrics
