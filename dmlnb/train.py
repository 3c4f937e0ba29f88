"""``fit(config)``: train an embedding with ``L = L_metric + gamma * L_rank`` and evaluate it.

The loop: optimisation (AdamW with parameter groups, a per-iteration schedule), checkpoints,
resume, the NaN guard and logging. The paper's method itself (the coin, the picks, the views and
``L_rank``) is :class:`dmlnb.ssr.SSRBranch`; the parts built from a config (data, model, losses,
the embedding pass) come from :mod:`dmlnb.experiment`; processes and devices from
:mod:`dmlnb.distributed`; the run directory from :mod:`dmlnb.runs`.

One iteration::

    draw   <- ssr.draw(x)                          coin, M picks, N views (when the coin fires)
    z, z'  <- model(draw.inputs(x))                ONE backbone pass, B (+ M N) images
    L      = L_metric(z[:B], y) [+ gamma L_rank(z')]
    one backward of L, one AdamW step, one scheduler step

Everything random comes from ``config.seed``, one stream per job (:func:`random_stream`): the
loss's sampling, the SSR coin, the SSR picks and views; the class-balanced sampler from
``(seed, epoch)``. So a baseline and an SSR run with one seed differ only through SSR. Two
places need torch's global generator (module initialisers and the per-image augmentation
pipeline take none): they run under :func:`torch.random.fork_rng` seeded from the run, which
restores the caller's global state afterwards. So the same seed on the CPU gives the same
metrics, and a run interrupted and resumed from its last checkpoint gives the same metrics as an
uninterrupted one.

Everything that can be checked is checked before the run directory exists: the config, the
registries, the data (its options, root and batch layout) and the model (weights available).
The run directory is locked for the whole run (:func:`dmlnb.runs.lock_run_dir`), so a second
process on the same run is refused. Model selection is on the class-disjoint validation split
(never on the test classes); the test split is evaluated once at the end, with the best
validation checkpoint (``eval_checkpoint="best"``, default) or the last one. Under ``torchrun``
the metric loss sees the global batch (embeddings and labels all-gathered, the local part keeping
its gradient); only rank 0 writes the run directory.
"""

from __future__ import annotations

import math
import platform
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dmlnb import experiment, runs
from dmlnb.config import TrainConfig
from dmlnb.distributed import (
    ProcessGroup,
    all_reduce_mean,
    autocast,
    average_loss_gradients,
    gather_labels,
    gather_with_grad,
    resolve_device,
    setup_distributed,
)
from dmlnb.ssr import SSRBranch, gradient_ratio, probe, ssr_head_parameters

__all__ = ["FitResult", "Trainer", "fit", "fit_or_reuse", "param_groups"]

RESUMABLE_CHANGES = frozenset(
    {"resume", "quiet", "device", "num_workers", "run_dir", "runs_root", "eval_batch_size",
     "log_every"}
)  # fields that may differ between a run's config.json and the config that resumes it


@dataclass
class FitResult:
    """What :func:`fit` returns: the run directory and the final test metrics.

    ``completed`` is false when the run stopped early on purpose (``stop_after_steps``); the run
    directory then holds a checkpoint to resume from, and ``metrics`` is empty. Under
    ``torchrun`` only rank 0 evaluates: the other ranks get empty ``metrics``.
    """

    run_dir: Path
    metrics: dict[str, float]
    best_epoch: int | None = None
    completed: bool = True
    summary: dict[str, Any] = field(default_factory=dict, repr=False)


