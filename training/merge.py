"""Weight-space ensembling (WiSE-FT, Wortsman et al. 2022) and `reefcap merge`.

``theta = (1 - a) * theta0 + a * theta1``, tensor by tensor, for two checkpoints of the same architecture
fine-tuned from one start (every reefcap protocol starts from one checkpoint): ``a = 0`` is ``theta0`` (the
pretrained model), ``a = 1`` is ``theta1`` (the adapted one). BLIP has LayerNorm, not BatchNorm, so no running
statistics need re-estimating after a merge.

The merged folder is an ordinary HF checkpoint: theta1's configs, tokenizer and processor, the interpolated
``model.safetensors``, and a ``manifest.json`` naming both parents (name, weights version), ``a`` and the command,
with the SHA-256 of every file. Every safetensors file both parents hold is interpolated; one that only theta1
holds (water-type experts, trained on top of the adapted model) is copied, so the experts ride on the merged
backbone. Weights are read and written with safetensors only, never pickles.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from reefcap.models.errors import ReefcapError
from reefcap.models.registry import resolve_model

WEIGHTS = "model.safetensors"
# Files that describe how theta1 was trained or measured, not the merged weights: not copied.
NOT_COPIED = frozenset({"manifest.json", "reefcap_train.json", "reefcap_router.json", "report.md"})


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise ReefcapError(f"{path}: cannot read the safetensors weights ({exc})") from None


def interpolate(theta0: dict[str, np.ndarray], theta1: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """``(1 - alpha) * theta0 + alpha * theta1`` per tensor (in float32, stored in theta1's dtype); both must hold
    the same tensor names and shapes, else :class:`ReefcapError` naming the first difference."""
    if set(theta0) != set(theta1):
        only = sorted(set(theta0) ^ set(theta1))
        raise ReefcapError(f"the checkpoints differ in architecture: tensor {only[0]!r} is in one only")
    out = {}
    for name, t1 in theta1.items():
        t0 = theta0[name]
        if t0.shape != t1.shape:
            raise ReefcapError(f"the checkpoints differ in architecture: {name} is {t0.shape} vs {t1.shape}")
        if not np.issubdtype(t1.dtype, np.floating):  # integer buffers (position ids): theta1's as they are
            out[name] = t1
            continue
        mixed = (1.0 - alpha) * t0.astype(np.float32) + alpha * t1.astype(np.float32)
        out[name] = mixed.astype(t1.dtype)
    return out


def merge_checkpoints(theta0: str, theta1: str, alpha: float, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write the WiSE-FT merge of ``theta0`` and ``theta1`` at ``alpha`` to ``out``; returns its manifest."""
    from safetensors.numpy import save_file

    from reefcap.models.engines.manifests import weights_version

    from .finish import command_line
    from .zoo import write_manifest

    if not 0.0 <= alpha <= 1.0:
        raise ReefcapError(f"--alpha must be in [0, 1] (0: theta0, 1: theta1), got {alpha}")
    zero, one = resolve_model(theta0), resolve_model(theta1)
    out = Path(out)
    if out.exists() and not force:
        raise ReefcapError(f"{out} exists; pass --force to replace it")
    files = sorted(p.name for p in one.path.glob("*.safetensors"))
    if WEIGHTS not in files:
        raise ReefcapError(f"{one.path}: no {WEIGHTS}")
    merged = {}
    for name in files:
        if (zero.path / name).is_file():
            merged[name] = interpolate(_tensors(zero.path / name), _tensors(one.path / name), alpha)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for src in one.path.iterdir():
        if src.is_file() and src.name not in NOT_COPIED and src.name not in merged:
            shutil.copy(src, tmp / src.name)
    for name, tensors in merged.items():
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    parents = {"theta0": (zero, theta0), "theta1": (one, theta1)}
    manifest = {
        "name": out.name,
        "description": f"WiSE-FT merge: (1 - {alpha:g}) x {zero.name} + {alpha:g} x {one.name}",
        "merge": {
            "alpha": alpha,
            **{k: {"model": m, "name": r.name, "version": weights_version(r.path)} for k, (r, m) in parents.items()},
            "interpolated": sorted(merged),
            "copied_from_theta1": sorted(set(files) - set(merged)),
        },
        "commands": [command_line()],
    }
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # whole or not at all: a server watching OUT never sees half a merge
    return json.loads((out / "manifest.json").read_text())


def _merge(args: argparse.Namespace) -> int:
    manifest = merge_checkpoints(args.theta0, args.theta1, args.alpha, args.out, force=args.force)
    print(json.dumps({"model": str(args.out), "merge": manifest["merge"]}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="WiSE-FT: interpolate two checkpoints of one architecture, (1 - a) theta0 + a theta1",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("theta0", help="the pretrained checkpoint (a = 0): zoo name, folder or hub id")
    p.add_argument("theta1", help="the fine-tuned checkpoint (a = 1), trained from theta0")
    p.add_argument("--alpha", "-a", type=float, required=True, help="weight of theta1, in [0, 1]")
    p.add_argument("--out", required=True, help="folder for the merged HF checkpoint")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_merge)
