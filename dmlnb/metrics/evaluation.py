"""``evaluate``: every metric the paper reports, from one call, exact and in bounded memory.

Recall@K, R-Precision and MAP@R come from one chunked k-NN pass (:mod:`dmlnb.metrics.retrieval`);
NMI and F1 from one seeded KMeans (:mod:`dmlnb.metrics.clustering`). Definitions, tie-breaking and
the differences from pytorch-metric-learning are documented in those modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dmlnb._validate import check_choice, check_keys
from dmlnb.defaults import KMEANS_SEED, NMI_AVERAGE, RECALL_KS
from dmlnb.metrics.clustering import cluster_scores
from dmlnb.metrics.retrieval import check_ks, retrieval_scores

AVERAGES = ("micro", "class")


def class_means(
    per_query: dict[str, np.ndarray], labels: Any
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Average per-query scores within each class.

    Parameters
    ----------
    per_query : dict of equal-length float arrays (NaN = not defined for that query, e.g. a lone
        query's MAP@R), as returned by :func:`dmlnb.metrics.retrieval_scores`.
    labels : the queries' integer labels.

    Returns
    -------
    classes : sorted unique labels.
    means : dict of arrays aligned with ``classes``: the mean over the class's queries with a
        defined score (NaN if none), plus ``n_queries`` (queries per class).
    """
    y = np.asarray(labels).reshape(-1)
    classes, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    out: dict[str, np.ndarray] = {"n_queries": counts.astype(np.int64)}
    for key, v in per_query.items():
        v = np.asarray(v, dtype=np.float64)
        if v.shape != y.shape:
            raise ValueError(f"per_query[{key!r}] has shape {v.shape}, labels {y.shape}")
        ok = ~np.isnan(v)
        s = np.bincount(inv, weights=np.where(ok, v, 0.0), minlength=len(classes))
        c = np.bincount(inv, weights=ok.astype(np.float64), minlength=len(classes))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[key] = s / c
    return classes, out


