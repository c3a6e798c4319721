"""ONNX export and the ONNX Runtime engine on a real tiny BLIP: parity with PyTorch, golden output, int8, caching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reefcap.models.engines.backends import BACKENDS
from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.loader import load_engine
from reefcap.models.engines.onnx_engine import OnnxCaptionEngine
from reefcap.models.engines.torch_engine import TorchCaptionEngine, weights_version
from reefcap.models.errors import ModelLoadError
from reefcap.models.export.onnx import DECODER, ENCODER, MANIFEST, export_onnx, read_manifest

GOLDEN = Path(__file__).parent / "golden" / "onnx_golden_greedy.json"


@pytest.fixture(scope="module")
def exported(varied_model, tmp_path_factory) -> Path:
    return export_onnx(str(varied_model), tmp_path_factory.mktemp("onnx") / "fp32")


@pytest.fixture(scope="module")
def onnx_engine(exported) -> OnnxCaptionEngine:
    return OnnxCaptionEngine.load(str(exported), EngineConfig(device="cpu", threads=1))


@pytest.fixture(scope="module")
def torch_engine(varied_model) -> TorchCaptionEngine:
    return TorchCaptionEngine.load(str(varied_model), EngineConfig(device="cpu"))


def test_registered_backend():
    assert BACKENDS["onnx"] == "reefcap.models.engines.onnx_engine:OnnxCaptionEngine"


def test_manifest_and_graph_interface(exported, varied_model):
    import onnxruntime as ort

    manifest = read_manifest(exported)
    assert manifest["precision"] == "fp32" and manifest["opset"] == 17
    assert manifest["source"]["path"] == str(varied_model) and manifest["source"]["name"] == "varied"
    assert manifest["weights_version"] == weights_version(varied_model)
    assert set(manifest["files"]) == {ENCODER, DECODER} and all(len(h) == 64 for h in manifest["files"].values())
    layers = manifest["decoder"]["layers"]
    enc = ort.InferenceSession(str(exported / ENCODER), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(exported / DECODER), providers=["CPUExecutionProvider"])
    cross = [f"cross_{k}_{i}" for i in range(layers) for k in ("key", "value")]
    # The image reaches the decoder only as the cross-attention keys/values the encoder computed once.
    assert [o.name for o in enc.get_outputs()] == cross
    inputs = [i.name for i in dec.get_inputs()]
    assert inputs == ["input_ids", "beam_idx", *[c.replace("cross", "past") for c in cross], *cross]
    assert [o.name for o in dec.get_outputs()] == ["logits", *[c.replace("cross", "present") for c in cross]]
    # Dynamic batch: the encoder runs on 1 and on 3 images.
    size = manifest["image_size"]
    for n in (1, 3):
        out = enc.run(None, {"pixel_values": np.zeros((n, 3, size, size), np.float32)})
        assert out[0].shape[0] == n


def test_tampered_export_is_rejected(exported, tmp_path):
    import shutil

    copy = Path(shutil.copytree(exported, tmp_path / "copy"))
    with (copy / DECODER).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelLoadError, match="does not match its hash"):
        OnnxCaptionEngine.load(str(copy), EngineConfig(device="cpu"))


def test_greedy_identical_to_torch(onnx_engine, torch_engine, euvp_images):
    ref = torch_engine.caption(euvp_images, DecodeOptions.greedy())
    got = onnx_engine.caption(euvp_images, DecodeOptions.greedy())
    assert len({c.caption for c in ref}) >= 3, "captions must differ by image or this test proves nothing"
    assert [c.caption for c in got] == [c.caption for c in ref]
    assert [c.tokens for c in got] == [c.tokens for c in ref]
    for g, r in zip(got, ref, strict=True):
        assert g.confidence == pytest.approx(r.confidence, abs=1e-4)
        assert g.model == r.model


def test_beam_search_identical_to_torch(onnx_engine, torch_engine, euvp_images):
    options = DecodeOptions(num_beams=3)
    ref = torch_engine.caption(euvp_images, options)
    got = onnx_engine.caption(euvp_images, options)
    assert len({c.caption for c in ref}) >= 3
    assert [c.caption for c in got] == [c.caption for c in ref]
    for g, r in zip(got, ref, strict=True):
        assert g.confidence == pytest.approx(r.confidence, abs=1e-4) and g.tokens == r.tokens


def test_min_length_and_repetition_penalty_match_torch(onnx_engine, torch_engine, euvp_images):
    penalised = DecodeOptions.greedy(min_length=12, repetition_penalty=1.3)
    for options in (penalised, DecodeOptions(num_beams=2, max_length=9)):
        ref = torch_engine.caption(euvp_images[:6], options)
        got = onnx_engine.caption(euvp_images[:6], options)
        assert [(c.caption, c.tokens) for c in got] == [(c.caption, c.tokens) for c in ref]


@pytest.mark.parametrize("early_stopping, length_penalty", [(True, 0.6), ("never", 1.5)])
def test_beam_settings_from_generation_config_match_torch(
    varied_model, euvp_images, tmp_path, early_stopping, length_penalty
):
    """Early stopping and the length penalty come from the checkpoint's generation config, as in HF."""
    import shutil

    model = Path(shutil.copytree(varied_model, tmp_path / "varied"))
    config = json.loads((model / "generation_config.json").read_text())
    config.update(early_stopping=early_stopping, length_penalty=length_penalty)
    (model / "generation_config.json").write_text(json.dumps(config))
    folder = export_onnx(str(model), tmp_path / "onnx")
    assert read_manifest(folder)["generation"] == {"early_stopping": early_stopping, "length_penalty": length_penalty}
    options = DecodeOptions(num_beams=4, min_length=2)
    ref = TorchCaptionEngine.load(str(model)).caption(euvp_images[:8], options)
    got = OnnxCaptionEngine.load(str(folder), EngineConfig(device="cpu", threads=1)).caption(euvp_images[:8], options)
    assert [(c.caption, c.tokens) for c in got] == [(c.caption, c.tokens) for c in ref]


