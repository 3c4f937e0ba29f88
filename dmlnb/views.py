"""Views of increasing strength: the self-supervised task of SSR (Fu et al., AAAI 2021).

For every image x and strength level n = 1..N, a view x_n is made by transformations whose
magnitude follows a strength schedule t_n in [0, 1], by default

    t_n = tanh(sigma * n),   sigma = 0.2   ->   t = 0.197, 0.380, 0.537, 0.664   (N = 4).

Families and what the strength t does (defaults in :mod:`dmlnb.defaults`):

==============  ==================================================================================
``crop``        keep the area fraction ``1 - t`` (a window with the image's aspect ratio, side
                ``sqrt(1 - t)``), re-sized back to the full image (bilinear)
``perspective`` each corner moves inwards by ``t * f`` of the half-width/height, ``f ~ U[0, 1]``
                per corner and axis (torchvision's ``RandomPerspective(distortion_scale=t)``)
``color``       brightness, contrast, saturation factors ``1 + COLOR_FACTOR * t * d``, ``d = +-1``
                (torchvision's ``adjust_*`` definitions; saturation is a no-op on grayscale)
``rotation``    (optional) angle ``t * ROTATION_MAX_DEG * d`` degrees, ``d = +-1``
``blur``        (optional) Gaussian blur, sigma ``t * BLUR_MAX_SIGMA * min(H, W) / 32`` pixels
==============  ==================================================================================

A **direction** is the random part of a view (the crop window's anchor, the corner fractions, the
signs); the strength is the deterministic part. ``nested=True`` (the default, a dmlnb decision,
docs/method.md) uses one direction per image for all levels, so view n+1 is view n's transformation with a
larger magnitude: crop windows are nested, corners move further along the same ray, colour factors
move further from 1 in the same sense. ``nested=False`` draws a fresh direction per level (the
reproduction's behaviour, for the ablation).

Geometric families are composed into one projective map per view and sampled once
(``F.grid_sample``, bilinear): order crop -> perspective -> rotation, then colour
(brightness -> contrast -> saturation, a fixed order: torchvision's ``ColorJitter`` shuffles it),
then blur. Samples that fall inside the image extent use the nearest edge pixel beyond the last
pixel centre (like a resize); samples outside the image get ``fill``, with a half-pixel linear ramp
so that the border is not jagged. The default fill, ``"border"``, is the mean of the image's
outermost pixel ring per channel (its background: black for the glyphs, grey for the icons): a
constant black wedge that grows with the strength would be a cue to the level that has nothing to
do with the image. ``fill=0.0`` is torchvision's black. Strength 0 is the identity, exactly.

Known differences from torchvision's random transforms (the tests check the rest against
torchvision's functional ops): the crop window is continuous (sub-pixel) and keeps the image's
aspect ratio, where ``RandomResizedCrop`` also draws an aspect ratio and rounds to whole pixels;
colour factors are exactly ``1 +- COLOR_FACTOR * t`` (a random sign), where ``ColorJitter`` draws
them uniformly in that interval; near the image border, torchvision blends its zero padding into
the edge pixels (darkening them a little), dmlnb extends the edge pixel as a resize does.

Views are made from **un-normalised** images in [0, 1] on the images' device; the model normalises
originals and views alike (docs/method.md, "Defects of the public reproduction", 1, of the reproduction).

References
----------
Fu, Li, Mao, Wang, Zhang, "Deep Metric Learning with Self-Supervised Ranking", AAAI 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from dmlnb._validate import check_choice, check_positive_int, check_range
from dmlnb.defaults import (
    BLUR_MAX_SIGMA,
    COLOR_FACTOR,
    ROTATION_MAX_DEG,
    SSR_FAMILIES,
    SSR_LEVELS,
    SSR_NESTED,
    SSR_SIGMA,
    VIEW_FAMILIES,
    VIEW_FILL,
    VIEW_FILL_CHOICES,
)

__all__ = [
    "FAMILIES",
    "apply_view",
    "make_views",
    "sample_direction",
    "strength_schedule",
]

#: Every family, in the canonical order in which directions are drawn and transformations applied.
FAMILIES: tuple[str, ...] = VIEW_FAMILIES

_GEOMETRIC = ("crop", "perspective", "rotation")
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
_BLUR_REFERENCE_SIZE = 32  # BLUR_MAX_SIGMA is stated for 32 px images and scaled with min(H, W)
_RANGE_TOLERANCE = 1e-3  # values this far outside [0, 1] mean the images were normalised

Direction = dict[str, torch.Tensor]
Schedule = Callable[[int], float] | Sequence[float]


# --------------------------------------------------------------------------------------------------
# strength and direction
# --------------------------------------------------------------------------------------------------
def strength_schedule(levels: int = SSR_LEVELS, sigma: float = SSR_SIGMA) -> torch.Tensor:
    """The default strength schedule ``t_n = tanh(sigma * n)`` for ``n = 1..levels``.

    Parameters
    ----------
    levels : int
        Number of views N (default ``SSR_LEVELS`` = 4, the paper's choice).
    sigma : float
        Growth rate (default ``SSR_SIGMA`` = 0.2, the reproduction's value), ``sigma >= 0``.

    Returns
    -------
    torch.Tensor
        float64 tensor ``[levels]`` in [0, 1), increasing when ``sigma > 0``.
    """
    check_positive_int("levels", levels)
    check_range("sigma", sigma, 0.0)
    n = torch.arange(1, levels + 1, dtype=torch.float64)
    return torch.tanh(sigma * n)


def _resolve_schedule(levels: int, sigma: float, schedule: Schedule | None) -> torch.Tensor:
    if schedule is None:
        return strength_schedule(levels, sigma)
    if callable(schedule):
        values = [schedule(n) for n in range(1, levels + 1)]
    elif isinstance(schedule, (Sequence, torch.Tensor)) and not isinstance(schedule, str):
        values = [float(v) for v in schedule]
        if len(values) != levels:
            raise ValueError(f"schedule has {len(values)} strengths but levels={levels}")
    else:
        raise TypeError(
            "schedule must be None (t_n = tanh(sigma n)), a callable n -> t_n, or a sequence of "
            f"{levels} strengths; got {type(schedule).__name__}"
        )
    for n, t in enumerate(values, start=1):
        check_range(f"schedule(n={n})", float(t), 0.0, 1.0)
    return torch.tensor(values, dtype=torch.float64)


def _resolve_families(families: str | Sequence[str], name: str = "families") -> tuple[str, ...]:
    if isinstance(families, str):
        families = (families,)
    families = tuple(families)
    if not families:
        raise ValueError(f"{name} is empty; choose one or more of {', '.join(FAMILIES)}")
    for f in families:
        check_choice(name, f, FAMILIES)
    if len(set(families)) != len(families):
        raise ValueError(f"{name}={families!r} names a family twice")
    return families


def _resolve_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(
        f"generator must be a torch.Generator, an int seed or None; got {type(generator).__name__}"
    )


def _draw(shape: tuple[int, ...], generator: torch.Generator | None) -> Direction:
    """Draw one direction for every family (always all, in FAMILIES order: common random numbers)."""
    device = generator.device if generator is not None else torch.device("cpu")
    kw = {"generator": generator, "device": device, "dtype": torch.float32}

    def signs(*s: int) -> torch.Tensor:
        return torch.randint(0, 2, shape + s, **kw) * 2 - 1

    return {
        "crop": torch.rand(shape + (2,), **kw) * 2 - 1,  # window anchor u in [-1, 1]^2 (x, y)
        "perspective": torch.rand(shape + (4, 2), **kw),  # corner fractions f in [0, 1]
        "rotation": signs(),  # sense of rotation
        "color": signs(3),  # senses of brightness, contrast, saturation
        "blur": torch.zeros(shape + (0,), dtype=torch.float32, device=device),  # no random part
    }


def sample_direction(
    families: str | Sequence[str] = SSR_FAMILIES,
    batch_size: int | None = None,
    *,
    generator: torch.Generator | int | None = None,
) -> Direction:
    """Draw the random part of a view (its *direction*), to be used at any strength.

    Parameters
    ----------
    families : str or sequence of str
        Families to draw for (default ``SSR_FAMILIES``); see :data:`FAMILIES`. Directions of every
        family are always drawn, in a fixed order, so that the same generator gives the same crop
        direction whichever other families are switched on.
    batch_size : int, optional
        ``None`` (default): one direction, for :func:`apply_view`. Otherwise a leading batch dim.
    generator : torch.Generator or int, optional
        Source of randomness (an int is a seed for a new CPU generator). ``None`` uses torch's
        global generator (not reproducible). Draws happen on the generator's device.

    Returns
    -------
    dict
        ``{family: tensor}``: ``crop`` ``[..., 2]`` anchor in [-1, 1]; ``perspective`` ``[..., 4, 2]``
        corner fractions in [0, 1] (corners top-left, top-right, bottom-right, bottom-left; x, y);
        ``rotation`` ``[...]`` sign; ``color`` ``[..., 3]`` signs of brightness, contrast,
        saturation; ``blur`` ``[..., 0]`` (no random part).
    """
    families = _resolve_families(families)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size, minimum=0)
    generator = _resolve_generator(generator)
    shape = () if batch_size is None else (batch_size,)
    drawn = _draw(shape, generator)
    return {f: drawn[f] for f in families}


# --------------------------------------------------------------------------------------------------
# the transformations, vectorised over N samples with per-sample strength t [N]
# --------------------------------------------------------------------------------------------------
def _crop_map(t: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Output -> input map of a crop keeping area 1 - t, in normalised coordinates ([N, 3, 3]).

    Window half-side s = sqrt(1 - t), centre c = u (1 - s): with a fixed anchor u the window edges
    ``c -+ s`` move monotonically inwards as t grows, so windows of a direction are nested.
    """
    s = torch.sqrt((1 - t).clamp_min(0))
    c = anchor * (1 - s)[:, None]
    m = torch.zeros(t.shape[0], 3, 3, dtype=t.dtype, device=t.device)
    m[:, 0, 0] = s
    m[:, 1, 1] = s
    m[:, :2, 2] = c
    m[:, 2, 2] = 1
    return m


_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


def _homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Batched homographies H with H src_k ~ dst_k for 4 point pairs ``[N, 4, 2]`` (DLT, h33 = 1)."""
    x, y = src.unbind(-1)
    u, v = dst.unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # [N, 8, 8]
    b = torch.cat([u, v], dim=1)  # [N, 8]
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=1).reshape(-1, 3, 3)


def _perspective_map(t: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Output -> input map of a perspective transform with distortion scale t ([N, 3, 3]).

    Corner k of the image (normalised, +-1) is moved inwards by ``t * f_k`` (per axis); the
    content at the image corners is shown at the moved corners (torchvision's convention).
    """
    corners = torch.tensor(_CORNERS, dtype=t.dtype, device=t.device).expand(t.shape[0], 4, 2)
    moved = corners - corners * fractions * t[:, None, None]
    return _homography(moved, corners)


def _rotation_map(t: torch.Tensor, sense: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Output -> input map of a rotation by ``t * ROTATION_MAX_DEG * sense`` degrees ([N, 3, 3]).

    The rotation is about the image centre in pixel units (so it stays a rotation on non-square
    images); positive angles turn the content counter-clockwise, as torchvision's ``rotate``.
    """
    angle = torch.deg2rad(t * ROTATION_MAX_DEG * sense)
    cos, sin = torch.cos(angle), torch.sin(angle)
    ax, ay = width / 2, height / 2  # pixel units per normalised unit
    m = torch.zeros(t.shape[0], 3, 3, dtype=t.dtype, device=t.device)
    m[:, 0, 0] = cos
    m[:, 0, 1] = -sin * ay / ax
    m[:, 1, 0] = sin * ax / ay
    m[:, 1, 1] = cos
    m[:, 2, 2] = 1
    return m


def _warp(
    images: torch.Tensor, t: torch.Tensor, direction: Mapping[str, torch.Tensor],
    fill: float | torch.Tensor,
) -> torch.Tensor:
    """Apply the composed geometric families with one bilinear ``grid_sample``."""
    n, _, h, w = images.shape
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    tt = t.to(work)
    m = torch.eye(3, dtype=work, device=images.device).expand(n, 3, 3)
    # sampling map = crop_map @ perspective_map @ rotation_map (image: crop, then persp., then rot.)
    if "crop" in direction:
        m = m @ _crop_map(tt, direction["crop"].to(work))
    if "perspective" in direction:
        # a 8x8 solve per view: float64 keeps it accurate at tiny strengths
        hom = _perspective_map(tt.double(), direction["perspective"].double()).to(work)
        m = m @ hom
    if "rotation" in direction:
        m = m @ _rotation_map(tt, direction["rotation"].to(work), h, w)
    xs = (torch.arange(w, dtype=work, device=images.device) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=work, device=images.device) * 2 + 1) / h - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(h * w, 3)
    q = torch.einsum("nij,pj->npi", m, base)
    grid = (q[..., :2] / q[..., 2:]).reshape(n, h, w, 2)
    out = F.grid_sample(
        images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    # coverage: 1 inside the image extent, linear ramp to 0 half a pixel outside it
    if not ("perspective" in direction or "rotation" in direction):
        return out  # a crop window never leaves the image
    pixels = torch.tensor([w, h], dtype=work, device=images.device)  # 2 / half a pixel
    inside = 1 - ((grid.abs() - 1) * pixels).clamp_(0, 1)  # [N, H, W, 2]
    cover = (inside[..., 0] * inside[..., 1]).unsqueeze(1).to(images.dtype)
    if not isinstance(fill, torch.Tensor) and fill == 0:
        return out.mul_(cover)
    return out.sub_(fill).mul_(cover).add_(fill)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``clamp(ratio * a + (1 - ratio) * b, 0, 1)`` with a per-sample ratio (torchvision's blend)."""
    r = ratio.reshape(-1, 1, 1, 1)
    return (a * r + b * (1 - r)).clamp_(0, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(1)


def _color(images: torch.Tensor, t: torch.Tensor, senses: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation with factors ``1 + COLOR_FACTOR * t * sense``."""
    factors = (1 + COLOR_FACTOR * t[:, None] * senses).to(images.dtype)  # [N, 3]
    out = _blend(images, torch.zeros_like(images), factors[:, 0])
    gray = _grayscale(out) if out.shape[1] == 3 else out
    out = _blend(out, gray.mean(dim=(1, 2, 3), keepdim=True), factors[:, 1])
    if out.shape[1] == 3:  # saturation of a grayscale image is the image itself
        out = _blend(out, _grayscale(out), factors[:, 2])
    return out


def _blur(images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, sigma ``t * BLUR_MAX_SIGMA * min(H, W) / 32`` px, reflect padding."""
    n, c, h, w = images.shape
    sigma = t.to(torch.float64) * BLUR_MAX_SIGMA * min(h, w) / _BLUR_REFERENCE_SIZE
    radius = min(int(math.ceil(3 * float(sigma.max()))), min(h, w) - 1)
    if radius <= 0:
        return images
    j = torch.arange(-radius, radius + 1, dtype=torch.float64, device=images.device)
    s = sigma.to(images.device)[:, None]
    kernel = torch.where(
        s > 0, torch.exp(-(j**2) / (2 * s.clamp_min(1e-12) ** 2)), (j == 0).to(torch.float64)
    )
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.dtype)  # [N, K]
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) group
    x = images.reshape(1, n * c, h, w)
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c
    )
    x = F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c
    )
    return x.reshape(n, c, h, w)


def _apply(
    images: torch.Tensor, t: torch.Tensor, direction: Mapping[str, torch.Tensor],
    fill: float | torch.Tensor,
) -> torch.Tensor:
    """Apply the families of ``direction`` to ``images [N, C, H, W]`` at strengths ``t [N]``."""
    out = images
    if any(f in direction for f in _GEOMETRIC) and bool((t > 0).any()):
        geo = {f: direction[f] for f in _GEOMETRIC if f in direction}
        out = _warp(out, t, geo, fill)
    if "color" in direction:
        out = _color(out, t, direction["color"])
    if "blur" in direction:
        out = _blur(out, t)
    # resampling and blurring may overshoot by rounding; never hand back the input itself
    out = out.clamp_(0, 1) if out is not images else images.clone()
    # strength 0 is the identity, exactly (bilinear resampling on the identity grid is not)
    keep = t == 0
    if bool(keep.any()):
        out = torch.where(keep.reshape(-1, 1, 1, 1), images, out)
    return out


def _check_fill(fill: float | str) -> None:
    if isinstance(fill, str):
        check_choice("fill", fill, VIEW_FILL_CHOICES)
    else:
        check_range("fill", fill, 0.0, 1.0)


def _fill_values(images: torch.Tensor, fill: float | str) -> float | torch.Tensor:
    """``fill`` as a number, or for ``"border"`` the mean of each image's outermost pixel ring
    per channel, ``[N, C, 1, 1]``."""
    if not isinstance(fill, str):
        return float(fill)
    h, w = images.shape[-2:]
    ring = torch.cat([images[..., 0, :], images[..., h - 1, :],
                      images[..., 1:h - 1, 0], images[..., 1:h - 1, w - 1]], dim=-1)
    return ring.mean(dim=-1)[..., None, None]


def _check_images(images: torch.Tensor, name: str, ndim: int) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != ndim:
        layout = "[B, C, H, W]" if ndim == 4 else "[C, H, W]"
        raise ValueError(f"{name} must have shape {layout}, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor in [0, 1], got {images.dtype} "
            "(convert uint8 images with images.float() / 255)"
        )
    channels = images.shape[-3]
    if channels not in (1, 3):
        raise ValueError(f"{name} must have 1 (grayscale) or 3 (RGB) channels, got {channels}")
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        if float(lo) < -_RANGE_TOLERANCE or float(hi) > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"{name} must be un-normalised, in [0, 1]; got values in [{float(lo):.3g}, "
                f"{float(hi):.3g}]. Make views before normalisation: the model normalises."
            )


