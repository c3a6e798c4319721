"""Hot reload of the primary model behind the quality gate (:mod:`reefcap.models.policy.gate`).

A reload loads the candidate next to the running primary, checks that its ``manifest.json`` hashes match its
files, captions the gate set with both models and compares them metric by metric (declared directions, a
stated tolerance, collapse ceilings); it swaps only when the gate accepts. Loading and measuring run on worker
threads, so requests keep flowing (batches already running finish on the old engine); one reload at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.loader import load_engine
from reefcap.models.errors import ReefcapError
from reefcap.models.policy.gate import GateConfig, GateItems, GateReport, choose_gate_set, run_gate
from reefcap.models.registry import resolve_model

from .generation import Record, SharedGeneration
from .pool import ModelPool, checkpoint_manifest, evaluation_manifest

log = logging.getLogger("reefcap.server")


class QualityGateError(ReefcapError):
    """The quality gate refused the candidate (its reasons, per metric, are in the message and ``report``)."""

    code = "quality_gate"

    def __init__(self, report: GateReport) -> None:
        super().__init__(f"quality gate on {report.gate_set}: " + "; ".join(report.reasons()))
        self.report = report


class GateSetup:
    """Where the gate's images come from and how strict it is (from the server settings).

    ``held_out``: returns the feedback store's held-out images (read when a reload starts, on its thread).
    """

    def __init__(
        self,
        options: DecodeOptions,
        config: GateConfig | None = None,
        coco_file: str | Path | None = None,
        held_out: Callable[[], GateItems] | None = None,
    ) -> None:
        self.options, self.config, self.coco_file, self.held_out = options, config or GateConfig(), coco_file, held_out

    def items(self) -> tuple[str, GateItems]:
        held = self.held_out() if self.held_out and not self.coco_file else None
        return choose_gate_set(self.coco_file, held, self.config)


def folder_signature(path: Path) -> tuple:
    """Names, sizes and mtimes of a model folder's files: changes when a new version is written."""
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))
    except OSError:
        return ()


def gate_setup(settings: Any, store: Any | None) -> GateSetup:
    """The gate as the settings describe it: the server's default decoding (what users are served), the
    configured gate set, the feedback store's held-out split."""
    config = GateConfig(tolerance=settings.gate_tolerance, min_feedback_images=settings.gate_min_feedback)
    options = DecodeOptions(num_beams=settings.num_beams, max_length=settings.max_length)
    held_out = (lambda: store.split_items("test")) if store is not None else None
    return GateSetup(options, config, settings.gate_set, held_out)


class Reloader:
    """Loads, gates and swaps primaries; publishes each accepted one to the processes that share the feedback
    store and follows theirs (:mod:`.generation`); also watches the primary's folder when polling is on."""

    def __init__(
        self,
        pool: ModelPool,
        model: str,
        config: EngineConfig,
        metrics: Any,
        gate: GateSetup | None = None,
        shared: SharedGeneration | None = None,
        generation: int = 0,
    ) -> None:
        """``config``: the one the pool's models were loaded with (``auto`` settled per model by the loader), so
        a reloaded model gets the backend, dtype and threads it would get at start-up. ``shared``: the generation
        record this process publishes to and follows; ``generation``: the one the pool's primary is."""
        self.pool, self.model, self.config, self.metrics = pool, model, config, metrics
        self.gate = gate or GateSetup(DecodeOptions.greedy())
        self.last_report: GateReport | None = None
        self.shared, self.generation = shared or SharedGeneration(None, model), generation
        self._refused = 0  # a generation whose files did not check out here: not tried again
        self._lock = asyncio.Lock()

    def _judge(self, engine, target: str) -> GateReport:
        """The gate's verdict on ``engine`` (loaded from ``target``) against the serving primary; blocking."""
        try:
            folder = resolve_model(target).path
        except ReefcapError:
            folder = Path(target)
        gate_set, items = self.gate.items()
        serving = self.pool.primary.engine if self.pool.primary else None
        # With an in-air model, both primaries are judged as served: routed, on underwater and in-air images.
        in_air = self.pool.fallback.engine if self.pool.fallback else None
        return run_gate(engine, folder, serving, items, gate_set, self.gate.options, self.gate.config, in_air=in_air)

    async def reload(self, model: str | None = None) -> dict[str, Any]:
        """Load ``model`` (default: the configured primary, re-read from disk) and swap it in if the gate accepts."""
        target = model or self.model
        async with self._lock:
            try:
                engine = await asyncio.to_thread(load_engine, target, self.config)
            except ReefcapError:
                self.metrics.reloads.labels("load_failed").inc()
                raise
            try:
                report = await asyncio.to_thread(self._judge, engine, target)
            except BaseException:
                engine.close()
                raise
            self.last_report = report
            if not report.accepted:
                engine.close()
                self.metrics.reloads.labels("rejected").inc()
                log.warning("reload of %s refused: %s", target, report.to_dict())
                raise QualityGateError(report)
            candidate = checkpoint_manifest(target) or evaluation_manifest(engine.describe().source)
            previous = self.pool.primary.info.to_dict() if self.pool.primary else None
            self.pool.swap_primary(engine, candidate)
            self.model = target
            self.metrics.reloads.labels("swapped").inc()
            info = engine.describe().to_dict()
            log.info("primary reloaded: %s %s (gate: %s)", info["name"], info["version"], report.gate_set)
            await self._publish(target, info)
            answer = {"swapped": True, "primary": info, "previous": previous, "gate": report.to_dict()}
            return {**answer, "generation": self.generation}

    async def _publish(self, target: str, info: dict[str, Any]) -> None:
        try:
            self.generation = await asyncio.to_thread(self.shared.publish, target, info)
        except ReefcapError as exc:  # swapped here; the others keep what they serve until the next reload
            log.error("reload of %s not published to the other workers and servers: %s", target, exc)

    async def follow(self, interval_s: float) -> None:
        """Swap to each newer generation another process published, every ``interval_s``."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                record = await asyncio.to_thread(self.shared.read)
            except ReefcapError as exc:
                log.warning("could not read the generation record: %s", exc)
                continue
            if record is not None and record.number > max(self.generation, self._refused):
                await self._follow(record)

    async def _follow(self, record: Record) -> None:
        async with self._lock:
            if record.number <= self.generation:  # this process published it, or followed it meanwhile
                return
            problems = await asyncio.to_thread(record.problems)
            try:
                if problems:
                    raise ReefcapError("; ".join(problems))
                engine = await asyncio.to_thread(load_engine, record.target, self.config)
            except ReefcapError as exc:
                self._refused = record.number
                self.metrics.reloads.labels("load_failed").inc()
                log.error("generation %d (%s) not followed: %s", record.number, record.target, exc)
                return
            candidate = checkpoint_manifest(record.target) or evaluation_manifest(engine.describe().source)
            self.pool.swap_primary(engine, candidate)
            self.model, self.generation = record.target, record.number
            self.metrics.reloads.labels("followed").inc()
            info = engine.describe()
            log.info("primary follows generation %d: %s %s", record.number, info.name, info.version)

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
