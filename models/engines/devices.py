"""Which device ONNX Runtime runs on (PyTorch's choice is :func:`.torch_engine.pick_device`)."""

from __future__ import annotations

from reefcap.models.errors import ModelLoadError


def ort_device(device: str = "auto") -> tuple[str, int]:
    """``auto`` is CUDA when onnxruntime-gpu can use a GPU, else CPU. Returns (kind, device id)."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto":
        return ("cuda", 0) if has_cuda else ("cpu", 0)
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return "cpu", 0
    if kind == "cuda":
        if not has_cuda:
            raise ModelLoadError(
                f"device {device!r} requested but onnxruntime has no CUDA execution provider "
                "(install the `gpu` extra: pip uninstall onnxruntime && pip install 'reefcap[gpu]')"
            )
        return "cuda", int(index or 0)
    raise ModelLoadError(f"device must be auto, cpu or cuda[:N], got {device!r}")
