"""CUB-200-2011, Cars196 (both layouts), SOP and own folders, on tiny copies of the real layouts.

The split rule is also checked at full size on synthetic index tables with the real class counts.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch.utils.data import DataLoader

from dmlnb.data import dataset_names, load_dataset
from dmlnb.data.benchmarks import (
    CARS196_CLASSES,
    STANDARD_SIZES,
    carve_val_classes,
    class_disjoint_split,
    read_cars196_index,
    read_sop_index,
)
from dmlnb.data.cli import main as cli_main
from dmlnb.data.images import CorruptImageError

SIZE = 12  # image_size used with the fixtures


def _save(path, seed, mode="RGB", size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


# --- CUB ------------------------------------------------------------------------------------------
CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross",
               100: "100.Brown_Pelican", 101: "101.White_Pelican", 150: "150.Sage_Thrasher",
               200: "200.Common_Yellowthroat"}


def make_cub(root, per_class=3):
    d = root / "CUB_200_2011"
    images, labels, i = [], [], 0
    modes = ["RGB", "L", "CMYK", "P", "RGBA"]
    for cid, name in CUB_CLASSES.items():
        for j in range(per_class):
            i += 1
            ext = "png" if modes[i % 5] in ("P", "RGBA") else "jpg"
            rel = f"{name}/{name[4:]}_{j:04d}_{i}.{ext}"
            _save(d / "images" / rel, i, modes[i % 5])
            images.append(f"{i} {rel}")
            labels.append(f"{i} {cid}")
    (d / "images.txt").write_text("\n".join(images) + "\n")
    (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (d / "classes.txt").write_text("\n".join(f"{c} {n}" for c, n in CUB_CLASSES.items()) + "\n")
    (d / "images" / "001.Black_footed_Albatross" / "._junk.jpg").write_bytes(b"\0\5\26\7")
    return d


def test_cub_splits_follow_the_class_rule(tmp_path):
    make_cub(tmp_path)
    test = load_dataset("cub200", "test", tmp_path, image_size=SIZE)
    trainval = load_dataset("cub200", "trainval", tmp_path / "CUB_200_2011", image_size=SIZE)
    assert list(test.metadata["class_id"].unique()) == [101, 150, 200]
    assert sorted(trainval.metadata["class_id"].unique()) == [1, 2, 3, 100]
    for ds in (test, trainval):
        assert ds.labels.dtype == np.int64 and ds.channels == 3
        assert set(ds.labels) == set(range(len(ds.classes)))
        # labels follow the order of the original class ids
        assert np.array_equal(ds.labels, np.unique(ds.metadata["class_id"], return_inverse=True)[1])
    assert trainval.classes[0] == "001.Black_footed_Albatross" and test.classes[-1].startswith("200.")
    val = load_dataset("cub200", "val", tmp_path, val_fraction=0.5, val_seed=1)
    train = load_dataset("cub200", "train", tmp_path, val_fraction=0.5, val_seed=1)
    v, t = set(val.metadata["class_id"]), set(train.metadata["class_id"])
    assert not v & t and v | t == {1, 2, 3, 100} and len(v) == 2
    assert len(val) + len(train) == len(trainval)


def test_cub_items_are_rgb_unnormalised_floats(tmp_path):
    make_cub(tmp_path)
    ds = load_dataset("cub200", "trainval", tmp_path, image_size=SIZE)
    for i in range(len(ds)):  # greyscale, CMYK, palette and RGBA files among them
        x, y = ds[i]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert y == ds.labels[i]
    test = load_dataset("cub200", "test", tmp_path, image_size=SIZE)
    assert torch.equal(test[0][0], test[0][0])  # test pipeline: deterministic center crop


def test_cub_options_are_validated(tmp_path):
    make_cub(tmp_path)
    with pytest.raises(ValueError, match=r"unknown options for dataset 'cub200': 'img_size'.*image_size"):
        load_dataset("cub200", "test", tmp_path, img_size=SIZE)
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("cub200", "val", tmp_path, val_fraction=1.5)
    with pytest.raises(ValueError, match="either transform= or image_size="):
        load_dataset("cub200", "test", tmp_path, transform=lambda im: im, image_size=SIZE)
    with pytest.raises(ValueError, match="split"):
        load_dataset("cub200", "everything", tmp_path)
    custom = load_dataset("cub200", "test", tmp_path, transform=lambda im: torch.zeros(3, 2, 2))
    assert custom[0][0].shape == (3, 2, 2)


def test_missing_or_incomplete_root_says_what_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cub200", "test", tmp_path)
    msg = str(info.value)
    assert "images.txt" in msg and str(tmp_path) in msg and "dmlnb data download cub200" in msg
    d = make_cub(tmp_path)
    victim = next((d / "images" / "150.Sage_Thrasher").iterdir())
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"1 of 9 .*{victim.name}.*incomplete"):
        load_dataset("cub200", "test", tmp_path)
    ds = load_dataset("cub200", "test", tmp_path, check_files=False)
    assert len(ds) == 9


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    d = make_cub(tmp_path)
    ds = load_dataset("cub200", "test", tmp_path, image_size=SIZE, augment=False)
    bad = ds.path(4)
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 3])
    with pytest.raises(CorruptImageError, match=rf"{bad.split('/')[-1]}.*item 4 of 'cub200'.*on_corrupt='skip'"):
        ds[4]
    loader = DataLoader(ds, batch_size=9, num_workers=1)
    with pytest.raises(Exception, match=bad.split("/")[-1]):  # named even from a worker process
        next(iter(loader))
    skip = load_dataset("cub200", "test", tmp_path, image_size=SIZE, augment=False, on_corrupt="skip")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        x, y = skip[4]
    assert y == skip.labels[4] and skip.n_skipped == 1 and bad in skip.skipped
    same_class = [i for i in range(len(skip)) if skip.labels[i] == y and i != 4]
    assert any(torch.equal(x, skip[i][0]) for i in same_class)  # replaced by its own class
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        skip[4]  # warned once per file
    assert [p for p, _ in skip.verify()] == [bad]
    with pytest.raises(ValueError, match="on_corrupt"):
        load_dataset("cub200", "test", d, on_corrupt="ignore")


# --- Cars196 --------------------------------------------------------------------------------------
CARS_IDS = [1, 2, 6, 98, 99, 150, 174, 196]


def make_cars_annos(root, per_class=3):
    n = len(CARS_IDS) * per_class
    dtype = [(f, "O") for f in ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2",
                                "class", "test")]
    ann = np.zeros((1, n), dtype=dtype)
    k = 0
    for cid in CARS_IDS:
        for j in range(per_class):
            rel = f"car_ims/{k + 1:06d}.jpg"
            _save(root / rel, k)
            box = [np.array([[v]], dtype=np.uint16) for v in (1, 1, 15, 12)]
            # the classification flag alternates: the DML split must ignore it
            ann[0, k] = (rel, *box, np.array([[cid]], dtype=np.uint8), np.array([[j % 2]], dtype=np.uint8))
            k += 1
    names = np.empty((1, 196), dtype=object)
    names[0, :] = list(CARS196_CLASSES)
    savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})


def test_cars_original_layout_splits_by_class_not_by_test_flag(tmp_path):
    make_cars_annos(tmp_path)
    base, table = read_cars196_index(tmp_path)
    assert set(table["test_flag"]) == {0, 1}
    train = load_dataset("cars196", "trainval", tmp_path, image_size=SIZE)
    test = load_dataset("cars196", "test", tmp_path, image_size=SIZE)
    assert sorted(set(train.metadata["class_id"])) == [1, 2, 6, 98]
    assert sorted(set(test.metadata["class_id"])) == [99, 150, 174, 196]
    assert train.classes[2] == "Acura Integra Type R 2001" and test.classes[0] == "FIAT 500 Abarth 2012"
    assert len(train) == len(test) == 12
    assert train[0][0].shape == (3, SIZE, SIZE)


def make_cars_devkit(root):
    """torchvision's StanfordCars layout: classification halves with per-part annotation files."""
    d = root / "stanford_cars"
    k = 0
    for part, mat in (("train", d / "devkit" / "cars_train_annos.mat"),
                      ("test", d / "cars_test_annos_withlabels.mat")):
        rows = []
        for cid in CARS_IDS:
            k += 1
            fname = f"{k:05d}.jpg"
            _save(d / f"cars_{part}" / fname, k)
            rows.append((cid, fname))
        ann = np.zeros((1, len(rows)), dtype=[("bbox_x1", "O"), ("class", "O"), ("fname", "O")])
        for i, (cid, fname) in enumerate(rows):
            ann[0, i] = (np.array([[1]], np.uint8), np.array([[cid]], np.uint8), fname)
        mat.parent.mkdir(parents=True, exist_ok=True)
        savemat(mat, {"annotations": ann})
    names = np.empty((1, 196), dtype=object)
    names[0, :] = list(CARS196_CLASSES)
    savemat(d / "devkit" / "cars_meta.mat", {"class_names": names})


