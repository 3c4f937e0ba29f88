"""dmlnb.ranking_explorer: the ranking loss as a function of S_1..S_N against a hand computation of
the formulas, the plateau value, gradients against finite differences, and the explorer's figure
following its sliders."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dmlnb.ranking_explorer import ranking_explorer, ranking_figure, ranking_loss_curve


def _by_hand(sim, alpha, beta, s, lam, pairs="adjacent"):
    """The formulas of docs/method.md written out with math.log / math.exp, one term at a time."""
    n = len(sim)
    pair_list = ([(i, i + 1) for i in range(n - 1)] if pairs == "adjacent"
                 else [(i, j) for i in range(n) for j in range(i + 1, n)])
    l_sort = math.log(1 + sum(math.exp(s * (sim[j] - sim[i] + alpha)) for i, j in pair_list)) / s
    l_pos = math.log(1 + sum(math.exp(-s * (x - beta)) for x in sim)) / s
    return l_sort, l_pos, l_sort + lam * l_pos


CASES = [
    ([0.9, 0.8, 0.7, 0.6], 0.05, 0.5, 12.0, 1.0, "adjacent"),
    ([0.95, 0.6, 0.7, 0.2], 0.1, 0.3, 20.0, 0.5, "adjacent"),
    ([0.5, 0.55, -0.2, 0.1], 0.0, -0.1, 5.0, 2.0, "all"),
    ([0.7], 0.05, 0.5, 12.0, 1.0, "adjacent"),
]


@pytest.mark.parametrize(("sim", "alpha", "beta", "s", "lam", "pairs"), CASES)
def test_values_match_the_formulas(sim, alpha, beta, s, lam, pairs):
    c = ranking_loss_curve(sim, alpha=alpha, beta=beta, scale=s, pos_weight=lam, pairs=pairs)
    l_sort, l_pos, l_rank = _by_hand(sim, alpha, beta, s, lam, pairs)
    assert c["L_sort"] == pytest.approx(l_sort, abs=1e-10)
    assert c["L_pos"] == pytest.approx(l_pos, abs=1e-10)
    assert c["L_rank"] == pytest.approx(l_rank, abs=1e-10)
    np.testing.assert_allclose(c["similarities"], sim)


@pytest.mark.parametrize("level", [1.0, 0.9, 0.3])
def test_plateau_all_equal(level):
    """All S_n equal: L_sort = (1/s) ln(1 + (N-1) e^{s alpha}) = 0.1556 at s = 12, alpha = 0.05,
    N = 4, whatever the level; its gradient pushes only S_1 up and S_N down, by the softmax weight
    e^{s alpha} / (1 + 3 e^{s alpha}) = 0.282."""
    c = ranking_loss_curve([level] * 4, alpha=0.05, beta=0.5, scale=12.0, pos_weight=1.0)
    assert c["L_sort"] == pytest.approx(math.log(1 + 3 * math.exp(0.6)) / 12, abs=1e-12)
    assert round(c["L_sort"], 4) == 0.1556
    w = math.exp(0.6) / (1 + 3 * math.exp(0.6))
    np.testing.assert_allclose(c["grad_sort"], [-w, 0.0, 0.0, w], atol=1e-9)
    # L_pos pulls every level up equally, by the same amount
    assert np.all(c["grad_pos"] < 0) and np.ptp(c["grad_pos"]) < 1e-12
    np.testing.assert_allclose(c["grad"], c["grad_sort"] + c["grad_pos"], atol=1e-12)
    if level == 1.0:  # all views coincide with the original: the documented total
        assert round(c["L_rank"], 4) == 0.1564


@pytest.mark.parametrize(("sim", "alpha", "beta", "s", "lam", "pairs"), CASES)
def test_gradients_match_finite_differences(sim, alpha, beta, s, lam, pairs):
    c = ranking_loss_curve(sim, alpha=alpha, beta=beta, scale=s, pos_weight=lam, pairs=pairs)
    h = 1e-6
    for key, idx in (("grad_sort", 0), ("grad_pos", 1), ("grad", 2)):
        fd = []
        for n in range(len(sim)):
            up, down = list(sim), list(sim)
            up[n] += h
            down[n] -= h
            fd.append((_by_hand(up, alpha, beta, s, lam, pairs)[idx]
                       - _by_hand(down, alpha, beta, s, lam, pairs)[idx]) / (2 * h))
        np.testing.assert_allclose(c[key], fd, atol=1e-6, err_msg=key)


def test_gradient_at_the_edges_is_one_sided_difference():
    """At S_n = 1 (where the 2-d construction is singular) the gradient is still the formula's."""
    sim = [1.0, 0.8, 1.0, -1.0]
    c = ranking_loss_curve(sim)
    h = 1e-6
    for n in range(4):
        sign = -1.0 if sim[n] > 0 else 1.0  # step inside [-1, 1]
        moved = list(sim)
        moved[n] += sign * h
        fd = (_by_hand(moved, 0.05, 0.5, 12.0, 1.0)[2] - _by_hand(sim, 0.05, 0.5, 12.0, 1.0)[2]) / (sign * h)
        assert c["grad"][n] == pytest.approx(fd, abs=1e-4)


