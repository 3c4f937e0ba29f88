"""Input checks and conversions shared by the metric functions.

Every public metric accepts torch tensors or numpy arrays. Embeddings become a floating-point
torch tensor (kept on its device); labels become an int64 tensor on the same device. Problems
raise a ValueError (or TypeError) that names the parameter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_embeddings(name: str, x: Any, *, device: torch.device | None = None) -> torch.Tensor:
    """Return ``x`` as a 2-D, finite, floating-point tensor (float32 unless it is float64)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_items, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); at least one item is needed")
    if t.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    if device is not None:
        t = t.to(device)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf values (in {bad} rows)")
    return t


def as_labels(name: str, y: Any, n: int, *, device: torch.device | None = None) -> torch.Tensor:
    """Return ``y`` as a 1-D int64 tensor of length ``n``; refuse non-integer labels."""
    if isinstance(y, torch.Tensor):
        t = y.detach()
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be integer class labels, got dtype {t.dtype}")
    else:
        arr = np.asarray(y)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"{name} must be integer class labels, got dtype {arr.dtype} "
                "(map other labels to integers first, e.g. with "
                "np.unique(..., return_inverse=True))"
            )
        t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.reshape(-1) if t.ndim == 2 and 1 in t.shape else t
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but the embeddings have {n} rows")
    t = t.to(torch.int64)
    if device is not None:
        t = t.to(device)
    return t


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm; an all-zero row stays zero (similarity 0 to everything)."""
    return torch.nn.functional.normalize(x, p=2.0, dim=1)
