"""Contrastive loss (Hadsell, Chopra & LeCun 2006), in the non-squared form of DML benchmarks."""

from __future__ import annotations

import torch
from torch import nn

from dmlnb import defaults
from dmlnb._validate import check_range
from dmlnb.losses._common import (
    StatsMixin,
    check_embeddings,
    full_precision,
    label_masks,
    pairwise_distance,
)


def _mean_nonzero(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` over the entries of ``mask`` where they are > 0 (0 if there are none)."""
    keep = mask & (values > 0)
    count = keep.sum()
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total / count.clamp_min(1).to(values.dtype), count


class ContrastiveLoss(StatsMixin, nn.Module):
    r"""Contrastive loss (Hadsell et al., "Dimensionality Reduction by Learning an Invariant
    Mapping", CVPR 2006), with non-squared Euclidean distances ``D`` and two margins::

        l_ij = max(0, D_ij - m_pos)   for positive pairs (same label, i != j)
        l_ij = max(0, m_neg - D_ij)   for negative pairs
        L    = mean_{positive pairs, l > 0} l  +  mean_{negative pairs, l > 0} l

    Each part is averaged over its *non-zero* terms (0 when there are none), the reduction of
    pytorch-metric-learning's ``ContrastiveLoss`` (``AvgNonZeroReducer``), whose defaults dmlnb's
    follow (Musgrave et al. 2020 benchmark).

    Parameters
    ----------
    pos_margin : float, default 0 (Hadsell et al. 2006 / PML)
    neg_margin : float, default 1 (Hadsell et al. 2006 / PML; on L2-normalised embeddings)

    Notes
    -----
    * Differences from Hadsell et al.: they square the terms (``D^2 / 2`` and
      ``max(0, m - D)^2 / 2``) and sum over pairs; dmlnb uses the non-squared, non-zero-averaged
      form of the benchmarks.
    * Differences from PML: PML L2-normalises inside its distance; dmlnb uses the embeddings as
      given (they arrive normalised). Otherwise the two agree (tested).
    * Duplicates have distance exactly 0 (no NaN gradient); a batch without pairs returns 0 with a
      gradient path.

    After each forward, :attr:`last_stats` holds ``pos_loss``, ``neg_loss``, ``active_pos`` and
    ``active_neg`` (numbers of non-zero ordered pairs).
    """

    stochastic = False

    def __init__(
        self,
        pos_margin: float = defaults.CONTRASTIVE_POS_MARGIN,
        neg_margin: float = defaults.CONTRASTIVE_NEG_MARGIN,
    ) -> None:
        super().__init__()
        self.pos_margin = float(check_range("pos_margin", pos_margin, 0.0))
        self.neg_margin = float(check_range("neg_margin", neg_margin, 0.0, low_inclusive=False))

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Contrastive loss of a batch (``generator`` is accepted and unused)."""
        x, labels = check_embeddings(embeddings, labels)
        with full_precision(x.device):
            pos, neg = label_masks(labels)
            dist = pairwise_distance(x)
            pos_loss, n_pos = _mean_nonzero((dist - self.pos_margin).clamp_min(0), pos)
            neg_loss, n_neg = _mean_nonzero((self.neg_margin - dist).clamp_min(0), neg)
            loss = pos_loss + neg_loss
        self._record(pos_loss=pos_loss, neg_loss=neg_loss, active_pos=n_pos, active_neg=n_neg)
        return loss