def test_cars_torchvision_devkit_layout(tmp_path):
    make_cars_devkit(tmp_path)
    train = load_dataset("cars196", "trainval", tmp_path, image_size=SIZE)
    test = load_dataset("cars196", "test", tmp_path, image_size=SIZE, layout="devkit")
    assert sorted(set(train.metadata["class_id"])) == [1, 2, 6, 98]
    assert sorted(set(test.metadata["class_id"])) == [99, 150, 174, 196]
    assert len(train) == len(test) == 8  # both classification halves of each class
    assert set(test.metadata["test_flag"]) == {0, 1}
    assert train.classes[2] == "Acura Integra Type R 2001"
    assert test[0][0].shape == (3, SIZE, SIZE)


def make_cars_mirror(root):
    # the Kaggle "by classes folder" mirror: train/ and test/ hold the same classes
    names = {cid: CARS196_CLASSES[cid - 1].replace("/", "-") for cid in CARS_IDS}  # "Ram C-V ..."
    k = 0
    for part in ("train", "test"):
        for name in names.values():
            for _ in range(2):
                k += 1
                _save(root / "car_data" / "car_data" / part / name / f"{k:05d}.jpg", k)
        (root / "car_data" / "car_data" / part / names[1] / "._00001.jpg").write_bytes(b"junk")
        (root / "car_data" / "car_data" / part / names[1] / "notes.txt").write_text("x")
    return names


