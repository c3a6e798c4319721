"""Which precision to serve a checkpoint in on the CPU found at start: int8 where its stored agreement holds.

int8 dynamic quantisation changes a few captions (near-ties flip), so it is served by default only for a
checkpoint whose ``manifest.json`` records how often its int8 export gives the same greedy caption as fp32
(``int8_agreement``), measured with the current export scheme, at least :data:`MIN_INT8_AGREEMENT`, on a
kind of CPU this one is (a CPU flag from the record's ``cpu_flags``); ``reefcap agreement --write``
(:mod:`reefcap.models.policy.agreement`) measures and records it. A stored figure rather than a check at
start: a start-up probe small enough to be quick (tens of images) cannot tell 95% from 90% (one caption is 4
points of 23), and for a 224 M-parameter model it would cost an int8 export and minutes before the first
request. Every other case is fp32: no record, an older scheme, a lower figure, another kind of CPU, a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reefcap.models.engines.onnx_format import INT8_SCHEME, MANIFEST, is_export

MIN_INT8_AGREEMENT = 0.95
AGREEMENT_KEY = "int8_agreement"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where that cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def auto_dtype(manifest: dict[str, Any], flags: set[str] | None = None) -> tuple[str, str]:
    """``("int8" | "fp32", why)`` for a checkpoint served by the ONNX backend on the CPU."""
    record = manifest.get(AGREEMENT_KEY)
    if not isinstance(record, dict):
        return "fp32", "no stored int8 agreement in the checkpoint's manifest"
    if record.get("int8_scheme") != INT8_SCHEME:
        return "fp32", f"the stored int8 agreement is for scheme {record.get('int8_scheme')!r}, not {INT8_SCHEME}"
    identical = record.get("identical")
    if not isinstance(identical, (int, float)) or identical < MIN_INT8_AGREEMENT:
        return "fp32", f"stored int8 agreement {identical} is under {MIN_INT8_AGREEMENT}"
    flags = cpu_flags() if flags is None else flags
    kinds = set(record.get("cpu_flags") or ())
    if not kinds & flags:
        return "fp32", f"int8 agreement was measured on CPUs with {sorted(kinds)}; this CPU has none of them"
    return "int8", f"int8 gives the same greedy caption as fp32 for {identical:.1%} of images on this kind of CPU"


def serving_dtype(model: str, backend: str, device: str = "auto") -> tuple[str, str]:
    """dtype ``auto`` for ``model`` on a concrete ``backend`` and ``device``: ``(dtype, why)``. int8 needs the ONNX
    backend on the CPU and the checkpoint's stored agreement (:func:`auto_dtype`); everything else is fp32."""
    from reefcap.models.engines.manifests import checkpoint_manifest, read_json

    if backend == "onnx" and is_export(Path(model).expanduser()):
        precision = read_json(Path(model).expanduser() / MANIFEST).get("precision", "fp32")
        return precision, "an export folder runs at the precision it was exported in"
    if backend != "onnx":
        return "fp32", f"the {backend} backend serves fp32 unless asked"
    if device not in ("auto", "cpu") or _onnx_on_cuda(device):
        return "fp32", "int8 exports are for CPUs"
    return auto_dtype(checkpoint_manifest(model))


def _onnx_on_cuda(device: str) -> bool:
    """Whether ONNX Runtime would put an ``auto`` device on a GPU."""
    if device != "auto":
        return False
    from reefcap.models.engines.devices import ort_device

    return ort_device("auto")[0] == "cuda"
