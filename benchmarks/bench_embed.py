"""The embedding pass of evaluation: ``dmlnb.experiment.embed`` against a bare inference loop.

Three contestants embed the same validation images with the same model, in one run:

- ``before``: ``embed`` as it was before the in-memory fast path (a verbatim copy, below):
  ``torch.no_grad``, a DataLoader with a generator over the items (``__getitem__`` + default
  collate), tqdm, ``.float().cpu()`` per batch;
- ``bare``: the floor a user would write: ``model.eval(); with torch.inference_mode(): for x, _
  in DataLoader(ds, batch_size=bs): model(x)`` (outputs discarded);
- ``after``: :func:`dmlnb.experiment.embed` as it is now.

Goal: ``after`` / ``bare`` <= 1.05 at every batch size. Two models, as the trainer builds them:

- ``smallcnn``: the small CNN at 32 px on the glyphs' validation split (``TrainConfig()``
  defaults: contiguous memory format), all of it;
- ``lite0``: the pretrained EfficientNet-Lite0 at 64 px (``preset("cpu-glyphs-lite0")``, whose
  ``channels_last`` puts the model in that format, as :class:`dmlnb.train.Trainer` does), on the
  first ``--lite_n`` validation glyphs (2,000).

Each is timed at the batch sizes ``--batch_sizes`` (64 128 256 500 1000). The reference batch
size is the default ``TrainConfig.eval_batch_size`` (``dmlnb.defaults.EVAL_BATCH_SIZE``) when it is
among them. A fourth contestant, ``after, other format``, runs ``embed`` at the reference batch
size on the same model in the other memory format (contiguous <-> ``channels_last``), for the
choice of format. The run also checks that ``after`` gives the same embeddings bit for bit as
``before`` at each batch size, and as ``after`` at the reference size (does the batch size change
the last bits?), and whether the other format changes them.

Every (batch size, contestant) is warmed up once on ``bs + n % bs`` images (both batch shapes of
the pass); the timed repetitions are interleaved: within a repetition the batch sizes and the
contestants alternate their order, so load hits all alike. Single-threaded by default
(``--threads 1``) so that CPU time (:func:`time.process_time`) measures the work whatever the
load of the shared machine; wall time is shown next to it. Ratios are of medians.

    .venv/bin/python benchmarks/bench_embed.py [--quick] [--models smallcnn lite0]
        [--batch_sizes 64 128 256 500 1000] [--repeats 3] [--lite_n 2000] [--threads 1]
        [--out F.md]

``--quick``: 1,000 / 500 images, batch sizes 500 and the default, one repetition (a smoke run:
~40 s of CPU, 1.5 min of wall time at load 5). The full run costs 2-4 min of CPU per model
(wall time 2-3x that on a loaded machine); ``--models``, ``--lite_n`` and ``--repeats`` trim it.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import emit  # noqa: E402 - benchmarks/_report.py

from dmlnb import defaults as D  # noqa: E402
from dmlnb import experiment  # noqa: E402
from dmlnb.config import TrainConfig, preset  # noqa: E402
from dmlnb.data.tensor import TensorImageDataset  # noqa: E402
from dmlnb.distributed import autocast  # noqa: E402
from dmlnb.experiment import forward, loader_generator  # noqa: E402

MODELS = ("smallcnn", "lite0")
CONTESTANTS = ("before", "bare", "after")


@torch.no_grad()
def embed_before(model, dataset, *, batch_size=500, device="cpu", num_workers=0, amp="none",
                 ssr=False, quiet=True, desc="embed"):
    """``dmlnb.experiment.embed`` before the fast path, verbatim."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", generator=loader_generator(0, 0),
    )
    embs, ssrs, labels = [], [], []
    try:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=quiet):
            x = x.to(device, non_blocking=True)
            with autocast(device, amp):
                z, zs = forward(model, x, ssr)
            embs.append(z.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
            if ssr:
                ssrs.append(zs.float().cpu())
    finally:
        model.train(was_training)
    out = {
        "embeddings": torch.cat(embs).numpy(),
        "labels": torch.cat(labels).numpy().astype(np.int64),
        "indices": np.arange(len(dataset), dtype=np.int64),
    }
    if ssr:
        out["ssr"] = torch.cat(ssrs).numpy()
    return out


def bare(model, ds, batch_size):
    model.eval()
    with torch.inference_mode():
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch_size):
            model(x)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def head(ds: TensorImageDataset, n: int) -> TensorImageDataset:
    """The first ``n`` items of an in-memory set, as an in-memory set."""
    n = min(n, len(ds))
    return TensorImageDataset(ds.images[:n], ds.labels[:n], ds.classes, name=ds.name)


