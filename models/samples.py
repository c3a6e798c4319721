"""The sample photos that ship with the repository: 23 real underwater photos from EUVP (MIT licence).

They live in ``examples/photos/euvp/`` (``raw/`` as taken, ``enhanced/`` after enhancement, same file names;
see its README and LICENSE) so that a clone alone can run the tests, ``reefcap bench`` and ``reefcap data
report``. They are not package data: an installed wheel has no ``examples/``, and callers then pass their own
folder, or name one in ``$REEFCAP_SAMPLES`` (as the GPU check does for tests run against an installed copy).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ReefcapError

REPO = Path(__file__).resolve().parents[1]
EUVP_DIR = REPO / "examples" / "photos" / "euvp"
KINDS = ("raw", "enhanced")


def sample_photos(kind: str = "raw", folder: str | Path | None = None) -> list[Path]:
    """The EUVP sample photos of ``kind`` (``raw`` or ``enhanced``), in numeric order (1.jpg, 2.jpg, ...).

    ``folder`` (else ``$REEFCAP_SAMPLES``) replaces the bundled ``examples/photos/euvp``; it must hold ``raw/``
    and ``enhanced/``.
    """
    if kind not in KINDS:
        raise ReefcapError(f"sample photo kind must be one of {', '.join(KINDS)}, got {kind!r}")
    root = Path(folder or os.environ.get("REEFCAP_SAMPLES") or EUVP_DIR)
    # (length, name) orders the numbered files as numbers: 2.jpg before 10.jpg.
    photos = sorted((root / kind).glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))
    if not photos:
        raise ReefcapError(
            f"no sample photos under {root / kind}; they ship in the source repository (examples/photos)"
        )
    return photos
