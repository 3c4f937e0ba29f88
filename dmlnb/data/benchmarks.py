"""The real DML benchmarks on disk: CUB-200-2011, Cars196, Stanford Online Products, own folders.

Each loader reads **index files only** (no image is opened while listing; SOP's 120k-line index
lists in well under a second) and returns an :class:`ImageListDataset` that opens one image per
``__getitem__`` (RGB, see :mod:`dmlnb.data.images`) and applies a PIL transform
(:func:`dmlnb.data.preprocess.build_transform`).

Standard class-disjoint splits (docs/conventions.md, "Datasets")
-----------------------------------------------------------
=========  =============================================  ==============================================
dataset    training classes                               test classes
=========  =============================================  ==============================================
cub200     1-100 (5,864 images)                           101-200 (5,924)
cars196    1-98 (8,054)                                   99-196 (8,131)
sop        ``Ebay_train.txt``: 11,318 classes (59,551)    ``Ebay_test.txt``: 11,316 classes (60,502)
folder     first half of the class folders by name        second half
=========  =============================================  ==============================================

Cars196 is split **by class id** (1-98 / 99-196), never by the annotation's ``test`` flag (that is
the classification split, in which every class is on both sides).

Splits: ``test`` = the test classes; ``trainval`` = all training classes; ``val`` = a class-disjoint
part of the training classes, ``round(val_fraction * n_train_classes)`` classes (at least one)
chosen by ``numpy.random.default_rng(val_seed)``; ``train`` = the other training classes. Labels are
contiguous ``0 .. C-1`` within a split, in the order of the original class ids.

Layouts (``root`` may be the folder shown or its parent)
-------------------------------------------------------
- cub200: ``CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, images/NNN.Name/*.jpg}``
- cars196, original: ``cars_annos.mat`` + ``car_ims/NNNNNN.jpg`` (the ``annotations`` struct with
  ``relative_im_path``, ``class``, ``test``; ``class_names``).
- cars196, torchvision's ``StanfordCars`` layout (``stanford_cars/``): ``devkit/cars_train_annos.mat``,
  ``devkit/cars_meta.mat``, ``cars_test_annos_withlabels.mat``, ``cars_train/``, ``cars_test/``
  (the classification halves, merged before the class split).
- cars196, class-per-folder mirror: ``{train,test}/<class name>/*.jpg`` (also under ``car_data/`` or
  ``car_data/car_data/``, the Kaggle "Stanford Car Dataset by classes folder" mirrors), or all class
  folders in one folder (``images/<class name>/``). Train and test folders of a class are merged
  (they are the classification split). Class ids are the **official** ones, found by matching the
  folder names (case, spaces and punctuation ignored, e.g. ``Ram C-V Cargo Van Minivan 2012``) with
  the official class list (:data:`CARS196_CLASSES`, the ``class_names`` order of ``cars_annos.mat``),
  so the 98/98 split is the standard one. Alphabetical order is *not* the official order (class 6 is
  "Acura Integra Type R 2001"); ``class_order="name"`` sorts folders by name and splits them in
  halves instead (a non-standard split, for mirrors with renamed folders).
- sop: ``Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <category>_final/*.JPG}``.
- folder: ``root/<class name>/<image files>`` (images directly inside each class folder).
  ``._*``, hidden and non-image files are ignored, and so are class folders without images.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from dmlnb._validate import check_choice, check_positive_int, check_range
from dmlnb.data.assets import ASSETS
from dmlnb.data.images import (
    CorruptImageError,
    check_on_corrupt,
    find_corrupt_images,
    list_image_files,
    read_image,
)
from dmlnb.data.preprocess import build_transform, resize_for
from dmlnb.data.registry import register
from dmlnb.data.tensor import check_options
from dmlnb.defaults import CROP, FOLDER_TRAIN_FRACTION, SPLITS, VAL_FRACTION, VAL_SEED

#: The standard splits' sizes: (training classes, training images, test classes, test images).
STANDARD_SIZES = {
    "cub200": (100, 5864, 100, 5924),
    "cars196": (98, 8054, 98, 8131),
    "sop": (11318, 59551, 11316, 60502),
}

#: How to obtain each data set (used in error messages and by ``dmlnb data download``).
HOW_TO_GET = {
    "cub200": (
        "download it with `dmlnb data download cub200 --root DIR` (or "
        "dmlnb.data.download.download('cub200', DIR)), or get CUB_200_2011.tgz from "
        "https://data.caltech.edu/records/65de6-vp158 and extract it into DIR"
    ),
    "cars196": (
        "the original Stanford links are dead; bring your own copy and put it under DIR as either "
        "DIR/cars_annos.mat + DIR/car_ims/000001.jpg ... (the original release, car_ims.tgz + "
        "cars_annos.mat), torchvision's StanfordCars layout DIR/stanford_cars/{devkit/, cars_train/, "
        "cars_test/, cars_test_annos_withlabels.mat}, or a class-per-folder mirror DIR/{train,test}/<class name>/*.jpg (e.g. "
        "Kaggle's 'Stanford Car Dataset by classes folder', also accepted under DIR/car_data/ or "
        "DIR/car_data/car_data/)"
    ),
    "sop": (
        "get Stanford_Online_Products.zip (Stanford CVGL, Song et al. 2016; mirrors exist on "
        "academic torrents and Kaggle) and extract it so that "
        "DIR/Stanford_Online_Products/Ebay_train.txt, Ebay_test.txt and the *_final/ image folders exist"
    ),
    "folder": (
        "your own images, nothing to download: put one sub-folder per class with its images "
        "directly inside, DIR/<class name>/*.jpg, and pass root=DIR"
    ),
}

#: Cars196 class names in official order (class id = position + 1), as in the ``class_names`` field
#: of ``cars_annos.mat`` / ``devkit/cars_meta.mat`` (Krause et al. 2013); kept in the asset file
#: ``_assets/cars196_classes.txt``, one name a line.
CARS196_CLASSES: tuple[str, ...] = tuple(
    (ASSETS / "cars196_classes.txt").read_text(encoding="utf-8").splitlines())

_COMMON_OPTIONS = (
    "transform",
    "image_size",
    "resize",
    "augment",
    "val_fraction",
    "val_seed",
    "on_corrupt",
    "check_files",
)


# --- the dataset ----------------------------------------------------------------------------------
class ImageListDataset(Dataset):
    """Images listed by path, opened lazily: items ``(image float [3, H, W] in [0, 1], label)``.

    Parameters
    ----------
    base : path
        Folder the ``paths`` are relative to.
    paths : sequence of str
        One relative path per item.
    labels : int array, contiguous ``0 .. len(classes) - 1``
    classes : class names, ``classes[label]``
    transform : callable ``PIL.Image (RGB) -> float tensor``
    metadata : pandas.DataFrame, optional
        One row per item (``path``, ``class_id`` (original id), ``class_name``, ...).
    on_corrupt : {"raise", "skip"}, default "raise"
        ``"raise"``: an unreadable image raises :class:`~dmlnb.data.images.CorruptImageError`
        naming the file. ``"skip"``: it is replaced by the next readable image of the **same class**
        (index order, cyclic; class balance of the sampler is kept), with a warning once per file;
        ``skipped`` maps each skipped path to the reason (per process: DataLoader workers keep
        their own count). :meth:`verify` finds every unreadable file up front.
    name : str
        The registry name (messages, run records).
    """

    channels = 3
    #: side of the served images when the default pipeline is used (None with a custom transform)
    image_size: int | None = None

    def __init__(
        self,
        base: str | os.PathLike,
        paths: Sequence[str],
        labels: np.ndarray,
        classes: Sequence[str],
        *,
        transform: Callable[[Any], torch.Tensor],
        metadata: pd.DataFrame | None = None,
        on_corrupt: str = "raise",
        name: str = "images",
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(paths),):
            raise ValueError(f"labels has shape {labels.shape}, expected ({len(paths)},)")
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError("labels must lie in 0 .. len(classes) - 1")
        self.base = str(base)
        # a numpy string array, not a list of str: no per-item refcounts touched in workers
        self.paths = np.asarray(paths, dtype=str)
        self.labels = labels
        self.classes = list(classes)
        self.transform = transform
        self.metadata = metadata
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self.name = name
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return int(self.labels.size)

    def path(self, index: int) -> str:
        """Absolute path of item ``index``."""
        return os.path.join(self.base, str(self.paths[index]))

    def _read(self, index: int):
        return read_image(self.path(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[index])
        try:
            image = self._read(index)
        except CorruptImageError as err:
            if self.on_corrupt == "raise":
                raise CorruptImageError(err.path, f"{err.reason} (item {index} of {self.name!r}; "
                                        "pass on_corrupt='skip' to skip such files)") from err
            image = self._substitute(index, err)
        return self.transform(image), label

    def _substitute(self, index: int, err: CorruptImageError):
        self._note_skip(err)
        same = np.flatnonzero(self.labels == self.labels[index])
        pos = int(np.searchsorted(same, index))
        for j in np.roll(same, -pos)[1:]:
            try:
                return self._read(int(j))
            except CorruptImageError as other:
                self._note_skip(other)
        raise CorruptImageError(err.path, f"{err.reason}; and no image of class "
                                f"{self.classes[self.labels[index]]!r} is readable")

    def _note_skip(self, err: CorruptImageError) -> None:
        if err.path not in self.skipped:
            self.skipped[err.path] = err.reason
            warnings.warn(f"skipping unreadable image {err.path!r} ({err.reason}); "
                          f"{len(self.skipped)} skipped so far", RuntimeWarning, stacklevel=3)

    @property
    def n_skipped(self) -> int:
        """Unreadable files skipped so far in this process."""
        return len(self.skipped)

    def verify(self) -> list[tuple[str, str]]:
        """Decode every image once; return ``(path, reason)`` for each unreadable one (slow)."""
        return find_corrupt_images(self.path(i) for i in range(len(self)))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
                f"classes={len(self.classes)}, base={self.base!r})")


# --- the split rule -------------------------------------------------------------------------------
def carve_val_classes(
    train_classes: Iterable[int], val_fraction: float = VAL_FRACTION, val_seed: int = VAL_SEED
) -> np.ndarray:
    """The validation classes carved from ``train_classes`` (sorted).

    ``n_val = round(val_fraction * n_train)``, at least 1 and at most ``n_train - 1`` when
    ``val_fraction > 0``; drawn without replacement by ``numpy.random.default_rng(val_seed)``
    from the sorted training classes. ``val_fraction = 0`` gives no validation classes.
    """
    classes = np.unique(np.asarray(list(train_classes), dtype=np.int64))
    check_range("val_fraction", val_fraction, 0.0, 1.0, high_inclusive=False)
    if isinstance(val_seed, bool) or not isinstance(val_seed, (int, np.integer)):
        raise TypeError(f"val_seed must be an integer, got {val_seed!r}")
    if val_fraction == 0:
        return classes[:0]
    if len(classes) < 2:
        raise ValueError(f"cannot carve a validation split from {len(classes)} training class(es)")
    n_val = min(max(1, int(round(val_fraction * len(classes)))), len(classes) - 1)
    rng = np.random.default_rng(val_seed)
    return np.sort(rng.choice(classes, size=n_val, replace=False))


def class_disjoint_split(
    class_ids: np.ndarray,
    train_classes: Iterable[int],
    split: str,
    *,
    val_fraction: float = VAL_FRACTION,
    val_seed: int = VAL_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels of ``split`` under the class-disjoint rule (module docstring).

    Parameters
    ----------
    class_ids : int array (N,)
        Original class id of every row of the index.
    train_classes : iterable of int
        The training classes (every other class id present is a test class).
    split : {"train", "val", "trainval", "test"}

    Returns
    -------
    rows : int array
        Indices of the rows in the split (increasing).
    labels : int array
        Their labels, contiguous ``0 .. C-1`` in the order of the original class ids.
    """
    check_choice("split", split, SPLITS)
    class_ids = np.asarray(class_ids, dtype=np.int64)
    train = np.unique(np.asarray(list(train_classes), dtype=np.int64))
    is_train = np.isin(class_ids, train)
    if split == "test":
        keep = ~is_train
    else:
        present = np.unique(class_ids[is_train])
        if split == "trainval":
            keep = is_train
        else:
            val = carve_val_classes(present, val_fraction, val_seed)
            if split == "val" and val.size == 0:
                raise ValueError("split='val' is empty with val_fraction=0; use a positive val_fraction")
            in_val = np.isin(class_ids, val)
            keep = in_val if split == "val" else is_train & ~in_val
    rows = np.flatnonzero(keep)
    _, labels = np.unique(class_ids[rows], return_inverse=True)
    return rows, labels.astype(np.int64)


