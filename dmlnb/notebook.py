"""Helpers the notebooks call: parameter validation, and saving figures for the README.

A dmlnb notebook's first code cell is tagged ``parameters`` (papermill injects ``-p`` overrides
right after it); its second cell calls :func:`parameters` (or :func:`train_parameters` in the
training notebook) with ``globals()``. Every variable defined at that point is a parameter, so a
misspelt or unknown ``-p name value`` and an invalid value both stop that cell with one
:class:`ValueError` naming the parameter and the valid choices or range.

Each notebook's own knobs are declared here, in :data:`KNOBS` (name -> default and check), so the
rules are tested once and the notebooks stay thin.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmlnb._validate import check_choice, check_keys, check_positive_int, check_range

__all__ = ["KNOBS", "Knob", "notebook_dir", "parameters", "save_figure", "train_parameters"]

# names IPython / Jupyter put into a kernel's globals that are not parameters
_KERNEL_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})


@dataclass(frozen=True)
class Knob:
    """A notebook parameter: its default, a one-line help, and a check ``(name, value) -> None``."""

    default: Any
    help: str
    check: Callable[[str, Any], Any] | None = None


def _choice(*choices: Any) -> Callable[[str, Any], Any]:
    return lambda name, value: check_choice(name, value, choices)


def _int(minimum: int = 1) -> Callable[[str, Any], Any]:
    return lambda name, value: check_positive_int(name, value, minimum)


def _number(low: float | None = None, high: float | None = None) -> Callable[[str, Any], Any]:
    return lambda name, value: check_range(name, value, low, high)


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _path(name: str, value: Any) -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path string, got {type(value).__name__} ({value!r})")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _families(name: str, value: Any) -> None:
    from dmlnb.views import FAMILIES

    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise TypeError(f"{name} must be a family name or a list of them; choose from {FAMILIES}")
    for v in values:
        check_choice(name, v, FAMILIES)


def _projection(name: str, value: Any) -> None:
    from dmlnb.viz import PROJECTIONS

    check_choice(name, value, PROJECTIONS)


_FIGURES = Knob(None, "folder to save the figures in (HTML + plotly JSON); None: do not save",
                _optional(_path))

#: Each notebook's own parameters (the training notebook adds these to the config fields).
KNOBS: dict[str, dict[str, Knob]] = {
    "views": {
        "dataset": Knob("glyphs", "dataset to take images from"),
        "split": Knob("test", "split to take images from", _choice("train", "val", "trainval", "test")),
        "n_images": Knob(3, "images shown in the gallery", _int()),
        "levels": Knob(4, "levels N of the gallery (PAPER: N = 4)", _int()),
        "sigma": Knob(0.2, "schedule t_n = tanh(sigma n) (REPRO: 0.2)", _number(0.0)),
        "families": Knob(("crop", "perspective", "color"), "families in the gallery", _families),
        "run_dir": Knob(None, "a finished run whose model the explorer reads out", _optional(_path)),
        "quick_train_steps": Knob(0, "no run_dir: train a tiny SSR model this many steps (0: use model)",
                                  _int(0)),
        "model": Knob("shipped", "no run_dir, no quick training: 'shipped' (the shipped SSR run), "
                      "'pretrained' (EfficientNet-Lite0, trained on first use, then cached) or "
                      "'none' (pixels only)", _choice("shipped", "pretrained", "none")),
        "seed": Knob(0, "seed of the image picks and view directions", _int(0)),
        "figures_dir": _FIGURES,
    },
    "train": {
        "gallery_queries": Knob(6, "queries in the retrieval gallery", _int()),
        "gallery_k": Knob(5, "neighbours shown per query", _int()),
        "figures_dir": _FIGURES,
    },
    "ablations": {
        "train_notebook": Knob("02_train.ipynb", "the notebook each grid point executes", _path),
        "sweep_dir": Knob("sweeps/ablations", "sweep directory (completed points are skipped)", _path),
        "grid": Knob(None, "grid (dict or list of dicts) or YAML path; None: the small default grid"),
        "seeds": Knob(2, "seeds per setting in the default grid", _int()),
        "steps": Knob(30, "training steps per point in the default grid", _int()),
        "jobs": Knob(2, "points run at the same time", _int()),
        "metrics": Knob(("map@r", "recall@1", "r_precision"), "test metrics in the table"),
        "figures_dir": _FIGURES,
    },
    "intraclass": {
        "baseline_run": Knob(None, "finished baseline run (None: the shipped one, or a brief one "
                             "with train_steps > 0)", _optional(_path)),
        "ssr_run": Knob(None, "finished SSR run (None: the shipped one, or a brief one with "
                        "train_steps > 0)", _optional(_path)),
        "train_steps": Knob(0, "runs not given: 0 uses the shipped pair, N > 0 trains brief runs "
                            "of N steps", _int(0)),
        "runs_root": Knob("runs", "where the brief runs are written", _path),
        "projection": Knob("umap", "2-d map of the embeddings: 'umap' or 'pca' (fast)", _projection),
        "max_points": Knob(1500, "test images drawn in the maps (a random subset)", _int(10)),
        "focus_class": Knob("a", "class whose items are coloured by typeface attribute"),
        "attribute": Knob("category", "typeface attribute for the focus class",
                          _choice("family", "weight", "italic", "category")),
        "n_trajectories": Knob(4, "images whose views are traced through the map", _int()),
        "levels": Knob(6, "strengths along each trajectory", _int()),
        "max_strength": Knob(0.8, "largest strength traced (at 1 a crop keeps nothing)",
                             _number(0.0, 1.0)),
        "families": Knob(("crop", "perspective", "color"), "families of the traced views", _families),
        "seed": Knob(0, "seed of subsets, projections and view directions", _int(0)),
        "figures_dir": _FIGURES,
    },
}


def _user_names(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The variables a notebook has defined: no private names, kernel names, modules or functions."""
    return {
        k: v for k, v in namespace.items()
        if not k.startswith("_") and k not in _KERNEL_NAMES
        and not isinstance(v, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type))
    }


