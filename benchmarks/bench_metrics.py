"""Benchmark: dmlnb.metrics.evaluate vs pytorch-metric-learning's AccuracyCalculator.

Inputs are synthetic clustered embeddings (Gaussian class centres plus noise, L2-normalised),
seeded, in two sizes:

- ``cub``: 5,924 x 128, 100 classes (CUB-200 test split size), ks = (1, 2, 4, 8);
- ``sop``: 60,502 x 512, 11,316 classes of 2-12 items (SOP test split size),
  ks = (1, 10, 100, 1000).

Every measurement runs in a fresh subprocess that loads the inputs from .npy files, so its peak
RSS is honest; "above inputs" subtracts the RSS measured right after loading them. Two phases are
timed separately for each tool:

- ``knn``: Recall@K, R-Precision, MAP@R (and PML's precision_at_1). PML is configured so that it
  can finish: its default FaissKNN (exact, IndexFlatL2 on normalised vectors = cosine order) with
  ``k = max(ks)`` (>= the largest class, so R-Precision/MAP@R are exact), and Recall@K for K > 1
  added as custom metrics on its knn_labels.
- ``cluster``: KMeans (k = number of classes) + NMI. Both sides use faiss.Kmeans with the same
  arguments (niter=20, seed=0, no subsampling), so the assignments can be compared.

Usage::

    .venv/bin/python benchmarks/bench_metrics.py                 # both sizes, both phases
    .venv/bin/python benchmarks/bench_metrics.py --sizes cub --phases knn

The table is printed in Markdown; record it in benchmarks/bench_metrics.md with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, installed or not

SIZES = {
    "cub": {"n": 5924, "dim": 128, "classes": 100, "ks": (1, 2, 4, 8), "noise": 2.0},
    "sop": {"n": 60502, "dim": 512, "classes": 11316, "ks": (1, 10, 100, 1000), "noise": 2.0},
}
SEED = 0


def make_data(size: str, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Clustered synthetic embeddings with the given size; class sizes as in the real split."""
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    n, c = spec["n"], spec["classes"]
    if size == "sop":  # classes of 2..12 items summing to n
        counts = np.full(c, 2)
        extra = n - counts.sum()
        while extra > 0:
            room = np.flatnonzero(counts < 12)
            add = rng.choice(room, size=min(extra, len(room)), replace=False)
            counts[add] += 1
            extra = n - counts.sum()
    else:
        counts = np.full(c, n // c)
        counts[: n - counts.sum()] += 1
    y = np.repeat(np.arange(c), counts)
    y = y[rng.permutation(n)]
    centres = rng.standard_normal((c, spec["dim"]), dtype=np.float32)
    x = centres[y] + spec["noise"] * rng.standard_normal((n, spec["dim"]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.int64)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _faiss_kmeans_kwargs(n: int) -> dict:
    from dmlnb.metrics.clustering import FAISS_KMEANS_NITER

    return {"niter": FAISS_KMEANS_NITER, "seed": 0, "verbose": False,
            "min_points_per_centroid": 1, "max_points_per_centroid": max(256, n)}


def child(tool: str, phase: str, size: str, data_dir: str) -> dict:
    import torch

    import dmlnb.metrics as M  # noqa: F401  (import cost outside the timing)

    x = np.load(Path(data_dir) / f"{size}_x.npy")
    y = np.load(Path(data_dir) / f"{size}_y.npy")
    ks = SIZES[size]["ks"]
    base = _rss_mib()
    t0 = time.perf_counter()
    if tool == "dmlnb":
        from dmlnb.metrics import evaluate

        include = ["recall", "r_precision", "map@r"] if phase == "knn" else ["nmi"]
        res = evaluate(x, y, ks=ks, include=include, kmeans_backend="faiss", kmeans_seed=0)
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import FaissKMeans

        class Calc(AccuracyCalculator):
            pass

        for k in ks:
            if k > 1:
                def fn(self, knn_labels, query_labels, not_lone_query_mask, _k=k, **kw):
                    kl = knn_labels[not_lone_query_mask][:, :_k]
                    ql = query_labels[not_lone_query_mask]
                    return (kl == ql[:, None]).any(dim=1).float().mean().item()

                setattr(Calc, f"calculate_recall_at_{k}", fn)

        def requires_knn(self):
            return super(Calc, self).requires_knn() + [f"recall_at_{k}" for k in ks if k > 1]

        Calc.requires_knn = requires_knn
        inc = (("precision_at_1", "r_precision", "mean_average_precision_at_r")
               + tuple(f"recall_at_{k}" for k in ks if k > 1)) if phase == "knn" else ("NMI",)
        k_nn = max(max(ks), int(np.bincount(y).max()))  # >= max bin count: exact MAP@R
        calc = Calc(include=inc, k=k_nn, device=torch.device("cpu"),
                    kmeans_func=FaissKMeans(**_faiss_kmeans_kwargs(len(x))))
        res = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tool": tool, "phase": phase, "size": size, "wall_s": wall, "peak_rss_mib": peak,
            "above_inputs_mib": peak - base, "values": {k: float(v) for k, v in res.items()}}


def compare(ours: dict, theirs: dict, phase: str, ks) -> float:
    """Largest absolute difference between the matching values of the two tools."""
    if phase == "knn":
        pairs = [("recall@1", "precision_at_1"), ("r_precision", "r_precision"),
                 ("map@r", "mean_average_precision_at_r")]
        pairs += [(f"recall@{k}", f"recall_at_{k}") for k in ks if k > 1]
    else:
        pairs = [("nmi", "NMI")]
    return max(abs(ours[a] - theirs[b]) for a, b in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="cub,sop")
    ap.add_argument("--phases", default="knn,cluster")
    ap.add_argument("--tools", default="dmlnb,pml")
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "PHASE", "SIZE", "DIR"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes.split(","):
            x, y = make_data(size)
            np.save(Path(d) / f"{size}_x.npy", x)
            np.save(Path(d) / f"{size}_y.npy", y)
            del x, y
            for phase in args.phases.split(","):
                got = {}
                for tool in args.tools.split(","):
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", tool, phase, size, d],
                        capture_output=True, text=True, check=False,
                    )
                    if out.returncode != 0:
                        print(out.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"{tool} {phase} {size} failed")
                    got[tool] = json.loads(out.stdout.strip().splitlines()[-1])
                    r = got[tool]
                    print(f"  {size:4s} {phase:7s} {tool:5s} {r['wall_s']:8.1f} s  "
                          f"peak {r['peak_rss_mib']:7.0f} MiB  (+{r['above_inputs_mib']:.0f})  "
                          f"{json.dumps({k: round(v, 4) for k, v in r['values'].items()})}",
                          file=sys.stderr, flush=True)
                both = {"dmlnb", "pml"} <= set(got)
                diff = (compare(got["dmlnb"]["values"], got["pml"]["values"], phase,
                                SIZES[size]["ks"]) if both else float("nan"))
                for tool, r in got.items():
                    rows.append((size, phase, tool, r, diff))
    print("\n| input | phase | tool | wall s | peak RSS MiB | above inputs MiB | values "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for size, phase, tool, r, diff in rows:
        vals = ", ".join(f"{k} {v:.4f}" for k, v in r["values"].items() if k != "lone_queries")
        print(f"| {size} | {phase} | {tool} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['above_inputs_mib']:.0f} | {vals} | {diff:.2e} |")


if __name__ == "__main__":
    main()
