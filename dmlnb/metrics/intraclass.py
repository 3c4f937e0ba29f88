"""Measurements of intra-class structure: what self-supervised ranking (SSR) is meant to keep.

Ordinary DML treats all same-class neighbours alike and can collapse the structure inside a class;
SSR (Fu et al., AAAI 2021) trains the network to rank views of increasing strength. These pure
functions measure the effect directly:

- :func:`view_ranking_consistency`: does similarity to the original fall as view strength rises?
- :func:`attribute_retrieval` (with :func:`nearest_same_class`): within a class, is the nearest
  same-class neighbour one with the same attribute (e.g. typeface family, weight, italic)?
- :func:`intraclass_spread`: mean within-class distance relative to mean between-class distance.
- :func:`density_ratio`: mean within-class distance relative to the mean distance between class
  means (a pair-weighted, Euclidean relative of pi_ratio of Roth et al. 2020).
- :func:`spectral_decay`: rho of Roth et al. 2020, how far the embeddings' singular-value spectrum
  is from flat (low: many directions used).
- :func:`original_retrieval`: per view strength, how often a view's nearest gallery item is its
  own original.

References
----------
Roth, Milbich, Sinha, Gupta, Ommer, Cohen, "Revisiting Training Strategies and Generalization
Performance in Deep Metric Learning", ICML 2020 (code:
github.com/Confusezius/Revisiting_Deep_Metric_Learning_PyTorch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dmlnb._validate import check_positive_int
from dmlnb.metrics._inputs import as_embeddings, as_labels, l2_normalize
from dmlnb.metrics.neighbors import auto_chunk_size, iter_knn, knn


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


def spectral_decay(embeddings: Any, *, skip: int = 1, normalize: bool = True) -> float:
    r"""Spectral decay rho (Roth et al., ICML 2020): KL divergence of the normalised singular-value
    spectrum from the uniform distribution.

    With s_1 >= s_2 >= ... >= s_m the singular values of the embedding matrix X [n, d]
    (L2-normalised rows by default, *not* centred; m = min(n, d)), the ``skip`` largest left out
    and the rest normalised to sum 1,

        p_i = s_i / sum_{j > skip} s_j  (i = skip+1 .. m),   u_i = 1 / (m - skip),

        rho = KL(u || p) = sum_i u_i log(u_i / p_i) = -log(m - skip) - mean_i log p_i   (nats).

    rho = 0 for a flat spectrum (all directions used alike) and grows as the spectrum decays
    (the embedding concentrates in few directions). This follows the authors' code,
    ``metrics/rho_spectrum.py`` of Revisiting_Deep_Metric_Learning_PyTorch: metric
    ``rho_spectrum@k`` drops the k-1 largest singular values (``s[k-1:]``) and for k > 0 computes
    ``scipy.stats.entropy(uniform, s_norm)``, i.e. KL(U || S) in this direction (k = -1 is the
    reverse KL(S || U)). The rho(Phi) of the paper's figures (``Result_Evaluations.py``, "Rho3")
    is ``rho_spectrum@2``: the first singular value skipped, hence the default ``skip=1``. Their
    features are the L2-normalised embeddings (``*_normalize`` architectures), whose singular
    values come from ``torch.svd`` of the uncentred matrix, as here.

    One difference: a singular value at or below the numerical-rank tolerance
    ``s_1 * max(n, d) * eps`` (``numpy.linalg.matrix_rank``'s default, eps of the input's float
    type) is taken to be exactly 0, so a rank-deficient embedding (rank <= m - 1 after the skip)
    gets rho = inf, as KL(u || p) is infinite where p has zeros. (The authors' code would divide
    rounding noise by rounding noise there, a finite but meaningless value.)

    Parameters
    ----------
    embeddings : [n, dim]; skip : largest singular values left out (default 1, the paper's);
    normalize : L2-normalise the rows first (default True).
    """
    if not isinstance(skip, (int, np.integer)) or isinstance(skip, bool) or skip < 0:
        raise ValueError(f"skip must be a non-negative int, got {skip!r}")
    x = as_embeddings("embeddings", embeddings)
    if normalize:
        x = l2_normalize(x)
    eps = float(torch.finfo(x.dtype).eps)
    n, d = x.shape
    s = torch.linalg.svdvals(x.to(torch.float64)).cpu().numpy()  # descending, min(n, d) values
    if s.shape[0] - skip < 2:
        raise ValueError(f"spectral_decay needs at least {skip + 2} singular values "
                         f"(min(n, dim) = {s.shape[0]}, skip = {skip})")
    tol = s[0] * max(n, d) * eps
    rest = s[skip:]
    if s[0] <= 0 or np.any(rest <= tol):
        return float("inf")
    p = rest / rest.sum()
    return float(-np.log(rest.shape[0]) - np.mean(np.log(p)))


def density_ratio(embeddings: Any, labels: Any, *, chunk_size: int | None = None) -> float:
    r"""Mean within-class distance over the mean distance between class means.

    On L2-normalised embeddings x_i (d_ij = ||x_i - x_j|| = sqrt(2 - 2 cos)), with class means
    mu_c = (1 / n_c) sum_{i in c} x_i (means of the normalised embeddings, not re-normalised):

        within  = mean of d_ij over all unordered pairs i != j with y_i = y_j
                  (pair-weighted: a class of n_c items gives n_c (n_c - 1) / 2 pairs; a class
                  with one member gives none),
        between = mean of ||mu_c - mu_c'|| over all unordered pairs of distinct classes c != c',
        ratio   = within / between.

    Small: tight classes far apart (dense classes); SSR is meant to keep it from collapsing.
    NaN when there is no within-class pair, fewer than two classes, or between = 0. ``within`` is
    :func:`intraclass_spread`'s (same float32 precision notes); ``between`` is computed in
    float64.

    Relation to pi_ratio of Roth et al. (ICML 2020; ``metrics/dists.py``,
    ``dists@intra_over_inter``): theirs uses the cosine distance 1 - cos, averages the
    within-class distances per class and then over classes (class-weighted; a singleton class
    gets the largest class value), and measures the cosine distance between *re-normalised*
    class means. Same idea (intra-class spread over inter-class separation); the numbers differ.
    Unlike :func:`intraclass_spread`'s ``ratio``, the denominator compares class means, not all
    between-class item pairs.
    """
    x = as_embeddings("embeddings", embeddings)
    y = as_labels("labels", labels, x.shape[0], device=x.device)
    within = intraclass_spread(x, y, normalize=True, chunk_size=chunk_size)["within"]
    xn = l2_normalize(x).to(torch.float64)
    classes, inv = torch.unique(y, return_inverse=True)
    k = classes.shape[0]
    if k < 2 or not np.isfinite(within):
        return float("nan")
    sums = torch.zeros(k, xn.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, inv, xn)
    counts = torch.bincount(inv, minlength=k).to(torch.float64)
    mu = sums / counts[:, None]
    block = chunk_size or auto_chunk_size(k, 8)
    sq = (mu * mu).sum(dim=1)
    total = 0.0
    for start in range(0, k, block):
        stop = min(k, start + block)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (mu[start:stop] @ mu.t())
        d = d2.clamp_(min=0).sqrt_()
        rows = torch.arange(stop - start, device=x.device)
        d[rows, rows + start] = 0.0
        total += float(d.sum())
    between = total / (k * (k - 1))  # ordered pairs: each unordered pair twice
    return within / between if between > 0 else float("nan")


def original_retrieval(
    views: Any,
    gallery: Any,
    own: Any,
    *,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> np.ndarray:
    r"""Per view strength, the fraction of views whose nearest gallery item is their own original.

    For image b with views v_{b,1..N} (weakest first) and its original at gallery index o_b,

        hit[n] = (1 / B) sum_b 1[ argmax_j cos(z(v_{b,n}), g_j) = o_b ],

    the nearest item by cosine similarity (raw dot product with ``normalize=False``) among *all*
    gallery items (the original included: recall@1 of the original); on equal similarity the
    lower gallery index wins, as everywhere in :mod:`dmlnb.metrics` (:func:`knn`, which runs the
    search).

    Parameters
    ----------
    views : [B, N, dim] embeddings of the N views of B images.
    gallery : [n, dim] embeddings searched (e.g. a whole test split, in dataset order).
    own : int [B], gallery index of each image's original.

    Returns
    -------
    float array [N]: hit[n-1] for n = 1..N.
    """
    v = views.detach() if isinstance(views, torch.Tensor) else torch.as_tensor(np.asarray(views))
    if v.ndim != 3 or 0 in v.shape:
        raise ValueError(f"views must be 3-D [B, N, dim] and non-empty, got {tuple(v.shape)}")
    b, levels, dim = v.shape
    g = as_embeddings("gallery", gallery)
    if g.shape[1] != dim:
        raise ValueError(f"views have dim {dim}, gallery {g.shape[1]}")
    o = as_labels("own", own, b).cpu().numpy()
    if o.min() < 0 or o.max() >= g.shape[0]:
        raise ValueError(f"own must index the gallery's {g.shape[0]} items")
    q = as_embeddings("views", v.reshape(b * levels, dim), device=g.device)
    _, idx = knn(q, g, 1, exclude_self=False, normalize=normalize, chunk_size=chunk_size)
    hit = idx[:, 0].cpu().numpy().reshape(b, levels) == o[:, None]
    return hit.mean(axis=0)
