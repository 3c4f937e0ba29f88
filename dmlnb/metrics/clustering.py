"""Clustering metrics of DML papers: KMeans on the embeddings, then NMI and pair-counting F1.

Definitions
-----------
- KMeans with k = number of classes among the evaluated items, seeded (the seed is part of the
  result). Backends: ``"sklearn"`` (scikit-learn ``KMeans``: k-means++ init, one init, Lloyd to
  convergence), ``"faiss"`` (``faiss.Kmeans``, 20 Lloyd iterations, the setting of
  pytorch-metric-learning and Roth et al., **started from the same seeded k-means++ centroids**),
  ``"auto"`` = faiss when it is installed, else scikit-learn. Same seed and backend (and thread
  count for faiss) give the same assignment.
- The metric must not depend on which optional package is installed. faiss's own initialisation
  (k points drawn at random) falls into bad local optima: on 8 well-separated clusters it split
  one class and merged two for 2 of 3 seeds (NMI 0.937, F1 0.853, where k-means++ gives 1.0), and
  on SOP-like data (2,000 classes of 2-12 points) its F1 was 0.10 lower. Both backends therefore
  start from :func:`kmeans_plusplus_init` (scikit-learn's greedy k-means++, seeded); they then
  differ only in the Lloyd iterations (faiss stops after 20) and in how empty clusters are
  re-seeded. Measured on the SOP-like data of ``tests/faults/test_metrics_faults.py`` (1,000 and
  2,000 classes of 2-12 points, 64-d): the same NMI and F1 to every printed digit for each seed
  tried, where the spread over seeds is 0.001 (NMI) and 0.005 (F1). The seeding makes k
  sequential passes over the data and dominates the faiss backend's time on the CPU: on those
  data faiss is no faster than scikit-learn.
- NMI = sklearn ``normalized_mutual_info_score(labels, clusters, average_method=...)``,
  arithmetic averaging by default (scikit-learn's current default, passed explicitly);
  ``"geometric"`` reproduces older papers.
- F1 (pair counting): with n_ij the class x cluster contingency table, a_i its row sums (class
  sizes) and b_j its column sums (cluster sizes), TP = sum_ij C(n_ij, 2),
  precision = TP / sum_j C(b_j, 2), recall = TP / sum_i C(a_i, 2), F1 = 2PR / (P + R)
  (edge cases with no pairs: :func:`pair_f1`). Computed from the sparse contingency matrix, no
  loop over points.
- A single class: NMI and F1 are undefined (there is no class structure to recover; both would
  be a trivial 1.0 for any embedding). :func:`cluster_scores` returns NaN for them with a
  :class:`SingleClassWarning` (see there why NaN and not an error).
"""

from __future__ import annotations

import importlib.util
import warnings
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


class SingleClassWarning(RuntimeWarning):
    """NMI and F1 were asked for on items of a single class; they are returned as NaN."""


def faiss_available() -> bool:
    """True when the optional ``faiss`` package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def kmeans_plusplus_init(x: np.ndarray, n_clusters: int, *, seed: int = KMEANS_SEED) -> np.ndarray:
    """Seeded k-means++ initial centroids ``[n_clusters, dim]`` (float32, C-contiguous) of ``x``.

    scikit-learn's greedy k-means++ (``sklearn.cluster.kmeans_plusplus``, 2 + log k candidates
    per step, vectorised over the points): the initialisation scikit-learn's ``KMeans`` uses, so
    that the faiss backend starts where the scikit-learn one does (module docstring).
    """
    from sklearn.cluster import kmeans_plusplus

    centers, _ = kmeans_plusplus(np.asarray(x, dtype=np.float32), n_clusters,
                                 random_state=np.random.RandomState(int(seed)))
    return np.ascontiguousarray(centers, dtype=np.float32)


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
    backend : "auto" (faiss if installed, else sklearn), "sklearn" or "faiss"; both start from
        :func:`kmeans_plusplus_init` (module docstring).
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

        x = np.ascontiguousarray(x)
        km = faiss.Kmeans(
            x.shape[1], n_clusters, niter=FAISS_KMEANS_NITER, seed=int(seed), verbose=False,
            min_points_per_centroid=1, max_points_per_centroid=max(256, x.shape[0]),
        )
        km.train(x, init_centroids=kmeans_plusplus_init(x, n_clusters, seed=seed))
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

    With a single class ``nmi`` and ``f1`` are NaN and a :class:`SingleClassWarning` is issued.
    DECISION: NaN rather than an error, because the call is legitimate and the caller may want
    the other metrics of the same set (``evaluate`` still returns Recall@K, R-Precision and MAP@R,
    which are defined for one class); NaN cannot be mistaken for a score, propagates through means
    and is the package's marker for "not defined" already (R-Precision of lone queries). Returning
    1.0, the value of the formulas, would report a perfect clustering that says nothing.
    """
    check_choice("nmi_average", nmi_average, NMI_AVERAGES)
    x = as_embeddings("embeddings", embeddings)
    y = as_labels("labels", labels, x.shape[0]).cpu().numpy()
    if normalize:
        x = l2_normalize(x)
    n_classes = int(len(np.unique(y)))
    if n_classes < 2:
        warnings.warn(
            f"NMI and F1 are undefined for a single class (all {len(y)} items have label "
            f"{y[0]}): returned as NaN; evaluate on items of at least two classes",
            SingleClassWarning, stacklevel=2,
        )
        return {"nmi": float("nan"), "f1": float("nan"), "clusters": np.zeros(len(y), np.int64)}
    k = n_classes if n_clusters is None else n_clusters
    clusters = kmeans(x, k, seed=kmeans_seed, backend=kmeans_backend)
    nmi = float(normalized_mutual_info_score(y, clusters, average_method=nmi_average))
    return {"nmi": nmi, "f1": pair_f1(y, clusters), "clusters": clusters}
