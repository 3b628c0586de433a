"""Bounds on the conditioning image (--image), checked from its header before a single pixel is decoded.

An image file is small on disk but its decoded size is not: a 1.2 MB PNG can declare 121 Mpx, which costs about
2.9 GB by the time it is an RGB array and a float tensor. Pillow's ``Image.open`` reads only the header, so the
declared size is known for free; anything over the cap is refused with one line. The pipeline resizes the image to the
video's area (about 0.4 Mpx at 480p, 0.9 Mpx at 720p) right after, so the cap only has to admit real photos.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

from wanpack.errors import UsageError

MAX_IMAGE_PIXELS = 64_000_000  # 8K UHD (33 Mpx) and 48/50 Mpx phone photos pass; decoding this costs ~1.5 GB


def _too_large(path: str | os.PathLike, what: str) -> UsageError:
    return UsageError(f"--image {path}: {what}, more than the {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx wanpack decodes - "
                      "downscale it first (the video is at most 1280x720 anyway)")  # fmt: skip


@contextlib.contextmanager
def open_bounded(path: str | os.PathLike) -> Iterator:
    """``PIL.Image.open`` that refuses an image declaring more than MAX_IMAGE_PIXELS, before decoding it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow warns from 89 Mpx on; the cap below is stricter, and one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:  # Pillow's own, far higher limit: the header alone was enough to refuse
        raise _too_large(path, "its header declares a decompression bomb") from None
    with im:
        width, height = im.size
        if width * height > MAX_IMAGE_PIXELS:
            raise _too_large(path, f"{width}x{height} is {width * height / 1e6:.0f} Mpx")
        yield im
