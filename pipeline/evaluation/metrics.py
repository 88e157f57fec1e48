"""Image-quality metrics for super-resolution, computed the way SR papers compute them.

Every image argument is an (H, W, 3) uint8 numpy array, RGB, in [0, 255].

- `psnr`, `ssim`: BasicSR conventions, as SR papers report them (docs/metrics.md): on [0, 255],
  `border_for(scale)` pixels cropped from every side, on the BT.601 Y channel or on RGB;
  SSIM with an 11x11 Gaussian window, sigma 1.5 (Wang et al. 2004). Computed with
  torchmetrics; tests/pipeline/evaluation/test_metrics.py checks them against skimage.metrics.
- `hf_ratio`: fine detail without weights, the energy of the discrete Laplacian of the
  output's BT.601 Y over that of the ground truth's (same border crop as PSNR): 1 = as
  much fine detail as the real photo, below 1 smoother, above 1 noisier or over-sharpened.
- `lr_consistency`: SR3/IDM consistency, the MSE between the downsampled output and the
  LR input on [0, 1] (papers report it x1e-5).
- `LPIPS` (AlexNet) and `InceptionDistances` (FID and KID on Inception-v3 pool3 features
  of fixed-size patches): their pretrained backbones are read from a given file (which
  pipeline.evaluation.weights finds or downloads). Nothing here downloads: a missing or
  unreadable file raises `MetricUnavailable` naming the path, so a randomly initialised
  network never reports a number under the metric's name.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lpips
import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision
from skimage.metrics import structural_similarity
from torch import Tensor
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image.fid import NoTrainInceptionV3

from idm.resize import resize

# BT.601 luma weights for RGB in [0, 1], giving Y in [16, 235] (BasicSR rgb2ycbcr, y_only=True).
_BT601_Y = np.array([65.481, 128.553, 24.966])
# Laplacian energy below which an image has no fine detail (hf_ratio's reference): above float64
# rounding on a flat or linear Y (~1e-27), far below one blue level in one pixel of a 9 Mpx image (2e-8).
_NO_DETAIL = 1e-15
_SSIM_SIGMA = 1.5
_SSIM_KERNEL = 11


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed honestly (missing weights, too few images); says why."""


