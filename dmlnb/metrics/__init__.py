"""Evaluation metrics of deep metric learning, exact and in bounded memory.

- :func:`evaluate`: Recall@K, R-Precision, MAP@R, NMI and F1 in one call (``dict[str, float]``).
- :func:`knn`: the chunked exact k-NN search behind it (reusable, e.g. for retrieval galleries).
- :func:`retrieval_scores`, :func:`per_class_scores`, :func:`class_means`: per-query and per-class
  results.
- :func:`kmeans`, :func:`pair_f1`, :func:`cluster_scores`: the clustering metrics.
- :func:`view_ranking_consistency`, :func:`attribute_retrieval`, :func:`nearest_same_class`,
  :func:`intraclass_spread`, :func:`density_ratio`, :func:`spectral_decay`,
  :func:`original_retrieval`: measurements of intra-class structure (what SSR is meant to keep).
"""

from __future__ import annotations

from dmlnb.metrics.clustering import cluster_scores, kmeans, pair_f1
from dmlnb.metrics.evaluation import class_means, evaluate, per_class_scores
from dmlnb.metrics.intraclass import (
    attribute_retrieval,
    density_ratio,
    intraclass_spread,
    nearest_same_class,
    original_retrieval,
    spectral_decay,
    view_ranking_consistency,
)
from dmlnb.metrics.neighbors import knn
from dmlnb.metrics.retrieval import retrieval_scores

__all__ = [
    "attribute_retrieval",
    "class_means",
    "cluster_scores",
    "density_ratio",
    "evaluate",
    "intraclass_spread",
    "kmeans",
    "knn",
    "nearest_same_class",
    "original_retrieval",
    "pair_f1",
    "per_class_scores",
    "retrieval_scores",
    "spectral_decay",
    "view_ranking_consistency",
]
