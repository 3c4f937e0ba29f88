"""Plotly figures for the notebooks and the README: curves, tables, galleries, embedding maps.

Every function takes plain arrays / DataFrames (never a model or a run object) and returns a
:class:`plotly.graph_objects.Figure`, so each is testable on its own and usable outside dmlnb.

Images
    :func:`to_uint8` accepts ``[H, W]``, ``[C, H, W]`` (C = 1 or 3, as torch keeps them) or
    ``[H, W, C]`` arrays or tensors, float in ``[0, 1]`` or uint8. :func:`mosaic` tiles a grid of
    them (optionally with coloured borders); galleries are one ``go.Image`` of a mosaic, so a figure
    stays small however many thumbnails it shows.
Embedding maps
    :func:`project_2d` (UMAP, or PCA as the fast fallback), :func:`embedding_scatter` whose points
    carry a PNG thumbnail of their image in ``customdata[0]`` (a ``data:image/png;base64`` URI),
    :func:`side_by_side` and :func:`trajectories` (one image's views as strength rises).
Hover images
    Plotly's hover labels cannot show pictures. :func:`write_html` and :func:`show` add a small
    script (:data:`HOVER_IMAGE_JS`) that displays ``customdata[0]`` next to the cursor; in the
    exported HTML this works offline (plotly.js is embedded).
Export
    :func:`write_html` (self-contained) and :func:`write_png` (kaleido if installed, else a
    headless Chromium screenshot through Playwright).
Stored notebooks
    In a kernel started headless (:func:`static_figures`: ``$DMLNB_STATIC_FIGURES``, which
    :func:`dmlnb.execute.run_notebook` sets), every figure displayed (:func:`show`, ``fig.show()``,
    a figure as a cell's value) is stored as :func:`figure_bundle`: plotly's JupyterLab mimetype
    and a PNG, which GitHub, nbviewer and nbconvert's HTML show.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dmlnb._validate import check_choice, check_positive_int

__all__ = [
    "CORRECT_COLOR",
    "HOVER_IMAGE_JS",
    "WRONG_COLOR",
    "ablation_chart",
    "curves",
    "embedding_scatter",
    "SETTING_COLOURS",
    "setting_colour",
    "format_mean_std",
    "image_data_uri",
    "image_png",
    "label_mosaic",
    "metric_table",
    "mosaic",
    "mosaic_figure",
    "project_2d",
    "retrieval_gallery",
    "STATIC_FIGURES_ENV",
    "figure_bundle",
    "figure_png",
    "install_static_renderer",
    "show",
    "static_figures",
    "side_by_side",
    "similarity_curve",
    "to_uint8",
    "trajectories",
    "view_gallery",
    "write_html",
    "write_png",
    "write_pngs",
]

CORRECT_COLOR = (46, 160, 67)  # green border: neighbour shares the query's class
WRONG_COLOR = (215, 48, 39)  # red border: neighbour from another class
QUERY_COLOR = (60, 60, 60)
PROJECTIONS = ("umap", "pca")
_QUALITATIVE = (  # plotly's D3 + Set1-like palette; classes beyond cycle
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
)

#: one colour per study setting, in every figure of the package (others: :func:`setting_colour`)
SETTING_COLOURS = {"untrained": "#7f7f7f", "baseline": "#1f77b4", "ssr": "#d62728"}
_EXTRA_SETTING_COLOURS = ("#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
                          "#bcbd22", "#393b79")


def setting_colour(name: str) -> str:
    """The colour of a study setting (``baseline``, ``ssr``, ``ssr, ssr_weight=2``, ...): fixed
    for the three main ones, and for any other one the same in every figure and every session
    (picked by a stable hash of the name, not by the order of appearance)."""
    import zlib

    if name in SETTING_COLOURS:
        return SETTING_COLOURS[name]
    return _EXTRA_SETTING_COLOURS[zlib.crc32(name.encode()) % len(_EXTRA_SETTING_COLOURS)]


# --- images --------------------------------------------------------------------------------------
def to_uint8(image: Any) -> np.ndarray:
    """Return ``image`` as a uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB) numpy array.

    Accepts numpy arrays or torch tensors shaped ``[H, W]``, ``[1|3, H, W]`` or ``[H, W, 1|3]``;
    floats are taken to lie in ``[0, 1]`` (clipped), integers in ``[0, 255]``.
    """
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    elif arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # ambiguous [C, H, W] vs [H, W, C] of tiny images: torch order
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"image must be [H, W], [C, H, W] or [H, W, C] with C in (1, 3); got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool:
        return (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _rgb(arr: np.ndarray) -> np.ndarray:
    return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr


def image_png(image: Any, scale: int = 1) -> bytes:
    """PNG bytes of ``image`` (see :func:`to_uint8`), enlarged ``scale`` times (nearest neighbour)."""
    from PIL import Image

    check_positive_int("scale", scale)
    arr = to_uint8(image)
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_data_uri(image: Any, scale: int = 1) -> str:
    """``data:image/png;base64,...`` URI of ``image`` (for hovers and ``go.Image(source=...)``)."""
    return "data:image/png;base64," + base64.b64encode(image_png(image, scale)).decode("ascii")


def mosaic(
    images: Any,
    borders: Any = None,
    pad: int = 2,
    border: int = 2,
    background: int = 255,
) -> np.ndarray:
    """Tile a ``[rows, cols]`` grid of equally sized images into one uint8 ``[H, W, 3]`` array.

    Parameters
    ----------
    images : array-like ``[rows, cols, ...image]`` or nested lists
        Each item as accepted by :func:`to_uint8`; ``None`` leaves a blank cell.
    borders : ``[rows, cols]`` of RGB tuples or None, optional
        A frame of ``border`` pixels around each cell (``None`` in a cell: no frame).
    pad, border : int
        Pixels between cells; frame width.
    background : int
        Grey level of the background.
    """
    rows = [list(r) for r in images]
    if not rows or not rows[0]:
        raise ValueError("images must be a non-empty [rows, cols] grid")
    n_cols = max(len(r) for r in rows)
    first = next(to_uint8(im) for r in rows for im in r if im is not None)
    h, w = first.shape[:2]
    cell_h, cell_w = h + 2 * border, w + 2 * border
    out = np.full(
        (len(rows) * (cell_h + pad) + pad, n_cols * (cell_w + pad) + pad, 3), background, np.uint8
    )
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            if im is None:
                continue
            arr = _rgb(to_uint8(im))
            if arr.shape[:2] != (h, w):
                raise ValueError(f"all images must share one size; cell ({i}, {j}) is {arr.shape[:2]}, "
                                 f"the first is {(h, w)}")
            y, x = pad + i * (cell_h + pad), pad + j * (cell_w + pad)
            colour = None if borders is None else borders[i][j]
            if colour is not None:
                out[y:y + cell_h, x:x + cell_w] = colour
            out[y + border:y + border + h, x + border:x + border + w] = arr
    return out


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:  # pragma: no cover - older Pillow: the small bitmap font
        return ImageFont.load_default()


def label_mosaic(
    tiles: np.ndarray,
    n_rows: int,
    n_cols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    scale: int = 3,
    font_size: int = 14,
) -> np.ndarray:
    """Enlarge a :func:`mosaic` ``scale`` times and write row labels on its left and column
    labels above it (Pillow), so that labels and cells line up in every export."""
    from PIL import Image, ImageDraw

    big = tiles.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = big.shape[:2]
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda t: probe.textlength(str(t), font=font)  # noqa: E731
    left = int(max((text_w(t) for t in row_labels), default=0) + 12) if row_labels else 0
    top = font_size + 10 if col_labels else 0
    canvas = Image.new("RGB", (w + left, h + top), "white")
    canvas.paste(Image.fromarray(big), (left, top))
    d = ImageDraw.Draw(canvas)
    for j, text in enumerate(col_labels or []):
        x = left + (j + 0.5) * w / n_cols - text_w(text) / 2
        d.text((x, 3), str(text), fill=(40, 40, 40), font=font)
    for i, text in enumerate(row_labels or []):
        y = top + (i + 0.5) * h / n_rows - font_size / 2
        d.text((left - 8 - text_w(text), y), str(text), fill=(40, 40, 40), font=font)
    return np.asarray(canvas)


def mosaic_figure(
    tiles: np.ndarray,
    n_rows: int,
    n_cols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    scale: int = 3,
) -> go.Figure:
    """A figure showing a :func:`mosaic` (enlarged ``scale`` times) with row and column labels
    drawn into the picture (:func:`label_mosaic`)."""
    big = label_mosaic(tiles, n_rows, n_cols, row_labels, col_labels, scale)
    height, width = big.shape[:2]
    fig = go.Figure(go.Image(source=image_data_uri(big), hoverinfo="skip"))
    top = 50 if title else 10
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left"),
        width=width + 20, height=height + top + 10,
        margin=dict(l=10, r=10, t=top, b=10), plot_bgcolor="white", paper_bgcolor="white",
    )
    fig.update_xaxes(visible=False, range=[-0.5, width - 0.5])
    fig.update_yaxes(visible=False, range=[height - 0.5, -0.5])
    return fig


def view_gallery(
    views: Any,
    row_labels: Sequence[str],
    strengths: Sequence[float] | None = None,
    title: str | None = "Views of increasing strength",
    scale: int = 3,
) -> go.Figure:
    """Gallery of views: one row per family (or image), one column per level n = 0..N.

    ``views`` is ``[rows, levels + 1, C, H, W]`` (column 0 the original); ``strengths`` the t_n of
    each column for the labels (``t = tanh(sigma n)`` by default in :mod:`dmlnb.views`).
    """
    views = np.asarray(views.detach().cpu() if hasattr(views, "detach") else views)
    if views.ndim < 4:
        raise ValueError(f"views must be [rows, levels + 1, C, H, W]; got shape {views.shape}")
    n_rows, n_cols = views.shape[:2]
    if len(row_labels) != n_rows:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {n_rows} rows")
    if strengths is not None and len(strengths) != n_cols:
        raise ValueError(f"strengths has {len(strengths)} entries for {n_cols} columns")
    col_labels = [
        ("original" if n == 0 else f"n={n}") + (f", t={strengths[n]:.2f}" if strengths is not None else "")
        for n in range(n_cols)
    ]
    tiles = mosaic(views, pad=4, border=0)
    return mosaic_figure(tiles, n_rows, n_cols, row_labels, col_labels, title, scale)


def retrieval_gallery(
    query_images: Any,
    neighbor_images: Any,
    correct: Any,
    query_labels: Sequence[str] | None = None,
    title: str | None = "Retrieval: queries and their nearest neighbours",
    scale: int = 3,
) -> go.Figure:
    """Queries (first column, grey frame) with their top-K neighbours, framed green if the
    neighbour shares the query's class and red if not.

    ``query_images`` is ``[Q, ...image]``, ``neighbor_images`` ``[Q, K, ...image]`` in rank order,
    ``correct`` a boolean ``[Q, K]``.
    """
    correct = np.asarray(correct, dtype=bool)
    q = len(query_images)
    if correct.ndim != 2 or correct.shape[0] != q or len(neighbor_images) != q:
        raise ValueError(f"need Q={q} rows in neighbor_images and correct [Q, K]; got correct "
                         f"{correct.shape}, {len(neighbor_images)} neighbour rows")
    k = correct.shape[1]
    grid = [[query_images[i]] + [neighbor_images[i][j] for j in range(k)] for i in range(q)]
    borders = [[QUERY_COLOR] + [CORRECT_COLOR if c else WRONG_COLOR for c in row] for row in correct]
    tiles = mosaic(grid, borders=borders, pad=3, border=2)
    col_labels = ["query"] + [f"#{j + 1}" for j in range(k)]
    fig = mosaic_figure(tiles, q, k + 1, query_labels, col_labels, title, scale)
    fig.update_layout(meta={"precision_at_k": float(correct.mean())})
    return fig


# --- curves and tables ---------------------------------------------------------------------------
def curves(
    history: pd.DataFrame | Sequence[Mapping[str, Any]],
    x: str,
    panels: Mapping[str, Sequence[str]],
    title: str | None = None,
    height_per_panel: int = 220,
) -> go.Figure:
    """Line charts of logged values, one panel per entry of ``panels`` (shared x axis).

    ``history`` holds one row per log record (e.g. the lines of ``metrics.jsonl``); each panel
    ``{"loss": ["loss_metric", "loss_rank"], ...}`` draws the listed columns against ``x``,
    skipping rows where a column is missing. Columns absent from ``history`` are left out; a
    panel with none of its columns present is dropped. Raises if nothing at all can be drawn.
    """
    df = history if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    if x not in df.columns:
        raise ValueError(f"x={x!r} is not a column; columns are: {', '.join(map(str, df.columns))}")
    present = {name: [c for c in cols if c in df.columns and df[c].notna().any()]
               for name, cols in panels.items()}
    present = {k: v for k, v in present.items() if v}
    if not present:
        wanted = sorted({c for cols in panels.values() for c in cols})
        raise ValueError(f"none of the columns {wanted} has values; columns are: "
                         f"{', '.join(map(str, df.columns))}")
    fig = make_subplots(rows=len(present), cols=1, shared_xaxes=True,
                        subplot_titles=list(present), vertical_spacing=0.08)
    for i, (_name, cols) in enumerate(present.items(), 1):
        for col in cols:
            part = df[[x, col]].dropna()
            fig.add_trace(go.Scatter(x=part[x], y=part[col], mode="lines+markers" if len(part) < 30
                                     else "lines", name=col, legendgroup=str(i)), row=i, col=1)
    fig.update_xaxes(title_text=x, row=len(present), col=1)
    fig.update_layout(title=title, height=80 + height_per_panel * len(present), width=720,
                      legend=dict(tracegroupgap=height_per_panel - 60), template="plotly_white")
    return fig


def format_mean_std(
    summary: pd.DataFrame,
    metrics: Sequence[str],
    digits: int = 3,
    keep: Sequence[str] = (),
) -> pd.DataFrame:
    """Turn ``<m>_mean`` / ``<m>_std`` columns (see :func:`dmlnb.sweep.summarize`) into
    ``"0.612 ± 0.010"`` strings, one column per metric; ``keep`` columns are copied first.
    A single run (``std`` NaN) shows the mean alone."""
    out = summary[list(keep)].copy()
    for m in metrics:
        mean, std = summary[f"{m}_mean"], summary[f"{m}_std"]
        out[m] = [
            f"{a:.{digits}f}" + ("" if pd.isna(s) else f" ± {s:.{digits}f}") if pd.notna(a) else "-"
            for a, s in zip(mean, std, strict=True)
        ]
    if "n" in summary.columns:
        out["n"] = summary["n"].to_numpy()
    return out


def metric_table(
    table: pd.DataFrame | Mapping[str, Mapping[str, Any]],
    digits: int = 3,
    title: str | None = None,
    index_name: str = "",
) -> go.Figure:
    """A plotly table of metrics; floats rounded to ``digits``.

    ``table`` is a DataFrame (its index shown as the first column when it is not a plain range)
    or ``{row name: {metric: value}}``.
    """
    df = pd.DataFrame(table).T if isinstance(table, Mapping) else table.copy()
    if not isinstance(df.index, pd.RangeIndex):
        df = df.reset_index(names=index_name or (df.index.name or ""))

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "-" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    cells = [[fmt(v) for v in df[c]] for c in df.columns]
    fig = go.Figure(go.Table(
        header=dict(values=[f"<b>{c}</b>" for c in df.columns], fill_color="#e8eef7", align="left"),
        cells=dict(values=cells, align="left", height=24),
    ))
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=40 if title else 10, b=10),
                      height=60 + 26 * len(df) + (30 if title else 0), width=max(500, 110 * len(df.columns)))
    return fig


def ablation_chart(
    summary: pd.DataFrame,
    x: str,
    metric: str,
    color: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Mean (a dot) with ``<metric>_std`` error bars of ``<metric>_mean`` against setting ``x``,
    grouped by ``color`` (e.g. ``ssr``); the summary comes from :func:`dmlnb.sweep.summarize`.

    Dots, not bars from 0: the y axis fits the means and their spread, so that differences of
    0.01 between settings stay visible (a bar's length from 0 would hide them). Settings named
    ``baseline``/``ssr``/... get their colour of :func:`setting_colour`; groups of ``color`` get
    one colour each and a legend entry."""
    for col in [x, f"{metric}_mean", f"{metric}_std"] + ([color] if color else []):
        if col not in summary.columns:
            raise ValueError(f"column {col!r} is not in the summary; columns are: "
                             f"{', '.join(map(str, summary.columns))}")
    fig = go.Figure()
    groups = [(None, summary)] if color is None else list(summary.groupby(color, sort=False))
    for i, (key, part) in enumerate(groups):
        value = key[0] if isinstance(key, tuple) else key
        if key is None:
            colours = [setting_colour(str(v)) for v in part[x]]
        else:
            colours = _QUALITATIVE[i % len(_QUALITATIVE)]
        fig.add_trace(go.Scatter(
            x=part[x].astype(str), y=part[f"{metric}_mean"], mode="markers",
            marker=dict(size=11, color=colours),
            error_y=dict(type="data", array=part[f"{metric}_std"].fillna(0.0), visible=True),
            name=str(metric if key is None else f"{color}={value}"),
        ))
    fig.update_layout(scattermode="group", title=title or f"{metric} (mean ± std over seeds)",
                      xaxis_title=x, yaxis_title=metric, template="plotly_white", height=400,
                      showlegend=color is not None, autosize=True)
    return fig


