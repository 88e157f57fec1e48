"""Dataset sources, the train/test split and LR/HR pair making."""

from __future__ import annotations

import pytest

from idm.resize import resize_uint8
from pipeline.data.datasets import (
    center_crop,
    copy_folder,
    export_skimage,
    make_pair,
    split,
)
from pipeline.data.images import read_image
from tests.helpers import photo


def test_split_is_disjoint_deterministic_and_complete():
    names = [f"img{i}" for i in range(10)]
    train, test = split(names, 0.3, seed=0)
    assert len(test) == 3 and len(train) == 7
    assert not set(train) & set(test) and set(train) | set(test) == set(names)
    assert split(list(reversed(names)), 0.3, seed=0) == (train, test)
    assert split(names, 0.3, seed=1) != (train, test)


@pytest.mark.parametrize("fraction, n_test", [(0.0, 0), (1.0, 5), (0.01, 1), (0.99, 4)])
def test_split_edges(fraction, n_test):
    assert len(split(list("abcde"), fraction, seed=0)[1]) == n_test


def test_make_pair_uses_the_resize_function():
    hr, lr = make_pair(photo(101, 77), 4)
    assert hr.shape == (100, 76, 3) and lr.shape == (25, 19, 3)
    assert (lr == resize_uint8(hr, (25, 19))).all()
    assert (hr == photo(101, 77)[:100, :76]).all(), "top-left crop"


def test_center_crop():
    img = photo(40, 60)
    assert center_crop(img, 32).shape == (32, 32, 3)
    assert (center_crop(img, 32) == img[4:36, 14:46]).all()
    assert center_crop(img, 0) is img


def test_export_skimage_writes_rgb_png(tmp_path):
    paths = export_skimage(["chelsea", "motorcycle_left"], tmp_path)
    assert [p.name for p in paths] == ["chelsea.png", "motorcycle_left.png"]
    assert read_image(paths[0]).shape == (300, 451, 3)
    with pytest.raises(ValueError, match="unknown scikit-image photos"):
        export_skimage(["lena"], tmp_path)


def test_copy_folder(tmp_path, image_folder):
    copied = copy_folder(image_folder, tmp_path / "copy")
    assert sorted(p.name for p in copied) == sorted(p.name for p in image_folder.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        copy_folder(empty, tmp_path / "x")
    with pytest.raises(ValueError, match="not a directory"):
        copy_folder(tmp_path / "missing", tmp_path / "y")
