"""What every finished training run leaves beside its selected checkpoint: a manifest and a run report.

The manifest (``OUT/best/manifest.json``, the format ``reefcap zoo-pack`` writes) says how the model was made
(recipe, start model, data files with their SHA-256, the exact command) and how it scores, measured here on the
run's whole validation split and on any test splits given, with the SHA-256 of every checkpoint file: the
folder can be served, packed and put through the server's quality gate as it is. The run report
(``OUT/report.md`` + PNGs, :mod:`reefcap.training.run_report`) shows the curves and validation captions.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from reefcap.models.engines.base import DecodeOptions
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import sha256_file

from .config import Recipe
from .runs import RunInputs
from .zoo import write_manifest


def parse_tests(items: list[str] | None) -> dict[str, str]:
    """``--test NAME=FILE`` values as ``{name: file}`` (a bare FILE is named ``test``)."""
    tests: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else ("test", item)
        if not name or not path:
            raise ReefcapError(f"--test takes NAME=FILE or FILE, got {item!r}")
        if name in tests or name == "val":
            raise ReefcapError(f"--test: split name {name!r} given twice (or 'val', which the run's validation uses)")
        tests[name] = path
    return tests


def data_provenance(inputs: RunInputs, tests: dict[str, str]) -> dict[str, Any]:
    """Each caption file the run read or was scored on, with its SHA-256 and image count."""
    from reefcap.models.data.datasets import load_dataset

    files = {"train": inputs.data, "val": inputs.val, "preserve": inputs.preserve_data}
    files.update({f"test/{name}": path for name, path in tests.items()})
    out: dict[str, Any] = {}
    for role, path in files.items():
        if not path:
            continue
        p = Path(path)
        entry: dict[str, Any] = {"path": str(p.resolve()) if p.exists() else str(path)}
        if p.is_file():
            entry.update(sha256=sha256_file(p), images=len(load_dataset(p)))
        out[role] = entry
    return out


def command_line() -> str:
    """The command that is running, as a user would paste it."""
    return "reefcap " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""


def finish_run(
    out: str | Path,
    recipe: Recipe,
    inputs: RunInputs,
    summary: dict[str, Any],
    tests: dict[str, str] | None = None,
    *,
    description: str = "",
    commands: list[str] | None = None,
    options: DecodeOptions | None = None,
    report: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``OUT/best`` on the whole validation split and ``tests``, write its manifest and the run report.
    ``extra``: more manifest sections (the router fitted beside the weights).

    Returns the manifest. METEOR is left out (it needs Java); ``reefcap eval`` adds it.
    """
    from reefcap.models.engines.loader import load_engine

    from .data import load_records
    from .evaluation import evaluate

    out, tests = Path(out), tests or {}
    best = out / "best"
    if not (best / "model.safetensors").is_file():
        raise ReefcapError(f"{best}: no selected checkpoint to describe (the run wrote none)")
    options = options or DecodeOptions()
    engine = load_engine(str(best), backend="torch")
    metrics: dict[str, dict[str, float]] = {}
    val_predictions: list[dict[str, Any]] = []
    val_records = load_records(inputs.val) if inputs.val else []
    try:
        if val_records:
            metrics["val"], val_predictions = evaluate(engine, val_records, options, meteor=False)
        for name, path in tests.items():
            metrics[name] = evaluate(engine, load_records(path), options, meteor=False)[0]
    finally:
        engine.close()
    manifest = {
        "name": out.name,
        "description": description or f"{recipe.name} from {inputs.model} (reefcap train)",
        "recipe": recipe.name,
        "start": inputs.model,
        "data": data_provenance(inputs, tests),
        "commands": commands if commands is not None else [command_line()],
        "decode": asdict(options),
        "run": {k: summary.get(k) for k in ("steps", "finished", "best_step", "best_score", "stopped_early")},
        "metrics": metrics,
        **(extra or {}),
    }
    written = write_manifest(best, manifest)
    if report:
        from .run_report import write_run_report

        write_run_report(out, val_records, val_predictions, metrics)
    return written
