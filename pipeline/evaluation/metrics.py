"""Image-quality metrics for super-resolution, computed the way SR papers compute them.

Every image argument is an (H, W, 3) uint8 numpy array, RGB, in [0, 255].

- `psnr`, `ssim`: BasicSR conventions (REFERENCE.md, "Metrics conventions"): on [0, 255],
  `border_for(scale)` pixels cropped from every side, on the BT.601 Y channel or on RGB;
  SSIM with an 11x11 Gaussian window, sigma 1.5 (Wang et al. 2004). Computed with
  torchmetrics; tests/pipeline/evaluation/test_metrics.py checks them against skimage.metrics.
- `lr_consistency`: SR3/IDM consistency, the MSE between the downsampled output and the
  LR input on [0, 1] (papers report it x1e-5).
- `LPIPS` (AlexNet) and `FID` (Inception-v3 pool3): the pretrained backbones are read from
  the torch hub cache, `torch.hub.get_dir()/checkpoints` (so $TORCH_HOME moves it). Nothing
  here downloads: a missing or unreadable file raises `MetricUnavailable` naming the path,
  so a randomly initialised network never reports a number under the metric's name.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lpips
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from skimage.metrics import structural_similarity
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image.fid import FrechetInceptionDistance

from idm.resize import resize

# BT.601 luma weights for RGB in [0, 1], giving Y in [16, 235] (BasicSR rgb2ycbcr, y_only=True).
_BT601_Y = np.array([65.481, 128.553, 24.966])
_SSIM_SIGMA = 1.5
_SSIM_KERNEL = 11
_ALEXNET_URL = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url


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


def lr_consistency(sr: np.ndarray, lr: np.ndarray) -> float:
    """SR3/IDM consistency: MSE between `resize(sr)` to the LR size and `lr`, both on [0, 1].

    sr: (H, W, 3) uint8 RGB output in [0, 255]; lr: (h, w, 3) uint8 RGB input in [0, 255].
    The downsampled output is neither rounded nor clamped. Papers report the value x1e-5.
    """
    _check_image(sr)
    _check_image(lr)
    down = resize(_to_tensor(sr, torch.float64) / 255.0, lr.shape[:2])
    return float(F.mse_loss(down, _to_tensor(lr, torch.float64) / 255.0))


def lpips_weights_path() -> Path:
    """Where `LPIPS` reads torchvision's ImageNet AlexNet weights (torchvision's own cache file)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _url_file_name(_ALEXNET_URL)


def fid_weights_path() -> Path:
    """Where `FID` reads torch-fidelity's Inception-v3 weights (torch-fidelity's own cache file)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _url_file_name(URL_INCEPTION_V3)


class LPIPS:
    """LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018), via the `lpips` package.

    The linear heads ship in the lpips wheel; the AlexNet trunk is read from
    `lpips_weights_path()`. Raises MetricUnavailable if that file is missing or is not a
    torchvision AlexNet state dict. Lower is better; 0 for identical images.
    """

    def __init__(self, *, device: str | torch.device = "cpu") -> None:
        path = lpips_weights_path()
        state = _read_state_dict(path, what="LPIPS (AlexNet trunk)", url=_ALEXNET_URL)
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


class FID:
    """FID (Heusel et al. 2017) on Inception-v3 pool3 features, via torchmetrics + torch-fidelity.

    Uses torch-fidelity's port of the TF Inception weights (the network of the original FID
    code), read from `fid_weights_path()`. `update` adds one SR image to the generated set
    and its HR image to the reference set. Raises MetricUnavailable if the weights file is
    missing or unusable.
    """

    def __init__(self, *, device: str | torch.device = "cpu") -> None:
        path = fid_weights_path()
        # A safe (weights_only) read first: torch-fidelity then loads the same file with
        # weights_only=False, which would run any code pickled into it.
        _read_state_dict(path, what="FID (Inception-v3)", url=URL_INCEPTION_V3)
        try:
            metric = FrechetInceptionDistance(
                feature=2048, normalize=False, feature_extractor_weights_path=str(path)
            )
        except RuntimeError as err:  # strict load_state_dict: missing keys or wrong shapes
            raise MetricUnavailable(f"{path} is not a torch-fidelity Inception-v3 state dict: {err}") from err
        self.device = torch.device(device)
        self._metric = metric.to(self.device)
        self._count = 0

    def update(self, sr: np.ndarray, hr: np.ndarray) -> None:
        """Add one (H, W, 3) uint8 RGB output and its reference, both in [0, 255]."""
        _check_image(sr)
        _check_image(hr)
        self._metric.update(_to_tensor(hr, torch.uint8).to(self.device), real=True)
        self._metric.update(_to_tensor(sr, torch.uint8).to(self.device), real=False)
        self._count += 1

    def compute(self) -> float:
        """FID between the outputs and the references seen so far (needs at least 2 pairs)."""
        if self._count < 2:
            raise MetricUnavailable(f"FID needs at least 2 images, got {self._count}")
        return float(self._metric.compute())


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


def _url_file_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _read_state_dict(path: Path, *, what: str, url: str) -> dict[str, Tensor]:
    """Read a state dict from `path` without downloading or unpickling code."""
    if not path.is_file():
        raise MetricUnavailable(
            f"{what} needs pretrained weights at {path}, which does not exist; nothing is downloaded "
            f"automatically. Copy {url} to that path (its directory is torch.hub.get_dir()/checkpoints, "
            f"moved by $TORCH_HOME)."
        )
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
