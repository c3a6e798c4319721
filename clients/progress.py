"""Progress of a batch run on stderr: a tqdm bar on a terminal, periodic one-line JSON records otherwise.

A bar redraws itself with carriage returns, which a log file or a pipe (``nohup``, a scheduler's log) shows
as nothing until the run ends, or as one huge line. Off a terminal, :class:`Progress` writes
``{"progress": {"done", "total", "percent", "images_per_second", "eta_s"}}`` lines instead, at most one per
``every_s`` seconds, and always one for the last batch, so a log shows how far a survey has come.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

DEFAULT_EVERY_S = 10.0


class Progress:
    """Counts images done out of ``total``; ``quiet`` shows nothing."""

    def __init__(
        self, total: int, quiet: bool = False, stream: TextIO | None = None, every_s: float = DEFAULT_EVERY_S
    ) -> None:
        self.total, self.every_s = total, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._start = self._last = time.monotonic()
        self._bar: Any = None
        self._lines = not quiet and not _isatty(self.stream)
        if not quiet and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self._lines and (now - self._last >= self.every_s or self.done >= self.total):
            self._last = now
            self.stream.write(json.dumps({"progress": self.snapshot(now)}) + "\n")
            self.stream.flush()

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Images done, the total, the rate so far and the time left at that rate."""
        elapsed = (now if now is not None else time.monotonic()) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.total - self.done)
        return {
            "done": self.done,
            "total": self.total,
            "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0,
            "images_per_second": round(rate, 3),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
        }

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without a terminal behind it
        return False
