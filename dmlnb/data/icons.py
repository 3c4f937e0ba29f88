"""The ``icons`` data set: freedesktop icons drawn by Debian's icon themes, 64x64 RGB.

Class = icon name (``folder``, ``edit-copy``, ``media-playback-start``, ...); intra-class variation =
the theme that draws it, one image per theme family. Not shipped: the themes' licences (GPL-2-only,
GPL-3, LGPL, CC-BY-SA) allow no single redistributable file, so every machine builds its own copy
with ``dmlnb data build icons`` (:mod:`dmlnb.data.build_icons`) into ``$DMLNB_DATA/icons`` or
``~/.cache/dmlnb/icons``, or into ``root``.

Class-disjoint split (``icons_splits.json``): each class's split follows from a hash of its name
and the fixed seed (about 50 % test, 10 % validation, 40 % training classes), so a class keeps its
split on every machine. ``trainval`` = training + validation classes.

Every item has theme metadata (``dataset.metadata``, one row per image): ``image_id, name, theme,
family, variant, package, license, file, source_name, source_format, source_size``. ``family`` (the
Debian source package: Faenza, Faenza-Dark, ... are one family) and ``theme`` are the ground truth
of the intra-class structure, as the typeface is for ``glyphs``. A theme draws a name once, so
within a class ``theme`` never repeats; ``family`` repeats only with ``variants=True`` (recolours of
one design), which is when :func:`dmlnb.metrics.attribute_retrieval` can measure it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dmlnb.data.build_icons import default_cache_dir
from dmlnb.data.registry import register
from dmlnb.data.tensor import TensorImageDataset, check_options, class_subset, resize_uint8

OPTIONS = ("image_size", "max_per_class", "subset_seed", "transform", "variants")
FILES = ("icons.npz", "icons_manifest.csv", "icons_splits.json")
#: Metadata columns :func:`dmlnb.metrics.attribute_retrieval` can take as attributes.
ATTRIBUTES = ("theme", "family")


def data_dir(root: str | Path | None = None) -> Path:
    """The folder the built data set is read from: ``root``, else :func:`default_cache_dir`."""
    return Path(root) if root is not None else default_cache_dir()


def is_built(root: str | Path | None = None) -> bool:
    """Whether all files of a build are in :func:`data_dir`."""
    folder = data_dir(root)
    return all((folder / f).is_file() for f in FILES)


def _check_built(folder: Path) -> None:
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the icons data set is not built in {folder} (missing {', '.join(missing)}); build it "
            "with `dmlnb data build icons` (needs the Debian packages in "
            "dmlnb/data/_assets/icon_themes.txt and librsvg2-bin; see docs/icons.md)"
        )


@functools.lru_cache(maxsize=2)
def _load(folder: str, stamp: tuple[float, ...]) -> tuple[dict[str, np.ndarray], pd.DataFrame, dict]:
    """Arrays, manifest and split document of one build (``stamp``: file mtimes, for the cache)."""
    path = Path(folder)
    try:
        with np.load(path / "icons.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{path / 'icons.npz'} is unreadable ({err}); rebuild it with "
                           "`dmlnb data build icons`") from err
    manifest = pd.read_csv(path / "icons_manifest.csv", keep_default_na=False)
    doc = json.loads((path / "icons_splits.json").read_text())
    if len(manifest) != len(arrays["labels"]):
        raise RuntimeError(f"{path}: the manifest has {len(manifest)} rows for "
                           f"{len(arrays['labels'])} images; rebuild with `dmlnb data build icons`")
    return arrays, manifest, doc


def _read(root: str | Path | None) -> tuple[dict[str, np.ndarray], pd.DataFrame, dict]:
    folder = data_dir(root)
    _check_built(folder)
    stamp = tuple((folder / f).stat().st_mtime for f in FILES)
    return _load(str(folder.resolve()), stamp)


def published_split(root: str | Path | None = None) -> dict[str, list[str]]:
    """The build's class-disjoint split: ``{"train": names, "val": names, "test": names}``."""
    doc = _read(root)[2]
    return {k: list(doc[k]) for k in ("train", "val", "test")}


def split_classes(split: str, root: str | Path | None = None) -> list[str]:
    """The class names of ``split`` (``trainval``: train + val), sorted."""
    parts = published_split(root)
    if split == "trainval":
        return sorted(parts["train"] + parts["val"])
    return parts[split]


def load_icons(split: str, root: str | None = None, **options: Any) -> TensorImageDataset:
    """Load a split of the icons data set (built by ``dmlnb data build icons``).

    Options
    -------
    image_size : int, default: the built size (64)
        Resize (bilinear, antialiased) to this size at load time.
    max_per_class : int, optional
        Keep at most this many images (themes) per class (seeded by ``subset_seed``): quick runs.
    subset_seed : int, default 0
    transform : callable, optional
        Applied to each float image ``[3, H, W]``.
    variants : bool, default False
        Also keep the recolour variants (``variant`` column: a second theme of one family, e.g.
        Faenza-Dark next to Faenza). Off, a class holds one image per theme family.
    """
    check_options(options, OPTIONS, "icons")
    arrays, manifest, _ = _read(root)
    all_classes = [str(c) for c in arrays["classes"]]
    names = split_classes(split, root)
    class_ids = np.array([all_classes.index(c) for c in names], dtype=np.int64)
    originals = None if options.get("variants", False) else ~manifest["variant"].astype(bool).to_numpy()
    idx, labels = class_subset(arrays["labels"], class_ids, len(all_classes), options, originals)
    images = arrays["images"][idx]
    if options.get("image_size") is not None:
        images = resize_uint8(images, int(options["image_size"]))
    meta = manifest.iloc[idx].reset_index(drop=True)
    return TensorImageDataset(images, labels, names, metadata=meta, transform=options.get("transform"),
                              name="icons")


register("icons", load_icons, "icons of Debian's icon themes, 64x64 RGB, class = icon name, "
         "style = theme (built on each machine: `dmlnb data build icons`)")
