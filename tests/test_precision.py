"""dtype ``auto``: int8 only for a checkpoint whose stored int8/fp32 agreement holds on this kind of CPU."""

from __future__ import annotations

import json

from reefcap.models.engines.loader import settle
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


def test_server_settings_resolve_auto_per_model_at_start_and_on_reload(tmp_path):
    """The server's one config, settled per model by the loader: a reload (any model) gets what start-up gets."""
    settings = ServerSettings(_env_file=None, feedback_db=tmp_path / "fb.sqlite3", device="cpu")
    config = engine_config(settings)
    assert settings.dtype == config.dtype == "auto"
    expected = "int8" if cpu_flags() & {"avx2", "avx512_vnni"} else "fp32"
    assert settle("reefscenes-tiny-damf", config, "onnx").dtype == expected
    assert settle("reefscenes-tiny", config, "onnx").dtype == "fp32"  # no stored agreement
    assert settle("reefscenes-tiny-damf", config, "torch").dtype == "fp32"  # int8 is an ONNX export
    explicit = engine_config(settings.model_copy(update={"dtype": "fp32"}))
    assert settle("reefscenes-tiny-damf", explicit, "onnx").dtype == "fp32"
