"""Every setting of a training run, in one validated dataclass: :class:`TrainConfig`.

The field names are the public vocabulary: notebook parameters, ``dmlnb train --field value`` flags
and sweep grids all use them. The method's defaults come from :mod:`dmlnb.defaults` (each with its
source there); the rest are chosen so that a run of the defaults trains a small CNN on the embedded
``glyphs`` data on a laptop CPU in a few minutes.

:meth:`TrainConfig.from_dict` (and the constructor, through ``__post_init__``) rejects unknown keys
and invalid values with **one** :class:`ValueError` that lists every problem, each naming the field
and, where the set is finite, the valid choices.

:data:`PRESETS` holds the paper's protocol (ResNet-50 at 224 px, docs/method.md "Training protocol") for
CUB-200-2011, Cars196 and Stanford Online Products at 128-d and 512-d; see :func:`preset`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmlnb import defaults as D
from dmlnb._validate import check_choice, check_keys, check_positive_int, check_range
from dmlnb.defaults import (
    AMP_CHOICES,
    CHECKPOINT_CHOICES,
    DEVICE_CHOICES,
    GLYPH_BATCH_SIZE,
    GLYPH_EPOCHS,
    GLYPH_LR,
    GLYPH_STEPS_PER_EPOCH,
    LR_DECAY,
    LR_MILESTONES,
    PAPER_EPOCHS,
    POOLINGS,
    RANK_PAIR_CHOICES,
    SCHEDULES,
    SELECT_METRICS,
    SPLITS,
    VIEW_FAMILIES,
)


@dataclass
class TrainConfig:
    """All settings of one run of :func:`dmlnb.train.fit`.

    The objective is ``L = L_metric + ssr_weight * L_rank`` (docs/method.md); the ranking branch runs
    on a fresh coin per iteration with probability ``ssr_prob``, on ``ssr_images`` (M) images of
    the batch, each with ``ssr_levels`` (N) views of increasing strength.

    Parameters
    ----------
    dataset, data_root, dataset_options
        Passed to :func:`dmlnb.data.load_dataset` (``dataset_options`` as ``**options``).
    train_split, val_split, test_split
        Class-disjoint splits. Model selection uses ``val_split`` (``None``: no validation, the
        last checkpoint is kept); the test split is evaluated once at the end.
    loss, loss_params
        The DML loss (:func:`dmlnb.losses.build_loss`) and its keyword parameters.
    ssr, ssr_prob, ssr_weight, ssr_levels, ssr_images
        SSR on/off, p (0.8), gamma (0.8), N (4), M (20) - docs/method.md / dmlnb.defaults.
    ssr_families, ssr_sigma, ssr_nested
        The views: families, schedule ``t_n = tanh(sigma n)``, nested levels
        (:func:`dmlnb.views.make_views`).
    ssr_pairs, rank_scale, rank_alpha, rank_beta, rank_pos_weight
        :class:`dmlnb.losses.RankingLoss` (pairs, s, alpha, beta, lambda_r).
    ssr_uniformity
        An extension, not the paper's form (0, the default, is off): weight ``w_u`` of the
        uniformity term ``w_u L_unif`` added to ``L_rank`` on the SSR embeddings of the batch's
        originals (:func:`dmlnb.losses.uniformity`), against the SSR head's collapse.
    epochs, steps_per_epoch, max_steps
        Length: ``steps_per_epoch`` caps an epoch (quick runs); ``max_steps`` caps the whole run.
    batch_size, samples_per_class
        Class-balanced batches of ``batch_size / samples_per_class`` classes (per process).
    backbone, pretrained, embed_dim, ssr_dim, ssr_hidden, pooling, freeze_bn, freeze_stages
        :class:`dmlnb.model.EmbeddingNet`.
    image_size, augment
        Input size, and whether the training split gets the ordinary random augmentation
        (:func:`dmlnb.data.preprocess.build_transform`; images are resized to ``image_size``).
    lr, head_lr_mult, weight_decay, schedule, lr_decay, lr_milestones, warmup_steps
        AdamW; heads at ``lr * head_lr_mult``; loss parameters at the loss's own rate; ``"step"``
        multiplies by ``lr_decay`` at each milestone (fractions of the run), ``"cosine"`` anneals
        to zero; both per iteration, after a linear warm-up of ``warmup_steps``.
    eval_every, select_metric, eval_ks, eval_test_each_epoch, eval_checkpoint, eval_batch_size
        Validation every ``eval_every`` epochs; the checkpoint with the best ``select_metric`` on
        validation is kept; the final test uses the ``eval_checkpoint`` ("best" or "last")
        weights. ``eval_test_each_epoch`` also logs test metrics per epoch (curves only, marked
        ``kind="test_curve"``; never used for selection).
    seed, device, amp, channels_last, num_workers
        One seed for everything; ``device`` "auto" picks cuda > mps > cpu; ``amp`` autocast dtype
        on CUDA; ``channels_last`` memory format (on every device: on CPUs it speeds up the
        depthwise convolutions of EfficientNet-Lite, see ``benchmarks/bench_backbones.md``).
    ssr_diag_every, ssr_diag_images
        SSR diagnostics (:mod:`dmlnb.ssr`): the backbone-gradient ratio of ``gamma L_rank`` to
        ``L_metric`` every ``ssr_diag_every`` steps (when the branch fires; 0: never), and, at
        each evaluation, view-order tau in both heads and the SSR head's cross-image cosine on
        ``ssr_diag_images`` fixed validation images (0: never). They change no training number.
    run_dir, runs_root, resume, checkpoint_every, log_every, quiet
        Run directory (``None``: a new unique one under ``runs_root``), resume from its last
        checkpoint, extra checkpoints every N steps (0: at epoch ends), a ``metrics.jsonl`` line
        every N steps, no progress bars.
    """

    # --- data ---
    dataset: str = "glyphs"
    data_root: str | None = None
    dataset_options: dict = field(default_factory=dict)
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str = "test"
    # --- DML loss ---
    loss: str = "margin"  # docs/method.md: the reproduction's loss (margin, distance-weighted sampling)
    loss_params: dict = field(default_factory=dict)
    # --- SSR (the paper's method) ---
    ssr: bool = True
    ssr_prob: float = D.SSR_PROB
    ssr_weight: float = D.SSR_WEIGHT
    ssr_levels: int = D.SSR_LEVELS
    ssr_images: int = D.SSR_IMAGES
    ssr_families: tuple = D.SSR_FAMILIES
    ssr_sigma: float = D.SSR_SIGMA
    ssr_nested: bool = D.SSR_NESTED
    ssr_pairs: str = D.RANK_PAIRS
    rank_scale: float = D.RANK_SCALE
    rank_alpha: float = D.RANK_ALPHA
    rank_beta: float = D.RANK_BETA
    rank_pos_weight: float = D.RANK_POS_WEIGHT
    ssr_uniformity: float = D.SSR_UNIFORMITY
    # --- length and batches ---
    epochs: int = GLYPH_EPOCHS
    steps_per_epoch: int | None = GLYPH_STEPS_PER_EPOCH
    max_steps: int | None = None
    batch_size: int = GLYPH_BATCH_SIZE
    samples_per_class: int = D.SAMPLES_PER_CLASS
    # --- model ---
    backbone: str = "smallcnn"
    pretrained: bool = False
    embed_dim: int = D.EMBED_DIM
    ssr_dim: int = D.SSR_DIM
    ssr_hidden: int = D.SSR_HIDDEN
    pooling: str = D.POOLING
    freeze_bn: bool | None = None  # None: the model's auto rule (FREEZE_BN for ResNets and EfficientNet-Lite, off for smallcnn)
    freeze_stages: int = 0
    image_size: int = 32
    augment: bool = False
    # --- optimisation ---
    lr: float = GLYPH_LR
    head_lr_mult: float = D.HEAD_LR_MULT
    weight_decay: float = D.WEIGHT_DECAY
    schedule: str = "cosine"
    lr_decay: float = LR_DECAY
    lr_milestones: tuple = LR_MILESTONES
    warmup_steps: int = 0
    # --- evaluation ---
    eval_every: int = 1
    select_metric: str = "map@r"
    eval_ks: tuple = D.RECALL_KS
    eval_test_each_epoch: bool = False
    eval_checkpoint: str = "best"
    eval_batch_size: int = D.EVAL_BATCH_SIZE
    # --- execution ---
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    num_workers: int = 0
    # --- run directory ---
    run_dir: str | None = None
    runs_root: str = "runs"
    resume: bool = False
    checkpoint_every: int = 0
    log_every: int = 1
    ssr_diag_every: int = 10
    ssr_diag_images: int = 64
    quiet: bool = False

    def __post_init__(self) -> None:
        # JSON and the CLI give lists; the dataclass keeps tuples (hashable, printable as given).
        for name in ("ssr_families", "lr_milestones", "eval_ks"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
            elif isinstance(value, str):
                setattr(self, name, (value,))
        for name in ("data_root", "run_dir", "runs_root"):
            if isinstance(getattr(self, name), Path):
                setattr(self, name, str(getattr(self, name)))
        problems = _problems(self)
        if problems:
            raise ValueError("invalid TrainConfig:\n  - " + "\n  - ".join(problems))

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build a config from a plain dict of field names; unknown keys and bad values are
        reported together in one ValueError."""
        if isinstance(d, TrainConfig):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"config must be a TrainConfig or a dict, got {type(d).__name__}")
        names = field_names()
        problems: list[str] = []
        try:
            check_keys(d, names, "config fields")
        except ValueError as err:
            problems.append(str(err))
        try:
            config = cls(**{k: v for k, v in d.items() if k in names})
        except ValueError as err:
            problems += str(err).split("\n  - ")[1:]
        if problems:
            raise ValueError("invalid TrainConfig:\n  - " + "\n  - ".join(problems))
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """Read a config written by :meth:`to_json` (or by hand)."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated, unknown names refused)."""
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)

    @property
    def classes_per_batch(self) -> int:
        return self.batch_size // self.samples_per_class


