"""The study: does self-supervised ranking keep intra-class structure, and does it help retrieval?

One command, ``dmlnb study --out study --jobs 2`` (``make study``), runs the whole study as a
papermill sweep of ``notebooks/02_train.ipynb`` (:mod:`dmlnb.sweep`: one executed notebook and one
run directory per point; re-running skips finished points), then measures every run and writes

- ``OUT/runs.csv``      one row per run: parameters, test metrics, intra-class measures,
- ``OUT/settings.csv``  one row per setting: mean and std over seeds,
- ``OUT/paired.csv``    baseline vs SSR per (dataset, loss), paired across seeds,
- ``OUT/results.md``    the tables as Markdown (spliced into the README by ``--readme``),
- ``OUT/figures/``      PNG and interactive HTML figures,
- ``OUT/budget.json``   wall time of every part.

Finished points are reused: those whose run directory says ``ok`` and, where the run
directories are not on this machine (they are not committed), the rows of the committed
``runs.csv`` / ``search.csv`` that name the same point (its digest, :func:`dmlnb.sweep.point_digest`)
and the commit that measured it (:func:`recorded_points`).

The grid (:func:`study_grid`): baseline vs SSR for the margin and the multi-similarity loss on the
glyphs, 5 seeds each, with the package's default budget for every run; ablations of gamma, p, N,
nested vs independent views and the families on the margin loss with 2 seeds; the headline
comparison again on Fashion-MNIST with 3 seeds. The untrained network (same seeds) is a reference row everywhere.

Intra-class measures of a trained model (:func:`intraclass_measures`), on the test classes:

- view-ranking consistency (:func:`dmlnb.metrics.view_ranking_consistency`) of nested views made from
  ``VIEW_IMAGES`` fixed test images, in the metric and in the SSR embedding;
- typeface attribute retrieval within a class (:func:`dmlnb.metrics.attribute_retrieval`, glyphs
  only): how much more often than chance the nearest same-class neighbour shares the query's family,
  weight, italic flag or style category;
- intra-class spread (:func:`dmlnb.metrics.intraclass_spread`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dmlnb.config import PRESETS, TrainConfig
from dmlnb.measure import intraclass_measures, measure_run, measure_untrained  # noqa: F401
from dmlnb.runs import write_json

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_train.ipynb"
HEADLINE_LOSSES = ("margin", "multisimilarity")
SEEDS = (0, 1, 2, 3, 4)
ABLATION_SEEDS = (0, 1)
FASHION_SEEDS = (0, 1, 2)
#: ablations of the SSR settings on the margin loss (each differs from the defaults in one field)
ABLATIONS: tuple[dict[str, Any], ...] = (
    {"ssr_weight": 2.0},
    {"ssr_levels": 2},
    {"ssr_nested": False},
    {"ssr_families": ["crop"]},
)
#: Fashion-MNIST has 5 training classes: 5 classes x 16 images per batch
FASHION = {"dataset": "fashion_mnist", "batch_size": 80, "samples_per_class": 16}
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi", "f1")
PAIRED_IN_REPORT = ("recall@1", "map@r", "r_precision", "nmi", "view_tau_metric", "view_tau_ssr",
                    "spread", "rho", "density_ratio", "lift_family", "lift_weight", "lift_theme")
#: the SSR settings a study row is named by (:func:`setting_name`)
SSR_FIELDS = ("ssr_prob", "ssr_weight", "ssr_levels", "ssr_images", "ssr_families", "ssr_sigma",
              "ssr_nested", "ssr_pairs", "rank_scale", "rank_alpha", "rank_beta", "rank_pos_weight",
              "ssr_uniformity")
_DEFAULTS = TrainConfig().to_dict()
#: the columns every row of runs.csv carries (from the run's config where the grid left them out)
IDENTITY = ("dataset", "loss", "backbone", "pretrained", "image_size", "ssr", "seed")

# --- the pretrained regime (the paper's) --------------------------------------------------------
PRETRAINED_DATASETS = ("glyphs", "icons")
#: per data set, on top of its ``cpu-<dataset>-lite0`` preset. The glyphs' validation (5,177) and
#: test (26,756) splits would cost more time to embed at every evaluation than the 100 training
#: steps take on the CPU: 300 images per class in every split (train 7,500, val 1,800, test 9,300).
#: The icons keep their recolour variants (train 3,235, val 880, test 4,009 images), so that a
#: theme family repeats within a class and its lift measures style within a class.
PRETRAINED_DATA: dict[str, dict[str, Any]] = {"glyphs": {"dataset_options": {"max_per_class": 300}},
                                              "icons": {"dataset_options": {"variants": True}}}
#: the SSR settings searched on the validation classes (seed :data:`SEARCH_SEED`) per data set and
#: loss, each a name and the fields it changes. "paper" is the paper's form with the values of the
#: package's defaults; the others answer the SSR diagnostics of the default runs: a ranking gradient
#: of a few per cent of the metric loss's (gamma = 2), a point-wise floor that never acts because
#: every S_n stays above beta = 0.5 (beta = 0.85), and an SSR head that maps different images to
#: nearly one point (the uniformity extension, not the paper's form).
SEARCH_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("paper", {}),
    ("gamma=2", {"ssr_weight": 2.0}),
    ("beta=0.85", {"rank_beta": 0.85}),
    ("uniformity=1 (extension)", {"ssr_uniformity": 1.0}),
)
SEARCH_SEED = 0
#: the search points evaluate the validation split as their "test" split: the test classes are
#: never seen while the settings are chosen
SEARCH_SELECT = "map@r"

#: SSR diagnostics of a run's summary (``ssr_diagnostics/...`` in the sweep table)
DIAGNOSTICS = ("ssr_diagnostics/rank_sort", "ssr_diagnostics/rank_pos", "ssr_diagnostics/ssr_grad_ratio",
               "ssr_diagnostics/ssr_cross_cos", "ssr_diagnostics/view_tau_metric",
               "ssr_diagnostics/view_tau_ssr")
INTRACLASS = (
    "view_pair_order_metric", "view_tau_metric", "view_pair_order_ssr", "view_tau_ssr",
    "spread", "rho", "density_ratio", "orig_r1_level1", "orig_r1_level2", "orig_r1_level3",
    "orig_r1_level4", "lift_family", "lift_weight", "lift_italic", "lift_category", "lift_theme",
)


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
def study_grid(quick: bool = False, fashion: bool = True) -> list[dict[str, Any]]:
    """The study's grid for :func:`dmlnb.sweep.expand_grid` (a list of mappings).

    ``quick=True`` is a miniature (2 seeds, 2 ablations, a handful of steps) for tests and for a
    look at the pipeline; its numbers mean nothing.
    """
    seeds = [0, 1] if quick else list(SEEDS)
    ab_seeds = [0] if quick else list(ABLATION_SEEDS)
    ablations = ABLATIONS[:2] if quick else ABLATIONS
    budget = {"epochs": 1, "steps_per_epoch": 3, "dataset_options": {"max_per_class": 40}} if quick else {}
    base = {"quiet": True, **budget}
    grid: list[dict[str, Any]] = [
        {**base, "dataset": "glyphs", "loss": list(HEADLINE_LOSSES), "ssr": [False, True], "seed": seeds}
    ]
    if fashion:
        fashion_budget = dict(budget)
        if quick:
            fashion_budget["dataset_options"] = {"max_per_class": 60}
        grid.append({**base, **fashion_budget, **FASHION, "loss": "multisimilarity",
                     "ssr": [False, True], "seed": seeds if quick else list(FASHION_SEEDS)})
    for ab in ablations:
        grid.append({**base, "dataset": "glyphs", "loss": "margin", "ssr": True, "seed": ab_seeds,
                     **{k: [v] if isinstance(v, list) else v for k, v in ab.items()}})
    return grid


def pretrained_base(dataset: str, quick: bool = False) -> dict[str, Any]:
    """The fields of one pretrained-regime run on ``dataset``: its ``cpu-<dataset>-lite0``
    preset, :data:`PRETRAINED_DATA`, quiet. ``quick``: 3 steps on 8 images per class."""
    base = {**PRESETS[f"cpu-{dataset}-lite0"], **PRETRAINED_DATA.get(dataset, {}), "quiet": True}
    if quick:
        base.update(epochs=1, steps_per_epoch=3, ssr_diag_images=8,
                    dataset_options={**base.get("dataset_options", {}), "max_per_class": 8})
    return base


def search_grid(
    datasets: Sequence[str] = PRETRAINED_DATASETS,
    losses: Sequence[str] = HEADLINE_LOSSES,
    candidates: Sequence[tuple[str, dict[str, Any]]] = SEARCH_CANDIDATES,
    *,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """The search on validation classes: one SSR run per (data set, loss, candidate) with seed
    :data:`SEARCH_SEED`, whose final evaluation is on the validation split (``test_split="val"``)."""
    # every candidate states every searched field (the defaults where it keeps them), so that
    # each sweep point is named by its values
    searched = list(dict.fromkeys(k for _, fields in candidates for k in fields))
    grid = []
    for dataset in datasets:
        for _name, fields in candidates:
            explicit = {k: fields.get(k, _DEFAULTS[k]) for k in searched}
            grid.append({**pretrained_base(dataset, quick), "loss": list(losses), "ssr": True,
                         "seed": SEARCH_SEED, "test_split": "val", **explicit})
    return grid


def search_results(
    table: pd.DataFrame,
    candidates: Sequence[tuple[str, dict[str, Any]]] = SEARCH_CANDIDATES,
    metric: str = SEARCH_SELECT,
    recorded: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (data set, loss, candidate) of a finished search sweep: the validation metrics
    (the search points' ``test/<metric>``: their test split is the validation split), the SSR
    diagnostics, and ``chosen`` (the best ``metric`` per data set and loss once every candidate of
    that data set and loss has finished; ties: the earlier candidate, so the paper's form wins a
    tie). ``recorded``: an earlier ``search.csv`` (:func:`recorded_points`); its finished rows
    stand for the points of ``table`` that have no finished run directory."""
    rows = []
    by_setting = {setting_name(pd.Series({"ssr": True, **fields})): name for name, fields in candidates}
    order = {name: i for i, (name, _) in enumerate(candidates)}
    for _, r in table.iterrows():
        name = by_setting.get(setting_name(r))
        if name is None:
            continue
        row = {"dataset": r["dataset"], "loss": r["loss"], "candidate": name,
               "setting": setting_name(r), "status": r.get("status"), "point": r.get("point")}
        for m in ("recall@1", "r_precision", "map@r", "nmi"):
            row[f"val_{m}"] = r.get(f"test/{m}", r.get(m))
        for k in ("rank_sort", "rank_pos", "ssr_grad_ratio", "ssr_cross_cos", "view_tau_ssr"):
            row[k] = r.get(f"ssr_diagnostics/{k}")
        row["seconds"] = r.get("seconds")
        rows.append(row)
    out = pd.DataFrame(rows)
    if recorded is not None and not recorded.empty:
        extra = _unreplaced(recorded, out)
        extra = extra[extra["candidate"].isin(list(order))].drop(columns="chosen", errors="ignore")
        out = pd.concat([out, extra], ignore_index=True)
    if out.empty:
        return out
    out["order"] = out["candidate"].map(order)
    out = out.sort_values(["dataset", "loss", "order"]).reset_index(drop=True)
    out["chosen"] = False
    for _, group in out.groupby(["dataset", "loss"]):
        done = group[group.status == "ok"]
        if set(done["candidate"]) != set(order):  # a search not finished chooses nothing yet
            continue
        values = pd.to_numeric(done[f"val_{metric}"], errors="coerce")
        if values.notna().any():
            out.loc[values.idxmax(), "chosen"] = True  # idxmax: the first of equal maxima
    return out.drop(columns="order")


