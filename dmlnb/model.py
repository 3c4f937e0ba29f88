"""The SSR embedding model: one shared backbone, a metric head and an SSR head (Fu et al., AAAI 2021).

    h = pool(f(normalise(x)))                      backbone f, global pooling -> feature h
    z  = q(h) / ||q(h)||,    q = Linear(d_h, embed_dim)                          metric head
    z' = g(h) / ||g(h)||,    g = Linear(d_h, ssr_hidden) -> ReLU -> Linear(ssr_hidden, ssr_dim)
                                                                                 SSR head

Both heads read the same h from **one** backbone pass. The model owns input normalisation
(ImageNet mean/std buffers): datasets and :func:`dmlnb.transforms.make_views` hand it un-normalised
images in [0, 1], so originals and views get the same normalisation (PAPER.md, defect 1 of the
reproduction avoided by design).

Backbones: torchvision ResNet-18/34/50 (``weights`` API, ImageNet ``IMAGENET1K_V1``, the weights
the DML literature used) and ``"smallcnn"``, a 4-block CNN for 32 x 32 glyphs (~0.34 M parameters).

Defaults come from :mod:`dmlnb.defaults`: ``EMBED_DIM`` = 128 (paper), ``SSR_DIM`` = 128
(reproduction), ``SSR_HIDDEN`` = 512 (dmlnb decision), ``POOLING`` = "avg" (decision),
``FREEZE_BN`` = True (DML baselines, Roth et al. 2020).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dmlnb._validate import check_choice, check_keys, check_positive_int
from dmlnb.defaults import (
    EMBED_DIM,
    FREEZE_BN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    POOLING,
    SSR_DIM,
    SSR_HIDDEN,
)

__all__ = ["BACKBONES", "POOLINGS", "EmbeddingNet", "SmallCNN", "build_model"]

RESNETS = ("resnet18", "resnet34", "resnet50")
BACKBONES: tuple[str, ...] = (*RESNETS, "smallcnn")
POOLINGS = ("avg", "max")
# ImageNet weights the DML literature (Roth et al. 2020, the reproduction) used: torchvision's V1.
PRETRAINED_WEIGHTS = "IMAGENET1K_V1"
_AUTO = "auto"


# --------------------------------------------------------------------------------------------------
# backbones
# --------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """A small CNN for 32 x 32 glyphs: four blocks conv3x3 -> BatchNorm -> ReLU (-> max-pool 2).

    Widths 16, 32, 128, 256; the first three blocks halve the resolution (32 -> 16 -> 8 -> 4).
    About 0.34 M parameters; feature size 256 after global pooling. Works at any input size >= 8.
    The first block is kept narrow: at full resolution it dominates the cost (a 32-wide first
    block halves the training throughput for little gain).
    """

    widths = (16, 32, 128, 256)

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        blocks = []
        c_in = in_channels
        for i, c_out in enumerate(self.widths):
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            if i < len(self.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = self.widths[-1]

    def stages(self) -> list[nn.Module]:
        """The blocks, in order (what ``freeze_stages`` counts)."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map ``[B, 256, H/8, W/8]`` (not pooled)."""
        return self.blocks(x)


