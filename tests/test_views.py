"""Tests of dmlnb.views: views of increasing strength.

Oracles: torchvision's functional transforms (perspective, rotate, adjust_*, gaussian_blur) where
the definitions coincide, and a slow loop-based bilinear sampler for the crop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from dmlnb.defaults import (
    BLUR_MAX_SIGMA,
    COLOR_FACTOR,
    ROTATION_MAX_DEG,
    SSR_FAMILIES,
    SSR_LEVELS,
    SSR_SIGMA,
)
from dmlnb.views import FAMILIES, apply_view, make_views, sample_direction, strength_schedule

COMPOSITIONS = [(f,) for f in FAMILIES] + [tuple(SSR_FAMILIES), tuple(FAMILIES)]


def smooth_images(b: int, c: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-ish images: low-frequency noise plus medium-frequency texture, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(b, c, 4, 4, generator=g), size=(h, w), mode="bicubic")
    mid = F.interpolate(torch.rand(b, c, 8, 8, generator=g), size=(h, w), mode="bilinear")
    return (0.7 * low + 0.3 * mid).clamp(0, 1)


def coordinate_images(b: int, h: int = 24, w: int = 32) -> torch.Tensor:
    """Channel 0 = x of the pixel centre in (0, 1), channel 1 = y, channel 2 = 0.5."""
    x = (torch.arange(w) + 0.5) / w
    y = (torch.arange(h) + 0.5) / h
    img = torch.stack([x.expand(h, w), y[:, None].expand(h, w), torch.full((h, w), 0.5)], dim=0)
    return img.expand(b, 3, h, w).clone()


# ---- schedule ------------------------------------------------------------------------------------
def test_strength_schedule_is_tanh_sigma_n():
    t = strength_schedule(SSR_LEVELS, SSR_SIGMA)
    expected = [math.tanh(SSR_SIGMA * n) for n in range(1, SSR_LEVELS + 1)]
    assert t.tolist() == pytest.approx(expected, abs=1e-12)
    assert t.tolist() == pytest.approx([0.197, 0.380, 0.537, 0.664], abs=1e-3)  # docs/method.md
    assert torch.all(t[1:] > t[:-1])


def test_schedule_is_pluggable():
    x = smooth_images(3, 3)
    default = make_views(x, generator=0)
    as_callable = make_views(x, generator=0, schedule=lambda n: math.tanh(SSR_SIGMA * n))
    as_list = make_views(x, generator=0, schedule=strength_schedule().tolist())
    torch.testing.assert_close(as_callable, default, rtol=0, atol=1e-6)
    torch.testing.assert_close(as_list, default, rtol=0, atol=1e-6)
    linear = make_views(x, generator=0, schedule=lambda n: n / 10)
    assert not torch.allclose(linear, default)


# ---- shapes, dtype, range ------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtype_range(channels, dtype):
    x = smooth_images(5, channels, 20, 28).to(dtype)
    for families in COMPOSITIONS:
        v = make_views(x, levels=3, families=families, generator=1)
        assert v.shape == (5, 3, channels, 20, 28)
        assert v.dtype == dtype and v.device == x.device
        assert v.min() >= 0 and v.max() <= 1
        assert torch.isfinite(v).all()


def test_empty_batch():
    assert make_views(torch.rand(0, 3, 8, 8), generator=0).shape == (0, SSR_LEVELS, 3, 8, 8)


# ---- determinism ---------------------------------------------------------------------------------
def test_seed_determinism():
    x = smooth_images(4, 3)
    fams = tuple(FAMILIES)
    a = make_views(x, families=fams, generator=torch.Generator().manual_seed(7))
    b = make_views(x, families=fams, generator=torch.Generator().manual_seed(7))
    c = make_views(x, families=fams, generator=7)
    d = make_views(x, families=fams, generator=8)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a, d)


def test_make_views_uses_sample_direction_stream():
    """Nested views of a batch are apply_view at t_n with sample_direction(batch) of the same seed."""
    x = smooth_images(3, 3)
    views = make_views(x, families=FAMILIES, generator=3)
    dirs = sample_direction(FAMILIES, batch_size=3, generator=3)
    for i in range(3):
        for n, t in enumerate(strength_schedule().tolist()):
            one = apply_view(x[i], FAMILIES, t, {f: d[i] for f, d in dirs.items()})
            torch.testing.assert_close(views[i, n], one, rtol=0, atol=1e-5)


def test_directions_shared_across_family_sets():
    a = sample_direction(("crop",), generator=5)
    b = sample_direction(FAMILIES, generator=5)
    assert torch.equal(a["crop"], b["crop"])
    assert set(b) == set(FAMILIES)


# ---- identity at strength 0 and continuity -------------------------------------------------------
@pytest.mark.parametrize("families", COMPOSITIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_strength_zero_is_identity(families, channels):
    x = smooth_images(2, channels, 15, 22)
    d = sample_direction(families, generator=0)
    assert torch.equal(apply_view(x[0], families, 0.0, d), x[0])
    zero = make_views(x, levels=3, families=families, generator=0, schedule=[0.0, 0.0, 0.0])
    assert torch.equal(zero, x[:, None].expand_as(zero))


@pytest.mark.parametrize("families", COMPOSITIONS)
def test_slider_moves_smoothly(families):
    x = smooth_images(1, 3)[0]
    d = sample_direction(families, generator=2)
    tiny = apply_view(x, families, 1e-4, d)
    assert (tiny - x).abs().max() < 0.02  # continuous at 0 (border pixels may move a little)
    # up to 0.9: the crop's side sqrt(1 - t) changes ever faster as t -> 1 (area 0 at t = 1)
    steps = [apply_view(x, families, s, d) for s in np.linspace(0, 0.9, 19)]
    jumps = [float((b - a).abs().mean()) for a, b in zip(steps[:-1], steps[1:], strict=True)]
    assert max(jumps) < 0.08  # steps of 0.05 in strength: no jump
    assert float((steps[-1] - x).abs().mean()) > 4 * max(jumps)


# ---- nesting -------------------------------------------------------------------------------------
def visible_box(views: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] coordinate views -> [..., 4] (x_min, x_max, y_min, y_max) of what is seen."""
    xs, ys = views[..., 0, :, :], views[..., 1, :, :]
    return torch.stack(
        [xs.amin((-2, -1)), xs.amax((-2, -1)), ys.amin((-2, -1)), ys.amax((-2, -1))], -1
    )