# --- random streams and batches ------------------------------------------------------------------
def random_stream(seed: int, name: str, rank: int = 0) -> torch.Generator:
    """An independent ``torch.Generator`` for the job ``name`` of a run with ``seed`` (and of
    process ``rank``): seeded from ``numpy.random.SeedSequence([seed, crc32(name), rank])``."""
    import zlib

    state = np.random.SeedSequence([seed, zlib.crc32(name.encode()), rank]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class _EpochBatches(torch.utils.data.Sampler):
    """The batches of one epoch of the class-balanced sampler, from batch ``skip`` on, capped at
    ``limit`` batches; with ``seeds`` each index comes paired with a per-image seed drawn from
    ``(run seed, epoch)`` (see :class:`~dmlnb.experiment.SeededDataset`)."""

    def __init__(self, sampler, epoch: int, skip: int, limit: int, seeds: bool, seed: int):
        self.sampler, self.epoch, self.skip, self.limit = sampler, epoch, skip, limit
        self.seeds, self.seed = seeds, seed

    def __len__(self) -> int:
        return max(0, self.limit - self.skip)

    def __iter__(self) -> Iterator[list]:
        self.sampler.set_epoch(self.epoch)
        rng = np.random.default_rng([self.seed, self.epoch, 0x5EED])
        for i, batch in enumerate(self.sampler):
            if i >= self.limit:
                break
            draws = rng.integers(0, 2**62, size=len(batch)) if self.seeds else None
            if i < self.skip:
                continue
            yield [(int(j), int(s)) for j, s in zip(batch, draws, strict=True)] if self.seeds else list(batch)


def _make_sampler(cfg: TrainConfig, labels: np.ndarray, d: ProcessGroup):
    from dmlnb.data.sampler import ClassBalancedBatchSampler

    try:
        return ClassBalancedBatchSampler(
            labels, cfg.classes_per_batch, cfg.samples_per_class, seed=cfg.seed,
            num_replicas=d.world_size, rank=d.rank,
        )
    except ValueError as err:  # say it in the config's words
        n = len(np.unique(labels))
        if cfg.classes_per_batch % d.world_size:
            raise ValueError(f"batch_size / samples_per_class = {cfg.classes_per_batch} classes "
                             f"per batch must be divisible by the {d.world_size} processes") from None
        raise ValueError(
            f"batch_size={cfg.batch_size} with samples_per_class={cfg.samples_per_class} asks for "
            f"{cfg.classes_per_batch} distinct classes per batch, but the {cfg.train_split!r} "
            f"split of {cfg.dataset!r} cannot fill one ({n} classes); lower batch_size to at "
            f"most {n * cfg.samples_per_class} (or samples_per_class)"
        ) from err


# --- optimiser -----------------------------------------------------------------------------------
def param_groups(cfg: TrainConfig, model: nn.Module, loss: nn.Module) -> list[dict]:
    """Backbone at ``lr``, heads at ``lr * head_lr_mult``, loss parameters at the loss's rate."""
    groups = []
    backbone = [p for p in model.backbone_parameters() if p.requires_grad]
    heads = [p for p in model.head_parameters() if p.requires_grad]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr, "name": "backbone"})
    if heads:
        groups.append({"params": heads, "lr": cfg.lr * cfg.head_lr_mult, "name": "heads"})
    if hasattr(loss, "param_groups"):
        for i, g in enumerate(loss.param_groups(cfg.lr)):
            g = dict(g)
            g.setdefault("name", f"loss{i}")
            g["params"] = [p for p in g["params"] if p.requires_grad]
            if g["params"]:
                groups.append(g)
    return groups


def _lr_factor(cfg: TrainConfig, total_steps: int):
    """Multiplier of the base rates at global step ``s`` (0-based): linear warm-up, then
    ``"step"`` (x ``lr_decay`` at each milestone fraction of the run), ``"cosine"`` (to 0) or
    ``"none"``."""
    milestones = sorted(int(round(m * total_steps)) for m in cfg.lr_milestones)
    warm = cfg.warmup_steps

    def factor(s: int) -> float:
        w = min(1.0, (s + 1) / warm) if warm else 1.0
        if cfg.schedule == "step":
            return w * cfg.lr_decay ** sum(s >= m for m in milestones)
        if cfg.schedule == "cosine":
            t = min(1.0, max(0, s - warm) / max(1, total_steps - warm))
            return w * 0.5 * (1.0 + math.cos(math.pi * t))
        return w

    return factor


# --- the run --------------------------------------------------------------------------------------
_VECTOR_ISAS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))  # widest first


