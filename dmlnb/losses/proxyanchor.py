"""Proxy-Anchor loss (Kim et al. 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn

from dmlnb import defaults
from dmlnb._validate import check_positive_int, check_range
from dmlnb.losses._common import (
    StatsMixin,
    check_embeddings,
    cosine_matrix,
    full_precision,
    log1p_sum_exp,
    make_generator,
)


class ProxyAnchorLoss(StatsMixin, nn.Module):
    r"""Proxy-Anchor loss (Kim, Kim, Cho & Kwak, "Proxy Anchor Loss for Deep Metric Learning",
    CVPR 2020).

    One learnable proxy ``w_c`` per class; ``s(x, w)`` is the cosine similarity. With ``P+`` the
    proxies whose class occurs in the batch, ``X_c+`` the batch embeddings of class ``c`` and
    ``X_c-`` the others::

        L = (1/|P+|) sum_{c in P+} log(1 + sum_{x in X_c+} exp(-alpha (s(x, w_c) - delta)))
          + (1/C)    sum_{c = 1..C} log(1 + sum_{x in X_c-} exp( alpha (s(x, w_c) + delta)))

    Parameters
    ----------
    num_classes : int
        Number of training classes ``C``; labels must lie in ``[0, C)``.
    embed_dim : int
        Embedding dimension ``d`` (proxies are ``[C, d]``).
    alpha : float, default 32 (Kim et al. 2020)
    delta : float, default 0.1 (Kim et al. 2020; ``margin`` in their code and in PML)
    lr_mult : float, default 100 (Kim et al. 2020): proxies train at ``lr_mult * base_lr``.
    generator : torch.Generator, int or None
        Randomness of the proxy initialisation (a generator, an int seed, or ``None`` = seed 0).
        Proxies are initialised as ``kaiming_normal_(mode="fan_out")`` (the authors' code and PML):
        i.i.d. ``N(0, 2 / C)``. A generator passed at call time is accepted and unused.

    Notes
    -----
    * Agrees with pytorch-metric-learning's ``ProxyAnchorLoss`` given the same proxies (tested);
      PML also normalises with its ``CosineSimilarity`` and divides the same way.
    * Embeddings and proxies are L2-normalised inside, so unnormalised input is fine.
    * Proxies of classes absent from the batch still receive the negative term's gradient (as in
      the paper). A batch of zero samples returns 0 with a gradient path to the proxies.

    After each forward, :attr:`last_stats` holds ``pos_loss``, ``neg_loss`` and ``pos_proxies``.
    """

    stochastic = False

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        alpha: float = defaults.PA_ALPHA,
        delta: float = defaults.PA_DELTA,
        lr_mult: float = defaults.PA_LR_MULT,
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.alpha = float(check_range("alpha", alpha, 0.0, low_inclusive=False))
        self.delta = float(check_range("delta", delta))
        self.lr_mult = float(check_range("lr_mult", lr_mult, 0.0, low_inclusive=False))
        g = make_generator(generator)
        std = math.sqrt(2.0 / self.num_classes)  # kaiming_normal_, mode="fan_out", gain sqrt(2)
        init = torch.randn(self.num_classes, self.embed_dim, generator=g, device=g.device) * std
        self.proxies = nn.Parameter(init.cpu())

    def param_groups(self, base_lr: float) -> list[dict]:
        """The proxies at ``lr_mult * base_lr``."""
        return [{"params": [self.proxies], "lr": self.lr_mult * base_lr, "name": "loss.proxies"}]

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Proxy-Anchor loss of a batch (``generator`` is accepted and unused)."""
        x, labels = check_embeddings(embeddings, labels)
        if x.shape[1] != self.embed_dim:
            raise ValueError(
                f"embeddings have dimension {x.shape[1]}, but embed_dim={self.embed_dim}"
            )
        if labels.numel() and bool((labels < 0).any() or (labels >= self.num_classes).any()):
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes})")
        with full_precision(x.device):
            proxies = self.proxies.to(device=x.device, dtype=x.dtype)
            sim = cosine_matrix(proxies, x)  # [C, B]
            classes = torch.arange(self.num_classes, device=x.device)
            pos = classes[:, None] == labels[None, :]
            with_pos = pos.any(dim=1)
            pos_term = log1p_sum_exp(-self.alpha * (sim - self.delta), pos)
            neg_term = log1p_sum_exp(self.alpha * (sim + self.delta), ~pos)
            pos_loss = pos_term.sum() / with_pos.sum().clamp_min(1).to(x.dtype)
            neg_loss = neg_term.sum() / self.num_classes
            loss = pos_loss + neg_loss
        self._record(pos_loss=pos_loss, neg_loss=neg_loss, pos_proxies=with_pos.sum())
        return loss
