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

import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

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
                    "spread", "lift_family", "lift_weight")
INTRACLASS = (
    "view_pair_order_metric", "view_tau_metric", "view_pair_order_ssr", "view_tau_ssr",
    "spread", "lift_family", "lift_weight", "lift_italic", "lift_category",
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


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def paired_comparison(
    table: pd.DataFrame, metrics: Sequence[str], *, by: Sequence[str] = ("dataset", "loss"),
) -> pd.DataFrame:
    """SSR minus baseline per metric, paired by seed, for each group of ``by``.

    Only the default SSR setting is compared (rows with ``setting == "baseline"`` vs
    ``setting == "ssr"``). Columns: the group, ``metric``, ``n`` (paired seeds), ``baseline``,
    ``ssr`` (means), ``diff`` (mean of the paired differences), ``diff_std``, ``t_p`` (two-sided
    paired t-test), ``wilcoxon_p`` (two-sided exact signed-rank test; with 5 seeds the smallest
    possible value is 0.0625, so it can never reach 0.05).
    """
    from scipy import stats

    rows = []
    for key, group in table.groupby(list(by), sort=True):
        base = group[group.setting == "baseline"].set_index("seed")
        ssr = group[group.setting == "ssr"].set_index("seed")
        seeds = sorted(set(base.index) & set(ssr.index))
        if len(seeds) < 2:
            continue
        for m in metrics:
            if m not in group.columns:
                continue
            a = base.loc[seeds, m].astype(float).to_numpy()
            b = ssr.loc[seeds, m].astype(float).to_numpy()
            if np.isnan(a).any() or np.isnan(b).any():
                continue
            d = b - a
            t_p = float(stats.ttest_rel(b, a).pvalue) if d.std() > 0 else float("nan")
            w_p = float(stats.wilcoxon(b, a).pvalue) if np.any(d != 0) else float("nan")
            rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=False)), "metric": m,
                         "n": len(seeds), "baseline": a.mean(), "ssr": b.mean(), "diff": d.mean(),
                         "diff_std": d.std(ddof=1), "t_p": t_p, "wilcoxon_p": w_p})
    return pd.DataFrame(rows)


def setting_name(row: pd.Series) -> str:
    """``untrained``, ``baseline``, ``ssr`` (the defaults) or ``ssr, <field>=<value>`` (ablation)."""
    if row.get("setting") == "untrained":
        return "untrained"
    if not bool(row["ssr"]):
        return "baseline"
    changed = []
    for ab in ABLATIONS:
        for k, v in ab.items():
            col = row.get(k)
            if col is None or (isinstance(col, float) and math.isnan(col)):
                continue
            if _same(col, v):
                changed.append(f"{k}={_fmt_value(v)}")
    return "ssr" if not changed else "ssr, " + ", ".join(sorted(set(changed)))


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
    return "+".join(v) if isinstance(v, list) else str(v)


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
    from dmlnb.sweep import collect, run_sweep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget: dict[str, Any] = {"jobs": jobs, "cores": os.cpu_count(), "quick": quick}
    t0 = time.perf_counter()
    if analyze_only:
        table = collect(out / "runs")
    else:
        table = run_sweep(notebook, grid or study_grid(quick, fashion), out / "runs", jobs=jobs,
                          cell_timeout=cell_timeout, notebook_timeout=notebook_timeout,
                          progress=progress)
    budget["sweep_s"] = round(time.perf_counter() - t0, 1)
    budget["sweep_points"] = int(len(table))
    budget["sweep_point_s_sum"] = round(float(pd.to_numeric(table.get("seconds"), errors="coerce").sum()), 1)

    t1 = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    for _, r in table.iterrows():
        row = r.to_dict()
        if row.get("status") == "ok":
            run_dir = _run_dir_of(out / "runs", row)
            row.update(measure_run(run_dir))
        rows.append(row)
    runs = pd.DataFrame(rows)
    runs = runs.rename(columns={c: c.split("/", 1)[1] for c in runs.columns if c.startswith("test/")})
    runs["setting"] = runs.apply(setting_name, axis=1)
    budget["measure_s"] = round(time.perf_counter() - t1, 1)

    t2 = time.perf_counter()
    reference = _untrained_rows(out, table, quick)
    budget["untrained_s"] = round(time.perf_counter() - t2, 1)
    runs = pd.concat([runs, reference], ignore_index=True)
    runs.to_csv(out / "runs.csv", index=False)

    columns = [c for c in METRICS + INTRACLASS if c in runs.columns]
    ok = runs[runs["status"] == "ok"]
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
    (out / "results.md").write_text(render_markdown(settings, paired, failed, budget))
    write_figures(settings, out / "figures")
    return {"runs": runs, "settings": settings, "paired": paired}


def _run_dir_of(sweep_out: Path, row: dict[str, Any]) -> Path:
    point = row.get("point") or row.get("name")
    if point is None:
        raise KeyError(f"sweep table has no point column; columns: {sorted(row)}")
    return sweep_out / str(point) / "run"


