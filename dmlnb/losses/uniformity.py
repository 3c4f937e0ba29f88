"""The uniformity term (Wang & Isola, ICML 2020), offered as an extension against the collapse of
the SSR head: not part of the paper's objective (its weight ``ssr_uniformity`` is 0 by default).

.. math::

    L_\\text{unif} = \\log \\frac{2}{B(B-1)} \\sum_{i<j} \\exp\\bigl(-t \\lVert u_i - u_j \\rVert^2\\bigr),
    \\qquad u_i = z'_i / \\lVert z'_i \\rVert,

over the SSR embeddings ``z'`` of B different images, with ``t = 2`` (Wang & Isola). It is lowest
when the embeddings spread over the sphere and 0 when they all coincide (``||u_i - u_j||^2 = 2 - 2
cos``), so it pushes apart what the ranking loss alone maps to one point.

Reference: T. Wang and P. Isola, "Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere", ICML 2020.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dmlnb._validate import check_range
from dmlnb.defaults import SSR_UNIFORMITY_T
from dmlnb.losses._common import compute_dtype, full_precision


def uniformity(embeddings: torch.Tensor, t: float = SSR_UNIFORMITY_T) -> torch.Tensor:
    """``L_unif`` of ``embeddings [B, d]`` (B >= 2; L2-normalised first), a scalar <= 0."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ValueError("embeddings must be a [B, d] torch.Tensor")
    b = embeddings.shape[0]
    if b < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {b}")
    check_range("t", t, 0.0, None, low_inclusive=False)
    with full_precision(embeddings.device):
        u = F.normalize(embeddings.to(compute_dtype(embeddings.dtype)), dim=-1, eps=1e-12)
        sq = (2 - 2 * (u @ u.T)).clamp_min(0)  # ||u_i - u_j||^2
        i, j = torch.triu_indices(b, b, offset=1, device=u.device)
        return torch.logsumexp(-t * sq[i, j], dim=0) - math.log(i.numel())
