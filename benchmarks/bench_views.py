"""Cost of making SSR views against the cost of the training step that consumes them.

For each setting, on the same batch:

- view generation: ``make_views(images[:M])`` (N = 4 levels, the paper's three families), timed
  alone; reported as source images/s, views/s, and seconds per batch;
- training step: forward (``ssr=True``) of the B originals and the M * N views in one pass, a
  stand-in loss on both heads, backward, one AdamW step (the real losses cost next to nothing
  beside the backbone);
- fraction = view time / training-step time. Goal: <= 10 %.

Settings: glyph-like 1 x 32 x 32 with ``smallcnn`` (B = 120, M = 20: the paper's batch and SSR
images; and M = B, every image gets views), and 3 x 224 x 224 with ResNet-50 (on a CPU only a few
iterations of a small batch, with M = B: the worst case for the fraction).

Run: ``.venv/bin/python benchmarks/bench_views.py [--quick] [--threads N] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout, installed or not

from dmlnb.defaults import CLASSES_PER_BATCH, SAMPLES_PER_CLASS, SSR_IMAGES, SSR_LEVELS  # noqa: E402
from dmlnb.model import EmbeddingNet  # noqa: E402
from dmlnb.views import make_views  # noqa: E402


@dataclass
class Setting:
    name: str
    backbone: str
    channels: int
    size: int
    batch: int
    ssr_images: int
    repeats: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Least wall time of ``fn()`` over ``repeats`` calls, after one warm-up call.

    The minimum, not the mean: on a shared machine other processes only ever add time.
    """
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def run(setting: Setting, device: torch.device) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(
        setting.batch, setting.channels, setting.size, setting.size, generator=gen
    ).to(device)
    model = EmbeddingNet(setting.backbone, pretrained=False, in_channels=setting.channels).to(
        device
    )
    model.train()
    optimiser = torch.optim.AdamW(
        [
            {"params": model.backbone_parameters(), "lr": 1e-4},
            {"params": model.head_parameters(), "lr": 1e-3},
        ]
    )
    m = setting.ssr_images
    view_gen = torch.Generator().manual_seed(1)

    def views() -> torch.Tensor:
        return make_views(images[:m], levels=SSR_LEVELS, generator=view_gen)

    fixed_views = views().flatten(0, 1)

    def step() -> None:
        metric, ssr = model(torch.cat([images, fixed_views]), ssr=True)
        sim = metric[: setting.batch] @ metric[: setting.batch].T
        z0 = ssr[:m].repeat_interleave(SSR_LEVELS, dim=0)
        s_n = (z0 * ssr[setting.batch :]).sum(dim=1)
        loss = F.softplus(sim).mean() + F.softplus(-s_n).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    t_views = timed(views, setting.repeats * 4, device)
    t_step = timed(step, setting.repeats, device)
    n_step = setting.batch + m * SSR_LEVELS
    return {
        "view_s": t_views,
        "views_img_s": m / t_views,
        "views_view_s": m * SSR_LEVELS / t_views,
        "step_s": t_step,
        "step_img_s": n_step / t_step,
        "fraction": t_views / t_step,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller 224 px batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    b = CLASSES_PER_BATCH * SAMPLES_PER_CLASS
    r = 2 if args.quick else 5
    big_batch = 120 if device.type == "cuda" else (4 if args.quick else 8)
    big_m = SSR_IMAGES if device.type == "cuda" else big_batch
    settings = [
        Setting("glyphs 1x32x32, smallcnn, M=20", "smallcnn", 1, 32, b, SSR_IMAGES, r),
        Setting(f"glyphs 1x32x32, smallcnn, M={b}", "smallcnn", 1, 32, b, b, r),
        Setting(
            f"3x224x224, resnet50, M={big_m}",
            "resnet50",
            3,
            224,
            big_batch,
            big_m,
            1 if device.type == "cpu" else r,
        ),
    ]
    print(
        f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"levels {SSR_LEVELS}"
    )
    print(
        "| setting | B | views/batch | view gen s | src img/s | views/s | train step s "
        "| train img/s | views / step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s in settings:
        res = run(s, device)
        print(
            f"| {s.name} | {s.batch} | {s.ssr_images * SSR_LEVELS} | {res['view_s']:.4f} "
            f"| {res['views_img_s']:.0f} | {res['views_view_s']:.0f} | {res['step_s']:.3f} "
            f"| {res['step_img_s']:.1f} | {100 * res['fraction']:.1f} % |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
