"""Benchmark: dmlnb.metrics.evaluate vs pytorch-metric-learning's AccuracyCalculator and the
full similarity product.

Inputs are synthetic clustered embeddings (Gaussian class centres plus noise, L2-normalised),
seeded, in these sizes:

- ``cub``: 5,924 x 128, 100 classes (CUB-200 test split size), ks = (1, 2, 4, 8);
- ``mid``: 20,000 x 512, 4,000 classes of 2-8 items (for iterating), ks = (1, 10, 100, 1000);
- ``sop``: 60,502 x 128, 11,316 classes of 2-12 items (SOP test split size), ks = (1,):
  Recall@1, R-Precision and MAP@R;
- ``sop512``: 60,502 x 512, the same classes, ks = (1, 10, 100, 1000) (the earlier ``sop``);
- ``quick``: 6,000 x 128, 1,122 classes of 2-12 items, ks = (1,) (a smoke run: ``--quick``).

Every measurement runs in a fresh subprocess that loads the inputs from .npy files, so its peak
RSS is honest; "above inputs" subtracts the RSS measured right after loading them. Tools:

- ``dmlnb``: :func:`dmlnb.metrics.evaluate` (leave-one-out; the symmetric search, each tile pair
  of the similarity matrix once, where it applies). Its cell says which search ran:
  ``symmetric``, or ``per-row`` with the reason (the canary caught the BLAS giving a pair another
  value in a tile than in a per-row block, and the search fell back).
- ``pml_small``: PML's AccuracyCalculator with its default FaissKNN (exact IndexFlatL2 on
  normalised vectors = cosine order) and ``k="max_bin_count"`` (the largest class: exact
  R-Precision and MAP@R, the least work PML can do for them).
- ``pml_1000``: the same with ``k=1000``.
- ``pml``: the same with ``k = max(max(ks), largest class)``, Recall@K for K > 1 added as custom
  metrics on its knn_labels (PML's only way to get Recall@1000).
- ``matmul``: the floor: the full similarity product alone, blocks of 4,096 rows against all
  rows, float32, numpy's BLAS with ``torch.get_num_threads()`` threads, into one reused buffer
  whose pages are touched before the timing starts (so the floor is the product alone).

Phases: ``knn`` (Recall@K, R-Precision, MAP@R; PML's precision_at_1 for Recall@1) and
``cluster`` (KMeans with k = number of classes + NMI; both sides use faiss.Kmeans with the same
arguments: niter=20, seed=0, no subsampling). The PML tools share one ``pml`` cell in the
cluster phase; ``matmul`` is a knn-phase tool.

The machine may be shared: each (size, phase) pair runs ``--repeat`` times with the tools'
order alternating between repetitions, every cell records the 1-minute load average when it
started, the header and footer print ``uptime``, and the summary gives dmlnb's wall time over
each peer's for each repetition (< 1: dmlnb faster) and over the best of the repetitions.

Usage::

    .venv/bin/python benchmarks/bench_metrics.py --quick                 # smoke run, ~1 min
    .venv/bin/python benchmarks/bench_metrics.py --sizes sop --phases knn --repeat 3
    .venv/bin/python benchmarks/bench_metrics.py                         # cub and sop, both phases
    .venv/bin/python benchmarks/bench_metrics.py --sizes cub --phases knn --tools dmlnb,pml

The tables are printed in Markdown; record them in benchmarks/bench_metrics.md with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
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
    # noise 1.4 at 128 dimensions: Recall@1 ~0.8, as trained models reach on SOP
    "sop": {"n": 60502, "dim": 128, "classes": 11316, "ks": (1,), "noise": 1.4,
            "class_sizes": (2, 12)},
    "sop512": {"n": 60502, "dim": 512, "classes": 11316, "ks": (1, 10, 100, 1000), "noise": 2.0,
               "class_sizes": (2, 12)},
    "quick": {"n": 6000, "dim": 128, "classes": 1122, "ks": (1,), "noise": 1.4,
              "class_sizes": (2, 12)},
}
SEED = 0
TOOLS = ("dmlnb", "pml_small", "pml_1000", "pml", "matmul")
KNN_ONLY = ("pml_small", "pml_1000", "matmul")
FLOOR_BLOCK = 4096  # rows per block of the full product (the floor)


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


def _pml(x: np.ndarray, y: np.ndarray, tool: str, phase: str, ks) -> dict:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKMeans

    if tool == "pml_small":
        k_nn, k_max = "max_bin_count", int(np.bincount(y).max())
    elif tool == "pml_1000":
        k_nn = k_max = 1000
    else:
        k_nn = k_max = max(max(ks), int(np.bincount(y).max()))  # >= max bin count: exact MAP@R
    extra = [k for k in ks if 1 < k <= k_max] if tool == "pml" else []

    class Calc(AccuracyCalculator):
        pass

    for k in extra:
        def fn(self, knn_labels, query_labels, not_lone_query_mask, _k=k, **kw):
            kl = knn_labels[not_lone_query_mask][:, :_k]
            ql = query_labels[not_lone_query_mask]
            return (kl == ql[:, None]).any(dim=1).float().mean().item()

        setattr(Calc, f"calculate_recall_at_{k}", fn)

    def requires_knn(self):
        return super(Calc, self).requires_knn() + [f"recall_at_{k}" for k in extra]

    Calc.requires_knn = requires_knn
    inc = (("precision_at_1", "r_precision", "mean_average_precision_at_r")
           + tuple(f"recall_at_{k}" for k in extra)) if phase == "knn" else ("NMI",)
    calc = Calc(include=inc, k=k_nn, device=torch.device("cpu"),
                kmeans_func=FaissKMeans(**_faiss_kmeans_kwargs(len(x))))
    return calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))


def floor_buffer(n: int) -> np.ndarray:
    """The floor's output buffer, its pages touched (the product, not the page faults, is timed)."""
    buf = np.empty((min(FLOOR_BLOCK, n), n), dtype=np.float32)
    buf.fill(0)
    return buf


