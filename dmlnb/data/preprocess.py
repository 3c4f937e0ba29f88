"""Train and test image pipelines of the DML field, for PIL images.

- train: ``Resize(resize) -> RandomCrop(crop) -> RandomHorizontalFlip(0.5) -> ToTensor``
- test:  ``Resize(resize) -> CenterCrop(crop) -> ToTensor``

with ``resize = 256`` and ``crop = 224`` by default (PAPER.md, "Training protocol";
:mod:`dmlnb.defaults` ``RESIZE``/``CROP``). ``Resize(s)`` scales the *shorter* side to ``s`` and keeps
the aspect ratio (bilinear, antialiased), as torchvision's ``Resize(int)``.

The pipelines end in ``[0, 1]`` float tensors ``[3, crop, crop]`` **without** ImageNet
normalisation by default: the model normalises its inputs itself, and the self-supervised views are
made from the un-normalised image (PAPER.md, defect 1). ``normalize=True`` appends
``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` for users who feed another model.

Randomness: the random crop offset and the flip coin are drawn from ``generator`` when one is given
(deterministic single-process use, tests). Without one they come from torch's default generator,
which a :class:`torch.utils.data.DataLoader` seeds in each worker from its own ``generator=``
argument: pass ``DataLoader(..., generator=torch.Generator().manual_seed(seed))`` for reproducible
augmentation with workers. (A generator object handed to the transform would be copied into every
worker with the same state, giving every worker the same crops.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from dmlnb._validate import check_positive_int, check_range
from dmlnb.defaults import CROP, IMAGENET_MEAN, IMAGENET_STD, RESIZE


class RandomCrop:
    """Crop a ``size x size`` window at a uniformly random offset (torchvision's RandomCrop rule).

    The image must be at least ``size`` on both sides (``Resize(resize >= size)`` guarantees it).
    """

    def __init__(self, size: int, generator: torch.Generator | None = None) -> None:
        self.size = check_positive_int("crop", size)
        self.generator = generator

    def __call__(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        w, h = TF.get_image_size(img)
        if w < self.size or h < self.size:
            raise ValueError(f"image of size {w}x{h} is smaller than crop={self.size}")
        top = int(torch.randint(0, h - self.size + 1, (1,), generator=self.generator))
        left = int(torch.randint(0, w - self.size + 1, (1,), generator=self.generator))
        return TF.crop(img, top, left, self.size, self.size)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (default 0.5)."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = check_range("flip_prob", p, 0.0, 1.0)
        self.generator = generator

    def __call__(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if float(torch.rand((), generator=self.generator)) < self.p:
            return TF.hflip(img)
        return img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Pipeline:
    """A sequence of callables applied in order; ``steps`` lists them (printable, picklable)."""

    def __init__(self, steps: Sequence[Callable]) -> None:
        self.steps = list(steps)

    def __call__(self, img):
        for step in self.steps:
            img = step(img)
        return img

    def __repr__(self) -> str:
        inner = ",\n    ".join(map(repr, self.steps))
        return f"Pipeline(\n    {inner}\n)"


class _Resize:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img):
        return TF.resize(img, self.size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)

    def __repr__(self) -> str:
        return f"Resize({self.size}, bilinear, antialias)"


class _CenterCrop:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img):
        return TF.center_crop(img, [self.size, self.size])

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class _ToTensor:
    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            return img.float().div(255) if img.dtype == torch.uint8 else img.float()
        return TF.to_tensor(img)

    def __repr__(self) -> str:
        return "ToTensor()  # float [0, 1]"


class _Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return TF.normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def build_transform(
    train: bool,
    *,
    resize: int = RESIZE,
    crop: int = CROP,
    flip: bool = True,
    normalize: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    generator: torch.Generator | None = None,
) -> Pipeline:
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
        Append ``Normalize(mean, std)``; off because the model normalises (PAPER.md, defect 1).
    mean, std : sequence of float, default ImageNet (torchvision's values)
        Used only when ``normalize`` is true.
    generator : torch.Generator, optional
        Source of the crop offsets and flip coins (see the module docstring).

    Returns
    -------
    Pipeline
        A callable ``PIL.Image -> torch.FloatTensor [C, crop, crop]``.
    """
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__} ({train!r})")
    check_positive_int("resize", resize)
    check_positive_int("crop", crop)
    if resize < crop:
        raise ValueError(f"resize={resize} must be >= crop={crop} (the crop is taken after resizing)")
    if train:
        steps: list[Callable] = [_Resize(resize), RandomCrop(crop, generator)]
        if flip:
            steps.append(RandomHorizontalFlip(0.5, generator))
    else:
        steps = [_Resize(resize), _CenterCrop(crop)]
    steps.append(_ToTensor())
    if normalize:
        steps.append(_Normalize(mean, std))
    return Pipeline(steps)


def resize_for(crop: int) -> int:
    """The resize that keeps the field's 256:224 ratio for a crop of ``crop`` pixels.

    ``resize_for(224) == 256``; ``resize_for(32) == 37``, rounded to the nearest integer.
    """
    check_positive_int("crop", crop)
    return max(crop, int(round(crop * RESIZE / CROP)))


__all__ = ["Pipeline", "RandomCrop", "RandomHorizontalFlip", "build_transform", "resize_for"]
