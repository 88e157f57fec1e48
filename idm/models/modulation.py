"""Scale-adaptive modulation: mix decoder and LR features with weights set by the scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def scale_code(lr_size: tuple[int, int], size: tuple[int, int]) -> float:
    """The scale as the modulation sees it: log of the geometric-mean magnification.

    Logarithm rather than the reference's p = (w - 16) / 112 (tied to 16 px faces): it
    is 0 at x1, grows without bound, and treats x2 -> x4 like x4 -> x8, so scales
    outside training (x6, x8, x12) are just larger inputs to the same maps.
    """
    (h, w), (height, width) = lr_size, size
    return 0.5 * (math.log(height / h) + math.log(width / w))


class ScaleModulation(nn.Module):
    """out = LeakyReLU(s1 * x_dec + s2 * x_lr + b), with s1^2 + s2^2 = 1 per channel.

    x_dec, x_lr: (B, C, H, W); code: (B,) scale codes. s1, s2 are two learned maps of
    the code, normalised jointly, so the scale decides how much the level leans on
    generated versus LR features.
    """

    def __init__(self, channels: int, *, hidden: int) -> None:
        super().__init__()
        self.weights = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def mixing_weights(self, code: Tensor) -> tuple[Tensor, Tensor]:
        """code (B,) -> (s1, s2), each (B, C), with s1^2 + s2^2 = 1."""
        s = self.weights(code[:, None].to(self.bias.dtype)).unflatten(1, (2, -1))
        s = F.normalize(s, dim=1, eps=1e-12)
        return s[:, 0], s[:, 1]

    def forward(self, x_dec: Tensor, x_lr: Tensor, code: Tensor) -> Tensor:
        s1, s2 = self.mixing_weights(code)
        mixed = s1[:, :, None, None] * x_dec + s2[:, :, None, None] * x_lr
        return F.leaky_relu(mixed + self.bias[:, None, None], 0.2)
