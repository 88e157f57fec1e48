"""What the diffusion denoises: the HR image itself, or its residual over bicubic.

"image" is the paper's target: x0 = HR in [-1, 1], so the sampler must build the
whole picture from noise. "residual" is SRDiff's (Li et al. 2022): x0 is the HR image
minus the bicubic upscale of its LR image, divided by `residual_scale`. On a tiny CPU
budget (a small net, a few thousand steps) the image target does not get past bicubic
quality; the residual target starts *at* bicubic (a zero residual is bicubic) and only
has to learn the missing detail. Residuals are small (on scikit-image's photos at x2-x4:
std 0.05-0.13 in [-1, 1] units, 99% within +-0.5), so dividing by a `residual_scale`
< 1 (e.g. 0.5) spreads them over more of the range the noise schedule is designed for.
The samplers clip x0 to [-1, 1], which caps the residual at +-residual_scale.

encode(hr, lr, mode) -> x0 and decode(x0, lr, size, mode) -> image are exact inverses
(up to float rounding) for any HR image in [-1, 1].
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from idm.resize import resize

# mode -> (encode(hr, lr, residual_scale), decode(x0, lr, residual_scale)), images (B, 3, H, W).
Codec = tuple[Callable[[Tensor, Tensor, float], Tensor], Callable[[Tensor, Tensor, float], Tensor]]


def _encode_image(hr: Tensor, lr: Tensor, residual_scale: float) -> Tensor:
    return hr


def _decode_image(x0: Tensor, lr: Tensor, residual_scale: float) -> Tensor:
    return x0


def _encode_residual(hr: Tensor, lr: Tensor, residual_scale: float) -> Tensor:
    # SRDiff: x0 = (HR - up(LR)) / rescale
    return (hr - resize(lr, hr.shape[-2:])) / residual_scale


def _decode_residual(x0: Tensor, lr: Tensor, residual_scale: float) -> Tensor:
    return resize(lr, x0.shape[-2:]) + residual_scale * x0


TARGETS: dict[str, Codec] = {
    "image": (_encode_image, _decode_image),
    "residual": (_encode_residual, _decode_residual),
}


def _codec(mode: str, residual_scale: float) -> Codec:
    if mode not in TARGETS:
        raise ValueError(f"unknown target {mode!r}; expected one of {sorted(TARGETS)}")
    if not residual_scale > 0:
        raise ValueError(f"residual_scale must be a number > 0, got {residual_scale!r}")
    return TARGETS[mode]


def encode(hr: Tensor, lr: Tensor, mode: str, residual_scale: float = 1.0) -> Tensor:
    """The diffusion target x0 (B, 3, H, W) of HR images (B, 3, H, W) and their LR (B, 3, h, w).

    Both in [-1, 1]. `residual_scale` is used by mode "residual" only.
    """
    return _codec(mode, residual_scale)[0](hr, lr, residual_scale)


def decode(x0: Tensor, lr: Tensor, size: tuple[int, int], mode: str, residual_scale: float = 1.0) -> Tensor:
    """The image (B, 3, H, W) in [-1, 1] that x0 (B, 3, H, W) stands for, given LR (B, 3, h, w).

    `size` = (H, W) must be x0's size; the output is clamped to [-1, 1].
    """
    _, decode_fn = _codec(mode, residual_scale)
    if tuple(int(s) for s in size) != tuple(x0.shape[-2:]):
        raise ValueError(f"size {tuple(size)} does not match x0 of shape {tuple(x0.shape)}")
    return decode_fn(x0, lr, residual_scale).clamp(-1.0, 1.0)
