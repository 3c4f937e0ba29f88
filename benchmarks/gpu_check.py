"""A short GPU check (a few minutes on one GPU): ResNet-50 at 224 px, training with and without SSR,
and evaluation throughput, through dmlnb's own training step (``Trainer.train_step``).

Run on a machine with a CUDA GPU::

    python benchmarks/gpu_check.py --out gpu_check.json            # bf16 autocast, channels_last
    python benchmarks/gpu_check.py --amp none --steps 10           # float32

The paper's batch (B = 120 = 30 classes x 4, M = 20 images with N = 4 views, p = 1 so that every
timed step makes views) on the embedded glyph data resized to 224 px (the content does not change the
cost; no download needed), random weights (``pretrained=False``: the check must run offline). It
reports images/s for the baseline step, for the SSR step, their time ratio next to the ideal
(B + M N) / B, and evaluation images/s; ``--cpu-smoke`` runs two steps on the CPU to check the
script itself (CI cannot time a GPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from dmlnb import train as T
from dmlnb.config import TrainConfig
from dmlnb.distributed import autocast


def _config(ssr: bool, args: argparse.Namespace, device: str) -> TrainConfig:
    size = 224 if not args.cpu_smoke else 64
    return TrainConfig.from_dict({
        "dataset": "glyphs", "train_split": "trainval", "dataset_options": {"max_per_class": 8},
        "backbone": "resnet50", "pretrained": False, "image_size": size, "embed_dim": 512,
        "batch_size": args.batch, "samples_per_class": 4, "ssr": ssr, "ssr_prob": 1.0,
        "ssr_images": args.m, "loss": "margin", "device": device, "amp": args.amp,
        "channels_last": device != "cpu", "runs_root": tempfile.mkdtemp(prefix="gpu_check_"), "quiet": True, "epochs": 1,
        "steps_per_epoch": args.steps + args.warmup, "seed": 0,
    })


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(ssr: bool, args: argparse.Namespace, device: str) -> dict[str, float]:
    """Seconds per training step (after warm-up) of fit's own iteration on one fixed batch."""
    cfg = _config(ssr, args, device)
    trainer = T.Trainer(cfg, None)
    trainer.setup()
    trainer.t0 = time.perf_counter()
    ds = trainer.train_ds
    idx = next(iter(trainer.sampler))
    x = torch.stack([ds[i][0] for i in idx]).to(trainer.device)
    y = torch.tensor([ds[i][1] for i in idx]).to(trainer.device)
    for _ in range(args.warmup):
        trainer.train_step(x, y)
    _sync(trainer.device)
    t = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(x, y)
    _sync(trainer.device)
    per_step = (time.perf_counter() - t) / args.steps
    images = cfg.batch_size + (cfg.ssr_images * cfg.ssr_levels if ssr else 0)
    out = {"step_s": per_step, "images_per_step": images, "images_per_s": images / per_step}
    if device != "cpu" and torch.cuda.is_available():
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # evaluation throughput: the trainer's model in eval mode over the same batch, repeated
    model = trainer.model.eval()
    n = 0
    t = time.perf_counter()
    with torch.no_grad(), autocast(trainer.device, cfg.amp):
        for _ in range(args.steps):
            model(x)
            n += x.shape[0]
    _sync(trainer.device)
    out["eval_images_per_s"] = n / (time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=120)
    ap.add_argument("--m", type=int, default=20, help="SSR images per batch (M)")
    ap.add_argument("--amp", default="bf16", choices=("none", "bf16", "fp16"))
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--cpu-smoke", action="store_true", help="2 tiny steps on the CPU (script check)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device = "cpu"
        args.steps, args.warmup, args.batch, args.m, args.amp = 1, 1, 16, 4, "none"
    elif not torch.cuda.is_available():
        ap.error("no CUDA device; use --cpu-smoke to check the script on a CPU")
    else:
        device = "cuda"
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "torch": torch.__version__, "amp": args.amp, "batch": args.batch, "m": args.m,
              "levels": 4}
    result["baseline"] = time_steps(False, args, device)
    result["ssr"] = time_steps(True, args, device)
    result["ssr_over_baseline"] = result["ssr"]["step_s"] / result["baseline"]["step_s"]
    result["ideal_ratio"] = (args.batch + args.m * 4) / args.batch
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
