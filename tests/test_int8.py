"""The int8 export of the bundled DAMF model: close to fp32, and the same captions on every x86 CPU.

ONNX Runtime's u8s8 kernels differ by CPU: with AVX-512 VNNI (VPDPBUSD) products accumulate in int32, on AVX2
alone (VPMADDUBSW) two products are summed in int16 first and saturate. The export keeps its weights in 7 bits
so that no pair can saturate; the emulated-CPU test runs the AVX2 kernels whatever CPU runs the suite.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.onnx_engine import OnnxCaptionEngine
from reefcap.models.engines.precision import cpu_flags
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.export.onnx import DECODER, ENCODER, INT8_SCHEME, INT8_WEIGHT_RANGE, export_onnx, read_manifest

MODEL = "reefscenes-tiny-damf"  # a trained model: a random one's logits are near-ties everywhere
# Measured on both kinds of CPU: 22/23 of these photos, 214/225 on the ReefScenes underwater test split
# (docs/onnx-parity.md). The 8-bit weights that saturate gave 15/23 on an AVX2-only CPU.
MIN_AGREEMENT = 0.85
EMULATED_CPU = "EPYC-Rome"  # QEMU's Zen 2 model: AVX2 and FMA, no AVX-512, no VNNI


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory) -> Path:
    return export_onnx(MODEL, tmp_path_factory.mktemp("int8") / "int8", "int8")


@pytest.fixture(scope="module")
def fp32_captions(euvp_images) -> list[str]:
    engine = TorchCaptionEngine.load(MODEL, EngineConfig(device="cpu"))
    return [c.caption for c in engine.caption(euvp_images, DecodeOptions.greedy())]


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def test_int8_weights_fit_in_7_bits(int8_export):
    """The property the portability rests on, checked on the graphs themselves (so on any CPU)."""
    assert read_manifest(int8_export)["int8_scheme"] == INT8_SCHEME
    lo, hi = INT8_WEIGHT_RANGE
    for graph in (ENCODER, DECODER):
        model = onnx.load(str(int8_export / graph))
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        ops = [n for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
        assert len(ops) >= 8, graph  # the feed-forward and attention-output projections really are int8
        for node in ops:
            w = weights[node.input[1]]
            assert str(w.dtype) == "int8" and lo <= w.min() and w.max() <= hi, (graph, node.name)


def test_int8_agreement(int8_export, fp32_captions, euvp_images):
    """The int8 export agrees with PyTorch fp32 on most greedy captions, on the CPU running the suite."""
    int8 = OnnxCaptionEngine.load(str(int8_export), EngineConfig(device="cpu", dtype="int8", threads=1))
    got = [c.caption for c in int8.caption(euvp_images, DecodeOptions.greedy())]
    print(f"int8 vs torch fp32 identical greedy captions: {agreement(fp32_captions, got):.1%} of {len(got)}")
    assert agreement(fp32_captions, got) >= MIN_AGREEMENT
    assert int8.describe().dtype == "int8"


# Run under the emulated CPU: first a MatMulInteger whose 8-bit weights must saturate if ORT really chose its
# AVX2 kernel (else the test proves nothing), then the export's greedy captions.
EMULATED = """
import json, sys
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.onnx_engine import OnnxCaptionEngine

io = [helper.make_tensor_value_info(n, t, s) for n, t, s in
      (("A", TensorProto.UINT8, [1, 64]), ("B", TensorProto.INT8, [64, 1]), ("Y", TensorProto.INT32, [1, 1]))]
graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe", io[:2], io[2:])
probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
y = session.run(None, {"A": np.full((1, 64), 255, np.uint8), "B": np.full((64, 1), 127, np.int8)})[0]
engine = OnnxCaptionEngine.load(sys.argv[1], EngineConfig(device="cpu", dtype="int8", threads=1))
captions = [c.caption for c in engine.caption(sys.argv[2:], DecodeOptions.greedy())]
print(json.dumps({"saturates": int(y[0, 0]) != 64 * 255 * 127, "captions": captions}))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU for an x86-64 Python")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-user (apt-get install qemu-user)")
@pytest.mark.skipif(
    not cpu_flags() & {"avx512_vnni", "avx_vnni"},
    reason="this CPU has no VNNI: test_int8_agreement already ran ORT's AVX2 kernels natively",
)
@pytest.mark.heavy  # Python under qemu's CPU emulation
def test_int8_agreement_on_an_avx2_cpu_without_vnni(int8_export, fp32_captions, euvp_images):
    """The same agreement on an AVX2-only CPU (QEMU user-mode emulation, ~1 min): the saturating kernels run."""
    cmd = ["qemu-x86_64", "-cpu", EMULATED_CPU, sys.executable, "-c", EMULATED, str(int8_export)]
    done = subprocess.run([*cmd, *map(str, euvp_images)], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["saturates"], "the emulated CPU did not run ORT's AVX2 u8s8 kernel"
    print(f"emulated {EMULATED_CPU}: {agreement(fp32_captions, result['captions']):.1%} of {len(euvp_images)}")
    assert agreement(fp32_captions, result["captions"]) >= MIN_AGREEMENT


def test_an_older_8_bit_export_loads_with_a_warning(int8_export, tmp_path, caplog):
    """Exports made before the 7-bit range still load (their hashes hold) but say they may saturate."""
    old = tmp_path / "old-int8"
    shutil.copytree(int8_export, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["int8_scheme"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="reefcap.models"):
        OnnxCaptionEngine.load(str(old), EngineConfig(device="cpu", dtype="int8", threads=1))
    assert "export it again" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="reefcap.models"):
        OnnxCaptionEngine.load(str(int8_export), EngineConfig(device="cpu", dtype="int8", threads=1))
    assert "export it again" not in caplog.text


def test_the_export_cache_does_not_reuse_an_older_int8_scheme(int8_export, tmp_path, monkeypatch):
    from reefcap.models.engines.torch_engine import weights_version
    from reefcap.models.export.onnx import cache_root, cached_export
    from reefcap.models.registry import resolve_model

    monkeypatch.setenv("REEFCAP_CACHE", str(tmp_path / "cache"))
    version = weights_version(resolve_model(MODEL).path)
    shutil.copytree(int8_export, cache_root() / f"{version}-int8")  # where an older reefcap cached its int8
    current = cache_root() / f"{version}-int8-{INT8_SCHEME}"
    shutil.copytree(int8_export, current)
    assert cached_export(MODEL, "int8") == current


def test_the_export_cache_replaces_an_entry_of_an_older_export_format(int8_export, tmp_path, monkeypatch):
    """A cache entry a reefcap with another graph format wrote would fail every load; it is exported anew."""
    from reefcap.models.engines.torch_engine import weights_version
    from reefcap.models.export import onnx as onnx_export
    from reefcap.models.registry import resolve_model

    monkeypatch.setenv("REEFCAP_CACHE", str(tmp_path / "cache"))
    entry = onnx_export.cache_root() / f"{weights_version(resolve_model(MODEL).path)}-int8-{INT8_SCHEME}"
    shutil.copytree(int8_export, entry)
    assert onnx_export.cached_export(MODEL, "int8") == entry  # the current format is reused as it is
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "format": "reefcap-onnx/0"}))
    exported = []
    monkeypatch.setattr(onnx_export, "export_onnx", lambda model, out, precision: exported.append(out) or out)
    assert onnx_export.cached_export(MODEL, "int8") == entry and exported == [entry]