def test_cars_mirror_uses_official_ids(tmp_path):
    names = make_cars_mirror(tmp_path)
    assert names[174] == "Ram C-V Cargo Van Minivan 2012"
    train = load_dataset("cars196", "trainval", tmp_path, image_size=SIZE)
    test = load_dataset("cars196", "test", tmp_path, image_size=SIZE)
    assert sorted(set(train.metadata["class_id"])) == [1, 2, 6, 98]
    assert sorted(set(test.metadata["class_id"])) == [99, 150, 174, 196]
    assert len(train) == len(test) == 16  # train/ and test/ folders merged, junk ignored
    assert "Ram C/V Cargo Van Minivan 2012" in test.classes
    # alphabetical order is not the official one: "Acura Integra" sorts before "Acura RL"
    assert sorted(CARS196_CLASSES[:6]) != list(CARS196_CLASSES[:6])
    by_name = load_dataset("cars196", "trainval", tmp_path, class_order="name", image_size=SIZE)
    assert len(by_name.classes) == 4 and by_name.classes == sorted(names.values())[:4]


def test_cars_mirror_with_unknown_folder_names_is_refused(tmp_path):
    _save(tmp_path / "train" / "My Car 2020" / "1.jpg", 0)
    _save(tmp_path / "test" / "My Car 2020" / "2.jpg", 1)
    with pytest.raises(ValueError, match="class_order='name'"):
        load_dataset("cars196", "test", tmp_path)
    with pytest.raises(FileNotFoundError, match="cars_annos.mat.*looked in.*bring your own copy"):
        load_dataset("cars196", "test", tmp_path / "nowhere")


