"""Shared fixtures: real tiny BLIP checkpoints built on the fly, and the real EUVP photos shipped in examples/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def euvp_images() -> list[Path]:
    from reefcap.models.samples import sample_photos

    return sample_photos("raw")


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


@pytest.fixture(scope="module")
def synthetic_size() -> int:
    """Images in ``synthetic``; a module overrides this fixture to use another count."""
    return 16


@pytest.fixture(scope="module")
def synthetic(synthetic_size, tmp_path_factory) -> Path:
    """A COCO-captions dataset of coloured shapes, two captions per image (tests/synthetic_captions.py)."""
    from synthetic_captions import make_dataset

    return make_dataset(tmp_path_factory.mktemp("syn"), n=synthetic_size)


@pytest.fixture(scope="module")
def small_model(synthetic, tmp_path_factory) -> Path:
    """A BLIP smaller than ``tiny_model``, its vocabulary from ``synthetic``'s captions: a training step costs ms."""
    from synthetic_captions import all_captions

    from reefcap.models.factory import TinyConfig, init_tiny

    cfg = TinyConfig(image_size=32, vision_hidden=64, text_hidden=64, vision_layers=2, text_layers=2, vocab_size=300)
    return init_tiny(tmp_path_factory.mktemp("m") / "m", all_captions(synthetic), cfg)


@pytest.fixture(scope="module")
def engines(varied_model, tiny_model, tmp_path_factory):
    """The server tests' engines (test_server_app, test_server_reload): a model that varies by image, the fresh
    tiny one, one that collapses into repetition, and one whose every generate call raises."""
    from server_helpers import collapsed_model, copy_model, unchecked_engine_class

    from reefcap.models.engines.base import EngineConfig
    from reefcap.models.engines.torch_engine import TorchCaptionEngine
    from reefcap.models.factory import TinyConfig, init_tiny

    CPU, SHORT = EngineConfig(device="cpu"), TinyConfig(max_positions=16)
    root = tmp_path_factory.mktemp("server-models")
    varied = copy_model(varied_model, root / "varied-m", {"underwater": {"CIDEr": 0.5, "Bleu_4": 0.2}})
    return {
        "varied": TorchCaptionEngine.load(str(varied), CPU),
        "tiny": TorchCaptionEngine.load(str(tiny_model), CPU),
        "collapsed": TorchCaptionEngine.load(str(collapsed_model(tiny_model, root / "collapsed")), CPU),
        # max 16 positions, unchecked: the default max_length of 20 makes every generate call raise IndexError
        "short": unchecked_engine_class().load(str(init_tiny(root / "short", config=SHORT)), CPU),
        "root": root,
    }


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's binaries, as an unprivileged user) for the session: skipped where the
    package is missing, failed on CI, whose .ci/run installs it."""
    from pg_helpers import PostgresServer, postgres_bin

    if postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with PostgresServer() as server:
        yield server