def test_crop_levels_are_nested_and_shrink():
    x = coordinate_images(32)
    views = make_views(x, levels=6, families="crop", generator=0)  # [B, L, 3, H, W]
    boxes = torch.cat([visible_box(x)[:, None], visible_box(views)], dim=1)  # level 0 = original
    eps = 1e-5
    inner, outer = boxes[:, 1:], boxes[:, :-1]
    assert torch.all(inner[..., 0] >= outer[..., 0] - eps)  # x_min moves right (or stays)
    assert torch.all(inner[..., 1] <= outer[..., 1] + eps)
    assert torch.all(inner[..., 2] >= outer[..., 2] - eps)
    assert torch.all(inner[..., 3] <= outer[..., 3] + eps)
    area = (boxes[..., 1] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 2])
    assert torch.all(area[:, 1:] < area[:, :-1] - 1e-3)  # strictly smaller at every level
    # the kept area fraction is 1 - t_n (visible span of pixel centres: (W - 1) / W of a side)
    t = strength_schedule(6)
    h, w = x.shape[-2:]
    span = ((w - 1) / w) * ((h - 1) / h)
    kept = area[:, 1:] / span
    assert torch.allclose(kept, (1 - t).float().expand_as(kept), atol=0.03)


def test_independent_levels_are_not_nested():
    x = coordinate_images(32)
    views = make_views(x, levels=4, families="crop", nested=False, generator=0)
    boxes = visible_box(views)
    inner, outer = boxes[:, 1:], boxes[:, :-1]
    nested = (inner[..., 0] >= outer[..., 0] - 1e-5) & (inner[..., 1] <= outer[..., 1] + 1e-5)
    assert not bool(nested.all())


