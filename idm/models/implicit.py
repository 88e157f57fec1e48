"""Implicit up-sampling: a coordinate MLP replaces the UNet decoder's fixed x2 up-sampler."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from idm.models.coords import query_nearest


class ImplicitUpsample(nn.Module):
    """Predict features on a finer grid of any size from a coarse feature map (LIIF-style).

    forward(feat (B, C, h, w), size=(H, W)) -> (B, C, H, W). Each target pixel sees its
    nearest coarse feature, its offset from that feature's centre and its cell size
    (both in coarse-pixel units), and an MLP (1x1 convs, so it runs on the whole grid
    at once) predicts a correction to the nearest feature. The reference MLP has no
    activation between its two layers, which makes it linear; ours has a Swish.
    """

    def __init__(self, channels: int, *, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels + 4, hidden, 1), nn.SiLU(),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, feat: Tensor, size: tuple[int, int]) -> Tensor:
        near, geometry = query_nearest(feat, size)
        query = torch.cat([near, geometry.expand(near.shape[0], -1, -1, -1)], dim=1)
        return near + self.mlp(query)
