"""Export a BLIP captioner to ONNX: a vision encoder graph and a text decoder graph with an explicit KV cache.

Hugging Face optimum refuses BLIP (its issue 1818), and transformers 5.x keeps the decoder cache in ``Cache``
objects that no exporter can trace, so the two graphs are built from small wrapper modules that reuse the
checkpoint's own submodules and pass every key/value as a plain tensor:

- ``encoder.onnx``: ``pixel_values (B, 3, S, S)`` -> ``cross_key_i``/``cross_value_i (B, heads, N, head_dim)`` for
  every decoder layer. The image's cross-attention keys and values are computed here, once per image.
- ``decoder.onnx``: one merged graph for the prompt step and every later step. Inputs ``input_ids (R, T)``,
  ``beam_idx (R,)`` (which cached row each new row continues; the caller's beam reordering happens in-graph so
  the cache never leaves the device), ``past_key_i``/``past_value_i (R, heads, P, head_dim)`` (P = 0 on the
  first step) and the cross keys/values. Outputs ``logits (R, vocab)`` of the last position and
  ``present_key_i``/``present_value_i``. R may be a multiple of B (beam search): the beams of one image share
  its cross keys/values without copies.

The folder also holds the processor files (tokenizer, image preprocessing) and ``manifest.json`` with the source
checkpoint, opset, precision and file hashes. Only the export needs torch; the runtime engine does not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from reefcap.models.errors import ModelLoadError, ReefcapError
from reefcap.models.registry import ResolvedModel, resolve_model, sha256_file

MANIFEST = "manifest.json"
FORMAT = "reefcap-onnx/1"
OPSET = 17
PRECISIONS = ("fp32", "fp16", "int8")
ENCODER, DECODER = "encoder.onnx", "decoder.onnx"


def cache_root() -> Path:
    """Where exports made on first use are kept: ``$REEFCAP_CACHE/onnx`` or ``~/.cache/reefcap/onnx``."""
    base = os.environ.get("REEFCAP_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "reefcap") / "onnx"


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a reefcap ONNX export (checkpoint folders may have a manifest.json of their own)."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any]:
    """Load and check an export folder's manifest; with ``verify`` every graph's hash is checked too."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: not a reefcap ONNX export ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{folder}: unknown export format {manifest.get('format')!r} (expected {FORMAT})")
    if verify:
        for name, expected in manifest["files"].items():
            file = Path(folder) / name
            if not file.is_file() or sha256_file(file) != expected:
                raise ModelLoadError(f"{folder}: {name} is missing or does not match its hash in {MANIFEST}")
    return manifest


# ---- wrapper modules (torch is imported inside, so importing this module stays cheap) --------------------------