class _ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier; returns the last feature map."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
        )
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.feature_dim = resnet.fc.in_features

    def stages(self) -> list[nn.Module]:
        """Stage 1 = stem + layer1 (mmdetection's convention), then layer2, layer3, layer4."""
        stem = nn.ModuleList([self.conv1, self.bn1, self.layer1])
        return [stem, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _torchvision_resnet(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, name)
    if not pretrained:
        return builder(weights=None)
    weights = torchvision.models.get_weight(f"{_weights_enum(name)}.{PRETRAINED_WEIGHTS}")
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # offline: URLError, OSError, hash or HTTP errors
        raise RuntimeError(
            f"pretrained=True: could not download the ImageNet weights of {name} "
            f"({weights}, {weights.url}): {type(err).__name__}: {err}. This machine may be offline. "
            f"Pass pretrained=False to start from random weights, or weights_path=<file> to load a "
            f"local state dict (saved elsewhere with torch.save(torchvision.models.{name}("
            f"weights='{PRETRAINED_WEIGHTS}').state_dict(), file)), or put the file in torch's hub "
            f"cache ({os.path.join(torch.hub.get_dir(), 'checkpoints')})."
        ) from err
    model = builder(weights=None)
    model.load_state_dict(state)
    return model


def _weights_enum(name: str) -> str:
    return {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights"}.get(
        name, "ResNet50_Weights"
    )


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
class EmbeddingNet(nn.Module):
    """Shared backbone + metric head + SSR head; input normalisation inside.

    Parameters
    ----------
    backbone : {"resnet50", "resnet34", "resnet18", "smallcnn"}
        Default "resnet50" (the paper's).
    embed_dim : int
        Metric embedding size d (default ``EMBED_DIM`` = 128; 512 for the state-of-the-art table).
    ssr_dim : int
        SSR embedding size (default ``SSR_DIM`` = 128).
    ssr_hidden : int
        Hidden width of the SSR head's MLP (default ``SSR_HIDDEN`` = 512).
    pretrained : bool or None
        ImageNet weights (torchvision ``IMAGENET1K_V1``) for ResNets. ``None``/"auto" (default):
        True for ResNets, False for "smallcnn" (it has none; an explicit True raises). If the
        download fails, a RuntimeError says so and how to proceed: never a silent fall-back.
    pooling : {"avg", "max"}
        Global pooling of the last feature map (default ``POOLING`` = "avg").
    freeze_bn : bool or None
        Keep every BatchNorm in eval mode (running statistics frozen) while the model trains, and
        give its affine parameters no gradient. ``None``/"auto" (default): ``FREEZE_BN`` (True)
        for ResNets, False for "smallcnn" (it has no pretrained statistics to keep). Note: the DML
        baselines (Roth et al. 2020) freeze only the statistics; here the affine parameters too.
    in_channels : int
        Channels of the input images. ResNets take 1 or 3 (1-channel inputs are repeated to 3, at
        any value of this argument); "smallcnn" takes exactly ``in_channels`` (default 3).
    freeze_stages : int
        Freeze (no gradient, BatchNorm in eval mode) the first k stages of the backbone: ResNets
        have 4 (stem + layer1, layer2, layer3, layer4; k = 3 is the reproduction's frozen
        backbone, PAPER.md defect 2, for the ablation), "smallcnn" has 4 blocks. Default 0.
    weights_path : str or os.PathLike, optional
        A local state dict (``torch.load(..., weights_only=True)``): either a torchvision backbone
        state dict (its ``fc.*`` entries are ignored) or a whole :class:`EmbeddingNet` state dict
        (possibly under a ``"model"`` or ``"state_dict"`` key). Replaces the download; an explicit
        ``pretrained=True`` together with it raises.
    mean, std : tuple of float
        Input normalisation (default ImageNet, ``IMAGENET_MEAN``/``IMAGENET_STD``). A 1-channel
        "smallcnn" uses their channel averages.

    Notes
    -----
    ``forward(x)`` returns the metric embedding; ``forward(x, ssr=True)`` returns
    ``(metric, ssr)`` from one backbone pass.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        embed_dim: int = EMBED_DIM,
        ssr_dim: int = SSR_DIM,
        ssr_hidden: int = SSR_HIDDEN,
        pretrained: bool | str | None = None,
        pooling: str = POOLING,
        freeze_bn: bool | str | None = None,
        in_channels: int = 3,
        freeze_stages: int = 0,
        weights_path: str | os.PathLike | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        check_choice("backbone", backbone, BACKBONES)
        check_choice("pooling", pooling, POOLINGS)
        for name, value in (
            ("embed_dim", embed_dim),
            ("ssr_dim", ssr_dim),
            ("ssr_hidden", ssr_hidden),
        ):
            check_positive_int(name, value)
        check_positive_int("in_channels", in_channels)
        is_resnet = backbone in RESNETS
        if is_resnet and in_channels not in (1, 3):
            raise ValueError(
                f"in_channels={in_channels} is not valid for {backbone}; choose 1 or 3"
            )
        pretrained = _auto("pretrained", pretrained, is_resnet and weights_path is None)
        if pretrained and not is_resnet:
            raise ValueError(
                f"pretrained=True is not valid for backbone={backbone!r}: it has no pretrained "
                f"weights; pass pretrained=False (or weights_path=...), or choose one of {RESNETS}"
            )
        if pretrained and weights_path is not None:
            raise ValueError("pass either pretrained=True or weights_path=..., not both")
        self.freeze_bn = _auto("freeze_bn", freeze_bn, FREEZE_BN if is_resnet else False)
        self.backbone_name = backbone
        self.pooling = pooling
        self.in_channels = in_channels

        if is_resnet:
            self.backbone: nn.Module = _ResNetTrunk(_torchvision_resnet(backbone, pretrained))
        else:
            self.backbone = SmallCNN(in_channels)
        n_stages = len(self.backbone.stages())
        check_positive_int("freeze_stages", freeze_stages, minimum=0)
        if freeze_stages > n_stages:
            raise ValueError(
                f"freeze_stages={freeze_stages} is out of range; {backbone} has {n_stages} stages "
                f"(0 .. {n_stages})"
            )
        self.freeze_stages = freeze_stages
        self.feature_dim: int = self.backbone.feature_dim
        self.metric_head = nn.Linear(self.feature_dim, embed_dim)
        self.ssr_head = nn.Sequential(
            nn.Linear(self.feature_dim, ssr_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(ssr_hidden, ssr_dim),
        )

        norm_channels = 3 if is_resnet else in_channels
        self.register_buffer("mean", _stats("mean", mean, norm_channels), persistent=False)
        self.register_buffer("std", _stats("std", std, norm_channels), persistent=False)

        if weights_path is not None:
            self.load_weights(weights_path)
        self._apply_freezing()
        self.train()

    # ---- freezing -------------------------------------------------------------------------------
    def _frozen_modules(self) -> Iterator[nn.Module]:
        yield from self.backbone.stages()[: self.freeze_stages]

    def _apply_freezing(self) -> None:
        for module in self._frozen_modules():
            module.requires_grad_(False)
        if self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)

    def train(self, mode: bool = True) -> EmbeddingNet:
        """Set train/eval mode; frozen BatchNorm layers and frozen stages stay in eval mode."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.freeze_bn:
                for module in self.backbone.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters (frozen ones left out), for the backbone's learning rate."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the metric head and the SSR head (10x learning rate by default)."""
        return [*self.metric_head.parameters(), *self.ssr_head.parameters()]

    # ---- forward --------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat 1-channel inputs for ResNets, then ``(x - mean) / std``."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
        channels = x.shape[1]
        if self.backbone_name in RESNETS:
            if channels == 1:
                x = x.expand(-1, 3, -1, -1)
            elif channels != 3:
                raise ValueError(
                    f"{self.backbone_name} takes 1 or 3 input channels, got {channels}"
                )
        elif channels != self.in_channels:
            raise ValueError(
                f"smallcnn was built with in_channels={self.in_channels}, got {channels} channels"
            )
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features h ``[B, feature_dim]``: normalise, backbone, global pooling."""
        fmap = self.backbone(self.normalize(x))
        if self.pooling == "max":
            return torch.amax(fmap, dim=(2, 3))
        return torch.mean(fmap, dim=(2, 3))

    def forward(
        self, x: torch.Tensor, ssr: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Metric embedding ``[B, embed_dim]`` (L2-normalised); with ``ssr=True`` also the SSR
        embedding ``[B, ssr_dim]`` (L2-normalised), from the same backbone pass.

        ``x``: un-normalised images ``[B, C, H, W]`` in [0, 1].
        """
        h = self.features(x)
        metric = F.normalize(self.metric_head(h), dim=1)
        if not ssr:
            return metric
        return metric, F.normalize(self.ssr_head(h), dim=1)

    # ---- weights --------------------------------------------------------------------------------
    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a local state dict (see ``weights_path``), with ``weights_only=True``."""
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
                state = state[key]
        if not isinstance(state, Mapping):
            raise ValueError(f"weights_path={os.fspath(path)!r} does not hold a state dict")
        own_prefixes = ("backbone.", "metric_head.", "ssr_head.")
        if any(k.startswith(own_prefixes) for k in state):
            self.load_state_dict(state)
            return
        backbone_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        result = self.backbone.load_state_dict(backbone_state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"weights_path={os.fspath(path)!r} does not match backbone {self.backbone_name}: "
                f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            )


def _auto(name: str, value: Any, auto_value: bool) -> bool:
    if value is None or value == _AUTO:
        return bool(auto_value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False, None or 'auto', got {value!r}")
    return value


def _stats(name: str, values: tuple[float, ...], channels: int) -> torch.Tensor:
    v = torch.as_tensor(values, dtype=torch.float32).flatten()
    if v.numel() == 3 and channels == 1:
        v = v.mean().reshape(1)
    if v.numel() == 1:
        v = v.expand(channels)
    if v.numel() != channels:
        raise ValueError(f"{name} has {v.numel()} values; the backbone takes {channels} channels")
    if name == "std" and bool((v <= 0).any()):
        raise ValueError(f"std={tuple(values)} must be positive")
    return v.reshape(1, channels, 1, 1).clone()


_MODEL_KEYS = (
    "backbone",
    "embed_dim",
    "ssr_dim",
    "ssr_hidden",
    "pretrained",
    "pooling",
    "freeze_bn",
    "in_channels",
    "freeze_stages",
    "weights_path",
    "mean",
    "std",
)


def build_model(config: Mapping[str, Any] | Any = None, /, **overrides: Any) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet` from a mapping or dataclass of its arguments, plus overrides.

    Unknown keys raise a ValueError that lists the valid ones.
    """
    if config is None:
        options: dict[str, Any] = {}
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        options = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        options = dict(config)
    else:
        raise TypeError(f"config must be a mapping or a dataclass, got {type(config).__name__}")
    options.update(overrides)
    check_keys(options, _MODEL_KEYS, "model options")
    return EmbeddingNet(**options)
