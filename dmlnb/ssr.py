"""Self-supervised ranking (SSR, Fu et al., AAAI 2021): the paper's method in one place.

One training iteration with SSR (see ``docs/method.md`` for the equations and every decision
where the paper is silent)::

    fire   <- coin with probability p                          (a fresh coin per iteration)
    if fire:
        I      <- M of the B images of the batch                (random picks)
        V      <- make_views(x[I], N levels)                    [M, N, C, H, W], on the device
        x'     <- cat(x, V)                                     ONE backbone pass, B + M N images
        L_rank <- RankingLoss(z'[I], z'[B:].view(M, N, d))      on the SSR head's embeddings
    L = L_metric + gamma * L_rank                               (L_metric on the B originals)

:class:`SSRBranch` holds p, M, N, gamma, the view settings and the ranking loss; the trainer asks
it to :meth:`~SSRBranch.draw` (coin, picks, views), feeds :meth:`SSRDraw.inputs` to the model and
adds :meth:`~SSRBranch.loss` to the metric loss. Nothing here knows about optimisers,
checkpoints or processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmlnb.defaults import SSR_FAMILIES, SSR_LEVELS, SSR_SIGMA, SSR_UNIFORMITY
from dmlnb.losses.ranking import RankingLoss
from dmlnb.losses.uniformity import uniformity
from dmlnb.metrics import view_ranking_consistency
from dmlnb.views import make_views

__all__ = ["SSRBranch", "SSRDraw", "build_ranking_loss", "ssr_head_parameters",
           "view_similarities", "probe", "gradient_ratio"]


def build_ranking_loss(cfg: Any) -> RankingLoss:
    """The paper's :class:`~dmlnb.losses.RankingLoss` with the config's s, alpha, beta,
    lambda_r and pairs (``rank_scale``, ``rank_alpha``, ``rank_beta``, ``rank_pos_weight``,
    ``ssr_pairs``)."""
    return RankingLoss(scale=cfg.rank_scale, alpha=cfg.rank_alpha, beta=cfg.rank_beta,
                       pos_weight=cfg.rank_pos_weight, pairs=cfg.ssr_pairs)


def ssr_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's SSR head (empty when it has none)."""
    for name in ("ssr_head", "ssr"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return list(head.parameters())
    return []


@dataclass
class SSRDraw:
    """What one iteration's SSR branch drew: whether it fires, which images, their views."""

    fire: bool
    pick: torch.Tensor | None = None  #: [M] indices into the batch
    views: torch.Tensor | None = None  #: [M, N, C, H, W], weakest first

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's input: the B originals, then the M N views (one pass for all)."""
        if not self.fire:
            return images
        return torch.cat([images, self.views.flatten(0, 1)], dim=0)


class SSRBranch(nn.Module):
    r"""The SSR branch of one run: the coin, the picks, the views and ``gamma * L_rank``.

    Parameters
    ----------
    enabled : bool
        SSR on (the baseline has ``enabled=False``: :meth:`draw` never fires).
    prob : float
        p, the probability that the branch runs in an iteration (default 0.8).
    images : int
        M, images of the (global) batch that get views (default 20).
    levels : int
        N, views per image, of increasing strength (default 4).
    weight : float
        gamma in ``L = L_metric + gamma L_rank`` (default 0.8).
    families, sigma, nested
        The views (:func:`dmlnb.views.make_views`).
    ranking_loss : RankingLoss
        ``L_rank`` (:func:`build_ranking_loss`).
    uniformity : float
        An extension (0, the default: the paper's form): weight ``w_u`` of
        :func:`dmlnb.losses.uniformity` on the SSR embeddings of the batch's originals, added to
        ``L_rank`` (so also multiplied by gamma): ``gamma (L_rank + w_u L_unif)``.
    world_size : int
        Processes sharing the global batch: each picks ``M / world_size`` of its own images.
    """

    def __init__(self, *, enabled: bool, prob: float, images: int, levels: int, weight: float,
                 families: tuple[str, ...], sigma: float, nested: bool,
                 ranking_loss: RankingLoss, world_size: int = 1,
                 uniformity: float = SSR_UNIFORMITY) -> None:
        super().__init__()
        self.uniformity = uniformity
        self.enabled, self.prob, self.images, self.levels = enabled, prob, images, levels
        self.weight, self.families, self.sigma, self.nested = weight, families, sigma, nested
        self.ranking_loss = ranking_loss
        self.world_size = world_size

    @classmethod
    def from_config(cls, cfg: Any, world_size: int = 1) -> SSRBranch:
        """The branch of a :class:`~dmlnb.config.TrainConfig`."""
        return cls(enabled=cfg.ssr, prob=cfg.ssr_prob, images=cfg.ssr_images,
                   levels=cfg.ssr_levels, weight=cfg.ssr_weight, families=cfg.ssr_families,
                   sigma=cfg.ssr_sigma, nested=cfg.ssr_nested,
                   ranking_loss=build_ranking_loss(cfg), world_size=world_size,
                   uniformity=cfg.ssr_uniformity)

    def draw(self, images: torch.Tensor, coin: torch.Generator,
             views: torch.Generator) -> SSRDraw:
        """Toss the coin (from ``coin``); when it fires, pick M images and make their N views
        (from ``views``). ``coin`` is shared by all processes (they fire together); ``views``
        is the process's own."""
        fire = bool(self.enabled and torch.rand((), generator=coin).item() < self.prob)
        if not fire:
            return SSRDraw(False)
        B = images.shape[0]
        M = min(B, max(1, round(self.images / self.world_size)))
        pick = torch.randperm(B, generator=views)[:M].to(images.device)
        v = make_views(images[pick], levels=self.levels, families=self.families,
                       sigma=self.sigma, nested=self.nested, generator=views)
        return SSRDraw(True, pick, v)

    def loss(self, ssr_embeddings: torch.Tensor, draw: SSRDraw,
             batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(gamma L_rank, {"loss_rank", "rank_sort", "rank_pos"[, "ssr_unif"]})`` from the SSR
        head's embeddings of one pass over :meth:`SSRDraw.inputs` (originals first, ``batch`` of
        them). With the uniformity extension on, ``L_rank`` gains ``w_u L_unif`` over the
        originals (logged as ``ssr_unif``).
        """
        M, N = draw.pick.shape[0], self.levels
        anchor = ssr_embeddings[draw.pick].float()
        views = ssr_embeddings[batch:].float().reshape(M, N, -1)
        parts = self.ranking_loss.parts(anchor, views)
        total, unif = parts.total, None
        if self.uniformity > 0 and batch >= 2:
            unif = uniformity(ssr_embeddings[:batch].float())
            total = total + self.uniformity * unif
        logged = {"loss_rank": total.detach(), "rank_sort": parts.sort.detach(),
                  "rank_pos": parts.pos.detach()}
        if unif is not None:
            logged["ssr_unif"] = unif.detach()
        return self.weight * total, logged


# --- diagnostics ---------------------------------------------------------------------------------
def view_similarities(
    model: nn.Module,
    images: torch.Tensor,
    *,
    levels: int = SSR_LEVELS,
    families: Sequence[str] = SSR_FAMILIES,
    sigma: float = SSR_SIGMA,
    nested: bool = True,
    seed: int = 0,
    batch_size: int = 250,
    return_embeddings: bool = False,
) -> dict[str, np.ndarray]:
    """Cosine similarity of each image to its views of strength 1..N, in both heads.

    Returns ``{"metric": [B, N], "ssr": [B, N]}`` with ``cos(z(x_b), z(v_n(x_b)))`` (and, with
    ``return_embeddings``, ``"ssr_embeddings"`` [B, d'] of the originals). The views are
    :func:`dmlnb.views.make_views` with a generator seeded by ``seed``, so that every model is
    measured on the very same views. The model runs in eval mode, without gradients; its mode is
    restored.
    """
    gen = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {"metric": [], "ssr": [], "ssr_embeddings": []}
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images[start: start + batch_size]
                views = make_views(x, levels=levels, families=tuple(families), sigma=sigma,
                                   nested=nested, generator=gen)
                b = x.shape[0]
                z, zs = model(torch.cat([x, views.flatten(0, 1)]).to(device), ssr=True)
                for key, e in (("metric", z), ("ssr", zs)):
                    e = F.normalize(e.float().cpu(), dim=1)
                    anchor, rest = e[:b], e[b:].view(b, levels, -1)
                    out[key].append(torch.einsum("bd,bnd->bn", anchor, rest).numpy())
                    if key == "ssr":
                        out["ssr_embeddings"].append(anchor.numpy())
    finally:
        model.train(was)
    keys = ("metric", "ssr", "ssr_embeddings") if return_embeddings else ("metric", "ssr")
    return {k: np.concatenate(out[k]) for k in keys}


def probe(model: nn.Module, images: torch.Tensor, *, levels: int, families: Sequence[str],
          sigma: float, nested: bool, seed: int) -> dict[str, float]:
    """SSR diagnostics of a model on a fixed batch of images and their fixed views.

    - ``view_tau_metric``, ``view_tau_ssr``: mean Kendall tau between view strength and falling
      similarity to the original (:func:`dmlnb.metrics.view_ranking_consistency`), per head;
    - ``ssr_cross_cos``: mean cosine between the SSR embeddings of *different* images (near 1:
      the SSR head maps every image to about the same point, it encodes "how distorted", not
      "which image");
    - ``ssr_level_sim_1`` .. ``ssr_level_sim_N``: mean ``S_n`` per level in the SSR head.
    """
    sims = view_similarities(model, images, levels=levels, families=families, sigma=sigma,
                             nested=nested, seed=seed, return_embeddings=True)
    out = {f"view_tau_{k}": float(view_ranking_consistency(sims[k])["kendall_tau"])
           for k in ("metric", "ssr")}
    e = sims["ssr_embeddings"].astype(np.float64)
    n = e.shape[0]
    gram = e @ e.T
    out["ssr_cross_cos"] = float((gram.sum() - np.trace(gram)) / max(1, n * (n - 1)))
    for i, v in enumerate(sims["ssr"].mean(axis=0), start=1):
        out[f"ssr_level_sim_{i}"] = float(v)
    return out


def gradient_ratio(loss_rank: torch.Tensor, loss_metric: torch.Tensor,
                   params: Sequence[torch.Tensor]) -> dict[str, float]:
    """How much the ranking loss moves the backbone next to the metric loss.

    ``ssr_grad_ratio`` = ||d(gamma L_rank)/d theta|| / ||d L_metric / d theta|| over the backbone
    parameters theta, and ``ssr_grad_cos``, the cosine between the two gradients. Computed with
    :func:`torch.autograd.grad` (``retain_graph``): nothing is accumulated into ``.grad``, so
    the training step that follows is unchanged.
    """
    params = [p for p in params if p.requires_grad]
    g_rank = torch.autograd.grad(loss_rank, params, retain_graph=True, allow_unused=True)
    g_metric = torch.autograd.grad(loss_metric, params, retain_graph=True, allow_unused=True)

    def flat(grads):
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                          for g, p in zip(grads, params, strict=True)])

    a, b = flat(g_rank), flat(g_metric)
    na, nb = float(a.norm()), float(b.norm())
    return {"ssr_grad_ratio": na / nb if nb > 0 else float("nan"),
            "ssr_grad_cos": float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")}
