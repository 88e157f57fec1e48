"""The project's one resize function, its size arithmetic, and uint8 <-> model-range conversions.

Everything that makes or compares images at another size goes through `resize`:
the prepare stage (LR from HR), training (random-scale LR/HR pairs), the bicubic
baseline, and the LR-consistency metric.

`resize` is torch's bicubic with ``antialias=True``: the separable Keys cubic kernel
with a = -0.5 whose support is widened by the scale factor when downscaling. That is
the kernel MATLAB's ``imresize`` and PIL's ``BICUBIC`` use, so LR images match the
ones the SR literature evaluates on (tests/idm/test_resize.py checks that Set5 x2/x3/x4
bicubic PSNR is within 0.05 dB of the published MATLAB numbers). Borders differ
slightly from MATLAB (which pads symmetrically; torch renormalises the truncated
kernel), which the ``ceil(scale)`` border crop of the metrics removes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize with antialiasing.

    img: (B, C, H, W) or (C, H, W) float tensor, any range (values may over/undershoot
    at edges, as bicubic does; clamp afterwards if you need a range).
    size: (height, width) of the output.
    """
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {height}x{width}")
    if not img.is_floating_point():
        raise TypeError(f"resize expects a float tensor, got {img.dtype}")
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    out = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out if batched else out.squeeze(0)


def resize_uint8(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`resize` for an (H, W, C) uint8 array, rounded back to uint8 like a saved image
    (a uint16 array stays uint16, rounded and clamped to [0, 65535]); C-contiguous, since
    some consumers (image libraries' buffers) ignore strides."""
    peak = np.iinfo(img.dtype).max
    x = torch.from_numpy(np.ascontiguousarray(img).astype(np.float32)).permute(2, 0, 1)
    y = resize(x, size).round_().clamp_(0, peak)
    return np.ascontiguousarray(y.permute(1, 2, 0).numpy().astype(img.dtype))


def check_scale(scale: float) -> float:
    """Return `scale` as a float if it is a finite number > 1, else raise ValueError."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number > 1, got {scale!r}") from None
    if not math.isfinite(value) or value <= 1.0:
        raise ValueError(f"scale must be a finite number > 1, got {scale!r}")
    return value


def _whole_lr_side(hr_side: int, scale: float) -> tuple[int, int]:
    """Largest LR side <= hr_side / scale whose upscaled size is (nearly) whole."""
    top = math.floor(hr_side / scale + 1e-9)
    if top < 1:
        raise ValueError(f"an image side of {hr_side} px is too small for scale x{scale:g}")
    # Prefer an exact multiple (x2.5 needs an even LR side) unless that loses >10%.
    for lr_side in range(top, max(1, math.ceil(0.9 * top)) - 1, -1):
        hr = lr_side * scale
        if abs(hr - round(hr)) < 1e-6:
            return lr_side, round(hr)
    return top, round(top * scale)


def paired_sizes(hr_size: tuple[int, int], scale: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """Sizes for an LR/HR pair at `scale` from an HR image of `hr_size` (height, width).

    Returns ((hr_h, hr_w), (lr_h, lr_w)) with hr <= hr_size: the HR image is cropped
    (top-left, as MATLAB's modcrop) so that the LR size is whole and lr * scale == hr
    exactly when such a size exists within 10% of the largest one; otherwise hr is
    round(lr * scale) and the pair's effective scale differs from `scale` by < 1 px.
    """
    scale = check_scale(scale)
    (lr_h, hr_h), (lr_w, hr_w) = (_whole_lr_side(side, scale) for side in hr_size)
    return (hr_h, hr_w), (lr_h, lr_w)


def target_size(lr_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """Output (height, width) for upscaling an LR image of `lr_size` by `scale`."""
    scale = check_scale(scale)
    return tuple(max(1, round(side * scale)) for side in lr_size)  # type: ignore[return-value]


def to_model_range(img: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """(h, w, 3) uint8 in [0, 255] (or uint16 in [0, 65535]) -> (1, 3, h, w) float32 in [-1, 1] on `device`."""
    half = np.iinfo(img.dtype).max / 2
    if img.dtype == np.uint16:  # few torch ops take uint16
        img = img.astype(np.int32)
    x = torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1).unsqueeze(0).float()
    return x / half - 1.0


def to_uint8(x: Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [-1, 1] -> (H, W, 3) uint8, rounded like a saved image."""
    y = ((x[0].clamp(-1, 1) + 1.0) * 127.5).round_().to(torch.uint8)
    return y.permute(1, 2, 0).cpu().numpy()


def to_uint16(x: Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [-1, 1] -> (H, W, 3) uint16 in [0, 65535], rounded."""
    y = ((x[0].clamp(-1, 1) + 1.0) * 32767.5).round_().to(torch.int32)
    return y.permute(1, 2, 0).cpu().numpy().astype(np.uint16)
