"""Pixel coordinates on a continuous image plane, as LIIF defines them.

An image of n pixels along an axis covers [-1, 1]; pixel i has its centre at
-1 + (2i + 1) / n and a cell of size 2 / n. Two grids of different sizes over the same
image thus share one coordinate system, which is what lets the implicit decoder query
a feature map at any finer size, integer ratio or not.
"""

from __future__ import annotations

import torch
from torch import Tensor


def make_coord_1d(n: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Centres of n pixels along one axis: (n,) in (-1, 1)."""
    if n < 1:
        raise ValueError(f"an axis needs at least one pixel, got {n}")
    return (2 * torch.arange(n, device=device, dtype=dtype) + 1) / n - 1


def nearest_source(n_src: int, n_dst: int, *,
                   device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """For each of n_dst pixels, the nearest of n_src pixels covering the same axis.

    Returns (index, offset): index (n_dst,) int64 in [0, n_src); offset (n_dst,) float,
    the destination centre minus the source centre in source-pixel units, in
    [-0.5, 0.5].
    """
    dst = make_coord_1d(n_dst, device=device, dtype=torch.float64)
    position = (dst + 1) / 2 * n_src  # in source pixels, 0 at the left edge
    index = position.floor().long().clamp_(0, n_src - 1)
    offset = position - (index + 0.5)
    return index, offset.float()


def query_nearest(feat: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Sample `feat` at the pixel centres of a `size` grid: nearest feature + geometry.

    feat: (B, C, h, w). Returns (near, geometry): near (B, C, H, W), the nearest source
    feature of every target pixel; geometry (1, 4, H, W) on feat's device and dtype,
    channels = (row offset, col offset, cell height, cell width), all in source-pixel
    units (offsets in [-0.5, 0.5]; a cell is h / H by w / W source pixels).
    """
    (h, w), (height, width) = feat.shape[-2:], size
    rows, drow = nearest_source(h, height, device=feat.device)
    cols, dcol = nearest_source(w, width, device=feat.device)
    near = feat.index_select(2, rows).index_select(3, cols)
    geometry = torch.stack([
        drow[:, None].expand(height, width),
        dcol[None, :].expand(height, width),
        torch.full((height, width), h / height, device=feat.device),
        torch.full((height, width), w / width, device=feat.device),
    ])
    return near, geometry.unsqueeze(0).to(feat.dtype)