# --- helpers --------------------------------------------------------------------------------------
def _missing(name: str, expected: str, looked: Sequence[Path]) -> FileNotFoundError:
    where = ", ".join(str(p) for p in looked)
    return FileNotFoundError(
        f"{name}: expected {expected}; looked in {where}. How to get it: {HOW_TO_GET[name]}"
    )


def _candidates(root: str | os.PathLike, subdirs: Sequence[str]) -> list[Path]:
    root = Path(root).expanduser()
    return [root / s if s else root for s in subdirs]


def check_files_exist(base: str | os.PathLike, paths: Sequence[str], name: str) -> None:
    """Raise FileNotFoundError if listed files are missing (one directory listing per folder)."""
    base = Path(base)
    present: dict[str, set[str]] = {}
    missing = []
    for p in paths:
        folder, file = os.path.split(p)
        if folder not in present:
            try:
                present[folder] = set(os.listdir(base / folder))
            except OSError:
                present[folder] = set()
        if file not in present[folder]:
            missing.append(p)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{name}: {len(missing)} of {len(paths)} images listed in the index are missing under "
            f"{base} (e.g. {shown}); the copy is incomplete. How to get it: {HOW_TO_GET.get(name, '')}"
            " (or pass check_files=False to load it anyway)"
        )


def _resolve_transform(split: str, options: dict[str, Any]) -> Callable:
    transform = options.get("transform")
    sizing = [k for k in ("image_size", "resize", "augment") if options.get(k) is not None]
    if transform is not None:
        if sizing:
            raise ValueError(f"give either transform= or {', '.join(sizing)}=, not both "
                             "(a transform fixes its own sizes and augmentation)")
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        return transform
    crop = options.get("image_size")
    crop = CROP if crop is None else check_positive_int("image_size", crop)
    resize = options.get("resize")
    resize = resize_for(crop) if resize is None else check_positive_int("resize", resize)
    augment = options.get("augment")
    if augment is None:
        augment = split in ("train", "trainval")
    elif not isinstance(augment, bool):
        raise TypeError(f"augment must be a bool or None, got {augment!r}")
    return build_transform(augment, resize=resize, crop=crop)


