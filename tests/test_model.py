"""Tests of dmlnb.model: the shared backbone, the metric head and the SSR head."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from dmlnb.defaults import EMBED_DIM, IMAGENET_MEAN, IMAGENET_STD, SSR_DIM
from dmlnb.model import EmbeddingNet, SmallCNN


def images(b: int = 4, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def resnet18() -> EmbeddingNet:
    return EmbeddingNet("resnet18", pretrained=False, embed_dim=16, ssr_dim=8, ssr_hidden=32)


# ---- shapes and norms ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backbone", "channels", "feature_dim"),
    [
        ("smallcnn", 1, 256),
        ("smallcnn", 3, 256),
        ("resnet18", 3, 512),
        ("efficientnet_lite0", 1, 1280),
        pytest.param("resnet50", 1, 2048, marks=pytest.mark.slow),
    ],
)
def test_shapes_and_unit_norms(backbone, channels, feature_dim):
    model = EmbeddingNet(backbone, pretrained=False, in_channels=channels).eval()
    x = images(3, channels)
    with torch.no_grad():
        metric = model(x)
        metric2, ssr = model(x, ssr=True)
        h = model.features(x)
    assert metric.shape == (3, EMBED_DIM) and ssr.shape == (3, SSR_DIM)
    assert h.shape == (3, feature_dim) and model.feature_dim == feature_dim
    assert metric.dtype == torch.float32
    torch.testing.assert_close(metric.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(ssr.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(metric, metric2)


def test_heads_are_the_papers(resnet18):
    """metric = Linear + L2; SSR = Linear -> ReLU -> Linear + L2, on the same pooled features."""
    model = resnet18.eval()
    x = images(2)
    with torch.no_grad():
        h = model.features(x)
        metric, ssr = model(x, ssr=True)
        lin, relu, lin2 = model.ssr_head
        expected_ssr = F.normalize(lin2(torch.relu(lin(h))), dim=1)
        expected_metric = F.normalize(model.metric_head(h), dim=1)
    assert isinstance(relu, nn.ReLU) and lin.out_features == 32 and lin2.out_features == 8
    torch.testing.assert_close(metric, expected_metric)
    torch.testing.assert_close(ssr, expected_ssr)


def test_one_backbone_pass_for_both_heads(resnet18):
    calls = []
    handle = resnet18.backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        resnet18(images(2), ssr=True)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_model_owns_normalisation(resnet18):
    model = resnet18.eval()
    x = images(2)
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        manual = model.backbone((x - mean) / std).mean(dim=(2, 3))
        torch.testing.assert_close(model.features(x), manual)
        gray = x[:, :1]
        torch.testing.assert_close(model(gray), model(gray.expand(-1, 3, -1, -1)))


def test_max_pooling():
    model = EmbeddingNet("smallcnn", pretrained=False, in_channels=1, pooling="max").eval()
    x = images(2, 1)
    with torch.no_grad():
        fmap = model.backbone(model.normalize(x))
        h = model.features(x)
    torch.testing.assert_close(h, fmap.flatten(2).max(dim=2).values)
    assert not torch.allclose(h, fmap.mean(dim=(2, 3)))


# ---- frozen BatchNorm and frozen stages ----------------------------------------------------------
def test_frozen_bn_stays_frozen():
    model = EmbeddingNet("resnet18", pretrained=False)  # freeze_bn auto -> True for ResNets
    assert model.freeze_bn is True
    model.train()
    assert model.training
    assert all(not bn.training for bn in bn_layers(model))
    before = [bn.running_mean.clone() for bn in bn_layers(model)]
    metric, ssr = model(images(4), ssr=True)
    (metric.sum() + ssr.sum()).backward()
    after = [bn.running_mean for bn in bn_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(bn.weight.grad is None and bn.bias.grad is None for bn in bn_layers(model))
    assert model.backbone.conv1.weight.grad is not None
    bn_params = {id(p) for bn in bn_layers(model) for p in bn.parameters()}
    assert not bn_params & {id(p) for p in model.backbone_parameters()}
    model.eval().train()
    assert all(not bn.training for bn in bn_layers(model))


def test_smallcnn_bn_trains_by_default():
    model = EmbeddingNet("smallcnn", in_channels=1)  # pretrained and freeze_bn auto -> False
    assert model.freeze_bn is False
    bn = bn_layers(model)[0]
    before = bn.running_mean.clone()
    model(images(4, 1)).sum().backward()
    assert bn.training and not torch.equal(bn.running_mean, before)
    assert bn.weight.grad is not None


def test_freeze_stages():
    model = EmbeddingNet("resnet18", pretrained=False, freeze_bn=False, freeze_stages=2)
    frozen = [
        model.backbone.conv1,
        model.backbone.bn1,
        model.backbone.layer1,
        model.backbone.layer2,
    ]
    model.train()
    metric, ssr = model(images(2), ssr=True)
    (metric.sum() + ssr.sum()).backward()
    for module in frozen:
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(not bn.training for module in frozen for bn in bn_layers(module))
    assert all(bn.training for bn in bn_layers(model.backbone.layer3))
    assert all(p.grad is not None for p in model.backbone.layer3.parameters())
    frozen_ids = {id(p) for module in frozen for p in module.parameters()}
    trainable = {id(p) for p in model.backbone_parameters()}
    assert not frozen_ids & trainable
    everything = {id(p) for p in model.parameters() if p.requires_grad}
    heads = {id(p) for p in model.head_parameters()}
    assert trainable | heads == everything and not trainable & heads
    with pytest.raises(ValueError, match="freeze_stages=5.*4 stages"):
        EmbeddingNet("resnet18", pretrained=False, freeze_stages=5)


def test_both_heads_train_the_backbone():
    model = EmbeddingNet("smallcnn", in_channels=1)
    _, ssr = model(images(4, 1), ssr=True)
    ssr.sum().backward()
    assert all(p.grad is not None for p in model.backbone_parameters())
    assert all(p.grad is None for p in model.metric_head.parameters())


# ---- weights -------------------------------------------------------------------------------------
def test_offline_pretrained_raises_clear_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    old_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # an empty cache: the weights must be downloaded
    try:
        with pytest.raises(RuntimeError, match="could not download.*pretrained=False") as info:
            EmbeddingNet("resnet18")  # pretrained auto -> True for ResNets
        assert "weights_path" in str(info.value)
        assert str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in str(info.value)
        with pytest.raises(RuntimeError, match="could not download"):
            EmbeddingNet("resnet18", pretrained=True)
    finally:
        torch.hub.set_dir(old_dir)


def test_weights_path_loads_a_torchvision_state_dict(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        reference.conv1.weight.fill_(0.123)  # not what a fresh init would give
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = EmbeddingNet("resnet18", weights_path=path)
    for name, value in reference.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(model.backbone.state_dict()[name], value), name
    with pytest.raises(ValueError, match="does not match backbone resnet34"):
        EmbeddingNet("resnet34", weights_path=path)
    with pytest.raises(ValueError, match="not both"):
        EmbeddingNet("resnet18", pretrained=True, weights_path=path)


def test_weights_path_loads_a_whole_model(tmp_path):
    source = EmbeddingNet("smallcnn", in_channels=1).eval()
    path = tmp_path / "model.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    loaded = EmbeddingNet("smallcnn", in_channels=1, weights_path=path).eval()
    x = images(3, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, ssr=True), source(x, ssr=True), rtol=0, atol=0)


# ---- options and validation ----------------------------------------------------------------------
def test_smallcnn_is_small():
    n = sum(p.numel() for p in SmallCNN(1).parameters())
    assert 100_000 < n < 1_000_000


def test_bad_options_name_the_parameter():
    with pytest.raises(ValueError, match="backbone='vgg16'.*'resnet50'.*'smallcnn'"):
        EmbeddingNet("vgg16")
    with pytest.raises(ValueError, match="pooling='sum'.*'avg', 'max'"):
        EmbeddingNet("smallcnn", pooling="sum")
    with pytest.raises(ValueError, match="pretrained=True is not valid.*smallcnn.*efficientnet_lite0"):
        EmbeddingNet("smallcnn", pretrained=True)
    with pytest.raises(ValueError, match="in_channels=2"):
        EmbeddingNet("resnet18", pretrained=False, in_channels=2)
    with pytest.raises(TypeError, match="freeze_bn"):
        EmbeddingNet("smallcnn", freeze_bn="yes")
    with pytest.raises(ValueError, match="embed_dim"):
        EmbeddingNet("smallcnn", embed_dim=0)
    with pytest.raises(ValueError, match="in_channels=1, got 3"):
        EmbeddingNet("smallcnn", in_channels=1)(images(2, 3))


