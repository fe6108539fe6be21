"""Tests for the data side: the bundled digits, finding and splitting images (utils.read_split_data
and friends), broken-file handling, decoding every Pillow mode to RGB (my_dataset.load_rgb),
transforms and augmentation, loaders, the class-distribution plot, and folders with links, FIFOs,
names that are not UTF-8 and other oddities, as training and predict.py meet them.

Every test writes real image files with Pillow into tmp_path; nothing is mocked. CPU only."""
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import VARIANTS  # noqa: E402
from my_dataset import MyDataSet, PackedPaths, load_rgb  # noqa: E402
import transforms  # noqa: E402
import utils  # noqa: E402
from errors import DataError  # noqa: E402
from my_dataset import make_loader  # noqa: E402
from reports import plot_class_distribution  # noqa: E402
from transforms import build_transform  # noqa: E402
from utils import Split, check_image, list_images, read_split_data, scan_classes  # noqa: E402
import errors  # noqa: E402
import my_dataset  # noqa: E402
import train as train_script  # noqa: E402
from conftest import (FAST, assert_user_error, copy_digits, run_main, run_script, save, train,  # noqa: E402
                      write_bomb_png, write_truncated_jpeg)

DIGITS = ROOT / "data" / "digits"
DIGIT_COUNTS = {0: 178, 1: 182, 2: 177, 3: 183, 4: 181, 5: 182, 6: 181, 7: 179, 8: 174, 9: 180}
B0 = VARIANTS["b0"]


# ---------------------------------------------------------------------------------------------
# helpers: every one writes real files
# ---------------------------------------------------------------------------------------------

def make_classes(root, counts, ext=".png"):
    """root/<class>/<i>.png for {class: count}; returns {class: [paths]}."""
    return {c: [save(Path(root) / c / f"{i:03d}{ext}") for i in range(n)] for c, n in counts.items()}


def per_class(split):
    """{class: (set of train paths, set of val paths)} of a Split."""
    out = {c: (set(), set()) for c in split.classes}
    for paths, labels, k in ((split.train_images, split.train_labels, 0), (split.val_images, split.val_labels, 1)):
        for p, label in zip(paths, labels):
            out[split.classes[label]][k].add(p)
    return out


def write_broken(folder):
    """A zero-byte .jpg, a text file named .png and a decompression-bomb PNG in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "text.png"
    text.write_text("this is not an image\n")
    bomb = write_bomb_png(folder / "bomb.png")
    return [str(empty), str(text), bomb]


def png(path, size=(8, 8), value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("L", size, value).save(path)
    return str(path)


def make_class(folder, n, value=0):
    return [png(os.path.join(folder, f"{i}.png"), value=value + 10 * i) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# 1. the bundled digits
# ---------------------------------------------------------------------------------------------

def test_digits_folders_and_class_counts():
    """data/digits holds exactly the folders 0..9 with 1,797 PNGs in the documented class counts."""
    assert sorted(os.listdir(DIGITS)) == [str(d) for d in range(10)]
    counts = {}
    for d in range(10):
        files = os.listdir(DIGITS / str(d))
        assert all(f.endswith(".png") for f in files), d
        counts[d] = len(files)
    assert counts == DIGIT_COUNTS
    assert sum(counts.values()) == 1797


def test_digits_images_are_8x8_grey_spanning_0_to_255():
    """Every digit file is an 8x8 mode-L PNG and the pixel values span the full 0..255 range."""
    lo, hi = 255, 0
    for path in sorted(DIGITS.glob("*/*.png")):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.mode == "L" and img.size == (8, 8), path
            a, b = img.getextrema()
        lo, hi = min(lo, a), max(hi, b)
    assert (lo, hi) == (0, 255)
    spot = load_rgb(DIGITS / "3" / sorted(os.listdir(DIGITS / "3"))[0])
    assert spot.mode == "RGB" and spot.size == (8, 8)


def test_digits_split_matches_imagefolder():
    """read_split_data on the bundled digits uses all 1,797 files, ImageFolder's labels and ~20% val per class."""
    split = read_split_data(str(DIGITS), 0.2, seed=0)
    folder = torchvision.datasets.ImageFolder(str(DIGITS))
    assert split.classes == folder.classes == [str(d) for d in range(10)]
    assert split.broken == []
    labels = dict(zip(split.train_images + split.val_images, split.train_labels + split.val_labels))
    assert labels == {p: i for p, i in folder.samples}
    for c, (tr, va) in per_class(split).items():
        n = DIGIT_COUNTS[int(c)]
        assert len(tr) + len(va) == n and abs(len(va) - 0.2 * n) <= 1


# ---------------------------------------------------------------------------------------------
# 2. read_split_data on one folder per class
# ---------------------------------------------------------------------------------------------

def test_classes_sorted_and_labels_agree_with_imagefolder(tmp_path):
    """Classes are the sorted folder names and every file's label equals ImageFolder's class_to_idx."""
    make_classes(tmp_path, {"b": 3, "Zebra": 2, "10": 4, "9": 2, "apple": 5, "a b": 2})
    split = read_split_data(str(tmp_path), 0.3, seed=0)
    folder = torchvision.datasets.ImageFolder(str(tmp_path))
    assert split.classes == sorted(["b", "Zebra", "10", "9", "apple", "a b"]) == folder.classes
    labels = dict(zip(split.train_images + split.val_images, split.train_labels + split.val_labels))
    assert labels == {p: i for p, i in folder.samples}
    assert all(folder.class_to_idx[split.classes[i]] == i for i in range(len(split.classes)))


@pytest.mark.parametrize("val_rate", [0.1, 0.2, 0.5, 0.8])
def test_split_is_stratified(tmp_path, val_rate):
    """Every class with >= 2 images gets >= 1 val image and >= 1 train image, about val_rate*n in val."""
    counts = {"one": 1, "two": 2, "three": 3, "five": 5, "ten": 10, "many": 37}
    make_classes(tmp_path, counts)
    split = read_split_data(str(tmp_path), val_rate, seed=0)
    for c, (tr, va) in per_class(split).items():
        n = counts[c]
        assert len(tr) + len(va) == n
        if n == 1:
            assert len(va) == 0 and len(tr) == 1, "a single image must go to training"
        else:
            assert len(va) >= 1 and len(tr) >= 1, c
            assert abs(len(va) - val_rate * n) <= 1, (c, len(va))


def test_single_image_class_goes_to_train(tmp_path):
    """A class with exactly one image keeps it in the training set."""
    files = make_classes(tmp_path, {"lonely": 1, "other": 6})
    split = read_split_data(str(tmp_path), 0.5, seed=3)
    assert files["lonely"][0] in split.train_images
    assert files["lonely"][0] not in split.val_images


