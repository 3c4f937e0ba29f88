"""Two more small real data sets behind the same interface: Fashion-MNIST and scikit-learn's digits.

Both have 10 classes: classes 0-4 are training classes, 5-9 test classes (class-disjoint, as in the
DML benchmarks). With only five training classes a class-disjoint validation split would leave too
few classes to train on, so **here ``val`` holds out 20 % of the training classes' images** (seeded by
``val_seed``), and ``train`` is the other 80 %. ``trainval`` is all of them.

- ``fashion_mnist``: Zalando's Fashion-MNIST (MIT), 28x28 grayscale photos, from Debian's package
  ``dataset-fashion-mnist`` (IDX files under ``/usr/share/datasets/fashion-mnist``) or ``root``.
  Training classes come from the official training file (30,000 images), test classes from the
  official test file (5,000 images).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 16 grey levels).

Both are resized to ``image_size`` (default 32) at load time.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from dmlnb.data.registry import register
from dmlnb.data.tensor import TensorImageDataset, check_options, resize_uint8, select_per_class
from dmlnb.defaults import SMALL_VAL_FRACTION

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TRAIN_CLASSES = (0, 1, 2, 3, 4)
TEST_CLASSES = (5, 6, 7, 8, 9)
OPTIONS = ("image_size", "max_per_class", "subset_seed", "val_seed", "transform")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; a bad file is named in the error."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(raw) - offset} bytes of data, "
                         f"expected {expected} for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _split_indices(labels: np.ndarray, split: str, val_seed: int) -> np.ndarray:
    if split == "test":
        return np.flatnonzero(np.isin(labels, TEST_CLASSES))
    idx = np.flatnonzero(np.isin(labels, TRAIN_CLASSES))
    if split == "trainval":
        return idx
    rng = np.random.default_rng(val_seed)
    is_val = np.zeros(idx.size, dtype=bool)
    for c in TRAIN_CLASSES:
        members = np.flatnonzero(labels[idx] == c)
        n_val = int(round(SMALL_VAL_FRACTION * members.size))
        is_val[rng.choice(members, n_val, replace=False)] = True
    return idx[is_val] if split == "val" else idx[~is_val]


def _make(name: str, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], split: str,
          options: dict[str, Any]) -> TensorImageDataset:
    check_options(options, OPTIONS, name)
    idx = _split_indices(labels, split, int(options.get("val_seed", 0)))
    class_ids = TEST_CLASSES if split == "test" else TRAIN_CLASSES
    local = labels[idx] - class_ids[0]
    keep = select_per_class(local, options.get("max_per_class"), int(options.get("subset_seed", 0)))
    images = resize_uint8(images[idx[keep]], int(options.get("image_size") or 32))
    return TensorImageDataset(images, local[keep], [classes[c] for c in class_ids],
                              transform=options.get("transform"), name=name)


def load_fashion_mnist(split: str, root: str | None = None, **options: Any) -> TensorImageDataset:
    """Fashion-MNIST, classes 0-4 train (official training file) / 5-9 test (official test file)."""
    base = Path(root) if root is not None else FASHION_ROOT
    stem = "t10k" if split == "test" else "train"
    files = [base / f"{stem}-images-idx3-ubyte.gz", base / f"{stem}-labels-idx1-ubyte.gz"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: missing {', '.join(missing)}. Install Debian's package "
            "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), or pass root= a folder "
            "with the four IDX files (train/t10k-images/labels-idx*-ubyte.gz)."
        )
    images = read_idx(files[0])
    labels = read_idx(files[1]).astype(np.int64)
    return _make("fashion_mnist", images, labels, FASHION_CLASSES, split, options)


def load_digits(split: str, root: str | None = None, **options: Any) -> TensorImageDataset:
    """scikit-learn's digits (8x8, 16 grey levels scaled to 0-255), classes 0-4 train / 5-9 test."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return _make("digits", images, bunch.target.astype(np.int64), tuple(map(str, range(10))), split,
                 options)


register("fashion_mnist", load_fashion_mnist, "Fashion-MNIST photos (Debian package), 5/5 classes")
register("digits", load_digits, "scikit-learn's 8x8 digits, 5/5 classes")
