"""Train/test pipelines: the field's operations exactly, sizes as parameters, no normalisation by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dmlnb.data.preprocess import build_transform, resize_for
from dmlnb.defaults import IMAGENET_MEAN, IMAGENET_STD


def _image(w=50, h=40, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_test_pipeline_equals_torchvision_reference():
    img = _image()
    ours = build_transform(False, resize=24, crop=20)(img)
    ref = T.Compose([T.Resize(24), T.CenterCrop(20), T.ToTensor()])(img)
    assert ours.dtype == torch.float32 and ours.shape == (3, 20, 20)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)  # x / 255 vs x * (1 / 255): 1 ulp
    assert 0.0 <= float(ours.min()) and float(ours.max()) <= 1.0


def test_default_sizes_are_the_fields():
    out = build_transform(False)(_image(300, 260))
    assert out.shape == (3, 224, 224)
    assert resize_for(224) == 256 and resize_for(32) == 37


def test_train_crop_is_a_window_of_the_resized_image_maybe_flipped():
    img = _image()
    resized = T.ToTensor()(T.Resize(24)(img))  # [3, 24, 30]
    tf = build_transform(True, resize=24, crop=20)
    flips = 0
    torch.manual_seed(0)
    for _ in range(40):
        out = tf(img)
        windows = [
            (flip, top, left)
            for flip in (False, True)
            for top in range(resized.shape[1] - 19)
            for left in range(resized.shape[2] - 19)
            if torch.allclose(out, (lambda w: w.flip(-1) if flip else w)(resized[:, top : top + 20, left : left + 20]), rtol=0, atol=1e-6)
        ]
        assert windows, "the output is not a (flipped) 20x20 window of the resized image"
        flips += windows[0][0]
    assert 5 <= flips <= 35  # flip probability 0.5


def _draws(tf, img, seed: int, n: int = 5) -> list[torch.Tensor]:
    """``n`` outputs of ``tf`` under torch's generator seeded with ``seed`` (caller's state kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [tf(img) for _ in range(n)]


def test_train_pipeline_is_reproducible_under_a_seed_and_varies_between_draws():
    img = _image()
    state = torch.get_rng_state()
    outs_a = _draws(build_transform(True, resize=24, crop=16), img, 3)
    outs_b = _draws(build_transform(True, resize=24, crop=16), img, 3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b, strict=True))
    assert not all(torch.equal(outs_a[0], x) for x in outs_a[1:])


def test_no_flip_option():
    img = _image()  # 50x40: Resize(20) gives 25x20, so crops differ only in the column offset
    tf = build_transform(True, resize=20, crop=20, flip=False)
    resized = T.ToTensor()(T.Resize(20)(img))
    offsets = set()
    for out in _draws(tf, img, 0, 30):
        matches = [o for o in range(6) if torch.allclose(out, resized[:, :, o : o + 20], rtol=0, atol=1e-6)]
        assert matches, "without flip the output is an unflipped window"
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_normalize_flag_applies_imagenet_statistics():
    img = _image()
    raw = build_transform(False, resize=24, crop=20)(img)
    norm = build_transform(False, resize=24, crop=20, normalize=True)(img)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(norm, (raw - mean) / std)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="resize=16 must be >= crop=20"):
        build_transform(True, resize=16, crop=20)
    with pytest.raises(TypeError, match="crop"):
        build_transform(False, crop=2.5)
    with pytest.raises(ValueError, match="resize"):
        build_transform(False, resize=0)
    with pytest.raises(TypeError, match="train must be a bool"):
        build_transform("yes")


def test_tensor_images_work_too():
    # the trainer also runs the train pipeline on in-memory float tensors (glyphs: [1, H, W])
    x = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = _draws(build_transform(True, resize=37, crop=32), x, 1, 1)[0]
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    test = build_transform(False, resize=32, crop=32)(x)
    assert torch.allclose(test, x)  # resize to its own size and a full centre crop: unchanged
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(build_transform(False, resize=32, crop=32)(u8), u8.float() / 255)
