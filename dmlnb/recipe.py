"""The GPU benchmark recipe: the paper's protocol on CUB-200, Cars196 and SOP, next to its numbers.

``dmlnb recipe --root cub200=DIR --root cars196=DIR --root sop=DIR --out DIR`` trains, for every
dataset given and every embedding size (128-d: ranking metrics; 512-d: state of the art), the
baseline (margin loss, distance-weighted sampling) and SSR with the presets of
:data:`dmlnb.config.PRESETS` (ResNet-50, ImageNet weights, 224 px, docs/method.md "Training protocol"),
then writes ``OUT/comparison.csv`` and ``OUT/comparison.md``: our test metrics (model selected on
class-disjoint validation classes) beside the paper's reported numbers (:data:`PAPER_NUMBERS`).
Finished runs are reused and interrupted ones resumed, so the command can simply be run again.

``--fixture`` runs the same pipeline on tiny generated copies of the three layouts
(:mod:`dmlnb.data.fixtures`) with a tiny budget and no pretrained weights: a check, on a CPU, that
the recipe works end to end before GPU hours are spent. Its numbers mean nothing.

Multi-GPU: run the command under ``torchrun --nproc_per_node G -m dmlnb recipe ...``; every fit uses
DistributedDataParallel and only rank 0 writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dmlnb._validate import check_choice

DATASETS = ("cub200", "cars196", "sop")
DIMS = (128, 512)
#: The paper's numbers as cited by its first author's later work (ResNet-50); see docs/method.md, "Reference numbers".
PAPER_NUMBERS: dict[tuple[str, int], dict[str, float]] = {
    ("cub200", 512): {"recall@1": 0.682, "recall@2": 0.781, "recall@4": 0.865},
    ("cars196", 512): {"recall@1": 0.877, "recall@2": 0.925, "recall@4": 0.954},
    ("sop", 512): {"recall@1": 0.786, "recall@10": 0.906, "recall@100": 0.962},
    ("cub200", 128): {"r_precision": 0.351},
    ("cars196", 128): {"r_precision": 0.375},
    ("sop", 128): {"r_precision": 0.445},
}
#: Budget and model for ``--fixture`` (a CPU check of the pipeline, not a result).
FIXTURE_OVERRIDES: dict[str, Any] = {
    "pretrained": False, "image_size": 32, "batch_size": 16, "samples_per_class": 4,
    "ssr_images": 8, "epochs": 1, "steps_per_epoch": 2, "num_workers": 0, "device": "cpu",
    "eval_batch_size": 64, "quiet": True,
}


def recipe_runs(
    roots: Mapping[str, str],
    out: str | Path,
    *,
    dims: Sequence[int] = DIMS,
    seeds: Sequence[int] = (0,),
    overrides: Mapping[str, Any] | None = None,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(labels, config dict)`` of every run of the recipe, in order."""
    from dmlnb.config import PRESETS

    for name in roots:
        check_choice("dataset", name, DATASETS)
    for dim in dims:
        check_choice("dim", dim, DIMS)
    runs = []
    for name, root in roots.items():
        for dim in dims:
            for ssr in (False, True):
                for seed in seeds:
                    label = {"dataset": name, "dim": dim, "ssr": ssr, "seed": seed}
                    run_dir = Path(out) / "runs" / f"{name}-{dim}-{'ssr' if ssr else 'baseline'}-seed{seed}"
                    config = {**PRESETS[f"paper-{name}-{dim}"], "data_root": str(root), "ssr": ssr,
                              "seed": seed, "run_dir": str(run_dir), **(overrides or {})}
                    runs.append((label, config))
    return runs


def run_recipe(
    roots: Mapping[str, str],
    out: str | Path,
    *,
    dims: Sequence[int] = DIMS,
    seeds: Sequence[int] = (0,),
    overrides: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Train every run of :func:`recipe_runs` (reusing finished ones) and write the comparison."""
    from dmlnb.train import fit

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, config in recipe_runs(roots, out, dims=dims, seeds=seeds, overrides=overrides):
        run_dir = Path(config["run_dir"])
        summary_file = run_dir / "summary.json"
        if summary_file.exists():
            metrics = json.loads(summary_file.read_text())["test"]
        else:
            result = fit({**config, "resume": (run_dir / "config.json").exists()})
            metrics = result.metrics
        rows.append({**label, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    table = pd.DataFrame(rows)
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(comparison_markdown(table, fixture=bool(overrides) and
                                                           overrides.get("pretrained") is False))
    return table


def comparison_markdown(table: pd.DataFrame, fixture: bool = False) -> str:
    """Our numbers (mean over seeds) beside the paper's, one row per dataset, size and method."""
    lines = []
    if fixture:
        lines += ["FIXTURE RUN: tiny generated data, no pretrained weights; the numbers only show that "
                  "the pipeline runs.", ""]
    lines += ["| dataset | dim | method | seeds | metric | ours | paper |", "|---|---|---|---|---|---|---|"]
    for (name, dim, ssr), group in table.groupby(["dataset", "dim", "ssr"], sort=False):
        paper = PAPER_NUMBERS.get((name, int(dim)), {})
        metrics = list(paper) or ["recall@1", "r_precision", "map@r"]
        for m in metrics:
            ours = group[m].mean() if m in group else math.nan
            ref = f"{paper[m]:.3f}" if (m in paper and ssr) else "-"
            lines.append(f"| {name} | {dim} | {'SSR' if ssr else 'baseline'} | {len(group)} | {m} | "
                         f"{ours:.3f} | {ref} |")
    return "\n".join(lines) + "\n"


def add_parser(subparsers) -> None:
    """Register ``dmlnb recipe``."""
    p = subparsers.add_parser("recipe", help="the paper's protocol on CUB-200 / Cars196 / SOP (GPU)",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--root", action="append", default=[], metavar="NAME=DIR",
                   help="dataset root, e.g. cub200=/data (repeat for each dataset)")
    p.add_argument("--out", required=True, help="recipe directory")
    p.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fixture", action="store_true",
                   help="run on tiny generated copies of all three layouts (CPU pipeline check)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    overrides = None
    roots: dict[str, str] = {}
    for item in args.root:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--root {item!r} must be NAME=DIR with NAME one of {', '.join(DATASETS)}")
        roots[name] = path
    if args.fixture:
        from dmlnb.data.fixtures import make_fixture

        roots = {name: str(make_fixture(name, Path(args.out) / "fixtures" / name)) for name in DATASETS}
        overrides = FIXTURE_OVERRIDES
    if not roots:
        raise ValueError("give at least one --root NAME=DIR (or --fixture)")
    table = run_recipe(roots, args.out, dims=args.dims, seeds=args.seeds, overrides=overrides)
    print((Path(args.out) / "comparison.md").read_text())
    return 0 if len(table) else 1
