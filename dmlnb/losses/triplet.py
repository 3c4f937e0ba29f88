"""Triplet loss with semi-hard negative mining (Schroff et al. 2015)."""

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
    zero_with_grad,
)


class TripletLoss(StatsMixin, nn.Module):
    r"""Triplet loss over all semi-hard triplets of a batch (Schroff et al., "FaceNet", CVPR 2015).

    With non-squared Euclidean distances ``D``, a triplet ``(a, p, n)`` (``p`` same label as ``a``,
    ``p != a``; ``n`` another label) is *semi-hard* when ``D_ap < D_an < D_ap + margin``. Over the
    set ``T`` of all semi-hard triplets of the batch::

        L = (1 / |T|) * sum_{(a,p,n) in T} (D_ap - D_an + margin)

    (every term lies in ``(0, margin)``), and ``L = 0`` with a gradient path when ``T`` is empty.
    The triplets are enumerated as (positive pair) x (negative): memory O(P B), P = number of
    positive pairs, not O(B^3).

    Parameters
    ----------
    margin : float, default 0.2 (Schroff et al. 2015; docs/conventions.md)

    Notes
    -----
    * Embeddings are used as given (they arrive L2-normalised from the model; unnormalised input is
      fine, the margin then has the input's scale).
    * Mining choice: FaceNet does not say which semi-hard negative to take per pair; dmlnb takes
      them all and averages. This coincides with pytorch-metric-learning's
      ``TripletMarginMiner(margin, type_of_triplets="semihard")`` + ``TripletMarginLoss(margin)``
      (its miner keeps ``0 < D_an - D_ap <= margin``; the boundary triplet has loss 0 and its
      ``AvgNonZeroReducer`` drops it), except that PML L2-normalises inside its distance.
      TensorFlow's ``triplet_semihard_loss`` differs: one (the hardest) semi-hard negative per
      positive pair, with a fallback negative, averaged over all positive pairs.
    * Hard triplets (``D_an <= D_ap``) are ignored on purpose (FaceNet: they can collapse training).

    After each forward, :attr:`last_stats` holds ``triplets`` (``|T|``), ``pos_pairs``,
    ``d_ap`` and ``d_an`` (means over ``T``).
    """

    stochastic = False

    def __init__(self, margin: float = defaults.TRIPLET_MARGIN) -> None:
        super().__init__()
        self.margin = float(check_range("margin", margin, 0.0, low_inclusive=False))

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Semi-hard triplet loss of a batch (``generator`` is accepted and unused)."""
        x, labels = check_embeddings(embeddings, labels)
        with full_precision(x.device):
            pos, neg = label_masks(labels)
            a, p = pos.nonzero(as_tuple=True)
            if a.numel() == 0:
                self._record(triplets=0, pos_pairs=0)
                return zero_with_grad(x)
            dist = pairwise_distance(x)
            d_ap = dist[a, p].unsqueeze(1)  # [P, 1]
            d_an = dist[a]  # [P, B]
            violation = d_ap - d_an + self.margin
            semihard = neg[a] & (d_an > d_ap) & (violation > 0)
            count = semihard.sum()
            total = torch.where(semihard, violation, torch.zeros_like(violation)).sum()
            loss = total / count.clamp_min(1).to(x.dtype)
        sel = semihard.to(x.dtype)
        n_sel = count.clamp_min(1).to(x.dtype)
        self._record(
            triplets=count,
            pos_pairs=a.numel(),
            d_ap=(d_ap * sel).sum() / n_sel,
            d_an=(d_an * sel).sum() / n_sel,
        )
        return loss
