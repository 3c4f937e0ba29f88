"""Build the embedded ``glyphs`` data set from Debian's font packages.

Class = character (digits, upper- and lower-case Latin letters); intra-class variation = typeface.
Every font of the packages listed in ``_assets/fontpkgs.txt`` that covers all characters is rendered
once per character, white ink on black, in a fixed per-font em box (so that case and baseline are
kept: ``o`` is smaller than ``O``), at 2x resolution and box-filtered down to ``size`` x ``size``.

Output (``dmlnb/data/_assets/``):

- ``glyphs.npz``: ``images`` uint8 ``[N, size, size]``, ``labels`` int16 ``[N]`` (index into
  ``charset``), ``font_ids`` int16 ``[N]`` (row of the manifest), ``charset`` (str). Written with fixed
  zip timestamps, so the same fonts give a byte-identical file.
- ``glyphs_manifest.csv``: one row per kept font: ``font_id, file, package, family, subfamily,
  weight, italic, category, category_source, license``.
- ``glyphs_splits.json``: the published class-disjoint split (train / val / test characters).

Duplicates: a font whose full rendering equals an earlier font's (same design shipped twice, e.g. as
OTF and TTF) is dropped whole; within a class, an image byte-identical to an earlier one is dropped.

Run ``python tools/build_glyphs.py`` (or ``make glyphs``) on a Debian machine with the font
packages installed (``apt-get install $(cat dmlnb/data/_assets/fontpkgs.txt)``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dmlnb.data.assets import ASSETS, write_npz
from dmlnb.data.debian import package_files, package_license, read_package_list

FONT_PACKAGES = ASSETS / "fontpkgs.txt"


def package_font_files(packages: Iterable[str]) -> list[tuple[str, str]]:
    """``(package, path)`` of every TrueType/OpenType file the installed packages ship."""
    return package_files(packages, FONT_SUFFIXES)

CHARSET = string.digits + string.ascii_uppercase + string.ascii_lowercase
SIZE = 32
SPLIT_SEED = 20210202  # DECISION: the seed of the published split (AAAI 2021 week); never changes
N_TEST_CLASSES = 31  # DECISION: half of the 62 characters are test classes, as in CUB/Cars
N_VAL_CLASSES = 6  # DECISION: class-disjoint validation characters carved from the training half
CATEGORIES = ("serif", "sans", "mono", "script", "display")
FONT_SUFFIXES = (".ttf", ".otf")


@dataclass(frozen=True)
class FontInfo:
    """One row of the manifest."""

    font_id: int
    file: str
    package: str
    family: str
    subfamily: str
    weight: int
    italic: bool
    category: str
    category_source: str
    license: str


# ------------------------------------------------------------------------------------------------
# Font discovery and metadata
# ------------------------------------------------------------------------------------------------
def _name(font, *ids: int) -> str:
    table = font["name"]
    for name_id in ids:
        rec = table.getDebugName(name_id)
        if rec:
            return " ".join(rec.split())
    return ""


def _is_monospaced(font, charset: str = CHARSET) -> bool:
    """Whether every character of ``charset`` has the same advance width (``hmtx``)."""
    try:
        cmap = font.getBestCmap() or {}
        widths = {font["hmtx"][cmap[ord(c)]][0] for c in charset}
    except Exception:  # noqa: BLE001 - a broken table means we cannot tell
        return False
    return len(widths) == 1


def serif_foot_ratio(path: str, px: int = 128) -> float:
    """Ink width of the foot of ``I`` over the width of its stem, rendered at ``px`` pixels.

    About 1 for sans-serif designs, 2 or more for serif (bracketed or slab) designs.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(path, px)
    canvas = Image.new("L", (2 * px, 2 * px), 0)
    ImageDraw.Draw(canvas).text((px // 2, px // 2), "I", fill=255, font=font)
    ink = np.asarray(canvas) > 127
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size < 8:
        return 1.0
    widths = np.array([np.ptp(np.flatnonzero(ink[r])) + 1 for r in rows])
    n = rows.size
    stem = float(np.median(widths[n // 4 : 3 * n // 4]))
    foot = float(widths[-max(1, n // 8) :].max())
    return foot / max(stem, 1.0)


_NAME_KEYWORDS = [
    ("script", ("script", "hand", "brush", "calligra", "kristi", "dancing", "cursive", "writing",
                "lobster", "leckerli", "kaushan", "isabella", "summersby", "tomson")),
    ("display", ("display", "deco", "poster", "stencil", "shadow", "outline", "sketch", "bomb",
                 "rock", "reggae", "comic", "humor", "staypuft", "engadget", "ocr", "dyslexic",
                 "gotico", "blankenburg", "beteckna", "f500", "radis", "okolaks")),
    ("mono", ("mono", "code", "courier", "typewriter", "console")),
    ("sans", ("sans", "grotesk", "gothic")),
    ("serif", ("serif", "roman", "garamond", "baskerv", "antiqua", "book")),
]


def classify_style(font, path: str | None = None) -> tuple[str, str]:
    """Style category from the font's own tables, names and outlines: ``(category, source)``.

    Order: equal advance widths of all characters (``hmtx``) -> mono; PANOSE family type 3 -> script,
    4/5 -> display; IBM ``sFamilyClass`` (OS/2) 1-5,7 -> serif, 8 -> sans, 10 -> script, 9/12 ->
    display; PANOSE serif style 11-13 -> sans, 2-10 -> serif; keywords of the family name; last, the
    rendered ``I``: a foot wider than 1.6x the stem -> serif, else sans (:func:`serif_foot_ratio`).
    """
    os2 = font["OS/2"] if "OS/2" in font else None
    panose = getattr(os2, "panose", None) if os2 is not None else None
    if _is_monospaced(font):
        return "mono", "hmtx.advance"
    if panose is not None and panose.bFamilyType == 3:
        return "script", "panose.bFamilyType"
    if panose is not None and panose.bFamilyType in (4, 5):
        return "display", "panose.bFamilyType"
    if os2 is not None:
        cls = (os2.sFamilyClass >> 8) & 0xFF
        by_class = {1: "serif", 2: "serif", 3: "serif", 4: "serif", 5: "serif", 7: "serif",
                    8: "sans", 10: "script", 9: "display", 12: "display"}
        if cls in by_class:
            return by_class[cls], "os2.sFamilyClass"
    if panose is not None and panose.bFamilyType == 2:
        if panose.bSerifStyle in (11, 12, 13):
            return "sans", "panose.bSerifStyle"
        if 2 <= panose.bSerifStyle <= 10:
            return "serif", "panose.bSerifStyle"
    name = (_name(font, 16, 1) + " " + _name(font, 4)).lower()
    for category, words in _NAME_KEYWORDS:
        if any(w in name for w in words):
            return category, "name"
    if path is not None:
        return ("serif" if serif_foot_ratio(path) > 1.6 else "sans"), "rendering.I-foot"
    return "display", "default"


def _normalise_weight(raw: int) -> int:
    if 1 <= raw <= 9:  # some old fonts use the 1-9 scale
        return raw * 100
    return int(min(max(raw, 1), 1000))


def font_metadata(path: str):
    """Open ``path`` with fontTools and return it (or None if it is no usable outline font)."""
    from fontTools.ttLib import TTFont, TTLibError

    try:
        return TTFont(path, lazy=True, fontNumber=0)
    except (TTLibError, OSError, AssertionError, KeyError, ValueError):
        return None


def covers(font, charset: str = CHARSET) -> bool:
    """Whether the font's Unicode cmap maps every character of ``charset``."""
    try:
        cmap = font.getBestCmap() or {}
    except Exception:  # noqa: BLE001 - broken cmap tables exist in the wild
        return False
    return all(ord(c) in cmap for c in charset)


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def render_font(path: str, charset: str = CHARSET, size: int = SIZE) -> np.ndarray | None:
    """Render every character of ``charset`` in one font: uint8 ``[len(charset), size, size]``.

    The font is scaled once so that the union of all its glyphs' ink boxes (relative to the baseline)
    fits 15/16 of the canvas; each glyph is centred horizontally on its own ink box and placed on the
    common baseline, rendered at 2x and box-filtered down. Returns None if a glyph has no ink.
    """
    from PIL import Image, ImageDraw, ImageFont

    hi = 2 * size
    probe_size = 4 * hi
    try:
        probe = ImageFont.truetype(path, probe_size)
        boxes = [probe.getbbox(c, anchor="ls") for c in charset]
    except OSError:
        return None
    top = min(b[1] for b in boxes)
    bottom = max(b[3] for b in boxes)
    width = max(b[2] - b[0] for b in boxes)
    extent = max(bottom - top, width)
    if extent <= 0:
        return None
    pt = max(4, int(probe_size * (hi * 15 / 16) / extent))
    font = ImageFont.truetype(path, pt)
    boxes = [font.getbbox(c, anchor="ls") for c in charset]
    top = min(b[1] for b in boxes)
    bottom = max(b[3] for b in boxes)
    baseline = (hi - (bottom - top)) // 2 - top
    out = np.zeros((len(charset), size, size), dtype=np.uint8)
    for i, (c, box) in enumerate(zip(charset, boxes, strict=False)):
        canvas = Image.new("L", (hi, hi), 0)
        x = (hi - (box[2] - box[0])) // 2 - box[0]
        ImageDraw.Draw(canvas).text((x, baseline), c, fill=255, font=font, anchor="ls")
        small = np.asarray(canvas.resize((size, size), Image.Resampling.BOX))
        if small.max() < 64:  # an empty or near-empty glyph: the font does not really draw it
            return None
        out[i] = small
    return out


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------
def class_split(charset: str = CHARSET, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """The published class-disjoint split: ``{"train": [...], "val": [...], "test": [...]}``.

    A seeded permutation of the characters: the first ``N_TEST_CLASSES`` are test classes, the next
    ``N_VAL_CLASSES`` validation classes, the rest training classes; each list in charset order.
    """
    order = np.random.default_rng(seed).permutation(len(charset))
    test = set(order[:N_TEST_CLASSES].tolist())
    val = set(order[N_TEST_CLASSES : N_TEST_CLASSES + N_VAL_CLASSES].tolist())
    return {
        "train": [c for i, c in enumerate(charset) if i not in test and i not in val],
        "val": [c for i, c in enumerate(charset) if i in val],
        "test": [c for i, c in enumerate(charset) if i in test],
    }


def build(
    fonts: Sequence[tuple[str, str]],
    charset: str = CHARSET,
    size: int = SIZE,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], list[FontInfo], dict[str, int]]:
    """Render ``fonts`` (``(package, path)`` pairs) into arrays, a manifest and drop counts."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    font_ids: list[np.ndarray] = []
    manifest: list[FontInfo] = []
    seen_fonts: set[bytes] = set()
    seen_images: list[set[bytes]] = [set() for _ in charset]
    stats = {"files": len(fonts), "no_coverage": 0, "unreadable": 0, "duplicate_fonts": 0,
             "duplicate_images": 0}
    licences: dict[str, str] = {}
    iterator: Iterable = fonts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(fonts, desc="rendering fonts")
    for pkg, path in iterator:
        tt = font_metadata(path)
        if tt is None:
            stats["unreadable"] += 1
            continue
        if not covers(tt, charset):
            stats["no_coverage"] += 1
            continue
        glyphs = render_font(path, charset, size)
        if glyphs is None:
            stats["unreadable"] += 1
            continue
        digest = hashlib.sha256(glyphs.tobytes()).digest()
        if digest in seen_fonts:
            stats["duplicate_fonts"] += 1
            continue
        seen_fonts.add(digest)
        keep = []
        for c in range(len(charset)):
            key = glyphs[c].tobytes()
            if key in seen_images[c]:
                stats["duplicate_images"] += 1
                continue
            seen_images[c].add(key)
            keep.append(c)
        font_id = len(manifest)
        category, source = classify_style(tt, path)
        os2 = tt["OS/2"] if "OS/2" in tt else None
        italic = bool(
            (os2 is not None and os2.fsSelection & 1)
            or ("head" in tt and tt["head"].macStyle & 2)
            or ("post" in tt and tt["post"].italicAngle != 0)
        )
        if pkg not in licences:
            licences[pkg] = package_license(pkg)
        # the package's Debian licence names first (normative, short), else the font's own name ID 13
        licence = licences[pkg] or re.sub(r"\s+", " ", _name(tt, 13))[:160]
        manifest.append(
            FontInfo(
                font_id=font_id,
                file=os.path.basename(path),
                package=pkg,
                family=_name(tt, 16, 1) or os.path.splitext(os.path.basename(path))[0],
                subfamily=_name(tt, 17, 2),
                weight=_normalise_weight(os2.usWeightClass if os2 is not None else 400),
                italic=italic,
                category=category,
                category_source=source,
                license=licence or "unknown",
            )
        )
        images.append(glyphs[keep])
        labels.append(np.asarray(keep, dtype=np.int16))
        font_ids.append(np.full(len(keep), font_id, dtype=np.int16))
        tt.close()
    arrays = {
        "images": np.concatenate(images) if images else np.zeros((0, size, size), np.uint8),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int16),
        "font_ids": np.concatenate(font_ids) if font_ids else np.zeros(0, np.int16),
        "charset": np.asarray(charset),
    }
    stats["fonts"] = len(manifest)
    stats["images"] = int(arrays["labels"].size)
    return arrays, manifest, stats


def write_manifest(path: Path, manifest: Sequence[FontInfo]) -> None:
    """Write the font manifest as CSV (one row per kept font)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        fields = list(FontInfo.__dataclass_fields__)
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in manifest:
            writer.writerow(asdict(row))
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the data set into ``--out`` (default: the package's ``_assets`` folder)."""
    parser = argparse.ArgumentParser(prog="python tools/build_glyphs.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--packages", type=Path, default=ASSETS / "fontpkgs.txt")
    args = parser.parse_args(argv)
    packages = read_package_list(args.packages)
    fonts = package_font_files(packages)
    if not fonts:
        parser.error(f"no font files found; install the packages listed in {args.packages}")
    arrays, manifest, stats = build(fonts, CHARSET, args.size, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_npz(args.out / "glyphs.npz", arrays)
    write_manifest(args.out / "glyphs_manifest.csv", manifest)
    split = class_split()
    split_doc = {"seed": SPLIT_SEED, "rule": "seeded permutation of the charset; test = first 31, val = next 6",
                 **split, "build_stats": stats}
    (args.out / "glyphs_splits.json").write_text(json.dumps(split_doc, indent=1) + "\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
