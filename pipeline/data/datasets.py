"""Dataset sources and LR/HR pair making.

Sources put images in a folder (`export_skimage`, `copy_folder`; URLs live in
pipeline.data.fetch); `split` divides a dataset into disjoint train/test lists; `make_pair`
crops an HR image so its LR size is whole and makes the LR with `idm.resize.resize`.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np

from idm.files import naming
from idm.resize import paired_sizes, resize_uint8
from pipeline.data.images import IMAGE_SUFFIXES, list_images, read_image, write_image


def _skimage_loaders() -> dict:
    from skimage import data

    return {
        "astronaut": data.astronaut,
        "chelsea": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "hubble_deep_field": data.hubble_deep_field,
        "immunohistochemistry": data.immunohistochemistry,
        "retina": data.retina,
        "colorwheel": data.colorwheel,
        "motorcycle_left": lambda: data.stereo_motorcycle()[0],
        "motorcycle_right": lambda: data.stereo_motorcycle()[1],
    }


def export_skimage(names: list[str] | tuple[str, ...], dest: Path) -> list[Path]:
    """Write scikit-image's bundled photographs `names` as PNG files in `dest`."""
    loaders = _skimage_loaders()
    unknown = sorted(set(names) - set(loaders))
    if unknown:
        raise ValueError(f"unknown scikit-image photos {unknown}; expected names from {sorted(loaders)}")
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = dest / f"{name}.png"
        write_image(path, np.ascontiguousarray(loaders[name]()[..., :3]))
        paths.append(path)
    return paths


def copy_folder(src: Path, dest: Path) -> list[Path]:
    """Copy the image files of folder `src` (not recursive) into `dest`, byte for byte."""
    if not src.is_dir():
        raise ValueError(f"{src}: not a directory")
    images = list_images(src)
    if not images:
        raise ValueError(f"{src}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    dest.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in images:
        with naming(dest / path.name):  # os.sendfile's "No space left on device" names no file
            copies.append(Path(shutil.copy2(path, dest / path.name)))
    return copies


def split(names: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint (train, test) name lists; deterministic for a given seed and name set.

    At least one test image when test_fraction > 0, at least one training image when
    test_fraction < 1 and there are two or more images.
    """
    ordered = sorted(names)
    random.Random(seed).shuffle(ordered)
    n_test = round(test_fraction * len(ordered))
    if test_fraction > 0:
        n_test = max(n_test, 1)
    if test_fraction < 1 and len(ordered) > 1:
        n_test = min(n_test, len(ordered) - 1)
    return sorted(ordered[n_test:]), sorted(ordered[:n_test])


def scale_tag(scale: float) -> str:
    """'x4', 'x2.5': a scale as it appears in paths and metric names."""
    return f"x{scale:g}"


def center_crop(img: np.ndarray, side: int) -> np.ndarray:
    """Crop (H, W, C) `img` to at most side x side around its centre (side 0: unchanged)."""
    if side <= 0:
        return img
    h, w = img.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return img[top : top + side, left : left + side]


def make_pair(hr: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR) uint8 pair at `scale`: HR cropped top-left so the LR size is whole."""
    (hr_h, hr_w), lr_size = paired_sizes(hr.shape[:2], scale)
    hr = np.ascontiguousarray(hr[:hr_h, :hr_w])
    return hr, resize_uint8(hr, lr_size)


def read_all(paths: list[Path]) -> dict[str, np.ndarray]:
    """Read images (converted to 8-bit RGB) keyed by file stem; duplicate stems are an error."""
    images: dict[str, np.ndarray] = {}
    for path in paths:
        if path.stem in images:
            raise ValueError(f"{path}: two images share the name {path.stem!r}")
        images[path.stem] = read_image(path)
    return images