def cpu_model_from(cpuinfo: str) -> str | None:
    """The model name in a ``/proc/cpuinfo`` text, with the widest x86 vector extension its
    ``flags`` list, e.g. ``"AMD EPYC (AVX-512)"``; None without a model name."""
    name = flags = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and name is None:
            name = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    if not name:
        return None
    isa = next((label for flag, label in _VECTOR_ISAS if flags and flag in flags), None)
    return f"{name} ({isa})" if isa else name


def cpu_model() -> str:
    """The CPU's model name and widest vector extension (:func:`cpu_model_from` of
    ``/proc/cpuinfo``; else the platform's processor or machine name).

    Recorded with every run: the same seed gives the same numbers on one CPU model, but another
    model (other BLAS and convolution kernels) rounds differently, and training drifts apart.
    Virtual machines often show a bare family name ("AMD EPYC") for several generations, whose
    libraries pick other kernels by vector width (OpenBLAS: AVX2 or AVX-512 ones), hence the
    extension in the name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            found = cpu_model_from(f.read())
        if found:
            return found
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def _versions() -> dict[str, str]:
    import dmlnb

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "dmlnb": dmlnb.__version__, "cpu": cpu_model()}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _resume_problems(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    now = cfg.to_dict()
    return [f"{k}: run has {saved.get(k)!r}, given {now[k]!r}" for k in sorted(now)
            if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]


def _check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig, run_dir: Path) -> None:
    differ = _resume_problems(saved, cfg)
    if differ:
        raise ValueError(
            f"resume=True but the config differs from the run in {str(run_dir)!r} in "
            f"{', '.join(differ)}; resume with the run's own config (or only change: "
            f"{', '.join(sorted(RESUMABLE_CHANGES))}), or start a new run (run_dir=None)"
        )


class Trainer:
    """State of one :func:`fit` call; the public surface is :func:`fit`."""

    def __init__(self, cfg: TrainConfig, stop_after_steps: int | None):
        self.cfg = cfg
        self.stop_after_steps = stop_after_steps
        self.d = setup_distributed(cfg.device)
        if self.d.active and cfg.device in ("auto", "cuda") and torch.cuda.is_available():
            self.device = torch.device("cuda", self.d.local_rank)
        else:
            self.device = resolve_device(cfg.device)
        self.amp = cfg.amp
        if self.amp != "none" and self.device.type != "cuda":
            warnings.warn(f"amp={cfg.amp!r} applies on CUDA only; running in float32 on "
                          f"{self.device.type}", stacklevel=3)
            self.amp = "none"
        self.quiet = cfg.quiet or not self.d.main
        self.lock = None
        self.finished_summary: dict[str, Any] | None = None

    # -- set-up --
    def setup(self) -> None:
        cfg, d = self.cfg, self.d
        # 1. an existing run: refuse a changed config (finished or not) before anything else
        existing = Path(cfg.run_dir) if cfg.run_dir is not None else None
        if existing is not None and runs.is_run(existing):
            if not cfg.resume:
                runs.refuse_existing(existing)
            run = runs.load_run(existing)
            _check_resume_config(run.config, cfg, existing)
            if run.finished:
                self.run_dir, self.finished_summary = existing, run.summary
                return
        elif existing is not None:
            runs.check_new_run_dir(existing, cfg.resume)

        # 2. build everything from the config; nothing is written yet, so a refusal here
        #    leaves nothing that blocks the corrected command
        self._build()

        # 3. the run directory: rank 0 makes and locks it, the others learn its path
        path = None
        if d.main:
            run_dir = runs.create_run_dir(cfg)
            self.lock = runs.lock_run_dir(run_dir)
            path = str(run_dir)
        if d.active:
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
        self.run_dir = Path(path)
        self.ckpt_last = runs.checkpoint_path(self.run_dir, "last")
        self.ckpt_best = runs.checkpoint_path(self.run_dir, "best")
        resuming = self.ckpt_last.exists()
        if d.main:
            runs.remove_stale_temporaries(self.run_dir)
            if runs.is_run(self.run_dir):  # another process may have finished it meanwhile
                run = runs.load_run(self.run_dir)
                _check_resume_config(run.config, cfg, self.run_dir)
                if run.finished:
                    self.finished_summary = run.summary
                    return
            else:  # config.json is written once, at the start (resume keeps the original)
                runs.write_json(self.run_dir / runs.CONFIG_FILE,
                                {**cfg.to_dict(), "run_dir": str(self.run_dir)})
            if not resuming:  # a run that stopped before its first checkpoint starts afresh
                runs.truncate_metrics(self.run_dir, 0)
        if resuming:
            self._restore(runs.load_checkpoint(self.ckpt_last, map_location=self.device))

    def _probe_images(self) -> torch.Tensor | None:
        """A fixed batch of validation images (training images without a validation split) for
        the SSR diagnostics of :func:`dmlnb.ssr.probe`, chosen from the seed."""
        n = self.cfg.ssr_diag_images
        ds = self.val_ds if self.val_ds is not None else self.train_ds
        if not n or ds is None:
            return None
        rng = np.random.default_rng([self.cfg.seed, 0xD1A6])
        idx = np.sort(rng.choice(len(ds), size=min(n, len(ds)), replace=False))
        seeded = isinstance(ds, experiment.SeededDataset)  # augmented: one fixed draw per image
        return torch.stack([torch.as_tensor(ds[(int(i), self.cfg.seed) if seeded else int(i)][0])
                            for i in idx])

    def _build(self) -> None:
        cfg, d = self.cfg, self.d
        # one random stream per job, so that a baseline and an SSR run with one seed draw the
        # same numbers everywhere outside the SSR branch (ssr_prob=0 is the baseline exactly):
        # the loss's sampling (`gen`, shared by all ranks: they sample the same global
        # triplets), the SSR coin (shared: all ranks fire together) and the SSR picks and views
        # (the rank's own). Data order, augmentation and initialisation have streams of their
        # own (the sampler, SeededDataset and seeded_model, all from `seed`).
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.gen_coin = random_stream(cfg.seed, "ssr-coin")
        self.gen_views = random_stream(cfg.seed, "ssr-views", d.rank)

        # data
        self.train_ds = experiment.load_split(cfg, cfg.train_split, train=True)
        self.val_ds = (experiment.load_split(cfg, cfg.val_split, train=False)
                       if cfg.val_split else None)
        self.test_ds = None
        self.probe_images = self._probe_images()
        labels = np.asarray(self.train_ds.labels)
        self.num_classes = int(labels.max()) + 1
        self.in_channels = int(getattr(self.train_ds, "channels", self.train_ds[0][0].shape[0]))
        self.sampler = _make_sampler(cfg, labels, d)
        self.batches_per_epoch = len(self.sampler)
        if cfg.steps_per_epoch is not None:
            self.batches_per_epoch = min(self.batches_per_epoch, cfg.steps_per_epoch)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the {cfg.train_split!r} split of {cfg.dataset!r} gives no batch of "
                f"batch_size={cfg.batch_size} images ({cfg.batch_size // cfg.samples_per_class} "
                f"classes x samples_per_class={cfg.samples_per_class}); lower batch_size"
            )
        self.total_steps = cfg.epochs * self.batches_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        # model, losses, optimiser, schedule
        model = experiment.seeded_model(cfg, self.in_channels).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if not cfg.ssr:
            for p in ssr_head_parameters(model):
                p.requires_grad_(False)
        self.model = model
        self.metric_loss = experiment.build_metric_loss(
            cfg, self.num_classes, self.gen).to(self.device)
        self.ssr = SSRBranch.from_config(cfg, world_size=d.world_size).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(cfg, model, self.metric_loss),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.ddp = model
        if d.active:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        # progress state
        self.epoch, self.step, self.step_in_epoch = 0, 0, 0
        self.best_value, self.best_epoch = -math.inf, None
        self.elapsed = 0.0
        self.sums = _empty_sums()

    # -- checkpoints --
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "metric_loss": self.metric_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.gen.get_state(),
            "generator_ssr_coin": self.gen_coin.get_state(),
            "generator_ssr_views": self.gen_views.get_state(),
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "best_value": self.best_value, "best_epoch": self.best_epoch,
            "elapsed": self.elapsed + (time.perf_counter() - self.t0),
            "epoch_sums": dict(self.sums),
            "in_channels": self.in_channels, "world_size": self.d.world_size,
        }

    def _restore(self, s: dict[str, Any]) -> None:
        if int(s["world_size"]) != self.d.world_size:
            raise ValueError(f"the checkpoint in {str(self.run_dir)!r} was written by "
                             f"{s['world_size']} processes; resume with as many")
        self.model.load_state_dict(s["model"])
        self.metric_loss.load_state_dict(s["metric_loss"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        self.gen.set_state(s["generator"])
        self.gen_coin.set_state(s["generator_ssr_coin"])
        self.gen_views.set_state(s["generator_ssr_views"])
        self.epoch, self.step = int(s["epoch"]), int(s["step"])
        self.step_in_epoch = int(s["step_in_epoch"])
        self.best_value = float(s["best_value"])
        self.best_epoch = None if s["best_epoch"] is None else int(s["best_epoch"])
        self.elapsed = float(s["elapsed"])
        self.sums = {k: (int(v) if k in ("fired", "n") else float(v))
                     for k, v in s["epoch_sums"].items()}
        if self.d.main:
            runs.truncate_metrics(self.run_dir, self.step)

    def _save_last(self) -> None:
        if self.d.main:
            runs.save_checkpoint(self.ckpt_last, self._state())

    # -- logging --
    def _log(self, record: dict[str, Any]) -> None:
        if self.d.main:
            runs.append_jsonl(self.run_dir / runs.METRICS_FILE, record)

    # -- one iteration --
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        cfg = self.cfg
        B = images.shape[0]
        draw = self.ssr.draw(images, coin=self.gen_coin, views=self.gen_views)
        x = draw.inputs(images)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # in DDP the SSR head runs every step (a zero term when the coin says no), so that
        # every parameter gets a gradient on every rank
        want_ssr = draw.fire or (cfg.ssr and self.d.active)
        with autocast(self.device, self.amp):
            z, zs = experiment.forward(self.ddp, x, want_ssr)
            z_all = gather_with_grad(z[:B])
            y_all = gather_labels(labels)
            loss_metric = self.metric_loss(z_all.float(), y_all)
            loss = loss_metric
            out = {"fired": draw.fire, "global_batch": int(z_all.shape[0])}
            if draw.fire:
                loss_ssr, parts = self.ssr.loss(zs, draw, B)
                loss = loss + loss_ssr
                out.update(parts)
                every = cfg.ssr_diag_every
                if every and (self.step + 1) % every == 0 and not self.d.active:
                    out.update(gradient_ratio(loss_ssr, loss_metric,
                                              self.model.backbone_parameters()))
            elif want_ssr:
                loss = loss + 0.0 * zs.sum()
        out.update(loss=loss.detach(), loss_metric=loss_metric.detach())
        value = float(all_reduce_mean(loss.detach(), self.d))
        if not math.isfinite(value):
            kept = (f"the last good checkpoint is kept: {self.ckpt_last}"
                    if self.ckpt_last.exists() else "no checkpoint had been written yet")
            msg = (f"the loss became {value} at epoch {self.epoch}, step {self.step + 1} "
                   f"(metric loss {float(loss_metric.detach()):.4g}"
                   + (f", ranking loss {float(out['loss_rank']):.4g}" if draw.fire else "")
                   + f"); training stopped before the update, {kept}. Lower lr (or check "
                   f"the data), then start again or continue with resume=True")
            self._log({"kind": "error", "epoch": self.epoch, "step": self.step + 1,
                       "error": msg})
            raise FloatingPointError(msg)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.d.active:
            average_loss_gradients(self.metric_loss, self.d.world_size)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        out["loss"] = value
        return out

    # -- evaluation --
    def _embed(self, ds, desc: str) -> dict[str, np.ndarray]:
        return experiment.embed(self.model, ds, batch_size=self.cfg.eval_batch_size,
                                device=self.device, num_workers=self.cfg.num_workers,
                                amp=self.amp, quiet=self.quiet, desc=desc)

    def end_of_epoch(self) -> None:
        cfg = self.cfg
        epoch = self.epoch  # 0-based epoch just finished
        is_eval = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if self.d.main and is_eval and self.val_ds is not None:
            m = experiment.evaluate_embeddings(self._embed(self.val_ds, "val"), cfg, full=False)
            value = m[cfg.select_metric]
            improved = math.isfinite(value) and value > self.best_value
            if improved:
                self.best_value, self.best_epoch = value, epoch
                runs.save_checkpoint(self.ckpt_best, {
                    "model": self.model.state_dict(), "metric_loss": self.metric_loss.state_dict(),
                    "epoch": epoch, "step": self.step, "in_channels": self.in_channels,
                    "select_metric": cfg.select_metric, "value": value,
                })
            self._log({"kind": "val", "epoch": epoch, "step": self.step, **m, "best": improved})
        if self.d.main and is_eval and self.probe_images is not None:
            diag = probe(self.model, self.probe_images, levels=cfg.ssr_levels,
                         families=cfg.ssr_families, sigma=cfg.ssr_sigma, nested=cfg.ssr_nested,
                         seed=cfg.seed)
            self._log({"kind": "ssr_diag", "epoch": epoch, "step": self.step, **diag})
        if self.d.main and is_eval and cfg.eval_test_each_epoch:
            m = experiment.evaluate_embeddings(self._embed(self._test_ds(), "test (curve)"), cfg, full=False)
            self._log({"kind": "test_curve", "epoch": epoch, "step": self.step, **m})
        if self.d.active:
            dist.barrier()

    def _test_ds(self):
        if self.test_ds is None:
            self.test_ds = experiment.load_split(self.cfg, self.cfg.test_split, train=False)
        return self.test_ds

    def final_test(self) -> dict[str, Any]:
        cfg = self.cfg
        which = cfg.eval_checkpoint
        path = self.ckpt_best if which == "best" and self.ckpt_best.exists() else self.ckpt_last
        state = runs.load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        emb = self._embed(self._test_ds(), "test")
        m = experiment.evaluate_embeddings(emb, cfg, full=True)
        runs.save_npz(self.run_dir / runs.EMBEDDINGS_FILE, **emb)
        self._log({"kind": "test", "epoch": int(state["epoch"]), "step": self.step,
                   "checkpoint": path.name, **m})
        val_record = None
        if self.best_epoch is not None:
            for r in runs.read_jsonl(self.run_dir / runs.METRICS_FILE):
                if r.get("kind") == "val" and r.get("epoch") == self.best_epoch:
                    val_record = {k: v for k, v in r.items()
                                  if k not in ("kind", "epoch", "step", "best")}
        return {"test": m, "val": val_record, "checkpoint": path.name,
                "checkpoint_epoch": int(state["epoch"])}

    # -- the loop --
    def run(self) -> FitResult:
        self.t0 = time.perf_counter()
        if self.finished_summary is not None:
            summary = self.finished_summary
            return FitResult(self.run_dir, dict(summary.get("test", {})),
                             summary.get("best_epoch"), True, summary)
        from dmlnb.progress import progress_bar

        cfg = self.cfg
        self.model.train()
        bar = progress_bar(total=self.total_steps, initial=self.step, desc="train",
                           disable=self.quiet, dynamic_ncols=True)
        try:
            while self.epoch < cfg.epochs and self.step < self.total_steps:
                limit = min(self.batches_per_epoch,
                            self.step_in_epoch + self.total_steps - self.step)
                batches = _EpochBatches(self.sampler, self.epoch, self.step_in_epoch, limit,
                                        seeds=isinstance(self.train_ds, experiment.SeededDataset), seed=cfg.seed)
                loader = torch.utils.data.DataLoader(
                    self.train_ds, batch_sampler=batches, num_workers=cfg.num_workers,
                    pin_memory=self.device.type == "cuda",
                    generator=experiment.loader_generator(cfg.seed, self.epoch),
                )
                sums = self.sums  # restored mid-epoch, else empty
                t_epoch, c_epoch = time.perf_counter(), time.process_time()
                t_data = time.perf_counter()
                for images, labels in loader:
                    images = images.to(self.device, non_blocking=True)
                    labels = torch.as_tensor(labels).to(self.device, non_blocking=True)
                    t_start = time.perf_counter()
                    out = self.train_step(images, labels)
                    self.step += 1
                    self.step_in_epoch += 1
                    t_end = time.perf_counter()
                    sums["n"] += 1
                    sums["fired"] += int(out["fired"])
                    sums["loss"] += out["loss"]
                    sums["loss_metric"] += float(out["loss_metric"])
                    if out["fired"]:
                        for k in ("loss_rank", "rank_sort", "rank_pos"):
                            sums[k] += float(out[k])
                    if self.step % cfg.log_every == 0:
                        self._log(_step_record(out, self, t_end - t_start, t_start - t_data,
                                               sums))
                    bar.update(1)
                    if not self.quiet:
                        bar.set_postfix(epoch=self.epoch, loss=f"{out['loss']:.4f}",
                                        refresh=False)
                    if self.stop_after_steps is not None and self.step >= self.stop_after_steps \
                            and self.step_in_epoch < limit:
                        self._save_last()
                        return FitResult(self.run_dir, {}, self.best_epoch, completed=False)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                            and self.step_in_epoch < limit:
                        self._save_last()
                    t_data = time.perf_counter()
                epoch_done = self.step_in_epoch >= self.batches_per_epoch
                n = max(1, sums["n"])
                seconds = time.perf_counter() - t_epoch
                self._log({
                    "kind": "epoch", "epoch": self.epoch, "step": self.step, "steps": sums["n"],
                    "loss": sums["loss"] / n, "loss_metric": sums["loss_metric"] / n,
                    **{k: sums[k] / sums["fired"] if sums["fired"] else None
                       for k in ("loss_rank", "rank_sort", "rank_pos")},
                    "ssr_rate": sums["fired"] / n, "lr": self.optimizer.param_groups[0]["lr"],
                    "time_s": seconds, "cpu_s": time.process_time() - c_epoch,
                    "images_per_s": sums["n"] * cfg.batch_size / seconds,
                    "complete": epoch_done,
                })
                if epoch_done or self.step >= self.total_steps:
                    self.model.eval()
                    self.end_of_epoch()
                    self.model.train()
                    self.epoch += 1
                    self.step_in_epoch = 0
                    self.sums = _empty_sums()
                self._save_last()
                if self.stop_after_steps is not None and self.step >= self.stop_after_steps:
                    return FitResult(self.run_dir, {}, self.best_epoch, completed=False)
        finally:
            bar.close()
        # the end: test once
        result = {}
        if self.d.main:
            result = self.final_test()
            summary = {
                "run_dir": str(self.run_dir), "config": cfg.to_dict(),
                "seed": cfg.seed, "epochs": self.epoch, "steps": self.step,
                "best_epoch": self.best_epoch, "select_metric": cfg.select_metric,
                "val": result["val"], "test": result["test"],
                "test_checkpoint": result["checkpoint"],
                "test_checkpoint_epoch": result["checkpoint_epoch"],
                "wall_time_s": self.elapsed + (time.perf_counter() - self.t0),
                "world_size": self.d.world_size, "device": str(self.device),
                "versions": _versions(), "argv": sys.argv,
                "ssr_diagnostics": _diagnostics_summary(
                    runs.read_jsonl(self.run_dir / runs.METRICS_FILE)),
            }
            runs.write_json(self.run_dir / runs.SUMMARY_FILE, summary)
        else:
            summary = {}
        if self.d.active:
            dist.barrier()
        return FitResult(self.run_dir, dict(result.get("test", {})), self.best_epoch, True,
                         summary)


def _diagnostics_summary(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """The run's SSR diagnostics: means over the logged steps where the branch fired of
    ``rank_sort``, ``rank_pos``, ``ssr_grad_ratio`` and ``ssr_grad_cos``, and the last
    evaluation's probe (``view_tau_*``, ``ssr_cross_cos``, ``ssr_level_sim_*``)."""
    steps = [r for r in records if r.get("kind") == "step"]
    out: dict[str, float | None] = {}
    for k in ("rank_sort", "rank_pos", "ssr_unif", "ssr_grad_ratio", "ssr_grad_cos"):
        values = [r[k] for r in steps if r.get(k) is not None and math.isfinite(r[k])]
        out[k] = float(np.mean(values)) if values else None
    probes = [r for r in records if r.get("kind") == "ssr_diag"]
    if probes:
        out.update({k: v for k, v in probes[-1].items() if k not in ("kind", "epoch", "step")})
    return out