def parameters(notebook: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a notebook's parameters and return them as a dict (missing ones at their default).

    Parameters
    ----------
    notebook : {"views", "train", "ablations", "intraclass"}
        Which notebook's knobs (:data:`KNOBS`).
    namespace : mapping
        The notebook's ``globals()`` right after the parameters cell (and papermill's injected one).

    Raises
    ------
    ValueError or TypeError
        An unknown name (listing the valid ones), or an invalid value (naming it and the choices).
    """
    check_choice("notebook", notebook, sorted(KNOBS))
    knobs = KNOBS[notebook]
    given = _user_names(namespace)
    check_keys(given, knobs, f"parameters of the {notebook} notebook")
    out = {name: given.get(name, knob.default) for name, knob in knobs.items()}
    for name, knob in knobs.items():
        if knob.check is not None:
            knob.check(name, out[name])
    return out


def train_parameters(namespace: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The training notebook's parameters: ``(TrainConfig, knobs)``.

    Every :class:`~dmlnb.config.TrainConfig` field may be set (same names as ``dmlnb train`` and
    sweep grids), plus the notebook's own knobs (:data:`KNOBS` ``["train"]``). Unknown names and
    invalid values raise one ValueError naming them and the valid choices.
    """
    from dmlnb.config import field_names

    knobs = KNOBS["train"]
    given = _user_names(namespace)
    check_keys(given, list(field_names()) + list(knobs), "parameters of the train notebook")
    extra = {name: given.pop(name, knob.default) for name, knob in knobs.items()}
    for name, knob in knobs.items():
        if knob.check is not None:
            knob.check(name, extra[name])
    from dmlnb.experiment import check_config

    return check_config(_booleans_from_text(given)), extra


def changed_settings(config: Any) -> Any:
    """The settings of ``config`` that differ from :class:`~dmlnb.config.TrainConfig`'s
    defaults, as a small table (setting, value, default): what a notebook shows instead of
    the whole config (the run's ``config.json`` has every field)."""
    import pandas as pd

    from dmlnb.config import TrainConfig

    now, default = config.to_dict(), TrainConfig().to_dict()
    rows = [(k, json.dumps(v), json.dumps(default[k])) for k, v in now.items() if v != default[k]]
    return pd.DataFrame(rows, columns=["setting", "value", "default"]).set_index("setting")