def border_for(scale: float) -> int:
    """Pixels to crop from each side before PSNR/SSIM at `scale`: ceil(scale), as in BasicSR."""
    if not scale >= 1:
        raise ValueError(f"scale must be a number >= 1, got {scale!r}")
    return math.ceil(scale)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of an (H, W, 3) uint8 RGB image in [0, 255].

    Returns (H, W) float64 in [16, 235], unrounded: Y = 16 + 65.481 R + 128.553 G + 24.966 B
    with R, G, B in [0, 1] (ITU-R BT.601; BasicSR's rgb2ycbcr with y_only=True).
    """
    _check_image(img)
    return 16.0 + (img.astype(np.float64) / 255.0) @ _BT601_Y


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
    """`img` (H, W) or (H, W, C) without `border` pixels on each of its four sides."""
    height, width = img.shape[:2]
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if 2 * border >= min(height, width):
        raise ValueError(f"border {border} leaves nothing of a {height}x{width} image")
    return img[border : height - border, border : width - border]


def psnr(sr: np.ndarray, hr: np.ndarray, *, border: int, y_channel: bool) -> float:
    """PSNR in dB on [0, 255] of (H, W, 3) uint8 RGB images; inf when they are identical.

    border: pixels cropped from each side first (`border_for(scale)`).
    y_channel: compare BT.601 Y (`rgb_to_y`) instead of all three RGB channels.
    """
    x, y = _prepare_pair(sr, hr, border=border, y_channel=y_channel)
    # torchmetrics computes 2 ln(255) - ln(mse), so mse == 0 gives +inf without a warning.
    # Its constants ln(255) and 10/ln(10) are float32 tensors: results can differ from a
    # float64 formula by ~1e-5 dB, far below the 0.01 dB that papers report.
    return float(peak_signal_noise_ratio(x, y, data_range=255.0))


def ssim(sr: np.ndarray, hr: np.ndarray, *, border: int, y_channel: bool) -> float:
    """SSIM (Wang et al. 2004) of (H, W, 3) uint8 RGB images in [0, 255]; RGB = channel mean.

    11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, averaged over the
    window positions that lie fully inside the (border-cropped) image, as Wang et al.'s
    MATLAB code, BasicSR and skimage do. The cropped image must be at least 11x11.
    """
    _check_pair(sr, hr)
    x, y = (rgb_to_y(sr), rgb_to_y(hr)) if y_channel else (sr.astype(np.float64), hr.astype(np.float64))
    x, y = crop_border(x, border), crop_border(y, border)
    if min(x.shape[:2]) < _SSIM_KERNEL:
        raise ValueError(f"SSIM needs at least {_SSIM_KERNEL}x{_SSIM_KERNEL} px after the border crop, "
                         f"got {x.shape[0]}x{x.shape[1]}")
    # skimage rather than torchmetrics: same numbers (tests cross-check the two), but
    # torchmetrics in float64 is ~30x slower on CPU and float32 loses ~1e-5 of SSIM.
    return float(structural_similarity(
        x, y, gaussian_weights=True, sigma=_SSIM_SIGMA, win_size=_SSIM_KERNEL, use_sample_covariance=False,
        data_range=255.0, K1=0.01, K2=0.03, channel_axis=None if y_channel else -1,
    ))


def laplacian_energy(img: np.ndarray, *, border: int) -> float:
    """Mean square of the 5-point discrete Laplacian (scipy.ndimage.laplace) of the BT.601 Y
    (`rgb_to_y`, on [16, 235]) of an (H, W, 3) uint8 RGB image, over the pixels left after
    cropping `border` >= 1 from each side (so no value depends on the padding). >= 0; 0 (to
    float rounding) where Y has no curvature (flat, or a linear ramp). It weighs each spatial
    frequency by the fourth power of its magnitude, so the finest detail dominates it."""
    if border < 1:
        raise ValueError(f"border must be >= 1 (the Laplacian reads one pixel around each), got {border}")
    lap = scipy.ndimage.laplace(rgb_to_y(img))
    return float(np.mean(np.square(crop_border(lap, border))))


def hf_ratio(sr: np.ndarray, hr: np.ndarray, *, border: int) -> float:
    """Fine detail of an SR output relative to its ground truth: `laplacian_energy(sr)` /
    `laplacian_energy(hr)`, both (H, W, 3) uint8 RGB in [0, 255], cropped by `border` (as PSNR).

    In [0, inf): 1.0 = as much fine-detail energy as the ground truth, below 1 smoother,
    above 1 noisier or over-sharpened; 1.0 exactly for identical images. It says how much
    detail, not whether it is the right detail (PSNR/LPIPS do). Raises MetricUnavailable when
    the HR has no such energy (a flat or linear Y), as the ratio is then undefined. It needs
    no pretrained weights, unlike LPIPS/FID, and is valid at any image size, unlike NIQE.
    """
    _check_pair(sr, hr)
    reference = laplacian_energy(hr, border=border)
    if reference < _NO_DETAIL:
        raise MetricUnavailable("hf_ratio: the HR image has no fine detail (its Y Laplacian is 0 after the "
                                f"{border} px border crop: a flat or linear Y), so the ratio is undefined")
    return laplacian_energy(sr, border=border) / reference


def lr_consistency(sr: np.ndarray, lr: np.ndarray) -> float:
    """SR3/IDM consistency: MSE between `resize(sr)` to the LR size and `lr`, both on [0, 1].

    sr: (H, W, 3) uint8 RGB output in [0, 255]; lr: (h, w, 3) uint8 RGB input in [0, 255].
    The downsampled output is neither rounded nor clamped. Papers report the value x1e-5.
    """
    _check_image(sr)
    _check_image(lr)
    down = resize(_to_tensor(sr, torch.float64) / 255.0, lr.shape[:2])
    return float(F.mse_loss(down, _to_tensor(lr, torch.float64) / 255.0))


class LPIPS:
    """LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018), via the `lpips` package.

    The linear heads ship in the lpips wheel; the AlexNet trunk is read from `path`, a
    torchvision AlexNet state dict. Raises MetricUnavailable if that file is missing or is
    not one. Lower is better; 0 for identical images.
    """

    def __init__(self, path: Path, *, device: str | torch.device = "cpu") -> None:
        state = _read_state_dict(path, what="LPIPS (AlexNet trunk)")
        with warnings.catch_warnings():
            # lpips still calls torchvision's alexnet(pretrained=...), deprecated since 0.13.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
            # pnet_rand=True builds the trunk as alexnet(weights=None): no code path can
            # download. Every trunk weight is then overwritten from `path` below.
            net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
        _load_alexnet_trunk(net.net, state, path)
        self.device = torch.device(device)
        self._net = net.eval().to(self.device)

    def __call__(self, sr: np.ndarray, hr: np.ndarray) -> float:
        """LPIPS distance of two (H, W, 3) uint8 RGB images in [0, 255] (scaled to [-1, 1])."""
        _check_pair(sr, hr)
        x, y = (_to_tensor(img, torch.float32).to(self.device) / 127.5 - 1.0 for img in (sr, hr))
        with torch.inference_mode():
            return float(self._net(x, y))


class InceptionDistances:
    """FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) between SR and HR patches.

    Each `update` cuts the SR image and its HR reference into the same non-overlapping
    `patch` x `patch` squares (from the top left; a remainder narrower than `patch` is
    dropped) and keeps their 2048 Inception-v3 pool3 features: torch-fidelity's port of the
    TF Inception (the network of the original FID code, via torchmetrics' wrapper, which
    resizes every patch to 299x299), read from `path`. FID and KID are then torch-fidelity's
    own formulas. Patches make the sample count large enough on small test sets; FID's
    estimate is dominated by bias below ~2048 samples (its covariance is then singular),
    while KID is unbiased, so the two come with separate minimum counts.
    Raises MetricUnavailable if the weights file is missing or unusable.
    """

    def __init__(self, path: Path, *, patch: int = 64, device: str | torch.device = "cpu") -> None:
        if patch < 16:
            raise ValueError(f"patch must be >= 16 px, got {patch}")
        # A safe (weights_only) read first: torch-fidelity then loads the same file with
        # weights_only=False, which would run any code pickled into it.
        _read_state_dict(path, what="FID/KID (Inception-v3)")
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(path))
        except RuntimeError as err:  # strict load_state_dict: missing keys or wrong shapes
            raise MetricUnavailable(f"{path} is not a torch-fidelity Inception-v3 state dict: {err}") from err
        self.device = torch.device(device)
        self.patch = patch
        self._net = net.to(self.device)
        self._real: list[Tensor] = []
        self._fake: list[Tensor] = []

    @property
    def count(self) -> int:
        """Patches seen so far (per side: SR and HR have the same number)."""
        return sum(len(f) for f in self._real)

    def update(self, sr: np.ndarray, hr: np.ndarray) -> None:
        """Add the patches of one (H, W, 3) uint8 RGB output and of its reference (same shape)."""
        _check_pair(sr, hr)
        for img, store in ((hr, self._real), (sr, self._fake)):
            patches = _patches(_to_tensor(img, torch.uint8), self.patch)
            if len(patches):
                with torch.inference_mode():
                    store.append(self._net(patches.to(self.device)).double().cpu())

    def fid(self, min_patches: int) -> float:
        """FID between the SR and HR patches; MetricUnavailable below `min_patches` (at least 2)."""
        real, fake = self._features(max(min_patches, 2), "FID")
        stats = [fid_features_to_statistics(f) for f in (fake, real)]
        return float(fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"])

    def kid(self, min_patches: int, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
        """KID (mean over `subsets` random subsets of min(subset_size, count) patches, polynomial
        kernel); MetricUnavailable below `min_patches` (at least 2)."""
        real, fake = self._features(max(min_patches, 2), "KID")
        size = min(subset_size, len(real))
        out = kid_features_to_metric(fake.float(), real.float(), kid_subsets=subsets, kid_subset_size=size,
                                     rng_seed=seed, verbose=False)
        return float(out[KEY_METRIC_KID_MEAN])

    def _features(self, minimum: int, what: str) -> tuple[Tensor, Tensor]:
        if self.count < minimum:
            raise MetricUnavailable(f"{what} needs at least {minimum} patches of {self.patch}x{self.patch} px, "
                                    f"got {self.count}")
        real, fake = torch.cat(self._real), torch.cat(self._fake)
        if not (real.isfinite().all() and fake.isfinite().all()):
            raise MetricUnavailable(f"{what}: the Inception features are not finite; are the weights the FID network's?")
        return real, fake


def _patches(img: Tensor, size: int) -> Tensor:
    """(1, C, H, W) -> (n, C, size, size): the non-overlapping squares from the top left, row-major."""
    _, c, h, w = img.shape
    rows, cols = h // size, w // size
    grid = img[0, :, : rows * size, : cols * size].reshape(c, rows, size, cols, size)
    return grid.permute(1, 3, 0, 2, 4).reshape(rows * cols, c, size, size)


def _check_image(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 numpy array, got {type(img).__name__} "
                        f"of dtype {getattr(img, 'dtype', None)}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")


def _check_pair(sr: np.ndarray, hr: np.ndarray) -> None:
    _check_image(sr)
    _check_image(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {sr.shape} and {hr.shape}")


def _to_tensor(img: np.ndarray, dtype: torch.dtype) -> Tensor:
    """(H, W, C) or (H, W) array -> (1, C, H, W) tensor of `dtype` (values unchanged)."""
    if img.ndim == 2:
        img = img[..., None]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0).to(dtype)


def _prepare_pair(sr: np.ndarray, hr: np.ndarray, *, border: int, y_channel: bool) -> tuple[Tensor, Tensor]:
    """Checked, channel-selected, border-cropped (1, C, H, W) float64 tensors on [0, 255]."""
    _check_pair(sr, hr)
    pair = (rgb_to_y(sr), rgb_to_y(hr)) if y_channel else (sr, hr)
    x, y = (_to_tensor(crop_border(img, border), torch.float64) for img in pair)
    return x, y


def _read_state_dict(path: Path, *, what: str) -> dict[str, Tensor]:
    """Read a state dict from `path` without downloading or unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise MetricUnavailable(f"{what} needs pretrained weights at {path}, which does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # A damaged file can fail in many ways (UnpicklingError, RuntimeError, EOFError, ...).
    except Exception as err:
        raise MetricUnavailable(f"cannot read the {what} weights {path}: {err}") from err
    if not isinstance(state, dict):
        raise MetricUnavailable(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_alexnet_trunk(trunk: torch.nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Copy a torchvision AlexNet state dict into lpips' trunk (alexnet.features in 5 slices)."""
    alexnet = torchvision.models.alexnet(weights=None)
    try:
        alexnet.load_state_dict(state)  # strict: every key and shape of a torchvision AlexNet
    except RuntimeError as err:
        raise MetricUnavailable(f"{path} is not a torchvision AlexNet state dict: {err}") from err
    # lpips keeps the torchvision index of each layer as its name inside the slices.
    for stage in trunk.children():
        for index, layer in stage.named_children():
            layer.load_state_dict(alexnet.features[int(index)].state_dict())
