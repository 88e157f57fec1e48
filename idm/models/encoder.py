"""The LR side of IDM: an EDSR-baseline encoder and the parallel LR conditioning network.

Both depend only on the LR image and the target size, so IDM runs them once per
image (`IDM.condition`), not once per denoising step as the reference code does.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from idm.models.coords import query_nearest
from idm.models.layers import Blur, conv3x3
from idm.resize import resize


class EDSRBlock(nn.Module):
    """Conv-ReLU-Conv with an identity skip (EDSR, no batch norm). x: (B, C, h, w)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels), nn.ReLU(inplace=True),
                                  conv3x3(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class LREncoder(nn.Module):
    """EDSR-baseline features of the LR image, turned into an image-like condition.

    forward(lr (B, 3, h, w) in [-1, 1], size=(H, W)) -> x_con (B, 3, H, W).
    The features are taken to the target grid by nearest sampling and projected to
    3 channels; that projection is added to the bicubic upscale of the LR image, so
    x_con starts out as a sensible picture and the encoder learns a correction.
    """

    def __init__(self, *, channels: int, blocks: int) -> None:
        super().__init__()
        self.head = conv3x3(3, channels)
        self.body = nn.Sequential(*(EDSRBlock(channels) for _ in range(blocks)),
                                  conv3x3(channels, channels))
        self.to_image = conv3x3(channels, 3)

    def features(self, lr: Tensor) -> Tensor:
        """EDSR-baseline features: (B, 3, h, w) -> (B, C, h, w)."""
        x = self.head(lr)
        return x + self.body(x)

    def forward(self, lr: Tensor, size: tuple[int, int]) -> Tensor:
        near, _ = query_nearest(self.features(lr), size)
        return resize(lr, size) + self.to_image(near)


class DownBlock(nn.Module):
    """Blur, stride-2 conv, LeakyReLU: (B, in_ch, h, w) -> (B, out_ch, ceil(h/2), ceil(w/2))."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.blur = Blur()
        self.conv = conv3x3(in_ch, out_ch, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.conv(self.blur(x)), 0.2)


class ConditionPyramid(nn.Module):
    """Parallel LR conditioning network: one LR feature map per UNet decoder level.

    forward(x_con (B, 3, H, W)) -> [ (B, channels[i], ceil(H / 2**i), ceil(W / 2**i)) ]
    for i = 0 .. len(channels) - 1; the sizes match the UNet's levels exactly.
    """

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = conv3x3(3, channels[0])
        self.down = nn.ModuleList(DownBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))

    def forward(self, x_con: Tensor) -> list[Tensor]:
        feats = [F.leaky_relu(self.stem(x_con), 0.2)]
        for block in self.down:
            feats.append(block(feats[-1]))
        return feats
