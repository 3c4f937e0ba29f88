"""Training step time: dmlnb's ``fit`` against a minimal hand-written PyTorch loop, and the SSR
branch's cost against the ideal ratio from image counts.

(a) ``fit`` vs a hand-written loop doing the same work: the same seeded model, the same
    class-balanced batches (same sampler, same DataLoader), the same losses, the same views and
    one AdamW step per iteration. Goal: ``fit`` at most 5 % slower.
(b) SSR step (p = 1: every iteration makes M x N views and runs B + M N images) vs baseline step
    (no SSR), next to the ideal ratio ``(B + M N) / B``. Goal: within 10 % of the ideal.

Time per step = wall time of one epoch's training loop (data loading, transfer, forward,
losses, backward, step, and for ``fit`` its logging) / steps; ``fit``'s evaluation is excluded
(it logs the epoch's loop time as ``time_s``). The first epoch is a warm-up; the reported value
is the median over ``--repeats`` interleaved repetitions of the second epoch. Both CPU time
(:func:`time.process_time`) and wall time are reported: on the shared 2-core development machines
wall times vary by 2-5x with other people's load, while the CPU time of a single-threaded run
(``--threads 1``, no loader workers) measures the work done and barely moves.

A second, finer measurement alternates fit's own iteration (``Trainer.train_step``) and the
hand-written step on one fixed batch, step by step (``--step_pairs``), so that load hits both
alike; it leaves out data loading and logging, which the loop-level numbers include.

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--repeats 3] [--step_pairs 30]
                                               [--threads N] [--out F.md]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import emit  # noqa: E402 - benchmarks/_report.py

from dmlnb import experiment as E  # noqa: E402
from dmlnb import runs  # noqa: E402
from dmlnb import train as T  # noqa: E402
from dmlnb.config import TrainConfig  # noqa: E402
from dmlnb.data import load_dataset  # noqa: E402
from dmlnb.data.sampler import ClassBalancedBatchSampler  # noqa: E402
from dmlnb.losses import RankingLoss  # noqa: E402
from dmlnb.views import make_views  # noqa: E402


def config(ssr: bool, steps: int, root: str) -> TrainConfig:
    # the defaults (small CNN, glyphs at 32 px, batch 80 = 20 x 4, M = 20, N = 4, margin loss)
    # on a subset large enough for `steps` batches per epoch; no validation, a small test set
    return TrainConfig.from_dict({
        "dataset_options": {"max_per_class": 100}, "ssr": ssr, "ssr_prob": 1.0, "epochs": 2,
        "steps_per_epoch": steps, "val_split": None, "eval_checkpoint": "last", "quiet": True,
        "device": "cpu", "runs_root": root, "log_every": 1,
    })


def time_fit(cfg: TrainConfig) -> tuple[float, float]:
    """(wall, CPU) seconds per step of fit's second epoch (its loop, without evaluation)."""
    result = T.fit(cfg)
    epochs = [r for r in runs.read_jsonl(result.run_dir / runs.METRICS_FILE)
              if r["kind"] == "epoch"]
    return epochs[1]["time_s"] / epochs[1]["steps"], epochs[1]["cpu_s"] / epochs[1]["steps"]


