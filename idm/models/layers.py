"""Building blocks shared by the LR encoder and the denoising UNet (SR3 style)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# SR3 feeds sqrt(alpha_bar) in (0, 1] to a sinusoidal encoding; scaling it first (as
# WaveGrad does) spreads nearby noise levels over many periods so the net can tell
# them apart.
NOISE_LEVEL_SCALE = 1000.0


def conv3x3(in_ch: int, out_ch: int, *, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1: keeps the size at stride 1, gives ceil(n / 2) at stride 2."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)


class NoiseEmbedding(nn.Module):
    """Sinusoidal encoding of the continuous noise level, then an MLP (SR3).

    noise_level: (B,) = sqrt(alpha_bar) in (0, 1]. Returns (B, dim).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, noise_level: Tensor) -> Tensor:
        half = self.dim // 2
        # Transformer positional encoding with a continuous position (SR3, WaveGrad).
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=noise_level.device) / half)
        angles = NOISE_LEVEL_SCALE * noise_level.float()[:, None] * freqs[None, :]
        enc = F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, self.dim % 2))
        return self.mlp(enc.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """GroupNorm-Swish-Conv twice, the noise embedding added in between, plus a skip.

    x: (B, in_ch, H, W), emb: (B, emb_dim). Returns (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, *, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Single-head self-attention with a residual. x: (B, C, H, W) -> (B, C, H, W).

    With window = 0, or a map no larger than window x window, every pixel attends to
    every other. Otherwise the map is cut into window x window blocks from its top-left
    corner (the last row and column of blocks padded, the padding masked out) and each
    block attends within itself, so the cost per pixel is bounded whatever the image size.
    """

    def __init__(self, channels: int, *, groups: int, window: int = 0) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.window = window

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        win = self.window
        if not win or (h <= win and w <= win):
            y = _attend(qkv.reshape(b, 3, c, h * w).transpose(-1, -2)).transpose(-1, -2)
            return x + self.out(y.reshape(b, c, h, w))
        rows, cols = -(-h // win), -(-w // win)
        padded = F.pad(qkv, (0, cols * win - w, 0, rows * win - h))
        # (B, 3C, rows*win, cols*win) -> (B * rows * cols, 3, win*win, C)
        blocks = (padded.reshape(b, 3, c, rows, win, cols, win).permute(0, 3, 5, 1, 4, 6, 2)
                  .reshape(b * rows * cols, 3, win * win, c))
        mask = None
        if (rows * win, cols * win) != (h, w):
            valid = F.pad(x.new_ones(1, 1, h, w, dtype=torch.bool), (0, cols * win - w, 0, rows * win - h))
            mask = (valid.reshape(1, rows, win, cols, win).permute(0, 1, 3, 2, 4)
                    .reshape(rows * cols, 1, 1, win * win).repeat(b, 1, 1, 1))
        y = _attend(blocks, mask)  # (B * rows * cols, win*win, C)
        y = (y.reshape(b, rows, cols, win, win, c).permute(0, 5, 1, 3, 2, 4)
             .reshape(b, c, rows * win, cols * win)[..., :h, :w])
        return x + self.out(y)


def _attend(qkv: Tensor, mask: Tensor | None = None) -> Tensor:
    """qkv (N, 3, L, C) -> attention output (N, L, C); mask (N, 1, 1, L) bool, True = may be attended."""
    if not torch.is_grad_enabled():
        # Inference: contiguous (N, L, C) q, k, v take SDPA's flash kernel, which works
        # in blocks, in memory linear in L; with strided ones SDPA falls back on CPU to
        # its math kernel and holds L x L maps. Training keeps the math kernel, whose
        # rounding the reported default model was trained with (docs/decisions.md,
        # "Self-attention kernel at inference vs training").
        qkv = qkv.contiguous()
    q, k, v = qkv.unbind(1)
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask)[:, 0]


class Blur(nn.Module):
    """Per-channel [1, 2, 1] x [1, 2, 1] / 16 low-pass filter; keeps the size."""

    def __init__(self) -> None:
        super().__init__()
        # Written out, not computed: arithmetic on the meta device (memory estimates build the
        # model there) goes through torch's Python references and imports torch._dynamo, 1.3 s.
        kernel = [[[[1 / 16, 2 / 16, 1 / 16], [2 / 16, 4 / 16, 2 / 16], [1 / 16, 2 / 16, 1 / 16]]]]
        self.register_buffer("kernel", torch.tensor(kernel), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(padded, self.kernel.to(x.dtype).expand(c, 1, 3, 3), groups=c)
