"""Train and test image pipelines of the DML field, for PIL images and image tensors.

- train: ``Resize(resize) -> RandomCrop(crop) -> RandomHorizontalFlip(0.5) -> float [0, 1]``
- test:  ``Resize(resize) -> CenterCrop(crop) -> float [0, 1]``

with ``resize = 256`` and ``crop = 224`` by default (docs/method.md, "Training protocol";
:mod:`dmlnb.defaults` ``RESIZE``/``CROP``). ``Resize(s)`` scales the *shorter* side to ``s`` and keeps
the aspect ratio (bilinear, antialiased), as torchvision's ``Resize(int)``.

The pipelines end in ``[0, 1]`` float tensors ``[3, crop, crop]`` **without** ImageNet
normalisation by default: the model normalises its inputs itself, and the self-supervised views are
made from the un-normalised image (docs/method.md, reproduction defect 1). ``normalize=True`` appends
``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` for users who feed another model.

The pipelines are :mod:`torchvision.transforms.v2` compositions. Randomness (the crop offset and
the flip coin) comes from torch's default generator, as in torchvision; dmlnb's trainer runs every
training item under :func:`torch.random.fork_rng` seeded from the run's seed, the epoch and the
position (:class:`dmlnb.experiment.SeededDataset`), so augmentation is reproducible with any
number of loader workers. Outside the trainer, seed it the same way::

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = transform(img)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from dmlnb._validate import check_positive_int
from dmlnb.defaults import CROP, IMAGENET_MEAN, IMAGENET_STD, RESIZE


def build_transform(
    train: bool,
    *,
    resize: int = RESIZE,
    crop: int = CROP,
    flip: bool = True,
    normalize: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The field's train or test pipeline for PIL images (see the module docstring).

    Parameters
    ----------
    train : bool
        ``True``: ``Resize(resize) -> RandomCrop(crop) -> [flip] -> ToTensor``;
        ``False``: ``Resize(resize) -> CenterCrop(crop) -> ToTensor``.
    resize : int, default 256
        Length of the shorter side after resizing; must be ``>= crop``.
    crop : int, default 224
        Side of the square crop, i.e. the model's input size (32 for glyphs-sized images).
    flip : bool, default True
        Random horizontal flip with probability 0.5 (train only).
    normalize : bool, default False
        Append ``Normalize(mean, std)``; off because the model normalises (docs/method.md, reproduction defect 1).
    mean, std : sequence of float, default ImageNet (torchvision's values)
        Used only when ``normalize`` is true.
    Returns
    -------
    torchvision.transforms.v2.Compose
        A callable ``PIL.Image`` (or ``[C, H, W]`` tensor, uint8 or float in [0, 1]) ->
        ``torch.FloatTensor [C, crop, crop]`` in [0, 1] (normalised with ``normalize``).
    """
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__} ({train!r})")
    check_positive_int("resize", resize)
    check_positive_int("crop", crop)
    if resize < crop:
        raise ValueError(f"resize={resize} must be >= crop={crop} (the crop is taken after resizing)")
    steps: list = [v2.Resize(resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)]
    if train:
        steps.append(v2.RandomCrop(crop))
        if flip:
            steps.append(v2.RandomHorizontalFlip(0.5))
    else:
        steps.append(v2.CenterCrop(crop))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(list(mean), list(std)))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


def resize_for(crop: int) -> int:
    """The resize that keeps the field's 256:224 ratio for a crop of ``crop`` pixels.

    ``resize_for(224) == 256``; ``resize_for(32) == 37``, rounded to the nearest integer.
    """
    check_positive_int("crop", crop)
    return max(crop, int(round(crop * RESIZE / CROP)))


__all__ = ["build_transform", "resize_for"]