def training_history(steps: Any) -> Any:
    r"""The step records of a run (``run.metrics("step")``) as a table, with ``ssr_rate_run``: the
    fraction of the logged steps so far *in the run* on which the SSR branch ran (the records'
    own ``ssr_rate`` counts from the start of the epoch, so it restarts at 0 or 1 every epoch).
    It settles near ``ssr_prob`` (p) as the steps accumulate.

    .. math:: \hat p_t = \frac{1}{t} \sum_{i \le t} \mathbb{1}[\text{branch ran at step } i]
    """
    import pandas as pd

    df = steps.copy() if isinstance(steps, pd.DataFrame) else pd.DataFrame(list(steps))
    if "ssr" in df.columns and len(df):
        flags = pd.to_numeric(df["ssr"], errors="coerce").fillna(0)
        df["ssr_rate_run"] = flags.expanding().mean()
    return df


def _booleans_from_text(given: dict[str, Any]) -> dict[str, Any]:
    """``-p ssr false`` reaches the notebook as the string ``"false"`` (papermill turns only
    ``True``/``False`` into booleans): read true/false/yes/no/1/0 as booleans for the
    :class:`~dmlnb.config.TrainConfig` fields that are booleans."""
    import typing

    from dmlnb.config import TrainConfig

    types_ = typing.get_type_hints(TrainConfig)
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    out = dict(given)
    for name, value in given.items():
        if isinstance(value, str) and value.lower() in words and bool in (
                types_.get(name), *typing.get_args(types_.get(name))):
            out[name] = words[value.lower()]
    return out


def notebook_dir() -> Path:
    """The folder the notebook runs in (papermill and JupyterLab set the cwd to it)."""
    return Path.cwd()


def save_figure(fig: Any, name: str, figures_dir: str | os.PathLike | None) -> Path | None:
    """Save ``fig`` as ``<figures_dir>/<name>.html`` (self-contained, hover images) and
    ``<name>.plotly.json`` (for :mod:`dmlnb.figures` to turn into PNG); nothing when
    ``figures_dir`` is None. Returns the HTML path."""
    if figures_dir is None:
        return None
    from dmlnb.viz import write_html

    folder = Path(figures_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_html(fig, folder / f"{name}.html")
    (folder / f"{name}.plotly.json").write_text(fig.to_json())
    index = folder / "index.json"  # what was written, in order, for the figures driver
    entries = json.loads(index.read_text()) if index.exists() else []
    if name not in entries:
        entries.append(name)
    index.write_text(json.dumps(entries, indent=1))
    return path


# --- glue the notebooks share (kept here so that it is tested) -----------------------------------
def setup() -> None:
    """Notebook defaults: plotly figures as the JupyterLab mimetype (no plotly.js copy per figure)."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype"


def pick_images(labels: Any, n: int, seed: int = 0, classes: Any = None) -> list[int]:
    """``n`` item indices from ``n`` different classes (fewer classes: repeats), seeded.

    ``classes`` restricts the draw to those labels."""
    import numpy as np

    check_positive_int("n", n)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pool = np.unique(labels) if classes is None else np.asarray(list(classes))
    chosen = rng.choice(pool, size=n, replace=len(pool) < n)
    return [int(rng.choice(np.flatnonzero(labels == c))) for c in chosen]


def family_gallery(
    images: Any,
    families: Any,
    levels: int,
    sigma: float,
    seed: int = 0,
) -> tuple[Any, list[str], list[float]]:
    """Views for a gallery: for each image, one row per family and one for their composition.

    Returns ``(views [rows, levels + 1, C, H, W], row labels, strengths t_0..t_N)``; column 0 is
    the original. Directions are nested (one per row) and seeded.
    """
    import torch

    from dmlnb.views import make_views, strength_schedule

    images = torch.as_tensor(images)
    families = (families,) if isinstance(families, str) else tuple(families)
    gen = torch.Generator().manual_seed(int(seed))
    rows, labels = [], []
    groups = [(f,) for f in families] + ([families] if len(families) > 1 else [])
    for b in range(len(images)):
        for group in groups:
            v = make_views(images[b:b + 1], levels=levels, families=group, sigma=sigma,
                           nested=True, generator=gen)[0]
            rows.append(torch.cat([images[b:b + 1], v]))
            labels.append(f"#{b + 1} " + " + ".join(group))
    strengths = [0.0] + [float(t) for t in strength_schedule(levels, sigma)]
    return torch.stack(rows), labels, strengths


def embed_images(model: Any, images: Any, batch_size: int = 512, ssr: bool = False) -> Any:
    """Metric (and with ``ssr=True`` also SSR) embeddings of a tensor of images, as numpy
    (:func:`dmlnb.experiment.embed` on the model's device)."""
    import torch

    from dmlnb.experiment import embed

    images = torch.as_tensor(images)
    data = torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    out = embed(model, data, batch_size=batch_size, device=next(model.parameters()).device,
                ssr=ssr)
    return (out["embeddings"], out["ssr"]) if ssr else out["embeddings"]


def dataset_of_run(run_dir: Any, split: str | None = None) -> Any:
    """The data split a run was evaluated on (:func:`dmlnb.experiment.run_dataset`)."""
    from dmlnb.experiment import run_dataset

    return run_dataset(run_dir, split)


def stack_images(dataset: Any, indices: Any) -> Any:
    """``[n, C, H, W]`` tensor of the images ``dataset[i][0]`` for ``i`` in ``indices``."""
    import torch

    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices])


