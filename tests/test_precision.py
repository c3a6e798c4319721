"""dtype ``auto``: int8 only for a checkpoint whose stored int8/fp32 agreement holds on this kind of CPU."""

from __future__ import annotations

import json

from reefcap.models.engines.precision import AGREEMENT_KEY, auto_dtype, cpu_flags
from reefcap.models.export.onnx import INT8_SCHEME
from reefcap.models.registry import zoo_models
from reefcap.server.pool import engine_config
from reefcap.server.settings import ServerSettings


def bundled(name: str) -> dict:
    return json.loads((zoo_models()[name] / "manifest.json").read_text())


def test_the_bundled_primary_is_int8_on_avx2_and_vnni_cpus_only():
    manifest = bundled("reefscenes-tiny-damf")
    assert manifest[AGREEMENT_KEY]["int8_scheme"] == INT8_SCHEME  # the record is for the export made today
    assert auto_dtype(manifest, {"avx2", "fma"})[0] == "int8"
    assert auto_dtype(manifest, {"avx512f", "avx512_vnni"})[0] == "int8"
    dtype, why = auto_dtype(manifest, {"sse4_2"})  # an x86 CPU neither kind was measured on (or an ARM one)
    assert dtype == "fp32" and "this CPU has none of them" in why


def test_fp32_without_a_record_an_old_scheme_or_a_low_figure():
    assert auto_dtype(bundled("reefscenes-tiny"), {"avx2"}) == (
        "fp32",
        "no stored int8 agreement in the checkpoint's manifest",
    )
    record = dict(bundled("reefscenes-tiny-damf")[AGREEMENT_KEY])
    assert auto_dtype({AGREEMENT_KEY: {**record, "int8_scheme": "dynamic-u8s8"}}, {"avx2"})[0] == "fp32"
    low, why = auto_dtype({AGREEMENT_KEY: {**record, "identical": 0.94}}, {"avx2"})
    assert low == "fp32" and "0.94" in why


def test_server_settings_resolve_auto_per_model(tmp_path):
    settings = ServerSettings(_env_file=None, feedback_db=tmp_path / "fb.sqlite3", device="cpu")
    assert settings.dtype == "auto"
    expected = "int8" if cpu_flags() & {"avx2", "avx512_vnni"} else "fp32"
    assert engine_config(settings, "reefscenes-tiny-damf").dtype == expected
    assert engine_config(settings, "reefscenes-tiny").dtype == "fp32"
    assert engine_config(settings).dtype == "fp32"  # no model named (a hot reload): fp32
    torch_only = settings.model_copy(update={"backend": "torch"})
    assert engine_config(torch_only, "reefscenes-tiny-damf").dtype == "fp32"
    explicit = settings.model_copy(update={"dtype": "fp32"})
    assert engine_config(explicit, "reefscenes-tiny-damf").dtype == "fp32"


def test_int8_chosen_for_onnx_falls_back_to_fp32_pytorch(monkeypatch):
    """backend auto: when the ONNX backend cannot load the model, PyTorch serves it, in fp32 (int8 is an export)."""
    from reefcap.models.engines.base import EngineConfig
    from reefcap.server import pool

    calls = []

    def load_engine(model, backend, config):
        calls.append((backend, config.dtype))
        if backend == "onnx":
            raise RuntimeError("no export for this checkpoint")
        return "an engine"

    monkeypatch.setattr(pool, "load_engine", load_engine)
    monkeypatch.setattr(pool, "fastest_backend", lambda: "onnx")
    assert pool.load_model("m", "auto", EngineConfig(dtype="int8")) == "an engine"
    assert calls == [("onnx", "int8"), ("torch", "fp32")]
