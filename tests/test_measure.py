"""dmlnb.measure: the intra-class measures of a model, their keys and the run cache."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from dmlnb import measure
from dmlnb.defaults import SSR_FAMILIES, SSR_LEVELS, SSR_SIGMA
from dmlnb.metrics import density_ratio, intraclass_spread, spectral_decay
from dmlnb.model import EmbeddingNet
from dmlnb.views import make_views

LABELS = np.repeat(np.arange(4), 6)
FAMILY = np.tile(["a", "a", "b", "b", "c", "c"], 4)  # two recolours of each family per class
THEME = np.array([f"{f}{i % 2}" for i, f in enumerate(FAMILY)])  # never repeats within a class


class Icons(torch.utils.data.Dataset):
    """24 random 3x16x16 images in 4 classes with the icons' metadata columns."""

    metadata = pd.DataFrame({"theme": THEME, "family": FAMILY})

    def __len__(self) -> int:
        return len(LABELS)

    def __getitem__(self, i: int):
        return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(int(i))), LABELS[i]


def _model() -> EmbeddingNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return EmbeddingNet(backbone="smallcnn", in_channels=3, embed_dim=16).eval()


def _gallery(model: EmbeddingNet, data: Icons) -> np.ndarray:
    with torch.no_grad():
        return model(torch.stack([data[i][0] for i in range(len(data))])).numpy()


def test_intraclass_measures_give_their_keys_and_the_new_measures(one_thread):
    data, model = Icons(), _model()
    emb = _gallery(model, data)
    out = measure.intraclass_measures(model, data, emb, LABELS, view_images=8)
    assert set(out) == set(measure.intraclass_keys(data))
    assert {f"orig_r1_level{n}" for n in range(1, SSR_LEVELS + 1)} <= set(out)
    assert out["rho"] == pytest.approx(spectral_decay(emb))
    assert out["density_ratio"] == pytest.approx(density_ratio(emb, LABELS))
    assert out["spread"] == pytest.approx(intraclass_spread(emb, LABELS)["ratio"])
    assert all(0 <= out[f"orig_r1_level{n}"] <= 1 for n in range(1, SSR_LEVELS + 1))
    # icon attributes: both lift keys; a theme never repeats within a class, so its agreement
    # and chance are 0 and its lift 0 (documented at ICON_ATTRIBUTES), not NaN
    for a in ("theme", "family"):
        assert {f"lift_{a}", f"agreement_{a}", f"chance_{a}"} <= set(out)
    assert out["chance_theme"] == 0.0 and out["agreement_theme"] == 0.0
    assert out["lift_theme"] == 0.0
    assert out["chance_family"] == pytest.approx(1 / 5) and np.isfinite(out["lift_family"])
    assert measure.intraclass_keys(torch.utils.data.TensorDataset(torch.zeros(2, 1))) == [
        k for k in measure.intraclass_keys(data) if not k.startswith(("lift", "agreement", "chance"))]


def test_orig_r1_equals_brute_force_on_view_similarities_views(one_thread):
    """The views are those of dmlnb.ssr.view_similarities (same seed, one batch here), embedded by
    the metric head; each is searched among all the test split's embeddings by hand."""
    data, model, K = Icons(), _model(), 16
    emb = _gallery(model, data)
    out = measure.intraclass_measures(model, data, emb, LABELS, view_images=K)
    idx = np.sort(np.random.default_rng(measure.VIEW_SEED).choice(len(data), K, replace=False))
    images = torch.stack([data[int(i)][0] for i in idx])
    views = make_views(images, levels=SSR_LEVELS, families=SSR_FAMILIES, sigma=SSR_SIGMA,
                       nested=True, generator=torch.Generator().manual_seed(measure.VIEW_SEED))
    with torch.no_grad():
        z = model(views.flatten(0, 1)).numpy().astype(np.float64).reshape(K, SSR_LEVELS, -1)
    g = emb.astype(np.float64) / np.linalg.norm(emb, axis=1, keepdims=True)
    for n in range(SSR_LEVELS):
        hits = 0
        for b in range(K):
            q = z[b, n] / np.linalg.norm(z[b, n])
            sims = [float(q @ g[j]) for j in range(len(g))]
            best = max(range(len(g)), key=lambda j: (sims[j], -j))  # lower index on a tie
            hits += best == idx[b]
        assert out[f"orig_r1_level{n + 1}"] == pytest.approx(hits / K)


@pytest.mark.parametrize("mode", [True, False])
def test_intraclass_measures_restore_the_models_mode(mode, one_thread):
    data, model = Icons(), _model()
    model.train(mode)
    emb = _gallery(model.eval(), data)
    model.train(mode)
    measure.intraclass_measures(model, data, emb, LABELS, view_images=4)
    assert model.training is mode and all(m.training is mode for m in model.modules())


def test_measure_run_recomputes_a_cache_that_lacks_keys(tmp_path, monkeypatch):
    import dmlnb.experiment
    import dmlnb.runs

    data = Icons()
    full = {k: 0.5 for k in measure.intraclass_keys(data)}
    calls = []

    class Run:
        def embeddings(self):
            return {"embeddings": np.zeros((24, 4)), "labels": LABELS}

    monkeypatch.setattr(dmlnb.runs, "load_run", lambda d: Run())
    monkeypatch.setattr(dmlnb.experiment, "run_dataset", lambda run: data)
    monkeypatch.setattr(dmlnb.experiment, "load_model", lambda run: None)
    monkeypatch.setattr(measure, "intraclass_measures",
                        lambda *a, **k: calls.append(1) or dict(full))
    cache = tmp_path / "intraclass.json"
    old = {k: 0.1 for k in full if k not in ("rho", "density_ratio")
           and not k.startswith("orig_r1")}  # a cache written before those measures existed
    cache.write_text(json.dumps(old))
    assert measure.measure_run(tmp_path) == full and len(calls) == 1
    assert json.loads(cache.read_text()) == full  # refreshed
    assert measure.measure_run(tmp_path) == full and len(calls) == 1  # a complete cache is reused
    extra = {**full, "something_else": 1.0}
    cache.write_text(json.dumps(extra))
    assert measure.measure_run(tmp_path) == extra and len(calls) == 1