def setup(name: str, n: int | None) -> tuple[TrainConfig, TensorImageDataset, dict]:
    """Config, data and {format: model} (the config's format first) of one benchmark model."""
    cfg = TrainConfig() if name == "smallcnn" else preset("cpu-glyphs-lite0")
    ds = experiment.load_split(cfg, "val")
    if n is not None:
        ds = head(ds, n)
    model = experiment.seeded_model(cfg, ds.channels)
    other = experiment.seeded_model(cfg, ds.channels)
    cl, cont = torch.channels_last, torch.contiguous_format
    fmt = "channels_last" if cfg.channels_last else "contiguous"
    model = model.to(memory_format=cl if cfg.channels_last else cont)  # as Trainer does
    other = other.to(memory_format=cont if cfg.channels_last else cl)
    other_fmt = "contiguous" if cfg.channels_last else "channels_last"
    return cfg, ds, {fmt: model, other_fmt: other}


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def loading(ds: TensorImageDataset, batch_size: int, rounds: int = 7) -> dict[str, float]:
    """CPU seconds (median of ``rounds``, alternated) to produce every batch without a model:
    the DataLoader over the items (what ``before`` and ``bare`` pay) vs the slices of the
    stored tensor (``embed``'s in-memory fast path)."""
    from dmlnb.experiment import _tensor_batches  # noqa: PLC2701 (measured here)

    def loader() -> None:
        for _ in torch.utils.data.DataLoader(ds, batch_size=batch_size):
            pass

    def sliced() -> None:
        for _ in _tensor_batches(ds, batch_size, pin=False):
            pass

    out: dict[str, list[float]] = {"loader": [], "slices": []}
    for r in range(rounds + 1):  # the first round warms up
        for k, fn in (("loader", loader), ("slices", sliced))[:: 1 if r % 2 else -1]:
            c = timed(fn)[1]
            if r:
                out[k].append(c)
    return {k: statistics.median(v) for k, v in out.items()}