def retrieval_examples(
    embeddings: Any, labels: Any, n_queries: int, k: int, seed: int = 0
) -> tuple[list[int], Any, Any]:
    """Queries from different classes and their top-``k`` neighbours (query excluded by index,
    cosine similarity; :func:`dmlnb.metrics.knn`).

    Returns ``(queries, neighbours [Q, k] int, correct [Q, k] bool)``.
    """
    import numpy as np

    from dmlnb.metrics import knn

    labels = np.asarray(labels)
    queries = pick_images(labels, n_queries, seed)
    _, idx = knn(np.asarray(embeddings)[queries], embeddings, k + 1)
    idx = idx.cpu().numpy()
    # drop the query itself by index (it is among its own k + 1 nearest), keep k others
    neighbours = np.stack([row[row != q][:k] for row, q in zip(idx, queries, strict=True)])
    return queries, neighbours, labels[neighbours] == labels[np.asarray(queries)][:, None]


def brief_run(
    runs_root: str | os.PathLike, ssr: bool, steps: int, seed: int = 0, **overrides: Any
) -> Path:
    """Train briefly on glyphs (baseline or SSR, same budget) and return the run directory
    ``RUNS_ROOT/brief/<baseline|ssr>-steps<N>-seed<S>``; a finished run there is reused and an
    interrupted one resumed (:func:`dmlnb.train.fit_or_reuse`; a run there with other settings
    is refused, never overwritten)."""
    from dmlnb.train import fit_or_reuse

    settings = dict(ssr=ssr, seed=seed, epochs=1, steps_per_epoch=steps, quiet=True, **overrides)
    name = ("ssr" if ssr else "baseline") + f"-steps{steps}-seed{seed}"
    path = Path(runs_root) / "brief" / name
    return Path(fit_or_reuse(dict(settings, run_dir=str(path))).run_dir)


# --- runs shipped with the notebooks, and the pretrained one built on first use ----------------
#: ``notebooks/`` of this checkout: the shipped runs are in ``trained/``, runs built on first use
#: are cached in ``runs/`` (ignored by git)
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
#: the small baseline and SSR runs shipped in ``notebooks/trained`` (``make trained-runs`` rebuilds
#: them: ``dmlnb train`` with the package defaults, seed 0, ``--ssr`` / ``--no-ssr``, then
#: :func:`dmlnb.runs.export_run`)
SHIPPED_RUNS = {"baseline": "glyphs-baseline", "ssr": "glyphs-ssr"}
#: what the views explorer reads out when no run is given (``model`` of the views notebook)
EXPLORER_MODELS = ("shipped", "pretrained", "none")
PRETRAINED_PRESET = "cpu-glyphs-lite0"
PRETRAINED_STEPS = 40  # one epoch of the preset's batches: a few minutes on one CPU thread


