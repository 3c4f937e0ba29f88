"""Build the ``icons`` data set from the icon themes of Debian's packages (a user-run step).

Class = freedesktop icon name (``folder``, ``edit-copy``, ``media-playback-start``, ...); intra-class
variation = the theme that draws it. ``dmlnb data build icons`` (or ``python -m
dmlnb.data.build_icons``) reads the themes of the packages listed in ``_assets/icon_themes.txt``
(``apt-get install $(cat dmlnb/data/_assets/icon_themes.txt) librsvg2-bin``) and writes, into
``--out`` (default :func:`default_cache_dir`):

- ``icons.npz``: ``images`` uint8 ``[N, 3, size, size]``, ``labels`` int32 ``[N]`` (index into
  ``classes``), ``theme_ids`` int32 ``[N]`` (row of the theme table), ``classes`` (str ``[C]``),
  ``themes`` (str ``[T]``). Written with fixed zip timestamps: the same themes give the same bytes.
- ``icons_manifest.csv``: one row per image: ``image_id, name, theme, family, variant, package,
  license, file, source_name, source_format, source_size``.
- ``icons_splits.json``: the class-disjoint split (train / val / test icon names), the rule, the
  build settings and the counts of what was dropped and why.

What is dropped, so that the task is not fake (each counted in ``build_stats``):

- symbolic icons (``*-symbolic``, ``symbolic/`` folders): monochrome glyphs, not a theme's style;
- files a theme only links to in another installed theme (symbolic links resolved: a drawing counts
  once, for the theme that ships it), and within a class any file seen before (same real path or
  same bytes);
- recolour variants are *marked*, not mixed in: themes shipped by one Debian *source* package
  (``Faenza``/``Faenza-Dark``, ``gnome-brave``/``gnome-dust``, ``Yaru-*``, ``Mint-Y-*``, ...) form
  one *family*; in each class the family's first image (its base theme's where it draws the name)
  has ``variant = False``, the family's other themes' own drawings ``variant = True``. The loader
  leaves variants out unless asked (``variants=True``), so by default a class holds one image per
  family and no recoloured twin;
- near-identical images within a class: mean absolute difference below :data:`NEAR_DUPLICATE` of
  255 at 16 x 16 px (derived themes that ship an unchanged copy of another's drawing);
- names drawn by fewer than ``min_themes`` families.

Names that the themes use as aliases of one another (one file under both names in at least
:data:`ALIAS_MIN_FAMILIES` families and in at least half of the families that draw both, e.g.
``gtk-copy`` -> ``edit-copy``) are one class, named by the name most families draw; a file met in
two classes stays in one, so that no two classes share a drawing.

SVG sources are rendered with ``rsvg-convert`` (Debian's ``librsvg2-bin``, the renderer GTK uses for
these themes) in a subprocess with a timeout. Every image is composited on one mid-grey background
(:data:`BACKGROUND`) and resized to ``size`` x ``size`` (Lanczos; non-square sources centred first).
"""

from __future__ import annotations

import argparse
import configparser
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dmlnb.data.assets import ASSETS, write_npz
from dmlnb.data.debian import package_license
from dmlnb.data.debian import read_package_list as _read_words

__all__ = ["BuildResult", "Source", "Theme", "build", "class_split", "command", "default_cache_dir",
           "installed_themes", "read_theme", "render_svg", "run_build", "theme_files", "write_outputs"]

