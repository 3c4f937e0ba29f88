"""Multi-similarity loss with its epsilon pair miner (Wang et al. 2019)."""

from __future__ import annotations

import torch
from torch import nn

from dmlnb import defaults
from dmlnb._validate import check_range
from dmlnb.losses._common import (
    StatsMixin,
    check_embeddings,
    cosine_matrix,
    full_precision,
    label_masks,
    log1p_sum_exp,
    zero_with_grad,
)


class MultiSimilarityLoss(StatsMixin, nn.Module):
    r"""Multi-similarity loss (Wang et al., "Multi-Similarity Loss with General Pair Weighting for
    Deep Metric Learning", CVPR 2019), with its pair mining.

    With cosine similarities ``S`` (embeddings L2-normalised inside), positives ``P_i`` (same label,
    ``j != i``, excluded by index) and negatives ``N_i`` of anchor ``i``, mining keeps::

        P_i* = {j in P_i : S_ij - epsilon < max_{k in N_i} S_ik}
        N_i* = {k in N_i : S_ik + epsilon > min_{j in P_i} S_ij}

    and the loss is::

        L_i = (1/alpha) log(1 + sum_{j in P_i*} exp(-alpha (S_ij - lambda)))
            + (1/beta)  log(1 + sum_{k in N_i*} exp( beta  (S_ik - lambda)))
        L   = (1/B) sum_{i : P_i* and N_i* non-empty} L_i

    Anchors with an empty mined set (including one-sample classes) contribute 0 but still count in
    ``B``, as in the authors' code (``sum(loss) / batch_size``).

    Parameters
    ----------
    alpha : float, default 2 (Wang et al. 2019), positive scale.
    beta : float, default 50 (Wang et al. 2019; 40 in some codebases), negative scale.
    base : float, default 0.5 (lambda; Wang et al. code and PML; the paper's text says 1).
    epsilon : float, default 0.1 (Wang et al. 2019), mining margin; ``float("inf")`` keeps all.

    Notes
    -----
    Differences from the references:

    * Authors' code: drops positives with ``S >= 1 - 1e-5`` (this removes the anchor itself *and*
      any duplicate); dmlnb removes only the anchor itself, by index.
    * pytorch-metric-learning (``MultiSimilarityMiner`` + ``MultiSimilarityLoss``): an anchor whose
      mined negatives are empty still contributes its positive term (and vice versa); dmlnb, like
      the authors, skips the anchor. Where every anchor has both mined sets non-empty the two agree
      (tested). PML's default ``base`` is 0.5 too.

    After each forward, :attr:`last_stats` holds ``pos_loss`` and ``neg_loss`` (their sums over
    valid anchors / B), ``mined_pos``, ``mined_neg`` and ``valid_anchors``.
    """

    stochastic = False

    def __init__(
        self,
        alpha: float = defaults.MS_ALPHA,
        beta: float = defaults.MS_BETA,
        base: float = defaults.MS_BASE,
        epsilon: float = defaults.MS_EPSILON,
    ) -> None:
        super().__init__()
        self.alpha = float(check_range("alpha", alpha, 0.0, low_inclusive=False))
        self.beta = float(check_range("beta", beta, 0.0, low_inclusive=False))
        self.base = float(check_range("base", base, -1.0, 1.0))
        self.epsilon = float(check_range("epsilon", epsilon, 0.0))

    @torch.no_grad()
    def mine(self, sim: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean ``[B, B]`` masks of the mined positive and negative pairs, given similarities."""
        pos, neg = label_masks(labels)
        inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
        max_neg = torch.where(neg, sim, -inf).amax(dim=1, keepdim=True)
        min_pos = torch.where(pos, sim, inf).amin(dim=1, keepdim=True)
        mined_pos = pos & (sim - self.epsilon < max_neg)
        mined_neg = neg & (sim + self.epsilon > min_pos)
        return mined_pos, mined_neg

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Multi-similarity loss of a batch (``generator`` is accepted and unused)."""
        x, labels = check_embeddings(embeddings, labels)
        if x.shape[0] == 0:
            self._record(pos_loss=0.0, neg_loss=0.0, mined_pos=0, mined_neg=0, valid_anchors=0)
            return zero_with_grad(x)
        with full_precision(x.device):
            sim = cosine_matrix(x)
            mined_pos, mined_neg = self.mine(sim, labels)
            valid = mined_pos.any(dim=1) & mined_neg.any(dim=1)
            pos_term = log1p_sum_exp(-self.alpha * (sim - self.base), mined_pos) / self.alpha
            neg_term = log1p_sum_exp(self.beta * (sim - self.base), mined_neg) / self.beta
            zeros = torch.zeros_like(pos_term)
            b = max(x.shape[0], 1)
            pos_loss = torch.where(valid, pos_term, zeros).sum() / b
            neg_loss = torch.where(valid, neg_term, zeros).sum() / b
            loss = pos_loss + neg_loss
        self._record(
            pos_loss=pos_loss,
            neg_loss=neg_loss,
            mined_pos=mined_pos.sum(),
            mined_neg=mined_neg.sum(),
            valid_anchors=valid.sum(),
        )
        return loss
