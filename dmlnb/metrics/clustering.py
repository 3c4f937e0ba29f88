"""Clustering metrics of DML papers: KMeans on the embeddings, then NMI and pair-counting F1.

Definitions (CONVENTIONS.md)
----------------------------
- KMeans with k = number of classes among the evaluated items, seeded (the seed is part of the
  result). Backends: ``"sklearn"`` (scikit-learn ``KMeans``, k-means++ init, one init, Lloyd),
  ``"faiss"`` (``faiss.Kmeans``, 20 iterations, the setting of pytorch-metric-learning and Roth et
  al.), ``"auto"`` = faiss when it is installed, else scikit-learn. Same seed and backend (and
  thread count for faiss) give the same assignment; different backends give different ones.
- NMI = sklearn ``normalized_mutual_info_score(labels, clusters, average_method=...)``,
  arithmetic averaging by default (scikit-learn's current default, passed explicitly);
  ``"geometric"`` reproduces older papers.
- F1 (pair counting): with n_ij the class x cluster contingency table, a_i its row sums (class
  sizes) and b_j its column sums (cluster sizes), TP = sum_ij C(n_ij, 2),
  precision = TP / sum_j C(b_j, 2), recall = TP / sum_i C(a_i, 2), F1 = 2PR / (P + R)
  (edge cases with no pairs: :func:`pair_f1`). Computed from the sparse contingency matrix, no
  loop over points.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from dmlnb._validate import check_choice, check_positive_int
from dmlnb.defaults import KMEANS_SEED, NMI_AVERAGE
from dmlnb.metrics._inputs import as_embeddings, as_labels, l2_normalize

KMEANS_BACKENDS = ("auto", "sklearn", "faiss")
NMI_AVERAGES = ("arithmetic", "geometric", "min", "max")
from dmlnb.defaults import FAISS_KMEANS_NITER  # noqa: E402  (PML's FaissKMeans / Roth et al.)


def faiss_available() -> bool:
    """True when the optional ``faiss`` package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def kmeans(
    embeddings: Any,
    n_clusters: int,
    *,
    seed: int = KMEANS_SEED,
    backend: str = "auto",
) -> np.ndarray:
    """Cluster assignment (int64 array) of each row of ``embeddings`` by KMeans.

    Parameters
    ----------
    embeddings : array or tensor [n, dim], used as given (normalise before if wanted).
    n_clusters : int, 1 <= n_clusters <= n.
    seed : int, the KMeans seed (default ``KMEANS_SEED``).
    backend : "auto" (faiss if installed, else sklearn), "sklearn" or "faiss".
    """
    check_choice("backend", backend, KMEANS_BACKENDS)
    check_positive_int("n_clusters", n_clusters)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} ({seed!r})")
    x = as_embeddings("embeddings", embeddings).cpu().numpy().astype(np.float32)
    if n_clusters > x.shape[0]:
        raise ValueError(f"n_clusters={n_clusters} is larger than the {x.shape[0]} items")
    if backend == "auto":
        backend = "faiss" if faiss_available() else "sklearn"
    if n_clusters == 1:
        return np.zeros(x.shape[0], dtype=np.int64)
    if backend == "faiss":
        if not faiss_available():
            raise ValueError(
                "backend='faiss' needs the optional faiss package: pip install faiss-cpu"
            )
        import faiss

        km = faiss.Kmeans(
            x.shape[1], n_clusters, niter=FAISS_KMEANS_NITER, seed=int(seed), verbose=False,
            min_points_per_centroid=1, max_points_per_centroid=max(256, x.shape[0]),
        )
        km.train(np.ascontiguousarray(x))
        _, assign = km.index.search(np.ascontiguousarray(x), 1)
        return assign[:, 0].astype(np.int64)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, n_init=1, random_state=int(seed))
    return km.fit_predict(x).astype(np.int64)


def pair_f1(labels: Any, clusters: Any) -> float:
    """Pair-counting F1 of a clustering against class labels, from the contingency matrix.

    TP = sum_ij C(n_ij, 2); precision = TP / same-cluster pairs; recall = TP / same-class pairs;
    F1 = 2PR / (P + R). If there are no same-cluster pairs (all singletons) precision is taken as
    1 when there are also no same-class pairs, else 0; symmetrically for recall. F1 is 0 when
    P + R = 0.
    """
    c = contingency_matrix(np.asarray(labels), np.asarray(clusters), sparse=True)
    nij = c.data.astype(np.float64)
    a = np.asarray(c.sum(axis=1), dtype=np.float64).ravel()
    b = np.asarray(c.sum(axis=0), dtype=np.float64).ravel()
    tp = float((nij * (nij - 1) / 2).sum())
    same_cluster = float((b * (b - 1) / 2).sum())
    same_class = float((a * (a - 1) / 2).sum())
    p = tp / same_cluster if same_cluster > 0 else float(same_class == 0)
    r = tp / same_class if same_class > 0 else float(same_cluster == 0)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def cluster_scores(
    embeddings: Any,
    labels: Any,
    *,
    normalize: bool = True,
    kmeans_seed: int = KMEANS_SEED,
    kmeans_backend: str = "auto",
    nmi_average: str = NMI_AVERAGE,
    n_clusters: int | None = None,
) -> dict[str, Any]:
    """KMeans (k = number of classes unless ``n_clusters`` is given), then ``nmi`` and ``f1``.

    Returns a dict with ``nmi``, ``f1`` (floats) and ``clusters`` (the assignment, int64 array).
    """
    check_choice("nmi_average", nmi_average, NMI_AVERAGES)
    x = as_embeddings("embeddings", embeddings)
    y = as_labels("labels", labels, x.shape[0]).cpu().numpy()
    if normalize:
        x = l2_normalize(x)
    k = int(len(np.unique(y))) if n_clusters is None else n_clusters
    clusters = kmeans(x, k, seed=kmeans_seed, backend=kmeans_backend)
    nmi = float(normalized_mutual_info_score(y, clusters, average_method=nmi_average))
    return {"nmi": nmi, "f1": pair_f1(y, clusters), "clusters": clusters}