# --- embedding maps ------------------------------------------------------------------------------
def project_2d(
    embeddings: Any,
    method: str = "umap",
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
) -> np.ndarray:
    """Project ``[n, d]`` embeddings to ``[n, 2]`` with UMAP (McInnes et al. 2018) or PCA.

    UMAP (umap-learn) with ``random_state=seed`` is deterministic (and then single-threaded);
    the first fit in a process pays ~15 s of numba compilation. ``method="pca"`` is the fast,
    exact fallback (scikit-learn PCA on the centred embeddings, sign-fixed so that the largest
    coordinate of each component is positive).
    """
    check_choice("method", method, PROJECTIONS)
    x = np.asarray(embeddings.detach().cpu() if hasattr(embeddings, "detach") else embeddings,
                   dtype=np.float32)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"embeddings must be [n >= 3, d]; got shape {x.shape}")
    if method == "pca":
        from sklearn.decomposition import PCA

        coords = PCA(n_components=2, random_state=seed).fit_transform(x)
        signs = np.sign(coords[np.abs(coords).argmax(axis=0), [0, 1]])
        return (coords * np.where(signs == 0, 1, signs)).astype(np.float32)
    import umap

    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(x) - 1),
                        min_dist=min_dist, metric=metric, random_state=seed,
                        n_jobs=1)  # a seed makes UMAP single-threaded anyway; say so
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def _palette(values: Sequence[Any]) -> dict[Any, str]:
    uniq = list(dict.fromkeys(values))
    return {v: _QUALITATIVE[i % len(_QUALITATIVE)] for i, v in enumerate(uniq)}


