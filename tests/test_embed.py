"""``dmlnb.experiment.embed`` gives, bit for bit, what the plain loop it replaced gave: a
``torch.no_grad`` pass over a DataLoader of the items with the same batch size, whether the
in-memory fast path applies (a :class:`TensorImageDataset` without a transform) or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmlnb import experiment
from dmlnb.config import TrainConfig
from dmlnb.data import load_dataset
from dmlnb.data.tensor import TensorImageDataset
from dmlnb.experiment import embed, forward


@torch.no_grad()
def embed_reference(model, dataset, *, batch_size=500, ssr=False):
    """The plain loop: the model in eval mode over a DataLoader of the items, in order."""
    was_training = model.training
    model.eval()
    out = {"embeddings": [], "labels": [], "ssr": []}
    try:
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
            z, zs = forward(model, x, ssr)
            out["embeddings"].append(z.float())
            out["labels"].append(torch.as_tensor(y))
            if ssr:
                out["ssr"].append(zs.float())
    finally:
        model.train(was_training)
    result = {"embeddings": torch.cat(out["embeddings"]).numpy(),
              "labels": torch.cat(out["labels"]).numpy().astype(np.int64),
              "indices": np.arange(len(dataset), dtype=np.int64)}
    if ssr:
        result["ssr"] = torch.cat(out["ssr"]).numpy()
    return result


class ItemDataset(torch.utils.data.Dataset):
    """A dataset that is not a TensorImageDataset: the DataLoader path."""

    def __init__(self, base: TensorImageDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


class OverridingDataset(TensorImageDataset):
    """A TensorImageDataset whose items are not its stored images: no fast path."""

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return 1.0 - image, label


@pytest.fixture(scope="module")
def glyphs():
    return load_dataset("glyphs", "val", max_per_class=5, image_size=32)


@pytest.fixture(scope="module")
def model(glyphs):
    return experiment.seeded_model(TrainConfig(), glyphs.channels)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


def test_fast_path_applies_only_to_plain_in_memory_sets(glyphs):
    from dmlnb.experiment import _tensor_batches  # noqa: PLC2701 (the helper under test)

    assert _tensor_batches(glyphs, 7, pin=False) is not None
    assert _tensor_batches(ItemDataset(glyphs), 7, pin=False) is None
    with_transform = TensorImageDataset(glyphs.images, glyphs.labels, glyphs.classes,
                                        transform=lambda im: im * 2)
    assert _tensor_batches(with_transform, 7, pin=False) is None
    overriding = OverridingDataset(glyphs.images, glyphs.labels, glyphs.classes)
    assert _tensor_batches(overriding, 7, pin=False) is None


def test_fast_path_batches_equal_the_collated_items(glyphs):
    from dmlnb.experiment import _tensor_batches  # noqa: PLC2701

    loader = torch.utils.data.DataLoader(glyphs, batch_size=7)
    fast = list(_tensor_batches(glyphs, 7, pin=False))
    assert len(fast) == len(loader)
    for (x, y), (fx, fy) in zip(loader, fast, strict=True):
        assert torch.equal(x, fx) and x.dtype == fx.dtype and x.is_contiguous()
        assert torch.equal(y, fy) and y.dtype == fy.dtype


@pytest.mark.parametrize("batch_size", [1, 7, 64, 500])
@pytest.mark.parametrize("ssr", [False, True])
def test_embed_equals_the_reference_bit_for_bit(one_thread, glyphs, model, batch_size, ssr):
    assert len(glyphs) % 7 != 0  # a last partial batch
    assert_same(embed(model, glyphs, batch_size=batch_size, ssr=ssr),
                embed_reference(model, glyphs, batch_size=batch_size, ssr=ssr))


def test_embed_without_the_fast_path(one_thread, glyphs, model):
    for ds in (ItemDataset(glyphs), OverridingDataset(glyphs.images, glyphs.labels, glyphs.classes),
               TensorImageDataset(glyphs.images, glyphs.labels, glyphs.classes,
                                  transform=lambda im: im.flip(-1))):
        assert_same(embed(model, ds, batch_size=16), embed_reference(model, ds, batch_size=16))
    assert not np.array_equal(embed(model, ItemDataset(glyphs), batch_size=16)["embeddings"],
                              embed(model, OverridingDataset(glyphs.images, glyphs.labels,
                                                             glyphs.classes),
                                    batch_size=16)["embeddings"])


def test_embed_channels_last_model(one_thread):
    """A channels_last model gets channels_last batches (3 channels: the layouts differ);
    the values are those of its contiguous batches."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 3, 32, 32), generator=g, dtype=torch.uint8)
    ds = TensorImageDataset(images, np.arange(23) % 5, [str(c) for c in range(5)])
    cfg = TrainConfig()
    net = experiment.seeded_model(cfg, 3).to(memory_format=torch.channels_last)
    assert experiment._is_channels_last(net)  # noqa: SLF001
    assert not experiment._is_channels_last(experiment.seeded_model(cfg, 3))  # noqa: SLF001
    assert_same(embed(net, ds, batch_size=8), embed_reference(net, ds, batch_size=8))
    assert_same(embed(net, ItemDataset(ds), batch_size=8), embed_reference(net, ds, batch_size=8))


def test_embed_restores_mode_and_leaves_the_global_rng(glyphs, model):
    model.train()
    state = torch.random.get_rng_state()
    embed(model, glyphs, batch_size=32)
    embed(model, ItemDataset(glyphs), batch_size=32)
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), state)
    model.eval()
    embed(model, glyphs, batch_size=32)
    assert not model.training


def test_embed_outputs(glyphs, model):
    """The pass runs under inference_mode; what comes back is plain numpy."""
    out = embed(model, glyphs, batch_size=32)
    assert all(isinstance(v, np.ndarray) for v in out.values())
    assert torch.from_numpy(out["embeddings"]).mul(2).sum().item() != 0
    assert out["labels"].dtype == np.int64
    assert np.array_equal(out["labels"], glyphs.labels)
    assert np.array_equal(out["indices"], np.arange(len(glyphs)))


def test_embed_with_a_progress_bar(one_thread, glyphs, model):
    assert_same(embed(model, glyphs, batch_size=64, quiet=False, desc="val"),
                embed_reference(model, glyphs, batch_size=64))
