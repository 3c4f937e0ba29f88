"""The glyph gallery: characters (rows) by typefaces grouped by style (columns), as a PNG.

Image tiling itself is :func:`dmlnb.viz.mosaic`; this module only chooses what to show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmlnb.viz import image_png, mosaic

STYLES = ("serif", "sans", "mono", "script", "display")


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


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Save a uint8 image array as PNG (nearest-neighbour upscaled by ``scale``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(image_png(array, scale))
    tmp.replace(path)
    return path
