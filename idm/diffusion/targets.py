"""What the diffusion denoises: the HR image, its residual over bicubic, or over x_con.

"image" is the paper's target: x0 = HR in [-1, 1], so the sampler must build the
whole picture from noise. "residual" is SRDiff's (Li et al. 2022): x0 is the HR image
minus the bicubic upscale of its LR image, divided by `residual_scale`. It starts *at*
bicubic (a zero residual is bicubic) and only has to learn the missing detail, which
suits a small net trained on a CPU budget. Residuals are small, so dividing by a `residual_scale`
< 1 (e.g. 0.5) spreads them over more of the range the noise schedule is designed for
(docs/decisions.md, "Residual targets and residual_scale"). The samplers clip x0 to
[-1, 1], which caps the residual at +-residual_scale.
"refine" is the same over the model's own image-like condition x_con instead of
bicubic (predict-and-refine, Whang et al. 2022): when x_con is trained as a regression
of HR (TrainConfig.condition_loss) it is already better than bicubic, and the
diffusion only adds what a regression cannot. x_con is treated as a constant (no
gradient flows through the target).

encode(hr, lr, mode) -> x0 and decode(x0, lr, size, mode) -> image are exact inverses
(up to float rounding) for any HR image in [-1, 1], given the same x_con.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from idm.config import TARGETS
from idm.resize import resize

# mode -> base(lr, size, x_con): the image x0 is a (scaled) residual over; None: x0 is the image.
_BASES: dict[str, Callable[[Tensor, tuple[int, int], Tensor | None], Tensor] | None] = {
    "image": None,
    "residual": lambda lr, size, x_con: resize(lr, size),  # SRDiff: over up(LR)
    "refine": lambda lr, size, x_con: x_con.detach(),  # over the model's condition
}
assert tuple(_BASES) == TARGETS


def _base(mode: str, residual_scale: float, lr: Tensor, size: tuple[int, int], x_con: Tensor | None) -> Tensor | None:
    if mode not in _BASES:
        raise ValueError(f"unknown target {mode!r}; expected one of {sorted(TARGETS)}")
    if not residual_scale > 0:
        raise ValueError(f"residual_scale must be a number > 0, got {residual_scale!r}")
    if mode == "refine" and (x_con is None or tuple(x_con.shape[-2:]) != tuple(size)):
        raise ValueError(f"target 'refine' needs the condition x_con of size {tuple(size)}, "
                         f"got {None if x_con is None else tuple(x_con.shape)}")
    base = _BASES[mode]
    return None if base is None else base(lr, size, x_con)


def encode(hr: Tensor, lr: Tensor, mode: str, residual_scale: float = 1.0, *, x_con: Tensor | None = None) -> Tensor:
    """The diffusion target x0 (B, 3, H, W) of HR images (B, 3, H, W) and their LR (B, 3, h, w).

    All in [-1, 1]. `residual_scale` is used by the residual modes only; `x_con`
    (B, 3, H, W), the model's condition, by mode "refine" only.
    """
    base = _base(mode, residual_scale, lr, tuple(hr.shape[-2:]), x_con)
    return hr if base is None else (hr - base) / residual_scale


def decode(x0: Tensor, lr: Tensor, size: tuple[int, int], mode: str, residual_scale: float = 1.0, *,
           x_con: Tensor | None = None) -> Tensor:
    """The image (B, 3, H, W) in [-1, 1] that x0 (B, 3, H, W) stands for, given LR (B, 3, h, w).

    `size` = (H, W) must be x0's size; the output is clamped to [-1, 1].
    """
    if tuple(int(s) for s in size) != tuple(x0.shape[-2:]):
        raise ValueError(f"size {tuple(size)} does not match x0 of shape {tuple(x0.shape)}")
    base = _base(mode, residual_scale, lr, tuple(x0.shape[-2:]), x_con)
    return (x0 if base is None else base + residual_scale * x0).clamp(-1.0, 1.0)


def decoder(mode: str, residual_scale: float = 1.0) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """The sampler-side decoder of `mode`: (x0, lr, cond) -> image, for `super_resolve`'s
    `decode` (cond: IDM's Condition, whose x_con the "refine" target needs)."""

    def decode_x0(x0: Tensor, lr: Tensor, cond: Any) -> Tensor:
        return decode(x0, lr, tuple(x0.shape[-2:]), mode, residual_scale, x_con=cond.x_con)

    return decode_x0