def _build(
    name: str,
    split: str,
    base: Path,
    table: pd.DataFrame,
    train_classes: Iterable[int],
    options: dict[str, Any],
) -> ImageListDataset:
    rows, labels = class_disjoint_split(
        table["class_id"].to_numpy(),
        train_classes,
        split,
        val_fraction=options.get("val_fraction", VAL_FRACTION),
        val_seed=options.get("val_seed", VAL_SEED),
    )
    meta = table.iloc[rows].reset_index(drop=True)
    if options.get("check_files", True):
        check_files_exist(base, meta["path"].tolist(), name)
    first = meta.drop_duplicates("class_id").sort_values("class_id")
    classes = [str(c) for c in first["class_name"]]
    dataset = ImageListDataset(
        base,
        meta["path"].to_numpy(),
        labels,
        classes,
        transform=_resolve_transform(split, options),
        metadata=meta,
        on_corrupt=options.get("on_corrupt", "raise"),
        name=name,
    )
    if options.get("transform") is None:
        dataset.image_size = options.get("image_size") or CROP
    return dataset


def _read_table(path: Path, names: Sequence[str], *, header: bool = False) -> pd.DataFrame:
    return pd.read_csv(path, sep=r"\s+", header=0 if header else None, names=None if header else names,
                       engine="c", dtype=str if not header else None, keep_default_na=False)


