"""Shared fixtures: real tiny BLIP checkpoints built on the fly, and the real EUVP photos from ../shared."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REEFCAP_SHARED", REPO.parent / "shared"))
EUVP_RAW = SHARED / "data" / "euvp-test" / "raw"


@pytest.fixture(scope="session")
def euvp_images() -> list[Path]:
    images = sorted(EUVP_RAW.glob("*.jpg"), key=lambda p: int(p.stem))
    if not images:
        pytest.fail(f"no EUVP test images under {EUVP_RAW}; CI must have ../shared beside the clone")
    return images


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A freshly initialised tiny BLIP, exactly as `reefcap model init --kind tiny` writes it."""
    from reefcap.models.factory import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def varied_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its weights scaled up so its captions depend on the image.

    A fresh init (std 0.02) gives every image the same caption, which would let batching bugs that mix up
    images pass unnoticed.
    """
    import torch
    from transformers import BlipForConditionalGeneration

    out = tmp_path_factory.mktemp("varied") / "varied"
    model = BlipForConditionalGeneration.from_pretrained(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)
    for f in tiny_model.iterdir():
        if not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out
