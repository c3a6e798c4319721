"""Lower-precision copies of an exported folder's two graphs: fp16 (for the CUDA provider) and dynamic int8
(for CPUs; the scheme is :data:`~reefcap.models.engines.onnx_format.INT8_SCHEME`)."""

from __future__ import annotations

from pathlib import Path

from reefcap.models.engines.onnx_format import DECODER, ENCODER


def to_fp16(folder: Path) -> None:
    """Convert both graphs to fp16 in place; pixels in and logits out stay fp32 so callers need not care."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for name, keep in ((ENCODER, ["pixel_values"]), (DECODER, ["logits"])):
        model = convert_float_to_float16(onnx.load(str(folder / name)), keep_io_types=keep)
        onnx.save(model, str(folder / name))


# Names (from the exported modules) of the projections quantised to int8: the feed-forward layers (vision
# `mlp`, decoder `intermediate`/`output`) and the attention output projections (also `output/dense`).
INT8_NODE_PARTS = ("/mlp/", "/intermediate/", "/output/dense")


def int8_nodes(graph_path: Path) -> list[str]:
    """The MatMul/Gemm nodes to quantise; Q/K/V projections and the LM head stay float."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    return [
        node.name
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and any(part in node.name for part in INT8_NODE_PARTS)
    ]


def to_int8(folder: Path) -> None:
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
                nodes_to_quantize=int8_nodes(src),
            )
            tmp.replace(src)
    finally:
        root.setLevel(level)
