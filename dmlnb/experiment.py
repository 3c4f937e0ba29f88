"""From a :class:`~dmlnb.config.TrainConfig` to the parts of an experiment.

Everything a trainer, a study or a notebook builds from a config lives here, once: the data
splits with their preprocessing (:func:`load_split`), the model (:func:`build_model`,
:func:`seeded_model`), the metric loss (:func:`build_metric_loss`), the embedding pass
(:func:`embed`), the evaluation of embeddings with the config's settings
(:func:`evaluate_embeddings`), a run's model and data read back (:func:`load_model`,
:func:`run_dataset`, :func:`evaluate_run`), and the checks of a config against the registries
and the data (:func:`check_config`), made before a run directory exists.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dmlnb import runs
from dmlnb.config import TrainConfig, coerce_config
from dmlnb.defaults import EVAL_BATCH_SIZE, KMEANS_SEED
from dmlnb.distributed import autocast

__all__ = [
    "load_split", "SeededDataset", "build_model", "seeded_model", "build_metric_loss",
    "embed", "forward", "evaluate_embeddings", "load_model", "run_dataset", "evaluate_run",
    "check_config", "loader_generator", "CHIRAL_DATASETS",
]

# characters and icons: a mirrored b is a d, a mirrored go-next is go-previous, so no horizontal
# flip for them (a dmlnb decision)
CHIRAL_DATASETS = frozenset({"glyphs", "digits", "icons"})


# --- data ----------------------------------------------------------------------------------------
def load_split(cfg: TrainConfig, split: str, train: bool = False) -> torch.utils.data.Dataset:
    """Load ``split`` as float ``[C, H, W]`` images in [0, 1] of side ``image_size``.

    In-memory sets (glyphs, Fashion-MNIST, digits, icons) are resized once at load time (their
    ``image_size`` option); with ``augment`` the training split gets the field's random
    pipeline on tensors (Resize -> RandomCrop -> flip, no flip for character data). Sets read
    from files (CUB, Cars, SOP, folders) get :func:`dmlnb.data.preprocess.build_transform`:
    train (with ``augment``) or test pipeline at ``crop = image_size``, ``resize =
    resize_for(image_size)`` (256 for 224). A training split with a random pipeline is wrapped
    in :class:`SeededDataset` so its randomness comes from the run's seed. ``dataset_options``
    given by the user win over these choices.
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
            flip = cfg.dataset not in CHIRAL_DATASETS
            options.setdefault("transform", build_transform(
                True, resize=resize_for(cfg.image_size), crop=cfg.image_size, flip=flip))
    ds = load_dataset(cfg.dataset, split, cfg.data_root, **options)
    return SeededDataset(ds) if augment else ds


class SeededDataset(torch.utils.data.Dataset):
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


