"""The embedded ``glyphs`` data set: real typefaces rendered as 32x32 character images.

Class = character (62: ``0-9 A-Z a-z``); intra-class variation = typeface (878 fonts from 230
families in Debian's font packages). Built by `tools/build_glyphs.py` in the repository; shipped in the package.

Published class-disjoint split (``_assets/glyphs_splits.json``, seed 20210202): 31 test characters,
6 validation characters and 25 training characters. ``trainval`` = training + validation characters.

Every item has typeface metadata (``dataset.metadata``, one row per image): ``char, font_id, family,
subfamily, weight, italic, category, package, file, license``; it is the ground truth for the
intra-class structure that the self-supervised ranking is meant to keep.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pandas as pd

from dmlnb.data.assets import ASSETS
from dmlnb.data.registry import register
from dmlnb.data.tensor import TensorImageDataset, check_options, class_subset, resize_uint8

OPTIONS = ("image_size", "max_per_class", "subset_seed", "transform")


@functools.lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    path = ASSETS / "glyphs.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise RuntimeError(f"the embedded glyph data file {path} is missing or corrupt ({err}); "
                           "reinstall dmlnb or rebuild it with `make glyphs`") from err
    arrays["charset"] = str(arrays["charset"].reshape(-1)[0])
    return arrays


@functools.lru_cache(maxsize=1)
def manifest() -> pd.DataFrame:
    """The font manifest: one row per font (``font_id`` is the row number)."""
    return pd.read_csv(ASSETS / "glyphs_manifest.csv", keep_default_na=False)


@functools.lru_cache(maxsize=1)
def published_split() -> dict[str, list[str]]:
    """The published class-disjoint split: ``{"train": chars, "val": chars, "test": chars}``."""
    doc = json.loads((ASSETS / "glyphs_splits.json").read_text())
    return {k: list(doc[k]) for k in ("train", "val", "test")}


def split_characters(split: str) -> list[str]:
    """The characters (classes) of ``split``, in charset order."""
    parts = published_split()
    if split == "trainval":
        charset = _arrays()["charset"]
        chosen = set(parts["train"]) | set(parts["val"])
        return [c for c in charset if c in chosen]
    return parts[split]


def load_glyphs(split: str, root: str | None = None, **options: Any) -> TensorImageDataset:
    """Load a split of the glyph data set.

    Options
    -------
    image_size : int, default 32
        Resize (bilinear, antialiased) to this size at load time.
    max_per_class : int, optional
        Keep at most this many typefaces per character (seeded by ``subset_seed``): quick runs.
    subset_seed : int, default 0
    transform : callable, optional
        Applied to each float image ``[1, H, W]``.
    """
    check_options(options, OPTIONS, "glyphs")
    data = _arrays()
    charset = data["charset"]
    chars = split_characters(split)
    class_ids = np.array([charset.index(c) for c in chars])
    idx, labels = class_subset(data["labels"], class_ids, len(charset), options)
    images = data["images"][idx]
    if "image_size" in options and options["image_size"] is not None:
        images = resize_uint8(images, int(options["image_size"]))
    fonts = manifest().set_index("font_id")
    meta = fonts.loc[data["font_ids"][idx]].reset_index()
    meta.insert(0, "char", [charset[i] for i in data["labels"][idx]])
    return TensorImageDataset(images, labels, chars, metadata=meta, transform=options.get("transform"),
                              name="glyphs")


register("glyphs", load_glyphs, "real typefaces rendered as 32x32 characters (embedded, 62 classes)")
