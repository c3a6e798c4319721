"""Score batch captioning results against COCO-captions references (``reefcap caption --references``).

Predictions are matched to references by dataset image id when the inputs came from a COCO manifest, else
by the image file's resolved path. The metrics are the training package's (pycocoevalcap + collapse
indicators), so a batch run and ``reefcap eval`` report the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reefcap.models.errors import ReefcapError


def score_results(results: list[dict[str, Any]], ids: dict[str, Any], references: Path) -> dict[str, float]:
    """Caption metrics of the captioned records in ``results`` against the references' captions."""
    try:
        from reefcap.training.datasets import load_dataset
        from reefcap.training.evaluation import coco_metrics, collapse_metrics
    except ImportError as exc:
        raise ReefcapError(f"--references needs the training extra: pip install 'reefcap[train]' ({exc})") from None

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
