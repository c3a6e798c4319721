"""The one loader (reefcap.models.load_engine): backend, dtype and threads settled by the same rules for every
entrypoint, water-type experts as registered backends, no engine swapping its class."""

from __future__ import annotations

import pytest

from reefcap.models.engines import backends
from reefcap.models.engines.base import EngineConfig
from reefcap.models.engines.loader import HEAVY_PARAMETERS, load_engine, thread_count
from reefcap.models.engines.manifests import checkpoint_kind, checkpoint_manifest, parameter_count
from reefcap.models.engines.precision import auto_dtype
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.errors import InvalidOptionsError, ModelLoadError

PRIMARY, EXPERTS = "reefscenes-tiny-damf", "reefscenes-tiny-guidg"


def test_thread_policy_keeps_a_core_for_a_light_model_and_gives_a_heavy_one_all():
    assert thread_count(0, 6_000_000, cores=2) == 1
    assert thread_count(0, 6_000_000, cores=8) == 7
    assert thread_count(0, None, cores=1) == 1  # never zero
    assert thread_count(0, HEAVY_PARAMETERS, cores=8) == 8
    assert thread_count(3, HEAVY_PARAMETERS, cores=8) == 3  # an explicit count stands


def test_parameter_count_reads_the_safetensors_headers(tiny_model):
    from transformers import BlipForConditionalGeneration

    expected = sum(p.numel() for p in BlipForConditionalGeneration.from_pretrained(tiny_model).parameters())
    # save_pretrained drops the tied LM-head weight, so the file may hold fewer tensors than the module lists
    counted = parameter_count(str(tiny_model))
    assert 0.9 * expected <= counted <= expected


def test_defaults_settle_to_onnx_with_the_stored_int8_rule_and_the_thread_policy():
    engine = load_engine(PRIMARY)  # every default: auto, auto, auto, 0
    try:
        info, config = engine.describe(), engine.config
        want, _ = auto_dtype(checkpoint_manifest(PRIMARY))  # int8 on the CPU kinds the record names, else fp32
        assert (info.name, info.backend, info.dtype, config.dtype) == (PRIMARY, "onnx", want, want)
        assert config.threads == thread_count(0, parameter_count(PRIMARY)) >= 1
    finally:
        engine.close()


def test_experts_checkpoints_load_through_their_registered_entries():
    assert checkpoint_kind(EXPERTS) == "experts" and checkpoint_kind(PRIMARY) == "blip"
    engine = load_engine(EXPERTS, backend="torch")
    assert type(engine) is backends.engine_class("torch", "experts") and engine.describe().backend == "torch"
    # The plain class no longer swaps itself for the experts one: it refuses, naming the way that works.
    with pytest.raises(ModelLoadError, match="experts checkpoint.*load_engine"):
        TorchCaptionEngine.load(EXPERTS, EngineConfig(device="cpu"))


def test_auto_backend_falls_back_to_pytorch_in_fp32(monkeypatch):
    class Broken(TorchCaptionEngine):
        backend = "onnx"

        @classmethod
        def load(cls, model, config=None):
            raise RuntimeError("no export for this checkpoint")

    monkeypatch.setitem(backends.BACKENDS, "onnx", f"{__name__}:Broken")
    globals()["Broken"] = Broken
    engine = load_engine("reefscenes-tiny", EngineConfig(device="cpu", dtype="int8"))
    assert (engine.describe().backend, engine.config.dtype) == ("torch", "fp32")
    with pytest.raises(RuntimeError, match="no export"):  # a backend asked for by name is not replaced
        load_engine("reefscenes-tiny", backend="onnx")


@pytest.mark.parametrize("field", [{"backend": "gpu"}, {"dtype": "int4"}, {"threads": -1}])
def test_bad_engine_config_is_refused_before_anything_loads(field):
    with pytest.raises(InvalidOptionsError):
        EngineConfig(**field)


def test_auto_backend_prefers_an_importable_onnx(monkeypatch):
    from reefcap.models.engines.loader import pick_backend

    monkeypatch.delitem(backends.BACKENDS, "onnx", raising=False)
    assert pick_backend("auto") == "torch"
    monkeypatch.setitem(backends.BACKENDS, "onnx", "reefcap.models.no_such_module:Engine")
    assert pick_backend("auto") == "torch"  # registered but its module does not import
    monkeypatch.setitem(backends.BACKENDS, "onnx", "reefcap.models.engines.torch_engine:TorchCaptionEngine")
    assert pick_backend("auto") == "onnx" and pick_backend("torch") == "torch"


def test_weights_differing_mid_file_get_their_own_version(tiny_model, tmp_path):
    """The version (and ONNX cache key) hashes whole files: a change far from either end of the weights file (a
    retrained middle layer) once kept the old version, and the export cache served the old model's graphs."""
    import shutil

    from reefcap.models.engines.manifests import weights_version

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) > 3 * 2**20, "the file must be longer than the 1 MiB ends the old hash read"
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_version(other) != weights_version(tiny_model)