# --- CUB-200-2011 ---------------------------------------------------------------------------------
def read_cub200_index(root: str | os.PathLike) -> tuple[Path, pd.DataFrame]:
    """``(image folder, table)`` of CUB-200-2011 from its index files (no image opened).

    ``table`` has one row per image: ``image_id, path, class_id (1..200), class_name``.
    """
    looked = _candidates(root, ("", "CUB_200_2011"))
    for d in looked:
        if (d / "images.txt").is_file() and (d / "image_class_labels.txt").is_file():
            break
    else:
        raise _missing("cub200", "CUB_200_2011/images.txt, image_class_labels.txt and images/",
                       looked)
    if not (d / "images").is_dir():
        raise _missing("cub200", f"the image folder {d / 'images'}", [d])
    images = _read_table(d / "images.txt", ("image_id", "path"))
    labels = _read_table(d / "image_class_labels.txt", ("image_id", "class_id"))
    table = images.merge(labels, on="image_id", how="inner", validate="one_to_one")
    if len(table) != len(images):
        raise ValueError(f"cub200: {d / 'image_class_labels.txt'} does not label every image of images.txt")
    table["image_id"] = table["image_id"].astype(np.int64)
    table["class_id"] = table["class_id"].astype(np.int64)
    if (d / "classes.txt").is_file():
        names = _read_table(d / "classes.txt", ("class_id", "class_name"))
        mapping = dict(zip(names["class_id"].astype(np.int64), names["class_name"], strict=True))
    else:  # the class folder name, "001.Black_footed_Albatross"
        mapping = dict(zip(table["class_id"], table["path"].str.split("/").str[0], strict=True))
    table["class_name"] = table["class_id"].map(mapping).astype(str)
    return d / "images", table[["image_id", "path", "class_id", "class_name"]]