def _on(direction: Mapping[str, torch.Tensor], device: torch.device) -> Direction:
    return {f: d.to(device, non_blocking=True) for f, d in direction.items()}


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------
def make_views(
    images: torch.Tensor,
    levels: int = SSR_LEVELS,
    families: str | Sequence[str] = SSR_FAMILIES,
    sigma: float = SSR_SIGMA,
    nested: bool = SSR_NESTED,
    generator: torch.Generator | int | None = None,
    schedule: Schedule | None = None,
    *,
    fill: float | str = VIEW_FILL,
) -> torch.Tensor:
    """Make ``levels`` views of increasing strength of every image, batched, on the images' device.

    View n (n = 1..N) applies every family in ``families`` at strength t_n (module docstring).
    With ``nested=True`` the directions are exactly those of
    ``sample_direction(families, batch_size=B, generator=generator)``, so
    ``apply_view(images[i], families, t_n, direction_i)`` reproduces view (i, n) (up to float
    rounding): a gallery or widget can show the training views.

    Parameters
    ----------
    images : torch.Tensor
        ``[B, C, H, W]`` float, **un-normalised** in [0, 1], C = 1 or 3, on any device.
    levels : int
        N, the number of views per image (default ``SSR_LEVELS`` = 4). The original (n = 0) is not
        among the returned views.
    families : str or sequence of str
        Default ``SSR_FAMILIES`` = ("crop", "perspective", "color"); also "rotation", "blur".
    sigma : float
        Rate of the default schedule ``t_n = tanh(sigma * n)`` (default ``SSR_SIGMA`` = 0.2).
    nested : bool
        True (default, ``SSR_NESTED``): one random direction per image, shared by its levels, so
        that a stronger view is the weaker one pushed further. False: a fresh direction per level.
    generator : torch.Generator or int, optional
        Source of randomness; directions are drawn on its device (a CPU generator works for CUDA
        images) and moved to the images. An int seeds a new CPU generator. ``None`` uses torch's
        global generator (not reproducible).
    schedule : callable or sequence, optional
        Replaces the default schedule: ``schedule(n) -> t_n`` for n = 1..levels, or the N strengths.
        Every t_n must lie in [0, 1].
    fill : float or "border"
        Value of pixels that a perspective or rotation brings in from outside the image: a number
        in [0, 1], or ``"border"`` (default, ``VIEW_FILL``): per image and channel, the mean of its
        outermost pixel ring.

    Returns
    -------
    torch.Tensor
        ``[B, levels, C, H, W]``, same dtype and device as ``images``, values in [0, 1].
    """
    _check_images(images, "images", 4)
    check_positive_int("levels", levels)
    families = _resolve_families(families)
    if not isinstance(nested, bool):
        raise TypeError(f"nested must be a bool, got {type(nested).__name__}")
    _check_fill(fill)
    strengths = _resolve_schedule(levels, sigma, schedule)
    generator = _resolve_generator(generator)
    b, c, h, w = images.shape
    drawn = _draw((b, 1 if nested else levels), generator)
    direction = {
        f: drawn[f].expand(b, levels, *drawn[f].shape[2:]).reshape(b * levels, *drawn[f].shape[2:])
        for f in families
    }
    direction = _on(direction, images.device)
    t = strengths.to(device=images.device, dtype=torch.float32).repeat(b)  # [B * levels]
    flat = images.unsqueeze(1).expand(b, levels, c, h, w).reshape(b * levels, c, h, w)
    fills = _fill_values(images, fill)
    if isinstance(fills, torch.Tensor):
        fills = fills.unsqueeze(1).expand(b, levels, c, 1, 1).reshape(b * levels, c, 1, 1)
    return _apply(flat, t, direction, fills).reshape(b, levels, c, h, w)


