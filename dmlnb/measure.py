"""Intra-class measures of a trained model, on the test classes.

- view-ranking consistency (:func:`dmlnb.metrics.view_ranking_consistency`) of nested views made
  from ``VIEW_IMAGES`` fixed test images, in the metric and in the SSR embedding
  (:func:`view_similarities`: the very same views for every model): ``view_pair_order_{head}``,
  ``view_tau_{head}``;
- retrieval of the original from its view (:func:`dmlnb.metrics.original_retrieval`): for those
  same images and views, the fraction of level-n views (metric head) whose nearest item among
  *all* test-split metric embeddings is their own original, ``orig_r1_level{n}`` (n = 1..N);
- attribute retrieval within a class (:func:`dmlnb.metrics.attribute_retrieval`): how much more
  often than chance the nearest same-class neighbour shares the query's attribute (glyphs: the
  typeface's family, weight, italic flag, style category; icons: theme and theme family):
  ``lift_{a}``, ``agreement_{a}``, ``chance_{a}``;
- intra-class spread (:func:`dmlnb.metrics.intraclass_spread`, its ratio): ``spread``;
- density ratio (:func:`dmlnb.metrics.density_ratio`: mean within-class distance over the mean
  distance between class means): ``density_ratio``;
- spectral decay rho of Roth et al. 2020 (:func:`dmlnb.metrics.spectral_decay`): ``rho``.

:func:`intraclass_keys` lists the keys :func:`intraclass_measures` gives for a data set;
:func:`measure_run` measures a finished run (cached in ``RUN/intraclass.json``, recomputed when
the cache lacks one of those keys); :func:`measure_untrained` the untrained network of a config,
as a reference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlnb.data.icons import ATTRIBUTES as ICONS_ATTRIBUTES
from dmlnb.defaults import SSR_LEVELS
from dmlnb.runs import write_json
from dmlnb.ssr import view_similarities

__all__ = ["intraclass_keys", "intraclass_measures", "measure_run", "measure_untrained", "view_trajectories",
           "VIEW_IMAGES", "VIEW_SEED", "GLYPH_ATTRIBUTES", "ICON_ATTRIBUTES"]

VIEW_IMAGES = 1000  # test images whose nested views measure view-ranking consistency
VIEW_SEED = 0  # the images and the views' directions are the same for every run
GLYPH_ATTRIBUTES = ("family", "weight", "italic", "category")  # the typeface of a glyph
#: the style of an icon: its theme and theme family. Each theme draws a name once, so within a
#: class the theme never repeats and its lift is 0 by construction in the default data set; the
#: family repeats only with ``variants=True`` (recolours of one theme, like a typeface's weights).
#: (A class in which an attribute never repeats has agreement = chance = 0, so lift 0, not NaN;
#: lift is NaN only when no class has two items.)
ICON_ATTRIBUTES = ICONS_ATTRIBUTES
HEADS = ("metric", "ssr")  # the embeddings of view_similarities


# ------------------------------------------------------------------------------------------------
def _fixed_subset(n: int, k: int, seed: int = VIEW_SEED) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(k, n), replace=False))


def _attributes(test_dataset: Any) -> tuple[str, ...]:
    """The attribute set (glyph or icon) whose columns all are in the data set's ``metadata``."""
    meta = getattr(test_dataset, "metadata", None)
    known = [s for s in (GLYPH_ATTRIBUTES, ICON_ATTRIBUTES)
             if meta is not None and all(a in meta.columns for a in s)]
    return known[0] if known else ()


def intraclass_keys(test_dataset: Any, *, levels: int = SSR_LEVELS) -> list[str]:
    """The keys :func:`intraclass_measures` returns for ``test_dataset`` (``levels`` views)."""
    keys = [f"{m}_{h}" for h in HEADS for m in ("view_pair_order", "view_tau")]
    keys += [f"orig_r1_level{n}" for n in range(1, levels + 1)]
    keys += ["spread", "density_ratio", "rho"]
    keys += [f"{m}_{a}" for a in _attributes(test_dataset) for m in ("lift", "agreement", "chance")]
    return keys