def test_no_overlap_and_every_usable_file_used(tmp_path):
    """No file is in both sets, and train + val is exactly the set of usable image files."""
    files = make_classes(tmp_path, {"a": 7, "b": 11, "c": 4})
    save(tmp_path / "a" / "deep" / "er" / "x.jpg")
    split = read_split_data(str(tmp_path), 0.25, seed=0)
    train, val = set(split.train_images), set(split.val_images)
    assert not train & val
    assert len(train) == len(split.train_images) and len(val) == len(split.val_images)
    expected = {p for ps in files.values() for p in ps} | {str(tmp_path / "a" / "deep" / "er" / "x.jpg")}
    assert train | val == expected
    assert len(split.train_labels) == len(split.train_images) and len(split.val_labels) == len(split.val_images)


def test_split_reproducible_and_seed_dependent(tmp_path):
    """The same call twice gives an identical split; a different seed gives a different one."""
    make_classes(tmp_path, {"a": 20, "b": 20, "c": 20})
    first = read_split_data(str(tmp_path), 0.2, seed=0)
    assert read_split_data(str(tmp_path), 0.2, seed=0) == first
    other = read_split_data(str(tmp_path), 0.2, seed=1)
    assert set(other.val_images) != set(first.val_images)
    assert sorted(other.train_images + other.val_images) == sorted(first.train_images + first.val_images)


def test_class_split_unaffected_by_adding_a_class(tmp_path):
    """Adding a class folder does not change how the existing classes are split (seeded per class name)."""
    make_classes(tmp_path, {"b": 15, "d": 9})
    before = per_class(read_split_data(str(tmp_path), 0.3, seed=5))
    make_classes(tmp_path, {"a": 12})  # sorts first: every label shifts by one
    after = per_class(read_split_data(str(tmp_path), 0.3, seed=5))
    assert after["b"] == before["b"] and after["d"] == before["d"]


def test_split_independent_of_root_location(tmp_path):
    """The split depends on the seed and file names only, not on where the data folder lives."""
    make_classes(tmp_path / "here", {"a": 13, "b": 8})
    shutil.copytree(tmp_path / "here", tmp_path / "somewhere" / "else")

    def relative(root):
        split = read_split_data(str(root), 0.3, seed=2)
        return sorted(os.path.relpath(p, root) for p in split.val_images)

    assert relative(tmp_path / "here") == relative(tmp_path / "somewhere" / "else")


@pytest.mark.parametrize("val_rate", [0, 1, -0.2, 1.5])
def test_bad_val_rate_raises(tmp_path, val_rate):
    """A val_rate outside (0, 1) is a DataError, not a silent empty split."""
    make_classes(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match="val-rate"):
        read_split_data(str(tmp_path), val_rate, seed=0)


# ---------------------------------------------------------------------------------------------
# 3. train/ + val/ layouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_presplit_layout_used_as_is(tmp_path, val_name):
    """root/train + root/{val,valid,validation} are used as they are: val images are exactly the val folder's."""
    train = make_classes(tmp_path / "train", {"cat": 5, "dog": 4})
    val = make_classes(tmp_path / val_name, {"cat": 2, "dog": 3})
    split = read_split_data(str(tmp_path), 0.2, seed=0)
    assert split.classes == ["cat", "dog"]
    groups = per_class(split)
    for c in ("cat", "dog"):
        assert groups[c] == (set(train[c]), set(val[c]))
    assert set(split.val_images) == set(val["cat"] + val["dog"])


@pytest.mark.parametrize("extra_in", ["train", "val"])
def test_presplit_mismatched_classes_raise(tmp_path, extra_in):
    """train/ and val/ with different class folders raise DataError naming the differing class."""
    make_classes(tmp_path / "train", {"cat": 3, "dog": 3})
    make_classes(tmp_path / "val", {"cat": 1, "dog": 1})
    make_classes(tmp_path / extra_in, {"hamster": 2})
    with pytest.raises(DataError, match="hamster"):
        read_split_data(str(tmp_path), 0.2, seed=0)


# ---------------------------------------------------------------------------------------------
# 4. which files count as images
# ---------------------------------------------------------------------------------------------

FORMATS = [("A.JPG", "JPEG"), ("b.Png", "PNG"), ("c.jpeg", "JPEG"), ("d.BMP", "BMP"), ("e.WebP", "WEBP"),
           ("f.tif", "TIFF"), ("g.TIFF", "TIFF"), ("h.Gif", "GIF"), ("i.jpg", "JPEG"), ("j.png", "PNG")]


def test_every_extension_in_any_case_is_found(tmp_path):
    """.jpg .jpeg .png .bmp .webp .tif .tiff .gif are found in any letter case, and each one decodes."""
    paths = sorted(save(tmp_path / "cls" / name, fmt=fmt) for name, fmt in FORMATS)
    assert list_images(str(tmp_path / "cls")) == paths
    for p in paths:
        assert check_image(p) is None, p
        assert load_rgb(p).size == (8, 8)
    images, broken = scan_classes(str(tmp_path))
    assert images == {"cls": paths} and broken == []


def test_hidden_and_non_image_files_ignored(tmp_path):
    """Hidden files and folders, .DS_Store, Thumbs.db and notes.txt are never taken as images."""
    good = [save(tmp_path / "a" / "1.jpg"), save(tmp_path / "a" / "2.png")]
    save(tmp_path / "a" / ".hidden.jpg")
    save(tmp_path / "a" / ".cache" / "x.png")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "a" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "a" / "notes.txt").write_text("notes")
    save(tmp_path / ".ipynb_checkpoints" / "y.png")  # a hidden folder is not a class
    make_classes(tmp_path, {"b": 2})
    assert list_images(str(tmp_path / "a")) == sorted(good)
    split = read_split_data(str(tmp_path), 0.5, seed=0)
    assert split.classes == ["a", "b"] and split.broken == []
    assert sorted(p for p, label in zip(split.train_images + split.val_images,
                                        split.train_labels + split.val_labels) if label == 0) == sorted(good)


def test_images_in_nested_subfolders_are_found(tmp_path):
    """Images in sub-folders (any depth) of a class folder belong to that class."""
    nested = [save(tmp_path / "a" / "top.png"), save(tmp_path / "a" / "2019" / "x.png"),
              save(tmp_path / "a" / "2019" / "jan" / "y.jpg")]
    make_classes(tmp_path, {"b": 3})
    assert sorted(list_images(str(tmp_path / "a"))) == sorted(nested)
    groups = per_class(read_split_data(str(tmp_path), 0.3, seed=0))
    assert set.union(*groups["a"]) == set(nested)
    assert sorted(groups) == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# 5. empty folders and bad paths
# ---------------------------------------------------------------------------------------------

def test_empty_class_folder_skipped_with_warning(tmp_path, capsys):
    """An empty class folder is skipped (not a class) and named in a warning on stderr."""
    make_classes(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "empty_one").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "readme.txt").write_text("no images here")
    split = read_split_data(str(tmp_path), 0.3, seed=0)
    assert split.classes == ["a", "b"]
    err = capsys.readouterr().err
    assert "empty_one" in err and "only_text" in err and "warning" in err.lower()