def pretrained_grid(
    chosen: dict[tuple[str, str], dict[str, Any]],
    seeds: Sequence[int] = SEEDS,
    *,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """The pretrained study: per (data set, loss) of ``chosen`` (its SSR fields from the
    search), the baseline and the chosen SSR setting with every seed, and the paper's form as
    well when the search chose another setting (the ablation of the choice against the paper)."""
    grid, extra = [], []
    for (dataset, loss), fields in chosen.items():
        base = {**pretrained_base(dataset, quick), "loss": loss, "seed": list(seeds)}
        grid.append({**base, "ssr": False})
        grid.append({**base, "ssr": True, **fields})
        if fields:
            extra.append({**base, "ssr": True})
    return grid + extra


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def paired_comparison(
    table: pd.DataFrame, metrics: Sequence[str], *, by: Sequence[str] = ("dataset", "loss"),
) -> pd.DataFrame:
    """Each SSR setting minus the baseline per metric, paired by seed, for each group of ``by``.

    Rows with ``setting == "baseline"`` are compared with the rows of every other trained setting
    (``ssr``, ``ssr, <field>=<value>``; not ``untrained``) that shares at least 2 seeds (trained
    on the same CPU model, :data:`CPU_COLUMN`, where the table says).
    Columns: the group, ``setting``, ``metric``, ``n`` (paired seeds), ``baseline``, ``ssr``
    (means), ``diff`` (mean of the paired differences), ``diff_std``, ``t_p`` (two-sided paired
    t-test), ``wilcoxon_p`` (two-sided exact signed-rank test; with 5 seeds the smallest possible
    value is 0.0625, so it can never reach 0.05). A metric missing or infinite in any of the
    pairs (rho of a rank-deficient embedding) is left out for that setting.
    """
    from scipy import stats

    rows = []
    for key, group in table.groupby(list(by), sort=True):
        base = group[group.setting == "baseline"].set_index("seed")
        others = [x for x in dict.fromkeys(group.setting) if x not in ("baseline", "untrained")]
        for setting in sorted(others, key=lambda x: (x != "ssr", x)):
            ssr = group[group.setting == setting].set_index("seed")
            seeds = sorted(set(base.index) & set(ssr.index))
            if CPU_COLUMN in group.columns:  # an exact pair trained on one CPU model
                seeds = [s for s in seeds if str(base.loc[s, CPU_COLUMN]) == str(ssr.loc[s, CPU_COLUMN])]
            if len(seeds) < 2:
                continue
            for m in metrics:
                if m not in group.columns:
                    continue
                a = pd.to_numeric(base.loc[seeds, m], errors="coerce").to_numpy(dtype=float)
                b = pd.to_numeric(ssr.loc[seeds, m], errors="coerce").to_numpy(dtype=float)
                if not (np.isfinite(a).all() and np.isfinite(b).all()):
                    continue  # missing, or infinite (rho of a rank-deficient embedding)
                d = b - a
                t_p = float(stats.ttest_rel(b, a).pvalue) if d.std() > 0 else float("nan")
                w_p = float(stats.wilcoxon(b, a).pvalue) if np.any(d != 0) else float("nan")
                rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=False)),
                             "setting": setting, "metric": m, "n": len(seeds), "baseline": a.mean(),
                             "ssr": b.mean(), "diff": d.mean(), "diff_std": d.std(ddof=1),
                             "t_p": t_p, "wilcoxon_p": w_p})
    return pd.DataFrame(rows)