def apply_view(
    image: torch.Tensor,
    family: str | Sequence[str],
    strength: float,
    direction: Mapping[str, torch.Tensor] | None = None,
    *,
    generator: torch.Generator | int | None = None,
    fill: float | str = VIEW_FILL,
) -> torch.Tensor:
    """One view of one image at a continuous strength: the entry point for sliders.

    With a fixed ``direction`` the result moves continuously with ``strength``, and
    ``strength = 0`` returns the image itself (a copy, exactly equal).

    Parameters
    ----------
    image : torch.Tensor
        ``[C, H, W]`` float in [0, 1], C = 1 or 3.
    family : str or sequence of str
        One family or several (composed in the canonical order crop, perspective, rotation, color,
        blur).
    strength : float
        t in [0, 1].
    direction : dict, optional
        From :func:`sample_direction` (unbatched); must contain every requested family. ``None``
        draws one with ``generator``.
    generator : torch.Generator or int, optional
        Used only when ``direction`` is None.
    fill : float or "border"
        Value brought in from outside the image by perspective and rotation (default
        ``"border"``: the mean of the image's outermost pixel ring; see :func:`make_views`).

    Returns
    -------
    torch.Tensor
        ``[C, H, W]``, same dtype and device as ``image``.
    """
    _check_images(image, "image", 3)
    families = _resolve_families(family, "family")
    check_range("strength", strength, 0.0, 1.0)
    _check_fill(fill)
    if direction is None:
        direction = sample_direction(families, generator=generator)
    missing = [f for f in families if f not in direction]
    if missing:
        raise ValueError(
            f"direction has no entry for {', '.join(missing)}; draw it with "
            f"sample_direction({families!r})"
        )
    batched = {f: direction[f].unsqueeze(0) for f in families}
    t = torch.full((1,), float(strength), dtype=torch.float32, device=image.device)
    out = _apply(image.unsqueeze(0), t, _on(batched, image.device),
                 _fill_values(image.unsqueeze(0), fill))[0]
    return out
