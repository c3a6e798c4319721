"""Which model serves, shared: the generation record that carries one accepted reload to every worker and server.

A reload runs the quality gate once, in the process that was asked. When the gate accepts and that process has
swapped, it publishes the new primary in the feedback store, under the configured primary's name (the ``MODEL``
setting): a generation number, the reload target and the SHA-256 of its ``manifest.json``. Every process that
shares the store and was configured with the same ``MODEL`` (the workers of one ``reefcap serve --workers N``,
servers on other machines on one PostgreSQL, the replicas of a Ray Serve deployment) reads the record every
``GENERATION_POLL_S`` and, on a newer generation, loads the same target through the same loader, checks that its
manifest is the one the gate judged and that its files still match it (:func:`verify_manifest`), and swaps.
Running batches finish on the old engine, so no request fails during the swap. A process starting later (a
replaced worker, a restart) starts on the recorded target: an accepted reload stays in force.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reefcap.models.errors import ReefcapError
from reefcap.models.policy.gate import MANIFEST, verify_manifest
from reefcap.models.registry import resolve_model

log = logging.getLogger("reefcap.server")


def model_folder(target: str) -> Path:
    """The folder ``target`` (a zoo name or a directory) loads from."""
    try:
        return resolve_model(target).path
    except ReefcapError:
        return Path(target)


def manifest_digest(target: str) -> str | None:
    """SHA-256 of ``target``'s ``manifest.json``, or None without one."""
    try:
        return hashlib.sha256((model_folder(target) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class Record:
    """One published generation: ``target`` serves as the primary from ``number`` on."""

    number: int
    target: str
    manifest: str | None
    name: str | None = None
    version: str | None = None

    def problems(self) -> list[str]:
        """Why ``target``'s files are not what the gate accepted; empty when they are."""
        if self.manifest is not None and manifest_digest(self.target) != self.manifest:
            return [f"{MANIFEST} of {self.target} is not the one the quality gate accepted"]
        return verify_manifest(model_folder(self.target)) if self.manifest is not None else []


class SharedGeneration:
    """The generation record of one configured primary in a feedback store (``store`` None: not shared)."""

    def __init__(self, store: Any, configured: str) -> None:
        self.store, self.configured = store, configured

    def read(self) -> Record | None:
        """The latest published generation, or None before the first (or without a store)."""
        row = self.store.serving_record(self.configured) if self.store is not None else None
        if row is None:
            return None
        return Record(row["generation"], row["target"], row["manifest"], row["name"], row["version"])

    def publish(self, target: str, info: dict[str, Any]) -> int:
        """Record ``target`` (just accepted and swapped in here) as the primary; the new generation number."""
        if self.store is None:
            return 0
        return self.store.publish_serving(
            self.configured, target, manifest_digest(target), str(info.get("name")), str(info.get("version"))
        )

    def start(self) -> tuple[str, int]:
        """What a starting process serves: the recorded target and its generation, or the configured primary
        (generation 0) when there is no record or the recorded files no longer match what the gate accepted."""
        try:
            record = self.read()
        except ReefcapError as exc:
            log.error("could not read the generation record (%s): starting on the configured primary", exc)
            return self.configured, 0
        if record is None:
            return self.configured, 0
        problems = record.problems()
        if problems:
            log.error(
                "generation %d (%s) cannot be served here: %s; starting on the configured primary",
                record.number,
                record.target,
                "; ".join(problems),
            )
            return self.configured, 0
        if record.target != self.configured:
            log.info("starting on %s, generation %d of the shared record", record.target, record.number)
        return record.target, record.number
