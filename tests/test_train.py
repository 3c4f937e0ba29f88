"""The training engine on the embedded glyphs, with tiny budgets (a few steps each)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny import TINY_RUN  # tests/tiny.py

from dmlnb import experiment as E
from dmlnb import runs
from dmlnb import train as T
from dmlnb.config import TrainConfig
from dmlnb.defaults import RANK_ALPHA, RANK_BETA, RANK_SCALE, SSR_LEVELS
from dmlnb.distributed import resolve_device
from dmlnb.losses import LOSSES

TINY = TINY_RUN


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, **changes) -> TrainConfig:
    d = {**TINY, "runs_root": str(tmp_path / "runs"), **changes}
    return TrainConfig.from_dict(d)


def records(run_dir, kind):
    return [r for r in runs.read_jsonl(run_dir / runs.METRICS_FILE) if r["kind"] == kind]


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_fit_each_loss_with_ssr_writes_a_complete_run(tmp_path, loss):
    cfg = tiny(tmp_path, loss=loss, ssr=True, ssr_prob=1.0)
    result = T.fit(cfg)
    assert result.completed
    rd = result.run_dir
    for name in ("config.json", "metrics.jsonl", "summary.json", "embeddings.npz",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (rd / name).is_file(), name
    assert not list(rd.rglob("*.tmp"))  # atomic writes leave no temp files
    steps = records(rd, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["ssr"] == 1 and math.isfinite(r["loss_rank"]) for r in steps)
    for r in steps:  # L = L_metric + gamma * L_rank, as logged
        assert r["loss"] == pytest.approx(r["loss_metric"] + cfg.ssr_weight * r["loss_rank"],
                                          rel=1e-5, abs=1e-6)
    assert len(records(rd, "val")) == 2 and len(records(rd, "test")) == 1
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["test"] == result.metrics
    assert summary["config"]["loss"] == loss and summary["seed"] == cfg.seed
    for key in ("recall@1", "recall@8", "r_precision", "map@r", "nmi", "f1"):
        assert 0.0 <= result.metrics[key] <= 1.0, key
    emb = runs.load_run(rd).embeddings()
    n_test = 31 * 12
    assert emb["embeddings"].shape == (n_test, cfg.embed_dim)
    assert np.array_equal(emb["indices"], np.arange(n_test))
    assert np.allclose(np.linalg.norm(emb["embeddings"], axis=1), 1.0, atol=1e-4)


def test_fit_without_ssr_never_fires_and_accepts_a_dict(tmp_path):
    d = {**TINY, "runs_root": str(tmp_path / "runs"), "ssr": False, "loss": "multisimilarity",
         "eval_test_each_epoch": True}
    result = T.fit(d)
    curves = records(result.run_dir, "test_curve")  # test curves, marked as such, per epoch
    assert [r["epoch"] for r in curves] == [0, 1] and "map@r" in curves[0]
    steps = records(result.run_dir, "step")
    assert all(r["ssr"] == 0 and r["loss_rank"] is None for r in steps)
    assert all(r["loss"] == pytest.approx(r["loss_metric"]) for r in steps)
    # the SSR head was not trained: its weights are those of the seeded initial model
    model = E.load_model(result.run_dir, which="last")
    init = E.seeded_model(TrainConfig.from_dict(d), in_channels=1)
    for a, b in zip(model.ssr_head.parameters(), init.ssr_head.parameters(), strict=True):
        assert torch.equal(a, b)


def test_ssr_coin_is_per_iteration_at_rate_p(tmp_path):
    p, n = 0.5, 160
    cfg = tiny(tmp_path, ssr_prob=p, image_size=12, batch_size=8, ssr_images=2, ssr_levels=2,
               epochs=2, steps_per_epoch=n // 2, val_split=None, eval_checkpoint="last",
               loss="contrastive", dataset_options={"max_per_class": 28})
    rd = T.fit(cfg).run_dir
    fired = np.array([r["ssr"] for r in records(rd, "step")])
    assert len(fired) == n
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(fired.mean() - p) < 4 * sd  # binomial: fails with probability < 1e-4
    # a fresh coin per iteration: both outcomes occur within every epoch
    for e in range(2):
        part = fired[e * n // 2:(e + 1) * n // 2]
        assert 0 < part.sum() < len(part)
    epochs = records(rd, "epoch")
    assert [r["ssr_rate"] for r in epochs] == pytest.approx(
        [fired[: n // 2].mean(), fired[n // 2:].mean()])


def test_one_backbone_pass_on_originals_and_views(tmp_path, monkeypatch):
    """Each step calls the model once, on B + M N images when SSR fires; the ranking loss gets
    the originals' SSR embeddings of the M picked images as anchors and their own views."""
    sizes = []
    build = E.build_model

    def spy_build(*args, **kwargs):
        model = build(*args, **kwargs)
        forward = model.forward

        def spy(x, ssr=False):
            sizes.append((x.shape[0], ssr))
            return forward(x, ssr=ssr)

        model.forward = spy
        return model

    # identity "views": each view equals its original, so with correct anchors S_n = 1 for all n
    monkeypatch.setattr("dmlnb.ssr.make_views",
                        lambda images, levels, **kw: images.unsqueeze(1).repeat(1, levels, 1, 1, 1))
    monkeypatch.setattr(E, "build_model", spy_build)
    cfg = tiny(tmp_path, ssr_prob=1.0, epochs=1, steps_per_epoch=2, freeze_bn=True,
               ssr_diag_images=0)  # the SSR probe makes passes of its own
    rd = T.fit(cfg).run_dir
    B, M, N = cfg.batch_size, cfg.ssr_images, cfg.ssr_levels
    train_calls = [s for s in sizes if s[1]]
    assert train_calls == [(B + M * N, True)] * 2
    s, a, b = RANK_SCALE, RANK_ALPHA, RANK_BETA
    sort = math.log1p((SSR_LEVELS - 1) * math.exp(s * a)) / s  # S_{n+1} - S_n = 0
    pos = math.log1p(SSR_LEVELS * math.exp(-s * (1 - b))) / s  # S_n = 1
    for r in records(rd, "step"):
        assert r["rank_sort"] == pytest.approx(sort, rel=1e-4)
        assert r["rank_pos"] == pytest.approx(pos, rel=1e-4)


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a = T.fit(tiny(tmp_path / "a", seed=3, augment=True))
    b = T.fit(tiny(tmp_path / "b", seed=3, augment=True))
    c = T.fit(tiny(tmp_path / "c", seed=4, augment=True))
    assert a.metrics == b.metrics
    la = [r["loss"] for r in records(a.run_dir, "step")]
    assert la == [r["loss"] for r in records(b.run_dir, "step")]
    assert la != [r["loss"] for r in records(c.run_dir, "step")]
    state = torch.random.get_rng_state()
    T.fit(tiny(tmp_path / "d", seed=5, augment=True))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, stop):
    """Mid-epoch (1, 3) and at an epoch boundary (2), with random augmentation and SSR."""
    common = dict(augment=True, ssr_prob=0.5, loss="margin", epochs=2, steps_per_epoch=2)
    full = T.fit(tiny(tmp_path / "full", **common, run_dir=str(tmp_path / "full_run")))
    cut = tiny(tmp_path / "cut", **common, run_dir=str(tmp_path / "cut_run"))
    part = T.fit(cut, stop_after_steps=stop)
    assert not part.completed and part.metrics == {}
    assert runs.checkpoint_path(part.run_dir, "last").is_file()
    assert not (part.run_dir / "summary.json").exists()
    done = T.fit(cut.replace(resume=True))
    assert done.completed
    assert done.metrics == full.metrics
    strip = ("step_s", "data_s", "time_s", "cpu_s", "images_per_s")

    def clean(rd):
        return [{k: v for k, v in r.items() if k not in strip}
                for r in runs.read_jsonl(rd / runs.METRICS_FILE)]

    assert clean(done.run_dir) == clean(full.run_dir)
    # resuming a finished run returns its result without training again
    again = T.fit(cut.replace(resume=True))
    assert again.metrics == full.metrics