#: What each field means, in the paper's and the field's words (``dmlnb train --help`` shows
#: these, grouped as in :data:`FIELD_GROUPS`; the class docstring has the full story).
FIELD_HELP: dict[str, str] = {
    "dataset": "data set: a name of dmlnb.data.dataset_names()",
    "data_root": "folder that holds a real benchmark (none: embedded data)",
    "dataset_options": "loader options as JSON, e.g. {\"max_per_class\": 50}",
    "train_split": "split to train on", "val_split": "split for model selection (none: keep the last)",
    "test_split": "split evaluated once at the end",
    "loss": "the DML loss L_metric", "loss_params": "keyword parameters of the DML loss, as JSON",
    "ssr": "add the self-supervised ranking loss (false: the baseline)",
    "ssr_prob": "p, probability that the SSR branch runs in an iteration",
    "ssr_weight": "gamma in L = L_metric + gamma L_rank",
    "ssr_levels": "N, views of increasing strength per image",
    "ssr_images": "M, images of the (global) batch that get views",
    "ssr_families": "transformation families of the views",
    "ssr_sigma": "strength schedule t_n = tanh(sigma n)",
    "ssr_nested": "view n+1 continues view n's random direction",
    "ssr_pairs": "pairs of levels in the list-wise term",
    "rank_scale": "s of the ranking loss", "rank_alpha": "list-wise margin alpha",
    "rank_beta": "point-wise floor beta", "rank_pos_weight": "lambda_r, weight of the floor",
    "ssr_uniformity": "EXTENSION (0: the paper's form): weight of a uniformity term that keeps "
                      "different images apart in the SSR head",
    "epochs": "passes over the training split (capped by steps_per_epoch)",
    "steps_per_epoch": "cap on iterations per epoch (none: a full epoch)",
    "max_steps": "cap on iterations of the whole run (none: no cap)",
    "batch_size": "images per global batch (classes x samples_per_class)",
    "samples_per_class": "m, images of each class in a batch",
    "backbone": "the shared backbone", "pretrained": (
        "ImageNet weights (EfficientNet-Lite: shipped in its package; ResNets: torchvision's "
        "file in the hub cache)"),
    "embed_dim": "d, size of the metric embedding", "ssr_dim": "size of the SSR embedding",
    "ssr_hidden": "hidden width of the SSR head's MLP",
    "pooling": "global pooling of the backbone's feature map",
    "freeze_bn": "BatchNorm frozen (auto: ResNets and EfficientNet-Lite yes, smallcnn no)",
    "freeze_stages": "freeze the first k backbone stages",
    "image_size": "input side in pixels (images are resized to it)",
    "augment": "random crop (+ flip, not for characters or icons) on the training split",
    "lr": "backbone learning rate (AdamW)", "head_lr_mult": "heads at lr x this",
    "weight_decay": "AdamW weight decay", "schedule": "learning-rate schedule, per iteration",
    "lr_decay": "step schedule: factor at each milestone",
    "lr_milestones": "step schedule: fractions of the run where lr *= lr_decay",
    "warmup_steps": "linear warm-up iterations",
    "eval_every": "validate every N epochs",
    "select_metric": "validation metric that picks the best checkpoint",
    "eval_ks": "K of Recall@K in the final test",
    "eval_test_each_epoch": "also log test metrics per epoch (curves only, never for selection)",
    "eval_checkpoint": "weights of the final test evaluation",
    "eval_batch_size": "images per batch when embedding for evaluation",
    "seed": "one seed for every random stream of the run",
    "device": "where to train (auto: cuda > mps > cpu)", "amp": "autocast dtype on CUDA",
    "channels_last": "channels-last memory format (fast depthwise convolutions on CPUs)",
    "num_workers": "data loader worker processes",
    "run_dir": "folder of the run (none: a new folder under runs_root)",
    "runs_root": "where new run folders are made",
    "resume": "continue the run in run_dir from its last checkpoint",
    "checkpoint_every": "extra checkpoints every N steps (0: at epoch ends)",
    "log_every": "a metrics.jsonl step record every N steps",
    "ssr_diag_every": "SSR gradient-ratio diagnostic every N steps (0: never)",
    "ssr_diag_images": "fixed validation images of the SSR probe (0: no probe)",
    "quiet": "no progress bars",
}

