"""Shared pieces of the DML losses: input checks, distances, masks, numerics and generators.

All losses compute in at least float32 with autocast switched off (``float16``/``bfloat16``
inputs are up-cast, ``float64`` stays ``float64``), so that mixed-precision training stays finite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

#: DECISION (dmlnb): seed of the private generator a stochastic loss creates when it is given none,
#: so that ``build_loss("margin")`` is reproducible without any global random state.
DEFAULT_LOSS_SEED = 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss computes in: float64 stays, anything narrower becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off on ``device`` (losses are computed in float32/float64)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def check_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``embeddings [B, d]`` and integer ``labels [B]``; return them up-cast."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape [B, d], got {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must have shape [B] = [{embeddings.shape[0]}], got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    x = embeddings.to(compute_dtype(embeddings.dtype))
    return x, labels.to(device=x.device, dtype=torch.long)


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[B, B]`` masks of positive pairs (same label, i != j) and negative pairs."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``D_ij = ||x_i - x_j||_2`` of the rows of ``x`` (``[B, B]``).

    Computed from the Gram matrix, ``D_ij^2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j`` (memory O(B^2), not
    O(B^2 d)). Squared distances below the rounding error of that expansion
    (``8 eps (|x_i|^2 + |x_j|^2)``) count as exactly 0, so duplicates have distance 0 and a zero
    (sub)gradient instead of the infinite derivative of ``sqrt`` at 0.
    """
    sq = (x * x).sum(dim=1)
    scale = sq[:, None] + sq[None, :]
    d2 = (scale - 2.0 * (x @ x.T)).clamp_min(0.0)
    tol = 8.0 * torch.finfo(x.dtype).eps * scale
    positive = d2 > tol
    return torch.where(
        positive, d2.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), torch.zeros_like(d2)
    )


def row_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``||u_k - v_k||_2`` of matching rows, with a zero (sub)gradient at 0."""
    d2 = ((u - v) ** 2).sum(dim=-1)
    positive = d2 > 0
    return torch.where(
        positive, d2.clamp_min(torch.finfo(d2.dtype).tiny).sqrt(), torch.zeros_like(d2)
    )


def cosine_matrix(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities ``S_ij = <x_i, y_j> / (|x_i| |y_j|)`` (rows L2-normalised first)."""
    xn = F.normalize(x, dim=-1, eps=1e-12)
    yn = xn if y is None else F.normalize(y, dim=-1, eps=1e-12)
    return xn @ yn.T


def log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log(1 + sum_{j: mask_j} exp(x_j))`` along ``dim``, stably (0 where the mask is empty)."""
    x = x.masked_fill(~mask, float("-inf"))
    shape = list(x.shape)
    shape[dim] = 1
    zeros = x.new_zeros(shape)
    return torch.logsumexp(torch.cat([x, zeros], dim=dim), dim=dim)


def zero_with_grad(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to every given tensor: ``backward()`` works and gives zero gradients."""
    out = tensors[0].sum() * 0.0
    for t in tensors[1:]:
        out = out + t.sum().to(out.dtype) * 0.0
    return out


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """Return ``generator`` itself, or a private CPU generator seeded with an int (default 0)."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = DEFAULT_LOSS_SEED
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(
            "generator must be a torch.Generator, an int seed or None, "
            f"got {type(generator).__name__}"
        )
    g = torch.Generator()
    g.manual_seed(generator)
    return g


class StatsMixin:
    """Keeps the parts of the last forward as detached tensors; ``last_stats`` gives them as floats.

    Reading ``last_stats`` is the only moment a device synchronisation happens.
    """

    _last: dict[str, torch.Tensor]

    def _record(self, **parts: torch.Tensor | float) -> None:
        self._last = {
            k: (v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
            for k, v in parts.items()
        }

    def param_groups(self, base_lr: float) -> list[dict]:
        """Optimiser groups of the loss's own parameters; none by default (margin and Proxy-Anchor
        override it)."""
        return []

    @property
    def last_stats(self) -> dict[str, float]:
        """Parts of the last forward pass (e.g. positive and negative terms), as Python floats."""
        return {k: float(v) for k, v in getattr(self, "_last", {}).items()}
