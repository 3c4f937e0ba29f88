"""dmlnb.widgets: the strength probe's read-outs against a slow reference, and the explorer's
widgets reacting to the slider, the family selector, the picker and the direction button."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dmlnb import widgets
from dmlnb.model import EmbeddingNet
from dmlnb.views import apply_view, sample_direction


class _Data:
    """A tiny dataset with the dmlnb interface (items, labels, classes, metadata)."""

    def __init__(self, n_per_class=3, n_classes=4, seed=0):
        import pandas as pd

        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n_per_class * n_classes, 1, 16, 16, generator=g)
        self.labels = np.repeat(np.arange(n_classes), n_per_class)
        self.classes = [chr(ord("A") + i) for i in range(n_classes)]
        self.metadata = pd.DataFrame({"family": [f"F{i % 2}" for i in range(len(self.labels))],
                                      "subfamily": "Regular"})

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # test-only: the model's initial weights
    return EmbeddingNet("smallcnn", in_channels=1, pretrained=False, embed_dim=16, ssr_dim=8,
                        ssr_hidden=32).eval()


@pytest.fixture(scope="module")
def data():
    return _Data()


def _centres_reference(z, y, k):
    out = np.zeros((k, z.shape[1]))
    for c in range(k):
        m = z[y == c].sum(0)
        out[c] = m / np.linalg.norm(m)
    return out


def test_class_centres_against_loop():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 5))
    y = rng.integers(0, 3, 12)
    np.testing.assert_allclose(widgets.class_centres(z, y).numpy(), _centres_reference(z, y, 3), atol=1e-6)
    assert widgets.class_centres(z, y, n_classes=5)[4].abs().sum() == 0


def test_probe_readouts_match_a_slow_reference(model, data):
    with torch.no_grad():
        z_all = model(data.images).numpy()
    centres = widgets.class_centres(z_all, data.labels)
    probe = widgets.ViewProbe(data.images[4], ("crop", "color"), seed=3, model=model,
                              centres=centres, label=1, class_names=data.classes)
    strengths = [0.0, 0.3, 0.8]
    got = probe.readouts(strengths)
    direction = sample_direction(("crop", "color"), generator=3)
    with torch.no_grad():
        z0, s0 = model(data.images[4][None], ssr=True)
        for i, t in enumerate(strengths):
            v = apply_view(data.images[4], ("crop", "color"), t, direction)
            z, s = model(v[None], ssr=True)
            assert got["pixel_rmse"][i] == pytest.approx(float((v - data.images[4]).pow(2).mean().sqrt()), abs=1e-6)
            assert got["cos_original"][i] == pytest.approx(float(F.cosine_similarity(z, z0)), abs=1e-5)
            assert got["cos_original_ssr"][i] == pytest.approx(float(F.cosine_similarity(s, s0)), abs=1e-5)
            sims = [float(F.cosine_similarity(z, centres[c][None])) for c in range(4)]
            assert got["cos_class_centre"][i] == pytest.approx(sims[1], abs=1e-5)
            assert got["class_rank"][i] == 1 + sum(x > sims[1] for x in sims)
            assert got["nearest_class"][i] == int(np.argmax(sims))
    assert got["pixel_rmse"][0] == 0 and got["cos_original"][0] == pytest.approx(1.0, abs=1e-5)
    one = probe.readout(0.3)
    assert one["nearest_class"] in data.classes and isinstance(one["class_rank"], int)
    with pytest.raises(ValueError, match="strength"):
        probe.view(1.5)


def test_probe_without_model_reads_pixels_only(data):
    probe = widgets.ViewProbe(data.images[0], widgets.PAPER_FAMILIES, seed=0)
    assert probe.families == ("crop", "perspective", "color")
    r = probe.readouts([0.0, 0.5, 1.0])
    assert set(r) == {"strength", "pixel_rmse"}
    assert r["pixel_rmse"][0] == 0 and r["pixel_rmse"][2] > 0


def _png(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def test_line_plot_png_marker_moves():
    x = np.linspace(0, 1, 11)
    a = _png(widgets.line_plot_png(x, {"s": 1 - x}, marker=0.2, width=200, height=120))
    b = _png(widgets.line_plot_png(x, {"s": 1 - x}, marker=0.8, width=200, height=120))
    assert a.shape == (120, 200, 3)
    assert (a != b).any()
    c = _png(widgets.line_plot_png(x, {"flat": np.ones(11)}, marker=None))  # flat line: no crash
    assert c.std() > 0


def test_explorer_reacts_to_every_control(model, data):
    centres = widgets.class_centres(model(data.images).detach().numpy(), data.labels)
    ex = widgets.ViewExplorer(data, [0, 5, 9], model=model, centres=centres, seed=0, curve_points=5)
    start = (ex.image.value, ex.readout.value, ex.plot.value)
    assert "cos(view, original), metric head" in ex.readout.value
    assert "<b>1.000</b>" in ex.readout.value  # strength 0: the view is the original

    ex.strength.value = 0.7
    moved = (ex.image.value, ex.readout.value, ex.plot.value)
    assert all(a != b for a, b in zip(start, moved, strict=True))
    assert "0.70" in ex.readout.value

    ex.new_direction.click()
    assert ex.seed == 1 and ex.image.value != moved[0]

    before = ex.image.value
    ex.family.value = "color"
    assert ex._probe.families == ("color",) and ex.image.value != before

    ex.picker.value = 9
    assert ex._probe.label == int(data.labels[9])
    assert f"class '{data.classes[int(data.labels[9])]}'" in ex.readout.value
    assert ex.picker.options[0][0].startswith("A · F0 Regular")


def test_explorer_without_model_says_so(data):
    ex = widgets.ViewExplorer(data, [1], model=None)
    assert "no model" in ex.readout.value and "pixel RMSE" in ex.readout.value
    ex.strength.value = 0.5
    assert "0.50" in ex.readout.value
    with pytest.raises(ValueError, match="indices"):
        widgets.ViewExplorer(data, [])


def test_figure_slider_redraws_on_change():
    import plotly.graph_objects as go

    calls = []

    def make(v):
        calls.append(v)
        return go.Figure(go.Scatter(x=[0, v], y=[0, v]))

    box = widgets.figure_slider(make, [0.0, 0.5, 1.0])
    assert calls == [1.0]  # drawn once at creation, at the last value
    box.slider.value = 0.5
    assert calls == [1.0, 0.5]