# ---- stronger is farther -------------------------------------------------------------------------
@pytest.mark.parametrize("families", COMPOSITIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_distance_rises_with_level(families, channels):
    x = smooth_images(24, channels, seed=1)
    views = make_views(x, levels=SSR_LEVELS, families=families, generator=0)
    mse = ((views - x[:, None]) ** 2).mean(dim=(2, 3, 4))  # [B, L]
    mse = torch.cat([torch.zeros(24, 1), mse], dim=1)
    mean = mse.mean(0)
    assert torch.all(mean[1:] > mean[:-1]), mean
    rises = (mse[:, 1:] > mse[:, :-1]).float().mean()
    assert rises >= 0.85, float(rises)


# ---- exactness against oracles -------------------------------------------------------------------
def bilinear_reference(img: np.ndarray, px: float, py: float) -> np.ndarray:
    """Bilinear sample at pixel-index coordinates, edge pixels extended (slow, obvious)."""
    c, h, w = img.shape
    px, py = min(max(px, 0.0), w - 1.0), min(max(py, 0.0), h - 1.0)
    x0, y0 = int(math.floor(px)), int(math.floor(py))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = px - x0, py - y0
    return (
        img[:, y0, x0] * (1 - ax) * (1 - ay)
        + img[:, y0, x1] * ax * (1 - ay)
        + img[:, y1, x0] * (1 - ax) * ay
        + img[:, y1, x1] * ax * ay
    )


@pytest.mark.parametrize("strength", [0.15, 0.5, 0.9])
def test_crop_matches_loop_reference(strength):
    img = smooth_images(1, 3, 9, 13, seed=3)[0]
    d = sample_direction("crop", generator=4)
    out = apply_view(img, "crop", strength, d).numpy()
    s = math.sqrt(1 - strength)  # window half-side (normalised), keeps area 1 - t
    cx, cy = (d["crop"] * (1 - s)).tolist()
    arr = img.double().numpy()
    c, h, w = arr.shape
    ref = np.zeros_like(arr)
    for i in range(h):
        for j in range(w):
            xn, yn = cx + s * ((2 * j + 1) / w - 1), cy + s * ((2 * i + 1) / h - 1)
            ref[:, i, j] = bilinear_reference(arr, ((xn + 1) * w - 1) / 2, ((yn + 1) * h - 1) / 2)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _continuous(points: torch.Tensor, h: int, w: int) -> list[list[float]]:
    return [[float((x + 1) * w / 2), float((y + 1) * h / 2)] for x, y in points.tolist()]


@pytest.mark.parametrize("strength", [0.2, 0.66, 1.0])
def test_perspective_matches_torchvision(strength):
    h, w = 11, 14
    img = smooth_images(1, 3, h, w, seed=5)[0]
    d = sample_direction("perspective", generator=6)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    moved = corners - corners * d["perspective"] * strength  # corners move inwards by t * f
    start, end = _continuous(corners, h, w), _continuous(moved, h, w)
    ref = TF.perspective(img, start, end, fill=[0.0])
    cover = TF.perspective(torch.ones(1, h, w), start, end, fill=[0.0])[0]
    ours = apply_view(img, "perspective", strength, d, fill=0.0)  # torchvision's black
    inside = cover > 1 - 1e-6  # torchvision blends its zero padding near the border
    assert inside.sum() >= 10
    torch.testing.assert_close(ours[:, inside], ref[:, inside], rtol=0, atol=1e-5)
    outside = cover < 1e-6
    assert torch.all(ours[:, outside] == 0)  # fill 0 beyond the image


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_rotation_matches_torchvision(strength):
    h, w = 12, 17
    img = smooth_images(1, 3, h, w, seed=7)[0]
    for sense in (-1.0, 1.0):
        d = {"rotation": torch.tensor(sense)}
        angle = strength * ROTATION_MAX_DEG * sense
        ref = TF.rotate(img, angle, interpolation=TF.InterpolationMode.BILINEAR)
        cover = TF.rotate(torch.ones(1, h, w), angle, interpolation=TF.InterpolationMode.BILINEAR)
        inside = cover[0] > 1 - 1e-6
        ours = apply_view(img, "rotation", strength, d)
        torch.testing.assert_close(ours[:, inside], ref[:, inside], rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_color_matches_torchvision(channels):
    x = smooth_images(6, channels, 10, 10, seed=8)
    dirs = sample_direction("color", batch_size=6, generator=9)
    for i in range(6):
        for t in (0.2, 0.66, 1.0):
            b, c, s = (1 + COLOR_FACTOR * t * dirs["color"][i]).tolist()
            ref = TF.adjust_brightness(x[i], b)
            ref = TF.adjust_contrast(ref, c)
            ref = TF.adjust_saturation(ref, s)  # a no-op on one channel
            ours = apply_view(x[i], "color", t, {"color": dirs["color"][i]})
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_color_factors_are_one_plus_minus_half_t():
    x = torch.full((1, 3, 4, 4), 0.4)
    views = make_views(x, levels=4, families="color", generator=0)
    t = strength_schedule(4)
    sense = sample_direction("color", batch_size=1, generator=0)["color"][0, 0]  # brightness
    # a flat grey image: contrast and saturation do nothing, brightness scales by its factor
    expected = 0.4 * (1 + COLOR_FACTOR * t * sense)
    torch.testing.assert_close(views[0, :, 0, 0, 0].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(32, 32), (20, 48)])
def test_blur_matches_torchvision(size):
    h, w = size
    img = smooth_images(1, 3, h, w, seed=10)[0]
    for t in (0.2, 0.7):
        sigma = t * BLUR_MAX_SIGMA * min(h, w) / 32
        k = 2 * math.ceil(3 * sigma) + 1
        ref = TF.gaussian_blur(img, [k, k], [sigma, sigma])
        ours = apply_view(img, "blur", t, {"blur": torch.zeros(0)})
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_input_messages():
    x = smooth_images(2, 3)
    with pytest.raises(ValueError, match="un-normalised"):
        make_views((x - 0.45) / 0.22)
    with pytest.raises(TypeError, match="floating"):
        make_views((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="families.*'crop'"):
        make_views(x, families=("crop", "zoom"))
    with pytest.raises(ValueError, match="levels"):
        make_views(x, levels=0)
    with pytest.raises(ValueError, match="schedule"):
        make_views(x, schedule=lambda n: 2.0)
    with pytest.raises(ValueError, match="schedule"):
        make_views(x, schedule=[0.1, 0.2])
    with pytest.raises(ValueError, match="channels"):
        make_views(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="strength"):
        apply_view(x[0], "crop", 1.5)
    with pytest.raises(ValueError, match="direction has no entry for perspective"):
        apply_view(x[0], ("crop", "perspective"), 0.5, sample_direction("crop", generator=0))
    with pytest.raises(TypeError, match="generator"):
        make_views(x, generator="seed")


# ---- CUDA ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_with_cpu_generator():
    x = smooth_images(8, 3)
    cpu = make_views(x, families=FAMILIES, generator=torch.Generator().manual_seed(0))
    gpu = make_views(x.cuda(), families=FAMILIES, generator=torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    again = make_views(x.cuda(), generator=cuda_gen)
    assert again.shape == (8, SSR_LEVELS, 3, 32, 32)


def test_border_fill_brings_in_the_background_not_black():
    """The default fill is the mean of the image's outermost ring: a strong perspective view of a
    drawing on a grey background stays grey where the warp brings in pixels from outside, so the
    amount of black does not tell the level."""
    img = torch.full((3, 24, 24), 0.5)
    img[:, 8:16, 8:16] = 1.0  # a white square on mid-grey
    d = sample_direction("perspective", generator=3)
    strong = apply_view(img, "perspective", 1.0, d)
    black = apply_view(img, "perspective", 1.0, d, fill=0.0)
    assert (black < 0.25).float().mean() > 0.02  # the old fill: a black wedge
    assert strong.min() >= 0.5 - 1e-6  # nothing darker than the background
    views = make_views(img.unsqueeze(0), levels=4, families="perspective", generator=3)
    assert views.min() >= 0.5 - 1e-6
    # the ring mean by hand, per channel
    rgb = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0))
    ring = torch.cat([rgb[:, 0, :], rgb[:, -1, :], rgb[:, 1:-1, 0], rgb[:, 1:-1, -1]], dim=1)
    assert ring.shape[1] == 2 * 6 + 2 * 3
    from dmlnb.views import _fill_values
    torch.testing.assert_close(_fill_values(rgb.unsqueeze(0), "border")[0, :, 0, 0], ring.mean(1))


def test_fill_refuses_unknown_names():
    img = torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="border"):
        apply_view(img, "perspective", 0.5, generator=0, fill="edge")
    with pytest.raises(ValueError, match="fill"):
        make_views(img.unsqueeze(0), fill=1.5)