def load_cub200(split: str, root: str | os.PathLike, **options: Any) -> ImageListDataset:
    """CUB-200-2011: classes 1-100 train (5,864 images), 101-200 test (5,924).

    Options (all loaders)
    ---------------------
    transform : callable PIL -> tensor, optional
        Replaces the default pipeline (then give none of image_size, resize, augment).
    image_size : int, default 224
        Crop size of the default pipeline (:func:`~dmlnb.data.preprocess.build_transform`).
    resize : int, default ``round(image_size * 256 / 224)``
    augment : bool, default True for train/trainval, False for val/test
        Train pipeline (random crop + flip) or test pipeline (center crop).
    val_fraction : float, default 0.2; val_seed : int, default 0
        Validation classes carved from the training classes (module docstring).
    on_corrupt : {"raise", "skip"}, default "raise"
    check_files : bool, default True
        Check that every listed file exists (directory listings; no image is opened).
    """
    check_options(options, _COMMON_OPTIONS, "cub200")
    base, table = read_cub200_index(root)
    return _build("cub200", split, base, table, range(1, 101), options)


# --- Cars196 --------------------------------------------------------------------------------------
def _norm_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _mat_strings(values: Any) -> list[str]:
    return [str(np.squeeze(v)) for v in np.atleast_1d(values).ravel()]


def _read_cars_annos(d: Path) -> pd.DataFrame:
    from scipy.io import loadmat

    mat = loadmat(d / "cars_annos.mat", squeeze_me=True, struct_as_record=True)
    ann = np.atleast_1d(mat["annotations"]).ravel()
    fields = ann.dtype.names or ()
    for f in ("relative_im_path", "class"):
        if f not in fields:
            raise ValueError(f"cars196: {d / 'cars_annos.mat'} has no field {f!r} in 'annotations' "
                             f"(found {', '.join(fields)}); is it the original cars_annos.mat?")
    table = pd.DataFrame({
        "path": _mat_strings(ann["relative_im_path"]),
        "class_id": np.array([int(np.squeeze(c)) for c in ann["class"]], dtype=np.int64),
    })
    if "test" in fields:
        table["test_flag"] = np.array([int(np.squeeze(t)) for t in ann["test"]], dtype=np.int64)
    names = _mat_strings(mat["class_names"]) if "class_names" in mat else list(CARS196_CLASSES)
    table["class_name"] = [names[c - 1] if 0 < c <= len(names) else str(c) for c in table["class_id"]]
    return table


