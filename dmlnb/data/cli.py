"""``dmlnb data ...``: download a benchmark, or count what is on disk.

- ``dmlnb data download NAME --root DIR [--url URL] [--md5 HEX] [--sha256 HEX] [--quiet]``:
  exit status 0 when the data set is in place, 1 when the download, the checksum or the extraction
  failed (one line on stderr saying why and what to do, no traceback), 2 for a data set that
  needs a manual copy (cars196, sop; the message says where to put it).
- ``dmlnb data info NAME [--root DIR]``: classes and images per split, next to the standard sizes.

The console script (:mod:`dmlnb.cli`) calls :func:`add_parser` with its sub-parsers; ``main``
runs the same commands stand-alone (``python -m dmlnb.data.cli info cub200 --root DIR``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from dmlnb.data.registry import SPLITS, dataset_info, dataset_names, load_dataset


def _download(args: argparse.Namespace) -> int:
    from dmlnb.data.download import ManualDownloadRequired, download

    try:
        path = download(args.name, args.root, url=args.url, md5=args.md5, sha256=args.sha256,
                        progress=not args.quiet, keep_archive=not args.remove_archive)
    except ManualDownloadRequired as err:
        print(str(err), file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:  # offline, server error, disk, checksum, unsafe archive
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"dmlnb data download: error: {message}", file=sys.stderr)
        return 1
    print(f"{args.name} is ready under {path}")
    return 0


def split_counts(name: str, root: str | None = None, **options: Any) -> dict[str, tuple[int, int]]:
    """``{split: (classes, images)}`` for every split of ``name`` (index files only; no image read)."""
    info = dataset_info(name)
    counts = {}
    for split in info.splits:
        extra = {"check_files": False} if info.needs_root else {}
        ds = load_dataset(name, split, root, **extra, **options)
        counts[split] = (len(ds.classes), len(ds))
    return counts


def _info(args: argparse.Namespace) -> int:
    from dmlnb.data.benchmarks import STANDARD_SIZES

    info = dataset_info(args.name)
    print(f"{args.name}: {info.description}")
    counts = split_counts(args.name, args.root)
    standard = STANDARD_SIZES.get(args.name)
    for split in SPLITS:
        if split not in counts:
            continue
        c, n = counts[split]
        note = ""
        if standard and split in ("trainval", "test"):
            sc, sn = standard[:2] if split == "trainval" else standard[2:]
            note = "  (standard)" if (c, n) == (sc, sn) else f"  (standard: {sc:,} classes, {sn:,} images)"
        print(f"  {split:<9} {c:>7,} classes {n:>8,} images{note}")
    return 0


def _build_icons_arguments(parser: argparse.ArgumentParser) -> None:
    from dmlnb.data.build_icons import add_arguments

    add_arguments(parser)


def _build_icons(args: argparse.Namespace) -> int:
    from dmlnb.data.build_icons import command

    return command(args)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data download`` and ``data info`` on ``subparsers`` (``set_defaults(func=...)``).

    Each command's ``func(args)`` returns the exit status.
    """
    data = subparsers.add_parser("data", help="download a benchmark or count what is on disk",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = data.add_subparsers(dest="data_command", metavar="{download,info,build}")
    sub.required = True

    dl = sub.add_parser("download", help="download, check and extract a benchmark (cub200); "
                        "for cars196/sop, say where to put a copy")
    dl.add_argument("name", choices=("cub200", "cars196", "sop"))
    dl.add_argument("--root", required=True, help="target folder")
    dl.add_argument("--url", default=None, help="another location of the same archive")
    dl.add_argument("--md5", default=None, help="expected MD5 (default: the published one)")
    dl.add_argument("--sha256", default=None, help="expected SHA-256")
    dl.add_argument("--remove-archive", action="store_true", help="delete the archive after extraction")
    dl.add_argument("--quiet", action="store_true", help="no progress bar")
    dl.set_defaults(func=_download)

    inf = sub.add_parser("info", help="classes and images per split (reads index files only)")
    inf.add_argument("name", choices=dataset_names())
    inf.add_argument("--root", default=None, help="folder that holds the data set (real benchmarks)")
    inf.set_defaults(func=_info)

    bld = sub.add_parser("build", help="build a data set on this machine from installed Debian packages "
                         "(icons: the icon themes of _assets/icon_themes.txt)")
    bld_sub = bld.add_subparsers(dest="build_target", metavar="{icons}")
    bld_sub.required = True
    icons = bld_sub.add_parser("icons", help="render the icon themes into the icons data set "
                               "($DMLNB_DATA/icons or ~/.cache/dmlnb/icons)")
    _build_icons_arguments(icons)
    icons.set_defaults(func=_build_icons)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``data ...`` stand-alone; returns the exit status."""
    parser = argparse.ArgumentParser(prog="dmlnb")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
