"""Download and safely extract the benchmarks that have a stable public archive (CUB-200-2011).

``download("cub200", root)`` fetches the official archive, shows a progress bar, checks its MD5
(and SHA-256 when given), and extracts it into ``root`` so that ``root/CUB_200_2011/`` exists.

- **Restartable, resumable.** Bytes go to ``<archive>.part``. A later call continues from the
  partial file with an HTTP ``Range`` request; when the server answers with the whole file
  (status 200, no ``Content-Range`` at the right offset) the download restarts from zero.
- **Checked.** A checksum mismatch raises :class:`ChecksumError` and nothing is extracted. An
  archive this call downloaded is then deleted (so a rerun downloads afresh); an archive that was
  already in ``root`` (placed there by the user, or kept by an earlier call) is never deleted: the
  error names it, gives its expected and actual MD5 and says what to do.
- **Offline or unreachable.** A network failure raises :class:`DownloadError` (an ``OSError``)
  with the URL, the reason and what to do, in one line; a partial ``.part`` file is kept.
- **Safe extraction.** Tar (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``) and zip
  archives, recognised by their content. Every member is checked *before* anything is written: no
  absolute path, no ``..`` component, no path resolving outside ``root``, no symbolic or hard link,
  no device, FIFO or other special file. Then Python's ``tarfile`` ``"data"`` filter (3.11.4+,
  3.12) extracts tar archives with the same rules enforced a second time (and strips set-uid bits
  and owners); ``zipfile`` never creates links and ignores permission bits. Any other file is
  refused with :class:`UnsupportedArchiveError` naming it and the supported formats.

Cars196 and SOP have no stable public link: :func:`download` raises :class:`ManualDownloadRequired`
with where to put a copy and which layout is expected.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import stat
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
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


class UnsupportedArchiveError(ValueError):
    """A file that is neither a tar nor a zip archive."""


class ManualDownloadRequired(RuntimeError):
    """The data set has no stable public archive; the message says where to put a copy."""


class DownloadError(OSError):
    """The server could not be reached or the transfer failed; the message says what to do."""


#: What :func:`safe_extract` reads (recognised by content, not by the file name).
SUPPORTED_FORMATS = "tar (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) or zip (.zip)"


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
    from dmlnb.progress import progress_bar

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "dmlnb"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
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
                progress_bar(total=total, initial=have, unit="B", unit_scale=True,
                             unit_divisor=1024, desc=dest.name, disable=not progress) as bar,
            ):
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        kept = (f"; the {part.stat().st_size:,} bytes received are kept in {part} and a rerun "
                "resumes from there") if part.exists() and part.stat().st_size else ""
        raise DownloadError(
            f"cannot download {url}: {reason}{kept}. Check the network connection (or proxy) and "
            f"run again, or get {dest.name} another way and put it at {dest} (it is checked, "
            "then used)"
        ) from err
    if total is not None and part.stat().st_size != total:
        raise OSError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes; "
                      f"run again to resume from {part}")
    os.replace(part, dest)
    return dest


def _tar_entries(archive: tarfile.TarFile):
    for m in archive.getmembers():
        if m.issym() or m.islnk():
            kind = f"a {'symbolic' if m.issym() else 'hard'} link to {m.linkname!r}"
        elif not (m.isfile() or m.isdir()):
            kind = "a device, FIFO or other special file"
        else:
            kind = None
        yield m.name, kind


def _zip_entries(archive: zipfile.ZipFile):
    for info in archive.infolist():
        # Unix file type in the high bits of the external attributes; 0 when the creator stored
        # none (Windows tools, or Python's writestr), which means a plain file or folder
        kind_bits = stat.S_IFMT(info.external_attr >> 16)
        if kind_bits == stat.S_IFLNK:
            kind = "a symbolic link"
        elif kind_bits not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = "a device, FIFO or other special file"
        else:
            kind = None
        yield info.filename, kind


def check_members(archive: tarfile.TarFile | zipfile.ZipFile, root: str | os.PathLike) -> None:
    """Raise :class:`UnsafeArchiveError` unless every member stays inside ``root`` and is a plain
    file or folder (checked for the whole archive before anything is extracted).

    ``archive`` is an open :class:`tarfile.TarFile` or :class:`zipfile.ZipFile`; both get the same
    rules (module docstring).
    """
    root_real = os.path.realpath(root)
    if isinstance(archive, zipfile.ZipFile):
        entries, archive_name = _zip_entries(archive), archive.filename
    else:
        entries, archive_name = _tar_entries(archive), archive.name
    for name, kind in entries:
        p = PurePosixPath(name)
        problem = None
        if p.is_absolute() or name.startswith(("/", "\\")) or (p.parts and ":" in p.parts[0]):
            problem = "an absolute path"
        elif ".." in p.parts or "\\" in name:
            problem = "a '..' component or a backslash"
        elif kind is not None:
            problem = kind
        else:
            target = os.path.realpath(os.path.join(root_real, name))
            if os.path.commonpath([root_real, target]) != root_real:
                problem = "a path outside the target folder"
        if problem:
            raise UnsafeArchiveError(
                f"refusing to extract {archive_name}: member {name!r} is {problem}; nothing was "
                "extracted"
            )


def safe_extract(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Extract the tar or zip archive ``path`` into ``root`` after :func:`check_members` accepts
    every member.

    Raises
    ------
    UnsupportedArchiveError
        ``path`` is neither a tar nor a zip archive (the message names it and the formats), or
        is a damaged one.
    UnsafeArchiveError
        A member would escape ``root``, or is a link or a special file; nothing is written.
    """
    try:
        _extract(Path(path), Path(root))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise UnsupportedArchiveError(
            f"cannot extract {path}: the archive is damaged ({type(err).__name__}: {err}); get a "
            "fresh copy"
        ) from err


def _extract(path: Path, root: Path) -> None:
    try:
        archive = tarfile.open(path, "r:*")
    except tarfile.ReadError as err:  # not a tar archive: a zip one, or neither
        if not zipfile.is_zipfile(path):
            raise UnsupportedArchiveError(
                f"cannot extract {path}: it is not a {SUPPORTED_FORMATS} archive ({err}); nothing "
                "was extracted"
            ) from err
        root.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path) as zarchive:
            check_members(zarchive, root)
            zarchive.extractall(root)
        return
    root.mkdir(parents=True, exist_ok=True)
    with archive:
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
        Keep ``root/CUB_200_2011.tgz`` after extraction (delete it with ``False``). An archive
        already in ``root`` is used instead of downloading it (after the checksum check); one
        that fails the check is left in place and reported, never deleted.
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
    fetched = not archive.exists()
    if fetched:
        fetch(url, archive, progress=progress)
    try:
        verify_checksum(archive, md5=md5, sha256=sha256)
    except ChecksumError as err:
        if fetched:  # our own download: delete it so that a rerun downloads afresh
            archive.unlink()
            raise
        # a file that was there before this call is the user's: never deleted
        raise ChecksumError(
            f"{archive} was already there and is not the expected archive: its MD5 is "
            f"{file_digest(archive, 'md5')}, expected {md5 or '(not given)'} ({err}). It was left "
            f"untouched and nothing was extracted. Move or delete it to download {spec.filename} "
            "afresh, or pass md5= / sha256= (--md5 / --sha256) if it is another archive you trust"
        ) from err
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
    "DownloadError",
    "ManualDownloadRequired",
    "SUPPORTED_FORMATS",
    "UnsafeArchiveError",
    "UnsupportedArchiveError",
    "check_members",
    "download",
    "fetch",
    "file_digest",
    "safe_extract",
    "verify_checksum",
]
