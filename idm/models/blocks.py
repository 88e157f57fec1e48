"""LR feature extractors for the regression output: EDSR-baseline and SPAN-style bodies.

Each maps an LR image (B, 3, h, w) in [-1, 1] to features (B, C, h, w) at LR resolution,
so their cost per output pixel falls with the square of the scale. They are the `features`
half of `idm.models.ensemble.ImplicitUpscaler`; the shipped `LREncoder` is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm.models.encoder import EDSRBlock
from idm.models.layers import conv3x3


class EDSRFeatures(nn.Module):
    """Head conv, `blocks` EDSR blocks and a conv, with a skip over the body: the features
    `LREncoder.features` computes, as a module of its own. (B, 3, h, w) -> (B, channels, h, w)."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        if channels < 1 or blocks < 0:
            raise ValueError(f"channels must be >= 1 and blocks >= 0, got {channels}, {blocks}")
        self.channels = channels
        self.head = conv3x3(3, channels)
        self.body = nn.Sequential(*(EDSRBlock(channels) for _ in range(blocks)), conv3x3(channels, channels))

    def forward(self, lr: Tensor) -> Tensor:
        x = self.head(lr)
        return x + self.body(x)


class SPANBlock(nn.Module):
    """Three 3x3 convs with SiLU between them and a parameter-free attention (SPAN, Wan et al.
    2024): out = x + (c3 + x) * (sigmoid(c3) - 0.5), c3 the last conv's output.

    The gate is computed from the block's own features, so it costs no weights and no
    softmax; the outer `x +` makes the block the identity when the gate is near 0, which keeps a
    freshly initialised stack trainable. x: (B, C, h, w) -> (B, C, h, w).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (conv3x3(channels, channels) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        out = self.c3(F.silu(self.c2(F.silu(self.c1(x)))))
        return x + (out + x) * (torch.sigmoid(out) - 0.5)


class SPANFeatures(nn.Module):
    """Head conv, `blocks` SPANBlocks, then a 1x1 conv of the concatenated head, first-block and
    last-block features (SPAN's feature fusion). (B, 3, h, w) -> (B, channels, h, w).
    ValueError unless channels >= 1 and blocks >= 1."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        if channels < 1 or blocks < 1:
            raise ValueError(f"channels and blocks must be >= 1, got {channels}, {blocks}")
        self.channels = channels
        self.head = conv3x3(3, channels)
        self.blocks = nn.ModuleList(SPANBlock(channels) for _ in range(blocks))
        self.fuse = nn.Conv2d(3 * channels, channels, 1)

    def forward(self, lr: Tensor) -> Tensor:
        head = x = self.head(lr)
        first = None
        for block in self.blocks:
            x = block(x)
            first = x if first is None else first
        return self.fuse(torch.cat([head, first, x], dim=1))