def _read_cars_devkit(d: Path) -> pd.DataFrame:
    """torchvision's ``StanfordCars`` layout: per-part annotation files with ``fname`` and ``class``."""
    from scipy.io import loadmat

    test_annos = [d / "cars_test_annos_withlabels.mat", d / "devkit" / "cars_test_annos_withlabels.mat"]
    test_path = next((p for p in test_annos if p.is_file()), None)
    if test_path is None or not (d / "cars_train").is_dir() or not (d / "cars_test").is_dir():
        raise _missing("cars196", "cars_test_annos_withlabels.mat (with class labels; the devkit's "
                       "cars_test_annos.mat has none), cars_train/ and cars_test/ next to devkit/", [d])
    parts = []
    for flag, (mat_path, folder) in enumerate(
        [(d / "devkit" / "cars_train_annos.mat", "cars_train"), (test_path, "cars_test")]
    ):
        ann = np.atleast_1d(loadmat(mat_path, squeeze_me=True)["annotations"]).ravel()
        if "class" not in (ann.dtype.names or ()):
            raise ValueError(f"cars196: {mat_path} has no 'class' field (unlabelled test annotations?)")
        parts.append(pd.DataFrame({
            "path": [f"{folder}/{name}" for name in _mat_strings(ann["fname"])],
            "class_id": np.array([int(np.squeeze(c)) for c in ann["class"]], dtype=np.int64),
            "test_flag": flag,
        }))
    table = pd.concat(parts, ignore_index=True)
    meta = d / "devkit" / "cars_meta.mat"
    names = _mat_strings(loadmat(meta, squeeze_me=True)["class_names"]) if meta.is_file() else None
    names = names or list(CARS196_CLASSES)
    table["class_name"] = [names[c - 1] if 0 < c <= len(names) else str(c) for c in table["class_id"]]
    return table


def _cars_mirror_folders(root: Path) -> tuple[list[Path], list[Path]] | None:
    """``(looked, class folders)`` of a class-per-folder mirror under ``root``, or None."""
    looked = []
    for d in _candidates(root, ("", "car_data", "car_data/car_data", "images")):
        looked.append(d)
        if (d / "train").is_dir() and (d / "test").is_dir():
            parents = [d / "train", d / "test"]
        elif d.name == "images" and d.is_dir():
            parents = [d]
        else:
            continue
        folders = [Path(e.path) for p in parents for e in os.scandir(p)
                   if e.is_dir() and not e.name.startswith(".")]
        if folders:
            return looked, folders
    return None


