"""Two side effects of the views, measured (docs/method.md cites the numbers):

1. how much of a view a warp fills from outside the image with torchvision's black (``fill=0``):
   256 draws on a uniform grey 32 px image, level 4 of 4, perspective alone and crop + perspective;
2. how far BatchNorm in train mode (the small CNN) moves the originals' embeddings when the views
   share their pass: the shipped SSR run (``notebooks/trained/glyphs-ssr``), 80 training glyphs
   with and without the 80 views of 20 of them, ``1 - cos`` per original.

Run: ``.venv/bin/python benchmarks/measure_view_cues.py`` (a few seconds, CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dmlnb.data import load_dataset
from dmlnb.experiment import forward, load_model
from dmlnb.views import make_views

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    grey = torch.full((256, 3, 32, 32), 0.5)
    for families in ("perspective", ("crop", "perspective")):
        v = make_views(grey, levels=4, families=families, generator=1, fill=0.0)
        frac = (v[:, 3] < 0.5 - 1e-3).float().mean(dim=(1, 2, 3))
        print(f"{families}: black fill at level 4: min {frac.min():.3f}, median {frac.median():.3f}, "
              f"max {frac.max():.3f}")
    model = load_model(ROOT / "notebooks" / "trained" / "glyphs-ssr")
    ds = load_dataset("glyphs", "train", max_per_class=4)
    x = torch.stack([ds[i][0] for i in range(80)])
    views = make_views(x[:20], levels=4, generator=2).reshape(80, *x.shape[1:])
    model.train()  # BatchNorm in train mode, as in a training step
    with torch.no_grad():
        alone = forward(model, x, False)[0]
        shared = forward(model, torch.cat([x, views]), False)[0][:80]
    gap = 1 - F.cosine_similarity(alone, shared)
    print(f"BatchNorm in train mode, originals with vs without the views: 1 - cos median "
          f"{gap.median():.4f}, max {gap.max():.4f}")


if __name__ == "__main__":
    main()
