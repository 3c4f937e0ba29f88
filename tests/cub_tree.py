"""A two-class CUB_200_2011 folder as the archive holds it: the fixture of the download and
data-fault tests (imported as a plain module: tests/ is on ``sys.path`` under pytest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def cub_tree(src: Path, attributes: bool = False) -> Path:
    """``src/CUB_200_2011`` with classes 1 and 101, two 8x8 JPEGs each, ``images.txt`` and
    ``image_class_labels.txt``; with ``attributes``, also ``src/attributes.txt`` (as the archive
    has it beside the folder)."""
    d = src / "CUB_200_2011"
    rows, labels = [], []
    for i, (cid, name) in enumerate([(1, "001.Black_footed_Albatross"), (101, "101.White_Pelican")] * 2):
        rel = f"{name}/{name[4:]}_{i}.jpg"
        (d / "images" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(d / "images" / rel)
        rows.append(f"{i + 1} {rel}")
        labels.append(f"{i + 1} {cid}")
    (d / "images.txt").write_text("\n".join(rows) + "\n")
    (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    if attributes:
        (src / "attributes.txt").write_text("1 has_bill_shape::curved\n")
    return d
