"""How training reads a dataset's images: through the library's decoder, the one the server uses.

Its own module, free of torch, so dataset tools (``reefcap data underwater``'s worker processes) import it
cheaply.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

from PIL import Image

from reefcap.models.images import ImageLimits, load_image


@cache
def training_image_limits() -> ImageLimits:
    """Serving's decoder without serving's input limits, for a dataset's own files.

    The limits guard a server against hostile uploads; a dataset on disk is the user's, and every image that
    ``Image.open`` read before must still load: any format PIL opens, any size (PIL's own decompression-bomb
    check, which applied before, still does).
    """
    Image.init()  # registers every plugin, so Image.OPEN lists all the formats PIL can read
    return ImageLimits(max_bytes=sys.maxsize, max_pixels=sys.maxsize, formats=tuple(Image.OPEN))


def load_training_image(path: Path) -> Image.Image:
    """A dataset image decoded exactly as the server decodes an upload (EXIF orientation, alpha on white, ...).

    One decoder for both keeps train and serve from seeing different pixels for a rotated or transparent image.
    """
    return load_image(path, training_image_limits())
