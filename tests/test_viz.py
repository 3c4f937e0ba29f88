"""dmlnb.viz: images, mosaics, galleries, curves, tables, embedding maps and export."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from dmlnb import viz


def _decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


# --- images --------------------------------------------------------------------------------------
def test_to_uint8_layouts_and_ranges():
    g = np.linspace(0, 1, 12).reshape(3, 4)
    assert viz.to_uint8(g).shape == (3, 4)
    assert viz.to_uint8(g)[0, 0] == 0 and viz.to_uint8(g)[-1, -1] == 255
    chw = torch.rand(3, 5, 6)
    hwc = viz.to_uint8(chw)
    assert hwc.shape == (5, 6, 3)
    np.testing.assert_array_equal(hwc[..., 1], viz.to_uint8(chw[1]))  # channel order kept
    assert viz.to_uint8(torch.rand(1, 5, 6)).shape == (5, 6)
    assert viz.to_uint8(np.full((2, 2), 7.0)).max() == 255  # floats are clipped to [0, 1]
    u8 = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert viz.to_uint8(u8) is u8
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        viz.to_uint8(np.zeros((2, 3, 4, 5)))


def test_png_round_trip_and_scale():
    img = np.random.default_rng(0).integers(0, 256, (4, 5), dtype=np.uint8)
    back = _decode(viz.image_data_uri(img, scale=3))
    assert back.shape == (12, 15)
    np.testing.assert_array_equal(back[::3, ::3], img)  # nearest-neighbour enlargement
    with pytest.raises(ValueError, match="scale"):
        viz.image_png(img, scale=0)


def test_mosaic_layout_borders_and_blanks():
    a = np.zeros((4, 4))
    b = np.ones((4, 4))
    out = viz.mosaic([[a, b], [None, a]], borders=[[None, (255, 0, 0)], [None, None]], pad=1, border=2)
    cell = 4 + 2 * 2
    assert out.shape == (2 * (cell + 1) + 1, 2 * (cell + 1) + 1, 3)
    y, x = 1, 1 + cell + 1  # cell (0, 1): a red frame around a white image
    assert tuple(out[y, x]) == (255, 0, 0)
    assert (out[y + 2:y + 6, x + 2:x + 6] == 255).all()
    assert (out[1 + 2:1 + 6, 1 + 2:1 + 6] == 0).all()  # cell (0, 0) is black, no frame
    assert (out[cell + 2:, 1:cell + 1] == 255).all()  # the blank cell keeps the background
    with pytest.raises(ValueError, match="one size"):
        viz.mosaic([[a, np.zeros((3, 3))]])


def test_view_gallery_is_one_image_with_labels():
    views = torch.rand(2, 5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fig = viz.view_gallery(views, ["crop", "color"], [0, 0.2, 0.38, 0.54, 0.66], scale=2)
    assert len(fig.data) == 1 and fig.data[0].type == "image"
    pic = _decode(fig.data[0].source)
    assert pic.shape[0] >= 2 * 8 * 2 and pic.shape[1] >= 5 * 8 * 2
    with pytest.raises(ValueError, match="row_labels"):
        viz.view_gallery(views, ["crop"])
    with pytest.raises(ValueError, match="strengths"):
        viz.view_gallery(views, ["a", "b"], [0, 1])


def test_retrieval_gallery_frames_match_correctness():
    q = np.zeros((2, 1, 6, 6))
    nb = np.ones((2, 3, 1, 6, 6))
    correct = np.array([[True, False, True], [False, False, True]])
    fig = viz.retrieval_gallery(q, nb, correct, scale=1)
    assert fig.layout.meta["precision_at_k"] == pytest.approx(correct.mean())
    pic = _decode(fig.data[0].source)
    # find frame colours by scanning the mosaic's top-left corners: reproduce the layout
    tiles = viz.mosaic([[q[i]] + list(nb[i]) for i in range(2)],
                       borders=[[viz.QUERY_COLOR] + [viz.CORRECT_COLOR if c else viz.WRONG_COLOR
                                                     for c in row] for row in correct], pad=3, border=2)
    assert pic.shape[0] >= tiles.shape[0] and pic.shape[1] >= tiles.shape[1]
    frames = [tuple(tiles[3 + i * 13, 3 + j * 13]) for i in range(2) for j in range(4)]
    assert frames.count(viz.CORRECT_COLOR) == correct.sum()
    assert frames.count(viz.WRONG_COLOR) == (~correct).sum()
    with pytest.raises(ValueError, match="correct"):
        viz.retrieval_gallery(q, nb, correct[:1])


# --- curves and tables ---------------------------------------------------------------------------
def test_curves_panels_skip_missing_and_nan():
    hist = pd.DataFrame({"step": [1, 2, 3, 4], "loss": [1.0, 0.8, 0.7, 0.5],
                         "loss_rank": [0.3, np.nan, 0.2, np.nan], "ssr_rate": [1, 0.5, 0.67, 0.5]})
    fig = viz.curves(hist, "step", {"loss": ["loss", "loss_rank", "absent"], "SSR": ["ssr_rate"],
                                    "gone": ["absent"]})
    names = [t.name for t in fig.data]
    assert names == ["loss", "loss_rank", "ssr_rate"]
    rank = fig.data[1]
    assert list(rank.x) == [1, 3] and list(rank.y) == [0.3, 0.2]
    assert [a.text for a in fig.layout.annotations] == ["loss", "SSR"]
    fig2 = viz.curves(hist.to_dict("records"), "step", {"loss": ["loss"]})
    assert list(fig2.data[0].y) == list(hist["loss"])
    with pytest.raises(ValueError, match="x='epoch'"):
        viz.curves(hist, "epoch", {"loss": ["loss"]})
    with pytest.raises(ValueError, match="none of the columns"):
        viz.curves(hist, "step", {"x": ["absent"]})


def test_metric_table_and_mean_std():
    fig = viz.metric_table({"baseline": {"r@1": 0.51234, "map@r": float("nan")},
                            "ssr": {"r@1": 0.6, "map@r": 0.2}}, digits=2)
    cells = fig.data[0].cells.values
    assert list(cells[0]) == ["baseline", "ssr"]
    assert list(cells[1]) == ["0.51", "0.60"] and list(cells[2]) == ["-", "0.20"]
    summary = pd.DataFrame({"setting": ["a", "b"], "m_mean": [0.5, 0.25], "m_std": [0.01, np.nan],
                            "n": [3, 1]})
    shown = viz.format_mean_std(summary, ["m"], digits=3, keep=["setting"])
    assert list(shown["m"]) == ["0.500 ± 0.010", "0.250"]
    assert list(shown["n"]) == [3, 1]


def test_ablation_chart_error_bars():
    summary = pd.DataFrame({"setting": ["base", "ssr"], "ssr": [False, True],
                            "m_mean": [0.5, 0.6], "m_std": [0.01, 0.02]})
    fig = viz.ablation_chart(summary, "setting", "m")
    assert list(fig.data[0].y) == [0.5, 0.6] and list(fig.data[0].error_y.array) == [0.01, 0.02]
    # dots on an axis that fits them, not bars from 0 that hide a difference of 0.01
    assert fig.data[0].type == "scatter" and fig.data[0].mode == "markers"
    assert fig.layout.yaxis.rangemode in (None, "normal")
    named = pd.DataFrame({"setting": ["baseline", "ssr"], "m_mean": [0.5, 0.51], "m_std": [0.0, 0.0]})
    colours = list(viz.ablation_chart(named, "setting", "m").data[0].marker.color)
    assert colours == [viz.setting_colour("baseline"), viz.setting_colour("ssr")]
    fig = viz.ablation_chart(summary, "setting", "m", color="ssr")
    assert len(fig.data) == 2
    with pytest.raises(ValueError, match="nope"):
        viz.ablation_chart(summary, "nope", "m")


# --- embedding maps ------------------------------------------------------------------------------
def test_project_2d_pca_matches_svd_and_validates():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * np.array([5, 3, 1, 0.5, 0.2, 0.1])
    coords = viz.project_2d(x, "pca")
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:2].T
    for j in range(2):  # same axes up to sign
        assert min(np.abs(coords[:, j] - ref[:, j]).max(), np.abs(coords[:, j] + ref[:, j]).max()) < 1e-4
    with pytest.raises(ValueError, match="method='tsne'"):
        viz.project_2d(x, "tsne")
    with pytest.raises(ValueError, match="n >= 3"):
        viz.project_2d(x[:2], "pca")


@pytest.mark.slow
def test_project_2d_umap_is_seeded():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 6])
    a, b = viz.project_2d(x, "umap", seed=1), viz.project_2d(x, "umap", seed=1)
    np.testing.assert_allclose(a, b)
    # the two clusters stay apart in the map
    ca, cb = a[:40].mean(0), a[40:].mean(0)
    spread = max(a[:40].std(0).max(), a[40:].std(0).max())
    assert np.linalg.norm(ca - cb) > 3 * spread


def test_embedding_scatter_traces_hovers_and_highlight():
    xy = np.arange(12, dtype=float).reshape(6, 2)
    cls = ["a", "b", "a", "c", "b", "a"]
    imgs = np.random.default_rng(0).random((6, 4, 4))
    fig = viz.embedding_scatter(xy, cls, images=imgs, hover={"family": list("uvwxyz")})
    assert [t.name for t in fig.data] == ["a", "b", "c"]
    a = fig.data[0]
    assert list(a.x) == [0, 4, 10]
    uris = [row[0] for row in a.customdata]
    np.testing.assert_array_equal(_decode(uris[1]), viz.to_uint8(imgs[2]))  # point 2's own image
    assert [row[2] for row in a.customdata] == ["u", "w", "z"]
    assert "family: %{customdata[2]}" in a.hovertemplate
    hi = viz.embedding_scatter(xy, cls, highlight=np.array(cls) == "a")
    assert hi.data[0].name == "other" and len(hi.data[0].x) == 3
    assert [t.name for t in hi.data[1:]] == ["a"]
    with pytest.raises(ValueError, match="color has 2"):
        viz.embedding_scatter(xy, cls[:2])
    with pytest.raises(ValueError, match=r"coords must be \[n, 2\]"):
        viz.embedding_scatter(np.zeros((3, 3)), "abc")


def test_side_by_side_shares_colours():
    xy = np.random.default_rng(0).normal(size=(8, 2))
    cls = list("aabbccdd")
    fig = viz.side_by_side([xy, -xy], cls, ["baseline", "SSR"])
    left = {t.name: t.marker.color for t in fig.data if t.xaxis == "x"}
    right = {t.name: t.marker.color for t in fig.data if t.xaxis == "x2"}
    assert left == right and len(left) == 4
    assert sum(t.showlegend is not False for t in fig.data) == 4  # one legend entry per class
    with pytest.raises(ValueError, match="titles"):
        viz.side_by_side([xy], cls, ["a", "b"])


def test_trajectories_upto_filters_levels():
    coords = np.random.default_rng(0).normal(size=(3, 5, 2))
    s = [0.0, 0.25, 0.5, 0.75, 1.0]
    fig = viz.trajectories(coords, s, background=np.zeros((4, 2)), upto=0.5)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 3 and all(len(t.x) == 3 for t in lines)
    np.testing.assert_allclose(lines[1].x, coords[1, :3, 0])
    assert len(viz.trajectories(coords, s).data[0].x) == 5
    with pytest.raises(ValueError, match="L = len"):
        viz.trajectories(coords, s[:4])


def test_similarity_curve_marks_current():
    fig = viz.similarity_curve([0, 0.5, 1], {"metric": [1, 0.9, 0.7]}, current=0.5)
    assert fig.layout.shapes[0].x0 == 0.5


# --- export --------------------------------------------------------------------------------------
def test_write_html_is_self_contained_with_hover_script(tmp_path):
    fig = viz.embedding_scatter(np.zeros((3, 2)), "abc", images=np.zeros((3, 4, 4)))
    path = viz.write_html(fig, tmp_path / "sub" / "f.html")
    text = path.read_text()
    assert "plotly.js" in text.lower() or "Plotly" in text
    assert len(text) > 1_000_000  # plotly.js embedded: works offline
    assert "dmlnb-hover-image" in text and "plotly_hover" in text
    assert "dmlnb-hover-image" not in viz.write_html(fig, tmp_path / "g.html", hover_images=False).read_text()


@pytest.mark.slow
@pytest.mark.browser
def test_write_png_renders(tmp_path):
    pytest.importorskip("playwright", reason="playwright is not installed")
    from pathlib import Path

    if not Path(viz.chromium_path()).exists():
        pytest.skip(f"no Chromium at {viz.chromium_path()}")
    a = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout=dict(width=300, height=200))
    b = viz.view_gallery(np.random.default_rng(0).random((1, 3, 1, 8, 8)), ["crop"], scale=2)
    pa, pb = viz.write_pngs([(a, tmp_path / "a.png"), (b, tmp_path / "b.png")], scale=1)
    img = np.asarray(Image.open(pa).convert("RGB"))
    assert img.shape[0] >= 190 and img.shape[1] >= 290
    assert (np.abs(img.astype(int) - 255).sum(-1) > 30).mean() > 0.02  # something was drawn
    assert Image.open(pb).size[0] >= b.layout.width - 20


def test_glyph_gallery_png_has_labels_for_rows_and_columns(tmp_path):
    from dmlnb.data import load_dataset
    from dmlnb.gallery import glyph_column_label, glyph_gallery, write_glyph_gallery

    test = load_dataset("glyphs", "test")
    chars = "".join(test.classes[:3])
    grid, captions = glyph_gallery(test, chars, fonts_per_style=1)
    path, again = write_glyph_gallery(tmp_path / "g.png", test, chars, fonts_per_style=1, scale=2)
    assert again == captions
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    # the labelled image is the grid enlarged twice plus a left margin and a top band for labels
    assert img.shape[0] > 2 * grid.shape[0] and img.shape[1] > 2 * grid.shape[1]
    assert (img[:8, :, :] < 128).any()  # text in the top band
    assert glyph_column_label("Latin Modern Mono Light (mono)") == "Latin"
    assert glyph_column_label("Breip (script)") == "Breip"
