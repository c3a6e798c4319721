"""Hot reload of the primary model behind a quality gate.

A reload loads the new primary next to the running one, compares its manifest metrics with the current
primary's, and swaps only if no metric on any split got worse. Requests keep flowing during the load (it
runs on a worker thread) and batches already running finish on the old engine.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from reefcap.models.engine import EngineConfig
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import resolve_model

from .pool import ModelPool, checkpoint_manifest, evaluation_manifest, load_model

log = logging.getLogger("reefcap.server")
TOLERANCE = 1e-9


class QualityGateError(ReefcapError):
    """The candidate model's evaluation is worse than the serving model's (or it has none)."""

    code = "quality_gate"


def quality_gate(candidate: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Why ``candidate`` may not replace ``current`` (manifests' ``metrics`` per split); empty list = pass."""
    old = current.get("metrics") or {}
    new = candidate.get("metrics") or {}
    problems = []
    for split, values in old.items():
        if not isinstance(values, dict):
            continue
        for metric, before in values.items():
            if not isinstance(before, (int, float)):
                continue
            after = (new.get(split) or {}).get(metric)
            if not isinstance(after, (int, float)):
                problems.append(f"{split}/{metric}: missing from the candidate's manifest")
            elif after < before - TOLERANCE:
                problems.append(f"{split}/{metric}: {after:.4f} < current {before:.4f}")
    return problems


def folder_signature(path: Path) -> tuple:
    """Names, sizes and mtimes of a model folder's files: changes when a new version is written."""
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))
    except OSError:
        return ()


class Reloader:
    """Loads, gates and swaps primaries; also watches the primary's folder when polling is on."""

    def __init__(self, pool: ModelPool, model: str, backend: str, config: EngineConfig, metrics: Any) -> None:
        self.pool, self.model, self.backend, self.config, self.metrics = pool, model, backend, config, metrics
        self._lock = asyncio.Lock()

    async def reload(self, model: str | None = None) -> dict[str, Any]:
        """Load ``model`` (default: the configured primary, re-read from disk) and swap it in if it passes."""
        target = model or self.model
        async with self._lock:
            try:
                engine = await asyncio.to_thread(load_model, target, self.backend, self.config)
            except ReefcapError:
                self.metrics.reloads.labels("load_failed").inc()
                raise
            candidate = checkpoint_manifest(target) or evaluation_manifest(engine)
            current = self.pool.primary.manifest if self.pool.primary else {}
            problems = quality_gate(candidate, current)
            if problems:
                engine.close()
                self.metrics.reloads.labels("rejected").inc()
                raise QualityGateError("quality gate: " + "; ".join(problems))
            previous = self.pool.primary.info.to_dict() if self.pool.primary else None
            self.pool.swap_primary(engine, candidate)
            self.model = target
            self.metrics.reloads.labels("swapped").inc()
            info = engine.describe().to_dict()
            log.info("primary reloaded: %s %s", info["name"], info["version"])
            return {"swapped": True, "primary": info, "previous": previous, "metrics": candidate.get("metrics", {})}

    def _folder(self) -> Path:
        try:
            return resolve_model(self.model).path
        except ReefcapError:
            return Path(self.model)

    async def watch(self, interval_s: float) -> None:
        """Reload when the primary's folder changes (a new version written in place).

        A change is acted on once the folder has stayed the same for one more interval, so a version that is
        still being copied is not loaded half-written.
        """
        folder = self._folder()
        last = folder_signature(folder)
        while True:
            await asyncio.sleep(interval_s)
            if self._folder() != folder:  # an admin reload switched to another folder: watch that one
                folder = self._folder()
                last = folder_signature(folder)
                continue
            now = folder_signature(folder)
            if now == last:
                continue
            await asyncio.sleep(interval_s)
            if folder_signature(folder) != now:
                continue  # still being written
            last = now
            try:
                await self.reload()
            except ReefcapError as exc:
                log.warning("automatic reload of %s refused: %s", folder, exc)
