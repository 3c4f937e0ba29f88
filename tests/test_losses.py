"""The DML losses' interface (registry, build_loss, param_groups, stats) and their edge cases.

Values against loop references and pytorch-metric-learning: tests/test_losses_reference.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmlnb import defaults
from dmlnb.losses import LOSSES, MarginLoss, ProxyAnchorLoss, build_loss, loss_params

NAMES = ["margin", "triplet", "contrastive", "multisimilarity", "proxyanchor"]
DIM = 8
NEEDS_BOTH = ["margin", "triplet", "multisimilarity"]  # zero without positives or negatives


def make(name, **kw):
    if name == "proxyanchor":
        kw = {"num_classes": 8, "embed_dim": DIM, **kw}
    return build_loss(name, **kw)


def emb(n, seed=0, dtype=torch.float32, dim=DIM):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1).to(dtype).requires_grad_()


def assert_zero_with_grad(value, *leaves):
    assert value.dim() == 0
    assert float(value.detach()) == 0.0
    value.backward()
    for leaf in leaves:
        assert leaf.grad is not None, "no gradient path"
        assert bool(torch.isfinite(leaf.grad).all())
        assert float(leaf.grad.abs().max()) == 0.0


# ----------------------------------------------------------------------------- registry, building
def test_registry_holds_exactly_the_five_losses():
    assert list(LOSSES) == NAMES
    for name in NAMES:
        assert isinstance(make(name), nn.Module)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="name='arcface'.*'margin'.*'proxyanchor'"):
        build_loss("arcface")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match="'temperature'.*valid parameters.*margin, beta"):
        build_loss("margin", temperature=0.1)
    with pytest.raises(ValueError, match="'alpha'.*pos_margin, neg_margin"):
        build_loss("contrastive", alpha=2.0)


def test_missing_required_parameters_are_named():
    with pytest.raises(ValueError, match="num_classes, embed_dim"):
        build_loss("proxyanchor")


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("margin", {"margin": -0.1}, "margin=-0.1"),
        ("margin", {"cutoff": 2.5}, "cutoff"),
        ("margin", {"nonzero_loss_cutoff": 0.3}, "nonzero_loss_cutoff"),
        ("margin", {"num_classes": 0}, "num_classes"),
        ("triplet", {"margin": 0.0}, "margin"),
        ("contrastive", {"neg_margin": -1.0}, "neg_margin"),
        ("multisimilarity", {"alpha": 0.0}, "alpha"),
        ("multisimilarity", {"base": 2.0}, "base"),
        ("proxyanchor", {"alpha": -1.0}, "alpha"),
    ],
)
def test_bad_values_raise_naming_the_parameter(name, kw, match):
    with pytest.raises(ValueError, match=match):
        make(name, **kw)


def test_bad_types_raise_type_errors():
    with pytest.raises(TypeError, match="margin"):
        build_loss("triplet", margin="0.2")
    with pytest.raises(TypeError, match="generator"):
        build_loss("margin", generator="seed")
    with pytest.raises(TypeError, match="learn_beta"):
        build_loss("margin", learn_beta=1)


def test_defaults_come_from_defaults_module():
    m = build_loss("margin")
    assert (m.margin, float(m.beta.detach()), m.nu, m.cutoff) == (
        defaults.MARGIN_MARGIN,
        pytest.approx(defaults.MARGIN_BETA),
        defaults.MARGIN_NU,
        defaults.MARGIN_CUTOFF,
    )
    assert m.nonzero_loss_cutoff is defaults.MARGIN_NONZERO_LOSS_CUTOFF
    assert build_loss("triplet").margin == defaults.TRIPLET_MARGIN
    c = build_loss("contrastive")
    assert (c.pos_margin, c.neg_margin) == (
        defaults.CONTRASTIVE_POS_MARGIN,
        defaults.CONTRASTIVE_NEG_MARGIN,
    )
    ms = build_loss("multisimilarity")
    assert (ms.alpha, ms.beta, ms.base, ms.epsilon) == (
        defaults.MS_ALPHA,
        defaults.MS_BETA,
        defaults.MS_BASE,
        defaults.MS_EPSILON,
    )
    pa = make("proxyanchor")
    assert (pa.alpha, pa.delta, pa.lr_mult) == (
        defaults.PA_ALPHA,
        defaults.PA_DELTA,
        defaults.PA_LR_MULT,
    )


def test_every_loss_accepts_a_generator_at_build_and_call_time():
    g = torch.Generator().manual_seed(0)
    x, y = emb(8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for name in NAMES:
        assert "generator" in loss_params(name)
        loss = make(name, generator=g)
        assert torch.isfinite(loss(x, y, generator=torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------- param_groups, stats
def test_param_groups():
    assert build_loss("triplet").param_groups(1e-4) == []
    assert build_loss("contrastive").param_groups(1e-4) == []
    assert build_loss("multisimilarity").param_groups(1e-4) == []
    (group,) = build_loss("margin").param_groups(1e-4)
    assert group["lr"] == defaults.MARGIN_BETA_LR
    assert group["params"][0].shape == (1,) and group["params"][0].requires_grad
    assert build_loss("margin", learn_beta=False).param_groups(1e-4) == []
    per_class = build_loss("margin", num_classes=5)
    assert per_class.param_groups(1e-4)[0]["params"][0].shape == (5,)
    pa = make("proxyanchor")
    (group,) = pa.param_groups(2e-4)
    assert group["params"][0] is pa.proxies
    assert group["lr"] == pytest.approx(defaults.PA_LR_MULT * 2e-4)
    # groups are plain optimiser dicts (building an optimiser here would import torch._dynamo, ~10 s)
    assert set(group) == {"params", "lr", "name"} and isinstance(group["params"], list)


@pytest.mark.parametrize("name", NAMES)
def test_last_stats_are_floats_of_the_last_forward(name):
    loss = make(name)
    assert loss.last_stats == {}
    x, y = emb(12, seed=1), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    loss(x, y)
    stats = loss.last_stats
    assert stats and all(isinstance(v, float) for v in stats.values())
    if "pos_loss" in stats and name != "margin":
        # the parts add up to the loss (margin adds its beta regulariser, 0 by default)
        assert stats["pos_loss"] + stats["neg_loss"] == pytest.approx(
            float(loss(x, y).detach()), rel=1e-5
        )


def test_margin_stats_add_up():
    loss = MarginLoss(nu=0.05)
    x, y = emb(12, seed=1), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    value = float(loss(x, y).detach())
    s = loss.last_stats
    assert s["pos_loss"] + s["neg_loss"] + s["beta_reg"] == pytest.approx(value, rel=1e-5)
    assert s["triplets"] == 12 * 2  # every positive pair once


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("name", NEEDS_BOTH)
@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 5], [2, 2, 2, 2, 2, 2]])
def test_no_positives_or_no_negatives_gives_zero_with_grad(name, labels):
    loss = make(name)
    x = emb(len(labels))
    assert_zero_with_grad(loss(x, torch.tensor(labels)), x, *loss.parameters())


@pytest.mark.parametrize("name", ["contrastive", "proxyanchor"])
@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 5], [2, 2, 2, 2, 2, 2]])
def test_one_sided_batches_stay_finite_for_pair_and_proxy_losses(name, labels):
    loss = make(name)
    x = emb(len(labels))
    value = loss(x, torch.tensor(labels))
    value.backward()
    assert torch.isfinite(value) and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_sample_batches(name, n):
    loss = make(name)
    x = emb(n)
    value = loss(x, torch.zeros(n, dtype=torch.long))
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value)
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    if name != "proxyanchor" and name != "contrastive":
        assert float(value.detach()) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_duplicate_embeddings_stay_finite(name):
    base = emb(6, seed=2).detach()
    x = torch.cat([base, base[:3], base[:1]]).requires_grad_()  # exact duplicates, in/out of class
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0, 1, 3])
    loss = make(name)
    value = loss(x, y)
    value.backward()
    assert torch.isfinite(value) and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("name", NAMES)
def test_all_identical_embeddings_stay_finite(name):
    x = emb(1).detach().repeat(8, 1).requires_grad_()
    loss = make(name)
    value = loss(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    value.backward()
    assert torch.isfinite(value) and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("name", NAMES)
def test_unnormalised_and_large_inputs_stay_finite(name):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(12, DIM, generator=g) * 30).requires_grad_()
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 5])
    value = make(name)(x, y)
    value.backward()
    assert torch.isfinite(value) and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_under_autocast_stays_finite_and_close(name, dtype):
    g = torch.Generator().manual_seed(4)
    head = nn.Linear(16, DIM)
    with torch.no_grad():
        head.weight.copy_(torch.randn(DIM, 16, generator=g) * 0.3)
    inp = torch.randn(16, 16, generator=g)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5])
    loss = make(name)
    with torch.autocast("cpu", dtype=dtype):
        x = F.normalize(head(inp), dim=1).to(dtype)  # half-precision embeddings
        value = loss(x, y)
    value.backward()
    assert value.dtype == torch.float32
    assert torch.isfinite(value) and bool(torch.isfinite(head.weight.grad).all())
    # same triplets and masks up to rounding: the value is near the float32 one
    ref = make(name)(x.detach().float(), y)
    assert float(value.detach()) == pytest.approx(float(ref.detach()), abs=0.05, rel=0.05)


def test_float64_stays_float64():
    x, y = emb(8, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for name in NAMES:
        assert make(name)(x, y).dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise(name):
    loss = make(name)
    with pytest.raises(ValueError, match="embeddings"):
        loss(torch.randn(4, DIM, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.randn(4, DIM), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        loss(torch.randn(4, DIM), torch.zeros(4))


def test_label_range_checked_where_labels_index_parameters():
    with pytest.raises(ValueError, match="num_classes=8"):
        make("proxyanchor")(emb(4), torch.tensor([0, 1, 2, 8]))
    with pytest.raises(ValueError, match="embed_dim"):
        make("proxyanchor")(emb(4, dim=5), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes=3"):
        MarginLoss(num_classes=3)(emb(4), torch.tensor([0, 0, 3, 3]))


def test_proxyanchor_proxies_follow_the_input_device_and_dtype():
    loss = ProxyAnchorLoss(4, DIM).double()
    assert loss.proxies.dtype == torch.float64
    value = loss(emb(6).float(), torch.tensor([0, 0, 1, 1, 2, 3]))
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_margin_upper_cutoff_excludes_far_negatives():
    x, y = emb(12, seed=5), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    loss = MarginLoss(nonzero_loss_cutoff=1.4)
    probs = loss.sampling_probabilities(x, y)
    d = torch.cdist(x.detach(), x.detach())
    assert bool((probs[d >= 1.4 + 1e-6] == 0).all())
    assert torch.allclose(probs.sum(dim=1), torch.ones(12))


def test_margin_learnable_beta_moves():
    x, y = emb(12, seed=6), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    loss = MarginLoss(beta=0.2)  # far too small: the negative term dominates and pushes beta up
    loss(x, y).backward()
    assert float(loss.beta.grad) < 0


def test_large_global_batch_runs():
    """A DDP-sized global batch (8 x 120): vectorised, bounded memory."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(960, 64, generator=g), dim=1).requires_grad_()
    y = torch.arange(240).repeat_interleave(4)
    for name in NAMES:
        kw = {"num_classes": 240, "embed_dim": 64} if name == "proxyanchor" else {}
        value = build_loss(name, **kw)(x, y)
        value.backward()
        assert torch.isfinite(value)
