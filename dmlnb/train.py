"""``fit(config)``: deep metric learning with self-supervised ranking (Fu et al., AAAI 2021).

One iteration (PAPER.md, "The ranking objective" and "Cost control")::

    x, y   <- one class-balanced batch (B images, B / m classes x m images)
    fire   <- coin with probability p (a fresh coin per iteration, from the run's generator)
    if fire:
        I      <- M of the B images (random, from the run's generator)
        V      <- make_views(x[I], N levels)                    [M, N, C, H, W], on the device
        z, z'  <- model(cat(x, V))                               ONE backbone pass, B + M N images
        L      = L_metric(z[:B], y) + gamma * L_rank(z'[I], z'[B:].view(M, N, d))
    else:
        L      = L_metric(model(x), y)
    one backward of L, one AdamW step, one scheduler step

Everything random comes from ``config.seed``: the coin, the picks, the views and the loss's
sampling from one ``torch.Generator``; the class-balanced sampler from ``(seed, epoch)``. Two
places need torch's global generator (module initialisers and the per-image augmentation
pipeline take none): they run under :func:`torch.random.fork_rng` seeded from the run, which
restores the caller's global state afterwards (:func:`seeded_model`, :class:`_Seeded`). So the
same seed on the CPU gives the same metrics, and a run interrupted and resumed from its last
checkpoint gives the same metrics as an uninterrupted one.

Model selection is on the class-disjoint validation split (never on the test classes); the test
split is evaluated once at the end, with the best validation checkpoint (``eval_checkpoint="best"``,
default) or the last one. Under ``torchrun`` (several processes) the metric loss sees the global
batch: embeddings and labels are all-gathered, the local part keeping its gradient; only rank 0
writes the run directory.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
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

from dmlnb import runs
from dmlnb.config import TrainConfig, coerce_config
from dmlnb.defaults import KMEANS_SEED

__all__ = [
    "FitResult", "fit", "evaluate_run", "build_model", "seeded_model", "build_metric_loss",
    "build_ranking_loss", "embed", "load_split", "resolve_device", "gather_with_grad",
]

_RESUMABLE_CHANGES = frozenset(
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


# --- devices and processes -----------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda if available, else mps if available, else cpu; others are checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu' "
                         f"or 'auto'")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                and torch.backends.mps.is_available()):
        raise ValueError("device='mps' but Apple MPS is not available here; use 'cpu' or 'auto'")
    return torch.device(device)


@dataclass
class _Dist:
    """The process group this run is part of (world_size 1: not distributed)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> _Dist:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_world_size(), dist.get_rank(),
                     int(os.environ.get("LOCAL_RANK", dist.get_rank())), False)
    if world <= 1:
        return _Dist()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return _Dist(world, rank, local, True)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` [b, ...] from every rank into [world * b, ...] (rank order).

    The local block keeps its autograd graph; the other ranks' blocks are constants. Because
    every rank then computes the same global loss and DistributedDataParallel *averages* the
    gradients over ranks, the local block's gradient is scaled by the world size: the averaged
    gradient is then exactly that of the global loss (the "concat trick" of SimCLR / MoCo code,
    which needs no reduce-scatter and so works with gloo). Outside a process group: ``x``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = _ScaleGrad.apply(x, float(world)) if x.requires_grad else x
    return torch.cat(parts, dim=0)


# --- data ----------------------------------------------------------------------------------------
def load_split(cfg: TrainConfig, split: str, train: bool = False) -> torch.utils.data.Dataset:
    """Load ``split`` as float ``[C, H, W]`` images in [0, 1] of side ``image_size``.

    In-memory sets (glyphs, Fashion-MNIST, digits) are resized once at load time (their
    ``image_size`` option); with ``augment`` the training split gets the field's random
    pipeline on tensors (Resize -> RandomCrop -> flip, no flip for character data). Sets read
    from files (CUB, Cars, SOP, folders) get :func:`dmlnb.data.preprocess.build_transform`:
    train (with ``augment``) or test pipeline at ``crop = image_size``, ``resize =
    resize_for(image_size)`` (256 for 224). A training split with a random pipeline is wrapped
    in :class:`_Seeded` so its randomness comes from the run's seed. ``dataset_options`` given
    by the user win over these choices.
    """
    from dmlnb.data import dataset_info, load_dataset
    from dmlnb.data.preprocess import build_transform, resize_for

    options = dict(cfg.dataset_options)
    from_files = dataset_info(cfg.dataset).needs_root
    augment = train and cfg.augment
    if from_files:
        options.setdefault("transform", build_transform(
            augment, resize=resize_for(cfg.image_size), crop=cfg.image_size))
    else:
        options.setdefault("image_size", cfg.image_size)
        if augment:
            flip = cfg.dataset not in _CHIRAL_DATASETS
            options.setdefault("transform", build_transform(
                True, resize=resize_for(cfg.image_size), crop=cfg.image_size, flip=flip))
    ds = load_dataset(cfg.dataset, split, cfg.data_root, **options)
    return _Seeded(ds) if augment else ds


# characters: a mirrored b is a d, so no horizontal flip for them (DECISION)
_CHIRAL_DATASETS = frozenset({"glyphs", "digits"})


class _Seeded(torch.utils.data.Dataset):
    """A training set whose items are requested as ``(index, seed)``: the dataset's own random
    pipeline runs under :func:`torch.random.fork_rng` seeded with ``seed`` (the global RNG
    state is saved before and restored after, so nothing leaks). Augmentation is then a pure
    function of the run's seed, the epoch and the position in it, whatever the number of loader
    workers and wherever a resumed run restarts."""

    def __init__(self, base):
        self.base = base
        for name in ("labels", "classes", "channels", "metadata", "image_size"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


class _EpochBatches(torch.utils.data.Sampler):
    """The batches of one epoch of the class-balanced sampler, from batch ``skip`` on, capped at
    ``limit`` batches; with ``seeds`` each index comes paired with a per-image seed drawn from
    ``(run seed, epoch)`` (see :class:`_Seeded`)."""

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


def _make_sampler(cfg: TrainConfig, labels: np.ndarray, d: _Dist):
    from dmlnb.data.sampler import ClassBalancedBatchSampler

    return ClassBalancedBatchSampler(
        labels, cfg.classes_per_batch, cfg.samples_per_class, seed=cfg.seed,
        num_replicas=d.world_size, rank=d.rank,
    )


# --- model, losses, optimiser ----------------------------------------------------------------------
def build_model(cfg: TrainConfig, in_channels: int, pretrained: bool | None = None) -> nn.Module:
    """The :class:`dmlnb.model.EmbeddingNet` of ``cfg`` (``pretrained`` overrides the config:
    :func:`dmlnb.runs.load_model` passes False since it loads the run's weights anyway)."""
    from dmlnb.model import EmbeddingNet

    return EmbeddingNet(
        backbone=cfg.backbone, embed_dim=cfg.embed_dim, ssr_dim=cfg.ssr_dim,
        ssr_hidden=cfg.ssr_hidden, pretrained=cfg.pretrained if pretrained is None else pretrained,
        pooling=cfg.pooling, freeze_bn=cfg.freeze_bn, in_channels=in_channels,
        freeze_stages=cfg.freeze_stages,
    )


def seeded_model(cfg: TrainConfig, in_channels: int, pretrained: bool | None = None) -> nn.Module:
    """:func:`build_model` with its random initialisation drawn from ``cfg.seed``.

    torch's module initialisers take no generator, so the model is built under
    :func:`torch.random.fork_rng` seeded with ``cfg.seed``: the global CPU RNG state is saved
    before and restored after (the caller's random state is left as it was).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg, in_channels, pretrained)


def build_metric_loss(cfg: TrainConfig, num_classes: int, generator: torch.Generator) -> nn.Module:
    """The DML loss of ``cfg`` drawing from the run's ``generator``; a loss that needs the
    number of training classes or the embedding size (Proxy-Anchor) gets them."""
    from dmlnb.losses import LOSSES, build_loss

    params = {"generator": generator, **cfg.loss_params}
    needed = inspect.signature(LOSSES[cfg.loss].__init__).parameters
    for name, value in (("num_classes", num_classes), ("embed_dim", cfg.embed_dim)):
        if (name in needed and needed[name].default is inspect.Parameter.empty
                and name not in params):
            params[name] = value
    return build_loss(cfg.loss, **params)


def build_ranking_loss(cfg: TrainConfig) -> nn.Module:
    """The paper's :class:`dmlnb.losses.RankingLoss` with the config's s, alpha, beta, lambda_r."""
    from dmlnb.losses import RankingLoss

    return RankingLoss(scale=cfg.rank_scale, alpha=cfg.rank_alpha, beta=cfg.rank_beta,
                       pos_weight=cfg.rank_pos_weight, pairs=cfg.ssr_pairs)


def _param_groups(cfg: TrainConfig, model: nn.Module, loss: nn.Module) -> list[dict]:
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


def _ssr_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    for name in ("ssr_head", "ssr"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return list(head.parameters())
    return []


# --- embedding and evaluation --------------------------------------------------------------------
def _forward(model: nn.Module, x: torch.Tensor, ssr: bool):
    out = model(x, ssr=ssr)
    if isinstance(out, tuple):
        return out if ssr else (out[0], None)
    return out, None


@torch.no_grad()
def embed(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    amp: str = "none",
    ssr: bool = False,
    quiet: bool = True,
    desc: str = "embed",
) -> dict[str, np.ndarray]:
    """Metric embeddings (and SSR embeddings with ``ssr``) of every item of ``dataset``, in
    order, with the model in eval mode: ``{"embeddings", "labels", "indices"[, "ssr"]}``."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", generator=_loader_generator(0, 0),
    )
    embs, ssrs, labels = [], [], []
    try:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=quiet):
            x = x.to(device, non_blocking=True)
            with _autocast(device, amp):
                z, zs = _forward(model, x, ssr)
            embs.append(z.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
            if ssr:
                ssrs.append(zs.float().cpu())
    finally:
        model.train(was_training)
    out = {
        "embeddings": torch.cat(embs).numpy(),
        "labels": torch.cat(labels).numpy().astype(np.int64),
        "indices": np.arange(len(dataset), dtype=np.int64),
    }
    if ssr:
        out["ssr"] = torch.cat(ssrs).numpy()
    return out


def _loader_generator(seed: int, epoch: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed from a generator when it starts an epoch; give
    it one of its own so that torch's global generator is left alone."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def _metrics(emb: dict[str, np.ndarray], cfg: TrainConfig, full: bool) -> dict[str, float]:
    from dmlnb.metrics import evaluate

    include = None
    if not full:  # validation: skip KMeans unless selection needs it
        include = ["recall@1", "r_precision", "map@r"]
        if cfg.select_metric not in include:
            include.append(cfg.select_metric)
    ks = cfg.eval_ks if full else (1,)
    return evaluate(emb["embeddings"], emb["labels"], ks=ks, include=include,
                    kmeans_seed=KMEANS_SEED)


def _autocast(device: torch.device, amp: str):
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


# --- the run --------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import dmlnb

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "dmlnb": dmlnb.__version__}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig, run_dir: Path) -> None:
    now = cfg.to_dict()
    differ = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if differ:
        detail = ", ".join(f"{k}: run has {saved.get(k)!r}, given {now[k]!r}" for k in differ)
        raise ValueError(
            f"resume=True but the config differs from the run in {str(run_dir)!r} in {detail}; "
            f"resume with the run's own config (or only change: {', '.join(sorted(_RESUMABLE_CHANGES))})"
        )


class _Trainer:
    """State of one :func:`fit` call; the public surface is :func:`fit`."""

    def __init__(self, cfg: TrainConfig, stop_after_steps: int | None):
        self.cfg = cfg
        self.stop_after_steps = stop_after_steps
        self.d = _setup_distributed(cfg.device)
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

    # -- set-up --
    def setup(self) -> None:
        cfg, d = self.cfg, self.d
        # run directory: rank 0 makes it, the others learn its path
        path = None
        if d.main:
            path = str(runs.create_run_dir(cfg))
        if d.active:
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
        self.run_dir = Path(path)
        self.ckpt_last = runs.checkpoint_path(self.run_dir, "last")
        self.ckpt_best = runs.checkpoint_path(self.run_dir, "best")
        self.finished = (self.run_dir / runs.SUMMARY_FILE).exists()
        if self.finished:
            return
        resuming = self.ckpt_last.exists()
        if runs.is_run(self.run_dir):  # resume=True (create_run_dir refuses it otherwise)
            _check_resume_config(runs.load_run(self.run_dir).config, cfg, self.run_dir)
        elif d.main:
            # config.json is written once, at the start (resume keeps the original)
            runs.write_json(self.run_dir / runs.CONFIG_FILE,
                            {**cfg.to_dict(), "run_dir": str(self.run_dir)})
        if not resuming and d.main:
            # a run that stopped before its first checkpoint starts again from step 0
            runs.truncate_metrics(self.run_dir, 0)

        # generators: `gen` is shared by all ranks (coin, loss sampling: identical on every
        # rank); `gen_local` draws the rank's own picks and views (== gen when not distributed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.gen_local = (torch.Generator().manual_seed(cfg.seed + 1_000_003 * d.rank)
                          if d.active else self.gen)

        # data
        self.train_ds = load_split(cfg, cfg.train_split, train=True)
        self.val_ds = load_split(cfg, cfg.val_split, train=False) if cfg.val_split else None
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
                f"{cfg.classes_per_batch} classes x {cfg.samples_per_class}; lower batch_size"
            )
        self.total_steps = cfg.epochs * self.batches_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        # model, losses, optimiser, schedule
        model = seeded_model(cfg, self.in_channels).to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if not cfg.ssr:
            for p in _ssr_head_parameters(model):
                p.requires_grad_(False)
        self.model = model
        self.metric_loss = build_metric_loss(cfg, self.num_classes, self.gen).to(self.device)
        self.ranking_loss = build_ranking_loss(cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(_param_groups(cfg, model, self.metric_loss),
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
        if resuming:
            self._restore(runs.load_checkpoint(self.ckpt_last, map_location=self.device))

    # -- checkpoints --
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "metric_loss": self.metric_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.gen.get_state(),
            "generator_local": self.gen_local.get_state(),
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
        if self.d.active:
            self.gen_local.set_state(s["generator_local"])
        self.epoch, self.step = int(s["epoch"]), int(s["step"])
        self.step_in_epoch = int(s["step_in_epoch"])
        self.best_value = float(s["best_value"])
        self.best_epoch = None if s["best_epoch"] is None else int(s["best_epoch"])
        self.elapsed = float(s["elapsed"])
        self.sums = {k: (float(v) if k.startswith("loss") else int(v))
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
        fire = bool(cfg.ssr and torch.rand((), generator=self.gen).item() < cfg.ssr_prob)
        x = images
        if fire:
            from dmlnb.transforms import make_views

            # M of the global batch: each of W processes picks M / W of its B / W images
            M = min(B, max(1, round(cfg.ssr_images / self.d.world_size)))
            N = cfg.ssr_levels
            pick = torch.randperm(B, generator=self.gen_local)[:M].to(images.device)
            views = make_views(images[pick], levels=N, families=cfg.ssr_families,
                               sigma=cfg.ssr_sigma, nested=cfg.ssr_nested,
                               generator=self.gen_local)
            x = torch.cat([images, views.flatten(0, 1)], dim=0)
        if cfg.channels_last and x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        # in DDP the SSR head runs every step (a zero term when the coin says no), so that
        # every parameter gets a gradient on every rank
        want_ssr = fire or (cfg.ssr and self.d.active)
        with _autocast(self.device, self.amp):
            z, zs = _forward(self.ddp, x, want_ssr)
            z_all = gather_with_grad(z[:B])
            y_all = _gather_labels(labels)
            loss_metric = self.metric_loss(z_all.float(), y_all)
            loss = loss_metric
            out = {"fired": fire, "global_batch": int(z_all.shape[0])}
            if fire:
                anchor = zs[pick].float()
                views_emb = zs[B:].float().reshape(M, N, -1)
                loss_rank, parts = _ranking(self.ranking_loss, anchor, views_emb)
                loss = loss + cfg.ssr_weight * loss_rank
                out.update(loss_rank=loss_rank.detach(), **parts)
            elif want_ssr:
                loss = loss + 0.0 * zs.sum()
        out.update(loss=loss.detach(), loss_metric=loss_metric.detach())
        value = loss.detach()
        if self.d.active:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.d.world_size
        value = float(value)
        if not math.isfinite(value):
            kept = (f"the last good checkpoint is kept: {self.ckpt_last}"
                    if self.ckpt_last.exists() else "no checkpoint had been written yet")
            msg = (f"the loss became {value} at epoch {self.epoch}, step {self.step + 1} "
                   f"(metric loss {float(loss_metric.detach()):.4g}"
                   + (f", ranking loss {float(out['loss_rank']):.4g}" if fire else "")
                   + f"); training stopped before the update, {kept}. Lower lr (or check "
                   f"the data), then start again or continue with resume=True")
            self._log({"kind": "error", "epoch": self.epoch, "step": self.step + 1,
                       "error": msg})
            raise FloatingPointError(msg)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.d.active:
            _average_loss_gradients(self.metric_loss, self.d.world_size)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        out["loss"] = value
        return out

    # -- evaluation --
    def _embed(self, ds, desc: str) -> dict[str, np.ndarray]:
        return embed(self.model, ds, batch_size=self.cfg.eval_batch_size, device=self.device,
                     num_workers=self.cfg.num_workers, amp=self.amp, quiet=self.quiet, desc=desc)

    def end_of_epoch(self) -> None:
        cfg = self.cfg
        epoch = self.epoch  # 0-based epoch just finished
        is_eval = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if self.d.main and is_eval and self.val_ds is not None:
            m = _metrics(self._embed(self.val_ds, "val"), cfg, full=False)
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
        if self.d.main and is_eval and cfg.eval_test_each_epoch:
            m = _metrics(self._embed(self._test_ds(), "test (curve)"), cfg, full=False)
            self._log({"kind": "test_curve", "epoch": epoch, "step": self.step, **m})
        if self.d.active:
            dist.barrier()

    def _test_ds(self):
        if getattr(self, "test_ds", None) is None:
            self.test_ds = load_split(self.cfg, self.cfg.test_split, train=False)
        return self.test_ds

    def final_test(self) -> dict[str, Any]:
        cfg = self.cfg
        which = cfg.eval_checkpoint
        path = self.ckpt_best if which == "best" and self.ckpt_best.exists() else self.ckpt_last
        state = runs.load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        emb = self._embed(self._test_ds(), "test")
        m = _metrics(emb, cfg, full=True)
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
        if self.finished:
            summary = runs.load_run(self.run_dir).summary or {}
            return FitResult(self.run_dir, dict(summary.get("test", {})),
                             summary.get("best_epoch"), True, summary)
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=self.quiet,
                   dynamic_ncols=True)
        try:
            while self.epoch < cfg.epochs and self.step < self.total_steps:
                limit = min(self.batches_per_epoch,
                            self.step_in_epoch + self.total_steps - self.step)
                batches = _EpochBatches(self.sampler, self.epoch, self.step_in_epoch, limit,
                                        seeds=isinstance(self.train_ds, _Seeded), seed=cfg.seed)
                loader = torch.utils.data.DataLoader(
                    self.train_ds, batch_sampler=batches, num_workers=cfg.num_workers,
                    pin_memory=self.device.type == "cuda",
                    generator=_loader_generator(cfg.seed, self.epoch),
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
                        sums["loss_rank"] += float(out["loss_rank"])
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
                    "loss_rank": sums["loss_rank"] / sums["fired"] if sums["fired"] else None,
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
            }
            runs.write_json(self.run_dir / runs.SUMMARY_FILE, summary)
        else:
            summary = {}
        if self.d.active:
            dist.barrier()
        return FitResult(self.run_dir, dict(result.get("test", {})), self.best_epoch, True,
                         summary)


def _empty_sums() -> dict[str, float]:
    return {"loss": 0.0, "loss_metric": 0.0, "loss_rank": 0.0, "fired": 0, "n": 0}


def _step_record(out: dict, tr: _Trainer, step_s: float, data_s: float, sums: dict) -> dict:
    rec = {
        "kind": "step", "epoch": tr.epoch, "step": tr.step, "loss": out["loss"],
        "loss_metric": float(out["loss_metric"]),
        "loss_rank": float(out["loss_rank"]) if out["fired"] else None,
        "ssr": int(out["fired"]), "ssr_rate": sums["fired"] / sums["n"],
        "lr": tr.optimizer.param_groups[0]["lr"], "step_s": step_s, "data_s": data_s,
        "global_batch": out["global_batch"],
    }
    for k in ("rank_sort", "rank_pos"):
        if k in out:
            rec[k] = float(out[k])
    return rec


def _gather_labels(labels: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return labels
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


def _average_loss_gradients(loss: nn.Module, world: int) -> None:
    """Loss parameters (margin beta, proxies) are outside DDP: average their gradients (every
    rank computes the same global loss, so this only guards against drift)."""
    for p in loss.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _ranking(loss: nn.Module, anchor: torch.Tensor, views: torch.Tensor):
    """``(L_rank, {"rank_sort", "rank_pos"})`` from :meth:`RankingLoss.parts`."""
    parts = loss.parts(anchor, views)
    return parts.total, {"rank_sort": parts.sort.detach(), "rank_pos": parts.pos.detach()}


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
    cfg = coerce_config(config)
    trainer = _Trainer(cfg, stop_after_steps)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        if trainer.d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str | None = None,
    which: str = "best",
    device: str = "cpu",
    batch_size: int = 500,
    quiet: bool = True,
) -> dict[str, float]:
    """Re-evaluate a run's ``which`` checkpoint on ``split`` (default: its test split) with the
    run's evaluation settings (``dmlnb eval RUN_DIR``). Writes nothing."""
    run = runs.load_run(run_dir)
    cfg = run.train_config()
    model = runs.load_model(run.path, which=which, device=device)
    ds = load_split(cfg, split or cfg.test_split, train=False)
    emb = embed(model, ds, batch_size=batch_size, device=device, quiet=quiet)
    return _metrics(emb, cfg, full=True)
