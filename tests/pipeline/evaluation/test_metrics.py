"""Tests for pipeline.evaluation.metrics.

PSNR/SSIM are checked against skimage.metrics on the same crops; LPIPS and FID run their
real loading and forward paths on fabricated weights files in a temporary $TORCH_HOME,
with the network blocked so that an accidental download fails the test.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import lpips
import numpy as np
import pytest
import skimage.color
import skimage.metrics
import torch
import torchvision
from torchmetrics.functional.image import structural_similarity_index_measure

from idm.resize import resize_uint8
from pipeline.evaluation import metrics, weights
from tests.helpers import inception_network

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ---------------------------------------------------------------- images

def random_pair(seed: int, shape: tuple[int, int, int] = (48, 40, 3)) -> tuple[np.ndarray, np.ndarray]:
    """(sr, hr): uniform noise and a noisy copy of it."""
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, shape, dtype=np.uint8)
    sr = np.clip(hr + rng.normal(0, 12, shape), 0, 255).round().astype(np.uint8)
    return sr, hr


def structured_pair(seed: int, shape: tuple[int, int, int] = (48, 40, 3)) -> tuple[np.ndarray, np.ndarray]:
    """(sr, hr): gradients and a checkerboard, and a shifted, slightly noisy copy."""
    rng = np.random.default_rng(seed)
    height, width, _ = shape
    yy, xx = np.mgrid[:height, :width]
    checker = ((yy // 7 + xx // 5) % 2) * 180 + 30
    hr = np.stack([xx * 255 / (width - 1), yy * 255 / (height - 1), checker], axis=-1)
    sr = np.roll(hr, 1, axis=1) + rng.normal(0, 3, shape)
    return np.clip(sr, 0, 255).round().astype(np.uint8), hr.round().astype(np.uint8)


def smooth_image(height: int, width: int) -> np.ndarray:
    """A smooth image well inside [0, 255], so bicubic never over/undershoots the range."""
    yy, xx = np.mgrid[:height, :width] / 8.0
    channels = [128 + 60 * np.sin(xx + c) * np.cos(0.7 * yy - c) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def reference_arrays(sr: np.ndarray, hr: np.ndarray, border: int,
                     y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """The arrays skimage should compare: cropped, float64, Y via skimage's own BT.601."""
    def prep(img: np.ndarray) -> np.ndarray:
        img = skimage.color.rgb2ycbcr(img)[..., 0] if y_channel else img.astype(np.float64)
        return img[border:-border, border:-border]
    return prep(sr), prep(hr)


PAIRS = [random_pair, structured_pair]
METRIC_FILES = [(metrics.LPIPS, ALEXNET_FILE), (metrics.InceptionDistances, INCEPTION_FILE)]


# ---------------------------------------------------------------- PSNR / SSIM

@pytest.mark.parametrize("make_pair", PAIRS)
@pytest.mark.parametrize("border", [2, 3, 4])
@pytest.mark.parametrize("y_channel", [True, False])
def test_psnr_matches_skimage(make_pair, border: int, y_channel: bool) -> None:
    sr, hr = make_pair(seed=border)
    x, y = reference_arrays(sr, hr, border, y_channel)
    expected = skimage.metrics.peak_signal_noise_ratio(y, x, data_range=255)
    # 1e-5 dB: torchmetrics keeps its ln(255) and 10/ln(10) constants in float32.
    assert metrics.psnr(sr, hr, border=border, y_channel=y_channel) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("make_pair", PAIRS)
@pytest.mark.parametrize("border", [2, 3, 4])
@pytest.mark.parametrize("y_channel", [True, False])
def test_ssim_matches_skimage_and_torchmetrics(make_pair, border: int, y_channel: bool) -> None:
    sr, hr = make_pair(seed=10 + border)
    x, y = reference_arrays(sr, hr, border, y_channel)
    expected = skimage.metrics.structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
        channel_axis=None if y_channel else -1,
    )
    ours = metrics.ssim(sr, hr, border=border, y_channel=y_channel)
    assert ours == pytest.approx(expected, abs=1e-9)
    # An independent implementation: torchmetrics' full SSIM map without its padded 5 px rim.
    to_t = lambda a: torch.from_numpy(a if a.ndim == 3 else a[..., None]).permute(2, 0, 1)[None]
    _, full = structural_similarity_index_measure(
        to_t(x), to_t(y), gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=255.0, return_full_image=True)
    assert ours == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-9)


