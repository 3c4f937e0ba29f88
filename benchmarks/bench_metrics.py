"""Benchmark: dmlnb.metrics.evaluate vs pytorch-metric-learning's AccuracyCalculator.

Inputs are synthetic clustered embeddings (Gaussian class centres plus noise, L2-normalised),
seeded, in three sizes:

- ``cub``: 5,924 x 128, 100 classes (CUB-200 test split size), ks = (1, 2, 4, 8);
- ``mid``: 20,000 x 512, 4,000 classes of 2-8 items (for iterating), ks = (1, 10, 100, 1000);
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

The machine may be shared: each (size, phase) pair runs ``--repeat`` times with the tools'
order alternating between repetitions, every cell records the 1-minute load average when it
started, and the summary gives the peer-to-dmlnb wall-time ratio of each repetition (> 1: dmlnb
faster).

Usage::

    .venv/bin/python benchmarks/bench_metrics.py                 # cub and sop, both phases
    .venv/bin/python benchmarks/bench_metrics.py --sizes cub --phases knn
    .venv/bin/python benchmarks/bench_metrics.py --sizes mid --phases knn --repeat 2

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
    "mid": {"n": 20000, "dim": 512, "classes": 4000, "ks": (1, 10, 100, 1000), "noise": 2.0,
            "class_sizes": (2, 8)},
    "sop": {"n": 60502, "dim": 512, "classes": 11316, "ks": (1, 10, 100, 1000), "noise": 2.0,
            "class_sizes": (2, 12)},
}
SEED = 0


def make_data(size: str, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Clustered synthetic embeddings with the given size; class sizes as in the real split."""
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    n, c = spec["n"], spec["classes"]
    if "class_sizes" in spec:  # classes of lo..hi items summing to n (SOP: 2..12), skewed sizes
        lo, hi = spec["class_sizes"]
        counts = np.full(c, lo)
        weight = rng.exponential(size=c)
        extra = n - counts.sum()
        while extra > 0:
            room = counts < hi
            counts[room] += rng.multinomial(extra, weight[room] / weight[room].sum())
            counts = np.minimum(counts, hi)
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


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="cub,sop", help="comma-separated among: " + ",".join(SIZES))
    ap.add_argument("--phases", default="knn,cluster")
    ap.add_argument("--tools", default="dmlnb,pml")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per size and phase, the tools' order alternating")
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "PHASE", "SIZE", "DIR"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
          f", load average at start {_load1():.2f}")
    tools = args.tools.split(",")
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes.split(","):
            x, y = make_data(size)
            np.save(Path(d) / f"{size}_x.npy", x)
            np.save(Path(d) / f"{size}_y.npy", y)
            del x, y
            for phase in args.phases.split(","):
                for rep in range(args.repeat):
                    got = {}
                    for tool in tools if rep % 2 == 0 else tools[::-1]:
                        load = _load1()
                        out = subprocess.run(
                            [sys.executable, __file__, "--child", tool, phase, size, d],
                            capture_output=True, text=True, check=False,
                        )
                        if out.returncode != 0:
                            print(out.stderr[-3000:], file=sys.stderr)
                            raise SystemExit(f"{tool} {phase} {size} failed")
                        got[tool] = r = json.loads(out.stdout.strip().splitlines()[-1])
                        r["load"] = load
                        print(f"  {size:4s} {phase:7s} {tool:5s} {r['wall_s']:8.1f} s  "
                              f"peak {r['peak_rss_mib']:7.0f} MiB  (+{r['above_inputs_mib']:.0f})"
                              f"  load {load:.2f}  "
                              f"{json.dumps({k: round(v, 4) for k, v in r['values'].items()})}",
                              file=sys.stderr, flush=True)
                    both = {"dmlnb", "pml"} <= set(got)
                    diff = (compare(got["dmlnb"]["values"], got["pml"]["values"], phase,
                                    SIZES[size]["ks"]) if both else float("nan"))
                    for tool, r in got.items():
                        rows.append((size, phase, rep, tool, r, diff))
                    if both:
                        ratios.append((size, phase, rep, " then ".join(got),
                                       got["pml"]["wall_s"] / got["dmlnb"]["wall_s"]))
    print("\n| input | phase | run | tool | load | wall s | peak RSS MiB | above inputs MiB "
          "| values | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, phase, rep, tool, r, diff in rows:
        vals = ", ".join(f"{k} {v:.4f}" for k, v in r["values"].items() if k != "lone_queries")
        print(f"| {size} | {phase} | {rep + 1} | {tool} | {r['load']:.2f} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['above_inputs_mib']:.0f} | {vals} | {diff:.2e} |")
    if ratios:
        print("\n| input | phase | run | order | pml wall / dmlnb wall |")
        print("|---|---|---|---|---|")
        for size, phase, rep, order, ratio in ratios:
            print(f"| {size} | {phase} | {rep + 1} | {order} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
