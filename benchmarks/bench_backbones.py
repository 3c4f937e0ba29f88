"""Backbone throughput on the CPU: EfficientNet-Lite0 vs ResNet-18 vs the small CNN, and the cost
of the SSR branch on EfficientNet-Lite0 against the ideal ratio from image counts.

(a) Training and evaluation images per second of ``efficientnet_lite0`` (ImageNet weights, frozen
    BatchNorm: the pretrained regime), ``resnet18`` (random weights: the same cost as its ImageNet
    weights, which are not on the development machines; frozen BatchNorm) and ``smallcnn``
    (BatchNorm trained), on 1-channel glyph-sized inputs at 32, 64 and 96 px, each with the
    default (contiguous NCHW) and the ``channels_last`` memory format (model and input).
    Training = one step on a batch of B images: forward (metric head), multi-similarity loss on
    B / 4 classes x 4, backward, AdamW step. Evaluation = forward of ``--eval_batch`` images in
    eval mode under ``torch.no_grad``.
(b) SSR step vs baseline step of ``efficientnet_lite0`` at ``--ssr_size`` px: the model work of a
    training step on B + M N images (``ssr=True``, metric loss on the B originals plus a stand-in
    loss on the SSR head) against B images (``ssr=False``), next to the ideal (B + M N) / B; and a
    plain step on the same B + M N images (``ssr=False``), which separates the cost of the image
    count from that of the SSR head. View generation is left out (``bench_views.py`` measures it:
    about 1 % of a step).

Images are random tensors (cost does not depend on content). Every configuration is timed after a
warm-up; repetitions are interleaved over all configurations, in alternating order, so that the
load of the shared machine hits all alike; the medians of CPU time (``time.process_time``) and
wall time are reported. Run single-threaded (default ``--threads 1``) the CPU time measures the
work done whatever the load.

    .venv/bin/python benchmarks/bench_backbones.py [--quick] [--threads 1] [--out F.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import emit  # noqa: E402 - benchmarks/_report.py

from dmlnb.losses import build_loss  # noqa: E402
from dmlnb.model import EmbeddingNet  # noqa: E402

BACKBONES = ("efficientnet_lite0", "resnet18", "smallcnn")
FORMATS = ("contiguous", "channels_last")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def build(backbone: str, fmt: str) -> EmbeddingNet:
    if backbone == "smallcnn":
        model = EmbeddingNet("smallcnn", in_channels=1)
    else:  # ImageNet weights for Lite0 (shipped in its package); ResNet-18's cost the same random
        model = EmbeddingNet(backbone, pretrained=backbone == "efficientnet_lite0", in_channels=1)
    if fmt == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model


class Bench:
    """One model in one memory format, with its optimiser and loss."""

    def __init__(self, backbone: str, fmt: str, batch: int, eval_batch: int) -> None:
        self.backbone, self.fmt = backbone, fmt
        self.model = build(backbone, fmt)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.loss = build_loss("multisimilarity")
        self.batch, self.eval_batch = batch, eval_batch
        self.labels = torch.arange(batch // 4).repeat_interleave(4)

    def images(self, n: int, size: int, seed: int = 0) -> torch.Tensor:
        x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
        return x.contiguous(memory_format=torch.channels_last) if self.fmt == "channels_last" else x

    def train_step(self, x: torch.Tensor) -> None:
        self.model.train()
        loss = self.loss(self.model(x), self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def eval_pass(self, x: torch.Tensor) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(x)


def timed(fn, *args) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def throughput(benches: list[Bench], sizes: tuple[int, ...], repeats: int) -> dict:
    """{(backbone, fmt, size): {"train": [(wall, cpu)], "eval": [...]}} per-image seconds."""
    out: dict = {}
    configs = [(b, s) for b in benches for s in sizes]
    inputs = {(id(b), s): (b.images(b.batch, s), b.images(b.eval_batch, s, 1)) for b, s in configs}
    for b, s in configs:  # warm-up: first calls allocate and pick kernels
        xt, xe = inputs[(id(b), s)]
        b.train_step(xt)
        b.eval_pass(xe)
    for r in range(repeats):
        for b, s in configs if r % 2 == 0 else configs[::-1]:
            xt, xe = inputs[(id(b), s)]
            rec = out.setdefault((b.backbone, b.fmt, s), {"train": [], "eval": []})
            w, c = timed(b.train_step, xt)
            rec["train"].append((w / b.batch, c / b.batch))
            w, c = timed(b.eval_pass, xe)
            rec["eval"].append((w / b.eval_batch, c / b.eval_batch))
        print(f"repeat {r + 1}/{repeats} done; {uptime()}", flush=True)
    return out


def ssr_ratio(batch: int, m: int, n: int, size: int, pairs: int, fmt: str) -> dict:
    """Alternated baseline and SSR steps of efficientnet_lite0: per-step (wall, cpu) lists."""
    bench = Bench("efficientnet_lite0", fmt, batch, 1)
    ranking_stand_in = build_loss("multisimilarity")
    x = bench.images(batch, size)
    views = bench.images(m * n, size, 2)
    both = torch.cat([x, views]).contiguous(
        memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
    view_labels = torch.arange(m).repeat_interleave(n)
    model = bench.model.train()

    def base() -> None:
        loss = bench.loss(model(x), bench.labels)
        bench.opt.zero_grad(set_to_none=True)
        loss.backward()
        bench.opt.step()

    def ssr() -> None:
        z, zs = model(both, ssr=True)
        loss = bench.loss(z[:batch], bench.labels) + 0.8 * ranking_stand_in(zs[batch:], view_labels)
        bench.opt.zero_grad(set_to_none=True)
        loss.backward()
        bench.opt.step()

    all_labels = torch.cat([bench.labels, view_labels + batch // 4])

    def plain() -> None:  # the same B + M N images through the metric head only
        loss = bench.loss(model(both), all_labels)
        bench.opt.zero_grad(set_to_none=True)
        loss.backward()
        bench.opt.step()

    steps = {"base": base, "ssr": ssr, "plain": plain}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
    for i in range(pairs + 1):  # the first round warms up
        for name in (tuple(steps) if i % 2 == 0 else tuple(steps)[::-1]):
            t = timed(steps[name])
            if i:
                times[name].append(t)
    return times


def med(values: list[tuple[float, float]], which: int) -> float:
    return statistics.median(v[which] for v in values)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="32 and 64 px, 1 repeat, 2 SSR pairs in channels_last only (~1/5 of the time)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="default 32 64 96")
    ap.add_argument("--batch", type=int, default=60, help="B, training batch (default 60 = 15 x 4)")
    ap.add_argument("--eval_batch", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3)")
    ap.add_argument("--ssr_images", type=int, default=20, help="M (default 20)")
    ap.add_argument("--ssr_levels", type=int, default=4, help="N (default 4)")
    ap.add_argument("--ssr_size", type=int, default=64, help="image size of (b), default 64")
    ap.add_argument("--ssr_pairs", type=int, default=None, help="alternated step pairs (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=None, help="append the markdown result to this file")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    pairs = args.ssr_pairs or (2 if args.quick else 4)
    args.sizes = args.sizes or ([32, 64] if args.quick else [32, 64, 96])
    ssr_formats = ("channels_last",) if args.quick else FORMATS
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = uptime()
    print(f"before: {load_before}", flush=True)
    t_start = time.perf_counter()

    benches = [Bench(b, f, args.batch, args.eval_batch) for b in BACKBONES for f in FORMATS]
    res = throughput(benches, tuple(args.sizes), repeats)
    B, M, N = args.batch, args.ssr_images, args.ssr_levels
    ideal = (B + M * N) / B
    ssr = {fmt: ssr_ratio(B, M, N, args.ssr_size, pairs, fmt) for fmt in ssr_formats}
    load_after = uptime()
    elapsed = time.perf_counter() - t_start
    print(f"after: {load_after}", flush=True)

    cmd = " ".join([".venv/bin/python", "benchmarks/bench_backbones.py", *(argv or sys.argv[1:])])
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {elapsed:.0f} s",
        "",
        f"`{cmd}`",
        "",
        f"- load before: `{load_before}`",
        f"- load after: `{load_after}`",
        "",
        f"(a) images per second, from CPU time / from wall time (medians of {repeats}); training "
        f"batch B = {B}, evaluation batch {args.eval_batch}; 1-channel input.",
        "",
        "| backbone | format | " + " | ".join(f"train {s} px | eval {s} px" for s in args.sizes) + " |",
        "|---|---|" + "---|---|" * len(args.sizes),
    ]
    for b in BACKBONES:
        for f in FORMATS:
            cells = []
            for s in args.sizes:
                rec = res[(b, f, s)]
                for kind in ("train", "eval"):
                    cells.append(f"{1 / med(rec[kind], 1):.0f} / {1 / med(rec[kind], 0):.0f}")
            lines.append(f"| {b} | {f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "channels_last speed-up (CPU-time images/s, channels_last / contiguous):",
        "",
        "| backbone | " + " | ".join(f"train {s} | eval {s}" for s in args.sizes) + " |",
        "|---|" + "---|---|" * len(args.sizes),
    ]
    for b in BACKBONES:
        cells = []
        for s in args.sizes:
            for kind in ("train", "eval"):
                cont = med(res[(b, "contiguous", s)][kind], 1)
                cl = med(res[(b, "channels_last", s)][kind], 1)
                cells.append(f"{cont / cl:.2f}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"(b) efficientnet_lite0 at {args.ssr_size} px, SSR step (B + M N = {B + M * N} images) / "
        f"baseline step (B = {B}), M = {M}, N = {N}; ideal (B + M N) / B = {ideal:.2f}; "
        f"medians of {pairs} alternated rounds. \"plain B + M N\": the same {B + M * N} images "
        f"through the metric head only (ssr=False): the cost of the image count alone.",
        "",
        "| format | step | s/step CPU / wall | ratio to baseline, CPU / wall | ratio / ideal (CPU) |",
        "|---|---|---|---|---|",
    ]
    for f in ssr_formats:
        t = ssr[f]
        for name, label in (("base", f"baseline, B = {B}"), ("ssr", f"SSR, B + M N = {B + M * N}"),
                            ("plain", "plain B + M N")):
            rc = med(t[name], 1) / med(t["base"], 1)
            rw = med(t[name], 0) / med(t["base"], 0)
            lines.append(
                f"| {f} | {label} | {med(t[name], 1):.3f} / {med(t[name], 0):.3f} | "
                f"{rc:.3f} / {rw:.3f} | {'-' if name == 'base' else f'{rc / ideal:.3f}'} |"
            )
    text = "\n".join(lines) + "\n"
    return emit(text, args.out)


if __name__ == "__main__":
    sys.exit(main())