def _empty_sums() -> dict[str, float]:
    return {"loss": 0.0, "loss_metric": 0.0, "loss_rank": 0.0, "rank_sort": 0.0, "rank_pos": 0.0,
            "fired": 0, "n": 0}


def _step_record(out: dict, tr: Trainer, step_s: float, data_s: float, sums: dict) -> dict:
    rec = {
        "kind": "step", "epoch": tr.epoch, "step": tr.step, "loss": out["loss"],
        "loss_metric": float(out["loss_metric"]),
        "loss_rank": float(out["loss_rank"]) if out["fired"] else None,
        "ssr": int(out["fired"]), "ssr_rate": sums["fired"] / sums["n"],
        "lr": tr.optimizer.param_groups[0]["lr"], "step_s": step_s, "data_s": data_s,
        "global_batch": out["global_batch"],
    }
    for k in ("rank_sort", "rank_pos", "ssr_unif", "ssr_grad_ratio", "ssr_grad_cos"):
        if k in out:
            rec[k] = float(out[k])
    return rec


def fit(config: TrainConfig | Mapping[str, Any], *, stop_after_steps: int | None = None) -> FitResult:
    """Train a model with ``L = L_metric + ssr_weight * L_rank`` and evaluate it.

    Parameters
    ----------
    config : TrainConfig or dict
        Every setting (a dict of field names is validated like :meth:`TrainConfig.from_dict`).
    stop_after_steps : int, optional
        Test hook: stop after this many global steps as if interrupted (a checkpoint is written;
        ``fit(config with resume=True, run_dir=...)`` continues). Unlike ``config.max_steps`` it
        leaves the run unfinished.

    Returns
    -------
    FitResult
        ``run_dir`` and ``metrics`` (the test split's Recall@K, R-Precision, MAP@R, NMI, F1,
        evaluated once, with the best validation checkpoint unless ``eval_checkpoint="last"``).

    Raises
    ------
    RunExistsError
        ``run_dir`` holds something and ``resume`` is false.
    FloatingPointError
        The loss became NaN or infinite; the last good checkpoint is kept.
    """
    cfg = experiment.check_config(config)
    trainer = Trainer(cfg, stop_after_steps)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        if trainer.lock is not None:
            trainer.lock.release()
        trainer.d.close()


def fit_or_reuse(config: TrainConfig | Mapping[str, Any]) -> FitResult:
    """:func:`fit` into ``config.run_dir``, reusing the run there when it is finished with the
    same settings and resuming it when it was interrupted (``resume=True``); a run there with
    other settings is refused (naming the fields that differ), never overwritten."""
    cfg = experiment.check_config(config)
    if cfg.run_dir is None:
        raise ValueError("fit_or_reuse needs run_dir: the folder of the run to reuse or make")
    return fit(cfg.replace(resume=True))
