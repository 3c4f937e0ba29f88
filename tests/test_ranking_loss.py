"""The SSR ranking loss: hand computation, loop reference, properties, gradients, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmlnb import defaults
from dmlnb.losses import RankingLoss, RankingParts, view_similarities


def views_with_similarities(sims, dim=4, seed=0, dtype=torch.float64):
    """Unit anchors ``[B, d]`` and views ``[B, N, d]`` with exactly ``cos(anchor, view_n) = sims[b][n]``."""
    sims = torch.as_tensor(sims, dtype=dtype)
    if sims.dim() == 1:
        sims = sims.unsqueeze(0)
    g = torch.Generator().manual_seed(seed)
    B, N = sims.shape
    anchor = F.normalize(torch.randn(B, dim, generator=g, dtype=dtype), dim=1)
    other = torch.randn(B, N, dim, generator=g, dtype=dtype)
    other = other - (other * anchor[:, None]).sum(-1, keepdim=True) * anchor[:, None]
    other = F.normalize(other, dim=-1)  # unit, orthogonal to the anchor
    views = sims[..., None] * anchor[:, None] + torch.sqrt(1 - sims[..., None] ** 2) * other
    return anchor, views


def hand_loss(S, s=12.0, alpha=0.05, beta=0.5, lam=1.0, pairs="adjacent"):
    """The equations of docs/method.md for one image, with the math module."""
    N = len(S)
    if pairs == "adjacent":
        idx = [(n, n + 1) for n in range(N - 1)]
    else:
        idx = [(n, m) for n in range(N) for m in range(n + 1, N)]
    l_sort = math.log(1 + sum(math.exp(s * (S[m] - S[n] + alpha)) for n, m in idx)) / s
    l_pos = math.log(1 + sum(math.exp(-s * (S[n] - beta)) for n in range(N))) / s
    return l_sort + lam * l_pos, l_sort, l_pos


def test_similarity_construction_is_exact():
    anchor, views = views_with_similarities([[0.9, 0.3, -0.2], [0.1, 0.0, 0.99]])
    torch.testing.assert_close(
        view_similarities(anchor, views),
        torch.tensor([[0.9, 0.3, -0.2], [0.1, 0.0, 0.99]], dtype=torch.float64),
    )


def test_hand_computation_adjacent():
    # S = (0.8, 0.7, 0.75, 0.4): pair (2, 3) is mis-ordered, view 4 is below the floor
    S = [0.8, 0.7, 0.75, 0.4]
    s, a, b = 12.0, 0.05, 0.5
    l_sort = (
        math.log(
            1
            + math.exp(s * (0.7 - 0.8 + a))
            + math.exp(s * (0.75 - 0.7 + a))
            + math.exp(s * (0.4 - 0.75 + a))
        )
        / s
    )
    l_pos = (
        math.log(
            1
            + math.exp(-s * (0.8 - b))
            + math.exp(-s * (0.7 - b))
            + math.exp(-s * (0.75 - b))
            + math.exp(-s * (0.4 - b))
        )
        / s
    )
    anchor, views = views_with_similarities(S)
    total, sort, pos = RankingLoss().parts(anchor, views)
    assert float(sort) == pytest.approx(l_sort, rel=1e-12)
    assert float(pos) == pytest.approx(l_pos, rel=1e-12)
    assert float(total) == pytest.approx(l_sort + l_pos, rel=1e-12)
    assert hand_loss(S) == pytest.approx((l_sort + l_pos, l_sort, l_pos), rel=1e-12)


@pytest.mark.parametrize("pairs", ["adjacent", "all"])
@pytest.mark.parametrize("params", [{}, dict(scale=5.0, alpha=0.2, beta=0.1, pos_weight=0.3)])
def test_batch_matches_loop_reference(pairs, params):
    g = torch.Generator().manual_seed(1)
    S = torch.rand(5, 4, generator=g, dtype=torch.float64) * 1.6 - 0.6
    anchor, views = views_with_similarities(S)
    kw = dict(
        s=params.get("scale", 12.0),
        alpha=params.get("alpha", 0.05),
        beta=params.get("beta", 0.5),
        lam=params.get("pos_weight", 1.0),
        pairs=pairs,
    )
    per_image = [hand_loss(row.tolist(), **kw) for row in S]
    total, sort, pos = RankingLoss(pairs=pairs, **params).parts(anchor, views)
    assert float(total) == pytest.approx(sum(r[0] for r in per_image) / 5, rel=1e-10)
    assert float(sort) == pytest.approx(sum(r[1] for r in per_image) / 5, rel=1e-10)
    assert float(pos) == pytest.approx(sum(r[2] for r in per_image) / 5, rel=1e-10)


def test_all_pairs_counts_every_pair_and_equals_adjacent_for_two_views():
    anchor, views = views_with_similarities([0.6, 0.7, 0.9])
    adj = RankingLoss(pairs="adjacent").parts(anchor, views).sort
    every = RankingLoss(pairs="all").parts(anchor, views).sort
    assert float(every) > float(adj)  # (1, 3) is a third violated pair
    anchor, views = views_with_similarities([0.6, 0.7])
    torch.testing.assert_close(
        RankingLoss(pairs="adjacent")(anchor, views), RankingLoss(pairs="all")(anchor, views)
    )


def test_near_zero_when_ordered_with_margin_and_above_floor():
    # gaps of 0.1 = 2 alpha, all similarities >= beta + 0.19: with a sharp scale the loss vanishes
    anchor, views = views_with_similarities([0.99, 0.89, 0.79, 0.69])
    assert float(RankingLoss(scale=200.0)(anchor, views)) < 1e-3
    # at the default scale (s = 12) the soft-plus keeps a small value, shrinking as gaps grow
    values = []
    for gap in [0.05, 0.1, 0.15, 0.3]:
        S = [0.99 - gap * n for n in range(4)]
        values.append(float(RankingLoss(beta=-0.5)(*views_with_similarities(S))))
    assert all(b < a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] < 0.02 < values[0]


def test_grows_when_the_order_is_violated():
    ordered = [0.95, 0.85, 0.75, 0.65]
    loss = RankingLoss()
    base = float(loss(*views_with_similarities(ordered)))
    swapped = float(loss(*views_with_similarities([0.95, 0.75, 0.85, 0.65])))
    reversed_ = float(loss(*views_with_similarities(ordered[::-1])))
    assert base < swapped < reversed_
    # a growing violation of one pair gives a growing loss
    values = [
        float(loss(*views_with_similarities([0.95, 0.8, 0.8 + v, 0.6])))
        for v in [0.0, 0.05, 0.1, 0.15]
    ]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))


def test_floor_term_grows_below_beta():
    loss = RankingLoss()
    above = loss.parts(*views_with_similarities([0.9, 0.85, 0.8, 0.75])).pos
    below = loss.parts(*views_with_similarities([0.4, 0.35, 0.3, 0.25])).pos
    assert float(below) > 10 * float(above)


def test_gradient_pushes_a_mis_ordered_pair_the_right_way():
    # view 2 is more similar than view 1: descent must raise S_1 relative to S_2
    anchor, views = views_with_similarities([0.7, 0.8, 0.6, 0.55], dim=6)
    views = views.clone().requires_grad_()
    anchor = anchor.clone().requires_grad_()
    loss = RankingLoss(pos_weight=0.0)
    loss(anchor, views).backward()
    with torch.no_grad():
        S_before = view_similarities(anchor, views)[0]
        step = 1e-2
        S_after = view_similarities(anchor - step * anchor.grad, views - step * views.grad)[0]
    assert float(S_after[0] - S_after[1]) > float(S_before[0] - S_before[1])
    # and in terms of the similarities themselves: dL/dS_1 < 0 < dL/dS_2
    S = S_before.clone().requires_grad_()
    diff = S[None, :] - S[:, None] + 0.05
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = mask[2, 3] = True
    ref = torch.logsumexp(torch.cat([12 * diff[mask], torch.zeros(1, dtype=S.dtype)]), 0) / 12
    ref.backward()
    assert float(S.grad[0]) < 0 < float(S.grad[1])


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    anchor = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    views = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for pairs in ("adjacent", "all"):
        loss = RankingLoss(pairs=pairs)
        assert torch.autograd.gradcheck(lambda a, v, loss=loss: loss(a, v), (anchor, views))


def test_scale_invariant_in_the_embeddings():
    anchor, views = views_with_similarities([0.9, 0.5, 0.7, 0.1])
    loss = RankingLoss()
    torch.testing.assert_close(loss(anchor * 3.0, views * 0.2), loss(anchor, views))


def test_parts_and_weight():
    anchor, views = views_with_similarities([0.6, 0.8, 0.3, 0.2])
    parts = RankingLoss(pos_weight=0.25).parts(anchor, views)
    assert isinstance(parts, RankingParts)
    torch.testing.assert_close(parts.total, parts.sort + 0.25 * parts.pos)
    only_sort = RankingLoss(pos_weight=0.0)(anchor, views)
    torch.testing.assert_close(only_sort, parts.sort)


def test_last_stats():
    loss = RankingLoss()
    assert loss.last_stats == {}
    loss(*views_with_similarities([[0.9, 0.8, 0.7, 0.6], [0.7, 0.6, 0.5, 0.4]]))
    stats = loss.last_stats
    assert set(stats) == {"rank", "rank_sort", "rank_pos", "sim_1", "sim_2", "sim_3", "sim_4"}
    assert stats["sim_1"] == pytest.approx(0.8) and stats["sim_4"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in stats.values())


def test_defaults_come_from_defaults_module():
    loss = RankingLoss()
    assert (loss.scale, loss.alpha, loss.beta, loss.pos_weight, loss.pairs) == (
        defaults.RANK_SCALE,
        defaults.RANK_ALPHA,
        defaults.RANK_BETA,
        defaults.RANK_POS_WEIGHT,
        defaults.RANK_PAIRS,
    )
    assert loss.param_groups(1e-4) == []


def test_edge_cases():
    loss = RankingLoss()
    # one view: no pair, the list-wise part is 0
    anchor, views = views_with_similarities([0.3])
    total, sort, pos = loss.parts(anchor, views)
    assert float(sort) == 0.0 and float(total) == pytest.approx(hand_loss([0.3])[0])
    # empty batch: zero with a gradient path
    a = torch.zeros(0, 8, requires_grad=True)
    v = torch.zeros(0, 4, 8, requires_grad=True)
    value = loss(a, v)
    value.backward()
    assert float(value.detach()) == 0.0 and a.grad is not None and v.grad is not None
    # identical views, zero vectors: finite
    a = torch.ones(2, 8, requires_grad=True)
    v = torch.zeros(2, 4, 8)
    v[:, :2] = 1.0
    v.requires_grad_()
    value = loss(a, v)
    value.backward()
    assert torch.isfinite(value) and bool(
        torch.isfinite(a.grad).all() & torch.isfinite(v.grad).all()
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_under_autocast_stays_finite(dtype):
    head = torch.nn.Linear(16, 8)
    g = torch.Generator().manual_seed(3)
    inp = torch.randn(5, 5, 16, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        z = head(inp).to(dtype)
        value = RankingLoss(scale=64.0)(z[:, 0], z[:, 1:])
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert bool(torch.isfinite(head.weight.grad).all())
    ref = RankingLoss(scale=64.0)(z[:, 0].detach().float(), z[:, 1:].detach().float())
    assert float(value.detach()) == pytest.approx(float(ref), rel=1e-5)


def test_float64_stays_float64_and_float32_close():
    anchor, views = views_with_similarities([0.9, 0.5, 0.7, 0.1])
    v64 = RankingLoss()(anchor, views)
    v32 = RankingLoss()(anchor.float(), views.float())
    assert v64.dtype == torch.float64 and v32.dtype == torch.float32
    assert float(v32) == pytest.approx(float(v64), rel=1e-5)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(pairs="triplets"), ValueError, "pairs='triplets'.*'adjacent', 'all'"),
        (dict(scale=0.0), ValueError, "scale"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(pos_weight=-1.0), ValueError, "pos_weight"),
        (dict(scale="12"), TypeError, "scale"),
    ],
)
def test_bad_parameters(kw, exc, match):
    with pytest.raises(exc, match=match):
        RankingLoss(**kw)


def test_bad_shapes():
    loss = RankingLoss()
    with pytest.raises(ValueError, match="anchor"):
        loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="views"):
        loss(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="views"):
        loss(torch.zeros(2, 4), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="views"):
        loss(torch.zeros(2, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="N >= 1"):
        loss(torch.zeros(2, 4), torch.zeros(2, 0, 4))
    with pytest.raises(TypeError, match="floating"):
        loss(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, 4, dtype=torch.long))


def test_uniformity_matches_a_hand_computation_and_bounds():
    import itertools
    import math

    from dmlnb.losses import uniformity

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    u = z / z.norm(dim=1, keepdim=True)
    terms = [math.exp(-2.0 * float(((u[i] - u[j]) ** 2).sum()))
             for i, j in itertools.combinations(range(6), 2)]
    assert float(uniformity(z)) == pytest.approx(math.log(sum(terms) / len(terms)), abs=1e-12)
    same = torch.ones(4, 3)
    assert float(uniformity(same)) == pytest.approx(0.0, abs=1e-6)  # collapsed: the maximum
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert float(uniformity(opposite)) == pytest.approx(-8.0, abs=1e-5)  # ||u-v||^2 = 4
    with pytest.raises(ValueError, match="at least 2"):
        uniformity(torch.ones(1, 3))
