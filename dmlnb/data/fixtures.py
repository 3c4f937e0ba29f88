"""Tiny copies of the real benchmarks' layouts, made from generated images.

They let the real-benchmark path (index files, splits, image decoding, training, the GPU recipe) run
end to end where the datasets are absent: in the tests, in CI, and as a self-check before anyone
spends GPU hours (``dmlnb recipe --fixture``). The index files follow the real formats; the images
are coloured noise with a class-dependent mean colour, so that a model can learn something.

- ``cub200``: ``CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, images/NNN.Name/}``
- ``cars196``: ``cars_annos.mat`` (the original annotation struct) + ``car_ims/``
- ``sop``: ``Stanford_Online_Products/Ebay_{train,test}.txt`` + ``<category>_final/`` folders
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmlnb._validate import check_choice, check_positive_int

FIXTURES = ("cub200", "cars196", "sop")


def _image(rng: np.random.Generator, class_id: int, size: int) -> np.ndarray:
    colour = np.random.default_rng(class_id).integers(30, 226, 3)
    noise = rng.normal(0, 40, (size, size, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=90)
    return str(path)


def make_fixture(
    name: str,
    root: str | Path,
    *,
    classes_per_split: int = 8,
    per_class: int = 6,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """Write a tiny copy of dataset ``name`` under ``root``; return the folder to pass as ``root``.

    ``classes_per_split`` training classes (the first of the standard training range) and as many
    test classes (the first of the test range), ``per_class`` JPEG images of ``size`` px each.
    """
    check_choice("name", name, FIXTURES)
    check_positive_int("classes_per_split", classes_per_split, 2)
    check_positive_int("per_class", per_class, 1)
    root = Path(root)
    rng = np.random.default_rng(seed)
    if name == "cub200":
        base = root / "CUB_200_2011"
        ids = list(range(1, classes_per_split + 1)) + list(range(101, 101 + classes_per_split))
        images, labels, classes, k = [], [], [], 0
        for cid in ids:
            folder = f"{cid:03d}.Species_{cid}"
            classes.append(f"{cid} {folder}")
            for j in range(per_class):
                k += 1
                rel = f"{folder}/Species_{cid}_{j:04d}_{k}.jpg"
                _save(base / "images" / rel, _image(rng, cid, size))
                images.append(f"{k} {rel}")
                labels.append(f"{k} {cid}")
        (base / "images.txt").write_text("\n".join(images) + "\n")
        (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
        (base / "classes.txt").write_text("\n".join(classes) + "\n")
        return root
    if name == "cars196":
        from scipy.io import savemat

        from dmlnb.data.benchmarks import CARS196_CLASSES

        ids = list(range(1, classes_per_split + 1)) + list(range(99, 99 + classes_per_split))
        fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
        ann = np.zeros((1, len(ids) * per_class), dtype=[(f, "O") for f in fields])
        k = 0
        for cid in ids:
            for j in range(per_class):
                rel = f"car_ims/{k + 1:06d}.jpg"
                _save(root / rel, _image(rng, cid, size))
                box = [np.array([[v]], dtype=np.uint16) for v in (1, 1, size - 1, size - 1)]
                ann[0, k] = (rel, *box, np.array([[cid]], dtype=np.uint8), np.array([[j % 2]], dtype=np.uint8))
                k += 1
        names = np.empty((1, 196), dtype=object)
        names[0, :] = list(CARS196_CLASSES)
        savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
        return root
    base = root / "Stanford_Online_Products"
    k = 0
    for part, first in (("train", 1), ("test", 11319)):
        rows = ["image_id class_id super_class_id path"]
        for cid in range(first, first + classes_per_split):
            folder = ("bicycle_final", "chair_final")[cid % 2]
            for j in range(per_class):
                k += 1
                rel = f"{folder}/{cid}_{j}.JPG"
                _save(base / rel, _image(rng, cid, size))
                rows.append(f"{k} {cid} {1 + cid % 2} {rel}")
        (base / f"Ebay_{part}.txt").write_text("\n".join(rows) + "\n")
    return root
