"""Downloads against local archives only: checksum, resume/restart, safe extraction, manual-copy message."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.request

import pytest
from cub_tree import cub_tree  # tests/cub_tree.py

from dmlnb.data import download as dl
from dmlnb.data import load_dataset
from dmlnb.data.cli import main as cli_main
from dmlnb.data.download import (
    ChecksumError,
    ManualDownloadRequired,
    UnsafeArchiveError,
    download,
    fetch,
    safe_extract,
)


def _make_archive(tmp_path):
    src = tmp_path / "src"
    cub_tree(src, attributes=True)
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "CUB_200_2011", arcname="CUB_200_2011")
        tar.add(src / "attributes.txt", arcname="attributes.txt")
    data = archive.read_bytes()
    return archive, hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


def test_good_archive_is_downloaded_checked_and_extracted(tmp_path):
    archive, md5, sha = _make_archive(tmp_path)
    root = tmp_path / "data"
    out = download("cub200", root, url=archive.as_uri(), md5=md5, sha256=sha, progress=False)
    assert out == root and (root / "CUB_200_2011" / "images.txt").is_file()
    assert not (root / "CUB_200_2011.tgz.part").exists()
    ds = load_dataset("cub200", "test", root, image_size=8)
    assert len(ds) == 2 and ds[0][0].shape == (3, 8, 8)


def test_already_present_is_not_fetched_again(tmp_path, monkeypatch):
    archive, md5, _ = _make_archive(tmp_path)
    root = tmp_path / "data"
    download("cub200", root, url=archive.as_uri(), md5=md5, progress=False, keep_archive=False)
    assert not (root / "CUB_200_2011.tgz").exists()
    monkeypatch.setattr(dl, "_urlopen", lambda request: pytest.fail("fetched again"))
    assert download("cub200", root, md5=md5, progress=False) == root
    # an interrupted extraction (an image missing) is not mistaken for a complete copy
    next((root / "CUB_200_2011" / "images" / "101.White_Pelican").iterdir()).unlink()
    monkeypatch.setattr(dl, "_urlopen", lambda request: urllib.request.urlopen(request))
    download("cub200", root, url=archive.as_uri(), md5=md5, progress=False)
    assert len(load_dataset("cub200", "test", root)) == 2


def test_tampered_archive_is_refused_and_nothing_extracted(tmp_path):
    archive, md5, _ = _make_archive(tmp_path)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match=f"md5 .* expected {md5}"):
        download("cub200", root, url=archive.as_uri(), md5=md5, progress=False)
    assert not (root / "CUB_200_2011").exists()
    assert not (root / "CUB_200_2011.tgz").exists()  # deleted, so a rerun downloads afresh
    with pytest.raises(ChecksumError, match="sha256"):
        download("cub200", root, url=archive.as_uri(), sha256="0" * 64, progress=False)


def test_published_md5_is_the_default(tmp_path):
    archive, _, _ = _make_archive(tmp_path)
    assert dl.ARCHIVES["cub200"].md5 == "97eceeb196236b17998738112f37df78"
    assert "data.caltech.edu/records/65de6-vp158" in dl.ARCHIVES["cub200"].url
    with pytest.raises(ChecksumError, match="97eceeb196236b17998738112f37df78"):
        download("cub200", tmp_path / "data", url=archive.as_uri(), progress=False)


def _tar_with(tmp_path, member: tarfile.TarInfo, payload: bytes = b"evil") -> str:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("CUB_200_2011/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if member.isfile():
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        else:
            tar.addfile(member)
    return str(path)


@pytest.mark.parametrize(
    "name,kind,link",
    [
        ("../escape.txt", tarfile.REGTYPE, ""),
        ("CUB_200_2011/../../escape.txt", tarfile.REGTYPE, ""),
        ("/tmp/dmlnb_abs_escape.txt", tarfile.REGTYPE, ""),
        ("CUB_200_2011/link", tarfile.SYMTYPE, "/etc/passwd"),
        ("CUB_200_2011/hard", tarfile.LNKTYPE, "CUB_200_2011/ok.txt"),
        ("CUB_200_2011/dev", tarfile.CHRTYPE, ""),
        ("CUB_200_2011/fifo", tarfile.FIFOTYPE, ""),
    ],
)
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, name, kind, link):
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = link
    archive = _tar_with(tmp_path, member)
    root = tmp_path / "root"
    with pytest.raises(UnsafeArchiveError, match="nothing was extracted"):
        safe_extract(archive, root)
    assert not (root / "CUB_200_2011").exists()
    assert not (tmp_path / "escape.txt").exists() and not os.path.exists("/tmp/dmlnb_abs_escape.txt")


def test_download_refuses_an_archive_with_a_dotdot_member(tmp_path):
    member = tarfile.TarInfo("../outside.txt")
    member.type = tarfile.REGTYPE
    archive = _tar_with(tmp_path, member)
    md5 = hashlib.md5(open(archive, "rb").read()).hexdigest()
    root = tmp_path / "data"
    with pytest.raises(UnsafeArchiveError, match="outside.txt"):
        download("cub200", root, url=f"file://{archive}", md5=md5, progress=False)
    assert not (tmp_path / "outside.txt").exists() and not (root / "CUB_200_2011").exists()


class _FakeResponse:
    def __init__(self, body: bytes, status: int, headers: dict):
        self._body, self.status, self.headers = io.BytesIO(body), status, headers

    def read(self, n=-1):
        return self._body.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _server(data: bytes, *, ranges: bool, requests: list, cut: int | None = None):
    def urlopen(request):
        requests.append(request.get_header("Range"))
        rng = request.get_header("Range")
        if ranges and rng:
            start = int(rng.split("=")[1].rstrip("-"))
            body = data[start:]
            headers = {"Content-Length": str(len(body)),
                       "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            return _FakeResponse(body, 206, headers)
        body = data if cut is None else data[:cut]
        return _FakeResponse(body, 200, {"Content-Length": str(len(data))})

    return urlopen


def test_partial_download_resumes_with_a_range_request(tmp_path, monkeypatch):
    data = os.urandom(3 * (1 << 20) + 123)
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(data[:1_000_000])
    requests = []
    monkeypatch.setattr(dl, "_urlopen", _server(data, ranges=True, requests=requests))
    fetch("https://example.invalid/a.bin", dest, progress=False)
    assert requests == ["bytes=1000000-"] and dest.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()


def test_server_without_range_support_restarts(tmp_path, monkeypatch):
    data = os.urandom(50_000)
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes from another file")
    monkeypatch.setattr(dl, "_urlopen", _server(data, ranges=False, requests=[]))
    fetch("https://example.invalid/a.bin", dest, progress=False)
    assert dest.read_bytes() == data


def test_interrupted_transfer_keeps_the_part_file_for_a_rerun(tmp_path, monkeypatch):
    data = os.urandom(80_000)
    dest = tmp_path / "a.bin"
    monkeypatch.setattr(dl, "_urlopen", _server(data, ranges=True, requests=[], cut=30_000))
    with pytest.raises(OSError, match="run again to resume"):
        fetch("https://example.invalid/a.bin", dest, progress=False)
    assert (tmp_path / "a.bin.part").stat().st_size == 30_000 and not dest.exists()
    requests = []
    monkeypatch.setattr(dl, "_urlopen", _server(data, ranges=True, requests=requests))
    fetch("https://example.invalid/a.bin", dest, progress=False)
    assert requests == ["bytes=30000-"] and dest.read_bytes() == data


@pytest.mark.parametrize("name,words", [("cars196", ["cars_annos.mat", "car_ims", "{train,test}"]),
                                        ("sop", ["Ebay_train.txt", "Stanford_Online_Products"])])
def test_manual_datasets_say_where_to_put_a_copy(tmp_path, capsys, name, words):
    with pytest.raises(ManualDownloadRequired) as info:
        download(name, tmp_path)
    assert all(w in str(info.value) for w in words)
    assert cli_main(["data", "download", name, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words)


def test_cli_download_with_a_local_archive(tmp_path, capsys):
    archive, md5, _ = _make_archive(tmp_path)
    root = tmp_path / "data"
    code = cli_main(["data", "download", "cub200", "--root", str(root), "--url", archive.as_uri(),
                     "--md5", md5, "--quiet"])
    assert code == 0 and "ready" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["data", "download", "imagenet", "--root", str(root)])
