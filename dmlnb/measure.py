"""Intra-class measures of a trained model, on the test classes.

- view-ranking consistency (:func:`dmlnb.metrics.view_ranking_consistency`) of nested views made
  from ``VIEW_IMAGES`` fixed test images, in the metric and in the SSR embedding
  (:func:`view_similarities`: the very same views for every model);
- attribute retrieval within a class (:func:`dmlnb.metrics.attribute_retrieval`): how much more
  often than chance the nearest same-class neighbour shares the query's attribute (glyphs: the
  typeface's family, weight, italic flag, style category);
- intra-class spread (:func:`dmlnb.metrics.intraclass_spread`).

:func:`measure_run` measures a finished run (cached in ``RUN/intraclass.json``);
:func:`measure_untrained` the untrained network of a config, as a reference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlnb.data.icons import ATTRIBUTES as ICONS_ATTRIBUTES
from dmlnb.runs import write_json
from dmlnb.ssr import view_similarities

__all__ = ["intraclass_measures", "measure_run", "measure_untrained", "view_trajectories",
           "VIEW_IMAGES", "VIEW_SEED", "GLYPH_ATTRIBUTES", "ICON_ATTRIBUTES"]

VIEW_IMAGES = 1000  # test images whose nested views measure view-ranking consistency
VIEW_SEED = 0  # the images and the views' directions are the same for every run
GLYPH_ATTRIBUTES = ("family", "weight", "italic", "category")  # the typeface of a glyph
#: the style of an icon: its theme and theme family. Each theme draws a name once, so within a
#: class the theme never repeats and its lift is 0 by construction in the default data set; the
#: family repeats only with ``variants=True`` (recolours of one theme, like a typeface's weights)
ICON_ATTRIBUTES = ICONS_ATTRIBUTES


# ------------------------------------------------------------------------------------------------
def _fixed_subset(n: int, k: int, seed: int = VIEW_SEED) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(k, n), replace=False))


def intraclass_measures(
    model: torch.nn.Module,
    test_dataset: Any,
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    view_images: int = VIEW_IMAGES,
) -> dict[str, float]:
    """The three intra-class measures of a model on the test split (see the module docstring).

    ``embeddings``/``labels`` are the test split's metric embeddings in dataset order.
    """
    from dmlnb.metrics import attribute_retrieval, intraclass_spread, view_ranking_consistency

    out: dict[str, float] = {}
    idx = _fixed_subset(len(test_dataset), view_images)
    images = torch.stack([test_dataset[int(i)][0] for i in idx])
    sims = view_similarities(model, images, seed=VIEW_SEED)
    for key, s in sims.items():
        vr = view_ranking_consistency(s)
        out[f"view_pair_order_{key}"] = vr["pair_order"]
        out[f"view_tau_{key}"] = vr["kendall_tau"]
    spread = intraclass_spread(embeddings, labels)
    out["spread"] = float(spread["ratio"] if isinstance(spread, dict) else spread)
    meta = getattr(test_dataset, "metadata", None)
    known = [s for s in (GLYPH_ATTRIBUTES, ICON_ATTRIBUTES)
             if meta is not None and all(a in meta.columns for a in s)]
    if known:
        attrs = {a: meta[a].astype(str).to_numpy() for a in known[0]}
        for name, r in attribute_retrieval(embeddings, labels, attrs).items():
            out[f"lift_{name}"] = r["lift"]
            out[f"agreement_{name}"] = r["agreement"]
            out[f"chance_{name}"] = r["chance"]
    return out


def measure_run(run_dir: str | Path) -> dict[str, float]:
    """Intra-class measures of a finished run (its test embeddings and its selected checkpoint).

    Cached in ``RUN/intraclass.json``.
    """
    from dmlnb.experiment import load_model, run_dataset
    from dmlnb.runs import load_run

    run_dir = Path(run_dir)
    cache = run_dir / "intraclass.json"
    if cache.exists():
        return json.loads(cache.read_text())
    run = load_run(run_dir)
    emb = run.embeddings()
    result = intraclass_measures(load_model(run), run_dataset(run), emb["embeddings"],
                                 emb["labels"])
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
