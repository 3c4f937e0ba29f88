"""Fashion-MNIST (Debian's IDX files) and scikit-learn's digits behind the dataset interface."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from dmlnb.data import load_dataset
from dmlnb.data.small import FASHION_ROOT, read_idx

has_fashion = pytest.mark.skipif(
    not (FASHION_ROOT / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)


@has_fashion
def test_fashion_mnist_splits_are_class_disjoint_with_the_official_counts():
    train, val, test = (load_dataset("fashion_mnist", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (24000, 6000, 5000)
    assert train.classes == val.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert test.classes == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert np.bincount(test.labels).tolist() == [1000] * 5
    assert np.bincount(val.labels).tolist() == [1200] * 5
    x, _ = test[0]
    assert x.shape == (1, 32, 32) and 0 <= float(x.min()) <= float(x.max()) <= 1
    # the val hold-out is seeded and disjoint from train
    again = load_dataset("fashion_mnist", "val")
    assert np.array_equal(again.images.numpy(), val.images.numpy())


def test_digits_splits():
    train, val, trainval, test = (load_dataset("digits", s) for s in ("train", "val", "trainval", "test"))
    assert len(train) + len(val) == len(trainval)
    assert len(trainval) + len(test) == 1797
    assert test.classes == ["5", "6", "7", "8", "9"]
    assert set(np.unique(test.labels)) == set(range(5))
    assert train[0][0].shape == (1, 32, 32)
    assert load_dataset("digits", "test", image_size=16)[0][0].shape == (1, 16, 16)


def test_corrupt_idx_file_is_named(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is truncated"):
        read_idx(bad)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", "test", root=str(tmp_path))


def test_missing_fashion_root_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", "train", root=str(tmp_path))
