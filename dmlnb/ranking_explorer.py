"""The ranking loss as a function of the similarities: a live explorer that needs no training.

- :func:`ranking_loss_curve`: ``L_sort``, ``L_pos``, ``L_rank`` and ``dL/dS_n`` for given
  similarities ``S_1..S_N`` (weakest view first), computed by :class:`dmlnb.losses.RankingLoss`
  itself with autograd, so the explorer shows exactly the loss that training uses.
- :func:`ranking_figure`: plotly bars of ``S_n`` and of the push ``-dL_rank/dS_n`` per level, the
  three loss values in the title.
- :func:`ranking_explorer`: sliders for ``S_1..S_N``, ``alpha``, ``beta``, ``s`` and ``lambda_r``
  (and the pair set) that redraw the figure.

How ``S_n`` reaches the loss: the loss takes embeddings, so one image is built in 2-d with the
anchor ``(1, 0)`` and view ``n`` the unit vector at angle ``theta_n = arccos(S_n)``; then
``cos(z'_0, z'_n) = S_n``. The gradient is taken with respect to ``theta_n`` and divided by
``dS_n/dtheta_n = -sin(theta_n)``. That is singular at ``S_n = +-1`` (the cosine is extremal
there), so such values are evaluated ``1e-12`` inside the interval: the loss changes by less than
``1e-11``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dmlnb import defaults
from dmlnb._validate import check_choice
from dmlnb.defaults import RANK_PAIR_CHOICES
from dmlnb.losses import RankingLoss
from dmlnb.widgets import display_bundle

__all__ = ["ranking_explorer", "ranking_figure", "ranking_loss_curve"]

_EDGE = 1e-12  # distance kept from S = +-1, where dS/dtheta vanishes


def ranking_loss_curve(
    similarities: Sequence[float],
    alpha: float = defaults.RANK_ALPHA,
    beta: float = defaults.RANK_BETA,
    scale: float = defaults.RANK_SCALE,
    pos_weight: float = defaults.RANK_POS_WEIGHT,
    pairs: str = defaults.RANK_PAIRS,
) -> dict[str, Any]:
    """The ranking loss of one image whose views have cosine similarities ``S_1..S_N`` (weakest first).

    Returns a dict: ``similarities`` (the input, ``[N]``), ``L_sort``, ``L_pos``, ``L_rank``
    (floats, ``L_rank = L_sort + pos_weight * L_pos``) and the gradients per level, ``[N]`` arrays:
    ``grad`` (``dL_rank/dS_n``), ``grad_sort`` (``dL_sort/dS_n``) and ``grad_pos``
    (``dL_pos/dS_n``, not multiplied by ``pos_weight``). Computed in float64 by
    :class:`dmlnb.losses.RankingLoss` (``scale`` is s, ``pos_weight`` is lambda_r).
    """
    sim = np.asarray(similarities, dtype=np.float64).reshape(-1)
    if sim.size == 0:
        raise ValueError("similarities must hold at least one value (N >= 1)")
    if not np.all(np.isfinite(sim)) or np.any(np.abs(sim) > 1.0):
        raise ValueError(f"similarities must be cosines in [-1, 1], got {sim.tolist()}")
    check_choice("pairs", pairs, RANK_PAIR_CHOICES)
    loss = RankingLoss(scale=scale, alpha=alpha, beta=beta, pos_weight=pos_weight, pairs=pairs)
    theta = torch.tensor(np.arccos(np.clip(sim, -1.0 + _EDGE, 1.0 - _EDGE)), requires_grad=True)
    anchor = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    views = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)[None]  # [1, N, 2]
    parts = loss.parts(anchor, views)
    d_sim_d_theta = -torch.sin(theta).detach()
    grads = {}
    for key, value in (("grad_sort", parts.sort), ("grad_pos", parts.pos)):
        (g,) = torch.autograd.grad(value, theta, retain_graph=True)
        grads[key] = (g / d_sim_d_theta).numpy()
    return {
        "similarities": sim,
        "L_sort": parts.sort.item(),
        "L_pos": parts.pos.item(),
        "L_rank": parts.total.item(),
        "grad": grads["grad_sort"] + loss.pos_weight * grads["grad_pos"],
        **grads,
    }


def ranking_figure(curve: dict[str, Any], beta: float | None = None, pos_weight: float = 1.0) -> Any:
    """Plotly figure of a :func:`ranking_loss_curve` result: ``S_n`` per level (left) and the push
    ``-dL/dS_n`` per level (right: L_rank, and its parts from L_sort and from lambda_r L_pos); a
    positive push means the loss raises ``S_n``. ``beta`` draws the point-wise floor."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    sim = np.asarray(curve["similarities"], dtype=float)
    levels = [f"{n}" for n in range(1, len(sim) + 1)]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("similarity to the original, S<sub>n</sub>",
                                        "push on S<sub>n</sub>: −∂L/∂S<sub>n</sub> (> 0: up)"))
    fig.add_trace(go.Bar(x=levels, y=sim, name="S_n = cos(z'_0, z'_n)", marker_color="#1f77b4"),
                  row=1, col=1)
    if beta is not None:
        fig.add_trace(go.Scatter(x=levels, y=[beta] * len(levels), mode="lines", name="β (floor of L_pos)",
                                 line=dict(color="#7f7f7f", dash="dash")), row=1, col=1)
    fig.add_trace(go.Bar(x=levels, y=-np.asarray(curve["grad"]), name="−∂L_rank/∂S_n",
                         marker_color="#d62728"), row=1, col=2)
    fig.add_trace(go.Bar(x=levels, y=-np.asarray(curve["grad_sort"]), name="  from L_sort",
                         marker_color="#ff9896"), row=1, col=2)
    fig.add_trace(go.Bar(x=levels, y=-pos_weight * np.asarray(curve["grad_pos"]),
                         name="  from λ_r·L_pos", marker_color="#c5b0d5"), row=1, col=2)
    fig.update_xaxes(title_text="level n (1 = weakest view)")
    fig.update_yaxes(title_text="S_n", range=[-1.05, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="−∂L/∂S_n", row=1, col=2)
    fig.update_layout(
        title=dict(text=(f"L_sort = {curve['L_sort']:.4f}    L_pos = {curve['L_pos']:.4f}    "
                         f"L_rank = L_sort + λ_r·L_pos = {curve['L_rank']:.4f}"), x=0.5),
        barmode="group", template="plotly_white", height=380, width=900,
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def ranking_explorer(
    similarities: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    alpha: float = defaults.RANK_ALPHA,
    beta: float = defaults.RANK_BETA,
    scale: float = defaults.RANK_SCALE,
    pos_weight: float = defaults.RANK_POS_WEIGHT,
    pairs: str = defaults.RANK_PAIRS,
) -> Any:
    """Sliders for ``S_1..S_N``, alpha, beta, s, lambda_r and the pair set around
    :func:`ranking_figure`; every change redraws it.

    Starts at the plateau: all views as similar as the original (``S_n = 1``), where
    ``L_sort = (1/s) ln(1 + (N-1) e^{s alpha})`` and only ``S_1`` (up) and ``S_N`` (down) are pushed.
    Returns an ``ipywidgets.VBox``; its ``.sliders`` (a dict: ``S_1..S_N``, ``alpha``, ``beta``,
    ``scale``, ``pos_weight``, ``pairs``) and ``.output`` attributes are the parts, ``.figure`` the
    figure drawn last. As in
    :func:`dmlnb.widgets.figure_slider`, the figure is put into the ``Output`` widget by setting its
    ``outputs`` (no ``with output:`` capture, which can hang a headless papermill run).
    """
    import ipywidgets as W

    sim = [float(v) for v in similarities]
    ranking_loss_curve(sim, alpha, beta, scale, pos_weight, pairs)  # validates before any widget

    def slider(description: str, value: float, low: float, high: float, step: float,
               fmt: str = ".2f") -> Any:
        return W.FloatSlider(value=value, min=low, max=high, step=step, description=description,
                             continuous_update=False, readout_format=fmt)

    sliders: dict[str, Any] = {f"S_{n + 1}": slider(f"S_{n + 1}", v, -1.0, 1.0, 0.01)
                               for n, v in enumerate(sim)}
    sliders["alpha"] = slider("α (margin)", alpha, 0.0, 0.5, 0.01)
    sliders["beta"] = slider("β (floor)", beta, -1.0, 1.0, 0.05)
    sliders["scale"] = slider("s (scale)", scale, 1.0, 64.0, 1.0, ".0f")
    sliders["pos_weight"] = slider("λ_r (L_pos)", pos_weight, 0.0, 5.0, 0.1, ".1f")
    sliders["pairs"] = W.Dropdown(options=list(RANK_PAIR_CHOICES), value=pairs, description="pairs")
    output = W.Output()

    def draw(_: Any = None) -> None:
        values = [sliders[f"S_{n + 1}"].value for n in range(len(sim))]
        curve = ranking_loss_curve(values, sliders["alpha"].value, sliders["beta"].value,
                                   sliders["scale"].value, sliders["pos_weight"].value,
                                   sliders["pairs"].value)
        fig = ranking_figure(curve, beta=sliders["beta"].value, pos_weight=sliders["pos_weight"].value)
        box.figure = fig
        output.outputs = (display_bundle(fig),)

    levels = W.VBox([sliders[f"S_{n + 1}"] for n in range(len(sim))])
    knobs = W.VBox([sliders[k] for k in ("alpha", "beta", "scale", "pos_weight", "pairs")])
    box = W.VBox([W.HBox([levels, knobs]), output])
    box.sliders, box.output = sliders, output
    for w in sliders.values():
        w.observe(draw, names="value")
    draw()
    return box
