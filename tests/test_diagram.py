"""dmlnb.diagram: the architecture figure is a plotly Figure with named, labelled boxes and arrows."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from dmlnb.diagram import BOXES, architecture_figure


def _annotations(fig):
    return list(fig.layout.annotations)


def test_returns_an_autosized_figure():
    fig = architecture_figure()
    assert isinstance(fig, go.Figure)
    assert fig.layout.autosize is True
    assert fig.layout.xaxis.visible is False and fig.layout.yaxis.visible is False


def test_named_boxes_are_shapes_with_labels():
    fig = architecture_figure()
    names = {a.name for a in _annotations(fig) if not a.showarrow}
    shape_names = {s.name for s in fig.layout.shapes}
    want = {"image", "views", "backbone", "pooling", "metric_head", "metric_loss", "ssr_head",
            "similarity", "rank_loss", "total_loss"}
    assert want <= names and want <= shape_names
    assert set(BOXES) <= want
    text = {a.name: a.text for a in _annotations(fig)}
    assert "ONE pass" in text["backbone"]
    assert "Linear" in text["metric_head"] and "128" in text["metric_head"]
    assert "ReLU" in text["ssr_head"]
    assert "cos" in text["similarity"]
    assert "L<sub>metric</sub>" in text["metric_loss"] and "L<sub>rank</sub>" in text["rank_loss"]
    assert "γ" in text["total_loss"]
    assert all(a.text for a in _annotations(fig) if not a.showarrow), "every label has text"


@pytest.mark.parametrize("levels", [1, 4, 6])
def test_one_box_per_view_level(levels):
    fig = architecture_figure(levels=levels)
    views = [s for s in fig.layout.shapes if (s.name or "").startswith("view_")]
    assert len(views) == levels
    texts = [a.text for a in _annotations(fig) if (a.name or "").startswith("view_")]
    assert texts[0].startswith("<i>x</i><sub>1</sub>") and "0.20" in texts[0]


def test_arrows_connect_the_flow():
    fig = architecture_figure()
    arrows = {a.name for a in _annotations(fig) if a.showarrow}
    assert {"arrow:image->views", "arrow:views->backbone", "arrow:backbone->pooling",
            "arrow:pooling->metric_head", "arrow:pooling->ssr_head",
            "arrow:metric_head->metric_loss", "arrow:ssr_head->similarity",
            "arrow:similarity->rank_loss", "arrow:metric_loss->total_loss",
            "arrow:rank_loss->total_loss", "arrow:image->backbone"} <= arrows
    for a in _annotations(fig):
        if a.showarrow:  # arrows are drawn in data coordinates, inside the canvas
            assert a.axref == "x" and a.ayref == "y"
            assert 0 <= a.x <= 100 and 0 <= a.ax <= 100


def test_serialises_at_width_700():
    fig = architecture_figure()
    fig.update_layout(width=700)
    data = json.loads(pio.to_json(fig))
    assert data["layout"]["width"] == 700
    assert len(data["layout"]["annotations"]) > 20
    assert "<div" in pio.to_html(fig, include_plotlyjs=False, full_html=False)


def test_invalid_levels_rejected():
    with pytest.raises(ValueError, match="levels"):
        architecture_figure(levels=0)