def _untrained_rows(out: Path, table: pd.DataFrame, quick: bool) -> pd.DataFrame:
    """One reference row per (dataset, loss, seed) of the grid: the untrained network."""
    cache_dir = out / "untrained"
    cache_dir.mkdir(exist_ok=True)
    rows = []
    seen = set()
    for _, r in table.iterrows():
        key = (r["dataset"], r["seed"])
        if key in seen or r.get("status") != "ok":
            continue
        seen.add(key)
        cache = cache_dir / f"{r['dataset']}-seed{int(r['seed'])}.json"
        if cache.exists():
            result = json.loads(cache.read_text())
        else:
            config = {"dataset": r["dataset"], "quiet": True}
            for k in ("dataset_options", "batch_size", "samples_per_class"):
                v = r.get(k)
                if isinstance(v, str) and v.startswith("{"):
                    v = json.loads(v)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    config[k] = int(v) if k != "dataset_options" else v  # table columns hold floats
            result = measure_untrained(config, int(r["seed"]))
            write_json(cache, result)
        for loss in sorted(set(table[table.dataset == r["dataset"]]["loss"])):
            rows.append({"dataset": r["dataset"], "loss": loss, "seed": int(r["seed"]), "ssr": False,
                         "status": "ok", "setting": "untrained", **result})
    return pd.DataFrame(rows)


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
    intra = [m for m in ("view_tau_metric", "view_tau_ssr", "spread", "lift_family", "lift_weight",
                         "lift_italic", "lift_category") if f"{m}_mean" in settings]
    for title, cols in (("Retrieval and clustering (test classes)", retrieval),
                        ("Intra-class structure (test classes)", intra)):
        lines += [f"**{title}**", "", "| dataset | loss | setting | n | " + " | ".join(cols) + " |",
                  "|---|---|---|---|" + "---|" * len(cols)]
        for _, s in settings.iterrows():
            cells = [_fmt(s[f"{c}_mean"], s[f"{c}_std"]) for c in cols]
            lines.append(f"| {s['dataset']} | {s['loss']} | {s['setting']} | {int(s['n'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(paired):
        lines += ["**SSR minus baseline, paired by seed** (t: paired t-test; W: Wilcoxon signed-rank, "
                  "two-sided)", "", "| dataset | loss | metric | n | baseline | SSR | diff ± std | t p | W p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for _, p in paired[paired.metric.isin(PAIRED_IN_REPORT)].iterrows():
            lines.append(f"| {p['dataset']} | {p['loss']} | {p['metric']} | {int(p['n'])} | {p['baseline']:.3f} | "
                         f"{p['ssr']:.3f} | {p['diff']:+.3f} ± {p['diff_std']:.3f} | {p['t_p']:.3f} | {p['wilcoxon_p']:.3f} |")
        lines.append("")
    if len(failed):
        lines += [f"Failed runs: {len(failed)}", ""]
        for _, f in failed.iterrows():
            lines.append(f"- {f.get('point', '?')}: {f.get('error', '')}")
        lines.append("")
    return "\n".join(lines)


def write_figures(settings: pd.DataFrame, out: Path) -> list[Path]:
    """Bar charts (mean ± std over seeds) of MAP@R, Recall@1 and the intra-class measures."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    out.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [m for m in ("map@r", "recall@1", "view_tau_metric", "lift_family") if f"{m}_mean" in settings]
    for dataset, sub in settings.groupby("dataset", sort=False):
        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels)
        colours = dict(zip(sorted(set(sub["loss"])), ("#1f77b4", "#d62728", "#2ca02c", "#9467bd"), strict=False))
        for j, m in enumerate(panels, 1):
            for loss, part in sub.groupby("loss", sort=False):
                fig.add_trace(go.Bar(name=loss, x=part["setting"], y=part[f"{m}_mean"],
                                     marker_color=colours.get(loss),
                                     error_y={"type": "data", "array": part[f"{m}_std"].fillna(0)},
                                     legendgroup=loss, showlegend=j == 1), row=1, col=j)
        fig.update_layout(title=f"Study on {dataset}: mean ± std over seeds", barmode="group",
                          height=480, width=420 * len(panels))
        stem = out / f"study_{re.sub(r'[^a-z0-9]+', '_', str(dataset).lower())}"
        fig.write_html(str(stem) + ".html", include_plotlyjs=True)
        written.append(Path(str(stem) + ".html"))
        try:
            fig.write_image(str(stem) + ".png", scale=1)
            written.append(Path(str(stem) + ".png"))
        except Exception as err:  # noqa: BLE001 - PNG export needs Chrome; HTML is always written
            print(f"study: PNG export skipped ({err}); the HTML figure is written")
    return written


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
    p.add_argument("--out", default="study", help="study directory (default: study)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at the same time (default 2)")
    p.add_argument("--quick", action="store_true", help="a miniature grid to check the pipeline")
    p.add_argument("--no-fashion", action="store_true", help="skip the Fashion-MNIST repetition")
    p.add_argument("--analyze-only", action="store_true",
                   help="train nothing; report the runs finished so far")
    p.add_argument("--readme", default=None, help="splice results.md into this README between markers")
    from dmlnb.execute import add_timeout_flags

    add_timeout_flags(p)
    p.set_defaults(func=_main)


def _main(args) -> int:
    result = run_study(args.out, args.jobs, quick=args.quick, fashion=not args.no_fashion,
                       analyze_only=args.analyze_only, cell_timeout=args.cell_timeout,
                       notebook_timeout=args.notebook_timeout)
    if args.readme:
        splice_readme((Path(args.out) / "results.md").read_text(), Path(args.readme))
    failed = int((result["runs"]["status"] != "ok").sum())
    return 1 if failed else 0