#: The fields by topic, in the order ``dmlnb train --help`` lists them.
FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("dataset", "data_root", "dataset_options", "train_split", "val_split", "test_split",
             "image_size", "augment"),
    "DML loss": ("loss", "loss_params"),
    "SSR (the paper's method)": ("ssr", "ssr_prob", "ssr_weight", "ssr_levels", "ssr_images",
                                 "ssr_families", "ssr_sigma", "ssr_nested", "ssr_pairs",
                                 "rank_scale", "rank_alpha", "rank_beta", "rank_pos_weight",
                                 "ssr_uniformity"),
    "length and batches": ("epochs", "steps_per_epoch", "max_steps", "batch_size",
                           "samples_per_class"),
    "model": ("backbone", "pretrained", "embed_dim", "ssr_dim", "ssr_hidden", "pooling",
              "freeze_bn", "freeze_stages"),
    "optimisation": ("lr", "head_lr_mult", "weight_decay", "schedule", "lr_decay",
                     "lr_milestones", "warmup_steps"),
    "evaluation": ("eval_every", "select_metric", "eval_ks", "eval_test_each_epoch",
                   "eval_checkpoint", "eval_batch_size"),
    "execution": ("seed", "device", "amp", "channels_last", "num_workers"),
    "run directory and logging": ("run_dir", "runs_root", "resume", "checkpoint_every",
                                  "log_every", "ssr_diag_every", "ssr_diag_images", "quiet"),
}


