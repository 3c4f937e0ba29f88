"""``dmlnb demo``: the README's first command, on the embedded glyph data.

Loads the glyph data and writes a gallery of characters (classes) and typefaces (the intra-class
variation) to ``OUT/glyph_gallery.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dmlnb.data import load_dataset
from dmlnb.gallery import glyph_gallery, save_png


def run_demo(out: str | Path = "figures/demo", seed: int = 0) -> dict:
    """Run the demo into ``out``; returns a dict of what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    written: dict[str, str] = {}
    test = load_dataset("glyphs", "test")
    grid, captions = glyph_gallery(test, "".join(test.classes[:8]), fonts_per_style=3, seed=seed)
    written["glyph_gallery"] = str(save_png(grid, out / "glyph_gallery.png", scale=2))
    (out / "glyph_gallery.json").write_text(json.dumps({"columns": captions, "rows": test.classes[:8]}, indent=1))
    print(f"glyphs: {len(test)} test images, {len(test.classes)} test classes; gallery -> {written['glyph_gallery']}")
    written["seconds"] = f"{time.time() - t0:.1f}"
    return written


def add_parser(subparsers) -> None:
    """Register ``dmlnb demo``."""
    p = subparsers.add_parser("demo", help="train a baseline and an SSR model briefly on glyphs, write figures")
    p.add_argument("--out", default="figures/demo", help="folder for the figures (default: figures/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: run_demo(a.out, a.seed) and 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dmlnb")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
