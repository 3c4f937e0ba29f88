"""The galleries of the data sets, as PNGs: glyphs (characters by typefaces grouped by style)
and icons (icon names by theme families).

Image tiling itself is :func:`dmlnb.viz.mosaic`; this module only chooses what to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dmlnb.viz import image_png, label_mosaic, mosaic

STYLES = ("serif", "sans", "mono", "script", "display")
#: Families the icons gallery leaves out: gnome-colors is GPL-2 only and cannot join the GPL-3
#: parts of the other themes in one image (docs/icons.md, "Licence").
ICONS_EXCLUDED_FAMILIES = ("gnome-colors",)


def glyph_gallery(dataset, chars: str, fonts_per_style: int = 2, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A grid of glyphs: one row per character of ``chars``, columns = typefaces grouped by style.

    The same typefaces are used in every row (those that draw all of ``chars``), ``fonts_per_style``
    per style category, chosen with ``numpy.random.default_rng(seed)``. Returns the tiled uint8 grid
    and the column captions (``family (category)``).
    """
    meta = dataset.metadata
    rng = np.random.default_rng(seed)
    has_all = meta[meta["char"].isin(list(chars))].groupby("font_id")["char"].nunique()
    complete = set(has_all[has_all == len(chars)].index)
    columns, captions = [], []
    for category in STYLES:
        fonts = sorted(meta[(meta["category"] == category) & meta["font_id"].isin(complete)]["font_id"].unique())
        for fid in rng.choice(fonts, min(fonts_per_style, len(fonts)), replace=False) if fonts else []:
            columns.append(int(fid))
            captions.append(f"{meta[meta.font_id == fid].family.iloc[0]} ({category})")
    key = {(c, f): i for i, (c, f) in enumerate(zip(meta["char"], meta["font_id"], strict=True))}
    rows = [[dataset.images[key[(ch, fid)]] for fid in columns] for ch in chars]
    return mosaic(rows, background=96), captions


def glyph_column_label(caption: str, width: int = 9) -> str:
    """A short column label for :func:`glyph_gallery`'s caption ``family (category)``: the
    family's first word, cut to ``width`` characters (the columns come grouped by category)."""
    family, _, _category = caption.rpartition(" (")
    return (family or caption).split()[0][:width]


def write_glyph_gallery(path: str | Path, dataset, chars: str, fonts_per_style: int = 2,
                        seed: int = 0, scale: int = 3) -> tuple[Path, list[str]]:
    """Write :func:`glyph_gallery` as a labelled PNG: rows by character, columns by typeface
    (:func:`glyph_column_label`). Returns the path and the full column captions."""
    grid, captions = glyph_gallery(dataset, chars, fonts_per_style=fonts_per_style, seed=seed)
    labelled = label_mosaic(grid, len(chars), len(captions), list(chars),
                            [glyph_column_label(c) for c in captions], scale=scale, font_size=11)
    return save_png(labelled, path), captions


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Save a uint8 image array as PNG (nearest-neighbour upscaled by ``scale``), atomically."""
    from dmlnb.runs import write_bytes

    return write_bytes(path, image_png(array, scale))


def icons_gallery(
    dataset,
    n_classes: int = 10,
    n_families: int = 12,
    classes: Sequence[str] | None = None,
    exclude_families: Sequence[str] = ICONS_EXCLUDED_FAMILIES,
) -> tuple[np.ndarray, list[str], list[str]]:
    """A grid of icons: one row per class, one column per theme family, with their labels.

    Rows: ``classes``, else the ``n_classes`` classes drawn by the most families (ties by name).
    Columns: the ``n_families`` families that draw the most of those rows (ties by name), labelled
    by the theme that draws most of the column; ``exclude_families`` never appear (by default the
    GPL-2-only one, so that the collage can be distributed under GPL-3-or-later). A missing drawing
    is a blank cell. Returns the tiled uint8 grid, the row labels and the column labels.
    """
    meta = dataset.metadata
    if meta is None or not {"name", "family", "theme"} <= set(meta.columns):
        raise ValueError("icons_gallery needs a dataset with the icons metadata (name, family, theme)")
    if classes is None:
        width = meta.groupby("name")["family"].nunique()
        classes = sorted(width.index, key=lambda c: (-width[c], c))[:n_classes]
    rows_meta = meta[meta["name"].isin(list(classes)) & ~meta["family"].isin(list(exclude_families))]
    cover = rows_meta.groupby("family")["name"].nunique()
    families = sorted(cover.index, key=lambda f: (-cover[f], f))[:n_families]
    labels = []
    for f in families:
        counts = rows_meta[rows_meta.family == f]["theme"].value_counts()
        labels.append(str(min(counts.index, key=lambda t, c=counts: (-c[t], t))))
    where = {(n, f): i for i, (n, f) in enumerate(zip(meta["name"], meta["family"], strict=True))}
    grid = [[dataset.images[where[(c, f)]] if (c, f) in where else None for f in families]
            for c in classes]
    return mosaic(grid, background=255, pad=2, border=0), list(classes), labels


def write_icons_gallery(
    path: str | Path = "figures/icons_gallery.png",
    root: str | Path | None = None,
    split: str = "test",
    scale: int = 2,
    **options: Any,
) -> Path:
    """Write :func:`icons_gallery` of ``split`` of the built icons data set as a labelled PNG."""
    from dmlnb.data.icons import load_icons

    dataset = load_icons(split, None if root is None else str(root))
    grid, rows, cols = icons_gallery(dataset, **options)
    return save_png(label_mosaic(grid, len(rows), len(cols), rows, cols, scale=scale, font_size=13), path)