def test_existing_run_dir_is_never_overwritten(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "notes.txt").write_text("mine")
    with pytest.raises(runs.RunExistsError, match="already exists"):
        T.fit(tiny(tmp_path, run_dir=str(rd)))
    assert [p.name for p in rd.iterdir()] == ["notes.txt"]


def test_resume_refuses_a_different_config(tmp_path):
    cfg = tiny(tmp_path, run_dir=str(tmp_path / "run"))
    T.fit(cfg, stop_after_steps=1)
    with pytest.raises(ValueError, match="ssr_weight"):
        T.fit(cfg.replace(resume=True, ssr_weight=0.1))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    build = E.build_metric_loss

    class Poisoned(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x, y):
            self.calls += 1
            out = self.inner(x, y)
            return out * float("nan") if self.calls == 3 else out

    monkeypatch.setattr(E, "build_metric_loss", lambda *a, **k: Poisoned(build(*a, **k)))
    cfg = tiny(tmp_path, run_dir=str(tmp_path / "run"))
    with pytest.raises(FloatingPointError, match=r"loss became nan at epoch 1, step 3.*last good"):
        T.fit(cfg)
    rd = tmp_path / "run"
    state = runs.load_checkpoint(runs.checkpoint_path(rd, "last"))
    assert state["step"] == 2 and state["epoch"] == 1  # the end of epoch 0: the last good one
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    errors = records(rd, "error")
    assert len(errors) == 1 and "nan" in errors[0]["error"]
    assert not (rd / "summary.json").exists()


