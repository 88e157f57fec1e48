"""hf_ratio and laplacian_energy (pipeline.evaluation.metrics): golden values and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import skimage.data

from pipeline.evaluation import metrics
from pipeline.evaluation.metrics import MetricUnavailable, hf_ratio, laplacian_energy, rgb_to_y
from tests.helpers import photo

ASTRONAUT = skimage.data.astronaut()[100:196, 200:296]  # 96x96 px of face, hair and helmet


def grey(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 255] -> (H, W, 3) uint8 grey image."""
    return np.repeat(np.round(values)[..., None], 3, axis=2).astype(np.uint8)


def blur(img: np.ndarray, sigma: float, mode: str = "reflect") -> np.ndarray:
    smooth = scipy.ndimage.gaussian_filter(img.astype(np.float64), sigma=(sigma, sigma, 0), mode=mode)
    return smooth.round().astype(np.uint8)


def test_laplacian_energy_is_the_five_point_stencil_on_y() -> None:
    img = photo(20, 17, seed=3)
    y = rgb_to_y(img)
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]  # rows/cols 1..-2
    assert laplacian_energy(img, border=1) == pytest.approx(np.mean(lap**2), rel=1e-12)
    assert laplacian_energy(img, border=3) == pytest.approx(np.mean(lap[2:-2, 2:-2] ** 2), rel=1e-12)


def test_identical_images_give_exactly_one() -> None:
    for img in (ASTRONAUT, photo(33, 41, seed=1)):
        assert hf_ratio(img, img, border=4) == 1.0


def test_contrast_scaled_by_c_gives_c_squared() -> None:
    """Y - 16 is linear in RGB, and the Laplacian ignores the offset: half the contrast, a quarter the energy."""
    half = photo(40, 40, seed=2) // 2
    assert hf_ratio(half, half * 2, border=2) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_blurred_sinusoid_loses_the_filters_squared_gain(sigma: float) -> None:
    """A Gaussian blur multiplies a sinusoid of angular frequency w by H(w) = sum g_k cos(w k) / sum g_k
    (scipy's sampled kernel, radius round(4 sigma)), so its Laplacian energy by H(w)^2; uint8 rounding
    of both images moves the ratio by < 2% at an 8 px period and amplitude 100."""
    w = 2 * np.pi / 8
    hr = grey(np.tile(128 + 100 * np.sin(w * np.arange(96)), (96, 1)))
    k = np.arange(-int(4 * sigma + 0.5), int(4 * sigma + 0.5) + 1)
    g = np.exp(-(k**2) / (2 * sigma**2))
    gain = (g * np.cos(w * k)).sum() / g.sum()
    assert hf_ratio(blur(hr, sigma, mode="wrap"), hr, border=4) == pytest.approx(gain**2, rel=0.02)


def test_blurred_photo_golden_value() -> None:
    """Computed once (scipy 1.x gaussian_filter, sigma 1 px): a 1 px blur keeps ~10% of the fine detail."""
    assert hf_ratio(blur(ASTRONAUT, 1.0), ASTRONAUT, border=4) == pytest.approx(0.1013876, abs=1e-6)
    assert hf_ratio(blur(ASTRONAUT, 2.0), ASTRONAUT, border=4) < hf_ratio(blur(ASTRONAUT, 1.0), ASTRONAUT, border=4)


def test_added_noise_is_more_than_the_ground_truth() -> None:
    rng = np.random.default_rng(0)
    noisy = np.clip(ASTRONAUT + rng.normal(0, 10, ASTRONAUT.shape), 0, 255).round().astype(np.uint8)
    assert hf_ratio(noisy, ASTRONAUT, border=4) == pytest.approx(2.2035609, abs=1e-6)


def test_only_pixels_inside_the_border_count() -> None:
    hr = photo(30, 30, seed=4)
    sr = hr.copy()
    sr[:3], sr[:, -3:] = 0, 255  # changes within 3 px of the edge: outside the border-4 crop
    assert hf_ratio(sr, hr, border=4) == 1.0
    assert hf_ratio(sr, hr, border=2) > 1.0


def test_flat_ground_truth_is_unavailable_not_a_division_by_zero() -> None:
    flat = np.full((24, 24, 3), 77, np.uint8)
    ramp = grey(np.tile(np.arange(24) * 10.0, (24, 1)))  # linear in x: no curvature either
    for hr in (flat, ramp):
        with pytest.raises(MetricUnavailable, match="HR image has no fine detail"):
            hf_ratio(photo(24, 24), hr, border=2)
    assert hf_ratio(flat, photo(24, 24), border=2) == 0.0  # a flat output of a detailed image: no detail at all


def test_bad_inputs_raise() -> None:
    img = photo(16, 16)
    with pytest.raises(ValueError, match="same shape"):
        hf_ratio(img, img[:15], border=2)
    with pytest.raises(TypeError, match="uint8"):
        hf_ratio(img.astype(np.float32), img, border=2)
    with pytest.raises(ValueError, match="border must be >= 1"):
        laplacian_energy(img, border=0)
    with pytest.raises(ValueError, match="leaves nothing"):
        hf_ratio(img, img, border=metrics.border_for(8))
