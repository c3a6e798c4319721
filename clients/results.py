"""Crash-safe JSONL results: a killed run loses nothing it reported and repeats nothing on ``--resume``.

Each batch is written with one ``write`` of whole lines, then flushed and fsynced, so after a SIGKILL the
file holds every finished batch plus at most one partial line, which resume cuts off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .inputs import InputError


def read_results(path: Path) -> Iterator[dict[str, Any]]:
    """Complete records in a results file (a trailing partial line is ignored)."""
    with path.open("r", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.endswith("\n"):
                return  # partial last line of a killed run
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{n}: not a JSON results line; is this the right file?") from None
            if not isinstance(record, dict) or "image" not in record:
                raise InputError(f"{path}:{n}: results line has no 'image' key")
            yield record


class ResultsWriter:
    """Appends result records to a JSONL file; with ``resume`` it first learns which images are done."""

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.done: set[str] = set()
        if self.path.exists() and self.path.stat().st_size > 0:
            if resume:
                self._truncate_partial_line()
                self.done = {r["image"] for r in read_results(self.path)}
            elif not overwrite:
                raise InputError(f"{self.path} exists; pass --resume to continue it or --overwrite to replace it")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a" if resume else "w", encoding="utf-8")
        except OSError as exc:  # opened before the model loads, so a bad -o costs nothing
            raise InputError(f"{self.path}: cannot write results ({exc.strerror or exc})") from None

    def _truncate_partial_line(self) -> None:
        with self.path.open("rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """Append one batch of records durably."""
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not lines:
            return
        self._fh.write(lines)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_coco_results(results: Iterable[dict[str, Any]], ids: dict[str, Any], out: str | Path) -> int:
    """Write captioned records as COCO results ``[{"image_id", "caption"}]``; returns how many were written.

    ``ids`` maps an input's ``image`` key to its dataset id (from a COCO manifest); other inputs use the
    file stem, or the whole key when stems collide.
    """
    records = [r for r in results if "caption" in r]
    stems: dict[str, int] = {}
    for r in records:
        stem = Path(r["image"]).stem
        stems[stem] = stems.get(stem, 0) + 1

    def image_id(key: str) -> Any:
        if ids.get(key) is not None:
            return ids[key]
        stem = Path(key).stem
        if stems[stem] > 1:
            return key
        return int(stem) if stem.isdigit() else stem

    payload = [{"image_id": image_id(r["image"]), "caption": r["caption"]} for r in records]
    try:
        Path(out).write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{out}: cannot write COCO results ({exc.strerror or exc})") from None
    return len(payload)