PACKAGES_FILE = ASSETS / "icon_themes.txt"
SIZE = 64
MIN_THEMES = 8  # DECISION: a class needs drawings from at least 8 theme families
SPLIT_SEED = 20210202  # DECISION: salt of the published split (as glyphs); never changes
TEST_FRACTION = 0.5  # DECISION: half of the classes are test classes, as in CUB/Cars/SOP
VAL_FRACTION = 0.1  # DECISION: class-disjoint validation classes carved from the training half
#: DECISION: mid-grey: icons are drawn for light and for dark panels; on white, white paper and
#: light strokes vanish, on black, dark outlines do; grey keeps both and has no hue of its own.
BACKGROUND = (128, 128, 128)
#: Mean absolute difference (of 255) at 16 x 16 px below which two images of a class are one drawing.
NEAR_DUPLICATE = 6.0
#: Two names are one class when >= 2 families, and at least half of those that draw both, ship one
#: file under both names.
ALIAS_MIN_FAMILIES = 2
ALIAS_MAJORITY = 0.5
RENDER_TIMEOUT_S = 30.0
RENDERER = "rsvg-convert"
SUFFIXES = (".png", ".svg", ".svgz")
_DPKG = Path("/var/lib/dpkg")
_ICONS = Path("/usr/share/icons")


@dataclass(frozen=True)
class Theme:
    """An installed icon theme: its folder, the package that ships it and its family."""

    name: str
    path: str
    package: str = ""
    family: str = ""
    license: str = ""
    inherits: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """One file that draws an icon name in a theme (``nominal``: the folder's pixel size)."""

    theme: str
    name: str
    path: str
    real: str
    fmt: str  # "png" or "svg"
    nominal: int


@dataclass
class BuildResult:
    """What :func:`build` makes: arrays for ``icons.npz``, manifest rows, split and statistics."""

    arrays: dict[str, np.ndarray]
    manifest: list[dict[str, object]]
    split: dict[str, list[str]]
    stats: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Where things are
# ------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$DMLNB_DATA/icons`` if ``DMLNB_DATA`` is set, else ``~/.cache/dmlnb/icons``."""
    base = os.environ.get("DMLNB_DATA")
    return Path(base) / "icons" if base else Path.home() / ".cache" / "dmlnb" / "icons"


def read_package_list(path: Path = PACKAGES_FILE) -> list[str]:
    """The Debian icon-theme packages the data set is built from (one line, whitespace-separated)."""
    return _read_words(path)


def source_packages(status: Path = _DPKG / "status") -> dict[str, str]:
    """``{binary package: source package}`` of the installed packages (from dpkg's status file)."""
    out: dict[str, str] = {}
    if not status.exists():
        return out
    pkg = src = ""
    for line in status.read_text(errors="replace").splitlines() + [""]:
        if not line.strip():
            if pkg:
                out[pkg] = src or pkg
            pkg = src = ""
        elif line.startswith("Package:"):
            pkg = line.split(":", 1)[1].strip()
        elif line.startswith("Source:"):
            src = line.split(":", 1)[1].split()[0].strip()
    return out


def installed_themes(
    packages: Iterable[str],
    dpkg: Path = _DPKG,
    icons_root: Path = _ICONS,
    doc: Path = Path("/usr/share/doc"),
) -> list[Theme]:
    """The themes (folders with an ``index.theme``) the installed ``packages`` ship, sorted by name.

    A theme's family is its package's Debian source package (recolour variants such as
    ``gnome-brave``/``gnome-dust``/``gnome-human`` are built from one source).
    """
    sources = source_packages(dpkg / "status")
    owners: dict[str, str] = {}
    prefix = str(icons_root).rstrip("/") + "/"
    for pkg in packages:
        for lst in sorted((dpkg / "info").glob(f"{pkg}.list")) + sorted((dpkg / "info").glob(f"{pkg}:*.list")):
            for line in lst.read_text(errors="replace").splitlines():
                if line.startswith(prefix) and line.endswith("/index.theme") and line.count("/") == prefix.count("/") + 1:
                    owners.setdefault(line[len(prefix):].split("/", 1)[0], pkg)
    themes = []
    for name in sorted(owners):
        pkg = owners[name]
        themes.append(read_theme(icons_root / name, package=pkg, family=sources.get(pkg, pkg),
                                 license=package_license(pkg, doc)))
    return themes