def per_class_scores(
    embeddings: Any,
    labels: Any,
    *,
    reference: Any | None = None,
    reference_labels: Any | None = None,
    ks: Sequence[int] = RECALL_KS,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Recall@K, R-Precision and MAP@R per class (the class's queries averaged).

    Returns a dict of arrays aligned with ``label`` (sorted unique query labels): ``label``,
    ``n_queries``, ``recall@K`` for each K, ``r_precision`` and ``map@r`` (NaN for a class whose
    queries are all lone).
    """
    scores = retrieval_scores(
        embeddings, labels, reference=reference, reference_labels=reference_labels, ks=ks,
        normalize=normalize, chunk_size=chunk_size,
    )
    scores.pop("r")
    y = np.asarray(_labels_numpy(labels))
    classes, means = class_means(scores, y)
    return {"label": classes, **means}


def _labels_numpy(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):
        return labels.detach().cpu().numpy().reshape(-1)
    return np.asarray(labels).reshape(-1)


def evaluate(
    embeddings: Any,
    labels: Any,
    *,
    reference: Any | None = None,
    reference_labels: Any | None = None,
    ks: Sequence[int] = RECALL_KS,
    include: Iterable[str] | None = None,
    normalize: bool = True,
    kmeans_seed: int = KMEANS_SEED,
    kmeans_backend: str = "auto",
    nmi_average: str = NMI_AVERAGE,
    average: str = "micro",
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K, R-Precision, MAP@R, NMI and F1 of embeddings, as in DML papers.

    Parameters
    ----------
    embeddings : tensor or array [n, dim]
        Query embeddings. On CUDA, the k-NN search runs on CUDA (KMeans runs on the CPU).
    labels : integer tensor or array [n]
    reference, reference_labels : optional gallery (query/gallery form, e.g. In-Shop). Without
        them each query is searched among all other items (leave-one-out, query excluded by
        index). The gallery is not searched for the query itself: pass ``reference=None`` for
        leave-one-out.
    ks : K values of Recall@K, default ``RECALL_KS`` = (1, 2, 4, 8) (SOP uses
        ``SOP_RECALL_KS`` = (1, 10, 100, 1000)). A K above the number of reference items uses
        them all.
    include : names to compute, among ``recall@K`` (K in ``ks``), ``recall`` (all K),
        ``r_precision``, ``map@r``, ``nmi``, ``f1``; default all. KMeans runs only when ``nmi``
        or ``f1`` is asked for; the k-NN only when a retrieval metric is.
    normalize : L2-normalise embeddings (cosine similarity; KMeans on the normalised vectors).
    kmeans_seed : KMeans seed, default ``KMEANS_SEED`` = 0.
    kmeans_backend : "auto" (faiss if installed, else scikit-learn), "sklearn" or "faiss"; both
        start from the same seeded k-means++ centroids, so NMI and F1 do not depend on it beyond
        seed noise (:mod:`dmlnb.metrics.clustering`).
    nmi_average : "arithmetic" (default, ``NMI_AVERAGE``), "geometric" (older papers), "min", "max".
    average : "micro" (mean over queries, default) or "class" (mean over classes of the mean over
        each class's queries, "average of averages"). NMI and F1 are not affected.
    chunk_size : queries per k-NN block (default from a memory budget, see
        :data:`dmlnb.metrics.neighbors.KNN_BLOCK_BYTES`).

    Returns
    -------
    dict
        ``recall@K`` for each K, ``r_precision``, ``map@r``, ``nmi``, ``f1`` (those selected by
        ``include``), and, whenever a retrieval metric is computed, ``lone_queries`` (an int:
        queries with no other item of their label in the reference set; excluded from
        R-Precision and MAP@R, counted as misses in Recall@K).
        R-Precision and MAP@R are NaN when every query is lone. In query/gallery form NMI and F1
        cluster the queries (k = number of query classes). With a single (query) class NMI and F1
        are NaN, with a :class:`~dmlnb.metrics.clustering.SingleClassWarning`: they are undefined
        there (any embedding would score a perfect 1.0), while the retrieval metrics stay defined
        and are returned as usual (why NaN and not an error:
        :func:`~dmlnb.metrics.clustering.cluster_scores`).

    References
    ----------
    Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020 (R-Precision, MAP@R).
    Roth et al., "Revisiting Training Strategies and Generalization Performance in Deep Metric
    Learning", ICML 2020 (Recall@K, NMI, F1 protocol).
    """
    ks = check_ks(ks)
    check_choice("average", average, AVERAGES)
    recall_keys = [f"recall@{k}" for k in ks]
    valid = [*recall_keys, "recall", "r_precision", "map@r", "nmi", "f1"]
    if include is None:
        wanted = set(valid)
    else:
        if isinstance(include, str):
            include = [include]
        include = list(include)
        check_keys(include, valid, "metrics in include")
        if not include:
            raise ValueError(f"include is empty; choose among: {', '.join(valid)}")
        wanted = set(include)
    if "recall" in wanted:
        wanted.update(recall_keys)
    want_ks = tuple(k for k in ks if f"recall@{k}" in wanted)
    want_ranking = bool(wanted & {"r_precision", "map@r"})
    out: dict[str, float] = {}
    if want_ks or want_ranking:
        scores = retrieval_scores(
            embeddings, labels, reference=reference, reference_labels=reference_labels,
            ks=want_ks or (1,), normalize=normalize, chunk_size=chunk_size, ranking=want_ranking,
        )
        lone = scores.pop("r") == 0
        if average == "class":
            _, means = class_means(scores, _labels_numpy(labels))
            scores = {key: v for key, v in means.items() if key != "n_queries"}
        for k in want_ks:
            out[f"recall@{k}"] = float(np.mean(scores[f"recall@{k}"]))
        for key in ("r_precision", "map@r"):
            if key in wanted:
                v = scores[key]
                out[key] = float(np.mean(v[~np.isnan(v)])) if (~np.isnan(v)).any() else float("nan")
        out["lone_queries"] = int(lone.sum())
    if wanted & {"nmi", "f1"}:
        cs = cluster_scores(
            embeddings, labels, normalize=normalize, kmeans_seed=kmeans_seed,
            kmeans_backend=kmeans_backend, nmi_average=nmi_average,
        )
        for key in ("nmi", "f1"):
            if key in wanted:
                out[key] = cs[key]
    return out