@pytest.mark.parametrize("counts", [{"solo": 4}, {}])
def test_fewer_than_two_classes_raise(tmp_path, counts):
    """Fewer than two usable class folders is a DataError."""
    make_classes(tmp_path, counts)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="at least 2"):
        read_split_data(str(tmp_path), 0.2, seed=0)


def test_missing_data_path_raises_naming_it(tmp_path):
    """A data path that does not exist is a DataError whose message names the path."""
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataError) as info:
        read_split_data(str(missing), 0.2, seed=0)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_file_as_data_path_raises_naming_it(tmp_path):
    """A data path that is a file is a DataError whose message names the path."""
    file = save(tmp_path / "image.png")
    with pytest.raises(DataError) as info:
        read_split_data(file, 0.2, seed=0)
    assert file in str(info.value) and "file" in str(info.value)


def test_missing_data_path(tmp_path):
    assert_user_error(train("--data-path", tmp_path / "nope", *FAST), "nope", "does not exist", "--data-path")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "images.zip"
    f.write_bytes(b"PK")
    assert_user_error(train("--data-path", f, *FAST), "images.zip", "is a file")


def test_folder_without_class_folders(tmp_path):
    shutil.copy(os.path.join(ROOT, "data", "digits", "0", "0000.png"), tmp_path / "a.png")
    assert_user_error(train("--data-path", tmp_path, *FAST), "0 usable class", "sub-folder")


def test_one_class_only(tmp_path):
    data = copy_digits(tmp_path / "d", classes=("5",))
    assert_user_error(train("--data-path", data, *FAST), "1 usable class", "at least 2")


def test_a_missing_flower_photos_folder_points_to_the_data_readme(tmp_path):
    with pytest.raises(errors.DataError, match="data/README.md says where to get it"):
        utils.read_split_data(str(tmp_path / "data" / "flower_photos"))
    with pytest.raises(errors.DataError) as other:
        utils.read_split_data(str(tmp_path / "my_data"))
    assert "README" not in str(other.value)


# ---------------------------------------------------------------------------------------------
# 6. broken files
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind", ["empty", "text", "bomb", "bomb_between_limits"])
def test_check_image_flags_broken_files(tmp_path, kind):
    """The header scan flags zero-byte, non-image and decompression-bomb files, cheaply."""
    if kind == "empty":
        path = tmp_path / "x.jpg"
        path.write_bytes(b"")
    elif kind == "text":
        path = tmp_path / "x.png"
        path.write_text("hello, I am text\n" * 20)
    elif kind == "bomb":
        path = Path(write_bomb_png(tmp_path / "x.png", 100_000))
    else:  # over MAX_IMAGE_PIXELS but under twice it: Pillow only warns here
        side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
        path = Path(write_bomb_png(tmp_path / "x.png", side))
    assert path.stat().st_size < 500
    reason = check_image(str(path))
    assert isinstance(reason, str) and reason
    assert check_image(save(tmp_path / "good.png")) is None


def test_broken_files_left_out_and_reported_once(tmp_path, capsys):
    """Broken files are left out of the split and listed by path, with their count, in one stderr block."""
    good = make_classes(tmp_path, {"a": 4, "b": 4})
    broken = write_broken(tmp_path / "a") + [write_bomb_png(tmp_path / "b" / "sub" / "huge.png")]
    split = read_split_data(str(tmp_path), 0.25, seed=0)
    used = set(split.train_images + split.val_images)
    assert used == set(good["a"] + good["b"])
    assert sorted(p for p, _ in split.broken) == sorted(broken)
    err = capsys.readouterr().err
    assert err.count("could not be used") == 1
    assert "4 file(s)" in err
    for p in broken:
        assert err.count(p) == 1, p
    block = err[err.index("could not be used"):]
    assert all(p in block for p in broken)


def test_broken_files_in_presplit_layout_reported_in_one_block(tmp_path, capsys):
    """With train/ and val/ the broken files of both are reported together in one block."""
    make_classes(tmp_path / "train", {"a": 3, "b": 3})
    make_classes(tmp_path / "val", {"a": 1, "b": 1})
    broken = write_broken(tmp_path / "train" / "a") + write_broken(tmp_path / "val" / "b")
    split = read_split_data(str(tmp_path), 0.2, seed=0)
    assert sorted(p for p, _ in split.broken) == sorted(broken)
    err = capsys.readouterr().err
    assert err.count("could not be used") == 1 and "6 file(s)" in err
    assert all(p in err for p in broken)


def test_truncated_jpeg_returns_none_and_is_dropped_from_batch(tmp_path, capsys):
    """A truncated JPEG that passes the header scan yields None from __getitem__, is named in a
    one-line warning (not a Python warning pointing into the code), and is left out by collate_fn."""
    bad = write_truncated_jpeg(tmp_path / "a" / "cut.jpg")
    good = [save(tmp_path / "a" / "ok.png"), save(tmp_path / "b" / "ok.jpg")]
    assert check_image(bad) is None  # the header is intact
    tf = build_transform(B0, 32, train=False)
    ds = MyDataSet([good[0], bad, good[1]], [0, 0, 1], transform=tf)
    assert ds[1] is None
    err = capsys.readouterr().err
    assert err.startswith("warning: skipping unreadable image") and "cut.jpg" in err and err.count("\n") == 1
    batch = [ds[i] for i in range(3)]
    images, labels = MyDataSet.collate_fn(batch)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    images, labels = MyDataSet.collate_fn([None, None])
    assert images.shape[0] == 0 and labels.shape == (0,) and labels.dtype == torch.long


def test_truncated_jpeg_dropped_by_loader(tmp_path, capsys):
    """Through make_loader a truncated JPEG is simply missing from its batch; iteration does not crash."""
    paths = [save(tmp_path / f"{i}.png") for i in range(4)]
    paths.insert(2, write_truncated_jpeg(tmp_path / "cut.jpg"))
    ds = MyDataSet(paths, [0, 1, 0, 1, 0], transform=build_transform(B0, 32, train=False))
    loader = make_loader(ds, 5, train=False, workers=0, device=torch.device("cpu"))
    batches = list(loader)
    assert "cut.jpg" in capsys.readouterr().err
    assert len(batches) == 1
    images, labels = batches[0]
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 1, 0]


def test_class_with_only_broken_files_is_skipped(tmp_path, capsys):
    """A class whose files are all broken is skipped with a warning naming it; the others still load."""
    make_classes(tmp_path, {"a": 3, "b": 3})
    broken = write_broken(tmp_path / "c")
    split = read_split_data(str(tmp_path), 0.3, seed=0)
    assert split.classes == ["a", "b"]
    assert sorted(p for p, _ in split.broken) == sorted(broken)
    err = capsys.readouterr().err
    assert str(tmp_path / "c") in err and "no usable images" in err