def _wrappers():
    import torch
    from torch import nn

    def heads(x: torch.Tensor, n: int) -> torch.Tensor:  # (B, T, H*D) -> (B, H, T, D)
        b, t, _ = x.shape
        return x.view(b, t, n, -1).transpose(1, 2)

    class Encoder(nn.Module):
        """Vision transformer, then every decoder layer's cross-attention key/value projections of its output."""

        def __init__(self, blip: Any) -> None:
            super().__init__()
            self.vision = blip.vision_model
            self.layers = blip.text_decoder.bert.encoder.layer
            self.n_heads = blip.config.text_config.num_attention_heads

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            image = self.vision(pixel_values=pixel_values).last_hidden_state
            out = []
            for layer in self.layers:
                att = layer.crossattention.self
                out += [heads(att.key(image), self.n_heads), heads(att.value(image), self.n_heads)]
            return tuple(out)

    class Decoder(nn.Module):
        """BLIP's text decoder with the cache as explicit tensors; returns only the last position's logits."""

        def __init__(self, blip: Any) -> None:
            super().__init__()
            text = blip.text_decoder
            self.embeddings = text.bert.embeddings
            self.layers = text.bert.encoder.layer
            self.head = text.cls.predictions
            # The LM head shares its weight with the word embeddings. The exporter merges identical initializers,
            # so a transposed copy keeps int8 quantisation of the head's matmul from rewriting the initializer the
            # embedding lookup reads.
            self.lm_weight = nn.Parameter(self.head.decoder.weight.detach().t().contiguous(), requires_grad=False)
            self.n_heads = blip.config.text_config.num_attention_heads
            self.n_layers = len(self.layers)
            self.context = 0  # water-type experts: K context rows after [DEC] that take no position (experts_graphs)

        def attend(self, q, k, v, mask=None):
            scores = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
            if mask is not None:
                scores = scores + mask
            return torch.matmul(torch.softmax(scores, dim=-1), v)

        def merge(self, x):  # (R, H, T, D) -> (R, T, H*D)
            r, h, t, d = x.shape
            return x.transpose(1, 2).reshape(r, t, h * d)

        def forward(self, input_ids, beam_idx, *cache):
            past, cross = cache[: 2 * self.n_layers], cache[2 * self.n_layers :]
            rows, length = input_ids.shape
            start = past[0].shape[2]
            positions = torch.arange(length, device=input_ids.device) + start
            emb = self.embeddings
            at = (positions - self.context).clamp(min=0) if self.context else positions
            h = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(at)[None])
            # Causal mask over [cache, new tokens]: query i (at position start+i) sees keys 0..start+i.
            keys = torch.arange(start + length, device=input_ids.device)
            blocked = keys[None, :] > positions[:, None]
            mask = blocked.to(h.dtype) * torch.finfo(h.dtype).min
            presents = []
            for i, layer in enumerate(self.layers):
                sa = layer.attention.self
                k = torch.cat([past[2 * i].index_select(0, beam_idx), heads(sa.key(h), self.n_heads)], dim=2)
                v = torch.cat([past[2 * i + 1].index_select(0, beam_idx), heads(sa.value(h), self.n_heads)], dim=2)
                presents += [k, v]
                ctx = self.attend(heads(sa.query(h), self.n_heads), k, v, mask)
                h = layer.attention.output(self.merge(ctx), h)
                # Cross-attention: rows of one image (its beams) are folded into the query length so they share
                # the image's keys/values: (R, H, T, D) -> (B, H, R/B * T, D), no mask (every patch is visible).
                ca = layer.crossattention.self
                ck, cv = cross[2 * i], cross[2 * i + 1]
                images = ck.shape[0]
                q = heads(ca.query(h), self.n_heads)
                _, nh, t, d = q.shape
                q = q.reshape(images, -1, nh, t, d).transpose(1, 2).reshape(images, nh, -1, d)
                ctx = self.attend(q, ck, cv)
                ctx = ctx.reshape(images, nh, -1, t, d).transpose(1, 2).reshape(rows, nh, t, d)
                h = layer.crossattention.output(self.merge(ctx), h)
                h = layer.output(layer.intermediate(h), h)
            logits = torch.matmul(self.head.transform(h[:, -1]), self.lm_weight) + self.head.decoder.bias
            return (logits, *presents)

    return Encoder, Decoder


def _export_graphs(blip: Any, out: Path, opset: int, experts: Any = None) -> None:
    """Write both graphs; with ``experts`` (water-type experts, see ``experts_graphs``) the encoder also outputs
    the fusion weights and the decoder's embedding table holds the experts' context rows."""
    import torch

    from reefcap.models.engines.experts_graphs import WEIGHTS_OUTPUT, experts_decoder, experts_encoder

    Encoder, Decoder = _wrappers()
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
    encoder = experts_encoder(blip, experts) if experts is not None else Encoder(blip).eval()
    decoder = experts_decoder(blip, experts) if experts is not None else Decoder(blip).eval()
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


def _to_fp16(folder: Path) -> None:
    """Convert both graphs to fp16 in place; pixels in and logits out stay fp32 so callers need not care."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for name, keep in ((ENCODER, ["pixel_values"]), (DECODER, ["logits"])):
        model = convert_float_to_float16(onnx.load(str(folder / name)), keep_io_types=keep)
        onnx.save(model, str(folder / name))


# Names (from the exported modules) of the projections quantised to int8: the feed-forward layers (vision
# `mlp`, decoder `intermediate`/`output`) and the attention output projections (also `output/dense`).
INT8_NODE_PARTS = ("/mlp/", "/intermediate/", "/output/dense")


def _int8_nodes(graph_path: Path) -> list[str]:
    """The MatMul/Gemm nodes to quantise; Q/K/V projections and the LM head stay float."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    return [
        node.name
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and any(part in node.name for part in INT8_NODE_PARTS)
    ]


