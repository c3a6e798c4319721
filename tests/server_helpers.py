"""Helpers for the server tests: model folders with manifests, a collapsed model, image bytes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from PIL import Image


def copy_model(src: Path, dst: Path, metrics: dict | None = None) -> Path:
    """A copy of a checkpoint folder, with a manifest.json holding ``metrics`` when given."""
    shutil.copytree(src, dst)
    if metrics is not None:
        (dst / "manifest.json").write_text(json.dumps({"metrics": metrics}))
    return dst


def collapsed_model(src: Path, dst: Path, word: str = "coral") -> Path:
    """A real checkpoint whose decoder always prefers one word: greedy decoding loops on it (DAMF's collapse)."""
    import torch
    from transformers import BertTokenizer, BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(src)
    tok = BertTokenizer.from_pretrained(src)
    token = tok.convert_tokens_to_ids(word)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[token] += 100.0
    model.save_pretrained(dst)
    for f in src.iterdir():
        if not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    return dst


def corrupt_copy(src: Path, dst: Path) -> Path:
    """A copy whose weights file is cut in half."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return dst


def png_bytes(size: tuple[int, int] = (64, 48), color=(10, 80, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()