def test_broken_files_leaving_one_class_raise(tmp_path, capsys):
    """If broken files empty a class and fewer than 2 classes remain, DataError (after listing the files)."""
    make_classes(tmp_path, {"a": 3})
    broken = write_broken(tmp_path / "b")
    with pytest.raises(DataError, match="at least 2"):
        read_split_data(str(tmp_path), 0.3, seed=0)
    err = capsys.readouterr().err
    assert all(p in err for p in broken)


@pytest.mark.parametrize("layout", ["flat", "presplit"])
def test_large_folder_checked_later_gives_the_same_split_and_report(tmp_path, capsys, layout):
    """A folder too large to check at the start is split from its file names alone; its broken
    files, found by the background check, are the plain scan's, in the same words, and leaving them
    out gives exactly the plain scan's split."""
    if layout == "flat":
        make_classes(tmp_path, {"a": 7, "b": 5})
        broken = write_broken(tmp_path / "a") + write_broken(tmp_path / "b" / "deep")
    else:
        make_classes(tmp_path / "train", {"a": 4, "b": 3})
        make_classes(tmp_path / "val", {"a": 2, "b": 2})
        broken = write_broken(tmp_path / "train" / "a") + write_broken(tmp_path / "val" / "b")
    plain = read_split_data(str(tmp_path), 0.3, seed=3)
    plain_report = capsys.readouterr().err
    late = read_split_data(str(tmp_path), 0.3, seed=3, check_at_start=0)
    assert "could not be used" not in capsys.readouterr().err
    assert sorted(late.unchecked) == sorted(late.train_images + late.val_images) and set(broken) <= set(late.unchecked)
    found = utils.BackgroundCheck(late.unchecked).report(wait=True)
    assert capsys.readouterr().err == plain_report and sorted(found) == sorted(plain.broken)
    bad = {p for p, _ in found}
    for part in ("train", "val"):
        pairs = lambda split: zip(getattr(split, f"{part}_images"), getattr(split, f"{part}_labels"))  # noqa: E731
        assert [(p, y) for p, y in pairs(late) if p not in bad] == list(pairs(plain))


def test_many_left_out_files_are_counted_by_reason_and_listed_in_the_run_folder(tmp_path, capsys):
    """900 hard links to one image and 3 broken files: a line per reason with its count and first
    paths instead of 903 lines before training, and the whole list in left_out.txt in the run
    folder, which the summary names."""
    root = tmp_path / "data"
    make_class(root / "a", 4)
    make_class(root / "b", 4, value=9)
    for i in range(900):
        os.link(root / "a" / "0.png", root / "a" / f"link{i:03d}.png")
    for i in range(3):
        (root / "b" / f"broken{i}.png").write_bytes(b"not an image")
    run = tmp_path / "run"
    assert run_main("--data-path", root, "--output-dir", run, *FAST[:-1], "1") == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  ") or "left out" in line]
    assert warning[0] == "warning: 903 file(s) could not be used and are left out:"
    assert warning[1] == (f"  900 x the same file as another; counted once: {root / 'a' / 'link000.png'}, "
                          f"{root / 'a' / 'link001.png'}, {root / 'a' / 'link002.png'}, ...")
    kind, paths = warning[2].split(": ", 1)
    assert kind == "  3 x not an image Pillow can read"
    assert sorted(paths.split(", ")) == [str(root / "b" / f"broken{i}.png") for i in range(3)]
    assert warning[3] == "  the whole list: left_out.txt in the run folder" and len(warning) == 4
    listed = (run / "left_out.txt").read_text().splitlines()
    assert len(listed) == 903 and listed[0] == f"{root / 'a' / 'link000.png'}\tthe same file as {root / 'a' / '0.png'}; " \
        "counted once"


def test_packed_paths_read_back_every_name():
    not_utf8 = b"/data/c/\xff\xfe.jpg".decode("utf-8", "surrogateescape")
    names = ["/data/a/1.jpg", "/data/b/caf\u00e9.png", not_utf8, ""]
    packed = PackedPaths(names)
    assert len(packed) == 4 and [packed[i] for i in range(4)] == names
    assert packed[-2] == names[-2] and packed[1:3] == names[1:3]
    assert len(PackedPaths([])) == 0
    ds = MyDataSet(names, [0, 1, 2, 0])
    assert ds.images_path[2] == names[2] and ds.images_class.tolist() == [0, 1, 2, 0]


# ---------------------------------------------------------------------------------------------
# 7. load_rgb: every mode to RGB
# ---------------------------------------------------------------------------------------------

W, H = 7, 5  # not square, so a swapped size shows


def _palette_image():
    img = Image.new("P", (W, H), 1)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 2)
    return img


