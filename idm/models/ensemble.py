"""A regression upscaler whose decoder has no LR grid in it: LIIF's local ensemble.

The shipped decoder (`LREncoder` with decoder_hidden > 0) feeds its MLP the offset of the
output pixel inside its nearest LR pixel; that offset jumps from +0.5 to -0.5 at every LR
pixel edge, so the output can step there, at the LR period. Here every output pixel runs the
MLP once for each of the 4 LR pixels around it (the bilinear taps), each time with that
pixel's feature and the offset to that pixel's centre, and blends the 4 outputs with the
bilinear (LIIF: area) weights. A tap changes only where its weight is 0, so the output is
continuous everywhere, at any scale, integer or not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm.models.modulation import scale_code
from idm.resize import resize


def ensemble_taps(n_src: int, n_dst: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The 2 source pixels around each of n_dst pixel centres on an axis of n_src pixels.

    Returns (index, offset, weight), each (2, n_dst): index int64 in [0, n_src) (clamped at
    the ends, where both taps are the edge pixel), offset = destination centre minus the tap's
    centre in source pixels (in (-1, 1); beyond +-0.5 only past the edge centres), weight the
    linear-interpolation weight (the two sum to 1); offset and weight in `like`'s dtype.
    """
    position = (torch.arange(n_dst, device=like.device, dtype=torch.float64) + 0.5) * (n_src / n_dst) - 0.5
    floor = position.floor()
    index = torch.stack([floor, floor + 1]).clamp_(0, n_src - 1)
    t = position - floor
    offset = position[None] - index
    weight = torch.stack([1 - t, t])
    return index.long(), offset.to(like.dtype), weight.to(like.dtype)


class EnsembleDecoder(nn.Module):
    """Per-pixel MLP (channels + 3 -> hidden -> hidden -> 3, ReLU) over (feature of a tap, row
    and column offset to it, scale code), blended over the 4 taps around the output pixel.

    decode(feat (B, C, h, w), size (H, W)) -> (B, 3, H, W); query(feat, size, points (B, N, 2)
    int64 (row, col)) -> (B, 3, N), equal to decode's values at those pixels. Both run the
    first layer's feature part at LR (it is linear), so per output pixel the cost is 4 times
    the hidden layers only.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"channels and hidden must be >= 1, got {channels}, {hidden}")
        self.channels = channels
        self.first = nn.Linear(channels + 3, hidden)
        self.second = nn.Linear(hidden, hidden)
        self.last = nn.Linear(hidden, 3)

    def _project(self, feat: Tensor, size: tuple[int, int]) -> Tensor:
        """First layer's feature and scale part at LR: (B, C, h, w) -> (B, h, w, hidden)."""
        w_feat = self.first.weight[:, : self.channels]
        code = scale_code(tuple(feat.shape[-2:]), size)
        return torch.einsum("dc,bchw->bhwd", w_feat, feat) + (self.first.bias + code * self.first.weight[:, -1])

    def _tail(self, x: Tensor) -> Tensor:
        return self.last(F.relu(self.second(F.relu(x))))

    def query(self, feat: Tensor, size: tuple[int, int], points: Tensor) -> Tensor:
        (h, w), (height, width) = feat.shape[-2:], size
        proj = self._project(feat, size).flatten(1, 2)  # (B, h * w, D)
        w_row, w_col = self.first.weight[:, -3], self.first.weight[:, -2]
        (ri, ro, rw), (ci, co, cw) = ensemble_taps(h, height, feat), ensemble_taps(w, width, feat)
        rows, cols = points[..., 0], points[..., 1]
        out = 0
        for a in range(2):
            for b in range(2):
                where = (ri[a][rows] * w + ci[b][cols])[..., None].expand(-1, -1, proj.shape[-1])
                x = proj.gather(1, where) + ro[a][rows][..., None] * w_row + co[b][cols][..., None] * w_col
                out = out + (rw[a][rows] * cw[b][cols])[..., None] * self._tail(x)
        return out.transpose(1, 2)

    def decode(self, feat: Tensor, size: tuple[int, int], band_pixels: int = 1 << 15) -> Tensor:
        """The whole (H, W) grid, `band_pixels` output pixels at a time (channels-last matmuls
        on bands of rows, so the working set stays small at any size)."""
        (h, w), (height, width) = feat.shape[-2:], size
        proj = self._project(feat, size)
        w_row, w_col = self.first.weight[:, -3], self.first.weight[:, -2]
        (ri, ro, rw), (ci, co, cw) = ensemble_taps(h, height, feat), ensemble_taps(w, width, feat)
        col_terms = [co[b][:, None] * w_col for b in range(2)]  # (W, D)
        bands = []
        band = max(1, band_pixels // width)
        for top in range(0, height, band):
            rows = slice(top, min(top + band, height))
            out = 0
            for a in range(2):
                x_row = proj[:, ri[a][rows]] + (ro[a][rows, None, None] * w_row)  # (B, band, w, D)
                for b in range(2):
                    x = x_row[:, :, ci[b]] + col_terms[b]  # (B, band, W, D)
                    weight = rw[a][rows, None, None] * cw[b][None, :, None]  # (band, W, 1)
                    out = out + weight * self._tail(x)
            bands.append(out)
        return torch.cat(bands, dim=1).permute(0, 3, 1, 2)


class ImplicitUpscaler(nn.Module):
    """x_con = bicubic(lr) + EnsembleDecoder(features(lr)): the regression output at any size.

    `features`: a module (B, 3, h, w) -> (B, C, h, w) with a `channels` attribute (C), e.g.
    `idm.models.blocks.EDSRFeatures` or `SPANFeatures`. lr in [-1, 1]. The interface matches
    `LREncoder`'s: features(lr), forward(lr, size) -> (B, 3, H, W), query(lr, size, points).
    """

    def __init__(self, features: nn.Module, hidden: int) -> None:
        super().__init__()
        self.encoder = features
        self.decoder = EnsembleDecoder(features.channels, hidden)

    def features(self, lr: Tensor) -> Tensor:
        return self.encoder(lr)

    def forward(self, lr: Tensor, size: tuple[int, int], feat: Tensor | None = None) -> Tensor:
        feat = self.features(lr) if feat is None else feat
        return resize(lr, size) + self.decoder.decode(feat, size)

    def query(self, lr: Tensor, size: tuple[int, int], points: Tensor, feat: Tensor | None = None) -> Tensor:
        """x_con at points (B, N, 2) int64 (row, col) of the (H, W) grid -> (B, 3, N)."""
        feat = self.features(lr) if feat is None else feat
        rows, cols = points[..., 0], points[..., 1]
        base = resize(lr, size).flatten(2).gather(2, (rows * size[1] + cols)[:, None].expand(-1, 3, -1))
        return base + self.decoder.query(feat, size, points)