def shipped_run(kind: str = "ssr") -> Path:
    """The shipped run ``"baseline"`` or ``"ssr"`` (``notebooks/trained/glyphs-<kind>``: small
    CNN on the embedded glyphs, the package defaults, seed 0, same settings but ``ssr``)."""
    from dmlnb.runs import is_run

    check_choice("kind", kind, tuple(SHIPPED_RUNS))
    path = NOTEBOOKS_DIR / "trained" / SHIPPED_RUNS[kind]
    if not is_run(path):
        raise FileNotFoundError(f"the shipped {kind} run {str(path)!r} is missing; rebuild it "
                                f"with `make trained-runs`")
    return path


def pretrained_run(steps: int = PRETRAINED_STEPS, seed: int = 0,
                   runs_root: str | os.PathLike | None = None, **overrides: Any) -> Path:
    """An SSR run of the pretrained preset ``cpu-glyphs-lite0`` (ImageNet EfficientNet-Lite0,
    64 px) trained ``steps`` steps (one epoch) on first use and cached in
    ``RUNS_ROOT/pretrained/glyphs-lite0-ssr-steps<N>-seed<S>`` (default ``RUNS_ROOT``:
    ``notebooks/runs``); a finished run there is reused at once, an interrupted one resumed
    (:func:`dmlnb.train.fit_or_reuse`, as :func:`brief_run`)."""
    from dmlnb.config import PRESETS
    from dmlnb.train import fit_or_reuse

    check_positive_int("steps", steps)
    root = Path(runs_root) if runs_root is not None else NOTEBOOKS_DIR / "runs"
    path = root / "pretrained" / f"glyphs-lite0-ssr-steps{steps}-seed{seed}"
    settings = dict(PRESETS[PRETRAINED_PRESET], ssr=True, seed=seed, epochs=1,
                    steps_per_epoch=steps, quiet=True, **overrides)
    return Path(fit_or_reuse(dict(settings, run_dir=str(path))).run_dir)


def _test_map(run_dir: Path) -> str:
    from dmlnb.runs import load_run

    value = load_run(run_dir).test_metrics.get("map@r")
    return "" if value is None else f", test MAP@R {value:.3f}"


def explorer_model(
    run_dir: str | os.PathLike | None, quick_train_steps: int = 0, seed: int = 0,
    runs_root: str | os.PathLike = "../runs", model: str = "shipped",
) -> tuple[Any, str]:
    """The model the views explorer reads out, and a note saying where it comes from.

    ``run_dir`` given: that run's selected checkpoint. Else ``quick_train_steps > 0``: a tiny SSR
    run on glyphs (:func:`brief_run`, reused when it exists). Else ``model``: ``"shipped"`` (the
    default) the shipped SSR run (:func:`shipped_run`, no training); ``"pretrained"`` the
    EfficientNet-Lite0 SSR run of :func:`pretrained_run` (trained on first use, minutes, then
    cached); ``"none"``: ``(None, note)``, the explorer shows pixels only.
    """
    from dmlnb.experiment import load_model

    check_choice("model", model, EXPLORER_MODELS)
    if run_dir is not None:
        return load_model(run_dir), f"model: the run in {run_dir}"
    if quick_train_steps > 0:
        path = brief_run(runs_root, ssr=True, steps=quick_train_steps, seed=seed)
        return load_model(path), f"model: a quick SSR run of {quick_train_steps} steps ({path})"
    if model == "shipped":
        path = shipped_run("ssr")
        return load_model(path), (f"model: the shipped SSR run (small CNN, seed 0{_test_map(path)}; "
                                  f"notebooks/trained/{path.name})")
    if model == "pretrained":
        path = pretrained_run(seed=seed)
        return load_model(path), (f"model: a pretrained EfficientNet-Lite0 SSR run of "
                                  f"{PRETRAINED_STEPS} steps{_test_map(path)} ({path})")
    return None, ("no model: the explorer shows the views and their pixel distance only; set "
                  "model='shipped', run_dir to a finished run (or quick_train_steps > 0) for the "
                  "embedding read-out")