# name -> (image, file name, save kwargs, {pixel: expected RGB (or None: anything)})
def _mode_cases():
    la = Image.new("LA", (W, H), (50, 255))
    la.putpixel((0, 0), (0, 0))
    rgba = Image.new("RGBA", (W, H), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    one = Image.new("1", (W, H), 0)
    one.putpixel((0, 0), 1)
    cmyk = Image.new("CMYK", (W, H), (0, 255, 255, 0))
    return {
        "L": (Image.new("L", (W, H), 77), "x.png", {}, {(3, 3): (77, 77, 77)}),
        "LA": (la, "x.png", {}, {(0, 0): (255, 255, 255), (3, 3): (50, 50, 50)}),
        "P": (_palette_image(), "x.png", {}, {(0, 0): (0, 0, 0), (1, 0): (0, 0, 255), (3, 3): (255, 0, 0)}),
        "P_transparent": (_palette_image(), "x.png", {"transparency": 0},
                          {(0, 0): (255, 255, 255), (1, 0): (0, 0, 255), (3, 3): (255, 0, 0)}),
        "P_transparent_gif": (_palette_image(), "x.gif", {"transparency": 0},
                              {(0, 0): (255, 255, 255), (3, 3): (255, 0, 0)}),
        "RGBA": (rgba, "x.png", {}, {(0, 0): (255, 255, 255), (3, 3): (255, 0, 0)}),
        "CMYK_jpeg": (cmyk, "x.jpg", {"quality": 100}, {(3, 3): "red"}),
        "CMYK_tiff": (cmyk, "x.tif", {}, {(3, 3): (255, 0, 0)}),
        "1": (one, "x.png", {}, {(0, 0): (255, 255, 255), (3, 3): (0, 0, 0)}),
    }


@pytest.mark.parametrize("case", list(_mode_cases()))
def test_load_rgb_modes(tmp_path, case):
    """load_rgb gives an RGB image of the file's size for every mode; transparent pixels become white."""
    img, name, kwargs, expected = _mode_cases()[case]
    path = save(tmp_path / name, img, **kwargs)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (W, H)
    for xy, rgb in expected.items():
        got = out.getpixel(xy)
        if rgb == "red":  # lossy JPEG: roughly red
            assert got[0] > 200 and got[1] < 60 and got[2] < 60, got
        else:
            assert got == rgb, (xy, got)


def test_load_rgb_16bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG is scaled to 8 bits: 65535 -> 255, 32768 -> ~128, 0 -> 0 (not clipped to 255)."""
    a = np.zeros((H, W), np.uint16)
    a[0, 0], a[0, 1], a[0, 2] = 65535, 32768, 1000
    path = save(tmp_path / "x16.png", Image.fromarray(a))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really stored as 16-bit
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (W, H)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert abs(out.getpixel((1, 0))[0] - 128) <= 1
    assert out.getpixel((2, 0))[0] <= 5  # 1000/65535 of full scale, not clipped to 255
    assert out.getpixel((5, 4)) == (0, 0, 0)


def test_load_rgb_16bit_scale_does_not_depend_on_brightest_pixel(tmp_path):
    """16-bit values map to 8 bits by the fixed 65535 range: value 255 is near black whatever else is in the image."""
    outs = []
    for brightest in (255, 256):
        a = np.zeros((H, W), np.uint16)
        a[0, 0] = 255
        a[0, 1] = brightest
        outs.append(load_rgb(save(tmp_path / f"dark{brightest}.png", Image.fromarray(a))).getpixel((0, 0)))
    assert outs[0] == outs[1], outs
    assert outs[0][0] <= 2, outs  # 255/65535 of full scale is black, not white


def test_load_rgb_32bit_int_tiff(tmp_path):
    """A 32-bit integer ('I') TIFF becomes RGB, scaled so the top value is 255 and zero stays 0."""
    a = np.zeros((H, W), np.int32)
    a[0, 0], a[0, 1] = 1_000_000, 500_000
    path = save(tmp_path / "x32.tif", Image.fromarray(a))
    with Image.open(path) as raw:
        assert raw.mode == "I"
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (W, H)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert abs(out.getpixel((1, 0))[0] - 128) <= 1
    assert out.getpixel((6, 4)) == (0, 0, 0)


def test_load_rgb_float_tiff_in_unit_range(tmp_path):
    """A float ('F') TIFF with values in [0, 1] is scaled: 1.0 -> 255, 0.5 -> ~128, 0 -> 0."""
    a = np.zeros((H, W), np.float32)
    a[0, 0], a[0, 1], a[0, 2] = 1.0, 0.5, 0.25
    path = save(tmp_path / "xf.tif", Image.fromarray(a))
    with Image.open(path) as raw:
        assert raw.mode == "F"
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (W, H)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert abs(out.getpixel((1, 0))[0] - 128) <= 1
    assert abs(out.getpixel((2, 0))[0] - 64) <= 1
    assert out.getpixel((6, 4)) == (0, 0, 0)


def test_float_tiff_with_nan_pixels_decodes_the_others(tmp_path):
    """NaN (no data) pixels in a float TIFF become black; the others keep their scale (0.5 is mid
    grey, not 0), without a numpy warning that names no file."""
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[np.nan, 0.5], [1.0, 0.25]], dtype=np.float32), "F").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = np.asarray(my_dataset.load_rgb(str(path)))[..., 0]
    assert pixels.tolist() == [[0, 128], [255, 64]]


@pytest.mark.parametrize("mode,key,other", [("RGB", (10, 20, 30), (200, 0, 0)), ("L", 7, 99)])
def test_load_rgb_colour_key_transparency_becomes_white(tmp_path, mode, key, other):
    """PNG colour-key transparency (tRNS in an RGB or L PNG) is put on white like any other transparency."""
    img = Image.new(mode, (W, H), key)
    img.putpixel((3, 3), other)
    path = save(tmp_path / "key.png", img, transparency=key)
    with Image.open(path) as raw:
        assert raw.mode == mode and "transparency" in raw.info
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 3)) == (other if mode == "RGB" else (other,) * 3)


def test_load_rgb_applies_exif_orientation(tmp_path):
    """A 40x20 JPEG with EXIF Orientation=6 (rotate 90 CW) loads as 20x40."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # left quarter blue
    exif = img.getexif()
    exif[0x0112] = 6
    path = save(tmp_path / "rot.jpg", img, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (20, 40)
    top = out.getpixel((10, 2))  # rotated 90 CW: the old left edge is now at the top
    assert top[2] > 200 and top[0] < 60, top
    assert load_rgb(path, draft_size=10).size[0] < load_rgb(path, draft_size=10).size[1]


# ---------------------------------------------------------------------------------------------
# 8. draft decoding
# ---------------------------------------------------------------------------------------------

def test_draft_decodes_large_jpeg_smaller_but_not_below_draft_size(tmp_path):
    """draft_size shrinks a large JPEG's decode, never below draft_size on either side."""
    path = save(tmp_path / "big.jpg", Image.new("RGB", (1600, 1200), (30, 120, 200)))
    small = load_rgb(path, draft_size=300)
    assert small.mode == "RGB"
    assert small.size[0] < 1600 and small.size[1] < 1200
    assert min(small.size) >= 300
    assert abs(small.size[0] / small.size[1] - 4 / 3) < 0.01
    assert load_rgb(path, draft_size=None).size == (1600, 1200)
    assert load_rgb(path).size == (1600, 1200)
    ds = MyDataSet([path], [0], draft_size=300)
    assert ds[0][0].size == small.size


def test_draft_ignored_for_png(tmp_path):
    """draft_size does not change a PNG: it always decodes at full size."""
    path = save(tmp_path / "big.png", Image.new("RGB", (1600, 1200), (30, 120, 200)))
    assert load_rgb(path, draft_size=300).size == (1600, 1200)


# ---------------------------------------------------------------------------------------------
# 9. transforms
# ---------------------------------------------------------------------------------------------

def _natural_image(tmp_path, size=(96, 80)):
    """A noisy image with about ImageNet's channel statistics, written and read back as a JPEG."""
    rng = np.random.default_rng(1)
    mean = np.array(B0.mean) * 255
    std = np.array(B0.std) * 255
    pixels = rng.normal(mean, std, (size[1], size[0], 3)).clip(0, 255).astype(np.uint8)
    return load_rgb(save(tmp_path / "natural.jpg", Image.fromarray(pixels), quality=95))


def test_train_transform_shape_and_normalisation(tmp_path):
    """The train transform gives a uint8 [3,64,64] tensor, which transforms.Normalize turns into
    floats normalised with the variant's mean/std (on the device, a batch at a time)."""
    torch.manual_seed(0)
    crop, normalize = build_transform(B0, 64, train=True, hflip=False), transforms.Normalize(B0.mean, B0.std)
    assert crop(_natural_image(tmp_path)).dtype == torch.uint8
    tf = lambda img: normalize(crop(img).unsqueeze(0))[0]  # noqa: E731
    out = tf(_natural_image(tmp_path))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 64, 64)
    assert out.mean(dim=(1, 2)).abs().max() < 0.3
    # exact normalisation on flat colours: the mean colour -> ~0, white -> (1 - mean) / std
    flat = tf(Image.new("RGB", (50, 50), tuple(round(m * 255) for m in B0.mean)))
    assert flat.abs().max() < 0.02
    white = tf(Image.new("RGB", (50, 50), (255, 255, 255)))
    expected = (1 - torch.tensor(B0.mean)) / torch.tensor(B0.std)
    assert torch.allclose(white.mean(dim=(1, 2)), expected, atol=1e-3)


def test_eval_transform_shape_and_deterministic(tmp_path):
    """The eval transform gives [3,64,64] uint8 (its normalize makes the floats, where the model
    runs) and the same tensor every time."""
    img = _natural_image(tmp_path, (100, 80))
    tf = build_transform(B0, 64, train=False)
    a, b = tf(img), tf(img)
    assert a.shape == (3, 64, 64) and a.dtype == torch.uint8
    assert tf.normalize(a[None]).dtype == torch.float32
    assert torch.equal(a, b)
    tall = tf(Image.new("RGB", (30, 90), (0, 0, 0)))
    assert tall.shape == (3, 64, 64)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_transform_equals_torchvision_to_the_bit(interpolation):
    """EvalTransform against torchvision's v2 Resize + CenterCrop + ToDtype + Normalize on a real
    photo cut to shapes that take every branch: landscape, portrait, square, already the resize,
    smaller than the crop, one pixel wide; and against the official weights' own transform."""
    from torchvision.transforms import v2 as T
    import matplotlib
    photo = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    for resize, crop in ((256, 224), (73, 64), (36, 32)):
        tf = transforms.EvalTransform(resize, crop, interpolation, B0.mean, B0.std)
        ours = lambda img: tf.normalize(tf(img)[None])[0]  # noqa: E731  as the batch is, on the device
        theirs = T.Compose([T.ToImage(), T.Resize(resize, interpolation=T.InterpolationMode(interpolation),
                                                  antialias=True), T.CenterCrop(crop),
                            T.ToDtype(torch.float32, scale=True), T.Normalize(B0.mean, B0.std)])
        for w, h in ((512, 600), (600, 301), (97, 97), (resize, resize + 40), (20, 12), (1, 40)):
            img = photo.resize((w, h))
            assert torch.equal(ours(img), theirs(img)), (resize, crop, w, h)
    official = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()
    tf = build_transform(VARIANTS["b0"], 224, train=False)
    if interpolation == "bicubic":  # the official transform's: the same pixels, scaled by /255 not *(1/255)
        torch.testing.assert_close(tf.normalize(tf(photo)[None])[0], official(photo), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["b4", "v2_s", "v2_m", "v2_l"])
def test_each_variants_eval_transform_is_its_torchvision_weights_own(name):
    """What predict.py, train.py's evaluation and export.py's sidecar use for a raw torchvision file
    of each variant is that file's own recipe: V2-S and V2-M resize and crop at 384 and 480
    bilinear, V2-L 480 bicubic with mean = std = 0.5, B4 384 then 380 bicubic; the same pixels
    as torchvision's transform but for a rounding step on under 1 % of them."""
    import matplotlib
    import model_files
    photo = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    official = getattr(torchvision.models, f"EfficientNet_{name.upper()}_Weights").IMAGENET1K_V1.transforms()
    tf, resize = model_files.eval_transform({}, name)
    assert resize == official.resize_size[0] and (tf.resize, tf.crop) == (official.resize_size[0], official.crop_size[0])
    level = 1 / 255 / min(official.std)  # one step of a uint8 pixel, normalised
    for img in (photo, photo.resize((300, 517))):
        ours, theirs = tf.normalize(tf(img)[None])[0], official(img)
        assert ours.shape == theirs.shape
        # PyTorch's resize kernels (ours) and PIL's (the official transform's, on a PIL image)
        # round a few pixels the other way
        differ = (ours - theirs).abs() > 1e-5
        assert (ours - theirs).abs().max() <= level * 1.001 and differ.float().mean() < 0.01


def _half_black_half_white():
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (32, 0, 64, 64))
    return img


