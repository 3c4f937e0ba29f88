"""Datasets behind one interface, :func:`load_dataset`; see :mod:`dmlnb.data.registry`.

Importing the package registers the built-in data sets: each loader module below calls
:func:`register` when it is imported.
"""

from dmlnb.data import benchmarks, glyphs, icons, small  # noqa: F401  (they register their loaders)
from dmlnb.data.registry import SPLITS, dataset_info, dataset_names, load_dataset, register

__all__ = ["SPLITS", "dataset_info", "dataset_names", "load_dataset", "register"]
