"""Crash-safe JSONL results: a killed run loses nothing it reported and repeats nothing on ``--resume``.

Each batch is written with one ``write`` of whole lines, then flushed and fsynced, so after a SIGKILL the
file holds every finished batch plus at most one partial line, which resume cuts off.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .inputs import InputError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class OutputLockedError(InputError):
    """Another process is writing the same results file."""

    code = "output_locked"


def _lock_exclusive(fh: Any, path: Path) -> None:
    if fcntl is None:  # no flock on this platform: runs are not guarded against each other
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputLockedError(
            f"{path} is being written by another reefcap run; wait for it to finish or choose another -o"
        ) from None
    except OSError:  # a filesystem without flock (some network mounts): run unguarded, as the README says
        return


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
    """Appends result records to a JSONL file; with ``resume`` it first learns which images are done.

    The file is locked (an exclusive ``flock``) from before it is read or truncated until :meth:`close`, so a
    second run given the same ``-o`` stops at once with :class:`OutputLockedError` instead of interleaving its
    lines with the first run's or truncating them. The lock is the kernel's: it goes away with the process,
    so a killed run never leaves a stale lock behind.
    """

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.done: set[str] = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Append mode creates the file without truncating it: nothing is touched before the lock is held.
            self._fh = self.path.open("a", encoding="utf-8")
        except OSError as exc:  # opened before the model loads, so a bad -o costs nothing
            raise InputError(f"{self.path}: cannot write results ({exc.strerror or exc})") from None
        try:
            _lock_exclusive(self._fh, self.path)
            if os.fstat(self._fh.fileno()).st_size > 0:  # measured under the lock
                if resume:
                    self._truncate_partial_line()
                    self.done = {r["image"] for r in read_results(self.path)}
                elif overwrite:
                    self._fh.truncate(0)
                else:
                    raise InputError(f"{self.path} exists; pass --resume to continue it or --overwrite to replace it")
        except BaseException:
            self._fh.close()
            raise

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


def coco_image_ids(keys: Iterable[str], ids: dict[str, Any]) -> dict[str, Any]:
    """A COCO ``image_id`` for each result key: unique, and the same for the same set of keys in any order.

    An id from a COCO manifest (``ids``) is kept as the dataset's. Any other input gets its file stem, as an
    int when it is all digits (``000123.jpg`` -> 123, so numbered files match numeric ground-truth ids). Where
    that id would be shared (``000001.jpg`` and ``1.jpg``, ``a/x.jpg`` and ``b/x.jpg``, or a stem equal to a
    manifest id) every image involved gets its whole key instead: the path as given, unique in a results file.
    """
    keys = sorted(set(keys))  # the same answer whatever the order the results were written in
    fixed = {k: ids[k] for k in keys if ids.get(k) is not None}
    own: dict[str, Any] = {}
    for k in keys:
        if k not in fixed:
            stem = Path(k).stem
            own[k] = int(stem) if stem.isdigit() else stem
    while True:  # ends: each pass moves at least one key to its (unique) whole key, which never moves back
        taken = Counter(_id_key(v) for v in [*fixed.values(), *own.values()])
        clashing = [k for k, v in own.items() if taken[_id_key(v)] > 1 and v != k]
        if not clashing:
            return {**fixed, **own}
        own.update((k, k) for k in clashing)


def _id_key(value: Any) -> tuple[str, str]:
    # 1 and "1" are told apart as COCO tools do (json keeps the type), but compared without crashing on sorting.
    return type(value).__name__, str(value)


def write_coco_results(results: Iterable[dict[str, Any]], ids: dict[str, Any], out: str | Path) -> int:
    """Write captioned records as COCO results ``[{"image_id", "caption"}]``; returns how many were written.

    ``ids`` maps an input's ``image`` key to its dataset id (from a COCO manifest); other inputs get ids from
    :func:`coco_image_ids`.
    """
    records = [r for r in results if "caption" in r]
    image_ids = coco_image_ids((r["image"] for r in records), ids)
    payload = [{"image_id": image_ids[r["image"]], "caption": r["caption"]} for r in records]
    try:
        Path(out).write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{out}: cannot write COCO results ({exc.strerror or exc})") from None
    return len(payload)