# How int8 weights are stored; exports made with another scheme are stale (cache key, manifest, engine warning).
# 8-bit weights saturate on x86 CPUs without VNNI: ORT's u8s8 AVX2 kernel (VPMADDUBSW) sums two u8*s8 products
# into int16, and 2 * 255 * 127 > 32767. On an AVX2-only EPYC that left 15/23 EUVP captions as fp32 gave them
# (73.8% on the ReefScenes test split). Weights within [-64, 64] (reduce_range) keep every pair within int16
# (2 * 255 * 64 = 32640), so the same graph gives the same captions on AVX2, AVX-512 and VNNI CPUs, at the
# u8s8 kernels' speed (docs/onnx-parity.md).
INT8_SCHEME = "dynamic-u8s8-per-channel-7bit"
INT8_WEIGHT_RANGE = (-64, 64)


def _to_int8(folder: Path) -> None:
    """Dynamic int8 quantisation of the feed-forward and attention-output weights (activations quantised per
    call, per tensor, to u8; weights per output channel to 7-bit signed values, see ``INT8_SCHEME``)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic advises pre-processing on the root logger, on every call
    try:
        for name in (ENCODER, DECODER):
            src = folder / name
            tmp = folder / f"{name}.int8"
            quantize_dynamic(
                src,
                tmp,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
                # Per-channel scales, and float where int8 error turns straight into a different word (attention
                # scores, the vocabulary argmax). On the bundled DAMF model's ReefScenes test split, int8 on every
                # MatMul changed 11.6% of greedy captions; this choice changes 4.4% (docs/onnx-parity.md).
                per_channel=True,
                reduce_range=True,  # 7-bit weights: no int16 saturation on AVX2 CPUs without VNNI (above)
                nodes_to_quantize=_int8_nodes(src),
            )
            tmp.replace(src)
    finally:
        root.setLevel(level)


def _setting(config: Any, name: str, default: Any) -> Any:
    """A generation-config field, or the value transformers falls back to when it is unset (None)."""
    value = getattr(config, name, None)
    return default if value is None else value


def export_onnx(model: str | ResolvedModel, out: str | Path, precision: str = "fp32", opset: int = OPSET) -> Path:
    """Export ``model`` (zoo name, directory or hub id) to ``out`` at ``precision``; returns ``out``.

    The folder is written under a temporary name and renamed at the end, so a crash never leaves a folder that
    looks complete.
    """
    if precision not in PRECISIONS:
        raise ReefcapError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    import onnx
    import torch
    import transformers

    from reefcap.models.engines.experts import is_experts, load_experts
    from reefcap.models.engines.torch_engine import load_blip, weights_version

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
            _to_fp16(tmp)
        elif precision == "int8":
            _to_int8(tmp)
        processor.save_pretrained(tmp)
        text = blip.config.text_config
        gen = getattr(blip, "generation_config", None)
        manifest = {
            "format": FORMAT,
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
            "export_seconds": round(time.perf_counter() - started, 1),
            "files": {name: sha256_file(tmp / name) for name in (ENCODER, DECODER)},
        }
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
    from reefcap.models.engines.torch_engine import (
        weights_version,
    )  # the export needs torch anyway; an export folder does not

    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    # The int8 scheme is part of the key: an int8 export cached by an older reefcap (8-bit weights) is not reused.
    tag = f"int8-{INT8_SCHEME}" if precision == "int8" else precision
    target = cache_root() / f"{weights_version(resolved.path)}-{tag}"
    if is_export(target):
        return target
    # Absent, or written by a reefcap with another export format (it would refuse to load forever): export anew.
    return export_onnx(resolved, target, precision)
