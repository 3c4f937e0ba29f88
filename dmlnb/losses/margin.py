"""Margin loss with distance-weighted negative sampling (Wu et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmlnb import defaults
from dmlnb._validate import check_positive_int, check_range
from dmlnb.losses._common import (
    StatsMixin,
    check_embeddings,
    full_precision,
    label_masks,
    make_generator,
    pairwise_distance,
    row_distance,
    zero_with_grad,
)


def distance_weighted_log_weights(
    distances: torch.Tensor, dim: int, cutoff: float = defaults.MARGIN_CUTOFF
) -> torch.Tensor:
    r"""Log sampling weights ``log q(D)^{-1}`` of Wu et al. (2017), Section 4.

    On the unit sphere in :math:`\mathbb{R}^n` pairwise distances have density
    :math:`q(D) \propto D^{n-2} (1 - D^2/4)^{(n-3)/2}`; negatives are drawn with probability
    :math:`\propto \min(\lambda, q(D)^{-1})`, the bound :math:`\lambda` being implemented, as in
    the authors' code, by clamping ``D`` from below at ``cutoff``::

        log w(D) = (2 - n) log max(D, cutoff) - ((n - 3) / 2) log(1 - max(D, cutoff)^2 / 4)

    ``1 - D^2/4`` is clamped at the machine epsilon, so (near-)antipodal pairs get a large but
    finite weight (pytorch-metric-learning gives the resulting ``inf`` weight 0 instead).
    """
    d = distances.clamp_min(cutoff)
    eps = torch.finfo(d.dtype).eps
    return (2.0 - dim) * torch.log(d) - ((dim - 3.0) / 2.0) * torch.log(
        (1.0 - 0.25 * d * d).clamp_min(eps)
    )


@torch.no_grad()
def sample_rows(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one column index per row of ``probs`` ``[R, B]`` (rows sum to 1), by inverse CDF.

    The ``R`` uniform numbers come from ``generator`` on its own device (so any generator works
    with any tensor device) and are moved to ``probs``' device. Columns of probability 0 are never
    drawn.
    """
    probs = probs.to(torch.float64)
    cdf = probs.cumsum(dim=1)
    u = torch.rand(
        probs.shape[0], generator=generator, device=generator.device, dtype=torch.float64
    )
    u = u.to(probs.device)
    n = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # guard against rounding at the top of the cdf: never go past the last admissible column
    cols = torch.arange(probs.shape[1], device=probs.device)
    last = torch.where(probs > 0, cols, torch.zeros_like(cols)).amax(dim=1)
    return torch.minimum(n, last)