def test_psnr_of_constant_offset_is_exact() -> None:
    hr = np.random.default_rng(0).integers(0, 251, (32, 32, 3), dtype=np.uint8)
    value = metrics.psnr(hr + 5, hr, border=0, y_channel=False)
    assert value == pytest.approx(20 * math.log10(255 / 5), abs=1e-5)


@pytest.mark.parametrize("y_channel", [True, False])
def test_identical_images(y_channel: bool) -> None:
    img, _ = random_pair(seed=1)
    assert metrics.psnr(img, img.copy(), border=4, y_channel=y_channel) == math.inf
    assert metrics.ssim(img, img.copy(), border=4, y_channel=y_channel) == pytest.approx(1.0, abs=1e-12)


def test_rgb_to_y_golden_values() -> None:
    img = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    y = metrics.rgb_to_y(img)
    assert y.dtype == np.float64 and y.shape == (1, 5)
    np.testing.assert_allclose(y[0], [235.0, 16.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-12)


def test_rgb_to_y_matches_skimage_unrounded() -> None:
    _, img = random_pair(seed=2)
    np.testing.assert_allclose(metrics.rgb_to_y(img), skimage.color.rgb2ycbcr(img)[..., 0], atol=1e-9)


def test_border_for() -> None:
    assert [metrics.border_for(s) for s in (2, 3, 4, 2.5, 8, 12)] == [2, 3, 4, 3, 8, 12]
    with pytest.raises(ValueError, match="scale"):
        metrics.border_for(0.5)


def test_crop_border() -> None:
    img = np.arange(6 * 5).reshape(6, 5)
    np.testing.assert_array_equal(metrics.crop_border(img, 2), img[2:4, 2:3])
    assert metrics.crop_border(img, 0).shape == (6, 5)
    with pytest.raises(ValueError, match="leaves nothing"):
        metrics.crop_border(img, 3)


def test_bad_inputs_raise() -> None:
    sr, hr = random_pair(seed=3)
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(sr[:-1], hr, border=2, y_channel=True)
    with pytest.raises(TypeError, match="uint8"):
        metrics.psnr(sr.astype(np.float32), hr, border=2, y_channel=True)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        metrics.ssim(sr[..., :1], hr[..., :1], border=2, y_channel=False)
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(sr[:16, :16], hr[:16, :16], border=4, y_channel=True)


# ---------------------------------------------------------------- consistency

def test_lr_consistency_golden_value() -> None:
    sr = np.full((64, 48, 3), 100, dtype=np.uint8)
    lr = np.full((16, 12, 3), 100, dtype=np.uint8)
    assert metrics.lr_consistency(sr, lr) == pytest.approx(0.0, abs=1e-20)
    assert metrics.lr_consistency(sr, lr + 10) == pytest.approx((10 / 255) ** 2, rel=1e-9)


def test_lr_consistency_of_own_downsample_is_rounding_noise() -> None:
    # lr made from sr by the same resize, then rounded to uint8: each pixel is off by at
    # most 0.5/255, and rounding errors are ~uniform, so the MSE is about 1/12 / 255^2.
    sr = smooth_image(96, 80)
    lr = resize_uint8(sr, (24, 20))
    value = metrics.lr_consistency(sr, lr)
    assert 0 < value <= (0.5 / 255) ** 2
    assert value == pytest.approx(1 / 12 / 255**2, rel=0.3)


def test_lr_consistency_detects_another_downsampler() -> None:
    sr, _ = structured_pair(seed=4, shape=(96, 80, 3))
    nearest = np.ascontiguousarray(sr[::4, ::4])
    assert metrics.lr_consistency(sr, nearest) > 100 * metrics.lr_consistency(sr, resize_uint8(sr, (24, 20)))


# ---------------------------------------------------------------- LPIPS / FID weights

@pytest.fixture
def checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $TORCH_HOME; returns its hub checkpoints directory (not yet created)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # drop any torch.hub.set_dir(); restored after
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("metrics tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def fake_inception_state() -> dict[str, torch.Tensor]:
    """A seeded random state dict with the keys and shapes of torch-fidelity's Inception-v3."""
    torch.manual_seed(0)
    net = inception_network()
    # He init keeps activations O(1) through the 90-odd layers; the default init shrinks
    # them into subnormal floats, which are slow on CPU and give FIDs of ~1e-15.
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.state_dict()


def fake_alexnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).state_dict()


def test_weight_paths_follow_torch_home(checkpoints: Path) -> None:
    assert weights.path_of("lpips") == checkpoints / ALEXNET_FILE
    assert weights.path_of("fid") == checkpoints / INCEPTION_FILE


@pytest.mark.parametrize("metric_cls, file_name", METRIC_FILES)
def test_missing_weights_are_unavailable(checkpoints: Path, no_network: None, metric_cls,
                                         file_name: str) -> None:
    with pytest.raises(metrics.MetricUnavailable) as info:
        metric_cls(checkpoints / file_name)
    assert str(checkpoints / file_name) in str(info.value)


@pytest.mark.parametrize("metric_cls, file_name", METRIC_FILES)
@pytest.mark.parametrize("content", ["corrupt", "incompatible"])
def test_bad_weights_are_unavailable(checkpoints: Path, no_network: None, metric_cls, file_name: str,
                                     content: str) -> None:
    checkpoints.mkdir(parents=True)
    path = checkpoints / file_name
    if content == "corrupt":
        path.write_bytes(b"this is not a checkpoint")
    else:
        torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(metrics.MetricUnavailable) as info:
        metric_cls(path)
    assert str(path) in str(info.value)


def test_lpips_uses_the_weights_file(checkpoints: Path, no_network: None) -> None:
    fake = fake_alexnet_state()
    checkpoints.mkdir(parents=True)
    torch.save(fake, checkpoints / ALEXNET_FILE)
    torch.manual_seed(123)  # a random init would now differ from `fake`
    metric = metrics.LPIPS(checkpoints / ALEXNET_FILE)

    x, y = random_pair(seed=5, shape=(64, 64, 3))
    assert metric(x, x) == 0.0
    assert 0 < metric(x, y) < math.inf

    loaded = {name.split(".", 1)[1]: p for name, p in metric._net.net.named_parameters()}  # slice2.3.w -> 3.w
    trunk = {key.removeprefix("features."): p for key, p in fake.items() if key.startswith("features.")}
    assert loaded.keys() == trunk.keys()
    assert all(torch.equal(loaded[key], trunk[key]) for key in trunk)
    heads_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    heads = torch.load(heads_file, map_location="cpu", weights_only=True)
    assert torch.equal(metric._net.lin0.model[1].weight, heads["lin0.model.1.weight"])


def test_fid_and_kid_use_the_weights_file_on_patches(checkpoints: Path, no_network: None, fake_inception_state) -> None:
    checkpoints.mkdir(parents=True)
    torch.save(fake_inception_state, checkpoints / INCEPTION_FILE)
    rng = np.random.default_rng(6)
    # 40x33 px in patches of 16: 2 x 2 patches per image (the remainder is dropped), 8 per set.
    images = [rng.integers(0, 256, (40, 33, 3), dtype=np.uint8) for _ in range(2)]
    others = [structured_pair(seed, shape=(40, 33, 3))[1] for seed in range(2)]

    same = metrics.InceptionDistances(checkpoints / INCEPTION_FILE, patch=16)
    different = metrics.InceptionDistances(checkpoints / INCEPTION_FILE, patch=16)
    loaded = same._net.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in fake_inception_state.items())
    for img, other in zip(images, others):
        same.update(img, img)
        different.update(other, img)
    assert same.count == different.count == 8
    distance = different.fid(min_patches=8)  # each FID is an eigendecomposition of a 2048x2048 matrix
    assert 0 < distance < math.inf
    assert same.fid(min_patches=8) == pytest.approx(0.0, abs=1e-3 * distance)
    # With subsets as large as the sets, KID is the unbiased MMD^2 of all patches, cubic kernel (x.y/d + 1)^3.
    real, fake = (torch.cat(f).double() for f in (different._real, different._fake))
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    m = len(real)
    off_diagonal = lambda a: (k(a, a).sum() - k(a, a).diagonal().sum()) / (m * (m - 1))  # noqa: E731
    expected = float(off_diagonal(real) + off_diagonal(fake) - 2 * k(real, fake).mean())
    assert different.kid(min_patches=8) == pytest.approx(expected, rel=1e-3)
    with pytest.raises(metrics.MetricUnavailable, match="FID needs at least 9 patches of 16x16 px, got 8"):
        different.fid(min_patches=9)
    with pytest.raises(metrics.MetricUnavailable, match="KID needs at least 100 patches"):
        different.kid(min_patches=100)


def test_patches_are_the_non_overlapping_squares_from_the_top_left() -> None:
    img = torch.arange(2 * 5 * 7).reshape(1, 2, 5, 7)
    patches = metrics._patches(img, 3)
    assert patches.shape == (2, 2, 3, 3)  # rows 0-2 x cols 0-2 and 3-5; row 3-4 and col 6 dropped
    assert torch.equal(patches[1], img[0, :, 0:3, 3:6])