def setting_name(row: pd.Series) -> str:
    """``untrained``, ``baseline``, ``ssr`` (the defaults) or ``ssr, <field>=<value>, ...``: the
    SSR settings (:data:`SSR_FIELDS`) in which the row differs from
    :class:`~dmlnb.config.TrainConfig`'s defaults (a missing or empty column is the default)."""
    if row.get("setting") == "untrained":
        return "untrained"
    if not _truthy(row["ssr"]):
        return "baseline"
    changed = []
    for k in SSR_FIELDS:
        col = row.get(k)
        if col is None or (isinstance(col, float) and math.isnan(col)):
            continue
        default = _DEFAULTS[k]
        default = list(default) if isinstance(default, tuple) else default
        if not _same(col, default):
            value = json.loads(col) if isinstance(col, str) and col.startswith("[") else col
            changed.append(f"{k}={_fmt_value(value)}")
    return "ssr" if not changed else "ssr, " + ", ".join(changed)


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("true", "1", "1.0", "yes")


def _same(col: Any, v: Any) -> bool:
    if isinstance(v, list):
        try:
            return list(json.loads(col) if isinstance(col, str) else col) == v
        except (TypeError, ValueError):
            return False
    if isinstance(v, bool) or isinstance(col, bool):
        return str(col).lower() == str(v).lower()
    try:
        return float(col) == float(v)
    except (TypeError, ValueError):
        return str(col) == str(v)


def _fmt_value(v: Any) -> str:
    if isinstance(v, list):
        return "+".join(map(str, v))
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) >= 1 else str(v)
    return str(v)