def test_load_model_and_evaluate_run_reproduce_the_final_test(tmp_path):
    result = T.fit(tiny(tmp_path, loss="triplet"))
    model = E.load_model(result.run_dir)
    run = runs.load_run(result.run_dir)
    ds = E.load_split(run.train_config(), "test", train=False)
    got = E.embed(model, ds, batch_size=100)
    saved = run.embeddings()
    assert np.allclose(got["embeddings"], saved["embeddings"], atol=1e-5)
    assert np.array_equal(got["labels"], saved["labels"])
    again = E.evaluate_run(result.run_dir)
    for k, v in result.metrics.items():
        assert again[k] == pytest.approx(v, abs=1e-6), k


def test_schedules():
    cfg = TrainConfig(schedule="step", lr_milestones=(0.5,), lr_decay=0.1)
    f = T._lr_factor(cfg, 10)
    assert [f(s) for s in (0, 4, 5, 9)] == pytest.approx([1, 1, 0.1, 0.1])
    cfg = TrainConfig(schedule="cosine", warmup_steps=2)
    f = T._lr_factor(cfg, 10)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert T._lr_factor(TrainConfig(schedule="none"), 10)(7) == 1.0


def test_param_groups_use_head_multiplier_and_loss_rate(tmp_path):
    cfg = tiny(tmp_path, loss="margin", lr=1e-3, head_lr_mult=10.0)
    model = E.build_model(cfg, in_channels=1)
    loss = E.build_metric_loss(cfg, num_classes=25, generator=torch.Generator())
    groups = {g["name"]: g for g in T.param_groups(cfg, model, loss)}
    assert groups["backbone"]["lr"] == 1e-3 and groups["heads"]["lr"] == pytest.approx(1e-2)
    assert len(groups) == 3  # + margin's beta at its own rate
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids))
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(groups["backbone"]["params"]) + len(groups["heads"]["params"]) == n_trainable


def test_devices_and_amp_fallback(tmp_path):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.warns(UserWarning, match="amp='bf16' applies on CUDA only"):
            trainer = T.Trainer(tiny(tmp_path, amp="bf16"), None)
        assert trainer.amp == "none"


def test_resume_after_a_crash_before_the_first_checkpoint_starts_over(tmp_path, monkeypatch):
    rd = tmp_path / "run"
    build = E.build_metric_loss

    def crash(*a, **k):
        loss = build(*a, **k)
        forward = loss.forward

        def boom(x, y, **kw):
            if boom.calls == 1:
                raise KeyboardInterrupt
            boom.calls += 1
            return forward(x, y, **kw)

        boom.calls = 0
        loss.forward = boom
        return loss

    monkeypatch.setattr(E, "build_metric_loss", crash)
    cfg = tiny(tmp_path, run_dir=str(rd), epochs=1)
    with pytest.raises(KeyboardInterrupt):
        T.fit(cfg)
    assert len(records(rd, "step")) == 1 and not runs.checkpoint_path(rd, "last").exists()
    monkeypatch.undo()
    done = T.fit(cfg.replace(resume=True))
    assert [r["step"] for r in records(rd, "step")] == [1, 2]
    assert done.metrics == T.fit(tiny(tmp_path / "ref", epochs=1)).metrics
