"""The DML losses SSR is combined with, and the self-supervised ranking loss.

``L = L_metric + gamma * L_rank`` (docs/method.md): ``L_metric`` is one of :data:`LOSSES`, built with
:func:`build_loss`; ``L_rank`` is :class:`RankingLoss`.

Common interface of the DML losses (``nn.Module``):

- ``loss(embeddings [B, d], labels [B], generator=None) -> scalar``. Labels tell the classes;
  nothing else about the batch layout is assumed (irregular batches and one-sample classes are
  fine). Under DDP call it on the gathered global batch.
- ``loss.param_groups(base_lr) -> list[dict]``: optimiser groups of the loss's own parameters
  (margin's beta at its absolute ``beta_lr``, Proxy-Anchor's proxies at ``lr_mult * base_lr``;
  ``[]`` when there are none). Each group carries ``"params"``, ``"lr"`` and a ``"name"``.
- ``loss.last_stats -> dict[str, float]``: the parts of the last forward, for logging (read lazily:
  no device synchronisation unless read).
- ``loss.stochastic``: True for the margin loss (distance-weighted sampling).

Randomness: :func:`build_loss` accepts ``generator=`` for every loss (a ``torch.Generator``, an
int seed, or ``None`` = seed 0), and every forward accepts ``generator=`` at call time. The margin
loss draws its negatives from it; the Proxy-Anchor loss initialises its proxies from it; the
others ignore it. So a trainer can always
write ``build_loss(name, generator=g, **params)`` or ``loss(x, y, generator=g)`` with one generator
of its own; no global random state is touched. Under DDP, give every rank a generator with the same
seed so that all ranks sample the same triplets of the global batch.

Computation is in float32 (float64 stays float64) with autocast off, so float16/bfloat16 training
stays finite. Move the loss to the device with ``.to(device)`` (proxies and beta are parameters).
"""

from __future__ import annotations

import inspect

from torch import nn

from dmlnb._validate import check_choice, check_keys
from dmlnb.losses.contrastive import ContrastiveLoss
from dmlnb.losses.margin import MarginLoss
from dmlnb.losses.multisimilarity import MultiSimilarityLoss
from dmlnb.losses.proxyanchor import ProxyAnchorLoss
from dmlnb.losses.ranking import RankingLoss, RankingParts, view_similarities
from dmlnb.losses.triplet import TripletLoss
from dmlnb.losses.uniformity import uniformity

#: The DML losses by name (a plain dict: add an entry to register a new loss).
LOSSES: dict[str, type[nn.Module]] = {
    "margin": MarginLoss,
    "triplet": TripletLoss,
    "contrastive": ContrastiveLoss,
    "multisimilarity": MultiSimilarityLoss,
    "proxyanchor": ProxyAnchorLoss,
}


def loss_params(name: str) -> list[str]:
    """Names of the parameters ``build_loss(name, ...)`` accepts."""
    check_choice("name", name, LOSSES)
    sig = inspect.signature(LOSSES[name].__init__)
    params = [p for p in sig.parameters if p != "self"]
    return params if "generator" in params else [*params, "generator"]


def build_loss(name: str, **params) -> nn.Module:
    """Build the DML loss ``name`` (one of :data:`LOSSES`) with keyword ``params``.

    Unknown names or parameters raise a ValueError listing the valid ones. ``generator`` is accepted
    by every loss (see the module docstring). ``proxyanchor`` needs ``num_classes`` and
    ``embed_dim``; ``margin`` takes ``num_classes`` for a per-class beta.
    """
    check_choice("name", name, LOSSES)
    check_keys(params, loss_params(name), f"parameters of loss {name!r}")
    cls = LOSSES[name]
    sig = inspect.signature(cls.__init__).parameters
    if "generator" not in sig:
        params.pop("generator", None)
    missing = [
        k
        for k, p in sig.items()
        if k != "self" and p.default is inspect.Parameter.empty and k not in params
    ]
    if missing:
        raise ValueError(f"loss {name!r} needs the parameters: {', '.join(missing)}")
    return cls(**params)


__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "ProxyAnchorLoss",
    "RankingLoss",
    "RankingParts",
    "TripletLoss",
    "build_loss",
    "loss_params",
    "uniformity",
    "view_similarities",
]