def read_theme(path: Path, package: str = "", family: str = "", license: str = "") -> Theme:
    """A :class:`Theme` for the folder ``path`` (its ``Inherits`` read from ``index.theme``)."""
    inherits: tuple[str, ...] = ()
    index = _read_index(path)
    if index is not None and index.has_section("Icon Theme"):
        raw = index.get("Icon Theme", "Inherits", fallback="")
        inherits = tuple(t.strip() for t in raw.split(",") if t.strip())
    return Theme(path.name, str(path), package, family or package or path.name, license, inherits)


def _read_index(path: Path) -> configparser.ConfigParser | None:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string((path / "index.theme").read_text(errors="replace"))
    except (OSError, configparser.Error):
        return None
    return parser


def theme_directories(theme_path: str | Path) -> list[tuple[str, int, int]]:
    """``(subfolder, size, scale)`` of every non-symbolic folder that ``index.theme`` lists.

    ``size`` is the folder's design size (``MaxSize`` for ``Type=Scalable`` folders where given:
    the largest size the drawing is meant for); a PNG there has ``size x scale`` pixels.
    """
    index = _read_index(Path(theme_path))
    if index is None or not index.has_section("Icon Theme"):
        return []
    listed = []
    for key in ("Directories", "ScaledDirectories"):
        listed += [d.strip() for d in index.get("Icon Theme", key, fallback="").split(",") if d.strip()]
    out = []
    for sub in dict.fromkeys(listed):
        if not index.has_section(sub) or "symbolic" in sub.lower():
            continue
        sec = index[sub]
        try:
            size = int(sec.get("Size", "0"))
            scale = int(sec.get("Scale", "1") or 1)
            if sec.get("Type", "Threshold").strip().lower() == "scalable":
                size = int(sec.get("MaxSize", str(size)) or size)
        except ValueError:
            continue
        if size > 0 and scale > 0:
            out.append((sub, size, scale))
    return out


def is_symbolic(name: str) -> bool:
    """Whether an icon name (file stem) is a symbolic (monochrome) variant."""
    low = name.lower()
    return low.endswith("-symbolic") or low.endswith(".symbolic") or "-symbolic." in low


def theme_files(theme: Theme) -> tuple[dict[str, list[Source]], int]:
    """``({name: files}, symbolic files skipped)``: the PNG/SVG files of ``theme``'s own folders.

    Names and files in sorted order; links are not resolved yet (``real`` is empty, see
    :func:`resolve`). ``nominal``: the design size for an SVG, the pixel size for a PNG.
    """
    out: dict[str, list[Source]] = defaultdict(list)
    symbolic = 0
    for sub, size, scale in sorted(theme_directories(theme.path)):
        folder = os.path.join(theme.path, sub)
        try:
            entries = sorted(os.listdir(folder))
        except OSError:
            continue
        for entry in entries:
            stem, ext = os.path.splitext(entry)
            if ext.lower() not in SUFFIXES:
                continue
            if is_symbolic(stem):
                symbolic += 1
                continue
            fmt = "png" if ext.lower() == ".png" else "svg"
            out[stem].append(Source(theme.name, stem, os.path.join(folder, entry), "", fmt,
                                    size * scale if fmt == "png" else size))
    return {k: out[k] for k in sorted(out)}, symbolic


def preference(sources: Sequence[Source], size: int) -> list[Source]:
    """One theme's files for one name, best first, for images of ``size`` px.

    In order: SVGs drawn for sizes >= ``size``, smallest first (rendered at ``size``); PNGs of
    >= ``size`` px, largest first (downscaled); SVGs drawn for smaller sizes, largest first; smaller
    PNGs, largest first (upscaled). Ties in sorted path order.
    """

    def key(s: Source) -> tuple[int, int, str]:
        big = s.nominal >= size
        if s.fmt == "svg":
            return (0, s.nominal, s.path) if big else (2, -s.nominal, s.path)
        return (1, -s.nominal, s.path) if big else (3, -s.nominal, s.path)

    return sorted(sources, key=key)