def floor_product(x: np.ndarray, buf: np.ndarray, threads: int) -> None:
    """The full similarity product of ``x`` in blocks of FLOOR_BLOCK rows, into ``buf``."""
    from threadpoolctl import threadpool_limits

    n = len(x)
    with threadpool_limits(limits=threads, user_api="blas"):
        for s in range(0, n, FLOOR_BLOCK):
            np.matmul(x[s : s + FLOOR_BLOCK], x.T, out=buf[: min(FLOOR_BLOCK, n - s)])


def _record_search(log: list[str]) -> None:
    """Make the symmetric search note in ``log`` whether it ran or fell back (and why)."""
    import dmlnb.metrics.retrieval as R

    real = R.symmetric_topk

    def recorded(*a, **kw):
        try:
            out = real(*a, **kw)
        except R.NotReproducibleError as e:
            log.append(f"per-row ({e})")
            raise
        log.append("symmetric")
        return out

    R.symmetric_topk = recorded


def child(tool: str, phase: str, size: str, data_dir: str) -> dict:
    import torch  # (import cost outside the timing)

    import dmlnb.metrics as M  # noqa: F401

    x = np.load(Path(data_dir) / f"{size}_x.npy")
    y = np.load(Path(data_dir) / f"{size}_y.npy")
    ks = SIZES[size]["ks"]
    if tool.startswith("pml"):
        import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401
    search: list[str] = []
    if tool == "dmlnb":
        _record_search(search)
    base = _rss_mib()
    buf = floor_buffer(len(x)) if tool == "matmul" else None  # counted in the peak, not timed
    t0 = time.perf_counter()
    if tool == "dmlnb":
        from dmlnb.metrics import evaluate

        include = ["recall", "r_precision", "map@r"] if phase == "knn" else ["nmi"]
        res = evaluate(x, y, ks=ks, include=include, kmeans_backend="faiss", kmeans_seed=0)
    elif tool == "matmul":
        floor_product(x, buf, torch.get_num_threads())
        res = {}
    else:
        res = _pml(x, y, tool, phase, ks)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tool": tool, "phase": phase, "size": size, "wall_s": wall, "peak_rss_mib": peak,
            "above_inputs_mib": peak - base, "values": {k: float(v) for k, v in res.items()},
            "search": (search[-1] if search else "per-row") if tool == "dmlnb" and phase == "knn"
            else None}