# ------------------------------------------------------------------------------------------------
# Running and reporting
# ------------------------------------------------------------------------------------------------
def run_study(
    out: str | Path = "study",
    jobs: int = 2,
    *,
    quick: bool = False,
    fashion: bool = True,
    notebook: str | Path = NOTEBOOK,
    grid: list[dict[str, Any]] | None = None,
    analyze_only: bool = False,
    cell_timeout: float | None = None,
    notebook_timeout: float | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Run (or continue) the study into ``out`` and write its tables and figures.

    ``grid`` replaces :func:`study_grid` (tests use a miniature one). ``analyze_only`` trains
    nothing and reports the points finished so far (the others are listed as not finished).
    ``cell_timeout`` / ``notebook_timeout``: seconds a cell / a whole training notebook may run
    before the point is stopped and recorded as failed (default: ``02_train``'s,
    :data:`dmlnb.execute.DEFAULT_TIMEOUTS`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget: dict[str, Any] = {"jobs": jobs, "cores": os.cpu_count(), "quick": quick,
                              "code": _code_version()}
    recorded = recorded_points(out / "runs.csv")
    t0 = time.perf_counter()
    if not analyze_only:
        _run_unrecorded(notebook, grid or study_grid(quick, fashion), out / "runs", recorded, jobs=jobs,
                        cell_timeout=cell_timeout, notebook_timeout=notebook_timeout, progress=progress)
    table = _collected(out / "runs")
    budget["sweep_s"] = round(time.perf_counter() - t0, 1)
    return analyze(out, table, budget, quick=quick, recorded=recorded)


def analyze(out: Path, table: pd.DataFrame, budget: dict[str, Any], *, quick: bool = False,
            preamble: str = "", recorded: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Measure every finished run of the sweep table ``table`` (points under ``out/runs``), add
    the ``recorded`` rows (:func:`recorded_points` of an earlier runs.csv) of the points without a
    finished run directory and the untrained reference rows, and write runs.csv, settings.csv,
    paired.csv, results.md (with ``preamble`` first), the figures and budget.json into ``out``.
    A row measured here gets ``budget["code"]`` in :data:`CODE_COLUMN`; a recorded row keeps its own."""
    t0 = time.perf_counter() - budget.get("sweep_s", 0.0)
    t1 = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    for _, r in table.iterrows():
        row = r.to_dict()
        if row.get("status") == "ok":
            run_dir = _run_dir_of(out / "runs", row)
            row.update(measure_run(run_dir))
            _fill_identity(row, run_dir)
        rows.append(row)
    runs = pd.DataFrame(rows)
    runs = runs.rename(columns={c: c.split("/", 1)[1] for c in runs.columns if c.startswith("test/")})
    if not runs.empty:
        runs["setting"] = runs.apply(setting_name, axis=1)
        runs[CODE_COLUMN] = budget.get("code", "?")
    extra = _unreplaced(recorded, runs) if recorded is not None else pd.DataFrame()
    if len(extra):
        print(f"study: {len(extra)} finished point(s) from the record {out / 'runs.csv'} (measured by "
              f"{', '.join(sorted(map(str, set(extra[CODE_COLUMN]))))}; no run directory here)", flush=True)
        runs = pd.concat([runs, extra], ignore_index=True)
    budget["measure_s"] = round(time.perf_counter() - t1, 1)
    finished = runs[runs["status"] == "ok"] if "status" in runs.columns else runs
    budget["sweep_points"] = int(len(finished))
    budget["sweep_point_s_sum"] = round(float(pd.to_numeric(finished.get("seconds"), errors="coerce").sum()), 1)

    t2 = time.perf_counter()
    reference = _untrained_rows(out, runs, quick)
    budget["untrained_s"] = round(time.perf_counter() - t2, 1)
    runs = pd.concat([runs, reference], ignore_index=True)
    first = [c for c in ("point", "status", "setting", *IDENTITY, CODE_COLUMN, CPU_COLUMN)
             if c in runs.columns]
    runs = runs[first + [c for c in runs.columns if c not in first]]
    runs.to_csv(out / "runs.csv", index=False)

    columns = [c for c in METRICS + INTRACLASS + DIAGNOSTICS if c in runs.columns]
    ok = runs[runs["status"] == "ok"].copy()
    for c in columns:
        ok[c] = pd.to_numeric(ok[c], errors="coerce")
    settings = (ok.groupby(["dataset", "loss", "setting"], sort=False)[columns].agg(["mean", "std"]))
    settings.columns = [f"{m}_{s}" for m, s in settings.columns]
    settings["n"] = ok.groupby(["dataset", "loss", "setting"], sort=False).size()
    settings = settings.reset_index()
    settings.to_csv(out / "settings.csv", index=False)
    paired = paired_comparison(ok, columns)
    paired.to_csv(out / "paired.csv", index=False)
    failed = runs[runs["status"] != "ok"]
    budget["total_s"] = round(time.perf_counter() - t0, 1)
    write_json(out / "budget.json", budget)
    (out / "results.md").write_text(preamble + render_markdown(settings, paired, failed, budget))
    write_figures(settings, out / "figures", runs=ok, paired=paired)
    return {"runs": runs, "settings": settings, "paired": paired}


def _fill_identity(row: dict[str, Any], run_dir: Path) -> None:
    """The :data:`IDENTITY` columns a grid left out, from the run's own ``config.json``, and
    :data:`CPU_COLUMN`, from its ``summary.json`` (a run from before CPUs were recorded: this
    machine's, where its run directory is)."""
    from dmlnb.train import cpu_model

    try:
        versions = json.loads((run_dir / "summary.json").read_text()).get("versions") or {}
    except (OSError, ValueError, AttributeError):
        versions = {}
    row[CPU_COLUMN] = versions.get("cpu") or cpu_model()
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return
    for k in IDENTITY:
        v = row.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            row[k] = config.get(k)


def run_pretrained_study(
    out: str | Path = "study/pretrained",
    jobs: int = 2,
    *,
    quick: bool = False,
    datasets: Sequence[str] = PRETRAINED_DATASETS,
    losses: Sequence[str] = HEADLINE_LOSSES,
    seeds: Sequence[int] = SEEDS,
    candidates: Sequence[tuple[str, dict[str, Any]]] = SEARCH_CANDIDATES,
    notebook: str | Path = NOTEBOOK,
    analyze_only: bool = False,
    cell_timeout: float | None = None,
    notebook_timeout: float | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """The study in the pretrained regime, in two stages, into ``out``:

    1. the search (:func:`search_grid`) on the validation classes, sweep ``out/search``, table
       ``out/search.csv`` (:func:`search_results`): one SSR setting chosen per data set and loss;
    2. the grid (:func:`pretrained_grid`): baseline vs the chosen setting (and the paper's form when
       another was chosen), every seed, sweep ``out/runs``; then :func:`analyze`.

    Both sweeps reuse finished points, so an interrupted study continues where it stopped.
    ``analyze_only`` trains nothing and reports what is finished.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    code = _code_version()
    budget: dict[str, Any] = {"jobs": jobs, "cores": os.cpu_count(), "quick": quick,
                              "regime": "pretrained", "code": code}
    # the committed tables stand for the finished points whose run directories are elsewhere
    recorded = {"search": recorded_points(out / "search.csv"), "runs": recorded_points(out / "runs.csv")}
    t0 = time.perf_counter()
    sweep = dict(jobs=jobs, cell_timeout=cell_timeout, notebook_timeout=notebook_timeout,
                 progress=progress)

    def searched() -> pd.DataFrame:
        found = search_results(_collected(out / "search"), candidates, recorded=recorded["search"])
        if not found.empty:
            if CODE_COLUMN not in found.columns:
                found[CODE_COLUMN] = None
            found[CODE_COLUMN] = found[CODE_COLUMN].where(found[CODE_COLUMN].notna(), code)
        return found

    # one loss at a time, its search and then its grid: a study stopped half-way holds whole
    # answers (the first loss on every data set), and a re-run continues where it stopped
    for loss in losses:
        if not analyze_only:
            _run_unrecorded(notebook, search_grid(datasets, [loss], candidates, quick=quick),
                            out / "search", recorded["search"], **sweep)
        chosen = {key: fields for key, fields in chosen_settings(searched(), candidates).items()
                  if key[1] == loss}
        if not analyze_only and chosen:
            _run_unrecorded(notebook, pretrained_grid(chosen, seeds, quick=quick), out / "runs",
                            recorded["runs"], **sweep)
    search = searched()
    search.to_csv(out / "search.csv", index=False)
    done = search[search["status"] == "ok"] if not search.empty else search
    budget["search_points"] = int(len(done))
    budget["search_point_s_sum"] = round(float(pd.to_numeric(done.get("seconds"), errors="coerce").sum()), 1)
    table = _collected(out / "runs")
    budget["sweep_s"] = round(time.perf_counter() - t0, 1)
    result = analyze(out, table, budget, quick=quick, preamble=render_search(search, budget),
                     recorded=recorded["runs"])
    result["search"] = search
    return result


def chosen_settings(search: pd.DataFrame, candidates: Sequence[tuple[str, dict[str, Any]]] = SEARCH_CANDIDATES
                    ) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(dataset, loss): fields}`` of the candidates :func:`search_results` marked chosen."""
    fields = dict(candidates)
    if search.empty:
        return {}
    return {(r["dataset"], r["loss"]): fields[r["candidate"]] for _, r in search[search.chosen].iterrows()}


def _collected(sweep_dir: Path) -> pd.DataFrame:
    from dmlnb.sweep import collect

    return collect(sweep_dir) if sweep_dir.is_dir() else pd.DataFrame()


@contextlib.contextmanager
def _points_without_static_figures() -> Iterator[None]:
    """The study's points keep interactive figures only (``DMLNB_STATIC_FIGURES=0`` for the
    kernels the sweep starts, :func:`dmlnb.viz.static_figures`): their notebooks are records of
    the runs, the study writes its own figures, and a PNG per figure costs seconds per point."""
    from dmlnb.viz import STATIC_FIGURES_ENV

    old = os.environ.get(STATIC_FIGURES_ENV)
    os.environ[STATIC_FIGURES_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(STATIC_FIGURES_ENV, None)
        else:
            os.environ[STATIC_FIGURES_ENV] = old


#: the column of runs.csv and search.csv naming the package commit that measured a row
CODE_COLUMN = "code"
#: the column naming the CPU model a run trained on: runs are exact pairs only on one model
CPU_COLUMN = "cpu"


def recorded_points(path: str | Path) -> pd.DataFrame:
    """The finished rows of an earlier ``runs.csv`` or ``search.csv`` of the study: the record
    that stands for a point whose run directory is not on this machine (run directories hold
    checkpoints and embeddings, gigabytes; the tables are committed).

    Only rows that say ``status == "ok"``, name their ``point`` (its digest is the point's
    identity, :func:`dmlnb.sweep.point_digest`) and the commit that measured them
    (:data:`CODE_COLUMN`) count; an older table without those columns stands for nothing.
    """
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame()
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: not a readable study table ({err})") from err
    if not {"point", "status", CODE_COLUMN} <= set(table.columns):
        return pd.DataFrame()
    ok = table["status"].eq("ok") & table["point"].notna() & table[CODE_COLUMN].notna()
    return table[ok].reset_index(drop=True)


def _unreplaced(recorded: pd.DataFrame, fresh: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``recorded`` whose point has no finished row in ``fresh``."""
    from dmlnb.sweep import digest_of_name

    if recorded.empty:
        return recorded
    done: set[str] = set()
    if not fresh.empty and "point" in fresh.columns:
        done = {digest_of_name(p) for p in fresh.loc[fresh["status"] == "ok", "point"].dropna()}
    return recorded[~recorded["point"].map(digest_of_name).isin(done)]


def _run_unrecorded(notebook: str | Path, grid: Sequence[dict[str, Any]], sweep_out: Path,
                    recorded: pd.DataFrame, **sweep: Any) -> None:
    """:func:`dmlnb.sweep.run_sweep` of the points of ``grid`` that ``recorded`` does not hold."""
    from dmlnb.sweep import digest_of_name, expand_grid, point_digest, run_sweep

    points = expand_grid(list(grid))
    held = set(recorded["point"].map(digest_of_name)) if not recorded.empty else set()
    todo = [p for p in points if point_digest(p) not in held]
    if sweep.get("progress", True) and len(todo) < len(points):
        print(f"study: {len(points) - len(todo)} of {len(points)} points of {sweep_out} are "
              "recorded in the study's tables (their run directories are not needed)", flush=True)
    if todo:
        # run_sweep expands what it is given: a list value of a point (ssr_families) is one
        # value, not an axis, so it goes in as a one-value axis and the sweep names the same point
        axes = [{k: [v] if isinstance(v, (list, tuple)) else v for k, v in p.items()} for p in todo]
        with _points_without_static_figures():
            run_sweep(notebook, axes, sweep_out, **sweep)


def _code_version() -> str:
    """The git commit of the package's checkout (``+dirty`` with uncommitted changes), or ``?``."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "dmlnb", "notebooks"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("+dirty" if dirty else "")


def render_search(search: pd.DataFrame, budget: dict[str, Any]) -> str:
    """The search table as Markdown: validation metrics and SSR diagnostics per candidate."""
    if search.empty:
        return ""
    lines = [f"**SSR settings searched on the validation classes** (seed {SEARCH_SEED}, one run per "
             f"cell, {budget.get('search_points', len(search))} finished runs, "
             f"{budget.get('search_point_s_sum', 0) / 60:.0f} min in all; the chosen setting per "
             f"data set and loss, marked *, has the best validation {SEARCH_SELECT})", "",
             "| dataset | loss | candidate | val MAP@R | val R@1 | L_sort | L_pos | grad ratio | "
             "SSR cross-cos | SSR view tau |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v: Any) -> str:
        try:
            v = float(v)
        except (TypeError, ValueError):
            return "-"
        return "-" if math.isnan(v) else f"{v:.3f}"

    for _, r in search.iterrows():
        mark = " *" if r["chosen"] else ""
        lines.append(f"| {r['dataset']} | {r['loss']} | {r['candidate']}{mark} | {f(r['val_map@r'])} | "
                     f"{f(r['val_recall@1'])} | {f(r['rank_sort'])} | {f(r['rank_pos'])} | "
                     f"{f(r['ssr_grad_ratio'])} | {f(r['ssr_cross_cos'])} | {f(r['view_tau_ssr'])} |")
    return "\n".join(lines) + "\n\n"


def _run_dir_of(sweep_out: Path, row: dict[str, Any]) -> Path:
    point = row.get("point") or row.get("name")
    if point is None:
        raise KeyError(f"sweep table has no point column; columns: {sorted(row)}")
    return sweep_out / str(point) / "run"


#: the fields an untrained reference row copies from its grid's rows
_UNTRAINED_FIELDS = ("dataset_options", "batch_size", "samples_per_class", "backbone", "pretrained",
                     "image_size", "channels_last")


#: measures every untrained reference must have: a cached one without them predates them
_UNTRAINED_MEASURES = ("map@r", "view_tau_metric", "spread", "rho", "density_ratio", "orig_r1_level1")


def _untrained_rows(out: Path, table: pd.DataFrame, quick: bool) -> pd.DataFrame:
    """One reference row per (dataset, backbone, seed) of the grid: the network before training
    (for a pretrained backbone: its ImageNet weights with freshly initialised heads)."""
    cache_dir = out / "untrained"
    cache_dir.mkdir(exist_ok=True)
    rows = []
    seen = set()
    for _, r in table.iterrows():
        if r.get("status") != "ok":
            continue
        config = {"dataset": r["dataset"], "quiet": True}
        for k in _UNTRAINED_FIELDS:
            v = r.get(k)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if k == "dataset_options":
                v = _mapping(v)
            elif k in ("pretrained", "channels_last"):
                v = _truthy(v)
            elif k != "backbone":
                v = int(v)  # table columns hold floats
            config[k] = v
        backbone = config.get("backbone", _DEFAULTS["backbone"])
        key = (r["dataset"], backbone, int(r["seed"]))
        if key in seen:
            continue
        seen.add(key)
        stem = f"{r['dataset']}-seed{int(r['seed'])}" if backbone == _DEFAULTS["backbone"] else \
            f"{r['dataset']}-{backbone}-seed{int(r['seed'])}"
        cache = cache_dir / f"{stem}.json"
        result = json.loads(cache.read_text()) if cache.exists() else {}
        if not set(_UNTRAINED_MEASURES) <= set(result):  # absent, or from before a measure existed
            result = measure_untrained(config, int(r["seed"]))
            write_json(cache, result)
        for loss in sorted(set(table[table.dataset == r["dataset"]]["loss"])):
            rows.append({"dataset": r["dataset"], "loss": loss, "seed": int(r["seed"]), "ssr": False,
                         "backbone": backbone, "pretrained": config.get("pretrained", False),
                         "image_size": config.get("image_size", _DEFAULTS["image_size"]),
                         "status": "ok", "setting": "untrained", **result})
    return pd.DataFrame(rows)


def _mapping(v: Any) -> dict[str, Any]:
    """A mapping column of a sweep table: a dict, its JSON, or (read back from a CSV) its repr."""
    if not isinstance(v, str):
        return dict(v)
    try:
        return json.loads(v)
    except ValueError:
        import ast

        return ast.literal_eval(v)


def _fmt(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f}"


def render_markdown(settings: pd.DataFrame, paired: pd.DataFrame, failed: pd.DataFrame,
                    budget: dict[str, Any]) -> str:
    """The study's tables as Markdown (mean ± std over seeds; paired tests)."""
    lines = [f"Budget: {budget['sweep_points']} training runs (papermill executions of 02_train) took "
             f"{budget['sweep_point_s_sum'] / 60:.0f} min of run time in all, each run on 1 thread, "
             f"{budget['jobs']} at a time on {budget['cores']} cores; this report's analysis took "
             f"{budget['total_s'] / 60:.1f} min." + (" QUICK MODE: numbers mean nothing." if budget["quick"] else ""),
             ""]
    retrieval = [m for m in ("recall@1", "map@r", "r_precision", "nmi", "f1") if f"{m}_mean" in settings]
    intra = [m for m in ("view_tau_metric", "view_tau_ssr", "spread", "rho", "density_ratio",
                         "orig_r1_level1", "orig_r1_level4", "lift_family", "lift_weight",
                         "lift_italic", "lift_category", "lift_theme")
             if f"{m}_mean" in settings and settings[f"{m}_mean"].dropna().nunique() > 1]
    for title, cols in (("Retrieval and clustering (test classes)", retrieval),
                        ("Intra-class structure (test classes)", intra)):
        lines += [f"**{title}**", "", "| dataset | loss | setting | n | " + " | ".join(cols) + " |",
                  "|---|---|---|---|" + "---|" * len(cols)]
        for _, s in settings.iterrows():
            cells = [_fmt(s[f"{c}_mean"], s[f"{c}_std"]) for c in cols]
            lines.append(f"| {s['dataset']} | {s['loss']} | {s['setting']} | {int(s['n'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(paired):
        lines += ["**SSR setting minus baseline, paired by seed** (t: paired t-test; W: exact Wilcoxon "
                  "signed-rank, two-sided)", "",
                  "| dataset | loss | setting | metric | n | baseline | SSR | diff ± std | t p | W p |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        setting_of = paired["setting"] if "setting" in paired else pd.Series("ssr", index=paired.index)
        informative = paired.metric.isin(PAIRED_IN_REPORT) & ~((paired["diff"] == 0) & (paired["diff_std"] == 0))
        for i, p in paired[informative].iterrows():
            lines.append(f"| {p['dataset']} | {p['loss']} | {setting_of[i]} | {p['metric']} | {int(p['n'])} | "
                         f"{p['baseline']:.3f} | {p['ssr']:.3f} | {p['diff']:+.3f} ± {p['diff_std']:.3f} | "
                         f"{p['t_p']:.3f} | {p['wilcoxon_p']:.3f} |")
        lines.append("")
    if len(failed):
        lines += [f"Failed runs: {len(failed)}", ""]
        for _, f in failed.iterrows():
            lines.append(f"- {f.get('point', '?')}: {f.get('error', '')}")
        lines.append("")
    return "\n".join(lines)


#: the panels of the study figure, when the data set has them
FIGURE_METRICS = ("map@r", "recall@1", "r_precision", "nmi", "view_tau_metric", "spread", "rho",
                  "density_ratio", "lift_family", "lift_weight")


def paired_differences_figure(runs: pd.DataFrame, dataset: str, metrics: Sequence[str] = FIGURE_METRICS):
    """SSR setting minus baseline, one point per seed (paired), with the mean and its standard
    deviation, per metric and loss: the differences the study is about, on axes that fit them
    (a bar chart from 0 would hide them). Panels only for metrics the data set has."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from dmlnb.viz import setting_colour

    sub = runs[(runs["dataset"] == dataset) & (runs["status"] == "ok")]
    def informative(m: str) -> bool:  # present, and not one constant (a lift that is 0 by construction)
        v = pd.to_numeric(sub[m], errors="coerce").dropna() if m in sub.columns else pd.Series([], dtype=float)
        return len(v) > 0 and v.nunique() > 1

    panels = [m for m in metrics if informative(m)]
    losses = list(dict.fromkeys(sub["loss"]))
    ncols = min(4, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[f"Δ {m}" for m in panels],
                        horizontal_spacing=0.06, vertical_spacing=0.18)
    shown = set()
    for j, m in enumerate(panels):
        row, col = j // ncols + 1, j % ncols + 1
        for li, loss in enumerate(losses):
            part = sub[sub["loss"] == loss]
            base = part[part.setting == "baseline"].set_index("seed")[m]
            settings = [x for x in dict.fromkeys(part.setting) if x not in ("baseline", "untrained")]
            for si, setting in enumerate(sorted(settings, key=lambda x: (x != "ssr", x))):
                other = part[part.setting == setting].set_index("seed")[m]
                seeds = sorted(set(base.index) & set(other.index))
                if not seeds:
                    continue
                d = (pd.to_numeric(other.loc[seeds], errors="coerce")
                     - pd.to_numeric(base.loc[seeds], errors="coerce")).to_numpy(dtype=float)
                x = f"{loss}"
                offset = (si - (len(settings) - 1) / 2) * 0.18
                colour = setting_colour(setting)
                name = f"{setting} − baseline"
                fig.add_trace(go.Scatter(
                    x=[li + offset] * len(d), y=d, mode="markers", name=name, legendgroup=name,
                    marker={"color": colour, "size": 7, "opacity": 0.55}, showlegend=False,
                    hovertext=[f"{x}, seed {s}: {v:+.4f}" for s, v in zip(seeds, d, strict=True)],
                    hoverinfo="text"), row=row, col=col)
                std = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
                fig.add_trace(go.Scatter(
                    x=[li + offset + 0.07], y=[float(np.nanmean(d))], mode="markers", name=name,
                    legendgroup=name, showlegend=name not in shown,
                    marker={"color": colour, "size": 11, "symbol": "diamond"},
                    error_y={"type": "data", "array": [std], "color": colour},
                    hovertext=[f"{x}: mean {np.nanmean(d):+.4f} ± {std:.4f} (n={len(d)})"],
                    hoverinfo="text"), row=row, col=col)
                shown.add(name)
        fig.add_hline(y=0, line={"color": "#444", "width": 1, "dash": "dot"}, row=row, col=col)
        fig.update_xaxes(tickvals=list(range(len(losses))), ticktext=losses, range=[-0.6, len(losses) - 0.4],
                         row=row, col=col)
    fig.update_layout(title=f"{dataset}: SSR minus baseline, paired by seed (dots: seeds; diamond: mean ± std)",
                      height=330 * nrows + 90, autosize=True, margin={"l": 50, "r": 20, "t": 80, "b": 40},
                      legend={"orientation": "h", "y": -0.08})
    return fig


def write_figures(settings: pd.DataFrame, out: Path, *, runs: pd.DataFrame | None = None,
                  paired: pd.DataFrame | None = None) -> list[Path]:
    """Per data set, the paired-differences figure (:func:`paired_differences_figure`) as
    responsive interactive HTML (fits any window width) and as a 1,200 px PNG when a PNG route
    exists (:func:`dmlnb.viz.write_pngs`)."""
    from dmlnb.viz import write_pngs

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if runs is None or runs.empty:
        return written
    pngs = []
    for dataset in dict.fromkeys(runs["dataset"]):
        fig = paired_differences_figure(runs, dataset)
        if not fig.data:
            continue
        stem = out / f"study_{re.sub(r'[^a-z0-9]+', '_', str(dataset).lower())}"
        fig.write_html(str(stem) + ".html", include_plotlyjs=True, full_html=True,
                       default_width="100%", config={"responsive": True})
        written.append(Path(str(stem) + ".html"))
        png = _copy_figure(fig)
        png.update_layout(width=1200)
        pngs.append((png, Path(str(stem) + ".png")))
    if pngs:
        try:
            written += write_pngs(pngs, scale=1)
        except RuntimeError as err:  # PNG needs kaleido or Chromium; the HTML is always written
            print(f"study: PNG export skipped ({err}); the HTML figures are written")
    return written


def _copy_figure(fig):
    """A copy of a plotly figure (to change its layout for one output)."""
    import plotly.graph_objects as go

    return go.Figure(fig)


def splice_readme(results_md: str, readme: Path, marker: str = "study") -> None:
    """Replace the text between ``<!-- {marker}:begin -->`` and ``<!-- {marker}:end -->``."""
    text = readme.read_text()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{results_md.strip()}\n{end}{tail}")


def add_parser(subparsers) -> None:
    """Register ``dmlnb study``."""
    p = subparsers.add_parser("study", help="run the baseline-vs-SSR study (a papermill sweep) and report it")
    p.add_argument("--out", default=None,
                   help="study directory (default: study, or study/pretrained for --regime pretrained)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at the same time (default 2)")
    p.add_argument("--regime", choices=("scratch", "pretrained"), default="scratch",
                   help="scratch: the small CNN from scratch on glyphs and Fashion-MNIST (out: study); "
                        "pretrained: ImageNet EfficientNet-Lite0 on glyphs and icons, SSR settings "
                        "searched on validation classes first (out: study/pretrained)")
    p.add_argument("--quick", action="store_true", help="a miniature grid to check the pipeline")
    p.add_argument("--no-fashion", action="store_true", help="skip the Fashion-MNIST repetition")
    p.add_argument("--analyze-only", action="store_true",
                   help="train nothing; report the runs finished so far")
    p.add_argument("--readme", default=None, help="splice results.md into this README between markers")
    from dmlnb.execute import add_timeout_flags

    add_timeout_flags(p)
    p.set_defaults(func=_main)


def _main(args) -> int:
    common = dict(quick=args.quick, analyze_only=args.analyze_only, cell_timeout=args.cell_timeout,
                  notebook_timeout=args.notebook_timeout)
    if args.regime == "pretrained":
        args.out = args.out or "study/pretrained"
        result = run_pretrained_study(args.out, args.jobs, **common)
    else:
        args.out = args.out or "study"
        result = run_study(args.out, args.jobs, fashion=not args.no_fashion, **common)
    if args.readme:
        marker = "study-pretrained" if args.regime == "pretrained" else "study"
        splice_readme((Path(args.out) / "results.md").read_text(), Path(args.readme), marker)
    failed = int((result["runs"]["status"] != "ok").sum())
    return 1 if failed else 0
