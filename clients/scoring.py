"""Score batch captioning results against COCO-captions references (``reefcap caption --references``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def score_results(results: list[dict[str, Any]], ids: dict[str, Any], references: Path) -> dict[str, float]:
    """Caption metrics of the captioned records against the references' captions."""
    raise NotImplementedError("wired to reefcap.training evaluation when it lands")
