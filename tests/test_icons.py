"""The ``icons`` data set: builder on a small theme tree made here, loader, split, gallery, CLI.

Nothing here needs Debian's icon themes, except the end-to-end build at the end (skipped without
them). SVG sources are rendered with ``rsvg-convert`` where it is installed, else by a stand-in
that draws a flat square, so that the selection and de-duplication logic is tested everywhere.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlnb.data import build_icons as B
from dmlnb.data import icons as I
from dmlnb.data.cli import main as data_main

SIZE = 32
SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="48" height="48" viewBox="0 0 48 48">
<rect x="8" y="8" width="32" height="32" fill="{colour}" fill-opacity="{opacity}"/></svg>"""


# ------------------------------------------------------------------------------------------------
# A theme tree
# ------------------------------------------------------------------------------------------------
def _index(path: Path, dirs: list[tuple[str, int, str]], inherits: str = "hicolor") -> None:
    lines = ["[Icon Theme]", f"Name={path.name}", f"Inherits={inherits}",
             "Directories=" + ",".join(d for d, _, _ in dirs), ""]
    for d, size, kind in dirs:
        lines += [f"[{d}]", f"Size={size}", "Context=Places", f"Type={kind}"]
        if kind == "Scalable":
            lines += ["MinSize=8", "MaxSize=512"]
        lines.append("")
    path.mkdir(parents=True, exist_ok=True)
    (path / "index.theme").write_text("\n".join(lines))