def test_batched_equals_one_by_one(onnx_engine, euvp_images):
    batched = onnx_engine.caption(euvp_images[:6], DecodeOptions.greedy())
    single = [onnx_engine.caption([p], DecodeOptions.greedy())[0] for p in euvp_images[:6]]
    assert [c.caption for c in batched] == [c.caption for c in single]


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory) -> Path:
    """A small BLIP that is the same in every run, unlike the factory's (its WordPiece training is not
    deterministic): a fixed vocabulary, seeded init, weights perturbed as in ``varied_model``."""
    import string

    import torch
    from transformers import BertTokenizer, BlipForConditionalGeneration

    from reefcap.models.factory import DEFAULT_CORPUS, _blip_config, _save

    words = sorted({w for line in DEFAULT_CORPUS for w in line.split() if len(w) > 1})
    letters = list(string.ascii_lowercase)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *[f"##{c}" for c in letters], *words]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    shape = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(shape, image_size=64, patch_size=16)
    text = dict(shape, encoder_hidden_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(_blip_config(tokenizer, vision, text, 0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.15)
    return _save(model, tokenizer, 64, tmp_path_factory.mktemp("golden") / "golden", {"kind": "golden-test"})


def test_golden_output(golden_model, euvp_images, tmp_path):
    """Guards the export: captions and confidences of a fixed exported model on real photos, which PyTorch agrees on.

    Regenerate after an intended change with ``REEFCAP_UPDATE_GOLDEN=1 pytest tests/test_onnx.py -k golden``.
    """
    engine = OnnxCaptionEngine.load(str(export_onnx(str(golden_model), tmp_path / "g")), EngineConfig(device="cpu"))
    captions = engine.caption(euvp_images[:8], DecodeOptions.greedy())
    ref = TorchCaptionEngine.load(str(golden_model)).caption(euvp_images[:8], DecodeOptions.greedy())
    assert [c.caption for c in captions] == [c.caption for c in ref]
    got = [[c.caption, c.confidence, c.tokens] for c in captions]
    if os.environ.get("REEFCAP_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len({g[0] for g in golden}) >= 3, "golden captions must differ by image"
    assert [g[0] for g in got] == [g[0] for g in golden]
    assert [g[2] for g in got] == [g[2] for g in golden]
    assert np.allclose([g[1] for g in got], [g[1] for g in golden], atol=1e-3)


def test_export_on_first_use_is_cached(varied_model, tmp_path, monkeypatch, euvp_images):
    monkeypatch.setenv("REEFCAP_CACHE", str(tmp_path / "cache"))
    engine = load_engine(str(varied_model), EngineConfig(backend="onnx", device="cpu"))
    folder = engine.folder
    assert folder.parent == tmp_path / "cache" / "onnx" and (folder / MANIFEST).is_file()
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    again = load_engine(str(varied_model), EngineConfig(backend="onnx", device="cpu"))
    assert again.folder == folder and (folder / MANIFEST).stat().st_mtime_ns == stamp
    info = again.describe()
    assert info.backend == "onnx" and info.device == "cpu" and info.version == weights_version(varied_model)
    assert len(again.caption(euvp_images[:2], DecodeOptions.greedy())) == 2


def test_checkpoint_with_its_own_manifest_is_exported_not_mistaken_for_an_export(
    varied_model, exported, tmp_path, monkeypatch, euvp_images
):
    """Bundled zoo checkpoints carry a manifest.json (recipe, metrics) that is not an ONNX export manifest."""
    import shutil

    checkpoint = tmp_path / "zoo-like"
    shutil.copytree(varied_model, checkpoint)
    (checkpoint / "manifest.json").write_text('{"metrics": {"underwater": {"CIDEr": 0.5}}}')
    # Seed the cache with the export the module already made of these very weights: no second export needed.
    monkeypatch.setenv("REEFCAP_CACHE", str(tmp_path / "cache"))
    shutil.copytree(exported, tmp_path / "cache" / "onnx" / f"{weights_version(checkpoint)}-fp32")
    engine = load_engine(str(checkpoint), EngineConfig(backend="onnx", device="cpu"))
    assert engine.folder.parent == tmp_path / "cache" / "onnx"
    assert len(engine.caption(euvp_images[:1], DecodeOptions.greedy())) == 1


def test_decoder_reshapes_take_constant_shapes(exported):
    """Each decoding step runs every node of the decoder, and ORT pays per node whatever the batch: the graphs
    build their reshapes from constants, not from Shape -> Gather -> Unsqueeze -> Concat chains per reshape
    (revision 1 exported 634 nodes besides constants for 4 layers, 94 of them Shape and 119 Unsqueeze)."""
    import onnx

    graph = onnx.load(str(exported / DECODER)).graph
    layers = read_manifest(exported)["decoder"]["layers"]
    ops = [n.op_type for n in graph.node]
    # Per layer: one Shape for the image-count fold of the cross-attention queries and one for its way back.
    assert ops.count("Shape") <= 2 * layers + 2, ops.count("Shape")
    assert ops.count("Unsqueeze") <= 4 and ops.count("Pow") == 0  # no per-attention sqrt of a traced width
    work = [op for op in ops if op not in ("Constant", "Identity")]
    assert len(work) <= 70 * layers, len(work)
    assert read_manifest(exported)["graphs"] == 2


def test_a_cache_entry_with_older_graphs_is_exported_again(varied_model, exported, tmp_path, monkeypatch):
    """An export made by an older reefcap loads and answers the same, but the cache replaces it with today's
    faster graphs; an export folder given by path is used as it is."""
    import shutil

    from reefcap.models.export.onnx import cached_export

    monkeypatch.setenv("REEFCAP_CACHE", str(tmp_path / "cache"))
    entry = tmp_path / "cache" / "onnx" / f"{weights_version(varied_model)}-fp32"
    shutil.copytree(exported, entry)
    manifest = json.loads((entry / MANIFEST).read_text())
    del manifest["graphs"]  # as revision 1 wrote it
    (entry / MANIFEST).write_text(json.dumps(manifest))
    assert cached_export(str(entry)) == entry  # by path: as given
    assert read_manifest(entry, verify=False).get("graphs") is None
    assert cached_export(str(varied_model)) == entry
    assert read_manifest(entry)["graphs"] == 2


def test_unsupported_dtype_is_a_clear_error(exported):
    with pytest.raises(ModelLoadError, match="onnx backend runs"):
        OnnxCaptionEngine.load(str(exported), EngineConfig(device="cpu", dtype="bf16"))


def reefcap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reefcap.cli", *args], capture_output=True, text=True, timeout=240)


def test_cli_export_errors_are_one_line(tmp_path):
    result = reefcap("export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.startswith("reefcap: error:") and "Traceback" not in result.stderr


def test_cli_bench_writes_table(varied_model, tmp_path, monkeypatch):
    monkeypatch.setenv("REEFCAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.md"
    result = reefcap(
        *("bench", "--model", str(varied_model), "--batch-sizes", "1,4", "--engines", "onnx:cpu:fp32"),
        *("--budget", "0.1", "--repeats", "2", "--naive-images", "2", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["engine"], r["batch"]) for r in rows] == [("naive pipeline", 1), ("onnx", 1), ("onnx", 4)]
    assert all(r["images_per_s"] > 0 and r["speedup"] > 0 for r in rows)
    table = out.read_text()
    assert "| varied | naive pipeline | cpu | fp32 | 1 |" in table and table.count("| varied | onnx |") == 2


def test_io_binding_runner_and_fp16_graphs_on_cpu(varied_model, exported, onnx_engine, euvp_images, tmp_path):
    """The CUDA path's pieces that run without a GPU: the I/O-binding runner (on the CPU provider) and fp16 graphs."""
    from reefcap.models.engines.onnx_engine import _BoundRunner

    ref = onnx_engine.caption(euvp_images[:8], DecodeOptions(num_beams=3))
    bound = OnnxCaptionEngine.load(str(exported), EngineConfig(device="cpu", threads=1))
    bound.runner = _BoundRunner(exported, bound.manifest, 1, "cpu", 0)
    assert [c.caption for c in bound.caption(euvp_images[:8], DecodeOptions(num_beams=3))] == [c.caption for c in ref]

    folder = export_onnx(str(varied_model), tmp_path / "fp16", "fp16")
    fp16 = OnnxCaptionEngine.load(str(folder), EngineConfig(device="cpu", dtype="fp16", threads=1))
    assert fp16.runner.kv_dtype == np.float16
    got = fp16.caption(euvp_images[:8], DecodeOptions(num_beams=3))
    assert sum(a.caption == b.caption for a, b in zip(ref, got, strict=True)) >= 6


@pytest.mark.gpu
def test_cuda_fp16_io_binding_agrees_with_cpu(varied_model, onnx_engine, euvp_images, tmp_path, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider (install the gpu extra)")
    monkeypatch.setenv("REEFCAP_CACHE", str(tmp_path / "cache"))
    gpu = OnnxCaptionEngine.load(str(varied_model), EngineConfig(device="cuda", dtype="fp16"))
    assert gpu.describe().device == "cuda:0" and gpu.describe().dtype == "fp16"
    ref = onnx_engine.caption(euvp_images, DecodeOptions.greedy())
    for options in (DecodeOptions.greedy(), DecodeOptions(num_beams=3)):
        got = gpu.caption(euvp_images, options)
        assert len(got) == len(euvp_images)
    got = gpu.caption(euvp_images, DecodeOptions.greedy())
    assert sum(a.caption == b.caption for a, b in zip(ref, got, strict=True)) >= 0.7 * len(ref)


@pytest.mark.slow
def test_blip_base_shape_export_matches_torch(tmp_path_factory, euvp_images):
    """The real BLIP-base shape (224 M parameters, 577 image tokens, 12 layers) exports and decodes like PyTorch."""
    from reefcap.models.factory import init_blip_base_shape

    model = init_blip_base_shape(tmp_path_factory.mktemp("base") / "blip-base-shape")
    folder = export_onnx(str(model), tmp_path_factory.mktemp("base-onnx") / "fp32")
    assert read_manifest(folder)["decoder"] == {
        **read_manifest(folder)["decoder"],
        "layers": 12,
        "heads": 12,
        "head_dim": 64,
        "vocab_size": 30524,
    }
    options = DecodeOptions.greedy(min_length=12, max_length=12)
    ref = TorchCaptionEngine.load(str(model)).caption(euvp_images[:2], options)
    got = OnnxCaptionEngine.load(str(folder), EngineConfig(device="cpu")).caption(euvp_images[:2], options)
    assert [(c.caption, c.tokens) for c in got] == [(c.caption, c.tokens) for c in ref]
    for g, r in zip(got, ref, strict=True):
        assert g.confidence == pytest.approx(r.confidence, abs=1e-3)
