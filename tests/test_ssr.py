"""The SSR branch (dmlnb.ssr) and exact pairs: a baseline and an SSR run with one seed share
every random stream outside the SSR branch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import TINY_RUN  # tests/tiny.py

from dmlnb import runs
from dmlnb.config import TrainConfig
from dmlnb.losses import RankingLoss
from dmlnb.ssr import SSRBranch
from dmlnb.train import fit, random_stream

TINY = {**TINY_RUN, "seed": 5}


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, name, **changes):
    return fit({**TINY, "run_dir": str(tmp_path / name), **changes})


def _steps(run_dir):
    return [r for r in runs.read_jsonl(run_dir / runs.METRICS_FILE) if r["kind"] == "step"]


@pytest.mark.parametrize("loss", ["margin", "proxyanchor"])  # margin samples; proxies are drawn
def test_ssr_with_probability_zero_is_the_baseline_bit_for_bit(tmp_path, loss):
    base = _run(tmp_path, "base", loss=loss, ssr=False)
    never = _run(tmp_path, "never", loss=loss, ssr=True, ssr_prob=0.0)
    assert never.metrics == base.metrics
    a = runs.load_run(base.run_dir).embeddings()["embeddings"]
    b = runs.load_run(never.run_dir).embeddings()["embeddings"]
    assert np.array_equal(a, b)
    assert [r["loss"] for r in _steps(base.run_dir)] == [r["loss"] for r in _steps(never.run_dir)]


def test_an_ssr_run_differs_from_its_baseline_only_through_ssr(tmp_path):
    """With BatchNorm frozen the first step's metric loss sees the same batch, the same weights
    and the same loss sampling in both runs, so it is identical; the SSR run adds L_rank."""
    base = _run(tmp_path, "base", ssr=False, freeze_bn=True)
    ssr = _run(tmp_path, "ssr", ssr=True, ssr_prob=1.0, freeze_bn=True)
    first_base, first_ssr = _steps(base.run_dir)[0], _steps(ssr.run_dir)[0]
    assert first_ssr["ssr"] == 1 and first_base["ssr"] == 0
    assert first_ssr["loss_metric"] == first_base["loss_metric"]
    assert first_ssr["loss"] != first_base["loss"]


def test_random_streams_are_independent_and_reproducible():
    a = torch.rand(4, generator=random_stream(0, "ssr-coin"))
    assert torch.equal(a, torch.rand(4, generator=random_stream(0, "ssr-coin")))
    for other in (random_stream(0, "ssr-views"), random_stream(1, "ssr-coin"),
                  random_stream(0, "ssr-coin", rank=1), torch.Generator().manual_seed(0)):
        assert not torch.equal(a, torch.rand(4, generator=other))


def test_branch_draws_m_picks_and_n_views_and_weights_the_loss():
    cfg = TrainConfig(ssr_images=3, ssr_levels=4, ssr_weight=0.5, ssr_prob=1.0)
    branch = SSRBranch.from_config(cfg)
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    draw = branch.draw(images, coin=torch.Generator().manual_seed(1),
                       views=torch.Generator().manual_seed(2))
    assert draw.fire and draw.pick.shape == (3,) and len(set(draw.pick.tolist())) == 3
    assert draw.views.shape == (3, 4, 1, 16, 16)
    x = draw.inputs(images)
    assert x.shape == (8 + 3 * 4, 1, 16, 16) and torch.equal(x[:8], images)
    z = torch.nn.functional.normalize(torch.randn(x.shape[0], 6), dim=1)
    weighted, logged = branch.loss(z, draw, batch=8)
    ref = RankingLoss()(z[draw.pick], z[8:].reshape(3, 4, 6))
    assert torch.allclose(weighted, 0.5 * ref) and torch.allclose(logged["loss_rank"], ref)
    off = SSRBranch.from_config(cfg.replace(ssr=False))
    assert not off.draw(images, torch.Generator(), torch.Generator()).fire
    assert "ssr_unif" not in logged  # the paper's form: no extension term


def test_uniformity_extension_adds_its_term_over_the_batch_originals():
    from dmlnb.losses import uniformity

    cfg = TrainConfig(ssr_images=3, ssr_levels=4, ssr_weight=0.5, ssr_prob=1.0, ssr_uniformity=0.3)
    branch = SSRBranch.from_config(cfg)
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    draw = branch.draw(images, coin=torch.Generator().manual_seed(1),
                       views=torch.Generator().manual_seed(2))
    z = torch.nn.functional.normalize(torch.randn(8 + 12, 6, generator=torch.Generator().manual_seed(3)), dim=1)
    weighted, logged = branch.loss(z, draw, batch=8)
    rank = RankingLoss()(z[draw.pick], z[8:].reshape(3, 4, 6))
    unif = uniformity(z[:8])
    assert torch.allclose(logged["ssr_unif"], unif)
    assert torch.allclose(weighted, 0.5 * (rank + 0.3 * unif))
    # its gradient pushes different originals apart: one step lowers their mean cosine
    u = z[:8].clone().requires_grad_(True)
    uniformity(u).backward()
    moved = torch.nn.functional.normalize(u.detach() - 0.5 * u.grad, dim=1)
    off_diag = ~torch.eye(8, dtype=torch.bool)
    assert (moved @ moved.T)[off_diag].mean() < (z[:8] @ z[:8].T)[off_diag].mean()
    with pytest.raises(ValueError, match="ssr_uniformity"):
        TrainConfig.from_dict({"ssr_uniformity": -1.0})


def test_diagnostics_are_logged_and_change_no_training_number(tmp_path):
    on = _run(tmp_path, "on", ssr=True, ssr_prob=1.0, ssr_diag_every=1, ssr_diag_images=16)
    off = _run(tmp_path, "off", ssr=True, ssr_prob=1.0, ssr_diag_every=0, ssr_diag_images=0)
    assert on.metrics == off.metrics
    steps = _steps(on.run_dir)
    assert all(r["ssr_grad_ratio"] > 0 and -1 <= r["ssr_grad_cos"] <= 1 for r in steps)
    assert not any("ssr_grad_ratio" in r for r in _steps(off.run_dir))
    records = runs.read_jsonl(on.run_dir / runs.METRICS_FILE)
    probes = [r for r in records if r["kind"] == "ssr_diag"]
    assert len(probes) == TINY["epochs"]
    for r in probes:
        assert -1 <= r["view_tau_metric"] <= 1 and -1 <= r["view_tau_ssr"] <= 1
        assert -1 <= r["ssr_cross_cos"] <= 1
        assert {f"ssr_level_sim_{n}" for n in range(1, 5)} <= set(r)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert all(r["rank_sort"] > 0 and r["rank_pos"] >= 0 for r in epochs)
    diag = on.summary["ssr_diagnostics"]
    assert diag["ssr_cross_cos"] == probes[-1]["ssr_cross_cos"]
    assert diag["rank_sort"] == pytest.approx(np.mean([r["rank_sort"] for r in steps]))


def test_gradient_ratio_against_a_hand_computation():
    from dmlnb.ssr import gradient_ratio

    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a = (w * torch.tensor([3.0, 0.0])).sum()  # gradient (3, 0)
    b = (w * torch.tensor([0.0, 4.0])).sum() + (w * torch.tensor([4.0, 0.0])).sum()  # (4, 4)
    out = gradient_ratio(a, b, [w])
    assert out["ssr_grad_ratio"] == pytest.approx(3 / (4 * 2 ** 0.5))
    assert out["ssr_grad_cos"] == pytest.approx(12 / (3 * 4 * 2 ** 0.5))
    assert w.grad is None  # nothing accumulated


def test_probe_cross_cosine_against_a_hand_computation():
    """Two images whose SSR embeddings are fixed by a stub model: cross cosine = their cosine."""
    from dmlnb.ssr import probe

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, ssr=False):
            m = x.flatten(1).mean(1, keepdim=True)
            z = torch.cat([torch.ones_like(m), m], dim=1)
            return z, z

    images = torch.stack([torch.full((1, 8, 8), 0.0), torch.full((1, 8, 8), 1.0)])
    out = probe(Stub(), images, levels=2, families=("color",), sigma=0.2, nested=True, seed=0)
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    assert out["ssr_cross_cos"] == pytest.approx(float(e[0] @ e[1]), abs=1e-6)