class _MetricRecorder(torch.nn.Module):
    """``model`` itself, keeping the metric embeddings of every forward pass.

    Handed to :func:`view_similarities` in place of the model, it sees exactly the batches that
    function makes (each: the originals, then their views, image by image, weakest first; see
    :meth:`dmlnb.ssr.SSRDraw.inputs`), so the views' embeddings come from the very views and
    the very pass the view-ranking measures use. Its ``training`` flag is the model's own, so that
    view_similarities restores the model's mode exactly as it does for the bare model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, ssr: bool = False) -> Any:
        out = self.model(x, ssr=ssr)
        z = out[0] if isinstance(out, tuple) else out
        self.batches.append(z.detach().float().cpu())
        return out

    def views(self, levels: int, similarities: np.ndarray) -> torch.Tensor:
        """The views' metric embeddings [B, N, d], checked against view_similarities'
        ``similarities["metric"]`` [B, N] (a change of its batch layout fails loudly)."""
        anchors, views = [], []
        for z in self.batches:
            b = z.shape[0] // (levels + 1)
            if b * (levels + 1) != z.shape[0]:
                raise RuntimeError(f"a batch of {z.shape[0]} is not B (1 + {levels}) images")
            anchors.append(z[:b])
            views.append(z[b:].reshape(b, levels, -1))
        a, v = torch.cat(anchors), torch.cat(views)
        e_a = torch.nn.functional.normalize(a, dim=1)
        e_v = torch.nn.functional.normalize(v, dim=2)
        cos = torch.einsum("bd,bnd->bn", e_a, e_v).numpy()
        if cos.shape != similarities.shape or not np.allclose(cos, similarities, atol=1e-5):
            raise RuntimeError("recorded view embeddings do not match view_similarities")
        return v


def intraclass_measures(
    model: torch.nn.Module,
    test_dataset: Any,
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    view_images: int = VIEW_IMAGES,
) -> dict[str, float]:
    """The intra-class measures of a model on the test split (see the module docstring); the
    keys are :func:`intraclass_keys`.

    ``embeddings``/``labels`` are the test split's metric embeddings in dataset order (the
    gallery of ``orig_r1_level{n}``).
    """
    from dmlnb.metrics import (
        attribute_retrieval,
        density_ratio,
        intraclass_spread,
        original_retrieval,
        spectral_decay,
        view_ranking_consistency,
    )

    out: dict[str, float] = {}
    idx = _fixed_subset(len(test_dataset), view_images)
    images = torch.stack([test_dataset[int(i)][0] for i in idx])
    recorder = _MetricRecorder(model)
    sims = view_similarities(recorder, images, levels=SSR_LEVELS, seed=VIEW_SEED)
    for key in HEADS:
        vr = view_ranking_consistency(sims[key])
        out[f"view_pair_order_{key}"] = vr["pair_order"]
        out[f"view_tau_{key}"] = vr["kendall_tau"]
    views = recorder.views(SSR_LEVELS, sims["metric"])
    hits = original_retrieval(views, embeddings, idx)
    for n, h in enumerate(hits, start=1):
        out[f"orig_r1_level{n}"] = float(h)
    spread = intraclass_spread(embeddings, labels)
    out["spread"] = float(spread["ratio"] if isinstance(spread, dict) else spread)
    out["density_ratio"] = float(density_ratio(embeddings, labels))
    out["rho"] = float(spectral_decay(embeddings))
    names = _attributes(test_dataset)
    if names:
        meta = test_dataset.metadata
        attrs = {a: meta[a].astype(str).to_numpy() for a in names}
        for name, r in attribute_retrieval(embeddings, labels, attrs).items():
            out[f"lift_{name}"] = r["lift"]
            out[f"agreement_{name}"] = r["agreement"]
            out[f"chance_{name}"] = r["chance"]
    return out


def measure_run(run_dir: str | Path) -> dict[str, float]:
    """Intra-class measures of a finished run (its test embeddings and its selected checkpoint).

    Cached in ``RUN/intraclass.json``; a cache that lacks any of the keys of
    :func:`intraclass_keys` (e.g. one written before a measure was added) is recomputed and
    overwritten.
    """
    from dmlnb.experiment import load_model, run_dataset
    from dmlnb.runs import load_run

    run_dir = Path(run_dir)
    cache = run_dir / "intraclass.json"
    run = load_run(run_dir)
    test = run_dataset(run)
    if cache.exists():
        cached = json.loads(cache.read_text())
        if set(intraclass_keys(test)) <= set(cached):
            return cached
    emb = run.embeddings()
    result = intraclass_measures(load_model(run), test, emb["embeddings"], emb["labels"])
    write_json(cache, result)
    return result


def measure_untrained(config: dict[str, Any], seed: int) -> dict[str, float]:
    """Test metrics and intra-class measures of the untrained network of ``config`` with ``seed``."""
    from dmlnb.config import TrainConfig
    from dmlnb.experiment import embed, load_split, seeded_model
    from dmlnb.metrics import evaluate

    cfg = TrainConfig.from_dict({**config, "seed": seed})
    test = load_split(cfg, cfg.test_split)
    model = seeded_model(cfg, in_channels=test.channels).eval()
    emb = embed(model, test)
    row = dict(evaluate(emb["embeddings"], emb["labels"], ks=tuple(cfg.eval_ks), kmeans_seed=0))
    row.update(intraclass_measures(model, test, emb["embeddings"], emb["labels"]))
    return row


def view_trajectories(
    models: Mapping[str, torch.nn.Module],
    originals: torch.Tensor,
    background: Mapping[str, np.ndarray],
    strengths: Sequence[float],
    *,
    families: Sequence[str],
    projection: str = "umap",
    seed: int = 0,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], torch.Tensor]:
    """Nested views of ``originals`` at ``strengths`` (``strengths[0] = 0``: the original), and
    their paths through each model's 2-d map of the test set.

    For each model, the background embeddings ``background[name]`` [n, d] and the views'
    embeddings are projected together (:func:`dmlnb.viz.project_2d`), so paths and test set
    share one map. Returns ``({name: (background [n, 2], paths [K, L, 2])}, ladder [K, L, C, H,
    W])``; the views are the same for every model (one generator seeded by ``seed``).
    """
    from dmlnb.experiment import embed
    from dmlnb.views import make_views
    from dmlnb.viz import project_2d

    strengths = np.asarray(strengths, dtype=float)
    views = make_views(originals, levels=len(strengths) - 1, families=tuple(families),
                       schedule=list(strengths[1:]), generator=torch.Generator().manual_seed(seed))
    ladder = torch.cat([originals[:, None], views], dim=1)
    k, n_levels = ladder.shape[:2]
    flat = ladder.flatten(0, 1)
    data = torch.utils.data.TensorDataset(flat, torch.zeros(len(flat), dtype=torch.long))
    maps = {}
    for name, model in models.items():
        z = embed(model, data, device=next(model.parameters()).device)["embeddings"]
        bg = np.asarray(background[name])
        both = project_2d(np.concatenate([bg, z]), projection, seed=seed)
        maps[name] = (both[: len(bg)], both[len(bg):].reshape(k, n_levels, 2))
    return maps, ladder
