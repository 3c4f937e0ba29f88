"""Robust image reading for the real benchmarks and user folders.

Real data sets are messy: CUB-200-2011 holds a few greyscale and CMYK JPEGs, product photos come as
palette PNGs with transparency, macOS leaves ``._*`` resource forks next to every file, and a
half-copied data set has truncated files. Every image that :func:`read_image` returns is an RGB
:class:`PIL.Image.Image`; a file that cannot be decoded raises :class:`CorruptImageError` naming the
file, so that a crash in a DataLoader worker says which file to look at.

Orientation: phone and camera JPEGs store the sensor's pixels plus an EXIF ``Orientation`` tag
that viewers apply. :func:`read_image` applies it too (:func:`PIL.ImageOps.exif_transpose`), so
an image is seen upright, as a person sees it, and the tag is dropped from the returned image. A
file whose EXIF block cannot be parsed is returned as decoded (orientation is metadata; the pixels
are fine).

Conversion rules (:func:`to_rgb`)
---------------------------------
- ``RGB``: unchanged.
- ``L``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: ``Image.convert("RGB")`` (Pillow inverts
  Adobe CMYK JPEGs while decoding).
- 16/32-bit greyscale (``I``, ``I;16*``) and float (``F``): scaled to 8 bit by the bit depth
  (``I;16``: ``v * 255 / 65535``; ``I``/``F``: ``v`` clipped to ``[0, 255]`` when the values fit, else
  by the image's maximum), then replicated to three channels.
- Any mode with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a ``transparency`` entry, ``La``,
  ``RGBa``): alpha-composited onto a solid ``background`` (default white, the usual backdrop of
  product photos), so transparent pixels do not show whatever colour the encoder left under them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from struct import error as struct_error

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

#: File name endings :func:`is_image_file` accepts (compared in lower case).
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)

#: DECISION: background for transparent pixels (white: product photos are shot on white).
DEFAULT_BACKGROUND = (255, 255, 255)

_ON_CORRUPT = ("raise", "skip")


class CorruptImageError(OSError):
    """An image file that cannot be read; ``path`` names it and ``reason`` says what failed."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")

    def __reduce__(self):  # keep the two arguments when sent back from a DataLoader worker
        return (type(self), (self.path, self.reason))


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a file name with an image ending that is not hidden (``._*`` or ``.*``).

    macOS ``._name.jpg`` resource forks and other dot-files are never images, whatever their ending.
    """
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """The image files directly inside ``folder`` (see :func:`is_image_file`), sorted by name."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))


def to_rgb(
    image: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND
) -> Image.Image:
    """Convert any Pillow mode to 8-bit ``RGB`` by the rules in the module docstring."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            values = values * (255.0 / 65535.0)
        elif values.size and (values.min() < 0 or values.max() > 255):
            lo, hi = float(values.min()), float(values.max())
            values = (values - lo) * (255.0 / (hi - lo if hi > lo else 1.0))
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """``image`` rotated/flipped as its EXIF Orientation tag says (unchanged without one)."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return image  # the common case: no copy
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct_error):
        return image  # unreadable EXIF block: keep the pixels as decoded


def read_image(
    path: str | os.PathLike, *, background: tuple[int, int, int] = DEFAULT_BACKGROUND
) -> Image.Image:
    """Open, fully decode and convert one image file to RGB.

    The whole file is decoded here (``Image.load``), so a truncated file fails now, with its name,
    and not later inside a transform. Pillow's global ``LOAD_TRUNCATED_IMAGES`` is never changed.
    The EXIF ``Orientation`` tag is applied (module docstring).

    Raises
    ------
    CorruptImageError
        The file is missing, not an image, truncated or otherwise undecodable; the message names it.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(_upright(img), background)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        if isinstance(err, CorruptImageError):
            raise
        raise CorruptImageError(path, f"{type(err).__name__}: {err}") from err


def check_on_corrupt(on_corrupt: str) -> str:
    """Validate the ``on_corrupt`` option (``"raise"`` or ``"skip"``)."""
    from dmlnb._validate import check_choice

    return check_choice("on_corrupt", on_corrupt, _ON_CORRUPT)


def find_corrupt_images(paths: Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """Decode every file in ``paths``; return ``(path, reason)`` for each that fails.

    Opens every image: an explicit, slow check (minutes for SOP), never run while listing a data set.
    """
    bad = []
    for p in paths:
        try:
            read_image(p)
        except CorruptImageError as err:
            bad.append((err.path, err.reason))
    return bad


__all__ = [
    "CorruptImageError",
    "DEFAULT_BACKGROUND",
    "IMAGE_EXTENSIONS",
    "check_on_corrupt",
    "find_corrupt_images",
    "is_image_file",
    "list_image_files",
    "read_image",
    "to_rgb",
]