def default_ablation_grid(seeds: int = 2, steps: int = 30) -> list[dict[str, Any]]:
    """The 03_ablations notebook's small default grid (minutes on a laptop CPU).

    Settings: baseline; SSR at the paper's defaults; SSR with gamma = 0.4; SSR with independent
    (non-nested) views; each for ``seeds`` seeds, ``steps`` steps, glyphs with 100 typefaces per
    character (``max_per_class``) so that the final test evaluation is quick.
    """
    check_positive_int("seeds", seeds)
    check_positive_int("steps", steps)
    common = {"epochs": 1, "steps_per_epoch": steps, "quiet": True,
              "dataset_options": {"max_per_class": 100}, "seed": list(range(seeds))}
    return [
        {**common, "ssr": False},
        {**common, "ssr": True},
        {**common, "ssr": True, "ssr_weight": 0.4},
        {**common, "ssr": True, "ssr_nested": False},
    ]


def explorer_data_options(
    run_dir: str | os.PathLike | None, quick_train_steps: int = 0, model: str = "shipped",
) -> dict[str, Any]:
    """Data options that make the views notebook's images those the explorer's model reads:
    ``{"image_size": N}`` when the run of :func:`explorer_model` (same arguments; nothing is
    trained here) was trained at another size than the default 32 px (the pretrained preset:
    64 px), else ``{}``."""
    from dmlnb.config import PRESETS, TrainConfig
    from dmlnb.runs import load_run

    check_choice("model", model, EXPLORER_MODELS)
    default = TrainConfig().image_size
    if run_dir is not None:
        size = load_run(run_dir).config.get("image_size", default)
    elif quick_train_steps > 0 or model != "pretrained":
        size = default
    else:
        size = PRESETS[PRETRAINED_PRESET].get("image_size", default)
    return {} if size == default else {"image_size": int(size)}


def intraclass_runs(
    baseline_run: str | os.PathLike | None, ssr_run: str | os.PathLike | None,
    train_steps: int = 0, runs_root: str | os.PathLike = "../runs", seed: int = 0,
) -> dict[str, Path]:
    """The baseline and SSR runs the intra-class notebook compares, ``{"baseline", "SSR"}``.

    A given run is used as it is; a missing one is, with ``train_steps > 0``, a brief run of that
    many steps (:func:`brief_run`, same seed and budget for both), and with ``train_steps = 0``
    (the default) the shipped run (:func:`shipped_run`: no training).
    """
    def pick(given: Any, ssr: bool) -> Path:
        if given is not None:
            return Path(given)
        if train_steps > 0:
            return brief_run(runs_root, ssr=ssr, steps=train_steps, seed=seed)
        return shipped_run("ssr" if ssr else "baseline")

    return {"baseline": pick(baseline_run, False), "SSR": pick(ssr_run, True)}


_EMBEDDINGS_CACHE = NOTEBOOKS_DIR / "runs" / "embeddings"


def run_embeddings(run: Any, cache_dir: str | os.PathLike | None = _EMBEDDINGS_CACHE) -> dict[str, Any]:
    """The final test embeddings of a finished run (``embeddings``, ``labels``, ``indices``).

    Its ``embeddings.npz`` when it has one. A run without it (a slim copy, as shipped in
    ``notebooks/trained``: :func:`dmlnb.runs.export_run`) gets them recomputed on the CPU from
    its checkpoint on its test split with its evaluation batch size, which gives the values the
    run wrote, bit for bit (about a minute on one thread for the full glyph test split); they are
    then cached in ``cache_dir`` (default ``notebooks/runs/embeddings``, ignored by git; ``None``:
    no cache) under the run's name and a hash of its checkpoint, so a second open reads them
    back and a rebuilt run is recomputed."""
    import hashlib

    from dmlnb.experiment import embed, load_model, run_dataset
    from dmlnb.runs import EMBEDDINGS_FILE, load_run, save_npz

    run = run if hasattr(run, "embeddings") else load_run(run)
    if (run.path / EMBEDDINGS_FILE).exists():
        return run.embeddings()
    cached = None
    if cache_dir is not None:
        ckpt = sorted((run.path / "checkpoints").glob("*.pt"))
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in ckpt)).hexdigest()[:16]
        cached = Path(cache_dir) / f"{run.path.name}-{digest}.npz"
        if cached.is_file():
            import numpy as np

            with np.load(cached) as z:
                return {k: z[k] for k in z.files}
    cfg = run.train_config()
    out = embed(load_model(run), run_dataset(run), batch_size=cfg.eval_batch_size)
    if cached is not None:
        save_npz(cached, **out)
    return out
