"""Robust image reading: every mode becomes RGB, junk files are ignored, corrupt files are named."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from dmlnb.data.images import (
    CorruptImageError,
    find_corrupt_images,
    is_image_file,
    list_image_files,
    read_image,
    to_rgb,
)


def _colour_image(size=(9, 7)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "P", "RGBA", "LA", "I", "I;16", "F", "YCbCr"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    img = _colour_image().convert(mode) if mode not in ("I;16", "F", "I") else _colour_image().convert("L").convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    ext = ".tif" if mode in ("I;16", "F", "I", "CMYK") else ".png"
    if mode in ("YCbCr",):
        ext = ".jpg"
    path = tmp_path / f"x{ext}"
    img.save(path)
    back = read_image(path)
    assert back.mode == "RGB" and back.size == img.size


def test_greyscale_values_are_replicated():
    grey = Image.fromarray(np.arange(63, dtype=np.uint8).reshape(7, 9))
    out = np.asarray(to_rgb(grey))
    assert np.array_equal(out[..., 0], np.asarray(grey))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    out = np.asarray(to_rgb(img))[..., 0]
    assert out.tolist() == [[0, 100, 255]]


def test_alpha_is_composited_on_the_background():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (10, 20, 30, 0)  # fully transparent: must become the background
    rgba[1, 0] = (0, 0, 0, 128)  # half: blend with white
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 0])
    black = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"), background=(0, 0, 0)))
    assert tuple(black[0, 1]) == (0, 0, 0)


def test_palette_with_transparency_index(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putdata([0, 1, 0])
    pal.info["transparency"] = 1
    pal.save(tmp_path / "p.png", transparency=1)
    out = np.asarray(read_image(tmp_path / "p.png"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    _colour_image().convert("CMYK").save(tmp_path / "c.jpg")
    out = read_image(tmp_path / "c.jpg")
    assert out.mode == "RGB"
    # close to the RGB it came from (lossy JPEG; CMYK round trip through Pillow)
    ref = np.asarray(_colour_image().convert("CMYK").convert("RGB"), dtype=float)
    assert np.abs(np.asarray(out, dtype=float) - ref).mean() < 40


def test_junk_files_are_not_images(tmp_path):
    for name in ("a.jpg", "B.JPEG", "._a.jpg", ".hidden.png", "notes.txt", "c.png", "Thumbs.db"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    assert list_image_files(tmp_path) == ["B.JPEG", "a.jpg", "c.png"]
    assert not is_image_file("dir/._x.png") and is_image_file("dir/x.webp")


def test_truncated_and_garbage_files_name_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    _colour_image((64, 64)).save(good, quality=95)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    for bad in (trunc, garbage, tmp_path / "missing.jpg"):
        with pytest.raises(CorruptImageError, match=bad.name) as info:
            read_image(bad)
        assert info.value.path == str(bad)
    found = find_corrupt_images([good, trunc, garbage])
    assert [p for p, _ in found] == [str(trunc), str(garbage)]


def test_error_survives_pickling_from_a_worker():
    err = CorruptImageError("/x/y.jpg", "truncated")
    back = pickle.loads(pickle.dumps(err))
    assert back.path == "/x/y.jpg" and "y.jpg" in str(back)