def test_cars_split_sizes_at_full_scale():
    # per-class image counts summing to the real split sizes; the rule alone decides the split
    rng = np.random.default_rng(0)
    counts = np.concatenate([_spread(8054, 98, rng), _spread(8131, 98, rng)])
    class_ids = rng.permutation(np.repeat(np.arange(1, 197), counts))
    rows, labels = class_disjoint_split(class_ids, range(1, 99), "trainval")
    assert len(rows) == 8054 and labels.max() == 97
    rows, labels = class_disjoint_split(class_ids, range(1, 99), "test")
    assert len(rows) == 8131 and labels.min() == 0 and labels.max() == 97
    assert (class_ids[rows] >= 99).all()


def _spread(total, n, rng):
    counts = np.full(n, total // n)
    counts[rng.choice(n, total - counts.sum(), replace=False)] += 1
    return counts


def test_cub_split_sizes_at_full_scale():
    rng = np.random.default_rng(1)
    counts = np.concatenate([_spread(5864, 100, rng), _spread(5924, 100, rng)])
    class_ids = np.repeat(np.arange(1, 201), counts)
    sizes = {s: len(class_disjoint_split(class_ids, range(1, 101), s)[0]) for s in
             ("train", "val", "trainval", "test")}
    assert sizes["trainval"] == 5864 and sizes["test"] == 5924
    assert sizes["train"] + sizes["val"] == 5864
    assert len(carve_val_classes(range(1, 101))) == 20  # default val_fraction 0.2


def test_val_classes_are_seeded_and_bounded():
    a = carve_val_classes(range(100), 0.2, 0)
    assert np.array_equal(a, carve_val_classes(range(100), 0.2, 0))
    assert not np.array_equal(a, carve_val_classes(range(100), 0.2, 1))
    assert len(carve_val_classes(range(3), 0.01, 0)) == 1  # at least one class
    assert len(carve_val_classes(range(3), 0.99, 0)) == 2  # at least one training class left
    assert len(carve_val_classes(range(3), 0.0, 0)) == 0
    with pytest.raises(ValueError, match="val_fraction=0"):
        class_disjoint_split(np.arange(4), [0, 1], "val", val_fraction=0.0)


# --- SOP ------------------------------------------------------------------------------------------
def _write_ebay(path, rows):
    lines = ["image_id class_id super_class_id path"] + [" ".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def make_sop(root):
    d = root / "Stanford_Online_Products"
    rows = {"train": [], "test": []}
    k = 0
    for part, classes in (("train", [1, 2, 3, 4]), ("test", [11319, 11320, 11321])):
        for cid in classes:
            folder = "bicycle_final" if cid % 2 else "chair_final"
            for j in range(2 + cid % 2):
                k += 1
                rel = f"{folder}/{cid}_{j}.JPG"
                _save_jpg(d / rel, k)
                rows[part].append((k, cid, 1 if folder.startswith("b") else 3, rel))
        _write_ebay(d / f"Ebay_{part}.txt", rows[part])
    return d


def _save_jpg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (14, 18, 3), dtype=np.uint8)).save(path, format="JPEG")


def test_sop_tiny_copy(tmp_path):
    make_sop(tmp_path)
    train = load_dataset("sop", "trainval", tmp_path, image_size=SIZE)
    test = load_dataset("sop", "test", tmp_path, image_size=SIZE)
    assert sorted(set(train.metadata["class_id"])) == [1, 2, 3, 4]
    assert sorted(set(test.metadata["class_id"])) == [11319, 11320, 11321]
    assert len(train) == 10 and len(test) == 8
    assert set(train.labels) == {0, 1, 2, 3} and set(test.labels) == {0, 1, 2}
    assert {"super_class_id", "image_id", "part"} <= set(test.metadata.columns)
    x, y = test[0]
    assert x.shape == (3, SIZE, SIZE)


