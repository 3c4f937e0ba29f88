"""The one dataset interface: ``load_dataset(name, split, root=None, **options)``.

Each data module registers a loader with :func:`register`. A loader is called as
``loader(split, root, **options)`` and returns a :class:`torch.utils.data.Dataset` whose items are
``(image, label)`` with ``image`` a float tensor ``[C, H, W]`` in ``[0, 1]`` (**not** normalised: the
model normalises, so that self-supervised views are made from the raw image, docs/method.md, reproduction defect 1), and
which exposes

- ``labels``: ``numpy.ndarray`` of int64, contiguous ``0 .. len(classes) - 1`` within the split,
- ``classes``: list of class names, ``classes[label]``,
- ``channels``: 1 (grayscale) or 3 (RGB),
- ``metadata`` (optional): a ``pandas.DataFrame`` with one row per item (glyphs: the typeface;
  icons: the theme and theme family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from dmlnb._validate import check_choice
from dmlnb.defaults import SPLITS


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows of a dataset: its loader, a line of description, and its splits."""

    name: str
    loader: Callable[..., Dataset]
    description: str
    needs_root: bool
    splits: tuple[str, ...] = SPLITS
    how_to_get: str = ""  #: how a user gets the data (shown when ``root`` is missing)


_REGISTRY: dict[str, DatasetInfo] = {}


def register(
    name: str,
    loader: Callable[..., Dataset],
    description: str,
    *,
    needs_root: bool = False,
    splits: tuple[str, ...] = SPLITS,
    how_to_get: str = "",
) -> None:
    """Register ``loader`` under ``name`` (done once, at import of the data module)."""
    _REGISTRY[name] = DatasetInfo(name, loader, description, needs_root, splits, how_to_get)


def dataset_names() -> list[str]:
    """The names :func:`load_dataset` accepts."""
    return sorted(_REGISTRY)


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; a ValueError lists the valid names."""
    check_choice("dataset", name, sorted(_REGISTRY))
    return _REGISTRY[name]


def load_dataset(name: str, split: str, root: str | None = None, **options: Any) -> Dataset:
    """Load split ``split`` of dataset ``name``.

    Parameters
    ----------
    name : str
        One of :func:`dataset_names` (``"glyphs"`` is embedded and needs no ``root``).
    split : {"train", "val", "trainval", "test"}
        Class-disjoint splits: ``train`` and ``val`` are carved from the training classes
        (``trainval`` is their union); ``test`` holds the test classes, used once per run.
    root : str, optional
        Where the dataset lies on disk (real benchmarks); ignored by embedded data.
    **options
        Loader-specific options; unknown ones are refused with the list of valid ones.
    """
    info = dataset_info(name)
    check_choice("split", split, info.splits)
    if info.needs_root and root is None:
        raise ValueError(
            f"dataset {name!r} needs root=, the folder that holds it"
            + (f": {info.how_to_get}" if info.how_to_get else "")
        )
    return info.loader(split, root, **options)