def loader_generator(seed: int, epoch: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed from a generator when it starts an epoch; give
    it one of its own so that torch's global generator is left alone."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


# --- model and losses ----------------------------------------------------------------------------
def build_model(cfg: TrainConfig, in_channels: int, pretrained: bool | None = None) -> nn.Module:
    """The :class:`dmlnb.model.EmbeddingNet` of ``cfg`` (``pretrained`` overrides the config:
    :func:`load_model` passes False since it loads the run's weights anyway)."""
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
    from dmlnb.losses import build_loss

    params = {"generator": generator, **cfg.loss_params}
    for name, value in _loss_needs(cfg.loss, num_classes, cfg.embed_dim):
        params.setdefault(name, value)
    return build_loss(cfg.loss, **params)


def _loss_needs(loss: str, num_classes: int, embed_dim: int) -> Iterator[tuple[str, int]]:
    from dmlnb.losses import LOSSES

    needed = inspect.signature(LOSSES[loss].__init__).parameters
    for name, value in (("num_classes", num_classes), ("embed_dim", embed_dim)):
        if name in needed and needed[name].default is inspect.Parameter.empty:
            yield name, value


# --- embedding and evaluation --------------------------------------------------------------------
def forward(model: nn.Module, x: torch.Tensor, ssr: bool):
    """``(metric embeddings, SSR embeddings or None)`` of one pass of ``model`` over ``x``."""
    out = model(x, ssr=ssr)
    if isinstance(out, tuple):
        return out if ssr else (out[0], None)
    return out, None


def embed(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    amp: str = "none",
    ssr: bool = False,
    quiet: bool = True,
    desc: str = "embed",
) -> dict[str, np.ndarray]:
    """Metric embeddings (and SSR embeddings with ``ssr``) of every item of ``dataset``, in
    order, with the model in eval mode: ``{"embeddings", "labels", "indices"[, "ssr"]}``.

    The pass runs under :func:`torch.inference_mode`. An in-memory set served as is (a
    :class:`~dmlnb.data.tensor.TensorImageDataset` without a transform) is cut into batches
    straight from its stored images (:func:`_tensor_batches`: the same tensors as its items
    stacked, without a DataLoader); other sets go through a DataLoader with ``num_workers``.
    Batches follow the model's memory format (``channels_last`` input for a ``channels_last``
    model; the values are the same). Embeddings stay on ``device`` until the end (one copy to
    the host, no synchronisation per batch on a GPU). The result is bit for bit that of a plain
    ``torch.no_grad`` loop over a DataLoader with the same ``batch_size``.
    """
    from dmlnb.progress import progress_bar as tqdm  # stored notebooks keep the final line

    device = torch.device(device)
    pin = device.type == "cuda"
    memory_format = torch.channels_last if _is_channels_last(model) else None
    batches = _tensor_batches(dataset, batch_size, pin)
    if batches is None:
        batches = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
            pin_memory=pin, generator=loader_generator(0, 0),
        )
    if not quiet:
        batches = tqdm(batches, desc=desc, leave=False, total=-(-len(dataset) // batch_size))
    was_training = model.training
    model.eval()
    embs, ssrs, labels = [], [], []
    try:
        with torch.inference_mode():
            for x, y in batches:
                x = x.to(device, non_blocking=True)
                if memory_format is not None:
                    x = x.contiguous(memory_format=memory_format)
                with autocast(device, amp):
                    z, zs = forward(model, x, ssr)
                embs.append(z.float())
                labels.append(torch.as_tensor(y))
                if ssr:
                    ssrs.append(zs.float())
            out = {
                "embeddings": torch.cat(embs).cpu().numpy(),
                "labels": torch.cat(labels).cpu().numpy().astype(np.int64),
                "indices": np.arange(len(dataset), dtype=np.int64),
            }
            if ssr:
                out["ssr"] = torch.cat(ssrs).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _tensor_batches(dataset, batch_size: int, pin: bool):
    """``(images, labels)`` batches of an in-memory set cut from its stored uint8 tensor, or
    None when ``dataset`` is not one whose items are exactly ``images[i].float() / 255``
    (a :class:`~dmlnb.data.tensor.TensorImageDataset`, ``__getitem__`` not overridden, no
    transform). A slice converted at once gives the same values as the items converted one by
    one and stacked by the DataLoader's collate, at a fraction of the cost."""
    from dmlnb.data.tensor import TensorImageDataset

    if not (isinstance(dataset, TensorImageDataset) and dataset.transform is None
            and type(dataset).__getitem__ is TensorImageDataset.__getitem__):
        return None
    images, labels = dataset.images, torch.as_tensor(np.asarray(dataset.labels, dtype=np.int64))
    n = len(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size should be a positive integer, got {batch_size!r}")

    def batches():
        for start in range(0, n, batch_size):
            x = images[start:start + batch_size].float().div_(255.0)
            yield (x.pin_memory() if pin else x), labels[start:start + batch_size]
    return batches()


def _is_channels_last(model: nn.Module) -> bool:
    """Whether ``model``'s convolution weights are in ``channels_last`` memory format (as
    ``model.to(memory_format=torch.channels_last)`` leaves them, :class:`~dmlnb.train.Trainer`
    with ``channels_last``)."""
    return any(p.dim() == 4 and not p.is_contiguous()
               and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def evaluate_embeddings(emb: Mapping[str, np.ndarray], cfg: TrainConfig,
                        full: bool) -> dict[str, float]:
    """The metrics of ``emb`` (an :func:`embed` result) with the config's settings: ``full``
    (the final test) gives Recall@``eval_ks``, R-Precision, MAP@R, NMI and F1; otherwise
    (validation) Recall@1, R-Precision, MAP@R and the selection metric only."""
    from dmlnb.metrics import evaluate

    include = None
    if not full:  # validation: skip KMeans unless selection needs it
        include = ["recall@1", "r_precision", "map@r"]
        if cfg.select_metric not in include:
            include.append(cfg.select_metric)
    ks = cfg.eval_ks if full else (1,)
    return evaluate(emb["embeddings"], emb["labels"], ks=ks, include=include,
                    kmeans_seed=KMEANS_SEED)


# --- a run read back -----------------------------------------------------------------------------
def _as_run(run: runs.Run | str | Path) -> runs.Run:
    return run if isinstance(run, runs.Run) else runs.load_run(run)


def load_model(run: runs.Run | str | Path, which: str = "best",
               device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the :class:`~dmlnb.model.EmbeddingNet` of a run with the weights of its
    ``"best"`` (falls back to ``"last"`` when there is no best) or ``"last"`` checkpoint, in
    eval mode on ``device``. Never downloads weights: the backbone is built with
    ``pretrained=False`` and the run's weights are loaded over it."""
    run = _as_run(run)
    config = run.train_config()
    path = runs.checkpoint_path(run.path, which)
    if which == "best" and not path.exists():
        path = runs.checkpoint_path(run.path, "last")
    if not path.exists():
        raise FileNotFoundError(f"{run.path} has no checkpoint yet ({path.name} missing)")
    state = runs.load_checkpoint(path)
    model = build_model(config, in_channels=int(state["in_channels"]), pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def run_dataset(run: runs.Run | str | Path, split: str | None = None):
    """The data split a run was evaluated on (its test split by default), loaded exactly as the
    run loaded it (its dataset options, image size and preprocessing): item ``i`` is the image
    behind row ``i`` of the run's ``embeddings.npz``."""
    cfg = _as_run(run).train_config()
    return load_split(cfg, split or cfg.test_split, train=False)


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str | None = None,
    which: str = "best",
    device: str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    quiet: bool = True,
) -> dict[str, float]:
    """Re-evaluate a run's ``which`` checkpoint on ``split`` (default: its test split) with the
    run's evaluation settings (``dmlnb eval RUN_DIR``). Writes nothing."""
    run = runs.load_run(run_dir)
    model = load_model(run, which=which, device=device)
    emb = embed(model, run_dataset(run, split), batch_size=batch_size, device=device, quiet=quiet)
    return evaluate_embeddings(emb, run.train_config(), full=True)


# --- checks before a run exists ------------------------------------------------------------------
def check_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """Check a config against the registries (dataset, loss, backbone names and their
    parameters), so that a run is refused before its directory exists; returns the config.

    :class:`~dmlnb.config.TrainConfig` itself checks every field that needs no other layer;
    this adds what only the registries know: a known dataset, loss and backbone, and the loss's
    keyword parameters (``loss_params``). Every problem is reported in one :class:`ValueError`.
    (The dataset's options, its root and the batch layout are checked by loading the data,
    which :func:`dmlnb.train.fit` also does before it creates the run directory.)
    """
    from dmlnb._validate import check_choice, check_keys
    from dmlnb.data import dataset_names
    from dmlnb.losses import LOSSES, loss_params
    from dmlnb.model import BACKBONES

    problems: list[str] = []
    try:
        cfg = coerce_config(config)
        values: Mapping[str, Any] = cfg.to_dict()
    except ValueError as err:  # report the registry problems together with the config's
        cfg, values = None, config if isinstance(config, Mapping) else {}
        problems += str(err).split("\n  - ")[1:]

    def run(check, *args) -> None:
        try:
            check(*args)
        except (ValueError, TypeError) as err:
            problems.append(str(err))

    default = TrainConfig()
    dataset, loss = values.get("dataset", default.dataset), values.get("loss", default.loss)
    run(check_choice, "dataset", dataset, tuple(dataset_names()))
    run(check_choice, "loss", loss, tuple(LOSSES))
    run(check_choice, "backbone", values.get("backbone", default.backbone), tuple(BACKBONES))
    if loss in LOSSES and isinstance(values.get("loss_params", {}), Mapping):
        run(check_keys, values.get("loss_params", {}),
            [n for n in loss_params(loss) if n != "generator"], f"loss_params of {loss!r}")
    if problems:
        raise ValueError("invalid TrainConfig:\n  - " + "\n  - ".join(problems))
    return cfg
