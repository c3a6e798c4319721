"""Resolving model names: bundled names, local directories, hub ids (no network here), unsafe weights."""

from __future__ import annotations

import time

import pytest

from reefcap.models import registry
from reefcap.models.errors import ModelLoadError, ModelNotFoundError
from reefcap.models.registry import resolve_model, zoo_models


def test_local_directory(tiny_model):
    resolved = resolve_model(str(tiny_model))
    assert resolved.origin == "local" and resolved.path == tiny_model.resolve() and resolved.name == "tiny"


def test_missing_directory_names_the_path():
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        resolve_model("./does-not-exist")


def test_file_instead_of_directory(tiny_model):
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(tiny_model / "config.json"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_pickle_only_weights_are_refused(tmp_path, tiny_model):
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        resolve_model(str(tmp_path))


def test_hub_id_without_network_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the hub must be asked
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="pass its local directory"):
        resolve_model("Salesforce/blip-image-captioning-base")
    assert time.monotonic() - start < 60


def test_bare_unknown_name_lists_bundled_models_and_never_asks_the_hub(monkeypatch):
    def no_hub(repo_id):
        raise AssertionError(f"asked the hub for {repo_id!r}")

    monkeypatch.setattr(registry, "_download", no_hub)
    with pytest.raises(ModelNotFoundError, match="not a bundled model name or a local directory") as info:
        resolve_model("reefscenes-tiny-dmaf")
    assert all(name in str(info.value) for name in zoo_models()) and "owner/name" in str(info.value)


def test_hub_id_with_owner_is_still_tried(monkeypatch):
    asked = []

    def offline_hub(repo_id):
        asked.append(repo_id)
        raise ModelNotFoundError(f"{repo_id}: offline")

    monkeypatch.setattr(registry, "_download", offline_hub)
    with pytest.raises(ModelNotFoundError, match="offline"):
        resolve_model("someone/some-blip")
    assert asked == ["someone/some-blip"]
