"""Export a BLIP captioner to ONNX: the two graphs of :mod:`reefcap.models.engines.graphs` (image encoder, KV-cached
decoder), traced with torch's exporter, in the format :mod:`reefcap.models.engines.onnx_format` describes.

The folder also holds the processor files (tokenizer, image preprocessing) and ``manifest.json`` with the source
checkpoint, opset, precision and file hashes. Only the export needs torch; the runtime engine does not. Exports
made on first use are cached by weights hash, precision and int8 scheme (:func:`cached_export`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from reefcap.models.engines.manifests import weights_version
from reefcap.models.engines.onnx_format import (
    DECODER,
    ENCODER,
    FORMAT,
    GRAPHS,
    INT8_SCHEME,
    INT8_WEIGHT_RANGE,
    MANIFEST,
    OPSET,
    PRECISIONS,
    WEIGHTS_OUTPUT,
    cache_root,
    is_export,
    read_manifest,
)
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import ResolvedModel, resolve_model, sha256_file

# The format's names, for callers that export and then read (tests, ``reefcap export``).
__all__ = [
    "DECODER",
    "ENCODER",
    "FORMAT",
    "GRAPHS",
    "INT8_SCHEME",
    "INT8_WEIGHT_RANGE",
    "MANIFEST",
    "OPSET",
    "PRECISIONS",
    "cache_root",
    "cached_export",
    "export_onnx",
    "is_export",
    "read_manifest",
]


def _export_graphs(blip: Any, out: Path, opset: int, experts: Any = None) -> None:
    """Write both graphs; with ``experts`` (water-type experts, see ``experts_graphs``) the encoder also outputs
    the fusion weights and the decoder's embedding table holds the experts' context rows."""
    import torch

    from reefcap.models.engines.experts_graphs import experts_decoder, experts_encoder
    from reefcap.models.engines.graphs import DecoderGraph, EncoderGraph

    cfg = blip.config
    n_layers = cfg.text_config.num_hidden_layers
    n_heads = cfg.text_config.num_attention_heads
    head_dim = cfg.text_config.hidden_size // n_heads
    size = cfg.vision_config.image_size
    tokens = (size // cfg.vision_config.patch_size) ** 2 + 1

    layer_names = [f"{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    cross_names = [f"cross_{n}" for n in layer_names]
    past_names = [f"past_{n}" for n in layer_names]
    present_names = [f"present_{n}" for n in layer_names]

    pixels = torch.randn(2, 3, size, size)
    encoder = experts_encoder(blip, experts) if experts is not None else EncoderGraph(blip).eval()
    decoder = experts_decoder(blip, experts) if experts is not None else DecoderGraph(blip).eval()
    enc_names = [WEIGHTS_OUTPUT, *cross_names] if experts is not None else cross_names
    with torch.inference_mode():
        _onnx_export(
            encoder,
            (pixels,),
            out / ENCODER,
            opset,
            ["pixel_values"],
            enc_names,
            {"pixel_values": {0: "images"}, **{n: {0: "images"} for n in enc_names}},
        )
        # Trace with 2 images x 2 beams and a non-empty cache so no dimension is specialised to a constant.
        rows, past_len = 4, 3
        ids = torch.randint(0, cfg.text_config.vocab_size, (rows, 2))
        beam_idx = torch.tensor([1, 0, 3, 2])
        past = [torch.randn(rows, n_heads, past_len, head_dim) for _ in past_names]
        cross = [torch.randn(2, n_heads, tokens, head_dim) for _ in cross_names]
        axes: dict[str, dict[int, str]] = {"input_ids": {0: "rows", 1: "new"}, "beam_idx": {0: "rows"}}
        axes.update({n: {0: "rows", 2: "past"} for n in past_names})
        axes.update({n: {0: "images", 2: "image_tokens"} for n in cross_names})
        axes.update({"logits": {0: "rows"}, **{n: {0: "rows", 2: "total"} for n in present_names}})
        _onnx_export(
            decoder,
            (ids, beam_idx, *past, *cross),
            out / DECODER,
            opset,
            ["input_ids", "beam_idx", *past_names, *cross_names],
            ["logits", *present_names],
            axes,
        )


def _onnx_export(module, args, path: Path, opset: int, inputs, outputs, axes) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which cannot yet trace the
        # data-dependent reshapes of the merged decoder with dynamic batch; it is still the reliable path here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _setting(config: Any, name: str, default: Any) -> Any:
    """A generation-config field, or the value transformers falls back to when it is unset (None)."""
    value = getattr(config, name, None)
    return default if value is None else value


def _manifest(resolved: ResolvedModel, blip: Any, experts: Any, precision: str, opset: int, folder: Path) -> dict:
    """What ``manifest.json`` records of an export: its source, precision, decoder shape and file hashes."""
    import onnx
    import torch
    import transformers

    text = blip.config.text_config
    gen = getattr(blip, "generation_config", None)
    return {
        "format": FORMAT,
        "graphs": GRAPHS,
        "source": {"name": resolved.name, "path": str(resolved.path), "origin": resolved.origin},
        "weights_version": weights_version(resolved.path),
        "precision": precision,
        **({"int8_scheme": INT8_SCHEME} if precision == "int8" else {}),
        "opset": opset,
        "exporter": f"torch.onnx TorchScript exporter, torch {torch.__version__}",
        "versions": {"transformers": transformers.__version__, "onnx": onnx.__version__},
        "parameters": sum(p.numel() for m in (blip, experts) if m is not None for p in m.parameters()),
        **({"experts": experts.config.to_dict()} if experts is not None else {}),
        "decoder": {
            "layers": text.num_hidden_layers,
            "heads": text.num_attention_heads,
            "head_dim": text.hidden_size // text.num_attention_heads,
            "vocab_size": text.vocab_size,
            "max_positions": text.max_position_embeddings,
            "bos_token_id": text.bos_token_id,
            "eos_token_id": text.sep_token_id,
            "pad_token_id": text.pad_token_id,
        },
        # Beam-search settings the checkpoint's generation config asks for (HF defaults otherwise).
        "generation": {
            "length_penalty": _setting(gen, "length_penalty", 1.0),
            "early_stopping": _setting(gen, "early_stopping", False),
        },
        "image_size": blip.config.vision_config.image_size,
        "files": {name: sha256_file(folder / name) for name in (ENCODER, DECODER)},
    }


def export_onnx(model: str | ResolvedModel, out: str | Path, precision: str = "fp32", opset: int = OPSET) -> Path:
    """Export ``model`` (zoo name, directory or hub id) to ``out`` at ``precision``; returns ``out``.

    The folder is written under a temporary name and renamed at the end, so a crash never leaves a folder that
    looks complete.
    """
    if precision not in PRECISIONS:
        raise ReefcapError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    import torch

    from reefcap.models.engines.experts import is_experts, load_experts
    from reefcap.models.engines.torch_engine import load_blip
    from reefcap.models.export.quantize import to_fp16, to_int8

    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    blip, processor = load_blip(resolved, torch.float32)
    experts = load_experts(resolved.path, blip) if is_experts(resolved.path) else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _export_graphs(blip, tmp, opset, experts)
        if precision == "fp16":
            to_fp16(tmp)
        elif precision == "int8":
            to_int8(tmp)
        processor.save_pretrained(tmp)
        manifest = _manifest(resolved, blip, experts, precision, opset, tmp)
        manifest["export_seconds"] = round(time.perf_counter() - started, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached_export(model: str | ResolvedModel, precision: str = "fp32") -> Path:
    """The export of ``model`` at ``precision`` under :func:`cache_root`, made on first use.

    An already exported folder (its ``manifest.json`` names this export format) is used as it is. Cache entries
    are keyed by the weights' content hash, so retrained weights in the same folder get a fresh export.
    """
    if isinstance(model, (str, os.PathLike)) and is_export(Path(model).expanduser()):
        return Path(model).expanduser()
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    # The int8 scheme is part of the key: an int8 export cached by an older reefcap (8-bit weights) is not reused.
    tag = f"int8-{INT8_SCHEME}" if precision == "int8" else precision
    target = cache_root() / f"{weights_version(resolved.path)}-{tag}"
    if is_export(target) and read_manifest(target, verify=False).get("graphs", 1) >= GRAPHS:
        return target
    # Absent, written by a reefcap with another export format (it would refuse to load forever), or by one with
    # older, slower graphs: export anew.
    return export_onnx(resolved, target, precision)