def bench_model(name: str, n: int | None, batch_sizes: list[int], repeats: int) -> dict:
    cfg, ds, models = setup(name, n)
    (fmt, model), (other_fmt, other) = models.items()
    ref_bs = D.EVAL_BATCH_SIZE if D.EVAL_BATCH_SIZE in batch_sizes else batch_sizes[len(batch_sizes) // 2]
    load = loading(ds, ref_bs)
    fns = {
        "before": lambda bs, d=ds: embed_before(model, d, batch_size=bs),
        "bare": lambda bs, d=ds: bare(model, d, bs),
        "after": lambda bs, d=ds: experiment.embed(model, d, batch_size=bs),
    }
    other_fn = lambda d=ds: experiment.embed(other, d, batch_size=ref_bs)  # noqa: E731
    # bit-for-bit checks (also warm the full-size shapes)
    emb = {bs: experiment.embed(model, ds, batch_size=bs)["embeddings"] for bs in batch_sizes}
    same_before = {bs: np.array_equal(emb[bs], embed_before(model, ds, batch_size=bs)["embeddings"])
                   for bs in batch_sizes}
    same_ref = {bs: np.array_equal(emb[bs], emb[ref_bs]) for bs in batch_sizes}
    other_emb = other_fn()["embeddings"]
    other_diff = float(np.abs(other_emb - emb[ref_bs]).max())
    # warm-up of every contestant at every batch size, on both batch shapes
    for bs in batch_sizes:
        w = head(ds, bs + len(ds) % bs)
        for c in CONTESTANTS:
            fns[c](bs, w)
    times: dict = {}
    for r in range(repeats):
        sizes = batch_sizes if r % 2 == 0 else batch_sizes[::-1]
        for i, bs in enumerate(sizes):
            order = list(CONTESTANTS) if (r + i) % 2 == 0 else list(CONTESTANTS)[::-1]
            if bs == ref_bs:
                order.insert(r % (len(order) + 1), "other")
            for c in order:
                t = timed(other_fn if c == "other" else lambda c=c, bs=bs: fns[c](bs))
                times.setdefault((c, bs), []).append(t)
        print(f"{name}: repeat {r + 1}/{repeats} done; {uptime()}", flush=True)
    return {"name": name, "n": len(ds), "size": cfg.image_size, "fmt": fmt, "other_fmt": other_fmt,
            "batch_sizes": batch_sizes, "ref_bs": ref_bs, "times": times,
            "same_before": same_before, "same_ref": same_ref, "other_diff": other_diff,
            "other_same": other_diff == 0.0, "loading": load}


def med(values, which: int) -> float:
    return statistics.median(v[which] for v in values)


def table(res: dict) -> list[str]:
    t, n = res["times"], res["n"]
    lines = [
        f"**{res['name']}** at {res['size']} px, {n} validation glyphs, model in {res['fmt']} "
        f"format (as the trainer builds it): ms per pass, CPU / wall (medians); ratios of CPU "
        f"(wall) medians; `after = before` and `= after@{res['ref_bs']}`: the embeddings bit for "
        f"bit (`np.array_equal`).",
        "",
        "| batch | before | bare | after | before / bare | after / bare | after images/s (CPU) "
        f"| after = before | = after@{res['ref_bs']} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for bs in res["batch_sizes"]:
        cells = [f"{med(t[(c, bs)], 1) * 1e3:.0f} / {med(t[(c, bs)], 0) * 1e3:.0f}" for c in CONTESTANTS]

        def ratio(a: str, bs: int = bs) -> str:
            return (f"{med(t[(a, bs)], 1) / med(t[('bare', bs)], 1):.3f} "
                    f"({med(t[(a, bs)], 0) / med(t[('bare', bs)], 0):.3f})")
        ips = n / med(t[("after", bs)], 1)
        lines.append(f"| {bs} | " + " | ".join(cells) + f" | {ratio('before')} | {ratio('after')} "
                     f"| {ips:.0f} | {'yes' if res['same_before'][bs] else 'NO'} "
                     f"| {'yes' if res['same_ref'][bs] else 'NO'} |")
    o, a = t[("other", res["ref_bs"])], t[("after", res["ref_bs"])]
    lines += [
        "",
        f"Other memory format at batch {res['ref_bs']}: `embed` on the model in {res['other_fmt']} "
        f"format {med(o, 1) * 1e3:.0f} / {med(o, 0) * 1e3:.0f} ms, {med(o, 1) / med(a, 1):.3f}x "
        f"the CPU time in {res['fmt']}; embeddings "
        + ("identical." if res["other_same"] else
           f"differ (max abs difference {res['other_diff']:.2e}: another convolution algorithm)."),
        "",
        f"Data alone at batch {res['ref_bs']} (no model; CPU ms, median of 7 alternated): "
        f"DataLoader over the items {res['loading']['loader'] * 1e3:.1f}, slices of the stored "
        f"tensor {res['loading']['slices'] * 1e3:.1f}; the DataLoader is "
        f"{res['loading']['loader'] / med(t[('bare', res['ref_bs'])], 1) * 100:.1f} % of the bare "
        f"loop's CPU time.",
        "",
    ]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1,000 / 500 images, batch sizes 500 and the default, one repetition")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                    help="default 64 128 256 500 1000")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3)")
    ap.add_argument("--lite_n", type=int, default=None, help="validation glyphs for lite0 (2000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=None, help="append the markdown result to this file")
    args = ap.parse_args(argv)
    batch_sizes = args.batch_sizes or (sorted({500, D.EVAL_BATCH_SIZE}) if args.quick
                                       else sorted({64, 128, 256, 500, 1000, D.EVAL_BATCH_SIZE}))
    repeats = args.repeats or (1 if args.quick else 3)
    lite_n = args.lite_n or (500 if args.quick else 2000)
    torch.set_num_threads(args.threads)
    load_before = uptime()
    print(f"before: {load_before}", flush=True)
    t_start = time.perf_counter()
    results = [bench_model(m, (1000 if args.quick else None) if m == "smallcnn" else lite_n,
                           batch_sizes, repeats) for m in args.models]
    load_after = uptime()
    elapsed = time.perf_counter() - t_start
    print(f"after: {load_after}", flush=True)
    cmd = " ".join([".venv/bin/python", "benchmarks/bench_embed.py", *(argv or sys.argv[1:])])
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {elapsed:.0f} s",
        "",
        f"`{cmd}`",
        "",
        f"- load before: `{load_before}`",
        f"- load after: `{load_after}`",
        f"- {repeats} interleaved repetitions per cell; goal: after / bare <= 1.05",
        "",
    ]
    for res in results:
        lines += table(res)
    text = "\n".join(lines)
    return emit(text, args.out)


if __name__ == "__main__":
    sys.exit(main())
