"""The embedded glyph data set: the builder (determinism, dedup, manifest) and the loader."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dmlnb.data import load_dataset
from dmlnb.data.glyphs import manifest, published_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import build_glyphs as bg  # noqa: E402  (the builder is a repository tool, not in the package)

ASSETS = bg.ASSETS
FONTS = bg.package_font_files(bg.read_package_list(bg.FONT_PACKAGES))
needs_fonts = pytest.mark.skipif(
    len(FONTS) < 20, reason="Debian font packages not installed (apt-get install $(cat dmlnb/data/_assets/fontpkgs.txt))"
)


@pytest.fixture(scope="module")
def arrays():
    from dmlnb.data.glyphs import _arrays

    return _arrays()


# --- the committed data set --------------------------------------------------------------------
def test_committed_file_is_small_and_complete(arrays):
    assert (ASSETS / "glyphs.npz").stat().st_size <= 12 * 2**20
    images, labels, font_ids = arrays["images"], arrays["labels"], arrays["font_ids"]
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32)
    assert len(images) == len(labels) == len(font_ids)
    charset = arrays["charset"]
    assert charset == bg.CHARSET and len(charset) >= 40
    per_class = np.bincount(labels, minlength=len(charset))
    assert per_class.min() >= 150, per_class
    # distinct fonts per class, and every font id refers to a manifest row
    m = manifest()
    assert font_ids.max() < len(m) and (m.font_id.to_numpy() == np.arange(len(m))).all()
    for c in range(len(charset)):
        assert len(np.unique(font_ids[labels == c])) == per_class[c]


def test_no_duplicate_images_within_a_class(arrays):
    for c in np.unique(arrays["labels"]):
        sel = arrays["images"][arrays["labels"] == c]
        digests = {hashlib.sha1(im.tobytes()).digest() for im in sel}
        assert len(digests) == len(sel)


def test_glyphs_are_white_ink_on_black_and_not_blank(arrays):
    images = arrays["images"]
    assert (images.reshape(len(images), -1).max(axis=1) >= 64).all()
    border = np.concatenate([images[:, 0, :], images[:, -1, :]], axis=1)
    assert border.mean() < 10  # background is black; ink rarely touches the top/bottom row


def test_manifest_has_every_field_for_every_font():
    m = manifest()
    for col in ("file", "package", "family", "weight", "italic", "category", "category_source", "license"):
        assert col in m.columns
        assert (m[col].astype(str).str.len() > 0).all(), f"empty {col}"
    assert set(m.category) <= set(bg.CATEGORIES)
    assert len(set(m.category)) == len(bg.CATEGORIES)  # every style is represented
    assert m.weight.between(1, 1000).all()
    assert m.family.nunique() >= 100
    assert set(m.package) <= set(bg.read_package_list(bg.FONT_PACKAGES))


def test_published_split_is_class_disjoint_and_fixed():
    split = published_split()
    train, val, test = (set(split[k]) for k in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(bg.CHARSET)
    assert (len(test), len(val)) == (bg.N_TEST_CLASSES, bg.N_VAL_CLASSES)
    assert split == bg.class_split()  # the file is what the documented rule gives


# --- the builder -------------------------------------------------------------------------------
@needs_fonts
def test_builder_is_deterministic_byte_for_byte(tmp_path):
    fonts = FONTS[:6]
    for out in ("a", "b"):
        arrays, man, _ = bg.build(fonts)
        (tmp_path / out).mkdir()
        bg.write_npz(tmp_path / out / "g.npz", arrays)
        bg.write_manifest(tmp_path / out / "m.csv", man)
    for name in ("g.npz", "m.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@needs_fonts
def test_builder_reproduces_the_committed_images(arrays):
    m = manifest()
    checked = 0
    for pkg, path in FONTS[:40]:
        rows = m[(m.file == Path(path).name) & (m.package == pkg)]
        if len(rows) != 1:
            continue
        fid = int(rows.font_id.iloc[0])
        rendered = bg.render_font(path)
        sel = arrays["font_ids"] == fid
        np.testing.assert_array_equal(rendered[arrays["labels"][sel]], arrays["images"][sel])
        checked += 1
        if checked == 3:
            break
    assert checked == 3


@needs_fonts
def test_builder_drops_a_font_shipped_twice(tmp_path):
    pkg, path = FONTS[0]
    copy = tmp_path / ("copy" + Path(path).suffix)
    shutil.copy(path, copy)
    arrays, man, stats = bg.build([(pkg, path), (pkg, str(copy))])
    assert stats["duplicate_fonts"] == 1 and len(man) == 1
    assert len(arrays["labels"]) == len(bg.CHARSET) - stats["duplicate_images"]


@needs_fonts
def test_builder_skips_fonts_without_full_coverage(tmp_path):
    arrays, man, stats = bg.build(FONTS[:3], charset=bg.CHARSET + "\u4e2d")  # a CJK character
    assert len(man) == 0 and stats["no_coverage"] == 3 and len(arrays["labels"]) == 0


def test_style_classifier_uses_measured_widths_before_names():
    class Fake(dict):
        def getBestCmap(self):
            return {ord(c): f"g{c}" for c in bg.CHARSET}

    font = Fake(hmtx={f"g{c}": (600, 0) for c in bg.CHARSET})
    assert bg.classify_style(font) == ("mono", "hmtx.advance")


# --- the loader --------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_loader_splits(split, arrays):
    ds = load_dataset("glyphs", split)
    chars = published_split()
    expected_chars = (sorted(chars["train"] + chars["val"], key=bg.CHARSET.index)
                      if split == "trainval" else chars[split])
    assert ds.classes == expected_chars
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == set(range(len(ds.classes)))
    # metadata is aligned with the items
    assert isinstance(ds.metadata, pd.DataFrame) and len(ds.metadata) == len(ds)
    assert (ds.metadata["char"].to_numpy() == np.array(ds.classes)[ds.labels]).all()
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert ds.channels == 1 and y == ds.labels[0]
    n_expected = int(np.isin(arrays["labels"], [bg.CHARSET.index(c) for c in expected_chars]).sum())
    assert len(ds) == n_expected


def test_loader_options():
    ds = load_dataset("glyphs", "val", max_per_class=10, image_size=48, subset_seed=1)
    assert len(ds) == 10 * len(ds.classes) and ds[0][0].shape == (1, 48, 48)
    again = load_dataset("glyphs", "val", max_per_class=10, image_size=48, subset_seed=1)
    assert (ds.metadata.font_id.to_numpy() == again.metadata.font_id.to_numpy()).all()
    other = load_dataset("glyphs", "val", max_per_class=10, subset_seed=2)
    assert (ds.metadata.font_id.to_numpy() != other.metadata.font_id.to_numpy()).any()


def test_bad_name_split_or_option_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"dataset='glyph'.*'glyphs'"):
        load_dataset("glyph", "train")
    with pytest.raises(ValueError, match=r"split='tst'.*'train', 'val', 'trainval', 'test'"):
        load_dataset("glyphs", "tst")
    with pytest.raises(ValueError, match=r"'imagesize'.*image_size, max_per_class"):
        load_dataset("glyphs", "train", imagesize=3)
