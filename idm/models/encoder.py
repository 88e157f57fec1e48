"""The LR side of IDM: an EDSR-baseline encoder and the parallel LR conditioning network.

Both depend only on the LR image and the target size, so IDM runs them once per
image (`IDM.condition`), not once per denoising step as the reference code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm.models.coords import make_coord_1d, nearest_source, query_nearest
from idm.models.layers import Blur, conv3x3
from idm.models.modulation import scale_code
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
    The features are taken to the target grid and projected to 3 channels; that
    projection is added to the bicubic upscale of the LR image, so x_con starts out as
    a sensible picture and the encoder learns a correction. With decoder_hidden = 0 the
    projection is a 3x3 conv of the nearest feature; with decoder_hidden > 0 it is a
    per-pixel MLP (1x1 convs) of the bilinearly interpolated feature, the position in
    its LR pixel and the scale code: a smooth, scale-aware decoder whose cost per
    output pixel is a few thousand multiply-adds, so the encoder's capacity stays at LR.
    """

    def __init__(self, *, channels: int, blocks: int, decoder_hidden: int = 0) -> None:
        super().__init__()
        self.head = conv3x3(3, channels)
        self.body = nn.Sequential(*(EDSRBlock(channels) for _ in range(blocks)),
                                  conv3x3(channels, channels))
        if decoder_hidden:
            self.to_image = nn.Sequential(
                nn.Conv2d(channels + 3, decoder_hidden, 1), nn.ReLU(inplace=True),
                nn.Conv2d(decoder_hidden, decoder_hidden, 1), nn.ReLU(inplace=True),
                nn.Conv2d(decoder_hidden, 3, 1))
        else:
            self.to_image = conv3x3(channels, 3)
        self.mlp = bool(decoder_hidden)

    def features(self, lr: Tensor) -> Tensor:
        """EDSR-baseline features: (B, 3, h, w) -> (B, C, h, w)."""
        x = self.head(lr)
        return x + self.body(x)

    def forward(self, lr: Tensor, size: tuple[int, int], window: Window | None = None,
                feat: Tensor | None = None) -> Tensor:
        """x_con on the (H, W) grid, or only on `window` (top, left, height, width) of it:
        training scores x_con on a crop, and the crop's values equal the whole grid's there.
        `feat`: `features(lr)` when the caller has them already."""
        feat = self.features(lr) if feat is None else feat
        if not self.mlp:
            near, _ = query_nearest(feat, size)
            return _crop(resize(lr, size) + self.to_image(near), window)
        if window is None and not torch.is_grad_enabled():
            return resize(lr, size) + self._decode_rows(feat, size)
        if window is None:
            up = F.interpolate(feat, size=tuple(size), mode="bilinear", align_corners=False)
        else:  # the same bilinear sampling at the window's pixel centres only
            top, left, height, width = window
            rows = make_coord_1d(size[0], device=lr.device)[top : top + height]
            cols = make_coord_1d(size[1], device=lr.device)[left : left + width]
            grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
            up = F.grid_sample(feat, grid.to(feat.dtype)[None].expand(lr.shape[0], -1, -1, -1),
                               mode="bilinear", padding_mode="border", align_corners=False)
        (h, w), (height, width) = feat.shape[-2:], size
        top, left, rows, cols = window or (0, 0, height, width)
        drow = nearest_source(h, height, device=lr.device)[1][top : top + rows]
        dcol = nearest_source(w, width, device=lr.device)[1][left : left + cols]
        where = torch.stack([drow[:, None].expand(rows, cols), dcol[None, :].expand(rows, cols),
                             torch.full((rows, cols), scale_code((h, w), size), device=lr.device)])
        where = where.to(feat.dtype)[None].expand(lr.shape[0], -1, -1, -1)
        return _crop(resize(lr, size), window) + self.to_image(torch.cat([up, where], dim=1))

    def _decode_rows(self, feat: Tensor, size: tuple[int, int], band_pixels: int = 1 << 15) -> Tensor:
        """The MLP decoder's output on the whole (H, W) grid, `band_pixels` output pixels at a
        time: (B, C, h, w) features -> (B, 3, H, W), equal to the autograd path of `forward`
        up to float rounding (tests/idm/models/test_lean.py).

        Inference only, and fast because no (C, H, W) map is ever built: bilinear
        interpolation and the first 1x1 conv are both linear and the interpolation weights
        sum to 1, so the first layer runs at LR and only its output is interpolated; the
        geometry's part of that layer is a row term plus a column term; the rest runs
        as matmuls over bands of rows in channels-last order, whose working set stays in
        cache whatever the image size.
        """
        (h, w), (height, width) = feat.shape[-2:], size
        first, _, second, _, last = self.to_image
        channels = feat.shape[1]
        w_feat, w_geo = first.weight[:, :channels, 0, 0], first.weight[:, channels:, 0, 0]  # (D, C), (D, 3)
        code = scale_code((h, w), size)
        lr_proj = torch.einsum("dc,bchw->bhwd", w_feat, feat) + (first.bias + code * w_geo[:, 2])  # (B, h, w, D)
        (row0, row1, row_t), (col0, col1, col_t) = _bilinear_taps(h, height, feat), _bilinear_taps(w, width, feat)
        drow, dcol = (nearest_source(n, m, device=feat.device)[1].to(feat.dtype) for n, m in ((h, height), (w, width)))
        row_term, col_term = drow[:, None] * w_geo[:, 0], dcol[:, None] * w_geo[:, 1]  # (H, D), (W, D)
        w2, w3 = second.weight[:, :, 0, 0], last.weight[:, :, 0, 0]
        out = feat.new_empty(feat.shape[0], height, width, 3)
        band = max(1, band_pixels // width)
        for top in range(0, height, band):
            rows = slice(top, min(top + band, height))
            a, b = lr_proj[:, row0[rows]], lr_proj[:, row1[rows]]  # (B, band, w, D)
            x = torch.lerp(a, b, row_t[rows, None, None])
            x = torch.lerp(x[:, :, col0], x[:, :, col1], col_t[:, None])  # (B, band, W, D)
            x += row_term[rows, None]
            x += col_term
            x = F.linear(x.relu_(), w2, second.bias).relu_()
            out[:, rows] = F.linear(x, w3, last.bias)
        return out.permute(0, 3, 1, 2)

    def query(self, lr: Tensor, size: tuple[int, int], points: Tensor, feat: Tensor | None = None) -> Tensor:
        """x_con at chosen pixels of the (H, W) grid only: points (B, N, 2) int64 (row, col)
        -> (B, 3, N), equal to forward(lr, size)[b, :, row, col]. Needs the MLP decoder
        (decoder_hidden > 0); training scores x_con on random pixels of a large patch (LIIF)."""
        if not self.mlp:
            raise ValueError("x_con at single pixels needs the MLP decoder (ModelConfig.decoder_hidden > 0)")
        (h, w), (height, width) = lr.shape[-2:], size
        feat = self.features(lr) if feat is None else feat
        rows, cols = points[..., 0], points[..., 1]  # (B, N)
        y, x = make_coord_1d(height, device=lr.device)[rows], make_coord_1d(width, device=lr.device)[cols]
        grid = torch.stack([x, y], dim=-1)[:, None].to(feat.dtype)  # (B, 1, N, 2)
        up = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)
        drow = nearest_source(h, height, device=lr.device)[1][rows].to(feat.dtype)
        dcol = nearest_source(w, width, device=lr.device)[1][cols].to(feat.dtype)
        code = torch.full_like(drow, scale_code((h, w), size))
        where = torch.stack([drow, dcol, code], dim=1)[:, :, None]  # (B, 3, 1, N)
        base = resize(lr, size).flatten(2).gather(2, (rows * width + cols)[:, None].expand(-1, 3, -1))
        return base + self.to_image(torch.cat([up, where], dim=1))[:, :, 0]


def _bilinear_taps(n_src: int, n_dst: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear interpolation of n_src pixels at n_dst pixel centres as F.interpolate does it
    (align_corners=False, clamped at the ends): (i0, i1, t), each (n_dst,), so that the
    value at pixel j is lerp(src[i0[j]], src[i1[j]], t[j]); t in `like`'s dtype."""
    position = ((torch.arange(n_dst, device=like.device, dtype=torch.float64) + 0.5) * (n_src / n_dst) - 0.5).clamp_(min=0)
    i0 = position.floor().long().clamp_(max=n_src - 1)
    return i0, (i0 + 1).clamp_(max=n_src - 1), (position - i0).to(like.dtype)


Window = tuple[int, int, int, int]  # (top, left, height, width) of a crop of the target grid


def _crop(x: Tensor, window: Window | None) -> Tensor:
    if window is None:
        return x
    top, left, height, width = window
    return x[..., top : top + height, left : left + width]


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