def test_rejects_values_outside_the_cosine_range():
    with pytest.raises(ValueError, match="similarities"):
        ranking_loss_curve([1.2, 0.5])
    with pytest.raises(ValueError, match="similarities"):
        ranking_loss_curve([])
    with pytest.raises(ValueError, match="pairs"):
        ranking_loss_curve([0.5, 0.4], pairs="some")


def test_figure_has_bars_per_level_and_labels():
    c = ranking_loss_curve([0.9, 0.8, 0.7, 0.6])
    fig = ranking_figure(c, beta=0.5)
    assert all(t.name for t in fig.data)  # every trace in the legend
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 4 and all(len(t.y) == 4 for t in bars)
    np.testing.assert_allclose(bars[0].y, [0.9, 0.8, 0.7, 0.6])
    np.testing.assert_allclose(bars[1].y, -c["grad"])
    assert f"{c['L_rank']:.4f}" in fig.layout.title.text and f"{c['L_sort']:.4f}" in fig.layout.title.text
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text and fig.layout.yaxis2.title.text


def test_explorer_redraws_when_a_slider_moves(monkeypatch):
    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    box = ranking_explorer()
    assert set(box.sliders) == {"S_1", "S_2", "S_3", "S_4", "alpha", "beta", "scale", "pos_weight",
                                "pairs"}
    first = box.figure
    assert "application/vnd.plotly.v1+json" in box.output.outputs[0]["data"]
    np.testing.assert_allclose(first.data[0].y, [1.0] * 4)
    before = box.output.outputs[0]["data"]["application/vnd.plotly.v1+json"]

    box.sliders["S_4"].value = 0.4
    assert box.figure is not first
    np.testing.assert_allclose(box.figure.data[0].y, [1.0, 1.0, 1.0, 0.4])
    expected = ranking_loss_curve([1.0, 1.0, 1.0, 0.4])
    np.testing.assert_allclose(box.figure.data[2].y, -expected["grad"], atol=1e-9)
    assert box.output.outputs[0]["data"]["application/vnd.plotly.v1+json"] != before

    box.sliders["alpha"].value = 0.2
    c = ranking_loss_curve([1.0, 1.0, 1.0, 0.4], alpha=0.2)
    assert f"{c['L_rank']:.4f}" in box.figure.layout.title.text
    box.sliders["pairs"].value = "all"
    c = ranking_loss_curve([1.0, 1.0, 1.0, 0.4], alpha=0.2, pairs="all")
    assert f"{c['L_sort']:.4f}" in box.figure.layout.title.text
