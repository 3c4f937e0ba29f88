"""Image grids as plain arrays and PNG files (no plotting library needed).

Used by the demo, the view galleries and the retrieval gallery; :mod:`dmlnb.viz` wraps the same
arrays into interactive plotly figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Images ``[N, H, W]``, ``[N, C, H, W]`` (float in [0, 1] or uint8) -> uint8 ``[N, H, W, C]``."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8:
        x = np.clip(np.round(x.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W] or [N, C, H, W], got shape {x.shape}")
    return x


def tile(
    images: np.ndarray | torch.Tensor,
    ncols: int,
    *,
    pad: int = 2,
    pad_value: int = 96,
    borders: np.ndarray | None = None,
) -> np.ndarray:
    """Tile ``N`` images row-major into a grid with ``ncols`` columns: uint8 ``[H', W', 3]``.

    ``borders`` (optional, ``[N, 3]`` uint8 RGB or -1 rows for none) colours each cell's padding, e.g.
    green / red for correct / wrong retrieval neighbours.
    """
    x = to_uint8(images)
    n, h, w, c = x.shape
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    nrows = max(1, -(-n // ncols))
    grid = np.full((nrows * (h + 2 * pad), ncols * (w + 2 * pad), 3), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y0, x0 = r * (h + 2 * pad), col * (w + 2 * pad)
        if borders is not None and borders[i][0] >= 0:
            grid[y0 : y0 + h + 2 * pad, x0 : x0 + w + 2 * pad] = borders[i]
        grid[y0 + pad : y0 + pad + h, x0 + pad : x0 + pad + w] = x[i]
    return grid


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Save a uint8 image array as PNG (nearest-neighbour upscaled by ``scale``), atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path


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
    for category in ("serif", "sans", "mono", "script", "display"):
        fonts = sorted(meta[(meta["category"] == category) & meta["font_id"].isin(complete)]["font_id"].unique())
        if not fonts:
            continue
        for fid in rng.choice(fonts, min(fonts_per_style, len(fonts)), replace=False):
            columns.append(int(fid))
            captions.append(f"{meta[meta.font_id == fid].family.iloc[0]} ({category})")
    key = {(c, f): i for i, (c, f) in enumerate(zip(meta["char"], meta["font_id"], strict=False))}
    order = [key[(ch, fid)] for ch in chars for fid in columns]
    images = dataset.images[torch.as_tensor(order)]
    return tile(images, ncols=len(columns)), captions