def field_names() -> list[str]:
    """The names of every :class:`TrainConfig` field, in declaration order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def coerce_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """Accept a :class:`TrainConfig` or a dict of field names (validated the same way)."""
    return TrainConfig.from_dict(config)


# --- validation ----------------------------------------------------------------------------------
def _problems(c: TrainConfig) -> list[str]:
    """Every problem of ``c``, one line each (empty when valid)."""
    out: list[str] = []

    def run(check, *args, **kwargs) -> None:
        try:
            check(*args, **kwargs)
        except (ValueError, TypeError) as err:
            out.append(str(err))

    def is_bool(name: str) -> None:
        if not isinstance(getattr(c, name), bool):
            out.append(f"{name} must be true or false, got {getattr(c, name)!r}")

    def optional_int(name: str, minimum: int = 1) -> None:
        if getattr(c, name) is not None:
            run(check_positive_int, name, getattr(c, name), minimum)

    def optional_str(name: str) -> None:
        v = getattr(c, name)
        if v is not None and not isinstance(v, (str, Path)):
            out.append(f"{name} must be a path string or None, got {type(v).__name__}")

    # dataset, loss and backbone are names in registries of the layers above this one; they
    # are checked against them by dmlnb.experiment.check_config (before any run starts)
    for name in ("dataset", "loss", "backbone"):
        if not isinstance(getattr(c, name), str) or not getattr(c, name):
            out.append(f"{name} must be a name (a non-empty string), got {getattr(c, name)!r}")
    optional_str("data_root")
    for name in ("dataset_options", "loss_params"):
        if not isinstance(getattr(c, name), dict):
            out.append(f"{name} must be a dict of keyword arguments, got {getattr(c, name)!r}")
    run(check_choice, "train_split", c.train_split, SPLITS)
    run(check_choice, "val_split", c.val_split, (*SPLITS, None))
    run(check_choice, "test_split", c.test_split, SPLITS)
    for name in ("ssr", "ssr_nested", "pretrained", "augment", "eval_test_each_epoch",
                 "channels_last", "resume", "quiet"):
        is_bool(name)
    if c.freeze_bn is not None:
        is_bool("freeze_bn")
    run(check_range, "ssr_prob", c.ssr_prob, 0.0, 1.0)
    run(check_range, "ssr_weight", c.ssr_weight, 0.0)
    run(check_positive_int, "ssr_levels", c.ssr_levels, 2)
    run(check_positive_int, "ssr_images", c.ssr_images, 1)
    if not isinstance(c.ssr_families, tuple) or not c.ssr_families:
        out.append(f"ssr_families must be a non-empty list of {', '.join(VIEW_FAMILIES)}")
    else:
        for fam in c.ssr_families:
            run(check_choice, "ssr_families", fam, VIEW_FAMILIES)
    run(check_range, "ssr_sigma", c.ssr_sigma, 0.0, None, low_inclusive=False)
    run(check_choice, "ssr_pairs", c.ssr_pairs, RANK_PAIR_CHOICES)
    run(check_range, "rank_scale", c.rank_scale, 0.0, None, low_inclusive=False)
    run(check_range, "rank_alpha", c.rank_alpha, 0.0)
    run(check_range, "rank_beta", c.rank_beta, -1.0, 1.0)
    run(check_range, "rank_pos_weight", c.rank_pos_weight, 0.0)
    run(check_range, "ssr_uniformity", c.ssr_uniformity, 0.0)
    run(check_positive_int, "epochs", c.epochs)
    optional_int("steps_per_epoch")
    optional_int("max_steps")
    run(check_positive_int, "batch_size", c.batch_size, 2)
    run(check_positive_int, "samples_per_class", c.samples_per_class, 2)
    if (isinstance(c.batch_size, int) and isinstance(c.samples_per_class, int)
            and c.samples_per_class > 0 and c.batch_size % c.samples_per_class):
        out.append(f"batch_size={c.batch_size} must be a multiple of "
                   f"samples_per_class={c.samples_per_class} (class-balanced batches)")
    if (c.ssr is True and isinstance(c.ssr_images, int) and isinstance(c.batch_size, int)
            and c.ssr_images > c.batch_size):
        out.append(f"ssr_images={c.ssr_images} must be <= batch_size={c.batch_size}")
    for name in ("embed_dim", "ssr_dim", "ssr_hidden", "image_size", "eval_every",
                 "eval_batch_size", "log_every"):
        run(check_positive_int, name, getattr(c, name))
    run(check_choice, "pooling", c.pooling, POOLINGS)
    for name in ("freeze_stages", "warmup_steps", "num_workers", "checkpoint_every",
                 "ssr_diag_every", "ssr_diag_images"):
        run(check_positive_int, name, getattr(c, name), 0)
    run(check_range, "lr", c.lr, 0.0, None, low_inclusive=False)
    run(check_range, "head_lr_mult", c.head_lr_mult, 0.0, None, low_inclusive=False)
    run(check_range, "weight_decay", c.weight_decay, 0.0)
    run(check_choice, "schedule", c.schedule, SCHEDULES)
    run(check_range, "lr_decay", c.lr_decay, 0.0, 1.0, low_inclusive=False)
    if not isinstance(c.lr_milestones, tuple):
        out.append("lr_milestones must be a list of fractions of the run in (0, 1)")
    else:
        for m in c.lr_milestones:
            run(check_range, "lr_milestones", m, 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    run(check_choice, "select_metric", c.select_metric, SELECT_METRICS)
    if not isinstance(c.eval_ks, tuple) or not c.eval_ks:
        out.append("eval_ks must be a non-empty list of positive integers")
    else:
        for k in c.eval_ks:
            run(check_positive_int, "eval_ks", k)
    run(check_choice, "eval_checkpoint", c.eval_checkpoint, CHECKPOINT_CHOICES)
    if c.eval_checkpoint == "best" and c.val_split is None:
        out.append("eval_checkpoint='best' needs a val_split; set val_split or "
                   "eval_checkpoint='last'")
    if isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0:
        out.append(f"seed must be a non-negative integer, got {c.seed!r}")
    if not (isinstance(c.device, str) and (c.device in DEVICE_CHOICES
                                           or re.fullmatch(r"cuda:\d+", c.device))):
        out.append(f"device={c.device!r} is not valid; choose one of "
                   f"{', '.join(map(repr, DEVICE_CHOICES))} or 'cuda:N'")
    run(check_choice, "amp", c.amp, AMP_CHOICES)
    optional_str("run_dir")
    if not isinstance(c.runs_root, (str, Path)):
        out.append(f"runs_root must be a path string, got {c.runs_root!r}")
    return out


# --- the paper's protocol ----------------------------------------------------------------------
def _paper(dataset: str, dim: int) -> dict[str, Any]:
    """docs/method.md "Training protocol": ResNet-50 (ImageNet), 224 px, batch 120 = 30 x 4, AdamW
    lr 1e-4 with heads at 10x, weight decay 4e-4, ~100 epochs, step schedule, margin loss with
    distance-weighted sampling, SSR with p = 0.8, gamma = 0.8, N = 4, M = 20."""
    return {
        "dataset": dataset,
        "backbone": "resnet50",
        "pretrained": True,
        "image_size": D.CROP,
        "augment": True,
        "embed_dim": dim,
        "batch_size": D.CLASSES_PER_BATCH * D.SAMPLES_PER_CLASS,
        "samples_per_class": D.SAMPLES_PER_CLASS,
        "lr": D.LR,
        "head_lr_mult": D.HEAD_LR_MULT,
        "weight_decay": D.WEIGHT_DECAY,
        "epochs": PAPER_EPOCHS,
        "steps_per_epoch": None,
        "schedule": "step",
        "loss": "margin",
        "ssr": True,
        "eval_ks": list(D.SOP_RECALL_KS if dataset == "sop" else D.RECALL_KS),
        "num_workers": 8,
        "device": "auto",
    }


def _pretrained_cpu(dataset: str) -> dict[str, Any]:
    """The pretrained regime on the embedded data, sized for 2 CPU cores: ImageNet
    EfficientNet-Lite0 fine-tuned at 64 px with the paper's learning rates (1e-4 on the
    backbone, heads at 10x), BatchNorm frozen, channels_last (fast depthwise convolutions)."""
    return {
        "dataset": dataset,
        "backbone": D.PRETRAINED_CPU_BACKBONE,
        "pretrained": True,
        "image_size": D.PRETRAINED_CPU_IMAGE_SIZE,
        "batch_size": D.PRETRAINED_CPU_BATCH_SIZE,
        "samples_per_class": D.SAMPLES_PER_CLASS,
        "lr": D.LR,
        "head_lr_mult": D.HEAD_LR_MULT,
        "weight_decay": D.WEIGHT_DECAY,
        "epochs": D.PRETRAINED_CPU_EPOCHS,
        "steps_per_epoch": D.PRETRAINED_CPU_STEPS_PER_EPOCH,
        "schedule": "cosine",
        "channels_last": True,
        "device": "cpu",
    }


PRESETS: dict[str, dict[str, Any]] = {
    **{f"paper-{name}-{dim}": _paper(name, dim)
       for name in ("cub200", "cars196", "sop") for dim in (128, 512)},
    **{f"cpu-{name}-lite0": _pretrained_cpu(name) for name in ("glyphs", "icons")},
}
"""Settings as field overrides. ``paper-<benchmark>-<dim>``: the paper's protocol per benchmark and
embedding size (``data_root`` must still be given; 128-d is the ranking-metric/ablation protocol,
512-d the state-of-the-art one). ``cpu-<glyphs|icons>-lite0``: the pretrained regime on the
embedded data on a 2-core CPU (ImageNet EfficientNet-Lite0, 64 px)."""


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name`` (see :data:`PRESETS`), with ``overrides``."""
    check_choice("preset", name, sorted(PRESETS))
    return TrainConfig.from_dict({**PRESETS[name], **overrides})