def embedding_scatter(
    coords: Any,
    color: Sequence[Any],
    *,
    images: Any = None,
    hover: Mapping[str, Sequence[Any]] | None = None,
    color_name: str = "class",
    title: str | None = None,
    highlight: Any = None,
    marker_size: int = 7,
    fig: go.Figure | None = None,
    row: int | None = None,
    col: int | None = None,
    showlegend: bool = True,
) -> go.Figure:
    """Scatter of 2-d points coloured by a categorical ``color`` (class, or a typeface attribute).

    Parameters
    ----------
    coords : ``[n, 2]``
    color : length-n sequence of categories; one trace per category (legend toggles it).
    images : ``[n, ...image]``, optional
        Each point carries the PNG data URI of its image in ``customdata[0]`` (shown on hover
        by :func:`write_html` / :func:`show`).
    hover : ``{name: values}``, optional
        Extra fields shown in the hover label.
    highlight : boolean mask ``[n]``, optional
        Points outside the mask are drawn as a faint grey background (a selected class over all).
    fig, row, col
        Draw into an existing (sub)plot instead of a new figure.
    """
    xy = np.asarray(coords, dtype=float)
    n = len(xy)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords must be [n, 2]; got shape {xy.shape}")
    color = list(color)
    if len(color) != n:
        raise ValueError(f"color has {len(color)} entries for {n} points")
    hover = dict(hover or {})
    for name, values in hover.items():
        if len(values) != n:
            raise ValueError(f"hover[{name!r}] has {len(values)} entries for {n} points")
    if images is not None and len(images) != n:
        raise ValueError(f"images has {len(images)} entries for {n} points")
    mask = np.ones(n, bool) if highlight is None else np.asarray(highlight, dtype=bool)
    uris = [image_data_uri(images[i]) if (images is not None and mask[i]) else "" for i in range(n)]
    fig = fig if fig is not None else go.Figure()
    kw = {} if row is None else {"row": row, "col": col}
    if highlight is not None and (~mask).any():
        fig.add_trace(go.Scattergl(x=xy[~mask, 0], y=xy[~mask, 1], mode="markers", name="other",
                                   marker=dict(color="lightgrey", size=marker_size - 2),
                                   hoverinfo="skip", showlegend=showlegend), **kw)
    names = [color_name] + list(hover)
    template = "<br>".join(f"{nm}: %{{customdata[{i + 1}]}}" for i, nm in enumerate(names))
    palette = _palette([color[i] for i in np.flatnonzero(mask)])
    for value, hexcolor in palette.items():
        idx = [i for i in np.flatnonzero(mask) if color[i] == value]
        custom = [[uris[i], str(color[i])] + [str(hover[h][i]) for h in hover] for i in idx]
        fig.add_trace(go.Scatter(
            x=xy[idx, 0], y=xy[idx, 1], mode="markers", name=str(value), legendgroup=str(value),
            marker=dict(color=hexcolor, size=marker_size, line=dict(width=0.5, color="white")),
            customdata=custom, hovertemplate=template + "<extra></extra>", showlegend=showlegend,
        ), **kw)
    if row is None:
        fig.update_layout(title=title, template="plotly_white", width=700, height=560,
                          legend_title_text=color_name)
        fig.update_xaxes(showticklabels=False)
        fig.update_yaxes(showticklabels=False)
    return fig


