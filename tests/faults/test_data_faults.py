"""Reliability faults of dmlnb.data, each pinned by a test that failed before its fix.

- ``test_user_archive_with_a_wrong_checksum_is_kept_and_reported``: an archive the user put in
  ``root`` that fails the checksum is never deleted; the error names the file, the expected and
  the actual MD5 and what to do.
- ``test_own_download_with_a_wrong_checksum_is_still_removed``: the package's own fresh download
  that fails the check is still removed (so a rerun downloads afresh); guards the boundary above.
- ``test_zip_archive_is_extracted`` / ``test_download_accepts_a_zip_served_under_the_tgz_name``:
  zip archives are extracted (recognised by content, not name) instead of failing with
  tarfile's raw ``ReadError``.
- ``test_unsafe_zip_members_are_refused_before_anything_is_written``: zip gets the same member
  checks as tar (``..``, absolute paths, backslashes, links, devices).
- ``test_neither_tar_nor_zip_is_refused_with_the_supported_formats``: any other file gets a
  clear message naming it and the supported formats.
- ``test_offline_download_is_one_line_without_traceback`` (in-process, through the ``dmlnb``
  entry point) and ``test_refused_connection_is_one_line_without_traceback`` (a real refused
  connection): a clear one-line error, non-zero exit status, no exception escaping to print a
  traceback.
- ``test_network_failure_mid_transfer_keeps_the_part_file``: the library error says what to do
  and the partial file stays for a resumed rerun.
- ``test_folder_dataset_is_not_told_to_download``: the "needs root=" message no longer suggests
  ``dmlnb data download folder`` (a command that does not exist).
- ``test_exif_orientation_is_applied``: a JPEG with an EXIF Orientation tag is read upright.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import tarfile
import urllib.error
import zipfile

import numpy as np
import pytest
from cub_tree import cub_tree  # tests/cub_tree.py
from PIL import Image

from dmlnb.data import download as dl
from dmlnb.data import load_dataset
from dmlnb.data.download import ChecksumError, UnsafeArchiveError, download, safe_extract
from dmlnb.data.images import read_image

PUBLISHED_MD5 = "97eceeb196236b17998738112f37df78"


def _no_network(request):
    pytest.fail(f"unexpected download of {request.full_url}")


# --- 1. a user's archive is never deleted -----------------------------------------------------------
def test_user_archive_with_a_wrong_checksum_is_kept_and_reported(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    mine = root / "CUB_200_2011.tgz"
    content = b"the user's own file, not the published archive"
    mine.write_bytes(content)
    actual = hashlib.md5(content).hexdigest()
    monkeypatch.setattr(dl, "_urlopen", _no_network)
    with pytest.raises(ChecksumError) as info:
        download("cub200", root, progress=False)
    assert mine.read_bytes() == content  # still there, untouched
    msg = str(info.value)
    assert str(mine) in msg and PUBLISHED_MD5 in msg and actual in msg
    assert "Move or delete it" in msg and "--md5" in msg
    assert not (root / "CUB_200_2011").exists()  # nothing extracted


def test_own_download_with_a_wrong_checksum_is_still_removed(tmp_path):
    src = tmp_path / "CUB_200_2011.tgz"
    src.write_bytes(b"not the archive")
    root = tmp_path / "data"
    with pytest.raises(ChecksumError):
        download("cub200", root, url=src.as_uri(), progress=False)
    assert not (root / "CUB_200_2011.tgz").exists() and src.exists()


# --- 2. zip archives ----------------------------------------------------------------------------------
def _zip_of_cub(tmp_path, name="cub.zip"):
    src = cub_tree(tmp_path / "src")
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(src.rglob("*")):
            z.write(f, f.relative_to(src.parent).as_posix())
    return path


def test_zip_archive_is_extracted(tmp_path):
    archive = _zip_of_cub(tmp_path)
    root = tmp_path / "root"
    safe_extract(archive, root)
    assert (root / "CUB_200_2011" / "images.txt").is_file()
    assert len(list((root / "CUB_200_2011" / "images").rglob("*.jpg"))) == 4


def test_download_accepts_a_zip_served_under_the_tgz_name(tmp_path):
    archive = _zip_of_cub(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "data"
    download("cub200", root, url=archive.as_uri(), md5=md5, progress=False)
    assert len(load_dataset("cub200", "test", root, image_size=8)) == 2


def _zip_with(tmp_path, name: str, mode: int | None = None, payload: bytes = b"evil"):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("CUB_200_2011/ok.txt", b"ok")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system = 3  # Unix, so that the mode bits count
            info.external_attr = mode << 16
        z.writestr(info, payload)
    return path


@pytest.mark.parametrize(
    "name,mode,words",
    [
        ("../escape.txt", None, "'..'"),
        ("CUB_200_2011/../../escape.txt", None, "'..'"),
        ("/tmp/dmlnb_zip_abs_escape.txt", None, "absolute"),
        ("C:/escape.txt", None, "absolute"),
        ("CUB_200_2011\\..\\..\\escape.txt", None, "backslash"),
        ("CUB_200_2011/link", stat.S_IFLNK | 0o777, "link"),
        ("CUB_200_2011/dev", stat.S_IFCHR | 0o644, "device"),
        ("CUB_200_2011/fifo", stat.S_IFIFO | 0o644, "FIFO"),
    ],
)
def test_unsafe_zip_members_are_refused_before_anything_is_written(tmp_path, name, mode, words):
    archive = _zip_with(tmp_path, name, mode, payload=b"/etc/passwd")
    root = tmp_path / "root"
    with pytest.raises(UnsafeArchiveError, match="nothing was extracted") as info:
        safe_extract(archive, root)
    assert words in str(info.value) and str(archive) in str(info.value)
    assert not (root / "CUB_200_2011").exists()
    assert not (tmp_path / "escape.txt").exists()
    assert not os.path.exists("/tmp/dmlnb_zip_abs_escape.txt")


def test_neither_tar_nor_zip_is_refused_with_the_supported_formats(tmp_path):
    junk = tmp_path / "archive.7z"
    junk.write_bytes(b"7z\xbc\xaf\x27\x1c" + os.urandom(200))
    with pytest.raises(ValueError) as info:
        safe_extract(junk, tmp_path / "root")
    assert type(info.value).__name__ == "UnsupportedArchiveError"
    msg = str(info.value)
    assert str(junk) in msg and "zip" in msg and ".tar.gz" in msg
    assert not isinstance(info.value, tarfile.ReadError)
    # a damaged archive of a supported format gets a clear message too
    cut = tmp_path / "cut.zip"
    cut.write_bytes(_zip_of_cub(tmp_path).read_bytes()[:-30])  # end of central directory lost
    with pytest.raises(ValueError, match=f"cannot extract {cut}"):
        safe_extract(cut, tmp_path / "root")


# --- 3. offline: one line, no traceback ---------------------------------------------------------------
def _offline(request):
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def test_offline_download_is_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    from dmlnb.cli import main

    monkeypatch.setattr(dl, "_urlopen", _offline)
    code = main(["data", "download", "cub200", "--root", str(tmp_path / "data"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cannot download" in err and "name resolution" in err and "network" in err
    assert str(tmp_path / "data" / "CUB_200_2011.tgz") in err  # where a manual copy goes


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_is_one_line_without_traceback(tmp_path, capsys):
    from dmlnb.cli import main

    url = f"http://127.0.0.1:{_closed_port()}/CUB_200_2011.tgz"  # a real socket error, no mock
    code = main(["data", "download", "cub200", "--root", str(tmp_path / "data"), "--url", url,
                 "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and url in err


def test_network_failure_mid_transfer_keeps_the_part_file(tmp_path, monkeypatch):
    class Dropped:
        status, headers = 200, {"Content-Length": "100"}

        def __init__(self):
            self.sent = False

        def read(self, n=-1):
            if self.sent:
                raise ConnectionResetError(104, "Connection reset by peer")
            self.sent = True
            return b"x" * 40

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(dl, "_urlopen", lambda request: Dropped())
    dest = tmp_path / "a.bin"
    with pytest.raises(OSError) as info:
        dl.fetch("https://example.invalid/a.bin", dest, progress=False)
    assert type(info.value).__name__ == "DownloadError"
    assert "reset by peer" in str(info.value) and "resumes" in str(info.value)
    assert (tmp_path / "a.bin.part").stat().st_size == 40 and not dest.exists()


def test_folder_dataset_is_not_told_to_download():
    with pytest.raises(ValueError, match="needs root=") as info:
        load_dataset("folder", "train")
    msg = str(info.value)
    assert "data download" not in msg and "sub-folder per class" in msg
    with pytest.raises(ValueError, match="dmlnb data download cub200"):
        load_dataset("cub200", "test")


# --- 4. EXIF orientation ----------------------------------------------------------------------------
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _sideways_jpeg(path, orientation: int):
    """A 40 x 20 JPEG, left half red, right half blue, with an EXIF Orientation tag."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = RED
    pixels[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as check:  # the tag is really in the file
        assert check.getexif().get(0x0112) == orientation and check.size == (40, 20)


def _colour(img, x, y):
    r, g, b = img.getpixel((x, y))
    return "red" if r > 200 and b < 60 else "blue" if b > 200 and r < 60 else "other"


def test_exif_orientation_is_applied(tmp_path):
    _sideways_jpeg(tmp_path / "six.jpg", 6)  # 6: rotate 90 degrees clockwise to view
    img = read_image(tmp_path / "six.jpg")
    assert img.size == (20, 40) and img.mode == "RGB"
    assert _colour(img, 10, 5) == "red" and _colour(img, 10, 34) == "blue"  # left became top
    _sideways_jpeg(tmp_path / "three.jpg", 3)  # 3: rotate 180 degrees
    img = read_image(tmp_path / "three.jpg")
    assert img.size == (40, 20)
    assert _colour(img, 5, 10) == "blue" and _colour(img, 34, 10) == "red"
    _sideways_jpeg(tmp_path / "one.jpg", 1)  # 1: upright already, unchanged
    img = read_image(tmp_path / "one.jpg")
    assert img.size == (40, 20) and _colour(img, 5, 10) == "red"

