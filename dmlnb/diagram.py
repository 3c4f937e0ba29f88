"""The architecture of SSR as a plotly figure: boxes, arrows and labels, no image files.

:func:`architecture_figure` draws the data flow of one training iteration (docs/method.md,
"Architecture" and "The ranking objective"):

    image x -> views x_1..x_N of increasing strength (nested) -> ONE shared backbone pass
    -> global pooling -> metric head (Linear + L2, d = 128) -> L_metric
                      -> SSR head (Linear-ReLU-Linear + L2) -> S_n = cos(z'_0, z'_n) -> L_rank
    L = L_metric + gamma L_rank

Boxes are layout shapes with a centred annotation each; arrows are annotations with an arrow head.
Every box annotation and every box shape carries a ``name`` (the keys of :data:`BOXES`), so a
test or a caller can find them. The figure lives on a fixed 100 x 60 canvas with hidden axes and
``autosize=True``: it fills the notebook's width and is readable from about 700 px on (designed
for 1,000 px).
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from dmlnb import defaults

__all__ = ["BOXES", "architecture_figure"]

# canvas: x in [0, 100], y in [0, 60]
_W, _H = 100.0, 60.0
_MID = 30.0  # the trunk's height
_TOP = 49.0  # metric branch
_LOW = 11.0  # SSR branch

#: name -> (x0, y0, x1, y1, fill colour, label). Labels use plotly's HTML subset.
BOXES: dict[str, tuple[float, float, float, float, str, str]] = {
    "image": (0.5, 23.0, 8.5, 37.0, "#e8eef7", "image <i>x</i><br>(= <i>x</i><sub>0</sub>)<br>in [0, 1]"),
    "backbone": (28.5, 18.0, 40.5, 42.0, "#dbe7f5",
                 "<b>shared backbone <i>f</i></b><br>ONE pass over<br>B originals<br>+ M·N views<br>"
                 "(normalises<br>its own input)"),
    "pooling": (44.0, 24.0, 53.5, 36.0, "#dbe7f5", "global<br>pooling<br><i>h</i> ∈ ℝ<sup>d<sub>h</sub></sup>"),
    "metric_head": (60.0, 42.0, 76.0, 56.0, "#fde9d9",
                    f"<b>metric head <i>q</i></b><br>Linear(d<sub>h</sub>, {defaults.EMBED_DIM}) + L2"
                    f"<br><i>z</i> = q(h)/‖q(h)‖, d = {defaults.EMBED_DIM}"),
    "metric_loss": (84.0, 43.0, 99.5, 55.0, "#f8cbad",
                    "<b>L<sub>metric</sub></b><br>margin loss, distance-<br>weighted sampling<br>(originals only)"),
    "ssr_head": (57.5, 3.0, 72.5, 19.0, "#e2f0d9",
                 "<b>SSR head <i>g</i></b><br>Linear → ReLU → Linear<br>"
                 f"({defaults.SSR_HIDDEN} hidden, {defaults.SSR_DIM} out) + L2<br><i>z'</i><sub>0</sub> … <i>z'</i><sub>N</sub>"),
    "similarity": (75.5, 4.0, 86.5, 18.0, "#e2f0d9",
                   "<i>S<sub>n</sub></i> = cos(<i>z'</i><sub>0</sub>, <i>z'</i><sub>n</sub>)<br>n = 1 … N"),
    "rank_loss": (89.0, 3.0, 99.5, 19.0, "#c5e0b4",
                  "<b>L<sub>rank</sub></b><br>L<sub>sort</sub> (order)<br>+ λ<sub>r</sub> L<sub>pos</sub> (floor)"),
    "total_loss": (80.0, 25.0, 99.5, 35.0, "#fff2cc",
                   "<b>L = L<sub>metric</sub> + γ L<sub>rank</sub></b><br>one backward, one step"),
}

_VIEW_BOX = (12.0, 24.0)  # x range of the view stack
_VIEWS_NAME = "views"


def _strengths(levels: int, sigma: float) -> list[float]:
    return [math.tanh(sigma * n) for n in range(1, levels + 1)]


def _box(fig: go.Figure, name: str, x0: float, y0: float, x1: float, y1: float, fill: str,
         text: str, font_size: int) -> None:
    fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, name=name, fillcolor=fill,
                  line=dict(color="#44546a", width=1.5), layer="below")
    fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=text, name=name, showarrow=False,
                       font=dict(size=font_size, color="#1f1f1f"), align="center")


def _arrow(fig: go.Figure, start: tuple[float, float], end: tuple[float, float], name: str,
           label: str = "", label_at: tuple[float, float] | None = None, color: str = "#44546a",
           font_size: int = 11) -> None:
    fig.add_annotation(x=end[0], y=end[1], ax=start[0], ay=start[1], xref="x", yref="y",
                       axref="x", ayref="y", showarrow=True, arrowhead=2, arrowsize=1.2,
                       arrowwidth=1.8, arrowcolor=color, text="", name=f"arrow:{name}")
    if label:
        lx, ly = label_at or ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 1.6)
        fig.add_annotation(x=lx, y=ly, text=label, name=f"label:{name}", showarrow=False,
                           font=dict(size=font_size, color=color))


def architecture_figure(
    levels: int = defaults.SSR_LEVELS,
    sigma: float = defaults.SSR_SIGMA,
    *,
    height: int = 560,
    font_size: int = 12,
) -> go.Figure:
    """Boxes-and-arrows figure of the SSR architecture and its losses (module docstring).

    Parameters
    ----------
    levels : N, the number of views drawn (default: the paper's 4).
    sigma : strength schedule t_n = tanh(sigma n) written next to each view (default 0.2).
    height : figure height in pixels; the width follows the container (``autosize=True``).
    font_size : size of the box labels; arrow labels are one point smaller.
    """
    if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= 8:
        raise ValueError(f"levels must be an int in [1, 8], got {levels!r}")
    fig = go.Figure()
    small = max(8, font_size - 1)

    for name, (x0, y0, x1, y1, fill, text) in BOXES.items():
        _box(fig, name, x0, y0, x1, y1, fill, text, font_size)

    # the view stack: x_1..x_N, darker = stronger; nested windows drawn inside a frame
    vx0, vx1 = _VIEW_BOX
    top, bottom = 44.0, 16.0
    step = (top - bottom) / levels
    fig.add_shape(type="rect", x0=vx0 - 0.8, y0=bottom - 0.8, x1=vx1 + 0.8, y1=top + 0.8,
                  name=_VIEWS_NAME, line=dict(color="#44546a", width=1, dash="dot"), layer="below")
    fig.add_annotation(x=(vx0 + vx1) / 2, y=top + 3.2, name=_VIEWS_NAME, showarrow=False,
                       text="<b>N views of increasing strength</b><br>nested: one direction, growing size",
                       font=dict(size=small, color="#1f1f1f"))
    for n, t in enumerate(_strengths(levels, sigma), start=1):
        y1 = top - (n - 1) * step - 0.4
        y0 = y1 - step + 0.8
        shade = 0.15 + 0.6 * n / levels
        fig.add_shape(type="rect", x0=vx0, y0=y0, x1=vx1, y1=y1, name=f"view_{n}",
                      fillcolor=f"rgba(68, 114, 196, {shade:.2f})",
                      line=dict(color="#44546a", width=1), layer="below")
        fig.add_annotation(x=(vx0 + vx1) / 2, y=(y0 + y1) / 2, name=f"view_{n}", showarrow=False,
                           text=f"<i>x</i><sub>{n}</sub>: t<sub>{n}</sub> = {t:.2f}",
                           font=dict(size=small, color="#ffffff" if shade > 0.5 else "#1f1f1f"))
    fig.add_annotation(x=(vx0 + vx1) / 2, y=bottom - 2.6, showarrow=False, name="label:strength",
                       text="t<sub>n</sub> = tanh(σ n): crop, perspective, colour",
                       font=dict(size=small - 1, color="#44546a"))

    # arrows along the trunk
    image = BOXES["image"]
    backbone = BOXES["backbone"]
    pooling = BOXES["pooling"]
    _arrow(fig, (image[2], _MID), (vx0 - 0.9, _MID), "image->views", "views", (10.0, _MID + 2.2),
           font_size=small - 1)
    # the original x_0 goes to the backbone too: a path below the view stack, then an arrow up
    below = 9.0
    x_in = (backbone[0] + backbone[2]) / 2
    fig.add_shape(type="path", path=f"M {(image[0] + image[2]) / 2},{image[1]} V {below} H {x_in}",
                  name="path:image->backbone", line=dict(color="#8497b0", width=1.8))
    _arrow(fig, (x_in, below), (x_in, backbone[1]), "image->backbone", color="#8497b0")
    fig.add_annotation(x=17.0, y=below - 2.0, showarrow=False, name="label:image->backbone",
                       text="and the original <i>x</i><sub>0</sub> itself", font=dict(size=small, color="#8497b0"))
    _arrow(fig, (vx1 + 0.9, _MID), (backbone[0], _MID), "views->backbone",
           "<i>x</i><sub>1..N</sub>", (26.6, _MID + 2.4), font_size=small)
    _arrow(fig, (backbone[2], _MID), (pooling[0], _MID), "backbone->pooling", "<i>f</i>(·)",
           (42.2, _MID + 2.4), font_size=small)

    # the fork: metric branch (up) and SSR branch (down)
    mh, ml = BOXES["metric_head"], BOXES["metric_loss"]
    sh, si, rl, tl = BOXES["ssr_head"], BOXES["similarity"], BOXES["rank_loss"], BOXES["total_loss"]
    _arrow(fig, (pooling[2], 34.0), (mh[0], (mh[1] + mh[3]) / 2), "pooling->metric_head",
           "h of the B originals", (52.0, 45.5), font_size=small)
    _arrow(fig, (pooling[2], 26.0), (sh[0], (sh[1] + sh[3]) / 2), "pooling->ssr_head",
           "h of the M originals<br>and their M·N views", (50.0, 14.5), font_size=small)
    _arrow(fig, (mh[2], (mh[1] + mh[3]) / 2), (ml[0], (ml[1] + ml[3]) / 2), "metric_head->metric_loss",
           "z, labels y", (80.0, 51.5), font_size=small)
    _arrow(fig, (sh[2], 11.0), (si[0], 11.0), "ssr_head->similarity", "z'", (74.0, 13.0),
           font_size=small)
    _arrow(fig, (si[2], 11.0), (rl[0], 11.0), "similarity->rank_loss", "S<sub>1..N</sub>",
           (87.8, 13.4), font_size=small)
    _arrow(fig, ((ml[0] + ml[2]) / 2 + 2.0, ml[1]), ((tl[0] + tl[2]) / 2 + 2.0, tl[3]),
           "metric_loss->total_loss", "1 ·", (94.5, 39.0), font_size=small)
    _arrow(fig, ((rl[0] + rl[2]) / 2, rl[3]), ((rl[0] + rl[2]) / 2, tl[1]), "rank_loss->total_loss",
           "γ ·", (96.8, 22.0), font_size=small)
    fig.add_annotation(x=66.5, y=0.2, showarrow=False, name="label:ssr_branch",
                       text="SSR branch: with probability p per iteration, on M images",
                       font=dict(size=small - 1, color="#548235"))
    fig.add_annotation(x=68.0, y=58.8, showarrow=False, name="label:eval",
                       text="retrieval and clustering use z; z' exists only for L<sub>rank</sub>",
                       font=dict(size=small - 1, color="#c55a11"))

    fig.update_xaxes(range=[0, _W], visible=False, fixedrange=True)
    fig.update_yaxes(range=[-1.5, _H + 1.5], visible=False, fixedrange=True)
    fig.update_layout(
        autosize=True, height=height, margin=dict(l=10, r=10, t=50, b=10),
        title=dict(text="Deep metric learning with self-supervised ranking: one training iteration",
                   x=0.01, font=dict(size=font_size + 3)),
        plot_bgcolor="white", paper_bgcolor="white", showlegend=False,
    )
    return fig
