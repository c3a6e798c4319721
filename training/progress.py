"""Progress that reads well wherever it goes: a live bar on a terminal, one plain line every
:data:`LINE_INTERVAL_S` seconds otherwise (a log file or CI gets dated progress, not carriage returns)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

LINE_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each redraw into one line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, enabled: bool = True, stream: TextIO | None = None, **kwargs: Any):
    """A tqdm bar on ``stream`` (stderr): live on a terminal, a line every 30 s elsewhere, nothing when disabled."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    if not enabled or stream.isatty():
        return tqdm(total=total, desc=desc, disable=not enabled, file=stream, **kwargs)
    options = {"mininterval": LINE_INTERVAL_S, "ascii": True, "ncols": 100, **kwargs}
    return tqdm(total=total, desc=desc, file=_Lines(stream), **options)