def side_by_side(
    coords: Sequence[Any],
    color: Sequence[Any],
    titles: Sequence[str],
    *,
    images: Any = None,
    hover: Mapping[str, Sequence[Any]] | None = None,
    color_name: str = "class",
    title: str | None = None,
    highlight: Any = None,
) -> go.Figure:
    """Several maps of the same items next to each other (e.g. baseline vs SSR), same colours."""
    if len(coords) != len(titles):
        raise ValueError(f"{len(coords)} coordinate sets but {len(titles)} titles")
    fig = make_subplots(rows=1, cols=len(coords), subplot_titles=list(titles), horizontal_spacing=0.04)
    for j, xy in enumerate(coords, 1):
        embedding_scatter(xy, color, images=images, hover=hover, color_name=color_name, fig=fig,
                          row=1, col=j, showlegend=(j == 1), highlight=highlight)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=title, template="plotly_white", width=560 * len(coords), height=560,
                      legend_title_text=color_name)
    return fig


def trajectories(
    coords: Any,
    strengths: Sequence[float],
    *,
    background: Any = None,
    background_color: Sequence[Any] | None = None,
    labels: Sequence[str] | None = None,
    images: Any = None,
    upto: float | None = None,
    title: str | None = "Views moving through the embedding as strength rises",
    fig: go.Figure | None = None,
    row: int | None = None,
    col: int | None = None,
) -> go.Figure:
    """Paths of views through a 2-d map: ``coords`` is ``[K, L, 2]`` (K images, L strengths,
    ``strengths[0]`` usually 0 = the original). Only levels with strength <= ``upto`` are drawn
    (the strength widget moves ``upto``). ``background`` ``[n, 2]`` shows the other points, in
    grey or coloured by ``background_color``; ``images`` ``[K, L, ...image]`` give hover thumbnails.
    """
    xy = np.asarray(coords, dtype=float)
    strengths = np.asarray(strengths, dtype=float)
    if xy.ndim != 3 or xy.shape[2] != 2 or xy.shape[1] != len(strengths):
        raise ValueError(f"coords must be [K, L, 2] with L = len(strengths) = {len(strengths)}; "
                         f"got {xy.shape}")
    keep = strengths <= (np.inf if upto is None else upto + 1e-9)
    fig = fig if fig is not None else go.Figure()
    kw = {} if row is None else {"row": row, "col": col}
    if background is not None:
        bg = np.asarray(background, dtype=float)
        if background_color is None:
            fig.add_trace(go.Scattergl(x=bg[:, 0], y=bg[:, 1], mode="markers", name="test set",
                                       marker=dict(color="lightgrey", size=5), hoverinfo="skip"), **kw)
        else:
            palette = _palette(list(background_color))
            colours = [palette[c] for c in background_color]
            fig.add_trace(go.Scattergl(x=bg[:, 0], y=bg[:, 1], mode="markers", name="test set",
                                       marker=dict(color=colours, size=5, opacity=0.35),
                                       text=[str(c) for c in background_color],
                                       hovertemplate="%{text}<extra></extra>"), **kw)
    for k in range(len(xy)):
        name = labels[k] if labels is not None else f"image {k}"
        custom = [[image_data_uri(images[k][j]) if images is not None else "", f"{strengths[j]:.2f}"]
                  for j in np.flatnonzero(keep)]
        fig.add_trace(go.Scatter(
            x=xy[k, keep, 0], y=xy[k, keep, 1], mode="lines+markers", name=str(name),
            marker=dict(size=np.linspace(12, 6, int(keep.sum())) if keep.sum() > 1 else 12,
                        color=strengths[keep], colorscale="Viridis", cmin=0,
                        cmax=max(float(strengths.max()), 1e-9),
                        line=dict(width=1, color="black")),
            line=dict(width=2), customdata=custom,
            hovertemplate=f"{name}<br>strength t=%{{customdata[1]}}<extra></extra>",
        ), **kw)
    if row is None:
        fig.update_layout(title=title, template="plotly_white", width=700, height=560)
        fig.update_xaxes(showticklabels=False)
        fig.update_yaxes(showticklabels=False)
    return fig


