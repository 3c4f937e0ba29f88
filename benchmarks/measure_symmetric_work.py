"""What the symmetric leave-one-out search spends beyond its products, on the SOP-sized input of
``bench_metrics.py`` (60,502 x 128, classes of 2-12, k = 11 = the largest R_q).

Prints, for three forms of :func:`dmlnb.metrics.neighbors.symmetric_topk`:

- ``full``: every list exact to k entries (as before per-list depths);
- ``depth``: list i exact to its first R_i entries (what R-Precision and MAP@R read);
- ``depth+floor``: the same, with each list's threshold bounded from the first tile on by its
  class mates (:func:`dmlnb.metrics.neighbors.class_floor`, what ``evaluate`` does);

the candidates that reach the lists' merges (deterministic: the work the filters let through),
whether the lists agree within their depths, wall times with 1 and 2 workers next to the full
product (the floor of ``bench_metrics.py``: blocks of 4,096 rows against all rows, into a buffer
touched beforehand) with as many BLAS threads, alternating, ``--repeat`` times, and for one
worker the split of the search's time into its tile products alone (the same tiles and slabs)
and the rest (group maxima, candidates, merges, canaries). Then the per-row search (what
``evaluate`` falls back to where the symmetric search cannot run), split into its block products
and its top-k selection (``topk_stable``), next to the full product, with the default threads.
Wall times on a shared machine vary: read them pairwise.

First, whether the BLAS gives a pair one float32 value in products of every shape: the share of
cells of a few products (per-row blocks, slabs, offset and transposed tiles, two threads) that
differ from one large product of the same rows and columns. Where it does not (OpenBLAS's AVX2
kernels), the symmetric search's canary would stop it on float input, so the symmetric tables
use the input rounded to ``exact_lattice(x, 64)`` (exact products in any order: about the same
work, similarities within about 1e-2 of the float ones); ``--lattice`` uses it in any case.

Usage::

    .venv/bin/python benchmarks/measure_symmetric_work.py --repeat 2 [--lattice]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_metrics import floor_buffer, floor_product, make_data  # noqa: E402

from dmlnb.metrics import neighbors as nb  # noqa: E402


def timed_floor(x: np.ndarray, buf: np.ndarray, threads: int) -> float:
    t = time.perf_counter()
    floor_product(x, buf, threads)
    return time.perf_counter() - t


def tile_products(x: np.ndarray, buf: np.ndarray) -> float:
    """Seconds for the products alone of a one-worker symmetric search (one BLAS thread): the
    same tiles and slabs, each diagonal tile's slabs from their first row's column on, nothing
    else."""
    from threadpoolctl import threadpool_limits

    bounds = nb._tile_bounds(len(x), nb.symmetric_tile_size(x.itemsize, workers=1))
    g = nb.SYMMETRIC_GROUP
    with threadpool_limits(1):
        t = time.perf_counter()
        for i in range(len(bounds) - 1):
            a0, a1 = bounds[i], bounds[i + 1]
            slabs = g * nb.slab_bounds(-(-(a1 - a0) // g), g)
            for j in range(i, len(bounds) - 1):
                c0, c1 = bounds[j], bounds[j + 1]
                xj_t = x[c0:c1].T
                for r0, r1 in zip(slabs[:-1], slabs[1:], strict=True):
                    r0, r1 = int(r0), min(int(r1), a1 - a0)
                    c = r0 if i == j else 0
                    np.matmul(x[a0 + r0 : a0 + r1], xj_t[:, c:], out=buf[r0:r1, c : c1 - c0])
        return time.perf_counter() - t


def shape_dependence(x: np.ndarray) -> list[tuple[str, float]]:
    """Share of cells that differ from one large product (rows 0-4,095 against columns
    0-8,191, one BLAS thread), for products of other shapes over the same rows and columns."""
    from threadpoolctl import threadpool_limits

    rows, cols = min(4096, len(x)), min(8192, len(x))
    per_row = nb.auto_chunk_size(len(x), x.itemsize)
    with threadpool_limits(1):
        ref = np.matmul(x[:rows], x[:cols].T)
        shapes = {
            f"per-row block ({per_row} rows against all items)": (slice(0, per_row), slice(0, cols), False),
            f"slab of {nb._SLAB_ROWS} rows from row {nb._SLAB_ROWS}": (
                slice(nb._SLAB_ROWS, 2 * nb._SLAB_ROWS), slice(0, cols), False),
            "tile from column 100": (slice(0, 512), slice(100, cols), False),
            "tile read transposed": (slice(0, 512), slice(0, cols), True),
        }
        out = []
        for name, (r, c, transposed) in shapes.items():
            if name.startswith("per-row"):  # against every item, as the per-row search does
                p = np.matmul(x[r], x.T)[:, c]
            else:
                p = np.matmul(x[c], x[r].T).T if transposed else np.matmul(x[r], x[c].T)
            out.append((name, float((p != ref[r, c]).mean())))
    with threadpool_limits(2):
        out.append(("the large product, 2 threads", float((np.matmul(x[:rows], x[:cols].T) != ref).mean())))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="sop")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--lattice", action="store_true",
                    help="time the symmetric search on the input rounded to exact_lattice(x, 64)")
    args = ap.parse_args()
    x_float, y = make_data(args.size)
    r = np.bincount(y)[y] - 1
    k = int(r.max())
    depth = np.clip(r, 1, k)
    print("| product (float input) | cells differing from one large product |\n|---|---|")
    differing = shape_dependence(x_float)
    for name, share in differing:
        print(f"| {name} | {share:.4f} |")
    alike = not any(share for _, share in differing)
    if not alike:
        print("\n# this BLAS rounds a pair by the product's shape: the symmetric search's canary "
              "would stop it on the float input; the symmetric tables use exact_lattice(x, 64).")
    x = x_float if alike and not args.lattice else nb.exact_lattice(x_float, 64)
    floor = nb.class_floor(x, y, depth)
    print(f"# {args.size}: n={len(x)}, k={k}, mean depth {depth.mean():.2f}; "
          f"class floor finite for {np.isfinite(floor).mean():.1%}; load {os.getloadavg()[0]:.2f}; "
          f"input: {'float' if x is x_float else 'exact_lattice(x, 64)'}")

    counted = {"n": 0}
    take = nb._Lists.take

    def counting_take(self, owner, other, v, lo, hi):
        counted["n"] += len(owner)
        return take(self, owner, other, v, lo, hi)

    forms = {"full": (None, None), "depth": (depth, None), "depth+floor": (depth, floor)}
    inside = np.arange(k) < depth[:, None]
    reference = None
    nb._Lists.take = counting_take
    try:
        for name, (d, f) in forms.items():
            counted["n"] = 0
            torch.set_num_threads(1)
            _, idx, _ = nb.symmetric_topk(x, k, depth=d, floor=f, workers=1)
            same = "-" if reference is None else str(
                np.array_equal(np.where(inside, idx, -1), np.where(inside, reference, -1)))
            reference = idx if reference is None else reference
            print(f"{name:12s} candidates {counted['n']:>10,d}  same lists within depth: {same}")
    finally:
        nb._Lists.take = take

    buf = floor_buffer(len(x))
    print("\n| run | workers | symmetric (depth+floor) s | full product s | ratio | load |")
    print("|---|---|---|---|---|---|")
    for rep in range(1, args.repeat + 1):
        for workers in (1, 2):
            torch.set_num_threads(workers)
            load = os.getloadavg()[0]
            t = time.perf_counter()
            nb.symmetric_topk(x, k, depth=depth, floor=floor, workers=workers)
            s = time.perf_counter() - t
            f = timed_floor(x, buf, workers)
            print(f"| {rep} | {workers} | {s:.2f} | {f:.2f} | {s / f:.3f} | {load:.2f} |", flush=True)

    print("\nOne worker, one BLAS thread: the search, its tile products alone, the full product"
          " (fractions of the full product)\n")
    print("| run | search s | its products s | full product s | search | products | rest | load |")
    print("|---|---|---|---|---|---|---|---|")
    torch.set_num_threads(1)
    for rep in range(1, args.repeat + 1):
        load = os.getloadavg()[0]
        t = time.perf_counter()
        nb.symmetric_topk(x, k, depth=depth, floor=floor, workers=1)
        s = time.perf_counter() - t
        p = tile_products(x, buf)
        f = timed_floor(x, buf, 1)
        print(f"| {rep} | {s:.2f} | {p:.2f} | {f:.2f} | {s / f:.3f} | {p / f:.3f} | "
              f"{(s - p) / f:.3f} | {load:.2f} |", flush=True)

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"\nThe per-row search on the float input, {threads} threads: its block products, its "
          "top-k selection, the full product (fractions of the full product)\n")
    print("| run | per-row s | products s | selection s | full product s | per-row | products "
          "| selection | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rep in range(1, args.repeat + 1):
        load = os.getloadavg()[0]
        s, p, sel = per_row(x_float, k)
        f = timed_floor(x_float, buf, threads)
        print(f"| {rep} | {s:.2f} | {p:.2f} | {sel:.2f} | {f:.2f} | {s / f:.3f} | {p / f:.3f} | "
              f"{sel / f:.3f} | {load:.2f} |", flush=True)
    return 0


def per_row(x: np.ndarray, k: int) -> tuple[float, float, float]:
    """Seconds of the per-row leave-one-out search (blocks of ``auto_chunk_size`` rows against all,
    then ``topk_stable``): in all, its products, its selection."""
    q = torch.from_numpy(x)
    products = selection = 0.0
    t = time.perf_counter()
    with nb.blas_threads_like_torch(float(len(x)) * len(x) * x.shape[1]):
        blocks = nb.iter_similarity_blocks(q, q, exclude_self=True)
        while True:
            t0 = time.perf_counter()
            block = next(blocks, None)
            t1 = time.perf_counter()
            if block is None:
                break
            nb.topk_stable(block[1], k)
            products += t1 - t0
            selection += time.perf_counter() - t1
    return time.perf_counter() - t, products, selection


if __name__ == "__main__":
    raise SystemExit(main())
