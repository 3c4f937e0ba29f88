# ruff: noqa: B023  (the lambdas are called inside the loop iteration that defines them)
"""dmlnb's DML losses vs pytorch-metric-learning: forward + backward on the same inputs, same run.

Run: ``.venv/bin/python benchmarks/bench_losses.py`` (one thread; median of 15 repetitions).
Only the ratio column is meaningful on a shared machine: both sides are timed in the same run.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as L
from pytorch_metric_learning import miners as M

from dmlnb.losses import build_loss


def median_ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("| batch | loss | dmlnb (ms) | PML (ms) | dmlnb / PML |\n|---|---|---|---|---|")
    for batch, dim in [(120, 128), (480, 128)]:
        u = torch.randn(batch, dim, generator=g)
        y = torch.arange(batch // 4).repeat_interleave(4)
        n_classes = batch // 4
        dw, semi, ms = (M.DistanceWeightedMiner(0.5, 1.4),
                        M.TripletMarginMiner(0.2, type_of_triplets="semihard"), M.MultiSimilarityMiner(0.1))
        margin, triplet, msl = L.MarginLoss(learn_beta=True), L.TripletMarginLoss(0.2), L.MultiSimilarityLoss()
        peers = {
            "margin": (build_loss("margin"), lambda x, y: margin(x, y, dw(x, y))),
            "triplet": (build_loss("triplet"), lambda x, y: triplet(x, y, semi(x, y))),
            "contrastive": (build_loss("contrastive"), L.ContrastiveLoss()),
            "multisimilarity": (build_loss("multisimilarity"), lambda x, y: msl(x, y, ms(x, y))),
            "proxyanchor": (build_loss("proxyanchor", num_classes=n_classes, embed_dim=dim),
                            L.ProxyAnchorLoss(n_classes, dim)),
        }
        for name, (ours, theirs) in peers.items():
            def run(fn):
                x = F.normalize(u, dim=1).requires_grad_()
                fn(x, y).backward()

            a, b = median_ms(lambda: run(ours)), median_ms(lambda: run(theirs))  # noqa: B023
            print(f"| B={batch}, d={dim} | {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