def trajectory_panels(
    maps: Mapping[str, tuple[Any, Any]],
    strengths: Sequence[float],
    *,
    labels: Sequence[str] | None = None,
    images: Any = None,
    upto: float | None = None,
) -> go.Figure:
    """One :func:`trajectories` panel per model (e.g. baseline and SSR), side by side.

    ``maps`` is ``{title: (background [n, 2], paths [K, L, 2])}`` (:func:`dmlnb.measure.
    view_trajectories`); each image's path has one colour-coded legend entry (``labels``), shown
    once for all panels. The width follows the window (``autosize``).
    """
    fig = make_subplots(rows=1, cols=len(maps), subplot_titles=list(maps), horizontal_spacing=0.04)
    for j, (bg, paths) in enumerate(maps.values(), 1):
        trajectories(paths, strengths, background=bg, labels=labels, images=images, upto=upto,
                     fig=fig, row=1, col=j)
    # one legend entry per image: the first panel's; the grey test set once
    seen: set[str] = set()
    for trace in fig.data:
        trace.showlegend = trace.name not in seen
        seen.add(trace.name)
    shown = strengths[-1] if upto is None else upto
    fig.update_layout(title=f"Views up to strength {shown:.2f}", autosize=True, height=520,
                      template="plotly_white", legend_title_text="image (class · typeface)")
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def similarity_curve(
    strengths: Sequence[float],
    similarities: Mapping[str, Sequence[float]],
    current: float | None = None,
    title: str | None = "Cosine similarity to the original",
) -> go.Figure:
    """Small line chart: similarity of a view to its original (and, e.g., to its class centre)
    against strength; a vertical line marks the ``current`` slider strength."""
    fig = go.Figure()
    for name, sims in similarities.items():
        fig.add_trace(go.Scatter(x=list(strengths), y=list(sims), mode="lines+markers", name=name))
    if current is not None:
        fig.add_vline(x=current, line_dash="dash", line_color="grey")
    fig.update_layout(title=title, xaxis_title="strength", yaxis_title="cosine similarity",
                      template="plotly_white", width=460, height=300,
                      margin=dict(l=50, r=10, t=40, b=40))
    return fig