def _png(path: Path, size: int, seed: int, alpha: bool = True, pattern: int | None = None) -> Path:
    """A distinctive RGBA drawing: a seeded coloured shape on transparency."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 4), np.uint8)
    colour = rng.integers(0, 256, 3)
    k = (pattern if pattern is not None else seed) % 4
    yy, xx = np.mgrid[:size, :size] / size
    shape = [(xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.15, (xx > 0.2) & (xx < 0.8) & (yy > 0.3),
             xx > yy, (np.abs(xx - 0.5) < 0.15) | (np.abs(yy - 0.5) < 0.15)][k]
    arr[shape, :3] = colour
    arr[~shape, :3] = 255 - colour
    arr[..., 3] = np.where(shape, 255, 90 if alpha else 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


DIRS = [("16x16/places", 16, "Fixed"), ("48x48/places", 48, "Fixed"), ("96x96/places", 96, "Fixed"),
        ("scalable/places", 48, "Scalable"), ("symbolic/places", 16, "Scalable")]


def make_tree(root: Path) -> list[B.Theme]:
    """Four themes, three families; every case the builder must handle is in it (see the test)."""
    a, b, bd, g = root / "Alpha", root / "Beta", root / "Beta-Dark", root / "Gamma"
    _index(a, DIRS)
    (a / "scalable/places").mkdir(parents=True)
    (a / "scalable/places/folder.svg").write_text(SVG.format(colour="#d00000", opacity="0.5"))
    (a / "scalable/places/folder-symbolic.svg").write_text(SVG.format(colour="#000000", opacity="1"))
    (a / "symbolic/places").mkdir(parents=True)
    (a / "symbolic/places/user-trash.svg").write_text(SVG.format(colour="#000000", opacity="1"))
    _png(a / "16x16/places/folder.png", 16, 1)
    _png(a / "48x48/places/user-trash.png", 48, 2)
    _png(a / "96x96/places/user-trash.png", 96, 2)  # the larger PNG is the one to use
    _png(a / "48x48/places/edit-copy.png", 48, 3)
    _link(a / "48x48/places/gtk-copy.png", "edit-copy.png")  # an alias
    _png(a / "48x48/places/document-new.png", 48, 4)

    _index(b, DIRS)
    _png(b / "48x48/places/folder.png", 48, 11, pattern=0)
    _png(b / "48x48/places/user-trash.png", 48, 12)
    _png(b / "48x48/places/edit-copy.png", 48, 13)
    _link(b / "48x48/places/gtk-copy.png", "edit-copy.png")
    _link(b / "48x48/places/document-new.png", "../../../Alpha/48x48/places/document-new.png")

    _index(bd, DIRS, inherits="Beta,hicolor")  # Beta's recolour: same shape, other colour
    _png(bd / "48x48/places/folder.png", 48, 21, pattern=0)
    _link(bd / "48x48/places/user-trash.png", "../../../Beta/48x48/places/user-trash.png")

    _index(g, DIRS)
    _png(g / "48x48/places/folder.png", 48, 31)
    (g / "96x96/places").mkdir(parents=True)
    (g / "96x96/places/user-trash.png").write_bytes((a / "96x96/places/user-trash.png").read_bytes())
    near = np.asarray(Image.open(a / "48x48/places/edit-copy.png")).copy()
    near[0, 0, 0] ^= 1  # one bit off: another file, the same drawing
    Image.fromarray(near, "RGBA").save(g / "48x48/places/edit-copy.png")
    return [B.read_theme(a, "alpha-icons", "alpha", "GPL-3"),
            B.read_theme(b, "beta-icons", "beta", "LGPL-3"),
            B.read_theme(bd, "beta-icons", "beta", "LGPL-3"),
            B.read_theme(g, "gamma-icons", "gamma", "CC-BY-SA-4.0")]


@pytest.fixture
def renderer(monkeypatch):
    """``rsvg-convert`` where installed, else a stand-in that draws a flat square per file."""
    if not B.renderer_available():
        def fake(path: str, size: int, timeout: float = B.RENDER_TIMEOUT_S) -> np.ndarray:
            digest = hashlib.sha256(Path(path).read_bytes()).digest()
            arr = np.zeros((size, size, 4), np.uint8)
            q = size // 6
            arr[q:-q, q:-q] = (*digest[:3], 128)
            return arr

        monkeypatch.setattr(B, "render_svg", fake)


@pytest.fixture
def tree(tmp_path, renderer):
    return make_tree(tmp_path / "icons")


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------
def test_theme_directories_skip_symbolic_and_read_scalable_max_size(tree):
    dirs = B.theme_directories(tree[0].path)
    assert ("scalable/places", 512, 1) in dirs
    assert ("96x96/places", 96, 1) in dirs
    assert not any("symbolic" in d for d, _, _ in dirs)


def test_source_preference_svg_then_largest_png():
    def s(fmt, n):
        return B.Source("T", "x", f"/t/{n}/{fmt}", "", fmt, n)

    assert B.choose_source([s("png", 16), s("png", 256), s("png", 64)], 64).nominal == 256
    assert B.choose_source([s("png", 256), s("svg", 512), s("svg", 64)], 64) == s("svg", 64)
    assert B.choose_source([s("png", 48), s("svg", 32), s("svg", 16)], 64) == s("svg", 32)
    assert B.choose_source([s("png", 48), s("png", 32)], 64).nominal == 48


def test_build_keeps_one_drawing_per_theme_and_drops_what_would_fake_the_task(tree):
    result = B.build(tree, size=SIZE, min_themes=2, jobs=1)
    arrays, stats = result.arrays, result.stats
    classes = list(arrays["classes"])
    # document-new: Beta only links to Alpha's file, so one family draws it
    assert classes == ["edit-copy", "folder", "user-trash"]
    assert result.aliases == {"edit-copy": ["gtk-copy"]}
    assert stats["symbolic"] == 1 and stats["linked_elsewhere"] == 2
    assert stats["same_file"] == 1 and stats["near_duplicate"] == 1
    rows = {(m["name"], m["theme"]): m for m in result.manifest}
    assert set(rows) == {("edit-copy", "Alpha"), ("edit-copy", "Beta"),
                         ("folder", "Alpha"), ("folder", "Beta"), ("folder", "Beta-Dark"),
                         ("folder", "Gamma"), ("user-trash", "Alpha"), ("user-trash", "Beta")}
    assert rows[("folder", "Alpha")]["source_format"] == "svg"
    assert rows[("user-trash", "Alpha")]["source_size"] == 96
    assert rows[("user-trash", "Alpha")]["file"] == "Alpha/96x96/places/user-trash.png"
    assert rows[("folder", "Beta-Dark")]["variant"] is True
    assert sum(m["variant"] for m in result.manifest) == 1
    assert rows[("folder", "Gamma")]["license"] == "CC-BY-SA-4.0"
    images = arrays["images"]
    assert images.dtype == np.uint8 and images.shape == (8, 3, SIZE, SIZE)
    assert arrays["labels"].tolist() == sorted(arrays["labels"].tolist())
    # transparency is composited on the grey background: Alpha's SVG is a half-transparent red
    # square inside an empty margin
    folder = images[[i for i, m in enumerate(result.manifest) if m["name"] == "folder"
                     and m["theme"] == "Alpha"][0]]
    assert tuple(folder[:, 0, 0]) == B.BACKGROUND
    if B.renderer_available():
        centre = folder[:, SIZE // 2, SIZE // 2].astype(int)
        assert abs(centre[0] - (0xD0 + 128) / 2) <= 3 and abs(centre[1] - 64) <= 3


def test_build_is_deterministic_and_writes_all_files(tree, tmp_path):
    outs = []
    for k in range(2):
        result = B.build(tree, size=SIZE, min_themes=2, jobs=2)
        B.write_outputs(tmp_path / f"out{k}", result, {"size": SIZE})
        outs.append(tmp_path / f"out{k}")
    for name in I.FILES:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_min_themes_drops_thin_classes(tree):
    result = B.build(tree, size=SIZE, min_themes=3, jobs=1)
    assert list(result.arrays["classes"]) == ["folder"]


def test_theme_owners_and_families(tree):
    owners = B.ThemeOwners(tree)
    assert owners(os.path.realpath(os.path.join(tree[1].path, "48x48/places/folder.png"))) == "Beta"
    assert owners("/nowhere/x.png") is None
    order = [t.name for t in B.family_order(tree)]
    assert order.index("Beta") < order.index("Beta-Dark")


def test_class_split_is_disjoint_seeded_and_stable():
    names = [f"icon-{i}" for i in range(400)]
    split = B.class_split(names)
    assert split == B.class_split(list(reversed(names)))
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(names)
    assert 150 < len(split["test"]) < 250 and 20 < len(split["val"]) < 60
    more = B.class_split(names + [f"other-{i}" for i in range(100)])
    for part in ("train", "val", "test"):
        assert set(split[part]) <= set(more[part])  # adding classes moves none


@pytest.mark.skipif(not B.renderer_available(), reason="rsvg-convert (librsvg2-bin) not installed")
def test_render_svg_keeps_alpha_and_reports_broken_files(tmp_path):
    good = tmp_path / "a.svg"
    good.write_text(SVG.format(colour="#00ff00", opacity="1"))
    rgba = B.render_svg(str(good), 24)
    assert rgba.shape == (24, 24, 4) and rgba[0, 0, 3] == 0 and rgba[12, 12, 3] == 255
    bad = tmp_path / "b.svg"
    bad.write_text("<svg")
    with pytest.raises(RuntimeError, match="rsvg-convert"):
        B.render_svg(str(bad), 24)


def test_compose_centres_non_square_sources():
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, 255
    out = B.compose(rgba, 20)
    assert out.shape == (3, 20, 20)
    assert tuple(out[:, 0, 10]) == B.BACKGROUND and tuple(out[:, 10, 10]) == (255, 255, 255)


# ------------------------------------------------------------------------------------------------
# Loader
# ------------------------------------------------------------------------------------------------
def make_wide_tree(root: Path, n_names: int = 24) -> list[B.Theme]:
    """Three families (one with a recolour variant) drawing ``n_names`` names, PNG only."""
    themes = []
    for k, (name, fam, parent) in enumerate([("One", "one", ""), ("Two", "two", ""),
                                             ("Two-Dark", "two", "Two"), ("Three", "three", "")]):
        _index(root / name, DIRS, inherits=parent or "hicolor")
        for i in range(n_names):
            pattern = (i + (0 if fam == "two" else 2 * k + 1)) % 4
            _png(root / name / "48x48/places" / f"name-{i:02d}.png", 48, 100 * k + i, pattern=pattern)
        themes.append(B.read_theme(root / name, f"{fam}-icons", fam, "GPL-3"))
    return themes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("icons")
    result = B.build(make_wide_tree(root / "themes"), size=SIZE, min_themes=2, jobs=2)
    B.write_outputs(root / "data", result, {"size": SIZE})
    return root / "data"


def test_load_icons_splits_images_and_metadata(built):
    from dmlnb.data import load_dataset

    parts = {s: load_dataset("icons", s, root=str(built)) for s in ("train", "val", "trainval", "test")}
    names = {s: set(d.classes) for s, d in parts.items()}
    assert names["train"] and names["val"] and names["test"]
    assert not (names["train"] & names["test"]) and not (names["val"] & names["test"])
    assert names["trainval"] == names["train"] | names["val"]
    test = parts["test"]
    image, label = test[0]
    assert image.shape == (3, SIZE, SIZE) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert test.channels == 3 and isinstance(label, int)
    meta = test.metadata
    assert len(meta) == len(test)
    assert {"theme", "family", "variant", "package", "license", "file"} <= set(meta.columns)
    assert not meta["variant"].any() and set(meta["family"]) == {"one", "two", "three"}
    assert [test.classes[y] for y in test.labels] == list(meta["name"])
    small = load_dataset("icons", "test", root=str(built), image_size=16, max_per_class=2)
    assert small.image_size == 16 and np.bincount(small.labels).max() == 2


def test_variants_option_and_attribute_retrieval_on_theme_family(built):
    from dmlnb.metrics import attribute_retrieval

    ds = I.load_icons("trainval", str(built), variants=True)
    meta = ds.metadata
    assert meta["variant"].any() and "Two-Dark" in set(meta["theme"])
    # an embedding that knows the family (plus noise) keeps the recolour next to its base
    families = sorted(set(meta["family"]))
    rng = np.random.default_rng(0)
    emb = np.eye(len(families))[[families.index(f) for f in meta["family"]]]
    emb = emb + 0.05 * rng.standard_normal(emb.shape)
    out = attribute_retrieval(emb, ds.labels, {a: meta[a].to_numpy() for a in I.ATTRIBUTES})
    # per class: Two and Two-Dark find each other, One and Three cannot agree: 2 of 4 queries
    assert out["family"]["agreement"] == pytest.approx(0.5) and out["family"]["lift"] > 0.3
    assert out["theme"]["agreement"] == 0.0  # a theme draws a name once


def test_not_built_names_the_build_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="dmlnb data build icons"):
        I.load_icons("test", str(tmp_path / "none"))


def test_default_cache_dir_follows_dmlnb_data(monkeypatch, tmp_path):
    monkeypatch.setenv("DMLNB_DATA", str(tmp_path))
    assert I.data_dir() == tmp_path / "icons"
    monkeypatch.delenv("DMLNB_DATA")
    assert I.data_dir() == Path.home() / ".cache" / "dmlnb" / "icons"


def test_gallery_rows_are_classes_and_columns_are_themes(built, tmp_path):
    from dmlnb.gallery import icons_gallery, write_icons_gallery

    ds = I.load_icons("trainval", str(built))
    grid, rows, cols = icons_gallery(ds, n_classes=3, n_families=3)
    assert len(rows) == 3 and sorted(cols) == ["One", "Three", "Two"]
    assert icons_gallery(ds, n_classes=3, exclude_families=("two",))[2] == ["One", "Three"]
    assert grid.shape[2] == 3 and grid.shape[0] > 3 * SIZE and grid.shape[1] > 3 * SIZE
    path = write_icons_gallery(tmp_path / "g.png", root=built, split="trainval", n_classes=3, n_families=3)
    assert Image.open(path).size[0] > 3 * SIZE


def test_cli_build_without_packages_says_what_to_install(tmp_path, capsys):
    pk = tmp_path / "pk.txt"
    pk.write_text("no-such-icon-theme-package\n")
    code = data_main(["data", "build", "icons", "--packages", str(pk), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "apt-get install" in err or "librsvg2-bin" in err


# ------------------------------------------------------------------------------------------------
# End to end on the installed themes
# ------------------------------------------------------------------------------------------------
E2E_PACKAGES = ("tango-icon-theme", "gnome-icon-theme", "gnome-icon-theme-gartoon")


@pytest.mark.skipif(not (B.renderer_available() and all(
    Path(f"/var/lib/dpkg/info/{p}.list").exists() for p in E2E_PACKAGES)),
    reason="needs rsvg-convert and the icon themes " + ", ".join(E2E_PACKAGES))
def test_end_to_end_build_from_installed_themes(tmp_path):
    start = time.perf_counter()
    themes = B.installed_themes(E2E_PACKAGES)
    assert {"Tango", "gnome", "gartoon"} <= {t.name for t in themes}
    result = B.build(themes, size=SIZE, min_themes=3, jobs=2)
    B.write_outputs(tmp_path, result, {"size": SIZE})
    classes = set(result.arrays["classes"])
    assert len(classes) > 30
    per_class = {}
    for m in result.manifest:
        per_class.setdefault(m["name"], set()).add(m["family"])
    assert all(len(f) == 3 for f in per_class.values())  # one drawing per theme, all three kept
    assert not any(B.is_symbolic(c) for c in classes)
    ds = I.load_icons("test", str(tmp_path))
    assert set(ds.metadata["theme"]) <= {"Tango", "gnome", "gartoon"}
    assert all(ds.metadata["license"] != "")
    assert time.perf_counter() - start < 120