class ThemeOwners:
    """Which installed theme's folder a real path lies in (``None``: in no theme's folder)."""

    def __init__(self, themes: Sequence[Theme]) -> None:
        self._roots: dict[str, dict[str, str]] = defaultdict(dict)
        for t in themes:
            real = os.path.realpath(t.path)
            parent, leaf = os.path.split(real)
            self._roots[parent][leaf] = t.name

    def __call__(self, real: str) -> str | None:
        for parent, leaves in self._roots.items():
            if real.startswith(parent + os.sep):
                owner = leaves.get(real[len(parent) + 1:].split(os.sep, 1)[0])
                if owner is not None:
                    return owner
        return None


def resolve(sources: Sequence[Source], size: int, owners: ThemeOwners) -> tuple[Source | None, str]:
    """The best of one theme's files for one name that is its own drawing, links resolved.

    Goes down :func:`preference`; a file whose real path lies in another installed theme's folder
    is that theme's drawing (Faenza-Dark's links into Faenza) and is passed over, as is a broken
    link. Returns ``(source with real path, "")`` or ``(None, reason)``, reason ``"linked_elsewhere"``
    or ``"broken_link"``.
    """
    reason = ""
    for s in preference(sources, size):
        real = os.path.realpath(s.path)
        if not os.path.isfile(real):
            reason = reason or "broken_link"
            continue
        owner = owners(real)
        if owner is not None and owner != s.theme:
            reason = "linked_elsewhere"
            continue
        return replace(s, real=real), ""
    return None, reason or "broken_link"


def choose_source(sources: Sequence[Source], size: int) -> Source:
    """The first of :func:`preference` (no link resolution)."""
    if not sources:
        raise ValueError("no sources to choose from")
    return preference(sources, size)[0]


# ------------------------------------------------------------------------------------------------
# Families and aliases
# ------------------------------------------------------------------------------------------------
def family_order(themes: Sequence[Theme], own_files: Mapping[str, int] | None = None) -> list[Theme]:
    """Themes sorted by family, each family's base theme first.

    Within a family: fewest ``Inherits`` hops to a theme outside the family first (the base the
    recolours inherit from), then the most own files, then by name.
    """
    by_name = {t.name: t for t in themes}
    own_files = own_files or {}

    def depth(t: Theme, seen: frozenset[str] = frozenset()) -> int:
        parents = [by_name[p] for p in t.inherits if p in by_name and by_name[p].family == t.family
                   and p not in seen]
        if not parents:
            return 0
        return 1 + min(depth(p, seen | {t.name}) for p in parents)

    return sorted(themes, key=lambda t: (t.family, depth(t), -own_files.get(t.name, 0), t.name))


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def alias_classes(
    resolved: Mapping[tuple[str, str], Source],
    family_of: Mapping[str, str],
    majority: float = ALIAS_MAJORITY,
) -> dict[str, str]:
    """``{icon name: class name}`` for the names of ``resolved`` (``(theme, name) -> source``).

    Within a theme, two names whose files have one real path (a link from one to the other, or
    both to one drawing) are aliases there. Two names are one class when at least
    :data:`ALIAS_MIN_FAMILIES` families, and at least ``majority`` of the families that draw both,
    alias them (``gtk-copy`` and ``edit-copy``); groups are closed transitively. A class is named
    by its member drawn by the most families (ties: the shortest name, then the first).
    """
    drawn_by: dict[str, set[str]] = defaultdict(set)
    by_real: dict[tuple[str, str], set[str]] = defaultdict(set)
    for (theme, name), src in resolved.items():
        drawn_by[name].add(family_of[theme])
        by_real[(theme, src.real)].add(name)
    votes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for (theme, _), names in by_real.items():
        ordered = sorted(names)
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                votes[(a, b)].add(family_of[theme])
    uf = _UnionFind()
    for (a, b), fams in sorted(votes.items()):
        both = len(drawn_by[a] & drawn_by[b])
        if len(fams) >= ALIAS_MIN_FAMILIES and len(fams) >= majority * both:
            uf.union(a, b)
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(drawn_by):
        groups[uf.find(name)].append(name)
    out: dict[str, str] = {}
    for members in groups.values():
        head = min(members, key=lambda n: (-len(drawn_by[n]), len(n), n))
        for m in members:
            out[m] = head
    return out


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def renderer_available() -> bool:
    """Whether ``rsvg-convert`` is on the PATH."""
    return shutil.which(RENDERER) is not None