def read_cars196_index(
    root: str | os.PathLike, *, layout: str = "auto", class_order: str = "official"
) -> tuple[Path, pd.DataFrame]:
    """``(base folder, table)`` of Cars196 in either layout (module docstring); no image opened.

    ``table``: ``path`` (relative to the base), ``class_id`` (official 1..196), ``class_name``,
    and ``test_flag`` (the classification split, original layout only, unused by the DML split).
    """
    check_choice("layout", layout, ("auto", "annos", "devkit", "folders"))
    check_choice("class_order", class_order, ("official", "name"))
    root = Path(root).expanduser()
    looked = _candidates(root, ("", "cars196", "stanford_cars"))
    if layout in ("auto", "annos"):
        for d in looked:
            if (d / "cars_annos.mat").is_file():
                if not (d / "car_ims").is_dir():
                    raise _missing("cars196", f"the image folder {d / 'car_ims'} next to cars_annos.mat", [d])
                return d, _read_cars_annos(d)
        if layout == "annos":
            raise _missing("cars196", "cars_annos.mat and car_ims/", looked)
    if layout in ("auto", "devkit"):
        for d in looked:
            if (d / "devkit" / "cars_train_annos.mat").is_file():
                return d, _read_cars_devkit(d)
        if layout == "devkit":
            raise _missing("cars196", "devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, "
                           "cars_train/ and cars_test/", looked)
    found = None
    for d in looked:
        found = _cars_mirror_folders(d)
        if found:
            break
    if not found:
        raise _missing("cars196", "cars_annos.mat + car_ims/, or {train,test}/<class name>/*.jpg",
                       looked)
    _, folders = found
    base = Path(os.path.commonpath([str(f.parent) for f in folders]))
    names = sorted({f.name for f in folders})
    if class_order == "official":
        official = {_norm_name(n): i + 1 for i, n in enumerate(CARS196_CLASSES)}
        unknown = [n for n in names if _norm_name(n) not in official]
        if unknown:
            raise ValueError(
                f"cars196: {len(unknown)} class folder(s) under {base} do not match an official "
                f"Cars196 class name (e.g. {', '.join(map(repr, unknown[:3]))}); rename them, or pass "
                "class_order='name' for a name-sorted 50/50 class split (not the standard split)"
            )
        ids = {n: official[_norm_name(n)] for n in names}
    else:
        ids = {n: i + 1 for i, n in enumerate(names)}
    rows = []
    for f in sorted(folders):
        rel = f.relative_to(base)
        for file in list_image_files(f):
            rows.append((str(rel / file), ids[f.name], f.name))
    table = pd.DataFrame(rows, columns=["path", "class_id", "class_name"])
    table["class_id"] = table["class_id"].astype(np.int64)
    if class_order == "official":
        table["class_name"] = [CARS196_CLASSES[c - 1] for c in table["class_id"]]
    return base, table


