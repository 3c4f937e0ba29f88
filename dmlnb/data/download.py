"""Download and safely extract the benchmarks that have a stable public archive (CUB-200-2011).

``download("cub200", root)`` fetches the official archive, shows a progress bar, checks its MD5
(and SHA-256 when given), and extracts it into ``root`` so that ``root/CUB_200_2011/`` exists.

- **Restartable, resumable.** Bytes go to ``<archive>.part``. A later call continues from the
  partial file with an HTTP ``Range`` request; when the server answers with the whole file
  (status 200, no ``Content-Range`` at the right offset) the download restarts from zero.
- **Checked.** A checksum mismatch deletes the downloaded file and raises
  :class:`ChecksumError`; nothing is extracted.
- **Safe extraction.** Every member is checked *before* anything is written: no absolute path, no
  ``..`` component, no path resolving outside ``root``, no symbolic or hard link, no device, FIFO
  or other special file. Then Python's ``tarfile`` ``"data"`` filter (3.11.4+, 3.12) extracts with
  the same rules enforced a second time (and strips set-uid bits and owners).

Cars196 and SOP have no stable public link: :func:`download` raises :class:`ManualDownloadRequired`
with where to put a copy and which layout is expected.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dmlnb._validate import check_choice
from dmlnb.data.benchmarks import HOW_TO_GET, check_files_exist, read_cub200_index


@dataclass(frozen=True)
class Archive:
    """A downloadable archive: where it is, its file name, its published checksums."""

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None


#: The official CUB-200-2011 archive (Caltech DATA record 65de6-vp158, 1.15 GB). The MD5 is the
#: checksum published with the archive and used by torchvision-era loaders and
#: pytorch-metric-learning (``97eceeb196236b17998738112f37df78``).
ARCHIVES = {
    "cub200": Archive(
        url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
        filename="CUB_200_2011.tgz",
        md5="97eceeb196236b17998738112f37df78",
    ),
}

#: Every name :func:`download` knows (the others need a manual copy).
DATASETS = ("cub200", "cars196", "sop")

_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A downloaded archive whose checksum differs from the published one."""


class UnsafeArchiveError(ValueError):
    """An archive with a member that would escape the target folder, a link or a special file."""


class ManualDownloadRequired(RuntimeError):
    """The data set has no stable public archive; the message says where to put a copy."""


def _urlopen(request: urllib.request.Request):  # monkeypatched by the tests (no network there)
    return urllib.request.urlopen(request, timeout=60)


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise :class:`ChecksumError` if ``path`` does not have the given MD5 / SHA-256."""
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        actual = file_digest(path, algorithm)
        if actual.lower() != expected.lower():
            raise ChecksumError(
                f"{algorithm} of {path} is {actual}, expected {expected}: the file is corrupt or "
                "not the published archive"
            )


def fetch(url: str, dest: str | os.PathLike, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming a partial file (module docstring)."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "dmlnb"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with _urlopen(request) as response:
        status = getattr(response, "status", None) or 200
        headers = response.headers
        content_range = headers.get("Content-Range", "") if headers is not None else ""
        if have and not (status == 206 and content_range.startswith(f"bytes {have}-")):
            have = 0  # the server sent the whole file: restart
        length = headers.get("Content-Length") if headers is not None else None
        total = have + int(length) if length is not None else None
        with (
            open(part, "ab" if have else "wb") as out,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=dest.name, disable=not progress) as bar,
        ):
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise OSError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes; "
                      f"run again to resume from {part}")
    os.replace(part, dest)
    return dest


def check_members(archive: tarfile.TarFile, root: str | os.PathLike) -> None:
    """Raise :class:`UnsafeArchiveError` unless every member stays inside ``root`` and is a plain
    file or folder (checked for the whole archive before anything is extracted)."""
    root_real = os.path.realpath(root)
    for m in archive.getmembers():
        p = PurePosixPath(m.name)
        problem = None
        if p.is_absolute() or m.name.startswith(("/", "\\")) or (p.parts and ":" in p.parts[0]):
            problem = "an absolute path"
        elif ".." in p.parts or "\\" in m.name:
            problem = "a '..' component or a backslash"
        elif m.issym() or m.islnk():
            problem = f"a {'symbolic' if m.issym() else 'hard'} link to {m.linkname!r}"
        elif not (m.isfile() or m.isdir()):
            problem = "a device, FIFO or other special file"
        else:
            target = os.path.realpath(os.path.join(root_real, m.name))
            if os.path.commonpath([root_real, target]) != root_real:
                problem = "a path outside the target folder"
        if problem:
            raise UnsafeArchiveError(
                f"refusing to extract {archive.name}: member {m.name!r} is {problem}; nothing was "
                "extracted"
            )


def safe_extract(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Extract the tar archive ``path`` into ``root`` after :func:`check_members` accepts it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "r:*") as archive:
        check_members(archive, root)
        if hasattr(tarfile, "data_filter"):
            archive.extractall(root, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; members already checked above
            archive.extractall(root)


def _complete(root: Path) -> bool:
    try:
        base, table = read_cub200_index(root)
        check_files_exist(base, table["path"].tolist(), "cub200")
    except FileNotFoundError:
        return False
    return True


def download(
    name: str,
    root: str | os.PathLike,
    *,
    url: str | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    keep_archive: bool = True,
    force: bool = False,
) -> Path:
    """Download, check and extract data set ``name`` into ``root``; return ``root``.

    Parameters
    ----------
    name : {"cub200", "cars196", "sop"}
        Only ``cub200`` has a public archive; the others raise :class:`ManualDownloadRequired`
        whose message says where to put a copy and which layout is expected.
    root : path
        Target folder (created); the data set ends up in ``root/CUB_200_2011``.
    url : str, optional
        Another location of the same archive (a mirror, a ``file://`` URL).
    md5, sha256 : str, optional
        Expected checksums. By default the published MD5 is checked (also with ``url=``, which
        must then serve the same archive); give ``md5``/``sha256`` for another archive.
    progress : bool, default True
        tqdm progress bar.
    keep_archive : bool, default True
        Keep ``root/CUB_200_2011.tgz`` after extraction (delete it with ``False``).
    force : bool, default False
        Extract again even when the data set is already in place.
    """
    check_choice("name", name, DATASETS)
    if name not in ARCHIVES:
        raise ManualDownloadRequired(f"{name} cannot be downloaded automatically: {HOW_TO_GET[name]}")
    spec = ARCHIVES[name]
    root = Path(root).expanduser()
    if not force and _complete(root):
        return root  # already there, every listed image present
    if md5 is None and sha256 is None:
        md5 = spec.md5
    if url is None:
        url = spec.url
    if md5 is None and sha256 is None:
        warnings.warn(f"no checksum known for {url}; the archive is not verified", stacklevel=2)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec.filename
    if not archive.exists():
        fetch(url, archive, progress=progress)
    try:
        verify_checksum(archive, md5=md5, sha256=sha256)
    except ChecksumError:
        archive.unlink()
        raise
    safe_extract(archive, root)
    base, table = read_cub200_index(root)  # the expected layout is there
    check_files_exist(base, table["path"].tolist(), name)
    if not keep_archive:
        archive.unlink()
    return root


__all__ = [
    "ARCHIVES",
    "Archive",
    "ChecksumError",
    "ManualDownloadRequired",
    "UnsafeArchiveError",
    "check_members",
    "download",
    "fetch",
    "file_digest",
    "safe_extract",
    "verify_checksum",
]
