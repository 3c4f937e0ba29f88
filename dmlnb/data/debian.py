"""What Debian's package database says: the files a package ships and its licence.

The embedded data sets are built from Debian packages (fonts for ``glyphs``, icon themes for
``icons``); these helpers read ``/var/lib/dpkg/info/<package>.list`` and
``/usr/share/doc/<package>/copyright`` and nothing else (no ``dpkg`` subprocess).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["read_package_list", "package_files", "package_license"]

DPKG_INFO = Path("/var/lib/dpkg/info")
DOC = Path("/usr/share/doc")


def read_package_list(path: Path) -> list[str]:
    """Debian package names from a whitespace-separated list file (an asset of the repo)."""
    return Path(path).read_text().split()


def package_files(packages: Iterable[str], suffixes: tuple[str, ...],
                  dpkg_info: Path = DPKG_INFO) -> list[tuple[str, str]]:
    """``(package, path)`` of every regular file with one of ``suffixes`` (case-insensitive)
    that the installed ``packages`` ship, sorted by real path.

    Symbolic links and files shipped twice are kept once (first by sorted real path); a package
    that is not installed contributes nothing.
    """
    found: dict[str, tuple[str, str]] = {}
    for pkg in packages:
        lst = Path(dpkg_info) / f"{pkg}.list"
        if not lst.exists():
            continue
        for line in lst.read_text().splitlines():
            if line.lower().endswith(suffixes) and os.path.isfile(line):
                real = os.path.realpath(line)
                found.setdefault(real, (pkg, real))
    return [found[k] for k in sorted(found)]


def package_license(package: str, doc: Path = DOC) -> str:
    """Short licence names from a package's Debian copyright file (``License:`` fields, first 3)."""
    path = doc / package / "copyright"
    if not path.exists():
        return ""
    names: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("License:"):
            value = line.split(":", 1)[1].strip()
            if value and value not in names:
                names.append(value)
    if not names:  # free-form copyright files: recognise the licence by its usual wording
        text = path.read_text(errors="replace")
        for pattern, short in _LICENCE_WORDING:
            if re.search(pattern, text, flags=re.IGNORECASE) and short not in names:
                names.append(short)
    return "; ".join(names[:3])


_LICENCE_WORDING = [
    (r"Open Font License,?\s+Version 1\.1", "OFL-1.1"),
    (r"Open Font License,?\s+Version 1\.0", "OFL-1.0"),
    (r"GUST Font License", "GUST-Font-License"),
    (r"Public Domain", "public-domain"),
    (r"GNU General Public\s+License", "GPL"),
]


