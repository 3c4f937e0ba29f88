"""In-memory image datasets (the embedded and small sets): one class, :class:`TensorImageDataset`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dmlnb._validate import check_keys, check_positive_int


class TensorImageDataset(Dataset):
    """Images held in memory as uint8, served as float ``[C, H, W]`` in ``[0, 1]`` (un-normalised).

    Parameters
    ----------
    images : uint8 array ``[N, H, W]`` (grayscale) or ``[N, C, H, W]``
    labels : int array ``[N]``, contiguous ``0 .. len(classes) - 1``
    classes : class names, ``classes[label]``
    metadata : optional ``pandas.DataFrame`` with one row per image (index reset)
    transform : optional callable applied to each float image tensor
    name : the dataset's registry name (for messages and run records)
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray,
        classes: Sequence[str],
        *,
        metadata: Any = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        name: str = "tensor",
    ) -> None:
        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W] or [N, C, H, W], got shape {tuple(images.shape)}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels has shape {labels.shape}, expected ({images.shape[0]},)")
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError("labels must lie in 0 .. len(classes) - 1")
        self.images = images.contiguous()
        self.labels = labels
        self.classes = list(classes)
        self.metadata = metadata
        self.transform = transform
        self.name = name

    @property
    def channels(self) -> int:
        """1 for grayscale, 3 for RGB."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Height (= width) of the stored images in pixels."""
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather many items at once without a DataLoader (fast path for in-memory data)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        images = self.images[idx].float().div_(255.0)
        if self.transform is not None:
            images = torch.stack([self.transform(im) for im in images])
        return images, torch.as_tensor(self.labels[idx.numpy()])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, classes={len(self.classes)}, "
                f"channels={self.channels}, size={self.image_size})")


def resize_uint8(images: np.ndarray, size: int, chunk: int = 1024) -> np.ndarray:
    """Resize uint8 ``[N, H, W]`` or ``[N, C, H, W]`` images to ``size x size`` (bilinear,
    antialiased), deterministically, ``chunk`` images at a time (bounded memory)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    gray = images.ndim == 3
    out = np.empty(images.shape[:-2] + (size, size), np.uint8)
    for start in range(0, images.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).float()
        x = x[:, None] if gray else x
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        out[start:start + chunk] = (x[:, 0] if gray else x).numpy()
    return out


def class_subset(labels: np.ndarray, class_ids: np.ndarray, n_classes: int,
                 options: dict[str, Any], mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The items of a split: indices of the items whose label is in ``class_ids`` (and ``mask``),
    and their labels renumbered ``0..len(class_ids)-1`` in the order of ``class_ids``; at most
    ``options["max_per_class"]`` per class, chosen with ``options["subset_seed"]`` (default 0)."""
    keep_mask = np.isin(labels, class_ids) if mask is None else np.isin(labels, class_ids) & mask
    idx = np.flatnonzero(keep_mask)
    remap = np.full(n_classes, -1, dtype=np.int64)
    remap[class_ids] = np.arange(len(class_ids))
    split_labels = remap[labels[idx]]
    keep = select_per_class(split_labels, options.get("max_per_class"), int(options.get("subset_seed", 0)))
    return idx[keep], split_labels[keep]


def select_per_class(labels: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most ``max_per_class`` items of each class (seeded choice, sorted)."""
    if max_per_class is None:
        return np.arange(labels.size)
    check_positive_int("max_per_class", max_per_class)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def check_options(options: dict[str, Any], valid: Sequence[str], dataset: str) -> None:
    """Refuse unknown loader options, naming the dataset and the valid options."""
    check_keys(options, valid, f"options for dataset {dataset!r}")
