"""``dmlnb demo`` (``make demo``): the whole package in a few minutes, offline, on 2 CPU cores.

On the embedded glyph data (class = character, intra-class variation = typeface) it

1. writes a gallery of characters and typefaces,
2. trains a baseline (margin loss) and an SSR model (margin loss + gamma * ranking loss) with the
   package defaults and the same seed (model selection on the validation characters),
3. evaluates both once on the test characters (Recall@K, MAP@R, R-Precision, NMI, F1) and measures
   intra-class structure (view-ranking consistency, typeface attribute retrieval, spread),
4. writes figures: metrics table, training curves, a retrieval gallery, UMAP maps of both models.

Everything lands in ``OUT`` (default ``figures/demo``): ``*.png`` and interactive ``*.html``
figures, ``demo.json`` (the numbers and wall times) and the two run directories in ``OUT/runs``.
Running it again reuses finished runs (and resumes interrupted ones). The numbers come from one
seed and a short budget: they show the pipeline, not the study's result (see ``dmlnb study``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dmlnb.data import load_dataset
from dmlnb.gallery import write_glyph_gallery

UMAP_PER_CLASS = 40  # test images per class drawn in the UMAP maps (8 classes)
UMAP_CLASSES = 8


def run_demo(out: str | Path = "figures/demo", seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Run the demo into ``out``; returns what ``OUT/demo.json`` holds.

    ``quick`` shrinks the training budget to a few steps (for tests); its numbers mean nothing.
    """
    from dmlnb import viz
    from dmlnb.experiment import run_dataset
    from dmlnb.measure import measure_run
    from dmlnb.metrics import knn
    from dmlnb.runs import load_run
    from dmlnb.train import fit_or_reuse

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"seed": seed, "quick": quick, "seconds": {}}

    test = load_dataset("glyphs", "test")
    _, captions = write_glyph_gallery(out / "glyph_gallery.png", test, "".join(test.classes[:8]),
                                      fonts_per_style=3, seed=seed)
    report["gallery_columns"] = captions
    print(f"demo: glyphs, {len(test.classes)} test characters, {len(test)} test images; gallery written")

    budget = {"epochs": 1, "steps_per_epoch": 3, "dataset_options": {"max_per_class": 30}} if quick else {}
    runs = {}
    for name, ssr in (("baseline", False), ("ssr", True)):
        t = time.perf_counter()
        runs[name] = fit_or_reuse({"ssr": ssr, "seed": seed, "quiet": True,
                                   "run_dir": str(out / "runs" / name), **budget}).run_dir
        report["seconds"][f"train_{name}"] = round(time.perf_counter() - t, 1)
        print(f"demo: {name} trained and evaluated in {report['seconds'][f'train_{name}']:.0f} s")

    t = time.perf_counter()
    table: dict[str, dict[str, float]] = {}
    for name, run_dir in runs.items():
        run = load_run(run_dir)
        row = {k: v for k, v in run.test_metrics.items() if k != "lone_queries"}
        intra = measure_run(run_dir)
        row.update({k: intra[k] for k in ("view_tau_metric", "view_tau_ssr", "lift_family", "spread")
                    if k in intra})
        table[name] = row
    report["test"] = table
    report["seconds"]["measure"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    figures = []
    figures.append((viz.metric_table(table, title="Test characters: baseline vs SSR (one seed)"),
                    "demo_metrics"))
    ssr_run = load_run(runs["ssr"])
    steps = ssr_run.metrics("step")
    figures.append((viz.curves(steps, "step", {"loss": ["loss_metric", "loss_rank"], "SSR fired": ["ssr"]},
                               title="SSR run: losses per step"), "demo_curves"))
    emb = ssr_run.embeddings()
    test = run_dataset(ssr_run)  # the items the run's embeddings refer to
    queries, neighbours, correct = _retrieval(emb, knn)
    images = test.images.float().div(255)
    figures.append((viz.retrieval_gallery(images[queries], images[neighbours], correct,
                                          [test.classes[test.labels[q]] for q in queries],
                                          title="SSR model: test queries and their 6 nearest neighbours"),
                    "demo_retrieval"))
    subset = _umap_subset(test.labels, seed)
    coords = [viz.project_2d(load_run(runs[n]).embeddings()["embeddings"][subset], seed=seed)
              for n in ("baseline", "ssr")]
    figures.append((viz.side_by_side(coords, [test.classes[i] for i in test.labels[subset]],
                                     ["baseline", "SSR"], images=images[subset],
                                     title="UMAP of test embeddings (8 characters)"), "demo_umap"))
    for fig, name in figures:
        viz.write_html(fig, out / f"{name}.html")
    try:
        viz.write_pngs([(fig, out / f"{name}.png") for fig, name in figures])
    except RuntimeError as err:
        print(f"demo: PNG export skipped ({err}); the HTML figures are written")
    report["figures"] = [name for _, name in figures]
    report["seconds"]["figures"] = round(time.perf_counter() - t, 1)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "demo.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    _print_table(table)
    print(f"demo: done in {report['seconds']['total']:.0f} s; figures in {out}")
    return report


def _retrieval(emb: dict[str, np.ndarray], knn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from dmlnb.notebook import retrieval_examples

    queries, neighbours, correct = retrieval_examples(emb["embeddings"], emb["labels"], 6, 6)
    return np.asarray(queries), neighbours, correct


def _umap_subset(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    classes = np.arange(min(UMAP_CLASSES, int(labels.max()) + 1))
    picks = [rng.choice(np.flatnonzero(labels == c), min(UMAP_PER_CLASS, int((labels == c).sum())),
                        replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


def _print_table(table: dict[str, dict[str, float]]) -> None:
    keys = [k for k in ("recall@1", "map@r", "r_precision", "nmi", "f1", "view_tau_metric", "lift_family")
            if all(k in row for row in table.values())]
    print("demo: " + " | ".join(["model"] + keys))
    for name, row in table.items():
        print("demo: " + " | ".join([name] + [f"{row[k]:.3f}" for k in keys]))


def add_parser(subparsers) -> None:
    """Register ``dmlnb demo``."""
    p = subparsers.add_parser("demo", help="train a baseline and an SSR model briefly on glyphs, write figures")
    p.add_argument("--out", default="figures/demo", help="folder for the figures (default: figures/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few training steps only (pipeline check)")
    p.set_defaults(func=lambda a: 0 if run_demo(a.out, a.seed, a.quick) else 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dmlnb")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
