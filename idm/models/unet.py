"""The denoising UNet of IDM: SR3's UNet with an implicit, scale-modulated decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm.config import ModelConfig
from idm.models.implicit import ImplicitUpsample
from idm.models.layers import NoiseEmbedding, ResBlock, SelfAttention, conv3x3
from idm.models.modulation import ScaleModulation


class LevelBlock(nn.Module):
    """A residual block, optionally followed by self-attention. x: (B, in_ch, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, *, attention: bool, cfg: ModelConfig) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim=cfg.base_channels,
                            groups=cfg.norm_groups, dropout=cfg.dropout)
        self.attn = (SelfAttention(out_ch, groups=cfg.norm_groups, window=cfg.attention_window)
                     if attention else nn.Identity())

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """SR3 UNet whose up-sampling is implicit and whose levels mix in LR features.

    forward(x (B, 6, H, W) = concat[x_con, x_t], noise_level (B,), pyramid, code (B,))
    -> predicted noise (B, 3, H, W). Level i runs at ceil(H / 2**i) x ceil(W / 2**i),
    so any H, W work (IDM gives it sides that are multiples of `ModelConfig.unet_stride`,
    so each level halves the one above exactly); pyramid[i] is the LR feature map of level i.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch, levels = cfg.channels, range(len(cfg.channels))
        self.noise_embed = NoiseEmbedding(cfg.base_channels)
        self.conv_in = conv3x3(6, ch[0])
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_ch, prev = [ch[0]], ch[0]
        for i in levels:
            for _ in range(cfg.res_blocks):
                self.down.append(LevelBlock(prev, ch[i], attention=i in cfg.attention_levels, cfg=cfg))
                prev = ch[i]
                skip_ch.append(prev)
            if i < len(ch) - 1:
                self.downsample.append(conv3x3(prev, prev, stride=2))
                skip_ch.append(prev)
        self.mid = nn.ModuleList([LevelBlock(prev, prev, attention=cfg.mid_attention, cfg=cfg),
                                  LevelBlock(prev, prev, attention=False, cfg=cfg)])
        self.up = nn.ModuleList()
        for i in reversed(levels):
            attention = i in cfg.attention_levels
            for _ in range(cfg.res_blocks + 1):  # one more than the encoder, as SR3
                self.up.append(LevelBlock(prev + skip_ch.pop(), ch[i], attention=attention, cfg=cfg))
                prev = ch[i]
        self.modulate = nn.ModuleList(ScaleModulation(c, hidden=cfg.modulation_hidden) for c in ch)
        self.upsample = nn.ModuleList(ImplicitUpsample(c, hidden=cfg.implicit_hidden) for c in ch[1:])
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[0])
        self.conv_out = conv3x3(ch[0], 3)
        self.res_blocks = cfg.res_blocks

    def forward(self, x: Tensor, noise_level: Tensor, pyramid: list[Tensor], code: Tensor) -> Tensor:
        emb = self.noise_embed(noise_level)
        skips = self._encode(self.conv_in(x), emb)
        h = skips[-1]
        for stage in self.mid:
            h = stage(h, emb)
        up = iter(self.up)
        for i in reversed(range(len(pyramid))):
            for _ in range(self.res_blocks + 1):
                h = next(up)(torch.cat([h, skips.pop()], dim=1), emb)
            h = self.modulate[i](h, pyramid[i], code)
            if i > 0:  # query the next, finer grid at exactly the skip's size
                h = self.upsample[i - 1](h, skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))

    def _encode(self, h: Tensor, emb: Tensor) -> list[Tensor]:
        """Encoder half: the list of skip tensors, finest first, coarsest last."""
        skips = [h]
        down = iter(self.down)
        for i in range(len(self.downsample) + 1):
            for _ in range(self.res_blocks):
                skips.append(next(down)(skips[-1], emb))
            if i < len(self.downsample):
                skips.append(self.downsample[i](skips[-1]))
        return skips
