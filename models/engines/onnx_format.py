"""The ONNX export format, as the runtime reads it: file names, precisions, the int8 scheme, the manifest.

:mod:`reefcap.models.export` writes this format and :mod:`.onnx_engine` reads it; both import it from here, so
the engines never import the exporter (and torch) to load an export folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reefcap.models.errors import ModelLoadError
from reefcap.models.registry import sha256_file

MANIFEST = "manifest.json"
FORMAT = "reefcap-onnx/1"
# The revision of the graph code (:mod:`.graphs`). An export of an older revision still loads and answers the
# same, but a cache entry made by one is exported again: revision 2 builds its reshapes from constants, 312
# decoder nodes instead of 403 once ORT has optimised them (ORT pays per node per decoding step: 10-17% of a step
# at 8-16 rows on the tiny model).
GRAPHS = 2
OPSET = 17
PRECISIONS = ("fp32", "fp16", "int8")
ENCODER, DECODER = "encoder.onnx", "decoder.onnx"
# The encoder's extra output in a water-type experts export: the fusion weights (B, E).
WEIGHTS_OUTPUT = "expert_weights"

# How int8 weights are stored; exports made with another scheme are stale (cache key, manifest, engine warning).
# 8-bit weights saturate on x86 CPUs without VNNI: ORT's u8s8 AVX2 kernel (VPMADDUBSW) sums two u8*s8 products
# into int16, and 2 * 255 * 127 > 32767. On an AVX2-only EPYC that left 15/23 EUVP captions as fp32 gave them
# (73.8% on the ReefScenes test split). Weights within [-64, 64] (reduce_range) keep every pair within int16
# (2 * 255 * 64 = 32640), so the same graph gives the same captions on AVX2, AVX-512 and VNNI CPUs, at the
# u8s8 kernels' speed (docs/onnx-parity.md).
INT8_SCHEME = "dynamic-u8s8-per-channel-7bit"
INT8_WEIGHT_RANGE = (-64, 64)


def cache_root() -> Path:
    """Where exports made on first use are kept: ``$REEFCAP_CACHE/onnx`` or ``~/.cache/reefcap/onnx``."""
    base = os.environ.get("REEFCAP_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "reefcap") / "onnx"


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a reefcap ONNX export (checkpoint folders may have a manifest.json of their own)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("format") == FORMAT
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
