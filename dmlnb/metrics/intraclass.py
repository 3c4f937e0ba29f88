"""Measurements of intra-class structure: what self-supervised ranking (SSR) is meant to keep.

Ordinary DML treats all same-class neighbours alike and can collapse the structure inside a class;
SSR (Fu et al., AAAI 2021) trains the network to rank views of increasing strength. These pure
functions measure the effect directly:

- :func:`view_ranking_consistency`: does similarity to the original fall as view strength rises?
- :func:`attribute_retrieval` (with :func:`nearest_same_class`): within a class, is the nearest
  same-class neighbour one with the same attribute (e.g. typeface family, weight, italic)?
- :func:`intraclass_spread`: mean within-class distance relative to mean between-class distance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dmlnb._validate import check_positive_int
from dmlnb.metrics._inputs import as_embeddings, as_labels, l2_normalize
from dmlnb.metrics.neighbors import auto_chunk_size, iter_knn


def view_ranking_consistency(similarities: Any) -> dict[str, Any]:
    """How well similarity to the original falls as the view strength rises.

    Parameters
    ----------
    similarities : array or tensor [B, N]
        ``similarities[b, n-1] = cos(z(x_b), z(v_n(x_b)))`` for views of increasing strength
        n = 1..N (N >= 2) of image b, in one embedding (metric head or SSR head).

    Returns
    -------
    dict with
    ``pair_order`` : float
        Fraction of correctly ordered pairs over all images and all level pairs n < m:
        mean of 1[s_n > s_m] + 0.5 * 1[s_n = s_m] (a tie counts half; 0.5 is chance).
    ``kendall_tau`` : float
        Mean over images of Kendall's tau-b between the similarities and the *reversed* strength
        order: tau_b = (C - D) / sqrt(P * (P - T)) with P = N(N-1)/2 level pairs, C pairs with
        s_n > s_m, D with s_n < s_m, T ties (n < m). +1: strictly falling; -1: strictly rising.
        Images with all similarities equal (tau undefined) are left out and counted.
    ``tau_undefined`` : int, images left out of ``kendall_tau``.
    ``per_image_tau`` : float array [B] (NaN where undefined), e.g. for paired tests.
    ``level_mean`` : float array [N], mean similarity at each level.
    """
    s = as_embeddings("similarities", similarities).to(torch.float64).cpu().numpy()
    b, n = s.shape
    if n < 2:
        raise ValueError(f"similarities needs N >= 2 strength levels (columns), got {n}")
    iu, ju = np.triu_indices(n, k=1)
    d = s[:, iu] - s[:, ju]  # [B, P], pairs n < m
    conc = (d > 0).sum(axis=1).astype(np.float64)
    disc = (d < 0).sum(axis=1).astype(np.float64)
    ties = (d == 0).sum(axis=1).astype(np.float64)
    p = float(len(iu))
    pair_order = float((conc + 0.5 * ties).sum() / (b * p))
    denom = np.sqrt(p * (p - ties))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = np.where(denom > 0, (conc - disc) / denom, np.nan)
    undefined = int(np.isnan(tau).sum())
    mean_tau = float(np.nanmean(tau)) if undefined < b else float("nan")
    return {
        "pair_order": pair_order,
        "kendall_tau": mean_tau,
        "tau_undefined": undefined,
        "per_image_tau": tau,
        "level_mean": s.mean(axis=0),
    }


def nearest_same_class(embeddings: Any, labels: Any, *, normalize: bool = True) -> np.ndarray:
    """Index of each item's most similar *same-class* item (itself excluded); -1 if it has none.

    Cosine similarity (raw dot product with ``normalize=False``); on equal similarity the lower
    index wins (as in :func:`dmlnb.metrics.knn`). The search runs class by class (a loop over
    classes, vectorised within a class, chunked for large classes), so its cost is
    sum_c n_c^2 * dim rather than n^2 * dim.
    """
    x = as_embeddings("embeddings", embeddings)
    y = as_labels("labels", labels, x.shape[0], device=x.device)
    if normalize:
        x = l2_normalize(x)
    order = torch.argsort(y, stable=True)
    ys = y[order]
    classes, counts = torch.unique_consecutive(ys, return_counts=True)
    out = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
    start = 0
    for c in counts.tolist():
        members = order[start : start + c]  # ascending original index (stable sort)
        start += c
        if c < 2:
            continue
        xc = x[members]
        for s0, _, idx in iter_knn(xc, xc, 1, exclude_self=True):
            out[members[s0 : s0 + idx.shape[0]]] = members[idx[:, 0]]
    return out.cpu().numpy()


def _codes(name: str, values: Any, n: int) -> np.ndarray:
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    v = v.reshape(-1) if v.ndim == 2 and 1 in v.shape else v
    if v.ndim != 1 or v.shape[0] != n:
        raise ValueError(f"attributes[{name!r}] must be 1-D with {n} entries, got shape {v.shape}")
    return np.unique(v, return_inverse=True)[1].reshape(-1)


def attribute_retrieval(
    embeddings: Any,
    labels: Any,
    attributes: Mapping[str, Any],
    *,
    normalize: bool = True,
) -> dict[str, dict[str, float]]:
    """Within each class, how often the nearest same-class neighbour shares the query's attribute.

    For every query i whose class has at least one other item, let j(i) be its most similar
    same-class item (query excluded; :func:`nearest_same_class`). For each attribute a
    (e.g. typeface family, weight, italic, category; any values compared by equality):

    - ``agreement`` = mean_i 1[a_{j(i)} = a_i];
    - ``chance`` = mean_i (#{k != i in class(i) : a_k = a_i}) / (n_class(i) - 1), the expected
      agreement of a same-class neighbour drawn uniformly at random;
    - ``lift`` = agreement - chance (> 0: the embedding keeps this within-class structure;
      about 0: the class has collapsed with respect to it);
    - ``n_queries`` = number of queries used.

    Parameters
    ----------
    embeddings : [n, dim]; labels : integer [n]; attributes : dict name -> array [n].
    normalize : cosine similarity (default) or raw dot product.

    Returns
    -------
    dict name -> dict with ``agreement``, ``chance``, ``lift``, ``n_queries``.
    """
    if not isinstance(attributes, Mapping) or len(attributes) == 0:
        raise ValueError("attributes must be a non-empty dict: attribute name -> array of values")
    x = as_embeddings("embeddings", embeddings)
    n = x.shape[0]
    y = as_labels("labels", labels, n).cpu().numpy()
    codes = {name: _codes(name, v, n) for name, v in attributes.items()}
    nn = nearest_same_class(x, y, normalize=normalize)
    has = nn >= 0
    _, yinv, ycount = np.unique(y, return_inverse=True, return_counts=True)
    class_size = ycount[yinv.reshape(-1)]
    out: dict[str, dict[str, float]] = {}
    for name, a in codes.items():
        pair = yinv.reshape(-1).astype(np.int64) * (int(a.max()) + 1) + a
        _, pinv, pcount = np.unique(pair, return_inverse=True, return_counts=True)
        same_attr_others = pcount[pinv.reshape(-1)] - 1
        if has.any():
            agree = float(np.mean(a[nn[has]] == a[has]))
            chance = float(np.mean(same_attr_others[has] / (class_size[has] - 1)))
        else:
            agree = chance = float("nan")
        out[name] = {
            "agreement": agree,
            "chance": chance,
            "lift": agree - chance,
            "n_queries": int(has.sum()),
        }
    return out


def intraclass_spread(
    embeddings: Any,
    labels: Any,
    *,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Mean within-class distance relative to mean between-class distance.

    With Euclidean distances d_ij = ||x_i - x_j|| (on L2-normalised embeddings by default,
    d = sqrt(2 - 2 cos)):

    - ``within``  = mean of d_ij over all pairs i != j with y_i = y_j;
    - ``between`` = mean of d_ij over all pairs with y_i != y_j;
    - ``ratio``   = within / between (small: tight, well separated classes; SSR is meant to keep
      it from collapsing towards 0);
    - ``within_pairs``, ``between_pairs``: the numbers of unordered pairs averaged.

    Pair-weighted means (large classes weigh more). Computed in blocks of rows against all items
    (O(n^2 dim) time, the cost of one k-NN pass of :func:`dmlnb.metrics.evaluate`;
    O(chunk * n) memory, bounded by :data:`dmlnb.metrics.neighbors.KNN_BLOCK_BYTES`).
    Distances come from ||x||^2 + ||y||^2 - 2 x.y in float32 (float64 if the input is float64),
    clamped at 0: a distance near 0 has an absolute error of up to ~1e-3 in float32.
    Sums are accumulated in float64.
    """
    x = as_embeddings("embeddings", embeddings)
    y = as_labels("labels", labels, x.shape[0], device=x.device)
    n = x.shape[0]
    if normalize:
        x = l2_normalize(x)
    if chunk_size is None:
        chunk_size = auto_chunk_size(n, x.element_size())
    else:
        check_positive_int("chunk_size", chunk_size)
    sq = (x * x).sum(dim=1)
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.t())
        d = d2.clamp_(min=0).sqrt_()
        same = y[start:stop, None] == y[None, :]
        rows = torch.arange(stop - start, device=x.device)
        d[rows, rows + start] = 0.0  # the diagonal is a same-class "pair" of distance 0: drop it
        total = d.sum(dtype=torch.float64)
        within = (d * same).sum(dtype=torch.float64)
        sums += torch.stack([within, total - within])
    _, counts = torch.unique(y, return_counts=True)
    counts = counts.to(torch.float64)
    n_within = float((counts * (counts - 1)).sum()) / 2
    n_between = (n * (n - 1) / 2) - n_within
    within_sum, between_sum = (float(v) / 2 for v in sums.cpu())  # ordered pairs counted twice
    w = within_sum / n_within if n_within > 0 else float("nan")
    b = between_sum / n_between if n_between > 0 else float("nan")
    return {
        "within": w,
        "between": b,
        "ratio": w / b if b > 0 else float("nan"),
        "within_pairs": int(n_within),
        "between_pairs": int(n_between),
    }