def render_svg(path: str, size: int, timeout: float = RENDER_TIMEOUT_S) -> np.ndarray:
    """Render an SVG (or SVGZ) file to RGBA uint8 ``[h, w, 4]`` fitting ``size`` x ``size`` px.

    Runs ``rsvg-convert`` (aspect ratio kept) with a timeout; raises ``RuntimeError`` on failure.
    """
    from PIL import Image

    cmd = [RENDERER, "--width", str(size), "--height", str(size), "--keep-aspect-ratio",
           "--format", "png", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError) as err:
        raise RuntimeError(f"{RENDERER} failed on {path}: {err}") from err
    if proc.returncode != 0 or not proc.stdout:
        msg = proc.stderr.decode(errors="replace").strip()[:200]
        raise RuntimeError(f"{RENDERER} failed on {path} (exit {proc.returncode}): {msg}")
    with Image.open(io.BytesIO(proc.stdout)) as im:
        return np.asarray(im.convert("RGBA"))


def load_png(path: str) -> np.ndarray:
    """Read a PNG as RGBA uint8 ``[h, w, 4]`` (palette, grey and 16-bit images converted)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8), "L")
        return np.asarray(im.convert("RGBA"))


def compose(rgba: np.ndarray, size: int, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """Centre ``rgba`` on a square, composite it on ``background``, resize: uint8 ``[3, size, size]``."""
    from PIL import Image

    h, w = rgba.shape[:2]
    side = max(h, w)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + np.asarray(background, np.float32) * (1.0 - alpha)
    canvas = np.empty((side, side, 3), np.float32)
    canvas[:] = np.asarray(background, np.float32)
    y, x = (side - h) // 2, (side - w) // 2
    canvas[y:y + h, x:x + w] = rgb
    im = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    if side != size:
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1))


def rasterise(source: Source, size: int, timeout: float = RENDER_TIMEOUT_S) -> tuple[np.ndarray, int]:
    """``(image [3, size, size], source pixel size)`` of one source file."""
    rgba = render_svg(source.real, size, timeout) if source.fmt == "svg" else load_png(source.real)
    src_size = source.nominal if source.fmt == "svg" else max(rgba.shape[:2])
    return compose(rgba, size), int(src_size)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """16 x 16 float32 version of a ``[3, S, S]`` image (box filter), for near-duplicate tests."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB")
    return np.asarray(im.resize((16, 16), Image.Resampling.BOX), dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# Split
# ------------------------------------------------------------------------------------------------
def class_split(classes: Iterable[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """The published class-disjoint split: ``{"train", "val", "test"}`` -> sorted class names.

    Each class goes by a hash of ``seed`` and its name (a uniform number u in [0, 1)): test if
    u < :data:`TEST_FRACTION`, val if u < TEST_FRACTION + VAL_FRACTION, else train. A class keeps
    its split whatever other themes or classes a machine has.
    """
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for name in sorted(set(classes)):
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        part = "test" if u < TEST_FRACTION else "val" if u < TEST_FRACTION + VAL_FRACTION else "train"
        out[part].append(name)
    return out


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------
def build(
    themes: Sequence[Theme],
    size: int = SIZE,
    min_themes: int = MIN_THEMES,
    jobs: int = 2,
    progress: bool = False,
    timeout: float = RENDER_TIMEOUT_S,
) -> BuildResult:
    """Build the data set from ``themes`` (see the module docstring for what is kept and why)."""
    stats: Counter = Counter()
    family_of = {t.name: t.family for t in themes}
    files: dict[str, dict[str, list[Source]]] = {}
    for t in themes:
        files[t.name], n_symbolic = theme_files(t)
        stats["symbolic"] += n_symbolic
    # names drawn by enough families before links are resolved (resolving only drops drawings)
    families_of_name: dict[str, set[str]] = defaultdict(set)
    for theme, names in files.items():
        for name in names:
            families_of_name[name].add(family_of[theme])
    candidates = {n for n, f in families_of_name.items() if len(f) >= min_themes}
    owners = ThemeOwners(themes)
    resolved: dict[tuple[str, str], Source] = {}
    for t in themes:
        for name in sorted(candidates & files[t.name].keys()):
            src, reason = resolve(files[t.name][name], size, owners)
            if src is None:
                stats[reason] += 1
            else:
                resolved[(t.name, name)] = src
    cls_of = alias_classes(resolved, family_of)

    # one source per (theme, class), the class's own name before its aliases; within a class the
    # themes go family by family, each family's base theme first
    rank = {t.name: i for i, t in enumerate(family_order(themes, {k: len(v) for k, v in files.items()}))}
    options: dict[tuple[str, str], list[Source]] = defaultdict(list)
    for (theme, name), src in resolved.items():
        options[(theme, cls_of[name])].append(src)
    chosen = {key: min(opts, key=lambda s, c=key[1]: (s.name != c, s.name)) for key, opts in options.items()}
    families_per_class: dict[str, set[str]] = defaultdict(set)
    for theme, cls in chosen:
        families_per_class[cls].add(family_of[theme])
    wanted = {c for c, f in families_per_class.items() if len(f) >= min_themes}
    todo = sorted((s for (_, cls), s in chosen.items() if cls in wanted),
                  key=lambda s: (cls_of[s.name], rank[s.theme]))
    todo = _drop_copies(todo, cls_of, stats)
    failures: list[str] = []
    rendered = _rasterise_all(todo, size, jobs, progress, timeout, stats, failures)
    kept = _drop_near_duplicates([s for s in todo if s in rendered], rendered, cls_of, stats)
    classes = sorted(c for c, items in kept.items()
                     if len({family_of[s.theme] for s, _ in items}) >= min_themes)
    stats["classes_below_min_themes"] = len(kept) - len(classes)

    theme_by_name = {t.name: t for t in themes}
    theme_names = sorted(theme_by_name)
    theme_index = {name: i for i, name in enumerate(theme_names)}
    images, labels, theme_ids, manifest = [], [], [], []
    for label, cls in enumerate(classes):
        families_seen: set[str] = set()
        for s, (image, src_size) in kept[cls]:
            t = theme_by_name[s.theme]
            manifest.append({
                "image_id": len(manifest), "name": cls, "theme": t.name, "family": t.family,
                "variant": t.family in families_seen,
                "package": t.package, "license": t.license or "unknown",
                "file": os.path.relpath(s.real, os.path.dirname(os.path.realpath(t.path))),
                "source_name": s.name, "source_format": s.fmt, "source_size": src_size,
            })
            families_seen.add(t.family)
            images.append(image)
            labels.append(label)
            theme_ids.append(theme_index[t.name])
    arrays = {
        "images": np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8),
        "labels": np.asarray(labels, np.int32),
        "theme_ids": np.asarray(theme_ids, np.int32),
        "classes": np.asarray(classes, dtype=str),
        "themes": np.asarray(theme_names, dtype=str),
    }
    final = set(classes)
    aliases: dict[str, list[str]] = defaultdict(list)
    for name, cls in sorted(cls_of.items()):
        if cls in final and name != cls:
            aliases[cls].append(name)
    stats.update({"themes": len(themes), "families": len(set(family_of.values())),
                  "classes": len(classes), "images": len(manifest),
                  "themes_used": len({m["theme"] for m in manifest}),
                  "families_used": len({m["family"] for m in manifest})})
    return BuildResult(arrays, manifest, class_split(classes), dict(sorted(stats.items())), dict(aliases),
                       failures)


def _drop_copies(todo: Sequence[Source], cls_of: Mapping[str, str], stats: Counter) -> list[Source]:
    """Drop files already met (same bytes), before anything is rendered.

    A file met in several classes stays only in the class it is named for (its real file name is
    the class or one of its aliases), else in the first class by name; within a class, only its
    first occurrence (in ``todo`` order: family by family, base theme first) is kept.
    """
    digest = {s: _file_digest(s.real) for s in todo}
    classes_of: dict[bytes, set[str]] = defaultdict(set)
    named_for: dict[bytes, set[str]] = defaultdict(set)
    for s in todo:
        cls = cls_of[s.name]
        classes_of[digest[s]].add(cls)
        if cls_of.get(os.path.basename(s.real).split(".", 1)[0]) == cls:
            named_for[digest[s]].add(cls)
    home = {d: min(named_for[d] or cls) for d, cls in classes_of.items()}
    seen: dict[str, set[bytes]] = defaultdict(set)
    out = []
    for s in todo:
        cls, d = cls_of[s.name], digest[s]
        if home[d] != cls:
            stats["shared_with_other_class"] += 1
        elif d in seen[cls]:
            stats["same_file"] += 1
        else:
            seen[cls].add(d)
            out.append(s)
    return out


def _drop_near_duplicates(
    todo: Sequence[Source],
    rendered: Mapping[Source, tuple[np.ndarray, int]],
    cls_of: Mapping[str, str],
    stats: Counter,
) -> dict[str, list[tuple[Source, tuple[np.ndarray, int]]]]:
    """Per class, in ``todo`` order, keep the images not within :data:`NEAR_DUPLICATE` of a kept
    one (mean absolute difference at 16 x 16 px)."""
    kept: dict[str, list[tuple[Source, tuple[np.ndarray, int]]]] = defaultdict(list)
    thumbs: dict[str, list[np.ndarray]] = defaultdict(list)
    for s in todo:
        cls = cls_of[s.name]
        th = thumbnail(rendered[s][0])
        if any(float(np.abs(th - o).mean()) < NEAR_DUPLICATE for o in thumbs[cls]):
            stats["near_duplicate"] += 1
            continue
        thumbs[cls].append(th)
        kept[cls].append((s, rendered[s]))
    return kept


def _file_digest(path: str) -> bytes:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).digest()


def _rasterise_all(
    todo: Sequence[Source], size: int, jobs: int, progress: bool, timeout: float, stats: Counter,
    failures: list[str],
) -> dict[Source, tuple[np.ndarray, int]]:
    """Rasterise ``todo`` with ``jobs`` threads (the SVG work is in subprocesses); a file that
    cannot be read or rendered is counted as ``unreadable`` and its error kept in ``failures``."""

    def one(s: Source) -> tuple[Source, tuple[np.ndarray, int] | None, str]:
        try:
            return s, rasterise(s, size, timeout), ""
        except (RuntimeError, OSError, ValueError, SyntaxError) as err:  # PIL raises these on bad files
            return s, None, str(err)

    out: dict[Source, tuple[np.ndarray, int]] = {}
    bar = None
    if progress:
        from dmlnb.progress import progress_bar

        bar = progress_bar(total=len(todo), desc="rendering icons", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for s, result, err in pool.map(one, todo):
            if result is None:
                stats["unreadable"] += 1
                failures.append(err)
            else:
                out[s] = result
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
MANIFEST_FIELDS = ("image_id", "name", "theme", "family", "variant", "package", "license", "file",
                   "source_name", "source_format", "source_size")


def write_outputs(out: Path, result: BuildResult, settings: Mapping[str, object]) -> None:
    """Write ``icons.npz``, ``icons_manifest.csv`` and ``icons_splits.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_npz(out / "icons.npz", result.arrays)
    tmp = out / "icons_manifest.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_FIELDS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(result.manifest)
    os.replace(tmp, out / "icons_manifest.csv")
    doc = {
        "seed": SPLIT_SEED,
        "rule": (f"sha256('{SPLIT_SEED}:' + class) as u in [0, 1): test if u < {TEST_FRACTION}, "
                 f"val if u < {TEST_FRACTION + VAL_FRACTION}, else train"),
        **result.split,
        "settings": dict(settings),
        "aliases": result.aliases,
        "build_stats": result.stats,
        "unreadable": result.failures,
    }
    tmp = out / "icons_splits.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, out / "icons_splits.json")


def run_build(
    out: Path | None = None,
    size: int = SIZE,
    min_themes: int = MIN_THEMES,
    packages_file: Path = PACKAGES_FILE,
    jobs: int = 2,
    progress: bool = True,
) -> dict[str, object]:
    """Build from the installed themes of ``packages_file`` into ``out``; returns the summary.

    Raises ``RuntimeError`` naming the missing packages (none installed) or the missing renderer.
    """
    if not renderer_available():
        raise RuntimeError(f"{RENDERER} is not installed: apt-get install librsvg2-bin")
    packages = read_package_list(packages_file)
    themes = installed_themes(packages)
    if not themes:
        raise RuntimeError(f"none of the icon-theme packages in {packages_file} is installed: "
                           f"apt-get install $(cat {packages_file})")
    start = time.perf_counter()
    result = build(themes, size=size, min_themes=min_themes, jobs=jobs, progress=progress)
    out = out or default_cache_dir()
    settings = {"size": size, "min_themes": min_themes, "background": list(BACKGROUND),
                "near_duplicate": NEAR_DUPLICATE, "renderer": _renderer_version(),
                "packages": sorted({t.package for t in themes})}
    write_outputs(out, result, settings)
    summary = {"out": str(out), **{k: result.stats[k] for k in ("themes_used", "families_used",
                                                                 "classes", "images")},
               "seconds": round(time.perf_counter() - start, 1)}
    return summary


def _renderer_version() -> str:
    try:
        proc = subprocess.run([RENDERER, "--version"], capture_output=True, timeout=10, check=False)
        return proc.stdout.decode(errors="replace").strip()
    except (OSError, subprocess.TimeoutExpired):
        return RENDERER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dmlnb data build icons`` / ``python -m dmlnb.data.build_icons``."""
    parser.add_argument("--size", type=int, default=SIZE, help=f"image side in px (default {SIZE})")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default $DMLNB_DATA/icons or ~/.cache/dmlnb/icons)")
    parser.add_argument("--min-themes", type=int, default=MIN_THEMES,
                        help=f"keep names drawn by at least this many theme families (default {MIN_THEMES})")
    parser.add_argument("--packages", type=Path, default=PACKAGES_FILE, help="package list file")
    parser.add_argument("--jobs", type=int, default=2, help="parallel renderers (default 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def command(args: argparse.Namespace) -> int:
    """Run a build from parsed arguments (see :func:`add_arguments`); returns the exit status."""
    if args.size < 8 or args.min_themes < 2:
        print("error: --size must be >= 8 and --min-themes >= 2", file=sys.stderr)
        return 2
    try:
        summary = run_build(args.out, args.size, args.min_themes, args.packages, args.jobs,
                            progress=not args.quiet)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dmlnb.data.build_icons [--size 64] [--out DIR] [--min-themes 8]``."""
    parser = argparse.ArgumentParser(prog="python -m dmlnb.data.build_icons",
                                     description=(__doc__ or "").split("\n")[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