def time_hand_loop(cfg: TrainConfig) -> tuple[float, float]:
    """The same work written the plain way, with the same components."""
    ds = load_dataset(cfg.dataset, "train", **cfg.dataset_options)
    sampler = ClassBalancedBatchSampler(ds.labels, cfg.classes_per_batch, cfg.samples_per_class,
                                        seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = E.seeded_model(cfg, ds.channels)
    metric = E.build_metric_loss(cfg, int(ds.labels.max()) + 1, g)
    ranking = RankingLoss()
    opt = torch.optim.AdamW(T.param_groups(cfg, model, metric), weight_decay=cfg.weight_decay)
    model.train()
    B, M, N = cfg.batch_size, cfg.ssr_images, cfg.ssr_levels
    per_step = []
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        batches = list(itertools.islice(sampler, cfg.steps_per_epoch))
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches,
                                             generator=torch.Generator().manual_seed(epoch))
        t0, c0 = time.perf_counter(), time.process_time()
        for x, y in loader:
            if cfg.ssr:
                pick = torch.randperm(B, generator=g)[:M]
                views = make_views(x[pick], levels=N, generator=g)
                z, zs = model(torch.cat([x, views.flatten(0, 1)]), ssr=True)
                loss = metric(z[:B], y) + cfg.ssr_weight * ranking(zs[pick], zs[B:].view(M, N, -1))
            else:
                loss = metric(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        per_step.append(((time.perf_counter() - t0) / len(batches),
                         (time.process_time() - c0) / len(batches)))
    return per_step[1]


def step_level(ssr: bool, n: int, root: str) -> tuple[list[float], list[float]]:
    """fit's own iteration (``Trainer.train_step``: coin, picks, views, one pass, losses,
    backward, AdamW and scheduler steps, NaN check) against the hand-written step on the same
    batch, alternated step by step so that machine load hits both alike."""
    cfg = config(ssr, 10, root)
    trainer = T.Trainer(cfg, None)
    trainer.setup()
    trainer.t0 = time.perf_counter()
    ds = trainer.train_ds
    idx = next(iter(trainer.sampler))
    x = torch.stack([ds[i][0] for i in idx])
    y = torch.tensor([ds[i][1] for i in idx])
    g = torch.Generator().manual_seed(cfg.seed)
    model = E.seeded_model(cfg, ds.channels)
    metric = E.build_metric_loss(cfg, int(ds.labels.max()) + 1, g)
    ranking = RankingLoss()
    opt = torch.optim.AdamW(T.param_groups(cfg, model, metric), weight_decay=cfg.weight_decay)
    B, M, N = cfg.batch_size, cfg.ssr_images, cfg.ssr_levels

    def hand() -> None:
        if ssr:
            pick = torch.randperm(B, generator=g)[:M]
            views = make_views(x[pick], levels=N, generator=g)
            z, zs = model(torch.cat([x, views.flatten(0, 1)]), ssr=True)
            loss = metric(z[:B], y) + cfg.ssr_weight * ranking(zs[pick], zs[B:].view(M, N, -1))
        else:
            loss = metric(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fit_t, hand_t = [], []
    for i in range(n + 3):  # 3 warm-up pairs
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step(x, y) if which == 0 else hand()
            (fit_t if which == 0 else hand_t).append(
                (time.perf_counter() - t0, time.process_time() - c0))
    return fit_t[3:], hand_t[3:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per epoch (default 12)")
    ap.add_argument("--repeats", type=int, default=3, help="whole-loop repetitions")
    ap.add_argument("--step_pairs", type=int, default=30, help="alternated step pairs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="append the markdown result to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    times: dict[str, list[tuple[float, float]]] = {}
    for r in range(args.repeats):  # interleaved, alternating the order, so load hits all alike
        for ssr in (False, True):
            tag = "ssr" if ssr else "base"
            cfg = config(ssr, args.steps, tmp)
            runs_ = [("fit", time_fit), ("hand", time_hand_loop)]
            for name, fn in runs_ if r % 2 == 0 else runs_[::-1]:
                times.setdefault(f"{name}_{tag}", []).append(fn(cfg))
            print(f"repeat {r}: {tag}: fit {times[f'fit_{tag}'][-1][1] * 1e3:.1f}, hand "
                  f"{times[f'hand_{tag}'][-1][1] * 1e3:.1f} CPU ms/step", flush=True)
    for ssr in (False, True):
        tag = "ssr" if ssr else "base"
        times[f"step_fit_{tag}"], times[f"step_hand_{tag}"] = step_level(ssr, args.step_pairs, tmp)
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    wall_min = {k: min(w for w, _ in v) for k, v in times.items()}
    cfg = config(True, args.steps, tmp)
    B, M, N = cfg.batch_size, cfg.ssr_images, cfg.ssr_levels
    ideal = (B + M * N) / B

    def ratio(a: str, b: str) -> str:
        return (f"{cpu[a] / cpu[b]:.3f} | {wall[a] / wall[b]:.3f} | "
                f"{wall_min[a] / wall_min[b]:.3f}")

    def row(label: str, key: str) -> str:
        return (f"| {label} | {cpu[key + '_base'] * 1e3:.1f} / {wall[key + '_base'] * 1e3:.1f} | "
                f"{cpu[key + '_ssr'] * 1e3:.1f} / {wall[key + '_ssr'] * 1e3:.1f} |")

    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/bench_train.py', *(argv or sys.argv[1:])])}`",
        "",
        f"B = {B} (20 classes x 4), M = {M}, N = {N}, small CNN on glyphs 32 px, margin loss; "
        f"ideal SSR/baseline ratio (B + M N) / B = {ideal:.2f}.",
        "",
        "| ms per step: CPU / wall (medians) | baseline | SSR p=1 |",
        "|---|---|---|",
        row(f"dmlnb fit, whole loop ({args.repeats} runs)", "fit"),
        row(f"hand-written loop ({args.repeats} runs)", "hand"),
        row(f"fit's train_step ({args.step_pairs} alternated pairs)", "step_fit"),
        row(f"hand-written step ({args.step_pairs} alternated pairs)", "step_hand"),
        "",
        "| ratio | CPU (median) | wall (median) | wall (min) | goal |",
        "|---|---|---|---|---|",
        f"| (a) fit / hand, whole loop, baseline | {ratio('fit_base', 'hand_base')} | <= 1.05 |",
        f"| (a) fit / hand, whole loop, SSR p=1 | {ratio('fit_ssr', 'hand_ssr')} | <= 1.05 |",
        f"| (a) fit / hand, step, baseline | {ratio('step_fit_base', 'step_hand_base')} | <= 1.05 |",
        f"| (a) fit / hand, step, SSR p=1 | {ratio('step_fit_ssr', 'step_hand_ssr')} | <= 1.05 |",
        f"| (b) SSR / baseline, fit, whole loop | {ratio('fit_ssr', 'fit_base')} | "
        f"<= {1.1 * ideal:.2f} (ideal {ideal:.2f} + 10 %) |",
        f"| (b) SSR / baseline, fit, step | {ratio('step_fit_ssr', 'step_fit_base')} | "
        f"<= {1.1 * ideal:.2f} |",
        f"| (b) SSR / baseline, hand, step | {ratio('step_hand_ssr', 'step_hand_base')} | "
        f"(reference) |",
        "",
    ]
    text = "\n".join(lines)
    return emit(text, args.out)


if __name__ == "__main__":
    sys.exit(main())
