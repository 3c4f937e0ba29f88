"""The self-supervised ranking loss of SSR (Fu et al., AAAI 2021)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dmlnb import defaults
from dmlnb._validate import check_choice, check_range
from dmlnb.defaults import RANK_PAIR_CHOICES
from dmlnb.losses._common import StatsMixin, compute_dtype, full_precision, log1p_sum_exp


class RankingParts(NamedTuple):
    """The ranking loss and its two parts, each a scalar (means over the B images)."""

    total: torch.Tensor  #: mean of L_sort + pos_weight * L_pos
    sort: torch.Tensor  #: mean of the list-wise part L_sort
    pos: torch.Tensor  #: mean of the point-wise part L_pos (not yet multiplied by pos_weight)


def view_similarities(anchor: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """``S_n = cos(z'_0, z'_n)``: cosine similarity of each anchor to its views, ``[B, N]``.

    Both are L2-normalised first (``eps = 1e-12``), so the result is a cosine even for input that
    is not exactly unit-norm.
    """
    a = F.normalize(anchor, dim=-1, eps=1e-12)
    v = F.normalize(views, dim=-1, eps=1e-12)
    return (v * a.unsqueeze(1)).sum(dim=-1)


class RankingLoss(StatsMixin, nn.Module):
    r"""The SSR ranking loss: views of increasing strength must be ever less similar to the
    original, and all of them similar enough.

    For image ``b`` with SSR embeddings ``z'_0`` (original) and ``z'_1..z'_N`` (views, weakest
    first), ``S_n = cos(z'_0, z'_n)``::

        L_sort = (1/s) log(1 + sum_{(n, m) in pairs} exp(s (S_m - S_n + alpha)))   list-wise
        L_pos  = (1/s) log(1 + sum_{n=1}^{N}        exp(-s (S_n - beta)))          point-wise
        L_rank = mean_b (L_sort + pos_weight * L_pos)

    ``pairs="adjacent"``: ``(n, n+1)`` for ``n = 1..N-1`` (the paper/reproduction form);
    ``pairs="all"``: every ``n < m``. ``log(1 + sum exp)`` is evaluated as a log-sum-exp with an
    extra 0, so it is stable for any ``s``.

    Parameters
    ----------
    scale : float, default 12 (s; REPRO, see docs/method.md "The ranking objective")
    alpha : float, default 0.05 (list-wise margin; REPRO)
    beta : float, default 0.5 (point-wise floor; REPRO)
    pos_weight : float, default 1 (lambda_r; REPRO)
    pairs : {"adjacent", "all"}, default "adjacent" (REPRO)

    Calling
    -------
    ``loss(anchor, views)`` with ``anchor [B, d]`` and ``views [B, N, d]`` returns ``L_rank``.
    ``loss.parts(anchor, views)`` returns :class:`RankingParts` ``(total, sort, pos)``;
    :attr:`last_stats` then holds ``rank``, ``rank_sort``, ``rank_pos`` and the mean similarity to
    each view, ``sim_1 .. sim_N``. With ``N = 1`` the list-wise part is 0. Computed in float32 (or
    float64) with autocast off. The loss has no parameters (:meth:`param_groups` returns ``[]``).

    References
    ----------
    Fu, Li, Mao, Wang, Zhang, "Deep Metric Learning with Self-Supervised Ranking", AAAI 2021. The
    paper names a "list-wise ranking" and a "point-wise" loss; these exact forms and values are the
    public reproduction's (docs/method.md).
    """

    def __init__(
        self,
        scale: float = defaults.RANK_SCALE,
        alpha: float = defaults.RANK_ALPHA,
        beta: float = defaults.RANK_BETA,
        pos_weight: float = defaults.RANK_POS_WEIGHT,
        pairs: str = defaults.RANK_PAIRS,
    ) -> None:
        super().__init__()
        self.scale = float(check_range("scale", scale, 0.0, low_inclusive=False))
        self.alpha = float(check_range("alpha", alpha, 0.0))
        self.beta = float(check_range("beta", beta, -1.0, 1.0))
        self.pos_weight = float(check_range("pos_weight", pos_weight, 0.0))
        self.pairs = check_choice("pairs", pairs, RANK_PAIR_CHOICES)

    def _pair_mask(self, n_views: int, device: torch.device) -> torch.Tensor:
        """``[N, N]`` boolean mask of the ordered pairs ``(n, m)``: weaker ``n``, stronger ``m``."""
        idx = torch.arange(n_views, device=device)
        if self.pairs == "adjacent":
            return idx[None, :] == idx[:, None] + 1
        return idx[None, :] > idx[:, None]

    def parts(self, anchor: torch.Tensor, views: torch.Tensor) -> RankingParts:
        """The loss and its list-wise and point-wise parts (see the class docstring)."""
        if not isinstance(anchor, torch.Tensor) or not isinstance(views, torch.Tensor):
            raise TypeError("anchor and views must be torch.Tensors")
        if anchor.dim() != 2:
            raise ValueError(f"anchor must have shape [B, d], got {tuple(anchor.shape)}")
        if (
            views.dim() != 3
            or views.shape[0] != anchor.shape[0]
            or views.shape[2] != anchor.shape[1]
        ):
            raise ValueError(
                f"views must have shape [B, N, d] = [{anchor.shape[0]}, N, {anchor.shape[1]}], "
                f"got {tuple(views.shape)}"
            )
        if views.shape[1] < 1:
            raise ValueError("views must hold at least one view (N >= 1)")
        if not anchor.is_floating_point() or not views.is_floating_point():
            raise TypeError("anchor and views must be floating point")
        dtype = compute_dtype(torch.promote_types(anchor.dtype, views.dtype))
        with full_precision(anchor.device):
            sim = view_similarities(anchor.to(dtype), views.to(dtype))  # [B, N]
            s = self.scale
            # diff[b, n, m] = S_m - S_n + alpha over the selected pairs n < m
            diff = sim.unsqueeze(1) - sim.unsqueeze(2) + self.alpha
            b, n = sim.shape
            mask = self._pair_mask(n, sim.device).expand(b, n, n).reshape(b, n * n)
            l_sort = log1p_sum_exp(s * diff.reshape(b, n * n), mask) / s
            l_pos = (
                log1p_sum_exp(-s * (sim - self.beta), torch.ones_like(sim, dtype=torch.bool)) / s
            )
            b = max(b, 1)
            sort = l_sort.sum() / b
            pos = l_pos.sum() / b
            total = sort + self.pos_weight * pos
        sims = sim.detach().sum(dim=0) / b
        self._record(
            rank=total,
            rank_sort=sort,
            rank_pos=pos,
            **{f"sim_{k + 1}": v for k, v in enumerate(sims)},
        )
        return RankingParts(total, sort, pos)

    def forward(self, anchor: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """``L_rank`` of a batch: ``anchor [B, d]``, ``views [B, N, d]`` (weakest first)."""
        return self.parts(anchor, views).total