def test_sop_full_size_index_lists_in_seconds_without_images(tmp_path):
    d = tmp_path / "Stanford_Online_Products"
    d.mkdir()
    rng = np.random.default_rng(0)
    for part, (n_cls, n_img, first) in {"train": (11318, 59551, 1), "test": (11316, 60502, 11319)}.items():
        counts = np.full(n_cls, 2)  # every SOP class has at least 2 images
        extra = rng.multinomial(n_img - 2 * n_cls, np.full(n_cls, 1 / n_cls))
        cids = np.repeat(np.arange(first, first + n_cls), counts + extra)
        ids = np.arange(1, len(cids) + 1)
        supers = cids % 12 + 1
        lines = ["image_id class_id super_class_id path"] + [
            f"{i} {c} {s} cat{s}_final/{c}_{i}.JPG" for i, c, s in zip(ids, cids, supers, strict=True)]
        (d / f"Ebay_{part}.txt").write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    counts = {s: load_dataset("sop", s, tmp_path, check_files=False) for s in ("trainval", "test")}
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"listing SOP's index twice took {elapsed:.1f} s"
    assert (len(counts["trainval"].classes), len(counts["trainval"])) == STANDARD_SIZES["sop"][:2]
    assert (len(counts["test"].classes), len(counts["test"])) == STANDARD_SIZES["sop"][2:]
    assert counts["test"].labels.max() == 11315
    _, table = read_sop_index(tmp_path)
    train_classes = table.loc[table["part"] == "train", "class_id"].unique()
    val_rows, val_labels = class_disjoint_split(table["class_id"].to_numpy(), train_classes, "val")
    train_rows, _ = class_disjoint_split(table["class_id"].to_numpy(), train_classes, "train")
    assert len(val_rows) + len(train_rows) == 59551 and not set(val_rows) & set(train_rows)
    assert val_labels.max() + 1 == round(0.2 * 11318)
    with pytest.raises(FileNotFoundError, match="60502 images listed"):
        load_dataset("sop", "test", tmp_path)


def test_sop_refuses_overlapping_class_ids(tmp_path):
    d = tmp_path
    _write_ebay(d / "Ebay_train.txt", [(1, 1, 1, "a/1.JPG")])
    _write_ebay(d / "Ebay_test.txt", [(2, 1, 1, "a/2.JPG")])
    with pytest.raises(ValueError, match="class-disjoint"):
        read_sop_index(d)


# --- own folders ----------------------------------------------------------------------------------
def test_folder_layout(tmp_path):
    for k, name in enumerate(["dog", "cat", "emu", "ant"]):
        for j in range(2 + k):
            _save(tmp_path / name / f"{j}.png", 10 * k + j, "L")
    (tmp_path / "cat" / "._0.png").write_bytes(b"junk")
    (tmp_path / "cat" / "README.md").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / ".git").mkdir()
    train = load_dataset("folder", "trainval", tmp_path, image_size=SIZE)
    test = load_dataset("folder", "test", tmp_path, image_size=SIZE)
    assert train.classes == ["ant", "cat"] and test.classes == ["dog", "emu"]
    assert len(train) == 5 + 3 and len(test) == 2 + 4
    assert train[0][0].shape == (3, SIZE, SIZE)  # greyscale files served as RGB
    shuffled = load_dataset("folder", "test", tmp_path, split_seed=3, train_fraction=0.25)
    assert len(shuffled.classes) == 3
    with pytest.raises(FileNotFoundError, match="at least two class folders"):
        load_dataset("folder", "test", tmp_path / "ant")


# --- registry and CLI -----------------------------------------------------------------------------
def test_registered_and_need_a_root():
    assert {"cub200", "cars196", "sop", "folder"} <= set(dataset_names())
    with pytest.raises(ValueError, match="needs root="):
        load_dataset("cub200", "test")


def test_cli_info_counts_splits(tmp_path, capsys):
    make_cub(tmp_path)
    assert cli_main(["data", "info", "cub200", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test" in out and "3 classes" in out and "9 images" in out and "standard: 100 classes" in out
    assert cli_main(["data", "info", "cub200", "--root", str(tmp_path / "none")]) == 1
    assert "looked in" in capsys.readouterr().err