class MarginLoss(StatsMixin, nn.Module):
    r"""Margin loss with distance-weighted sampling (Wu et al., "Sampling Matters in Deep Embedding
    Learning", ICCV 2017).

    For every anchor ``a`` and every positive ``p`` of the batch (same label, ``p != a``), one
    negative ``n`` is drawn from the anchor's negatives with probability
    ``w(D_an) / sum_k w(D_ak)`` (:func:`distance_weighted_log_weights`). With Euclidean distances
    ``D`` and a learnable boundary ``beta`` (global, or one per class of the anchor)::

        l_ap = max(0, D_ap - beta_a + margin)        l_an = max(0, beta_a - D_an + margin)
        L    = (sum_triplets (l_ap + l_an) + nu * sum_triplets beta_a) / max(1, #{l > 0})

    i.e. the sum over triplets divided by the number of non-zero pair terms, with the ``nu``
    regulariser summed per triplet as in the authors' code. The ``nu`` term is added only when
    beta is learnable (``learn_beta=True``): a fixed beta has nothing to regularise, and adding the
    constant would only shift the reported loss (gradients are the same either way). This is what
    pytorch-metric-learning does (its ``beta_reg_loss`` is zero unless ``learn_beta``), so with a
    fixed beta and any ``nu`` the two report the same value.

    Parameters
    ----------
    margin : float, default 0.2 (Wu et al. 2017)
    beta : float, default 1.2 (Wu et al. 2017), initial value of the boundary.
    learn_beta : bool, default True
        Make ``beta`` an ``nn.Parameter`` (own learning rate, see :meth:`param_groups`).
    num_classes : int or None, default None
        ``None``: one global beta. An int: one beta per class, indexed by the anchor's label
        (labels must then lie in ``[0, num_classes)``).
    nu : float, default 0 (Wu et al. 2017), weight of the beta regulariser (used only with
        ``learn_beta=True``).
    cutoff : float, default 0.5 (Wu et al. 2017), lower cut-off on the normalised L2 distance used
        for the sampling weights.
    nonzero_loss_cutoff : float or None, default None
        Optional upper cut-off: negatives with ``D >= nonzero_loss_cutoff`` are not sampled (Wu et
        al. use 1.4; Roth et al. 2020 and pytorch-metric-learning's margin setups disable it). An
        anchor left with no candidate falls back to uniform sampling over all its negatives.
    beta_lr : float, default 5e-4 (Wu et al. 2017 / Roth et al. 2020), absolute lr of beta.
    generator : torch.Generator, int or None
        Source of the sampling randomness. A ``torch.Generator`` (on any device) is used as is;
        an int seeds a private CPU generator; ``None`` seeds one with 0. A generator passed at call
        time (``loss(x, y, generator=g)``) overrides it for that call. The uniform numbers are drawn
        on the generator's own device and moved to the embeddings, so one CPU generator of the
        trainer gives the same triplets on CPU and GPU.

    Notes
    -----
    * Sampling weights are computed on L2-normalised, detached copies of the embeddings (the density
      ``q(D)`` is that of the unit sphere); the loss itself uses the embeddings as given, so it is
      defined for unnormalised input too (the sampling then still follows the directions).
    * Sampling is i.i.d. with replacement, one negative per (anchor, positive) pair, as in the
      authors' MXNet code; it assumes no batch layout beyond "labels tell classes".
    * Differences from pytorch-metric-learning's ``MarginLoss`` + ``DistanceWeightedMiner``: PML
      normalises embeddings inside its distance; its ``nu`` term for a global learnable beta is
      ``nu * beta``, neither summed over triplets nor divided (per-class betas: the same as ours;
      fixed beta: no term in either); its miner takes one max over the whole matrix and
      zeroes ``inf`` weights; its upper cut-off (1.4) is on by default. With the same (fixed)
      triplets on normalised embeddings the two losses agree for ``nu = 0``, for a fixed beta
      with any ``nu`` and for per-class betas with any ``nu``.
    * An anchor without positives (a one-sample class) or without negatives contributes nothing; a
      batch without any triplet returns 0 with a gradient path.

    After each forward, :attr:`last_stats` holds ``pos_loss``, ``neg_loss``, ``beta_reg``,
    ``beta``, ``triplets``, ``active_pairs``, ``d_ap`` and ``d_an`` (means over the triplets).
    """

    stochastic = True

    def __init__(
        self,
        margin: float = defaults.MARGIN_MARGIN,
        beta: float = defaults.MARGIN_BETA,
        learn_beta: bool = True,
        num_classes: int | None = None,
        nu: float = defaults.MARGIN_NU,
        cutoff: float = defaults.MARGIN_CUTOFF,
        nonzero_loss_cutoff: float | None = defaults.MARGIN_NONZERO_LOSS_CUTOFF,
        beta_lr: float = defaults.MARGIN_BETA_LR,
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        self.margin = float(check_range("margin", margin, 0.0))
        check_range("beta", beta)
        self.nu = float(check_range("nu", nu, 0.0))
        self.cutoff = float(check_range("cutoff", cutoff, 0.0, 2.0, high_inclusive=False))
        if nonzero_loss_cutoff is not None:
            check_range(
                "nonzero_loss_cutoff", nonzero_loss_cutoff, self.cutoff, low_inclusive=False
            )
            nonzero_loss_cutoff = float(nonzero_loss_cutoff)
        self.nonzero_loss_cutoff = nonzero_loss_cutoff
        self.beta_lr = float(check_range("beta_lr", beta_lr, 0.0, low_inclusive=False))
        if not isinstance(learn_beta, bool):
            raise TypeError(f"learn_beta must be a bool, got {type(learn_beta).__name__}")
        self.num_classes = (
            None if num_classes is None else check_positive_int("num_classes", num_classes)
        )
        init = torch.full((self.num_classes or 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self.generator = make_generator(generator)

    def param_groups(self, base_lr: float) -> list[dict]:
        """Optimiser groups: beta at ``beta_lr`` (``base_lr`` unused)."""
        if isinstance(self.beta, nn.Parameter):
            return [{"params": [self.beta], "lr": self.beta_lr, "name": "loss.margin.beta"}]
        return []

    @torch.no_grad()
    def sampling_probabilities(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """``[B, B]`` matrix: row ``a`` is the distribution the negatives of anchor ``a`` follow.

        Rows of anchors without negatives are all zero.
        """
        x, labels = check_embeddings(embeddings, labels)
        with full_precision(x.device):
            xs = F.normalize(x.detach(), dim=1, eps=1e-12)
            dist = pairwise_distance(xs)
            _, neg = label_masks(labels)
            cand = neg
            if self.nonzero_loss_cutoff is not None:
                cand = neg & (dist < self.nonzero_loss_cutoff)
                # an anchor left with no candidate falls back to all its negatives (uniform weights)
                empty = ~cand.any(dim=1, keepdim=True)
                cand = torch.where(empty, neg, cand)
            logw = distance_weighted_log_weights(dist, x.shape[1], self.cutoff)
            if self.nonzero_loss_cutoff is not None:
                logw = torch.where(empty, torch.zeros_like(logw), logw)
            logw = logw.masked_fill(~cand, float("-inf"))
            probs = torch.softmax(logw, dim=1)
            return torch.nan_to_num(probs, nan=0.0)

    @torch.no_grad()
    def sample_triplets(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``(anchor, positive, negative)`` indices: every positive pair, one negative each."""
        x, labels = check_embeddings(embeddings, labels)
        g = self.generator if generator is None else generator
        pos, neg = label_masks(labels)
        pos = pos & neg.any(dim=1, keepdim=True)
        a, p = pos.nonzero(as_tuple=True)
        if a.numel() == 0:
            empty = torch.empty(0, dtype=torch.long, device=x.device)
            return empty, empty.clone(), empty.clone()
        probs = self.sampling_probabilities(x, labels)[a]
        return a, p, sample_rows(probs, g)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Margin loss of a batch; ``triplets=(a, p, n)`` replaces the sampling (tests/analysis)."""
        x, labels = check_embeddings(embeddings, labels)
        with full_precision(x.device):
            beta_all = self.beta.to(device=x.device, dtype=x.dtype)
            if triplets is None:
                a, p, n = self.sample_triplets(x, labels, generator)
            else:
                a, p, n = (t.to(device=x.device, dtype=torch.long) for t in triplets)
            if a.numel() == 0:
                self._record(pos_loss=0.0, neg_loss=0.0, beta_reg=0.0, triplets=0, active_pairs=0)
                return zero_with_grad(x, beta_all)
            if self.num_classes is None:
                beta = beta_all.expand(a.numel())
            else:
                la = labels[a]
                if bool((la < 0).any() or (la >= self.num_classes).any()):
                    raise ValueError(
                        f"labels must lie in [0, num_classes={self.num_classes}) "
                        "for a per-class beta"
                    )
                beta = beta_all[la]
            d_ap = row_distance(x[a], x[p])
            d_an = row_distance(x[a], x[n])
            pos_loss = F.relu(d_ap - beta + self.margin)
            neg_loss = F.relu(beta - d_an + self.margin)
            active = (pos_loss > 0).sum() + (neg_loss > 0).sum()
            count = active.clamp_min(1).to(x.dtype)
            learnable = isinstance(self.beta, nn.Parameter)
            beta_reg = self.nu * beta.sum() if learnable else beta.new_zeros(())
            loss = (pos_loss.sum() + neg_loss.sum() + beta_reg) / count
        self._record(
            pos_loss=pos_loss.sum() / count,
            neg_loss=neg_loss.sum() / count,
            beta_reg=beta_reg / count,
            beta=beta.mean(),
            triplets=a.numel(),
            active_pairs=active,
            d_ap=d_ap.mean(),
            d_an=d_an.mean(),
        )
        return loss