# --- hover images and export ---------------------------------------------------------------------
HOVER_IMAGE_JS = """
(function() {
  var gd = document.getElementById('{plot_id}');
  if (!gd || !gd.on) { return; }
  var box = document.createElement('img');
  box.className = 'dmlnb-hover-image';
  box.style.cssText = 'position:fixed;display:none;pointer-events:none;z-index:1000;' +
    'width:96px;height:96px;image-rendering:pixelated;border:1px solid #888;background:#fff';
  document.body.appendChild(box);
  gd.on('plotly_hover', function(ev) {
    var p = ev.points && ev.points[0];
    var uri = p && p.customdata && p.customdata[0];
    if (typeof uri !== 'string' || uri.indexOf('data:image') !== 0) { box.style.display = 'none'; return; }
    box.src = uri;
    var e = ev.event || {};
    box.style.left = ((e.clientX || 0) + 16) + 'px';
    box.style.top = ((e.clientY || 0) + 16) + 'px';
    box.style.display = 'block';
  });
  gd.on('plotly_unhover', function() { box.style.display = 'none'; });
})();
"""


def write_html(fig: go.Figure, path: str | os.PathLike, hover_images: bool = True) -> Path:
    """Write ``fig`` as a self-contained interactive HTML file (plotly.js embedded, works offline),
    with the hover-image script when ``hover_images``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True,
                   post_script=HOVER_IMAGE_JS if hover_images else None)
    return path


_SHOWN_PLOTLYJS = False

#: set to 1 (true, yes, on) in a kernel's environment: every figure it displays carries a PNG
#: fallback (:func:`figure_bundle`). :func:`dmlnb.execute.run_notebook` sets it in the kernels it
#: starts unless the caller's environment sets it (``DMLNB_STATIC_FIGURES=0``: interactive only).
STATIC_FIGURES_ENV = "DMLNB_STATIC_FIGURES"
_PNG_ROUTE: dict[str, Any] = {}  # "kaleido_server": started; "failed": why no PNG can be made here
#: seconds one figure's PNG may take in :func:`figure_png` before the route is given up (the first
#: figure of a kernel starts a browser: seconds; a browser that died leaves kaleido waiting forever)
PNG_TIMEOUT_S = 120.0


def static_figures() -> bool:
    """Whether figures displayed in this process carry a PNG fallback (:data:`STATIC_FIGURES_ENV`).

    A PNG takes seconds to render (a headless browser; about 4 s for the first figure of a kernel
    and 0.3 s for each after it with kaleido, 4-5 s each through the Chromium route), so only
    headless runs make them, where the stored notebook is all that is left to read."""
    return os.environ.get(STATIC_FIGURES_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _kaleido_finds_chrome() -> bool:
    """Whether kaleido (>= 1) would find a Chrome or Chromium to start (its own search)."""
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False) is not None
    except Exception:  # kaleido < 1 (no choreographer), or another choreographer
        return False


def figure_png(fig: go.Figure, scale: float = 1.0) -> bytes | None:
    """``fig`` as PNG bytes through :func:`write_pngs` (kaleido, its browser kept running between
    figures when kaleido finds one, else a Chromium screenshot); ``None`` when neither route works
    here or a figure takes over :data:`PNG_TIMEOUT_S` (one warning per process, and no further
    attempt). The PNG is made in a helper thread: a browser that dies must not hang the caller
    (kaleido's server then waits forever)."""
    if "failed" in _PNG_ROUTE:
        return None
    import tempfile
    import threading
    import warnings

    if "kaleido_server" not in _PNG_ROUTE:  # one browser for all the figures of this process
        _PNG_ROUTE["kaleido_server"] = True
        if _kaleido_finds_chrome():  # without one, kaleido's server thread dies at once
            try:
                import kaleido

                kaleido.start_sync_server(silence_warnings=True)
            except Exception:  # kaleido < 1: write_pngs finds its route per figure
                pass
    with tempfile.TemporaryDirectory(prefix="dmlnb-png-") as folder:
        path = Path(folder) / "figure.png"
        outcome: list[BaseException | None] = []

        def make() -> None:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                    write_pngs([(fig, path)], scale=scale)
                outcome.append(None)
            except BaseException as err:  # noqa: BLE001 - reported below
                outcome.append(err)

        worker = threading.Thread(target=make, name="dmlnb-png", daemon=True)
        worker.start()
        worker.join(PNG_TIMEOUT_S)
        err = outcome[0] if outcome else TimeoutError(
            f"no PNG after {PNG_TIMEOUT_S:g} s (dmlnb.viz.PNG_TIMEOUT_S); the browser may have died")
        if err is None:
            return path.read_bytes()
        _PNG_ROUTE["failed"] = f"{type(err).__name__}: {err}"
        warnings.warn(f"figures are displayed without their PNG fallback: {err}",
                      RuntimeWarning, stacklevel=2)
        return None


def figure_bundle(fig: go.Figure | Mapping[str, Any], png: bool | None = None,
                  config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The MIME bundle a notebook stores for ``fig``: plotly's JupyterLab mimetype (interactive in
    JupyterLab, which shows the richest entry it can), ``image/png`` (what static renderers show:
    GitHub, nbviewer, nbconvert's HTML; when ``png``, default :func:`static_figures`, and a PNG
    route works) and a short ``text/plain``. ``fig`` may be a figure dict (as plotly renderers
    get it); ``config``: plotly.js options of the interactive figure."""
    from plotly.io.base_renderers import PlotlyRenderer

    fig_dict = fig.to_dict() if isinstance(fig, go.Figure) else dict(fig)
    bundle = dict(PlotlyRenderer(config=dict(config or {})).to_mimebundle(dict(fig_dict)))
    if static_figures() if png is None else png:
        data = figure_png(fig if isinstance(fig, go.Figure) else go.Figure(fig_dict))
        if data is not None:
            bundle["image/png"] = base64.b64encode(data).decode("ascii")
    title = ((fig_dict.get("layout") or {}).get("title") or {})
    title = title.get("text") if isinstance(title, Mapping) else title
    bundle["text/plain"] = f"plotly figure: {title}" if title else "plotly figure"
    return bundle


def install_static_renderer() -> None:
    """Make plotly's ``plotly_mimetype`` renderer (the one :func:`dmlnb.notebook.setup` selects)
    return :func:`figure_bundle`, so that ``fig.show()``, a figure as a cell's value and
    :func:`dmlnb.widgets.display_bundle` store the PNG fallback too. Done on import when
    :func:`static_figures`; JupyterLab sessions keep plotly's renderer untouched."""
    import plotly.io as pio
    from plotly.io.base_renderers import PlotlyRenderer

    class StaticFallbackRenderer(PlotlyRenderer):
        """plotly's JupyterLab mimetype renderer with :func:`figure_bundle`'s PNG and text."""

        def to_mimebundle(self, fig_dict: dict[str, Any]) -> dict[str, Any]:
            return figure_bundle(fig_dict, png=True, config=self.config)

    old = pio.renderers["plotly_mimetype"]
    if type(old).__name__ == StaticFallbackRenderer.__name__:
        return
    pio.renderers["plotly_mimetype"] = StaticFallbackRenderer(config=old.config)
    if pio.renderers.default == "plotly_mimetype":  # the default keeps renderer objects: renew
        pio.renderers.default = "plotly_mimetype"


def show(fig: go.Figure, hover_images: bool = True) -> None:
    """Display ``fig`` in a notebook with the hover-image script (so hovering a point shows its
    image). plotly.js is embedded in the first figure shown in a kernel and reused after that.
    Without hover images this is ``fig.show()``.

    Run headless (:func:`static_figures`), it displays :func:`figure_bundle` instead: the
    interactive figure and its PNG, without the hover script (a stored notebook is not trusted,
    so no viewer would run it; the HTML file :func:`write_html` writes keeps the hover images)."""
    global _SHOWN_PLOTLYJS
    from IPython.display import HTML, display

    if static_figures():
        display(figure_bundle(fig, png=True), raw=True)
        return
    if not hover_images:
        fig.show()
        return
    html = fig.to_html(include_plotlyjs=not _SHOWN_PLOTLYJS, full_html=False,
                       post_script=HOVER_IMAGE_JS)
    _SHOWN_PLOTLYJS = True
    display(HTML(html))


if static_figures():
    install_static_renderer()


def write_png(fig: go.Figure, path: str | os.PathLike, scale: float = 2.0) -> Path:
    """Write ``fig`` as a PNG; see :func:`write_pngs`."""
    return write_pngs([(fig, path)], scale=scale)[0]


def write_pngs(
    items: Sequence[tuple[go.Figure, str | os.PathLike]], scale: float = 2.0
) -> list[Path]:
    """Write several figures as PNG files: through kaleido when it is installed and finds a
    browser, else by screenshots of the figures' HTML in one headless Chromium session
    (Playwright, ``/usr/bin/chromium`` or ``$DMLNB_CHROMIUM``). Raises RuntimeError naming both
    routes if neither works."""
    paths = [Path(p) for _, p in items]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    try:
        import kaleido  # noqa: F401

        for (fig, _), p in zip(items, paths, strict=True):
            fig.write_image(p, scale=scale)
        return paths
    except Exception as err:  # not installed, or no Chrome for it
        errors.append(f"kaleido: {type(err).__name__}: {err}")
    try:
        _png_via_chromium([f for f, _ in items], paths, scale)
        return paths
    except Exception as err:
        errors.append(f"playwright/chromium: {type(err).__name__}: {err}")
    raise RuntimeError("could not write a PNG; install kaleido, or playwright with a Chromium at "
                       "/usr/bin/chromium (or $DMLNB_CHROMIUM):\n  " + "\n  ".join(errors))


CHROMIUM_ARGS = (  # flags that work on headless Debian machines with no network
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


def chromium_path() -> str:
    """The Chromium executable Playwright drives: ``$DMLNB_CHROMIUM`` or ``/usr/bin/chromium``."""
    return os.environ.get("DMLNB_CHROMIUM", "/usr/bin/chromium")


def _png_via_chromium(figs: Sequence[go.Figure], paths: Sequence[Path], scale: float) -> None:
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if not Path(exe).exists():
        raise FileNotFoundError(f"no Chromium at {exe}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS))
        try:
            for fig, path in zip(figs, paths, strict=True):
                width = int(fig.layout.width or 700)
                height = int(fig.layout.height or 500)
                html = fig.to_html(include_plotlyjs=True, full_html=True,
                                   config={"staticPlot": True},
                                   default_width=f"{width}px", default_height=f"{height}px")
                page = browser.new_page(viewport={"width": width + 16, "height": height + 16},
                                        device_scale_factor=scale)
                page.set_content(html, wait_until="load")
                page.wait_for_selector(".main-svg", timeout=30_000)
                page.wait_for_timeout(200)  # image traces decode their data URI asynchronously
                page.locator(".plotly-graph-div").first.screenshot(path=str(path))
                page.close()
        finally:
            browser.close()