def load_cars196(split: str, root: str | os.PathLike, **options: Any) -> ImageListDataset:
    """Cars196: classes 1-98 train (8,054 images), 99-196 test (8,131), by class id.

    Options: those of :func:`load_cub200`, plus ``layout`` (``"auto"``, ``"annos"``,
    ``"devkit"``, ``"folders"``; auto tries them in that order) and ``class_order`` (``"official"``, ``"name"``; mirror layout only, module
    docstring). With ``class_order="name"`` the first ``ceil(C/2)`` folders by name are training.
    """
    check_options(options, (*_COMMON_OPTIONS, "layout", "class_order"), "cars196")
    class_order = options.pop("class_order", "official")
    base, table = read_cars196_index(root, layout=options.pop("layout", "auto"),
                                     class_order=class_order)
    if (table["class_id"] < 1).any() or table["class_id"].max() > len(CARS196_CLASSES):
        raise ValueError(f"cars196: class ids must lie in 1..{len(CARS196_CLASSES)}")
    if class_order == "name" and "test_flag" not in table:
        n_train = -(-table["class_id"].nunique() // 2)
    else:
        n_train = len(CARS196_CLASSES) // 2  # 98: classes 1-98 train, 99-196 test
    train = range(1, n_train + 1)
    return _build("cars196", split, base, table, train, options)


# --- Stanford Online Products ---------------------------------------------------------------------
def read_sop_index(root: str | os.PathLike) -> tuple[Path, pd.DataFrame]:
    """``(base folder, table)`` of SOP from ``Ebay_train.txt`` and ``Ebay_test.txt``.

    ``table``: ``image_id, class_id, super_class_id, path, part`` (``"train"``/``"test"``, the file
    the row comes from), ``class_name`` (``"<super class folder>/<class_id>"``). No image opened.
    """
    looked = _candidates(root, ("", "Stanford_Online_Products"))
    for d in looked:
        if (d / "Ebay_train.txt").is_file() and (d / "Ebay_test.txt").is_file():
            break
    else:
        raise _missing("sop", "Stanford_Online_Products/Ebay_train.txt and Ebay_test.txt", looked)
    parts = []
    for part in ("train", "test"):
        t = pd.read_csv(d / f"Ebay_{part}.txt", sep=r"\s+", header=0, engine="c",
                        keep_default_na=False)
        need = {"image_id", "class_id", "super_class_id", "path"}
        if not need <= set(t.columns):
            raise ValueError(f"sop: {d / f'Ebay_{part}.txt'} must have the header line "
                             f"'image_id class_id super_class_id path', found {list(t.columns)}")
        t["part"] = part
        parts.append(t)
    table = pd.concat(parts, ignore_index=True)
    table["class_id"] = table["class_id"].astype(np.int64)
    shared = np.intersect1d(parts[0]["class_id"], parts[1]["class_id"])
    if shared.size:
        raise ValueError(f"sop: {shared.size} class ids appear in both Ebay_train.txt and "
                         "Ebay_test.txt; the standard split is class-disjoint")
    first = table.drop_duplicates("class_id")  # one path per class: 22k string splits, not 120k
    names = first["path"].str.split("/").str[0] + "/" + first["class_id"].astype(str)
    table["class_name"] = table["class_id"].map(dict(zip(first["class_id"], names, strict=True)))
    return d, table


def load_sop(split: str, root: str | os.PathLike, **options: Any) -> ImageListDataset:
    """Stanford Online Products: ``Ebay_train.txt`` (11,318 classes, 59,551 images) / ``Ebay_test.txt``
    (11,316 classes, 60,502). Options: those of :func:`load_cub200`."""
    check_options(options, _COMMON_OPTIONS, "sop")
    base, table = read_sop_index(root)
    train = np.unique(table.loc[table["part"] == "train", "class_id"].to_numpy())
    return _build("sop", split, base, table, train, options)


# --- a user's own class-per-folder images ---------------------------------------------------------
def read_folder_index(root: str | os.PathLike) -> tuple[Path, pd.DataFrame]:
    """``(root, table)`` of ``root/<class>/<image>``: classes in name order (``class_id`` 1..C)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _missing("folder", "a folder of class folders", [root])
    rows = []
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    cid = 0
    for name in classes:
        files = list_image_files(root / name)
        if not files:
            continue
        cid += 1
        rows.extend((f"{name}/{f}", cid, name) for f in files)
    if cid < 2:
        raise _missing("folder", "at least two class folders with images (DIR/<class>/*.jpg)", [root])
    table = pd.DataFrame(rows, columns=["path", "class_id", "class_name"])
    table["class_id"] = table["class_id"].astype(np.int64)
    return root, table


def load_folder(split: str, root: str | os.PathLike, **options: Any) -> ImageListDataset:
    """A user's images in ``root/<class name>/*``; class-disjoint splits like CUB/Cars.

    Options: those of :func:`load_cub200`, plus ``train_fraction`` (default 0.5: the first
    ``round(train_fraction * C)`` classes, at least one per side, are training classes) and
    ``split_seed`` (default None: classes in name order; an int shuffles the classes first).
    """
    check_options(options, (*_COMMON_OPTIONS, "train_fraction", "split_seed"), "folder")
    fraction = options.pop("train_fraction", FOLDER_TRAIN_FRACTION)
    check_range("train_fraction", fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    seed = options.pop("split_seed", None)
    base, table = read_folder_index(root)
    ids = np.unique(table["class_id"].to_numpy())
    if seed is not None:
        ids = np.random.default_rng(seed).permutation(ids)
    n_train = min(max(1, int(round(fraction * len(ids)))), len(ids) - 1)
    return _build("folder", split, base, table, ids[:n_train], options)


register("cub200", load_cub200, "CUB-200-2011 birds: 100/100 classes (needs root=)", needs_root=True,
         how_to_get=HOW_TO_GET["cub200"])
register("cars196", load_cars196, "Stanford Cars: 98/98 classes (needs root=)", needs_root=True,
         how_to_get=HOW_TO_GET["cars196"])
register("sop", load_sop, "Stanford Online Products: 11,318/11,316 classes (needs root=)",
         needs_root=True,
         how_to_get=HOW_TO_GET["sop"])
register("folder", load_folder, "your own images, root/<class>/*.jpg (needs root=)", needs_root=True,
         how_to_get=HOW_TO_GET["folder"])