def _flipped(t):
    """True when the bright half of a [3,H,W] tensor is on the left."""
    w, t = t.shape[-1], t.float()
    return t[..., : w // 2].mean() > t[..., w // 2:].mean()


def test_hflip_false_never_flips():
    """hflip=False never mirrors: a left-black/right-white image stays so in every sample."""
    torch.manual_seed(0)
    tf = build_transform(B0, 32, train=True, scale=(1.0, 1.0), hflip=False)
    img = _half_black_half_white()
    assert not any(_flipped(tf(img)) for _ in range(40))


def test_hflip_true_flips_some():
    """hflip=True mirrors some, but not all, of 20 samples."""
    torch.manual_seed(0)
    tf = build_transform(B0, 32, train=True, scale=(1.0, 1.0), hflip=True)
    img = _half_black_half_white()
    flips = sum(bool(_flipped(tf(img))) for _ in range(20))
    assert 0 < flips < 20


def test_augmentation_does_not_depend_on_the_worker():
    """The same (index, seed) gives the same crop whichever process loads it; another seed another."""
    paths = [os.path.join(ROOT, "data", "digits", "3", sorted(os.listdir(os.path.join(ROOT, "data", "digits", "3")))[0])]
    ds = my_dataset.MyDataSet(paths, [3], transform=transforms.build_transform(
        train_script.VARIANTS["b0"], 32, train=True, scale=(0.08, 1.0)))
    torch.manual_seed(1)
    a = ds[(0, 123)][0]
    torch.manual_seed(2)
    b = ds[(0, 123)][0]
    assert torch.equal(a, b) and not torch.equal(a, ds[(0, 124)][0])
    state = torch.get_rng_state()
    ds[(0, 5)]
    assert torch.equal(state, torch.get_rng_state())  # the model's RNG (dropout) is left alone


# ---------------------------------------------------------------------------------------------
# 10. make_loader
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def ten_images(tmp_path):
    files = make_classes(tmp_path, {"a": 5, "b": 5})
    split = read_split_data(str(tmp_path), 0.2, seed=0)
    paths = split.train_images + split.val_images
    labels = split.train_labels + split.val_labels
    assert len(paths) == 10 and sum(len(v) for v in files.values()) == 10
    return paths, labels


def test_make_loader_train_batches_drop_last(ten_images):
    """A train loader yields full [B,3,S,S] batches and drops the short last one when len > batch."""
    paths, labels = ten_images
    ds = MyDataSet(paths, labels, transform=build_transform(B0, 32, train=True))
    loader = make_loader(ds, 4, train=True, workers=0, device=torch.device("cpu"))
    assert loader.drop_last is True
    batches = list(loader)
    assert len(batches) == 2
    for images, batch_labels in batches:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8  # normalised on the device
        assert batch_labels.shape == (4,) and batch_labels.dtype == torch.long
    whole = make_loader(ds, 10, train=True, workers=0, device=torch.device("cpu"))
    assert whole.drop_last is False and [len(b[0]) for b in whole] == [10]


def test_make_loader_eval_keeps_every_image_in_order(ten_images):
    """An eval loader keeps the short last batch and the dataset's order."""
    paths, labels = ten_images
    ds = MyDataSet(paths, labels, transform=build_transform(B0, 32, train=False))
    loader = make_loader(ds, 4, train=False, workers=0, device=torch.device("cpu"))
    assert loader.drop_last is False
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [4, 4, 2]
    assert torch.cat([b for _, b in batches]).tolist() == labels
    assert all(images.shape[1:] == (3, 32, 32) for images, _ in batches)


def test_make_loader_pin_memory_only_for_cuda(ten_images):
    """pin_memory is off for a CPU device (and on only for CUDA)."""
    paths, labels = ten_images
    ds = MyDataSet(paths, labels, transform=build_transform(B0, 32, train=False))
    assert make_loader(ds, 4, train=False, workers=0, device=torch.device("cpu")).pin_memory is False
    assert make_loader(ds, 4, train=False, workers=0, device=torch.device("cuda")).pin_memory is True


# ---------------------------------------------------------------------------------------------
# 11. the class-distribution plot
# ---------------------------------------------------------------------------------------------

def test_plot_class_distribution_writes_png(tmp_path):
    """plot_class_distribution writes a valid PNG larger than 100x100."""
    make_classes(tmp_path / "data", {"a": 6, "b": 3, "c": 9})
    split = read_split_data(str(tmp_path / "data"), 0.3, seed=0)
    assert isinstance(split, Split)
    out = tmp_path / "class_distribution.png"
    plot_class_distribution(split, str(out))
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size[0] > 100 and img.size[1] > 100
        img.verify()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary file left


# ---------------------------------------------------------------------------------------------
# 12. links, FIFOs, stray files, odd names and messy folders
# ---------------------------------------------------------------------------------------------

def test_symlink_loops_and_shared_files_count_each_real_file_once(tmp_path, capsys):
    """Links back up the tree (self -> ., up -> .., top -> ../..), a class folder linked from
    outside, links to another class's folder, sub-folder and file in either sorting order, and two
    links to one outside file: every real file is counted once, in the class whose folder holds
    it, in train or val but never both; each link left out is named."""
    root = tmp_path / "data"
    make_class(root / "a", 6)
    make_class(root / "b", 4, value=5)
    make_class(root / "b" / "sub", 2, value=3)
    make_class(tmp_path / "elsewhere", 6, value=7)
    png(tmp_path / "outside.png")
    os.symlink(".", root / "a" / "self")
    os.symlink("..", root / "a" / "up")
    os.symlink("../..", root / "b" / "top")
    os.symlink("../b/sub", root / "a" / "into_b")  # "a" is walked first: b's images stay b's
    os.symlink("../b/0.png", root / "a" / "b_file.png")
    os.symlink("../a", root / "b" / "to_a")
    os.symlink("../a/0.png", root / "b" / "zz_link.png")
    os.symlink(tmp_path / "elsewhere", root / "c")  # users link class folders in: that is a class
    for name in ("x.png", "y.png"):
        os.symlink(tmp_path / "outside.png", root / "a" / name)
    split = utils.read_split_data(str(root), 0.5, seed=0)
    assert split.classes == ["a", "b", "c"]
    images = split.train_images + split.val_images
    reals = [os.path.realpath(p) for p in images]
    assert len(images) == 19 and len(set(reals)) == 19  # 6 + 6 + 6 + outside.png once
    assert not {os.path.realpath(p) for p in split.train_images} & {os.path.realpath(p) for p in split.val_images}
    base = os.path.realpath(tmp_path)
    owner = {"data/a": 0, "outside.png": 0, "data/b": 1, "elsewhere": 2}  # where each real file lies
    for real, label in zip(reals, split.train_labels + split.val_labels):
        place = os.path.relpath(real, base)
        assert label == next(v for k, v in owner.items() if place.startswith(k)), (place, label)
    left_out = {os.path.basename(p): why for p, why in split.broken}
    assert set(left_out) == {"up", "top", "into_b", "b_file.png", "to_a", "zz_link.png", "y.png"}
    assert "class folder 'b'" in left_out["into_b"] and "class folder 'a'" in left_out["zz_link.png"]
    assert "back up" in left_out["up"] and "the same file as" in left_out["y.png"]
    assert "left out" in capsys.readouterr().err


def test_hard_links_to_one_file_count_once(tmp_path):
    """Two hard links to one image in a class (as copies made with cp -l are): one image, the other
    named; symbolic links were counted once already."""
    root = tmp_path / "data"
    make_class(root / "a", 3)
    make_class(root / "b", 3, value=9)
    os.link(root / "a" / "0.png", root / "a" / "z.png")
    os.link(root / "a" / "1.png", root / "b" / "z.png")  # in another class: the first class keeps it
    split = utils.read_split_data(str(root), 0.3, seed=0)
    images = split.train_images + split.val_images
    assert len(images) == 6 and not any(p.endswith("z.png") for p in images)
    why = dict(split.broken)
    assert why[str(root / "a" / "z.png")] == f"the same file as {root / 'a' / '0.png'}; counted once"
    assert str(root / "b" / "z.png") in why


def test_fifo_named_like_an_image_is_never_opened(tmp_path):
    """A FIFO called photo.jpg beside a good image: training's scan names it and goes on, predict.py
    predicts the good image and names the FIFO (in a folder and on the command line); nothing hangs."""
    data = tmp_path / "data"
    make_class(data / "a", 3)
    make_class(data / "b", 3, value=9)
    os.mkfifo(data / "a" / "photo.jpg")
    split = utils.read_split_data(str(data), 0.3, seed=0)
    assert len(split.train_images + split.val_images) == 6
    assert split.broken[0][0] == str(data / "a" / "photo.jpg") and "not a regular file" in split.broken[0][1]

    weights = tmp_path / "w.pth"
    torch.save(train_script.create_model("b0", 2).state_dict(), weights)
    for target in (data / "a", data / "a" / "photo.jpg"):
        result = run_script("predict.py", target, "--weights", weights, "--workers", "0", check=False, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "photo.jpg: error: not a regular file" in result.stderr
        assert ("0.png:" in result.stdout) == (target == data / "a")


def test_images_beside_the_class_folders_are_named(tmp_path, capsys):
    root = tmp_path / "data"
    make_class(root / "a", 3)
    make_class(root / "b", 3, value=9)
    png(root / "stray1.png")
    png(root / "STRAY2.PNG")
    split = utils.read_split_data(str(root), 0.3, seed=0)
    assert len(split.train_images + split.val_images) == 6
    err = capsys.readouterr().err
    assert err.count(f"2 image file(s) directly in {root} are not in a class folder; left out") == 1


def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    """A 101-byte 20000x1 PNG would become a 5-gigapixel image in evaluation's resize: the scan and
    predict.py name it, quickly, without decoding it."""
    thin = png(tmp_path / "data" / "a" / "thin.png", size=(20000, 1))
    assert os.path.getsize(thin) < 200
    make_class(tmp_path / "data" / "a", 2)
    make_class(tmp_path / "data" / "b", 2)
    assert "aspect ratio" in utils.check_image(thin)
    weights = tmp_path / "w.pth"
    torch.save(train_script.create_model("b0", 2).state_dict(), weights)
    started = time.time()
    result = run_script("predict.py", thin, "--weights", weights, check=False, timeout=120)
    assert result.returncode == 1 and "aspect ratio over 50:1" in result.stderr
    assert time.time() - started < 60
    assert utils.check_image(png(tmp_path / "panorama.png", size=(1200, 100))) is None  # 12:1 is fine


def test_file_names_that_are_not_utf8(tmp_path):
    """A class folder and a file whose names are not UTF-8: training splits and trains, predict.py
    prints, writes CSV (the names' bytes as on disk) and JSON (valid, escaped)."""
    data = tmp_path / "data"
    latin1 = os.fsdecode(b"caf\xe9")  # 'café' in Latin-1: not UTF-8
    copy_digits(data, classes=("0", "1"), per_class=6)
    copy_digits(data / "x", classes=("2",), per_class=6)
    os.rename(data / "x" / "2", data / latin1)
    os.rename(data / "1" / "0001.png", data / "1" / os.fsdecode(b"\xff\xfe.png"))
    out = tmp_path / "run"
    result = train("--data-path", data, "--output-dir", out, *FAST, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert torch.load(out / "best.pth", weights_only=True)["meta"]["classes"][2] == latin1

    csv_path = tmp_path / "p.csv"
    result = run_script("predict.py", data, "--weights", out / "best.pth", "--csv", csv_path)
    assert "Traceback" not in result.stderr and result.stdout.count("\n") == 18
    assert b"caf\xe9" in csv_path.read_bytes() and b"\xff\xfe.png" in csv_path.read_bytes()
    lines = run_script("predict.py", data, "--weights", out / "best.pth", "--json").stdout.splitlines()
    paths = [json.loads(line)["path"] for line in lines]
    assert sum(p.startswith(str(data / latin1)) for p in paths) == 6
    assert all(os.path.isfile(p) for p in paths)  # the escaped names decode to the files on disk


def test_messy_folder_still_trains(tmp_path):
    """Empty class folders, a class with one image, broken files of every kind, odd image modes,
    EXIF rotation, unicode and spaces: the run finishes and lists what it left out."""
    data = tmp_path / "messy data"
    copy_digits(data, classes=("0", "1"), per_class=6)
    (data / "empty class").mkdir()
    (data / "solo").mkdir()
    shutil.copy(os.path.join(ROOT, "data", "digits", "2", "0002.png"), data / "solo" / "only one.png")
    uni = data / "café au lait"
    uni.mkdir()
    base = Image.open(os.path.join(ROOT, "data", "digits", "3", "0003.png")).convert("RGB").resize((40, 30))
    base.convert("CMYK").save(uni / "cmyk ünï.jpg")
    Image.fromarray((torch.arange(40 * 30).reshape(30, 40) * 50).numpy().astype("uint16")).save(uni / "grey16.png")
    pal = base.convert("P")
    pal.info["transparency"] = 0
    pal.save(uni / "palette+alpha.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(uni / "rotated.jpg", exif=exif)
    base.save(uni / "plain.JPG")
    (data / "0" / "zero.jpg").write_bytes(b"")
    (data / "0" / "notes.png").write_text("not an image")
    full = (uni / "plain.JPG").read_bytes()
    (data / "1" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (data / "1" / ".DS_Store").write_bytes(b"\0\0")
    result = train("--data-path", data, "--output-dir", tmp_path / "run", *FAST, "--epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "empty class" in result.stderr and "skipped" in result.stderr
    assert "3 file(s) could not be used" in result.stderr
    assert all(name in result.stderr for name in ("zero.jpg", "notes.png", "truncated.jpg"))
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=True)
    assert best["meta"]["classes"] == ["0", "1", "café au lait", "solo"]


def test_the_uint8_training_crop_draws_as_torchvision_and_normalises_on_the_device():
    """TrainCrop (uint8 out, resized by PyTorch's kernels) takes torchvision's crops: over 300
    draws on an image whose pixels tell their own coordinates, the mean and spread of the crop's
    area and aspect ratio match torchvision's RandomResizedCrop on the PIL image, and half the
    crops are mirrored. Normalize then gives EvalTransform's arithmetic to the bit."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop
    w, h = 400, 300
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coded = torch.stack([xs * 255 // (w - 1), ys * 255 // (h - 1), torch.zeros_like(xs)], -1).to(torch.uint8)
    img = Image.fromarray(coded.numpy())

    def measured(out):  # the crop's area share, aspect ratio and whether it is mirrored, from its pixels
        red, green = out[0].float(), out[1].float()
        width = (red[:, -3:].mean() - red[:, :3].mean()) / 255 * (w - 1)
        height = (green[-3:].mean() - green[:3].mean()) / 255 * (h - 1)
        return abs(width) * height / (w * h), abs(width) / height, bool(width < 0)

    torch.manual_seed(0)
    ours = [measured(transforms.TrainCrop(64, (0.25, 1.0), "bicubic")(img)) for _ in range(300)]
    tv = RandomResizedCrop(64, scale=(0.25, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True)
    theirs = [measured(torch.as_tensor(np.array(tv(img))).permute(2, 0, 1)) for _ in range(300)]
    for i in (0, 1):
        a, b = torch.tensor([m[i] for m in ours]), torch.tensor([m[i] for m in theirs])
        assert abs(a.mean() - b.mean()) < 0.05 * b.mean() and abs(a.std() - b.std()) < 0.15 * b.std(), (i, a, b)
    assert 0.4 < sum(m[2] for m in ours) / 300 < 0.6 and not any(m[2] for m in theirs)
    out = transforms.TrainCrop(64, (0.25, 1.0), "bicubic")(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    v = VARIANTS["b0"]
    expected = out.float().mul_(1.0 / 255).sub(torch.tensor(v.mean).view(3, 1, 1)).div_(torch.tensor(v.std).view(3, 1, 1))
    assert torch.equal(transforms.Normalize(v.mean, v.std)(out.unsqueeze(0))[0], expected)