def compare(ours: dict, theirs: dict, phase: str, ks) -> float:
    """Largest absolute difference between the matching values of the two tools (NaN if none)."""
    if phase == "knn":
        pairs = [("recall@1", "precision_at_1"), ("r_precision", "r_precision"),
                 ("map@r", "mean_average_precision_at_r")]
        pairs += [(f"recall@{k}", f"recall_at_{k}") for k in ks if k > 1]
    else:
        pairs = [("nmi", "NMI")]
    diffs = [abs(ours[a] - theirs[b]) for a, b in pairs if a in ours and b in theirs]
    return max(diffs) if diffs else float("nan")


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _uptime() -> str:
    if shutil.which("uptime"):
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _phase_tools(tools: list[str], phase: str) -> list[str]:
    if phase == "knn":
        return tools
    out = [t for t in tools if t not in KNN_ONLY and t != "pml"]
    if any(t.startswith("pml") for t in tools):
        out.append("pml")  # clustering does not depend on PML's k
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="cub,sop", help="comma-separated among: " + ",".join(SIZES))
    ap.add_argument("--phases", default="knn,cluster")
    ap.add_argument("--tools", default="dmlnb,pml_small,pml_1000,matmul",
                    help="comma-separated among: " + ",".join(TOOLS))
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per size and phase, the tools' order alternating")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: the 'quick' size only (6,000 x 128), k-NN phase")
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "PHASE", "SIZE", "DIR"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.quick:
        args.sizes, args.phases = "quick", "knn"
    tools = args.tools.split(",")
    bad = [t for t in tools if t not in TOOLS] + [s for s in args.sizes.split(",") if s not in SIZES]
    if bad:
        raise SystemExit(f"unknown tools/sizes: {', '.join(bad)}")
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# before: {_uptime()}")
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes.split(","):
            x, y = make_data(size)
            np.save(Path(d) / f"{size}_x.npy", x)
            np.save(Path(d) / f"{size}_y.npy", y)
            del x, y
            for phase in args.phases.split(","):
                ptools = _phase_tools(tools, phase)
                for rep in range(args.repeat):
                    got = {}
                    for tool in ptools if rep % 2 == 0 else ptools[::-1]:
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
                        print(f"  {size:6s} {phase:7s} {tool:9s} {r['wall_s']:8.1f} s  "
                              f"peak {r['peak_rss_mib']:7.0f} MiB  (+{r['above_inputs_mib']:.0f})"
                              f"  load {load:.2f}  "
                              f"{json.dumps({k: round(v, 4) for k, v in r['values'].items()})}"
                              + (f"  search: {r['search']}" if r.get("search") else ""),
                              file=sys.stderr, flush=True)
                    order = " then ".join(got)
                    for tool, r in got.items():
                        diff = (compare(got["dmlnb"]["values"], r["values"], phase,
                                        SIZES[size]["ks"])
                                if "dmlnb" in got and tool.startswith("pml") else float("nan"))
                        rows.append((size, phase, rep, tool, r, diff))
                        if "dmlnb" in got and tool != "dmlnb":
                            ratios.append((size, phase, rep, order, tool,
                                           got["dmlnb"]["wall_s"] / r["wall_s"]))
    print("\n| input | phase | run | tool | load | wall s | peak RSS MiB | above inputs MiB "
          "| values | max abs diff to dmlnb |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, phase, rep, tool, r, diff in rows:
        vals = ", ".join(f"{k} {v:.4f}" for k, v in r["values"].items() if k != "lone_queries")
        if r.get("search"):
            vals += f"; search: {r['search']}"
        print(f"| {size} | {phase} | {rep + 1} | {tool} | {r['load']:.2f} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['above_inputs_mib']:.0f} | {vals or '-'} | "
              f"{'-' if diff != diff else f'{diff:.2e}'} |")
    if ratios:
        print("\n| input | phase | run | order | dmlnb wall / peer wall | peer |")
        print("|---|---|---|---|---|---|")
        for size, phase, rep, order, tool, ratio in ratios:
            print(f"| {size} | {phase} | {rep + 1} | {order} | {ratio:.3f} | {tool} |")
        print("\n| input | phase | peer | best dmlnb wall / best peer wall (over the runs) |")
        print("|---|---|---|---|")
        best: dict[tuple, float] = {}
        for size, phase, _rep, tool, r, _ in rows:
            key = (size, phase, tool)
            best[key] = min(best.get(key, float("inf")), r["wall_s"])
        for (size, phase, tool), w in best.items():
            if tool != "dmlnb" and (size, phase, "dmlnb") in best:
                print(f"| {size} | {phase} | {tool} | {best[(size, phase, 'dmlnb')] / w:.3f} |")
    print(f"\n# after: {_uptime()}")


if __name__ == "__main__":
    main()
