"""Datasets behind one interface, :func:`load_dataset`; see :mod:`dmlnb.data.registry`."""

from dmlnb.data.registry import SPLITS, dataset_info, dataset_names, load_dataset, register

__all__ = ["SPLITS", "dataset_info", "dataset_names", "load_dataset", "register"]
